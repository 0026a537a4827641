"""The host as admission sees it: reserves, promised disk, the default storage, GPUs.

The readers are plain functions the test counts; what comes out is checked
through `Capacity` and the placement it leads to.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from qudata_agent.domain.placement import Request, place
from qudata_agent.domain.topology import GpuPlace, GpuTopology, HostShape
from qudata_agent.errors import Unavailable
from qudata_agent.services.capacity import Disk
from support.services import GIB, Base, base_on, eight_cpus, make_capacity


@pytest.fixture
def base(tmp_path: Path) -> Iterator[Base]:
    with base_on(tmp_path) as made:
        yield made


async def test_the_reserves_and_limits_are_subtracted_from_the_host(base: Base) -> None:
    capacity, disk = await make_capacity(
        base,
        max_instances=4,
        reserved_cpu_cores=1.5,
        reserved_memory_bytes=4 * GIB,
    ).read()
    assert disk == Disk(100 * GIB, 50 * GIB)
    assert capacity.cpu_cores == 8 - 1.5
    assert capacity.memory_bytes == (32 - 4) * GIB
    assert capacity.max_instances == 4
    assert capacity.disk_free_bytes == 50 * GIB


async def test_an_order_without_storage_gets_the_default_or_its_share_of_the_free_disk(
    base: Base,
) -> None:
    default, _ = await make_capacity(base, default_storage_bytes=20 * GIB).read()
    assert place(default, [], Request()).storage_bytes == 20 * GIB
    shared, _ = await make_capacity(base, max_instances=2).read()
    assert shared.default_storage_bytes is None
    assert place(shared, [], Request()).storage_bytes == 25 * GIB  # half of the 50 free


async def test_space_promised_to_volumes_is_not_free(base: Base) -> None:
    promised = {"bytes": 30 * GIB}
    capacity = make_capacity(base, reserved_disk=lambda: promised["bytes"])
    now, disk = await capacity.read()
    assert now.disk_free_bytes == 20 * GIB and disk.free_bytes == 20 * GIB
    assert disk.total_bytes == 100 * GIB
    promised["bytes"] = 80 * GIB  # more promised than is free: none left, never negative
    assert (await capacity.read())[0].disk_free_bytes == 0


async def test_an_unknown_free_space_stays_unknown(base: Base) -> None:
    asked: list[str] = []

    def promised() -> int:
        asked.append("promised")
        return GIB

    capacity = make_capacity(base, disk=lambda: Disk(None, None), reserved_disk=promised)
    now, _ = await capacity.read()
    assert now.disk_free_bytes is None and asked == []


async def test_cpus_and_memory_are_read_once_gpus_and_disk_each_time(base: Base) -> None:
    reads = {"shape": 0, "disk": 0}
    asked_gpus: list[bool] = []

    async def topology(need: bool) -> GpuTopology:
        asked_gpus.append(need)
        return GpuTopology((GpuPlace("GPU-1"),) if len(asked_gpus) == 1 else ())

    def shape(gpus: GpuTopology) -> HostShape:
        reads["shape"] += 1
        return eight_cpus(gpus)

    def disk() -> Disk:
        reads["disk"] += 1
        return Disk(100 * GIB, 50 * GIB - reads["disk"])

    capacity = make_capacity(base, topology=topology, shape=shape, disk=disk)
    first, _ = await capacity.read(need_gpus=True)
    second, _ = await capacity.read()
    assert reads == {"shape": 1, "disk": 2}
    assert asked_gpus == [True, False]
    assert first.shape.gpus.uuids == ("GPU-1",)
    assert second.shape.gpus.uuids == ()  # fell off the bus: no longer offered
    assert first.disk_free_bytes != second.disk_free_bytes


async def test_no_gpu_is_made_up_when_nvml_cannot_answer(base: Base) -> None:
    async def hung(need: bool) -> GpuTopology:
        if need:
            raise Unavailable("NVML does not answer")
        return GpuTopology()

    capacity = make_capacity(base, topology=hung)
    with pytest.raises(Unavailable):
        await capacity.read(need_gpus=True)
    without, _ = await capacity.read()
    assert without.shape.gpus.uuids == ()
