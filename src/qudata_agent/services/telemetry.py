"""Telemetry: the `/stats` payload, from the instance's cgroup, its network and its GPUs.

Owns the previous counter samples (so each report is a rate over the last
interval) and the cache of each container's init pid. What stays true:
- figures come straight from the cgroup, /proc and NVML, never `docker stats`;
- percentages are of what the instance was given (CONTRACT.md section 2);
  network figures are bytes per second; with no running instance the host's
  own figures go out with the instance's status (or `destroyed`);
- a figure that cannot be read is sent as 0 (a temperature as null), never
  made up, and the failure is logged once, not every tick.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from qudata_agent.blocking import Blocking
from qudata_agent.domain.container_spec import ContainerSpec, ContainerState
from qudata_agent.domain.instance import Instance, Status
from qudata_agent.domain.inventory import GpuSample
from qudata_agent.domain.usage import CgroupSample, compute_usage
from qudata_agent.errors import AgentError

log = logging.getLogger(__name__)


class CgroupSource(Protocol):
    def sample(self, container_id: str, pid: int) -> CgroupSample: ...


class Inspector(Protocol):
    def inspect(self, container_id: str) -> ContainerState: ...


class HostSource(Protocol):
    def sample(self) -> Any: ...  # adapters.host.HostSample


@dataclass(frozen=True)
class HostSize:
    cpus: int
    memory_bytes: int


def _gpu_figures(samples: tuple[GpuSample, ...]) -> dict[str, Any]:
    if not samples:
        return {"gpu_util": 0.0, "mem_util": 0.0, "gpu_temp": None}
    used = sum(s.memory_used_bytes for s in samples)
    total = sum(s.memory_total_bytes for s in samples) or 1
    temps = [s.temperature_c for s in samples if s.temperature_c is not None]
    return {
        "gpu_util": round(sum(s.util_percent for s in samples) / len(samples), 2),
        "mem_util": round(used / total * 100, 2),
        "gpu_temp": max(temps) if temps else None,
    }


class Telemetry:
    def __init__(
        self,
        *,
        current: Callable[[], Awaitable[Instance | None]],
        engine: Inspector,
        cgroups: CgroupSource,
        host: HostSource,
        gpu_samples: Callable[[tuple[str, ...]], Awaitable[tuple[GpuSample, ...]]],
        host_gpus: Callable[[], Awaitable[tuple[str, ...]]],
        size: HostSize,
        blocking: Blocking,
    ) -> None:
        self._current = current
        self._engine = engine
        self._cgroups = cgroups
        self._host = host
        self._gpu_samples = gpu_samples
        self._host_gpus = host_gpus
        self._size = size
        self._blocking = blocking
        self._prev: dict[str, CgroupSample] = {}
        self._prev_host: Any | None = None
        self._pids: dict[str, tuple[str | None, int]] = {}  # container -> (run, pid)
        self._failing = False
        self.last: dict[str, Any] | None = None  # the last payload made
        self.last_gpus: tuple[GpuSample, ...] = ()  # the GPU samples behind it (for /metrics)
        self.last_net: tuple[int, int] | None = None  # bytes received, sent (for /metrics)

    async def sample(self) -> dict[str, Any]:
        instance = await self._current()
        if instance is None or instance.status is not Status.RUNNING or not instance.container_id:
            payload = await self._host_payload(instance)
        else:
            try:
                payload = await self._instance_payload(instance)
                self._recovered()
            except AgentError as e:
                self._failed(e)
                self.last_gpus = ()
                self.last_net = None
                payload = {**_zero(), "status": instance.status.value}
        self.last = payload
        return payload

    async def _instance_payload(self, instance: Instance) -> dict[str, Any]:
        assert instance.container_id is not None
        cid = instance.container_id
        pid = await self._pid(cid, instance.started_at)
        cur = await self._blocking.quick(self._cgroups.sample, cid, pid)
        prev = self._prev.get(cid)
        self._prev = {cid: cur}  # one instance: forget every other container
        spec = ContainerSpec.from_json(instance.spec_json)
        usage = compute_usage(
            prev,
            cur,
            None if spec.nano_cpus is None else spec.nano_cpus / 1e9,
            spec.memory_bytes,
            self._size.cpus,
            self._size.memory_bytes,
        )
        gpus = await self._gpu_samples(instance.gpus)
        self.last_gpus = gpus
        self.last_net = (cur.net_rx_bytes, cur.net_tx_bytes)
        return {
            "cpu_util": round(usage.cpu_percent, 2),
            "ram_util": round(usage.ram_percent, 2),
            "inet_in": round(usage.rx_bytes_per_s, 1),
            "inet_out": round(usage.tx_bytes_per_s, 1),
            **_gpu_figures(gpus),
            "status": instance.status.value,
        }

    async def _pid(self, container_id: str, run: str | None) -> int:
        cached = self._pids.get(container_id)
        if cached is not None and cached[0] == run:
            return cached[1]
        state = await self._blocking.quick(self._engine.inspect, container_id)
        self._pids = {container_id: (run, state.pid or 0)}
        return state.pid or 0

    async def _host_payload(self, instance: Instance | None) -> dict[str, Any]:
        cur = await self._blocking.quick(self._host.sample)
        prev, self._prev_host = self._prev_host, cur
        elapsed = cur.at - prev.at if prev is not None else 0.0
        rx = (cur.net_rx_bytes - prev.net_rx_bytes) / elapsed if prev and elapsed > 0 else 0.0
        tx = (cur.net_tx_bytes - prev.net_tx_bytes) / elapsed if prev and elapsed > 0 else 0.0
        gpus = await self._gpu_samples(await self._host_gpus())
        self.last_gpus = gpus
        self.last_net = (cur.net_rx_bytes, cur.net_tx_bytes)
        return {
            "cpu_util": round(cur.cpu_percent, 2),
            "ram_util": round(cur.ram_percent, 2),
            "inet_in": round(max(rx, 0.0), 1),
            "inet_out": round(max(tx, 0.0), 1),
            **_gpu_figures(gpus),
            "status": "destroyed" if instance is None else instance.status.value,
        }

    def _failed(self, error: AgentError) -> None:
        if not self._failing:
            log.warning(
                "instance figures unreadable; sending zeros", extra={"error": error.message}
            )
        self._failing = True
        self._pids.clear()

    def _recovered(self) -> None:
        if self._failing:
            log.info("instance figures readable again")
        self._failing = False


def _zero() -> dict[str, Any]:
    return {
        "cpu_util": 0.0,
        "ram_util": 0.0,
        "inet_in": 0.0,
        "inet_out": 0.0,
        "gpu_util": 0.0,
        "mem_util": 0.0,
        "gpu_temp": None,
    }
