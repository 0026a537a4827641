"""The build pipeline: pull, create, start, and every failure path leaving nothing behind.

The record is a real store's; Docker is `FakeEngine`, made to fail where a
test says so.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from qudata_agent.adapters.store import Store
from qudata_agent.domain.container_spec import ContainerSpec
from qudata_agent.domain.instance import Instance, Status
from qudata_agent.errors import Unavailable
from qudata_agent.services.builds import BuildPipeline
from qudata_agent.services.records import Records
from support.fake_engine import FakeEngine, PrepareWith
from support.services import AGENT_ID, Base, base_on, make_builds, make_records, record, spec_of


class FailingEngine(FakeEngine):
    """`FakeEngine` whose start, and container removal, fail when told to."""

    def __init__(self) -> None:
        super().__init__()
        self.start_error: Exception | None = None
        self.remove_fails = False
        self.removals = 0

    def start(self, container_id: str) -> None:
        if self.start_error is not None:
            raise self.start_error
        super().start(container_id)

    def remove(self, container_id: str) -> bool:
        self.removals += 1
        if self.remove_fails:
            raise Unavailable("Docker is down")
        return super().remove(container_id)


class FullDiskStore(Store):
    """A real store whose record of a failed build is refused a few times (a full disk)."""

    refusals = 0

    def fail_instance(self, instance: Instance) -> None:
        if self.refusals > 0:
            self.refusals -= 1
            raise Unavailable("the state database cannot be written: disk full")
        super().fail_instance(instance)


@dataclass
class Parts:
    base: Base
    engine: FailingEngine
    records: Records
    builds: BuildPipeline


async def parts_on(tmp_path: Path, store_type: type[Store] = Store) -> AsyncIterator[Parts]:
    with base_on(tmp_path, store_type) as base:
        engine = base.engine = FailingEngine()
        records = make_records(base)
        builds = make_builds(base, records)
        yield Parts(base, engine, records, builds)
        engine.pull_gate.set()
        await builds.close()


@pytest.fixture
async def p(tmp_path: Path) -> AsyncIterator[Parts]:
    async for made in parts_on(tmp_path):
        yield made


def pending(p: Parts, spec: ContainerSpec | None = None) -> Instance:
    return record(
        p.base, "a", status=Status.PENDING, spec=spec, ports={"22": 30001}, gpus=("GPU-1",)
    )


async def built(p: Parts, instance_id: str = "a") -> Instance:
    """The record once the build has ended."""
    for _ in range(500):
        if instance_id not in p.builds.building():
            break
        await asyncio.sleep(0.01)
    assert instance_id not in p.builds.building(), "the build never ended"
    stored = await p.records.get(instance_id)
    assert stored is not None
    return stored


async def phase_of(p: Parts, phase: str) -> None:
    for _ in range(500):
        current = await p.records.get("a")
        if current is not None and current.phase == phase:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never reached phase {phase}")


def assert_nothing_held(p: Parts, failed: Instance) -> None:
    assert failed.status is Status.ERROR and failed.container_id is None
    assert failed.ports == {} and failed.gpus == ()
    assert p.base.store.allocated_ports() == frozenset()
    assert p.base.store.allocated_gpus() == frozenset()


async def test_a_build_ends_running_in_a_container_of_its_deterministic_name(p: Parts) -> None:
    changes: list[str] = []
    p.records.events.on_change(lambda: changes.append("changed"))
    instance = pending(p)
    p.builds.start(instance, None)
    assert p.builds.building() == frozenset({"a"})
    running = await built(p)
    assert running.status is Status.RUNNING and running.phase is None
    assert running.container_id is not None
    container = p.engine.containers[running.container_id]
    assert container.name == instance.container_name and container.running
    assert p.engine.specs[running.container_id].labels == {
        "qudata.agent_id": AGENT_ID,
        "qudata.instance_id": "a",
    }
    assert running.ports == {"22": 30001}  # a build that worked keeps what it was given
    assert changes  # the answer's stats are sent at once


async def test_the_spec_is_prepared_while_creating_and_the_container_made_from_it(
    tmp_path: Path,
) -> None:
    seen: list[str | None] = []

    async def prepare(instance: Instance, spec: ContainerSpec) -> ContainerSpec:
        seen.append(instance.phase)
        return replace(spec, user="0:0")

    with base_on(tmp_path) as base:
        records = make_records(base)
        builds = make_builds(base, records, spec_preparer=PrepareWith(prepare))
        record(base, "a", status=Status.PENDING)
        builds.start((await records.all())[0], None)
        await asyncio.wait_for(_until_idle(builds), 5)
        running = await records.get("a")
        assert running is not None and running.container_id is not None
        assert seen == ["creating"]
        assert base.engine.specs[running.container_id].user == "0:0"
        await builds.close()


async def test_the_build_shuts_the_port_gate_before_the_start(tmp_path: Path) -> None:
    """The SSH port gate is the preparer's `before_start`: the build runs it beside
    Docker's create and the start waits for it."""
    with base_on(tmp_path) as base:
        engine = base.engine
        shut: list[tuple[str, ...]] = []

        async def before_start(instance: Instance) -> None:
            await asyncio.sleep(0.05)  # the create (a thread) ends meanwhile
            shut.append(tuple(c.status for c in engine.containers.values()))

        records = make_records(base)
        builds = make_builds(base, records, spec_preparer=PrepareWith(None, before_start))
        record(base, "a", status=Status.PENDING)
        builds.start((await records.all())[0], None)
        await asyncio.wait_for(_until_idle(builds), 5)
        running = await records.get("a")
        assert running is not None and running.status is Status.RUNNING
        assert shut == [("created",)]  # made meanwhile, not yet started when the gate shut
        await builds.close()


async def _until_idle(builds: BuildPipeline) -> None:
    while builds.building():
        await asyncio.sleep(0.01)


async def test_the_image_nvidia_variables_reach_the_container_empty_unless_set(p: Parts) -> None:
    p.engine.image_env = ("NVIDIA_VISIBLE_DEVICES=all", "NVIDIA_DRIVER_CAPABILITIES=all", "A=1")
    spec = spec_of("a", env={"NVIDIA_DRIVER_CAPABILITIES": "compute,utility"})
    p.builds.start(pending(p, spec), None)
    running = await built(p)
    assert running.container_id is not None
    env = p.engine.specs[running.container_id].env
    assert env == {"NVIDIA_VISIBLE_DEVICES": "", "NVIDIA_DRIVER_CAPABILITIES": "compute,utility"}


async def test_a_failed_pull_frees_everything_and_keeps_the_reason(p: Parts) -> None:
    p.engine.pull_error = "pull of slow:1 failed: denied"
    p.engine.pull_gate.set()
    p.builds.start(pending(p, spec_of("a", image="slow:1")), None)
    failed = await built(p)
    assert failed.reason == "pull of slow:1 failed: denied"
    assert_nothing_held(p, failed)
    assert p.engine.containers == {}


async def test_a_failed_start_removes_the_container_it_made(p: Parts) -> None:
    p.engine.start_error = Unavailable("docker start failed: no such device")
    p.builds.start(pending(p), None)
    failed = await built(p)
    assert failed.reason == "docker start failed: no such device"
    assert_nothing_held(p, failed)
    assert p.engine.containers == {}


async def test_an_unexpected_error_fails_the_build_with_a_generic_reason(p: Parts) -> None:
    p.engine.start_error = RuntimeError("a bug: secret=hunter2")
    p.builds.start(pending(p), None)
    failed = await built(p)
    assert failed.reason == "internal error while creating the instance"
    assert_nothing_held(p, failed)
    assert p.engine.containers == {}


async def test_with_docker_down_too_the_failure_is_still_recorded(p: Parts) -> None:
    """The removal gives up after a few tries (the reconcile removes the leftover later);
    the record never stays pending holding ports and GPUs."""
    p.engine.start_error = Unavailable("docker start failed")
    p.engine.remove_fails = True
    p.builds.start(pending(p), None)
    failed = await built(p)
    assert_nothing_held(p, failed)
    assert p.engine.removals >= 3  # retried, then left
    assert len(p.engine.containers) == 1  # the leftover the reconcile will remove


async def test_a_failure_record_refused_by_the_store_is_retried_until_taken(
    tmp_path: Path,
) -> None:
    async for p in parts_on(tmp_path, FullDiskStore):
        store = p.base.store
        assert isinstance(store, FullDiskStore)
        store.refusals = 2
        p.engine.start_error = Unavailable("docker start failed")
        p.builds.start(pending(p), None)
        failed = await built(p)
        assert store.refusals == 0
        assert_nothing_held(p, failed)


async def test_a_build_resumed_after_a_crash_adopts_the_container_it_had_made(p: Parts) -> None:
    instance = pending(p)
    made = p.engine.create(spec_of("a"))  # the crash came between create and start
    p.builds.start(instance, None, resumed=True)
    running = await built(p)
    assert running.status is Status.RUNNING and running.container_id == made
    assert list(p.engine.containers) == [made]


async def test_a_cancelled_build_leaves_the_record_to_the_delete(p: Parts) -> None:
    p.builds.start(pending(p, spec_of("a", image="slow:1")), None)
    await phase_of(p, "pulling")
    await asyncio.wait_for(p.builds.cancel("a"), 5)
    assert p.builds.building() == frozenset()
    p.engine.pull_gate.set()  # the shared pull ends after the cancel
    await asyncio.sleep(0.05)
    left = await p.records.get("a")
    assert left is not None and left.status is Status.PENDING and left.phase == "pulling"
    assert p.engine.containers == {}
    assert p.base.store.allocated_ports() == frozenset({30001})  # the delete frees them


async def test_close_ends_every_build_in_flight(p: Parts) -> None:
    p.builds.start(pending(p, spec_of("a", image="slow:1")), None)
    await phase_of(p, "pulling")
    await asyncio.wait_for(p.builds.close(), 5)
    assert p.builds.building() == frozenset()
