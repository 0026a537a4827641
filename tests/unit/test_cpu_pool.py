"""The shared CPU pool: instances without cores of their own kept off the pinned ones.

A host of 8 logical CPUs; records in a real store; a fake engine that
records every `set_cpuset` and can be made to hold, fail, or miss a container.
Passes are counted by the capacity reads they make (one each).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from qudata_agent.domain.topology import parse_cpu_list
from qudata_agent.errors import NotFound, Unavailable
from qudata_agent.services.capacity import Disk
from qudata_agent.services.cpu_pool import CpuPool
from support.services import (
    GIB,
    Base,
    base_on,
    make_capacity,
    make_cpu_pool,
    make_records,
    record,
    spec_of,
)


@dataclass
class CpusetEngine:
    calls: list[tuple[str, str]] = field(default_factory=list)
    gone: set[str] = field(default_factory=set)
    failures: int = 0  # the next calls that fail with Docker down
    gate: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.gate.set()

    def set_cpuset(self, container_id: str, cpus: str) -> None:
        self.gate.wait(10)
        if container_id in self.gone:
            raise NotFound(f"no container {container_id}")
        if self.failures:
            self.failures -= 1
            raise Unavailable("Docker is down")
        self.calls.append((container_id, cpus))


@dataclass
class Parts:
    base: Base
    engine: CpusetEngine
    pool: CpuPool
    passes: list[int]

    async def began(self, n: int) -> None:
        """Waits until `n` passes began."""
        for _ in range(500):
            if len(self.passes) >= n:
                break
            await asyncio.sleep(0.01)
        assert len(self.passes) == n, f"{len(self.passes)} passes, not {n}"

    async def after_passes(self, n: int) -> None:
        """Waits until `n` passes began, then for the last one to end."""
        await self.began(n)
        await asyncio.wait_for(self.pool.settled(), 5)


async def parts_on(tmp_path: Path, max_instances: int) -> AsyncIterator[Parts]:
    with base_on(tmp_path) as base:
        passes: list[int] = []

        def disk() -> Disk:
            passes.append(1)
            return Disk(100 * GIB, 50 * GIB)

        engine = CpusetEngine()
        capacity = make_capacity(base, disk=disk, max_instances=max_instances)
        pool = make_cpu_pool(base, make_records(base), capacity, engine, widen_after_s=0.2)
        yield Parts(base, engine, pool, passes)
        engine.gate.set()
        await pool.close()


@pytest.fixture
async def p(tmp_path: Path) -> AsyncIterator[Parts]:
    async for made in parts_on(tmp_path, max_instances=4):
        yield made


def pinned_and_floating(p: Parts) -> None:
    record(p.base, "pinned", container_id="c-pinned", spec=spec_of("pinned", cpuset_cpus="4-5"))
    record(p.base, "floating", container_id="c-floating")
    record(p.base, "building", container_id=None)  # no container yet: nothing to move


async def test_with_one_instance_per_host_nothing_is_changed(tmp_path: Path) -> None:
    async for p in parts_on(tmp_path, max_instances=1):
        pinned_and_floating(p)
        p.pool.poke()
        await asyncio.sleep(0.05)
        assert p.passes == [] and p.engine.calls == []


async def test_instances_without_cores_of_their_own_are_kept_off_pinned_ones(p: Parts) -> None:
    pinned_and_floating(p)
    p.pool.poke()
    await p.after_passes(1)
    assert p.engine.calls == [("c-floating", "0-3,6-7")]  # the pinned one is not touched
    shared = set(parse_cpu_list(p.engine.calls[0][1]))
    assert not shared & {4, 5}
    assert p.pool.applied == "0-3,6-7"


async def test_the_cores_of_a_removed_instance_are_shared_again(p: Parts) -> None:
    pinned_and_floating(p)
    p.pool.poke()
    await p.after_passes(1)
    p.base.store.delete_instance("pinned")
    p.pool.poke()
    await p.after_passes(2)
    assert p.engine.calls[-1] == ("c-floating", "0-7")
    assert p.pool.applied == "0-7"


async def test_a_container_already_on_the_pool_is_not_moved_again(p: Parts) -> None:
    pinned_and_floating(p)
    p.pool.poke()
    await p.after_passes(1)
    record(p.base, "new", container_id="c-new")  # a new floating container: on every CPU
    p.pool.poke()  # its new run
    await p.after_passes(2)
    assert p.engine.calls == [("c-floating", "0-3,6-7"), ("c-new", "0-3,6-7")]


async def test_a_freed_core_is_shared_after_a_wait_and_a_new_pin_on_it_moves_nothing(
    p: Parts,
) -> None:
    pinned_and_floating(p)
    p.pool.poke()
    await p.after_passes(1)
    p.base.store.delete_instance("pinned")
    p.pool.poke_later()  # the removal's
    await asyncio.sleep(0.05)
    assert len(p.passes) == 1  # not at once
    record(p.base, "again", container_id="c-again", spec=spec_of("again", cpuset_cpus="4-5"))
    p.pool.poke()  # the new pinned instance's run, on the freed cores
    await p.after_passes(2)
    await p.after_passes(3)  # the removal's pass, after the wait
    assert p.engine.calls == [("c-floating", "0-3,6-7")]  # nothing moved twice
    p.base.store.delete_instance("again")
    p.pool.poke_later()
    await p.after_passes(4)
    assert p.engine.calls[-1] == ("c-floating", "0-7")  # shared again once the wait is over


async def test_with_nothing_pinned_every_container_is_left_as_it_is(p: Parts) -> None:
    record(p.base, "a", container_id="c-a")
    record(p.base, "b", container_id="c-b")
    p.pool.poke()
    await p.after_passes(1)
    assert p.engine.calls == [] and p.pool.applied is None


async def test_a_container_gone_meanwhile_is_skipped(p: Parts) -> None:
    pinned_and_floating(p)
    record(p.base, "other", container_id="c-other")
    p.engine.gone.add("c-floating")
    p.pool.poke()
    await p.after_passes(1)
    assert p.engine.calls == [("c-other", "0-3,6-7")]
    assert p.pool.applied == "0-3,6-7"


async def test_a_failure_is_logged_and_the_next_poke_tries_again(
    p: Parts, caplog: pytest.LogCaptureFixture
) -> None:
    pinned_and_floating(p)
    p.engine.failures = 1
    with caplog.at_level(logging.WARNING, logger="qudata_agent.services.cpu_pool"):
        p.pool.poke()
        await p.after_passes(1)
    assert [r.message for r in caplog.records] == ["shared CPU pool not applied"]
    assert p.pool.applied is None
    p.pool.poke()
    await p.after_passes(2)
    assert p.engine.calls == [("c-floating", "0-3,6-7")]


async def test_pokes_during_a_pass_make_exactly_one_more(p: Parts) -> None:
    pinned_and_floating(p)
    p.engine.gate.clear()  # the first pass holds in its Docker call
    p.pool.poke()
    await p.began(1)
    for _ in range(3):
        p.pool.poke()
    await asyncio.sleep(0.05)
    assert len(p.passes) == 1  # never two at once
    p.engine.gate.set()
    await p.after_passes(2)
    await asyncio.sleep(0.05)
    assert len(p.passes) == 2


async def test_close_cancels_the_pass_in_flight(p: Parts) -> None:
    pinned_and_floating(p)
    p.engine.gate.clear()
    p.pool.poke()
    await p.began(1)
    p.pool.poke()  # one more asked for; close ends it all the same
    await asyncio.wait_for(p.pool.close(), 2)
    p.engine.gate.set()
    await asyncio.sleep(0.05)
    assert len(p.passes) == 1 and p.pool.applied is None
