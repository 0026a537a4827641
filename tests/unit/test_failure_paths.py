"""The instance service's failure paths, with a fake engine: each test fails without its fix.

- a create landing between the sync's store read and its Docker listing keeps its container;
- a build that fails while Docker (and the store) refuse still ends in `error`, resources freed,
  and the leftover container is removed by the reconcile once Docker answers;
- intents cut short by a crash (`wanted` recorded, Docker never called) are carried out;
- concurrent deletes all succeed;
- a store constraint failure is a 404, never sqlite3's error.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from qudata_agent.adapters.store import Store
from qudata_agent.blocking import Blocking
from qudata_agent.domain.container_spec import ContainerSpec
from qudata_agent.domain.instance import Status, Wanted
from qudata_agent.domain.order import CreateOrder
from qudata_agent.domain.ssh_keys import parse_key
from qudata_agent.errors import NotFound, Unavailable
from support.fake_engine import FakeEngine, make_service, wait_for

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGk0Zmx1ZmZ5a2V5Zm9ydGVzdHNvbmx5MTIzNDU2Nzg5 me@host"


@pytest.fixture
async def parts(tmp_path: Path) -> Any:
    engine = FakeEngine()
    store = Store.open(tmp_path / "agent.db")
    blocking = Blocking()
    service = make_service(engine, store, blocking, cleanup_retry_s=0.01)
    yield service, engine, store
    engine.pull_gate.set()
    await service.close()
    blocking.close()
    store.close()


async def test_a_create_between_the_store_read_and_the_listing_keeps_its_container(
    parts: Any,
) -> None:
    service, engine, _store = parts
    loop = asyncio.get_running_loop()
    listed = engine.list_managed
    created: list[str] = []

    def list_after_a_create(agent_id: str) -> list[Any]:
        # The sync has read the store; a create lands now, before Docker is listed.
        future = asyncio.run_coroutine_threadsafe(
            service.create(CreateOrder(image="present", image_tag="1")), loop
        )
        created.append(future.result(5).id)
        deadline = time.monotonic() + 5
        while not any(c.instance_id == created[0] for c in engine.containers.values()):
            assert time.monotonic() < deadline, "the build never made its container"
            time.sleep(0.01)
        return listed(agent_id)

    engine.list_managed = list_after_a_create  # type: ignore[method-assign]
    await service.sync()
    engine.list_managed = listed  # type: ignore[method-assign]
    assert [c.instance_id for c in engine.containers.values()] == created
    running = await wait_for(service, Status.RUNNING)
    await service.sync()  # and the next pass, with the record read, keeps it too
    assert running.id == created[0] and len(engine.containers) == 1


async def test_an_old_container_without_a_record_is_removed_only_after_a_recheck(
    parts: Any,
) -> None:
    """Past the grace period, the store is asked again right before the removal."""
    service, engine, store = parts
    instance = await service.create(CreateOrder(image="present", image_tag="1"))
    await wait_for(service, Status.RUNNING)
    cid = next(iter(engine.containers))
    engine.containers[cid] = replace(engine.containers[cid], created_ts=1.0)
    hidden = store.list_instances
    store.list_instances = lambda: []  # type: ignore[method-assign]  # the record "not yet" read
    try:
        await service.sync()
    finally:
        store.list_instances = hidden  # type: ignore[method-assign]
    assert cid in engine.containers
    assert (await service.current()).id == instance.id


class DownAfterCreate(FakeEngine):
    """Docker answers the create, then goes away: start and removal fail."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    def create(self, spec: ContainerSpec) -> str:
        cid = super().create(spec)
        self.down = True
        return cid

    def start(self, container_id: str) -> None:
        if self.down:
            raise Unavailable("Docker is not reachable")
        super().start(container_id)

    def remove(self, container_id: str) -> bool:
        if self.down:
            raise Unavailable("Docker is not reachable")
        return super().remove(container_id)


async def test_a_build_failing_while_docker_is_down_ends_in_error_with_all_freed(
    tmp_path: Path,
) -> None:
    engine = DownAfterCreate()
    store = Store.open(tmp_path / "agent.db")
    blocking = Blocking()
    service = make_service(engine, store, blocking, cleanup_retry_s=0.01)
    fail_writes = [2]
    record = store.fail_instance

    def flaky_record(instance: Any) -> None:  # the store refuses too, twice
        if fail_writes[0]:
            fail_writes[0] -= 1
            raise Unavailable("the state database cannot be written: disk I/O error")
        record(instance)

    store.fail_instance = flaky_record  # type: ignore[method-assign]
    await service.create(CreateOrder(image="present", image_tag="1", ports={"8080": "auto"}))
    failed = await wait_for(service, Status.ERROR)
    assert "not reachable" in (failed.reason or "")
    assert failed.ports == {} and failed.container_id is None
    assert store.allocated_ports() == frozenset()
    assert len(engine.containers) == 1  # Docker could not remove it yet
    assert fail_writes == [0]  # recorded on the third try
    engine.down = False
    await service.sync()
    assert engine.containers == {}  # the reconcile removed the leftover
    await service.close()
    blocking.close()
    store.close()


async def test_a_stop_cut_short_by_a_crash_is_carried_out_by_the_reconcile(parts: Any) -> None:
    service, engine, store = parts
    await service.create(CreateOrder(image="present", image_tag="1", command="train"))
    running = await wait_for(service, Status.RUNNING)
    # The agent recorded `wanted=stopped` and died before `docker stop`.
    store.update_instance(running.want(Wanted.STOPPED, time.time()))
    await service.sync()
    assert engine.containers[running.container_id].status == "exited"
    assert (await service.current()).status is Status.PAUSED


async def test_a_start_cut_short_by_a_crash_is_carried_out_and_a_finished_job_is_not(
    parts: Any,
) -> None:
    service, engine, store = parts
    await service.create(CreateOrder(image="present", image_tag="1", command="train"))
    running = await wait_for(service, Status.RUNNING)
    engine._set(running.container_id, "exited", 0)  # the job finished on its own
    await service.sync()
    done = await service.current()
    assert (done.status, done.exit_code) == (Status.PAUSED, 0)
    assert engine.containers[running.container_id].status == "exited"  # not run again
    # The renter asked for a start; the agent recorded it and died before `docker start`.
    store.update_instance(done.want(Wanted.RUNNING, time.time() + 1))
    await service.sync()
    assert engine.containers[running.container_id].status == "running"
    assert (await service.current()).status is Status.RUNNING


async def test_concurrent_deletes_all_succeed(parts: Any) -> None:
    service, engine, store = parts
    await service.create(CreateOrder(image="present", image_tag="1", ports={"8080": "auto"}))
    await wait_for(service, Status.RUNNING)
    results = await asyncio.gather(*(service.delete() for _ in range(3)))
    assert all(r is not None for r in results)
    assert engine.containers == {} and store.allocated_ports() == frozenset()


async def test_a_key_for_a_deleted_instance_is_not_found(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "agent.db")
    with pytest.raises(NotFound):
        store.add_ssh_key("gone", parse_key(KEY))
    with pytest.raises(NotFound):
        store.set_ssh_state("gone", "ready", None)
    store.close()
