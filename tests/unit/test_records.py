"""Records: the one path of status changes, the per-instance locks, the listeners.

Over a real store: each test checks what was written there, and what the
listeners heard and when.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from qudata_agent.domain.container_spec import ContainerState
from qudata_agent.domain.instance import IllegalTransition, Instance, Status, Wanted
from qudata_agent.errors import Conflict
from support.services import AGENT_ID, Base, base_on, listen, make_records, record


@pytest.fixture
def base(tmp_path: Path) -> Iterator[Base]:
    with base_on(tmp_path) as made:
        yield made


def state(
    status: str, started_at: str | None = "s1", exit_code: int | None = None
) -> ContainerState:
    return ContainerState(
        "c1", "qudata-a", "a", AGENT_ID, status, exit_code=exit_code, started_at=started_at
    )


async def test_what_docker_reports_is_written_through_the_transition_table(base: Base) -> None:
    records = make_records(base, clock=lambda: 50.0)
    before = record(base, "a", status=Status.RUNNING, container_id="c1", started_at="s1")
    after = await records.save_observed(before, state("exited", exit_code=3))
    assert after.status is Status.PAUSED and after.exit_code == 3
    assert after.updated_at == 50.0
    assert base.store.get_instance("a") == after


async def test_a_transition_the_table_refuses_is_neither_written_nor_told(base: Base) -> None:
    records = make_records(base)
    heard: list[object] = []
    listen(records, new_run=heard.append, changed=lambda: heard.append("changed"))
    gone = record(base, "a", status=Status.DESTROYED, container_id="c1")
    with pytest.raises(IllegalTransition):
        await records.save_observed(gone, state("running"))
    assert base.store.get_instance("a") == gone
    assert heard == []


async def test_the_store_has_the_change_before_a_listener_hears_of_it(base: Base) -> None:
    records = make_records(base)
    seen_in_store: list[Instance | None] = []
    listen(records, new_run=lambda i: seen_in_store.append(base.store.get_instance(i.id)))
    paused = record(base, "a", status=Status.PAUSED, container_id="c1", started_at="s1")
    await records.save_observed(paused, state("running", started_at="s2"))
    assert len(seen_in_store) == 1
    stored = seen_in_store[0]
    assert stored is not None and stored.status is Status.RUNNING and stored.started_at == "s2"


async def test_each_fresh_start_is_told_once(base: Base) -> None:
    records = make_records(base)
    runs: list[str | None] = []
    listen(records, new_run=lambda i: runs.append(i.started_at))
    instance = record(base, "a", status=Status.PAUSED, container_id="c1", started_at="s0")
    instance = await records.save_observed(instance, state("running", started_at="s1"))
    instance = await records.save_observed(instance, state("running", started_at="s1"))
    assert runs == ["s1"]  # the same run seen again is not a new one
    instance = await records.save_observed(instance, state("running", started_at="s2"))
    assert runs == ["s1", "s2"]  # restarted (e.g. by Docker): a new run
    await records.save_observed(instance, state("exited", started_at="s2", exit_code=0))
    assert runs == ["s1", "s2"]


async def test_a_vanished_container_takes_its_record_and_ports_and_is_told(base: Base) -> None:
    records = make_records(base)
    heard: list[object] = []
    listen(
        records,
        removed=lambda i: heard.append(("removed", i.id)),
        changed=lambda: heard.append("changed"),
    )
    gone = record(base, "a", container_id="c1", ports={"22": 30001})
    kept = record(base, "b", container_id="c2", ports={"22": 30002})
    await records.vanished(gone)
    assert base.store.get_instance("a") is None
    assert base.store.allocated_ports() == frozenset({30002})
    assert await records.all() == [kept]
    assert heard == [("removed", "a"), "changed"]


async def test_a_removal_is_told_to_removal_listeners_then_change_listeners(base: Base) -> None:
    records = make_records(base)
    heard: list[object] = []
    listen(records, changed=lambda: heard.append("changed"))
    listen(records, removed=lambda i: heard.append(i.id))
    records.removed(record(base, "a"))
    assert heard == ["a", "changed"]
    records.changed()
    assert heard == ["a", "changed", "changed"]


async def test_one_lock_per_instance(base: Base) -> None:
    records = make_records(base)
    assert records.lock("a") is records.lock("a")
    async with records.lock("a"):
        # Another instance's lock is free while this one is held.
        await asyncio.wait_for(records.lock("b").acquire(), 1)
        records.lock("b").release()
        assert records.lock("a").locked()
    first = records.lock("a")
    records.forget_lock("a")
    assert records.lock("a") is not first


async def test_the_lock_holder_is_the_only_one_acting(base: Base) -> None:
    records = make_records(base)
    inside = 0
    most = 0

    async def act() -> None:
        nonlocal inside, most
        async with records.lock("a"):
            inside += 1
            most = max(most, inside)
            await asyncio.sleep(0.01)
            inside -= 1

    await asyncio.gather(*(act() for _ in range(5)))
    assert most == 1


async def test_records_read_back_as_written_oldest_first(base: Base) -> None:
    records = make_records(base)
    first = record(base, "z", container_id="c1")
    second = record(base, "a", status=Status.PENDING)
    assert await records.all() == [first, second]
    wanted = replace(first, wanted=Wanted.STOPPED, wanted_at=9.0)
    assert await records.save(wanted) == wanted
    assert await records.get("z") == wanted
    assert await records.get("nobody") is None


async def test_an_insert_takes_its_ports_and_gpus_or_nothing(base: Base) -> None:
    records = make_records(base)
    first = record(base, "a", ports={"22": 30001}, gpus=("GPU-1",))
    clash = replace(first, id="b", ports={"22": 30002, "80": 30001}, gpus=())
    with pytest.raises(Conflict):
        records.insert(clash)
    assert await records.get("b") is None
    assert base.store.allocated_ports() == frozenset({30001})
    records.insert(replace(clash, ports={"22": 30002}, gpus=("GPU-2",)))
    assert base.store.allocated_ports() == frozenset({30001, 30002})
    assert base.store.allocated_gpus() == frozenset({"GPU-1", "GPU-2"})


async def test_a_failed_build_keeps_its_record_and_frees_what_it_held(base: Base) -> None:
    records = make_records(base)
    building = record(base, "a", status=Status.PENDING, ports={"22": 30001}, gpus=("GPU-1",))
    failed = building.move(Status.ERROR, now=5.0, reason="pull denied")
    await records.fail(failed)
    assert await records.get("a") == failed
    assert base.store.allocated_ports() == frozenset()
    assert base.store.allocated_gpus() == frozenset()


async def test_a_delete_takes_the_row_and_what_it_held(base: Base) -> None:
    records = make_records(base)
    record(base, "a", ports={"22": 30001}, gpus=("GPU-1",))
    kept = record(base, "b", ports={"22": 30002})
    await records.delete("a")
    assert await records.all() == [kept]
    assert base.store.allocated_ports() == frozenset({30002})
    assert base.store.allocated_gpus() == frozenset()
