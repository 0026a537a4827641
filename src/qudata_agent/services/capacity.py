"""The host as admission sees it: its GPUs and their links, CPUs, memory, disk and limits.

Owns reading `domain.placement.Capacity` when a create (or `GET /v1/host`)
asks. The CPU layout and memory are read once (they do not change while the
agent runs); the GPUs are asked of NVML each time (bounded; a GPU that fell
off the bus is not offered), and the free space of Docker's data root is
measured each time, less what volumes were promised and have not written
yet (they count against the disk with `storage_gb`).

What stays true: no GPU is ever made up: without NVML the host has none; a
create that needs GPUs while NVML hangs gets `Unavailable` rather than a
"no GPU free" answer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from qudata_agent.blocking import Blocking
from qudata_agent.domain.placement import Capacity
from qudata_agent.domain.topology import GpuTopology, HostShape


@dataclass(frozen=True)
class Disk:
    total_bytes: int | None
    free_bytes: int | None


class HostCapacity:
    def __init__(
        self,
        *,
        topology: Callable[[bool], Awaitable[GpuTopology]],
        shape: Callable[[GpuTopology], HostShape],
        disk: Callable[[], Disk],
        blocking: Blocking,
        reserved_disk: Callable[[], int] | None = None,  # promised to volumes, unwritten
        max_instances: int = 1,
        reserved_cpu_cores: float = 1.0,
        reserved_memory_bytes: int = 2 * 1024**3,
        default_storage_bytes: int | None = None,
    ) -> None:
        self._default_storage_bytes = default_storage_bytes
        self._topology = topology
        self._shape = shape
        self._disk = disk
        self._reserved_disk = reserved_disk
        self._blocking = blocking
        self.max_instances = max_instances
        self._reserved_cpu_cores = reserved_cpu_cores
        self._reserved_memory_bytes = reserved_memory_bytes
        self._base: HostShape | None = None  # CPUs and memory, read once

    async def read(self, need_gpus: bool = False) -> tuple[Capacity, Disk]:
        """The capacity now, and the disk it measured; `need_gpus`: NVML must answer."""
        gpus = await self._topology(need_gpus)
        if self._base is None:
            self._base = await self._blocking.quick(self._shape, GpuTopology())
        disk = await self._blocking.quick(self._disk)
        if self._reserved_disk is not None and disk.free_bytes is not None:
            reserved = await self._blocking.quick(self._reserved_disk)
            disk = Disk(disk.total_bytes, max(0, disk.free_bytes - reserved))
        capacity = Capacity(
            shape=HostShape(gpus=gpus, cpus=self._base.cpus, memory_bytes=self._base.memory_bytes),
            disk_free_bytes=disk.free_bytes,
            reserved_cpu_cores=self._reserved_cpu_cores,
            reserved_memory_bytes=self._reserved_memory_bytes,
            max_instances=self.max_instances,
            default_storage_bytes=self._default_storage_bytes,
        )
        return capacity, disk
