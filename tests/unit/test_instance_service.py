"""The instance service with a small fake engine (the real one is covered in e2e).

These pin down the races that are hard to force through real Docker: a
delete while the image is still pulling, a build interrupted by a crash, and
resources freed on every failure path.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from qudata_agent.adapters.store import Store
from qudata_agent.blocking import Blocking
from qudata_agent.domain.container_spec import ContainerSpec, ContainerState
from qudata_agent.domain.gpu_health import GpuEvent
from qudata_agent.domain.instance import Action, Status
from qudata_agent.domain.order import CreateOrder
from qudata_agent.domain.ports import PortAllocator
from qudata_agent.errors import AgentError, Conflict, NotFound
from qudata_agent.services.instances import InstanceService
from qudata_agent.services.pulls import PullCoordinator


class PullFailed(AgentError):
    pass


class FakeEngine:
    """Containers in a dict; pulls that block until the test lets them go."""

    def __init__(self) -> None:
        self.images = {"present:1"}
        self.containers: dict[str, ContainerState] = {}
        self.specs: dict[str, ContainerSpec] = {}
        self.pull_gate = threading.Event()
        self.pull_error: str | None = None
        self.pulls = 0
        self._ids = 0

    def image_present(self, ref: str) -> bool:
        return ref in self.images

    def pull(
        self, ref: str, auth: Any, on_progress: Callable[[Any], None], inactivity_s: float
    ) -> None:
        self.pulls += 1
        self.pull_gate.wait(10)
        if self.pull_error:
            raise PullFailed(self.pull_error)
        self.images.add(ref)

    def create(self, spec: ContainerSpec) -> str:
        if any(c.name == spec.name for c in self.containers.values()):
            raise Conflict("name in use")
        self._ids += 1
        cid = f"c{self._ids}"
        self.specs[cid] = spec
        self.containers[cid] = ContainerState(
            cid, spec.name, spec.instance_id, spec.agent_id, "created"
        )
        return cid

    def _set(self, cid: str, status: str, exit_code: int | None = None) -> None:
        old = self._get(cid)
        self.containers[old.container_id] = ContainerState(
            old.container_id, old.name, old.instance_id, old.agent_id, status, exit_code
        )

    def _get(self, ref: str) -> ContainerState:
        for c in self.containers.values():
            if ref in (c.container_id, c.name):
                return c
        raise NotFound(f"no container {ref}")

    def start(self, container_id: str) -> None:
        self._set(container_id, "running")

    def stop(self, container_id: str, timeout_s: int = 10) -> None:
        self._set(container_id, "exited", 143)

    def restart(self, container_id: str, timeout_s: int = 10) -> None:
        self._set(container_id, "running")

    def remove(self, container_id: str) -> bool:
        try:
            c = self._get(container_id)
        except NotFound:
            return False
        del self.containers[c.container_id]
        return True

    def inspect(self, container_id: str) -> ContainerState:
        return self._get(container_id)

    def list_managed(self, agent_id: str) -> list[ContainerState]:
        return [c for c in self.containers.values() if c.agent_id == agent_id]

    def logs(self, container_id: str, tail: int) -> str:
        return "log line\n"


@pytest.fixture
async def parts(tmp_path: Path) -> AsyncIterator[tuple[InstanceService, FakeEngine, Store]]:
    engine = FakeEngine()
    store = Store.open(tmp_path / "agent.db")
    blocking = Blocking()
    service = _service(engine, store, blocking)
    yield service, engine, store
    engine.pull_gate.set()
    await service.close()
    blocking.close()
    store.close()


def _service(engine: FakeEngine, store: Store, blocking: Blocking) -> InstanceService:
    async def no_gpus() -> tuple[str, ...]:
        return ()

    return InstanceService(
        engine=engine,
        store=store,
        blocking=blocking,
        pulls=PullCoordinator(engine, blocking, inactivity_s=5),
        ports=PortAllocator((30000, 30009), frozenset(), lambda port, proto: True),
        gpu_uuids=no_gpus,
        agent_id="agent-1",
    )


async def _wait(service: InstanceService, *statuses: Status) -> Any:
    for _ in range(500):
        instance = await service.current()
        if instance is not None and instance.status in statuses:
            return instance
        await asyncio.sleep(0.01)
    raise AssertionError(f"never reached {statuses}: {await service.current()}")


async def test_create_builds_and_actions_follow_the_table(parts: Any) -> None:
    service, engine, store = parts
    instance = await service.create(CreateOrder(image="present", image_tag="1", ssh_enabled=True))
    assert instance.status is Status.PENDING and set(instance.ports) == {"22"}
    running = await _wait(service, Status.RUNNING)
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
    await _wait(service, Status.RUNNING)
    stopped = await service.act(Action.STOP)
    await service.delete()
    assert (await service.describe()).instance is None
    view = await service.describe(instance=stopped)
    assert view.instance is not None and view.instance.status is Status.PAUSED


async def test_actions_while_pending_are_refused(parts: Any) -> None:
    service, _engine, _ = parts
    await service.create(CreateOrder(image="slow", image_tag="1"))
    await _wait(service, Status.PENDING)
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
    failed = await _wait(service, Status.ERROR)
    assert failed.reason == "pull of slow:1 failed: denied"
    assert failed.ports == {} and store.allocated_ports() == frozenset()
    assert engine.containers == {}


async def test_two_waiters_share_one_pull(parts: Any) -> None:
    _, engine, _ = parts
    pulls = PullCoordinator(engine, Blocking(), inactivity_s=5)
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
    first = _service(engine, store, blocking)
    instance = await first.create(CreateOrder(image="present", image_tag="1"))
    await _wait(first, Status.RUNNING)
    # A crash between create and start: the container exists, the record says pending.
    engine._set(next(iter(engine.containers)), "created")
    store.update_instance(instance)
    await first.close()

    second = _service(engine, store, blocking)
    await second.restore()
    running = await _wait(second, Status.RUNNING)
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
    first = _service(engine, store, blocking)
    await first.create(CreateOrder(image="slow", image_tag="1"))
    for _ in range(200):
        current = await first.current()
        if current is not None and current.phase == "pulling":
            break
        await asyncio.sleep(0.01)
    await first.close()  # the agent goes away mid-pull

    engine.pull_error = "denied"
    engine.pull_gate.set()
    second = _service(engine, store, blocking)
    await second.restore()
    failed = await _wait(second, Status.ERROR)
    assert failed.reason.startswith("denied")  # the registry's own words first
    assert "does not keep registry credentials" in failed.reason
    await second.close()
    blocking.close()
    store.close()


async def test_orphans_and_vanished_containers_are_cleaned_up(parts: Any) -> None:
    service, engine, store = parts
    await service.create(CreateOrder(image="present", image_tag="1", ports={"8080": "auto"}))
    running = await _wait(service, Status.RUNNING)
    stray = ContainerState("stray", "qudata-x", "not-a-known-instance", "agent-1", "running")
    engine.containers["stray"] = stray
    await service.sync()
    assert "stray" not in engine.containers
    engine.remove(running.container_id)  # removed behind the agent's back
    await service.sync()
    assert await service.current() is None
    assert store.allocated_ports() == frozenset()


async def test_describe_shows_the_health_of_the_instance_gpus(parts: Any) -> None:
    service, _engine, _ = parts
    asked: list[tuple[str, float]] = []

    def health(instance: Any) -> list[GpuEvent]:
        asked.append((instance.id, instance.created_at))
        return [GpuEvent("GPU-a", "xid", 79, instance.created_at + 1)]

    service.show_gpu_health_with(health)
    assert (await service.describe()).gpu_health == ()  # no instance, nothing asked
    instance = await service.create(CreateOrder(image="present", image_tag="1"))
    view = await service.describe()
    assert view.gpu_health == (GpuEvent("GPU-a", "xid", 79, instance.created_at + 1),)
    assert asked == [(instance.id, instance.created_at)]


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

    async def no_gpus() -> tuple[str, ...]:
        return ()

    service = InstanceService(
        engine=engine,
        store=store,
        blocking=blocking,
        pulls=PullCoordinator(engine, blocking, inactivity_s=5),
        ports=PortAllocator((30000, 30009), frozenset(), lambda port, proto: True),
        gpu_uuids=no_gpus,
        agent_id="agent-1",
        prepare_spec=prepare,
    )
    try:
        instance = await service.create(CreateOrder(image="present", image_tag="1"))
        running = await _wait(service, Status.RUNNING)
        assert seen == [instance.id]
        created = engine.specs[running.container_id]
        assert (created.entrypoint, created.user) == (("/init",), "0:0")
    finally:
        await service.close()
        blocking.close()
        store.close()
