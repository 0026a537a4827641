"""The volumes table: a volume is held by one instance, taken with its record, freed with it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from qudata_agent.adapters.store import PROJECT_ID_BASE, Store
from qudata_agent.domain.instance import Instance, Status, Wanted
from qudata_agent.domain.volumes import GIB, Mechanism, State, Volume
from qudata_agent.errors import Conflict


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store.open(tmp_path / "agent.db")
    yield opened
    opened.close()


def _instance(instance_id: str, port: int) -> Instance:
    return Instance(
        id=instance_id,
        status=Status.PENDING,
        wanted=Wanted.RUNNING,
        image="busybox",
        container_name=f"qudata-{instance_id}",
        ports={"8080": port},
    )


def _volume(volume_id: str, mechanism: Mechanism = Mechanism.LOOP) -> Volume:
    return Volume(volume_id, GIB, mechanism, State.READY, 1.0)


def test_an_instance_takes_its_volumes_and_a_second_is_refused_whole(store: Store) -> None:
    store.insert_volume(_volume("v1"))
    store.insert_volume(_volume("v2"))
    store.insert_instance(_instance("a", 41000), ["v1"])
    held = store.get_volume("v1")
    assert held is not None and held.instance_id == "a"
    with pytest.raises(Conflict, match="volume v1 is in use"):
        store.insert_instance(_instance("b", 41001), ["v2", "v1"])
    # Nothing of the refused order stays: not its record, not its port, not v2.
    assert [i.id for i in store.list_instances()] == ["a"]
    assert store.allocated_ports() == frozenset({41000})
    v2 = store.get_volume("v2")
    assert v2 is not None and v2.instance_id is None


def test_a_volume_that_is_not_ready_is_not_taken(store: Store) -> None:
    store.insert_volume(_volume("v1"))
    store.set_volume_state("v1", State.ERROR, "image missing")
    with pytest.raises(Conflict):
        store.insert_instance(_instance("a", 41000), ["v1"])
    broken = store.get_volume("v1")
    assert broken is not None and broken.reason == "image missing"


def test_deleting_or_failing_the_instance_frees_its_volumes(store: Store) -> None:
    store.insert_volume(_volume("v1"))
    store.insert_volume(_volume("v2"))
    store.insert_instance(_instance("a", 41000), ["v1"])
    store.insert_instance(_instance("b", 41001), ["v2"])
    assert not store.start_volume_delete("v1")  # held: no delete
    store.delete_instance("a")
    store.fail_instance(_instance("b", 41001))
    assert {v.id: v.instance_id for v in store.list_volumes()} == {"v1": None, "v2": None}
    assert store.start_volume_delete("v1")
    deleting = store.get_volume("v1")
    assert deleting is not None and deleting.state is State.DELETING
    store.delete_volume("v1")
    assert store.get_volume("v1") is None


def test_xfs_volumes_get_distinct_project_ids(store: Store) -> None:
    first = store.insert_volume(_volume("x1", Mechanism.XFS_PROJECT))
    second = store.insert_volume(_volume("x2", Mechanism.XFS_PROJECT))
    loop = store.insert_volume(_volume("l1"))
    assert first.project_id == PROJECT_ID_BASE and second.project_id == PROJECT_ID_BASE + 1
    assert loop.project_id is None
    reread = store.get_volume("x2")
    assert reread is not None and reread.project_id == PROJECT_ID_BASE + 1
