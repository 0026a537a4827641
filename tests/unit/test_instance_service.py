"""The instance service with a small fake engine (the real one is covered in e2e).

These pin down the races that are hard to force through real Docker: a
delete while the image is still pulling, a build interrupted by a crash, and
resources freed on every failure path.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from qudata_agent.adapters.docker.ports import DockerPorts
from qudata_agent.adapters.store import Store
from qudata_agent.blocking import Blocking
from qudata_agent.domain.container_spec import ContainerSpec, ContainerState
from qudata_agent.domain.gpu_health import GpuEvent
from qudata_agent.domain.instance import Action, Status, Wanted
from qudata_agent.domain.order import CreateOrder
from qudata_agent.errors import Conflict, Unavailable
from qudata_agent.services.instances import InstanceService
from qudata_agent.services.pulls import PullCoordinator
from support.fake_engine import FakeEngine, make_service, wait_for


@pytest.fixture
async def parts(tmp_path: Path) -> AsyncIterator[tuple[InstanceService, FakeEngine, Store]]:
    engine = FakeEngine()
    store = Store.open(tmp_path / "agent.db")
    blocking = Blocking()
    service = make_service(engine, store, blocking)
    yield service, engine, store
    engine.pull_gate.set()
    await service.close()
    blocking.close()
    store.close()


async def test_create_builds_and_actions_follow_the_table(parts: Any) -> None:
    service, engine, store = parts
    instance = await service.create(CreateOrder(image="present", image_tag="1", ssh_enabled=True))
    assert instance.status is Status.PENDING and set(instance.ports) == {"22"}
    running = await wait_for(service, Status.RUNNING)
    assert engine.specs[running.container_id].labels["qudata.instance_id"] == instance.id
    assert (await service.act(Action.STOP)).status is Status.PAUSED
    assert (await service.act(Action.START)).status is Status.RUNNING
    with pytest.raises(Conflict):
        await service.create(CreateOrder(image="present", image_tag="1"))
    await service.delete()
    assert engine.containers == {} and store.allocated_ports() == frozenset()


async def test_an_action_is_described_as_it_left_the_instance(parts: Any) -> None:
    """PUT answers with the state its action produced, even if a DELETE came in between."""
    service, _engine, _ = parts
    await service.create(CreateOrder(image="present", image_tag="1"))
    await wait_for(service, Status.RUNNING)
    stopped = await service.act(Action.STOP)
    await service.delete()
    assert (await service.describe()).instance is None
    view = await service.describe(instance=stopped)
    assert view.instance is not None and view.instance.status is Status.PAUSED


async def test_actions_while_pending_are_refused(parts: Any) -> None:
    service, _engine, _ = parts
    await service.create(CreateOrder(image="slow", image_tag="1"))
    await wait_for(service, Status.PENDING)
    with pytest.raises(Conflict):
        await service.act(Action.STOP)


async def test_delete_while_pulling_leaves_nothing_behind(parts: Any) -> None:
    service, engine, store = parts
    await service.create(CreateOrder(image="slow", image_tag="1", ports={"8080": "auto"}))
    for _ in range(200):
        current = await service.current()
        if current is not None and current.phase == "pulling":
            break
        await asyncio.sleep(0.01)
    assert (await service.current()).phase == "pulling"
    await service.delete()
    engine.pull_gate.set()  # the pull finishes after the delete
    await asyncio.sleep(0.2)
    assert engine.containers == {}
    assert await service.current() is None
    assert store.allocated_ports() == frozenset()


async def test_a_failed_pull_frees_everything_and_keeps_the_reason(parts: Any) -> None:
    service, engine, store = parts
    engine.pull_error = "pull of slow:1 failed: denied"
    engine.pull_gate.set()
    await service.create(CreateOrder(image="slow", image_tag="1", ports={"8080": "auto"}))
    failed = await wait_for(service, Status.ERROR)
    assert failed.reason == "pull of slow:1 failed: denied"
    assert failed.ports == {} and store.allocated_ports() == frozenset()
    assert engine.containers == {}


async def test_two_waiters_share_one_pull(parts: Any) -> None:
    _, engine, _ = parts
    blocking = Blocking()
    pulls = PullCoordinator(DockerPorts(engine, blocking), blocking, inactivity_s=5)
    first = asyncio.ensure_future(pulls.ensure("shared:1", None))
    second = asyncio.ensure_future(pulls.ensure("shared:1", None))
    await asyncio.sleep(0.05)
    engine.pull_gate.set()
    await asyncio.gather(first, second)
    assert engine.pulls == 1


async def test_restore_resumes_a_build_cut_short_and_adopts_its_container(
    tmp_path: Path,
) -> None:
    engine = FakeEngine()
    store = Store.open(tmp_path / "agent.db")
    blocking = Blocking()
    first = make_service(engine, store, blocking)
    instance = await first.create(CreateOrder(image="present", image_tag="1"))
    await wait_for(first, Status.RUNNING)
    # A crash between create and start: the container exists, the record says pending.
    engine._set(next(iter(engine.containers)), "created")
    store.update_instance(instance)
    await first.close()

    second = make_service(engine, store, blocking)
    await second.restore()
    running = await wait_for(second, Status.RUNNING)
    assert running.id == instance.id
    assert len(engine.containers) == 1  # adopted, not made twice
    await second.close()
    blocking.close()
    store.close()


async def test_a_pull_resumed_without_credentials_says_why_it_failed(tmp_path: Path) -> None:
    """Credentials are not kept: a pull cut short by a restart goes on without them, and
    if the registry refuses it, the reason says what to do."""
    engine = FakeEngine()
    store = Store.open(tmp_path / "agent.db")
    blocking = Blocking()
    first = make_service(engine, store, blocking)
    await first.create(CreateOrder(image="slow", image_tag="1"))
    for _ in range(200):
        current = await first.current()
        if current is not None and current.phase == "pulling":
            break
        await asyncio.sleep(0.01)
    await first.close()  # the agent goes away mid-pull

    engine.pull_error = "denied"
    engine.pull_gate.set()
    second = make_service(engine, store, blocking)
    await second.restore()
    failed = await wait_for(second, Status.ERROR)
    assert failed.reason.startswith("denied")  # the registry's own words first
    assert "does not keep registry credentials" in failed.reason
    await second.close()
    blocking.close()
    store.close()


async def test_orphans_and_vanished_containers_are_cleaned_up(parts: Any) -> None:
    service, engine, store = parts
    await service.create(CreateOrder(image="present", image_tag="1", ports={"8080": "auto"}))
    running = await wait_for(service, Status.RUNNING)
    stray = ContainerState(
        "stray", "qudata-x", "not-a-known-instance", "agent-1", "running", created_ts=1.0
    )
    engine.containers["stray"] = stray
    young = replace(stray, container_id="young", name="qudata-y", created_ts=time.time())
    engine.containers["young"] = young  # within the grace period: maybe a create in flight
    await service.sync()
    assert "stray" not in engine.containers
    assert "young" in engine.containers
    engine.remove(running.container_id)  # removed behind the agent's back
    await service.sync()
    assert await service.current() is None
    assert store.allocated_ports() == frozenset()


async def test_describe_shows_the_health_of_the_instance_gpus(tmp_path: Path) -> None:
    asked: list[tuple[str, float]] = []

    def health(instance: Any) -> list[GpuEvent]:
        asked.append((instance.id, instance.created_at))
        return [GpuEvent("GPU-a", "xid", 79, instance.created_at + 1)]

    store, blocking = Store.open(tmp_path / "agent.db"), Blocking()
    service = make_service(FakeEngine(), store, blocking, gpu_health=health)
    assert (await service.describe()).gpu_health == ()  # no instance, nothing asked
    instance = await service.create(CreateOrder(image="present", image_tag="1"))
    view = await service.describe()
    assert view.gpu_health == (GpuEvent("GPU-a", "xid", 79, instance.created_at + 1),)
    assert asked == [(instance.id, instance.created_at)]
    await service.close()
    blocking.close()
    store.close()


async def test_the_container_is_created_from_the_spec_the_ssh_service_gives(
    tmp_path: Path,
) -> None:
    """Between the pull and the create, `prepare_spec` has the last word on the spec."""
    engine = FakeEngine()
    store = Store.open(tmp_path / "agent.db")
    blocking = Blocking()
    seen: list[str] = []

    async def prepare(instance: Any, spec: ContainerSpec) -> ContainerSpec:
        seen.append(instance.id)
        return replace(spec, entrypoint=("/init",), user="0:0")

    service = make_service(engine, store, blocking, prepare_spec=prepare)
    try:
        instance = await service.create(CreateOrder(image="present", image_tag="1"))
        running = await wait_for(service, Status.RUNNING)
        assert seen == [instance.id]
        created = engine.specs[running.container_id]
        assert (created.entrypoint, created.user) == (("/init",), "0:0")
    finally:
        await service.close()
        blocking.close()
        store.close()


class StopRefusingEngine(FakeEngine):
    """Docker that fails a stop, after noting what the store said when it was asked."""

    def __init__(self, store: Store) -> None:
        super().__init__()
        self.store = store
        self.wanted_at_stop: list[str] = []

    def stop(self, container_id: str, timeout_s: int = 10) -> None:
        recorded = next(i for i in self.store.list_instances() if i.container_id == container_id)
        self.wanted_at_stop.append(recorded.wanted.value)
        raise Unavailable("docker stop timed out")


async def test_an_action_records_its_intent_before_docker_is_asked(tmp_path: Path) -> None:
    """A crash (here, a failure) between the intent and the Docker call leaves the intent
    on record, with its time, so the reconcile can carry it out."""
    store = Store.open(tmp_path / "agent.db")
    blocking = Blocking()
    engine = StopRefusingEngine(store)
    service = make_service(engine, store, blocking)
    try:
        await service.create(CreateOrder(image="present", image_tag="1"))
        running = await wait_for(service, Status.RUNNING)
        with pytest.raises(Unavailable):
            await service.act(Action.STOP)
        assert engine.wanted_at_stop == ["stopped"]
        after = await service.current()
        assert after.wanted is Wanted.STOPPED and after.wanted_at > running.wanted_at
        assert after.status is Status.RUNNING  # only Docker's word changes the status
    finally:
        await service.close()
        blocking.close()
        store.close()


class RestartRefusingEngine(FakeEngine):
    def restart(self, container_id: str, timeout_s: int = 10) -> None:
        raise Unavailable("docker restart timed out")


async def test_a_start_or_restart_runs_inside_the_ssh_gates_block_and_a_stop_does_not(
    tmp_path: Path,
) -> None:
    """The SSH service gates the port around Docker's start (`SpecPreparer.starting`):
    the block is left with Docker's error when the start fails, so the gate opens
    again; a stop never enters it."""
    store = Store.open(tmp_path / "agent.db")
    blocking = Blocking()
    service = make_service(RestartRefusingEngine(), store, blocking)
    try:
        await service.create(CreateOrder(image="present", image_tag="1"))
        running = await wait_for(service, Status.RUNNING)
        await service.act(Action.STOP)
        await service.act(Action.START)
        with pytest.raises(Unavailable):
            await service.act(Action.RESTART)
        assert service.preparer.starts == [(running.id, "ok"), (running.id, "Unavailable")]
    finally:
        await service.close()
        blocking.close()
        store.close()
