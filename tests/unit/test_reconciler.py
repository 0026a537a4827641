"""The reconciler: Docker brought in line with the records, and the records with Docker.

Containers live in `FakeEngine`; records in a real store. Each test sets up
what Docker shows and what was wanted, runs a pass, and checks both sides.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from qudata_agent.domain.container_spec import ContainerState
from qudata_agent.domain.instance import Instance, Status, Wanted
from qudata_agent.errors import Unavailable
from qudata_agent.services.builds import BuildPipeline
from qudata_agent.services.reconciler import Reconciler
from qudata_agent.services.records import Records
from support.fake_engine import FakeEngine
from support.services import (
    AGENT_ID,
    Base,
    base_on,
    listen,
    make_builds,
    make_reconciler,
    make_records,
    record,
    spec_of,
)

LONG_AGO = 1.0  # a container's creation time well past the grace period


class StopFailingEngine(FakeEngine):
    def __init__(self) -> None:
        super().__init__()
        self.stop_fails: set[str] = set()
        self.on_list: Callable[[], None] = lambda: None  # what happens while Docker lists

    def list_managed(self, agent_id: str) -> list[ContainerState]:
        self.on_list()
        return super().list_managed(agent_id)

    def stop(self, container_id: str, timeout_s: int = 10) -> None:
        if container_id in self.stop_fails:
            raise Unavailable("docker stop timed out")
        super().stop(container_id, timeout_s)


@dataclass
class Parts:
    base: Base
    engine: StopFailingEngine
    records: Records
    builds: BuildPipeline
    reconciler: Reconciler
    passes: list[bool]
    heard: list[object]


@pytest.fixture
async def p(tmp_path: Path) -> AsyncIterator[Parts]:
    with base_on(tmp_path) as base:
        engine = base.engine = StopFailingEngine()
        records = make_records(base)
        builds = make_builds(base, records)
        passes: list[bool] = []
        heard: list[object] = []
        listen(
            records,
            new_run=lambda i: heard.append(("new run", i.id)),
            removed=lambda i: heard.append(("removed", i.id)),
            changed=lambda: heard.append("changed"),
        )
        reconciler = make_reconciler(base, records, builds, on_pass=passes.append)
        yield Parts(base, engine, records, builds, reconciler, passes, heard)
        engine.pull_gate.set()
        await builds.close()


def container(
    p: Parts, instance_id: str | None, agent_id: str | None = AGENT_ID, **state: object
) -> ContainerState:
    """A labelled container in Docker (old unless `created_ts` says otherwise)."""
    name = f"qudata-{instance_id or 'unlabelled'}"
    cid = f"c-{instance_id or 'unlabelled'}-{agent_id}"
    made = ContainerState(cid, name, instance_id, agent_id, "running", created_ts=LONG_AGO)
    made = replace(made, **state)  # type: ignore[arg-type]
    p.engine.containers[cid] = made
    return made


def built(
    p: Parts, instance_id: str, recorded: Status = Status.RUNNING, **state: object
) -> tuple[Instance, ContainerState]:
    """A built instance's record (`recorded`) and its container (`state`)."""
    made = container(p, instance_id, **state)
    kept = record(
        p.base,
        instance_id,
        status=recorded,
        container_id=made.container_id,
        started_at=made.started_at,
        ports={"22": 30100 + len(p.base.store.list_instances())},
    )
    return kept, made


async def test_a_container_removed_behind_the_agents_back_takes_its_record(p: Parts) -> None:
    gone = record(p.base, "a", container_id="c-gone", ports={"22": 30001})
    kept, _ = built(p, "b")
    await p.reconciler.sync()
    assert await p.records.all() == [kept]
    assert p.base.store.allocated_ports() == frozenset(kept.ports.values())
    assert ("removed", gone.id) in p.heard
    assert p.passes == [True]


async def test_only_the_agents_own_old_orphans_are_removed(p: Parts) -> None:
    foreign = container(p, "theirs", agent_id="another-agent")
    unlabelled = container(p, None, agent_id=None)
    orphan = container(p, "orphan")
    young = container(p, "young", created_ts=time.time())  # maybe a create in flight
    await p.reconciler.sync()
    assert orphan.container_id not in p.engine.containers
    assert set(p.engine.containers) == {
        foreign.container_id,
        unlabelled.container_id,
        young.container_id,
    }
    assert p.engine.containers[foreign.container_id] == foreign  # not even stopped


async def test_a_container_whose_record_came_after_the_store_was_read_is_kept(p: Parts) -> None:
    """The store is read before Docker lists; a removal checks the store again first."""
    raced = container(p, "raced")

    def create_meanwhile() -> None:
        record(p.base, "raced", status=Status.PENDING)

    p.engine.on_list = create_meanwhile
    await p.reconciler.sync()
    assert raced.container_id in p.engine.containers


async def test_the_container_of_an_instance_being_built_is_not_an_orphan(p: Parts) -> None:
    record(p.base, "a", status=Status.PENDING, spec=spec_of("a", image="slow:1"))
    p.builds.start((await p.records.all())[0], None)  # waits in its pull
    early = container(p, "a", name="qudata-a-earlier")
    await p.reconciler.sync()
    assert early.container_id in p.engine.containers


async def test_the_container_of_a_failed_build_is_removed(p: Parts) -> None:
    failed = record(p.base, "a", status=Status.ERROR, reason="start failed")
    leftover = container(p, "a", status="created")
    await p.reconciler.sync()
    assert leftover.container_id not in p.engine.containers
    assert await p.records.get("a") == failed  # the record and its reason stay


async def test_a_container_running_while_the_renter_wanted_it_stopped_is_stopped(
    p: Parts,
) -> None:
    instance, made = built(p, "a")
    await p.records.save(instance.want(Wanted.STOPPED, time.time()))
    await p.reconciler.sync()
    assert p.engine.containers[made.container_id].status == "exited"
    stored = await p.records.get("a")
    assert stored is not None and stored.status is Status.PAUSED
    assert "changed" in p.heard


async def test_a_start_the_renter_asked_for_that_never_happened_is_made(p: Parts) -> None:
    instance, made = built(
        p, "a", Status.PAUSED, status="exited", exit_code=0, started_ts=10.0, started_at="s1"
    )
    await p.records.save(instance.want(Wanted.RUNNING, 20.0))  # recorded; then the crash
    await p.reconciler.sync()
    assert p.engine.containers[made.container_id].running
    stored = await p.records.get("a")
    assert stored is not None and stored.status is Status.RUNNING
    assert ("new run", "a") in p.heard  # SSH comes back on it


async def test_a_command_that_finished_stays_finished(p: Parts) -> None:
    instance, made = built(
        p,
        "a",
        Status.PAUSED,
        status="exited",
        exit_code=0,
        started_ts=30.0,
        restart_policy="on-failure",
    )
    await p.records.save(replace(instance, wanted_at=20.0))  # the run began after the ask
    await p.reconciler.sync()
    assert p.engine.containers[made.container_id].status == "exited"


async def test_one_instance_failing_does_not_stop_the_others(p: Parts) -> None:
    stuck, stuck_container = built(p, "a")
    await p.records.save(stuck.want(Wanted.STOPPED, time.time()))
    p.engine.stop_fails.add(stuck_container.container_id)
    record(p.base, "b", container_id="c-gone")
    with pytest.raises(Unavailable):
        await p.reconciler.sync()
    assert await p.records.get("b") is None  # its step ran all the same
    assert p.passes == [False]
    p.engine.stop_fails.clear()
    await p.reconciler.sync()
    assert p.engine.containers[stuck_container.container_id].status == "exited"
    assert p.passes == [False, True]


async def test_an_event_brings_the_record_in_line_once(p: Parts) -> None:
    _, made = built(p, "a", started_at="s1")
    p.engine.containers[made.container_id] = replace(made, status="exited", exit_code=2)
    await p.reconciler.on_container_event(made.name)
    stored = await p.records.get("a")
    assert stored is not None and stored.status is Status.PAUSED and stored.exit_code == 2
    assert p.heard == ["changed"]
    await p.reconciler.on_container_event(made.container_id)  # nothing new to say
    assert p.heard == ["changed"]


async def test_restore_resumes_interrupted_builds_and_brings_ssh_back(tmp_path: Path) -> None:
    order: list[str] = []
    with base_on(tmp_path) as base:
        records = make_records(base)
        builds = make_builds(base, records)
        listen(records, new_run=lambda i: order.append(f"new run {i.id}"))

        async def volumes_first() -> None:
            order.append("volumes")

        reconciler = make_reconciler(base, records, builds, restore_first=volumes_first)
        cid = base.engine.create(spec_of("up"))
        base.engine.start(cid)
        record(base, "up", container_id=cid, started_at=base.engine.inspect(cid).started_at)
        record(base, "cut", status=Status.PENDING)
        await reconciler.restore()
        assert order[0] == "volumes"
        for _ in range(500):
            if not builds.building():
                break
            await asyncio.sleep(0.01)
        resumed = await records.get("cut")
        assert resumed is not None and resumed.status is Status.RUNNING
        assert "new run up" in order
        await builds.close()
