"""The state database: WAL, migrations recorded in user_version, the meta key/value view."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import pytest

from qudata_agent.adapters.store import MIGRATIONS, Store
from qudata_agent.domain.container_spec import ContainerSpec, Mount, PortBinding
from qudata_agent.domain.instance import Instance, Status, Wanted
from qudata_agent.domain.storage import StorageRequest
from qudata_agent.errors import Unavailable


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[Store]:
    s = Store.open(db_path)
    yield s
    s.close()


def test_the_journal_mode_is_wal(store: Store) -> None:
    assert store.journal_mode() == "wal"


def test_the_schema_version_is_the_number_of_migrations(store: Store) -> None:
    assert len(MIGRATIONS) >= 1
    assert store.schema_version() == len(MIGRATIONS)


def test_reopening_does_not_migrate_again(db_path: Path) -> None:
    Store.open(db_path).close()
    again = Store.open(db_path)  # a second CREATE TABLE meta would fail the open
    try:
        assert again.schema_version() == len(MIGRATIONS)
    finally:
        again.close()


def test_an_older_database_is_migrated_up(db_path: Path) -> None:
    conn = sqlite3.connect(db_path)
    for statement in MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute("INSERT INTO meta(key, value) VALUES('kept', 'yes')")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    store = Store.open(db_path)
    try:
        assert store.schema_version() == len(MIGRATIONS)
        assert store.get("kept") == "yes"
    finally:
        store.close()


SPEC_IN_COLUMN = 7  # the schema version that moved the spec out of the record


def _old_record(instance_id: str, spec_json: str) -> str:
    """An instance row's record as agents before migration 7 wrote it: the spec a string in it."""
    record = {
        "id": instance_id,
        "status": "running",
        "wanted": "running",
        "image": "busybox:1",
        "container_name": f"qudata-{instance_id}",
        "ports": {"22": 20001},
        "gpus": ["GPU-1"],
        "container_id": "c1",
        "phase": None,
        "reason": None,
        "exit_code": None,
        "ssh_enabled": True,
        "created_at": 1.0,
        "updated_at": 2.0,
        "spec_json": spec_json,
        "started_at": "2026-01-01T00:00:00Z",
        "wanted_at": 1.0,
    }
    return json.dumps(record, sort_keys=True)


def test_an_old_instance_row_loads_with_its_spec_after_the_migration(db_path: Path) -> None:
    spec = ContainerSpec(
        instance_id="i1",
        agent_id="a",
        image="busybox:1",
        command=("sleep", "inf"),
        env={"A": "1"},
        ports=(PortBinding(22, 20001),),
        gpu_uuids=("GPU-1",),
        mounts=(Mount("/src", "/dst"),),
        tmpfs=(("/run/x", "size=1m"),),
    )
    conn = sqlite3.connect(db_path)
    for migration in MIGRATIONS[: SPEC_IN_COLUMN - 1]:
        for statement in migration:
            conn.execute(statement)
    conn.execute(
        "INSERT INTO instances(id, status, record) VALUES(?, ?, ?)",
        ("i1", "running", _old_record("i1", json.dumps(asdict(spec), sort_keys=True))),
    )
    conn.execute(
        "INSERT INTO instances(id, status, record) VALUES(?, ?, ?)",
        ("i2", "running", _old_record("i2", "{}")),
    )
    conn.execute(f"PRAGMA user_version = {SPEC_IN_COLUMN - 1}")
    conn.commit()
    conn.close()
    store = Store.open(db_path)
    try:
        old = store.get_instance("i1")
        assert old is not None
        assert old.spec == spec
        assert (old.status, old.wanted, old.ports, old.gpus) == (
            Status.RUNNING,
            Wanted.RUNNING,
            {"22": 20001},
            ("GPU-1",),
        )
        assert old.started_at == "2026-01-01T00:00:00Z" and old.ssh_enabled
        without = store.get_instance("i2")
        assert without is not None and without.spec is None
        store.update_instance(old.move(Status.PAUSED, now=3.0))
        assert [i.spec for i in store.list_instances()] == [spec, None]
    finally:
        store.close()
    check = sqlite3.connect(db_path)
    (record,) = check.execute("SELECT record FROM instances WHERE id = 'i1'").fetchone()
    check.close()
    assert "spec_json" not in json.loads(record)  # the record no longer carries it


REQUESTS_IN_TABLE = 8  # the schema version that moved the storage requests out of meta


def _database_at(db_path: Path, version: int, blob: str | None) -> None:
    conn = sqlite3.connect(db_path)
    for migration in MIGRATIONS[: version - 1]:
        for statement in migration:
            conn.execute(statement)
    if blob is not None:
        conn.execute("INSERT INTO meta(key, value) VALUES('storage_requests', ?)", (blob,))
    conn.execute(f"PRAGMA user_version = {version - 1}")
    conn.commit()
    conn.close()


def test_the_storage_requests_blob_moves_to_its_table(db_path: Path) -> None:
    blob = {
        "asked": {"requested_bytes": 3 * 1024**3, "enforced": True, "default": False},
        "defaulted": {"requested_bytes": 1024**3, "enforced": False, "default": True},
        "before-default-was-kept": {"requested_bytes": 5, "enforced": False},
        "garbage": {"requested_bytes": "many"},
        "not-an-object": 7,
    }
    _database_at(db_path, REQUESTS_IN_TABLE, json.dumps(blob, sort_keys=True))
    store = Store.open(db_path)
    try:
        assert store.storage_requests() == {
            "asked": StorageRequest(3 * 1024**3, enforced=True, default=False),
            "defaulted": StorageRequest(1024**3, enforced=False, default=True),
            "before-default-was-kept": StorageRequest(5, enforced=False, default=False),
        }
        assert store.get("storage_requests") is None  # the blob is gone
    finally:
        store.close()


@pytest.mark.parametrize("blob", ["not json", "[1, 2]", "{}", None])
def test_an_unreadable_or_missing_storage_blob_leaves_no_requests(
    db_path: Path, blob: str | None
) -> None:
    _database_at(db_path, REQUESTS_IN_TABLE, blob)
    store = Store.open(db_path)  # never refuses to start over it
    try:
        assert store.schema_version() == len(MIGRATIONS)
        assert store.storage_requests() == {}
        assert store.get("storage_requests") is None
    finally:
        store.close()


def test_a_storage_request_is_pruned_when_its_instance_is_gone(store: Store) -> None:
    store.record_storage_request("first", StorageRequest(1, enforced=False))
    store.record_storage_request("second", StorageRequest(2, enforced=True))
    assert set(store.storage_requests()) == {"second"}  # "first" never got its row
    store.insert_instance(
        Instance(
            id="second",
            status=Status.PENDING,
            wanted=Wanted.RUNNING,
            image="busybox:1",
            container_name="qudata-second",
        )
    )
    store.record_storage_request("third", StorageRequest(3, enforced=False))
    assert set(store.storage_requests()) == {"second", "third"}
    store.delete_instance("second")
    assert set(store.storage_requests()) == {"third"}


def test_get_of_an_unknown_key_is_none(store: Store) -> None:
    assert store.get("nothing-here") is None


def test_set_then_get_and_set_replaces(store: Store) -> None:
    store.set("agent_id", "first")
    assert store.get("agent_id") == "first"
    store.set("agent_id", "second")
    assert store.get("agent_id") == "second"
    store.set("other", "x")
    assert store.get("agent_id") == "second"


def test_a_set_value_survives_close_and_reopen(db_path: Path) -> None:
    store = Store.open(db_path)
    store.set("k", "v")
    store.close()
    store = Store.open(db_path)
    try:
        assert store.get("k") == "v"
    finally:
        store.close()


def test_get_or_create_keeps_the_first_value_forever(db_path: Path) -> None:
    calls: list[str] = []

    def factory(value: str) -> str:
        calls.append(value)
        return value

    store = Store.open(db_path)
    assert store.get_or_create("agent_id", lambda: factory("one")) == "one"
    assert store.get_or_create("agent_id", lambda: factory("two")) == "one"
    assert store.get("agent_id") == "one"
    store.close()

    store = Store.open(db_path)
    try:
        assert store.get_or_create("agent_id", lambda: factory("three")) == "one"
        assert store.get("agent_id") == "one"
    finally:
        store.close()


def test_get_or_create_returns_a_value_set_earlier(store: Store) -> None:
    store.set("k", "set-before")
    assert store.get_or_create("k", lambda: "made") == "set-before"


def test_a_newer_database_is_refused(db_path: Path) -> None:
    conn = sqlite3.connect(db_path)
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(Unavailable) as caught:
        Store.open(db_path)
    assert str(db_path) in str(caught.value)
    conn = sqlite3.connect(db_path)
    try:
        # refused, not guessed at: nothing was created or rewritten
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        assert version == len(MIGRATIONS) + 1
        tables = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        assert tables == []
    finally:
        conn.close()


def test_a_file_that_is_not_a_database_is_refused(db_path: Path) -> None:
    db_path.write_bytes(b"this is not an sqlite database, just some text" * 100)
    with pytest.raises(Unavailable):
        Store.open(db_path)


def test_a_database_in_a_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(Unavailable):
        Store.open(tmp_path / "missing" / "state.db")


def test_private_images_and_the_image_cache(store: Store) -> None:
    digest = "sha256:" + "b" * 64
    assert not store.is_private("reg/app", [digest])
    assert not store.is_private("reg/app", [])
    store.mark_private("reg/app", [digest])
    store.mark_private("reg/app", [digest])  # twice is fine
    assert store.is_private("reg/app", ["sha256:other", digest])
    assert not store.is_private("reg/other", [digest])
    # by image ID too: any spelling of the image (no digest of its own) finds the record
    assert not store.is_private("other", [], "sha256:" + "c" * 64)
    store.mark_private("reg/app", [digest], "sha256:" + "c" * 64)
    assert store.is_private("other", [], "sha256:" + "c" * 64)
    assert not store.is_private("other", [], "sha256:" + "d" * 64)
    store.cache_pulled("id-1", "reg/app:1", 10.0)
    store.cache_pulled("id-1", "reg/app:2", 20.0)
    store.cache_pulled("id-1", "reg/app:1", 30.0)
    store.cache_used("id-1", 40.0)
    store.cache_used("id-unknown", 50.0)  # not the agent's: nothing recorded
    assert store.cached_images() == [("id-1", ("reg/app:1", "reg/app:2"), 40.0)]
    store.forget_cached("id-1")
    assert store.cached_images() == []


def test_a_read_only_open_never_creates_migrates_or_writes(tmp_path: Path) -> None:
    missing = tmp_path / "none.db"
    with pytest.raises(Unavailable):
        Store.open_readonly(missing)
    assert not missing.exists()
    older = tmp_path / "older.db"
    conn = sqlite3.connect(older)
    conn.execute("PRAGMA user_version = 1")
    conn.execute(MIGRATIONS[0][0])
    conn.commit()
    conn.close()
    with pytest.raises(Unavailable, match="schema version 1"):
        Store.open_readonly(older)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["older.db"]  # no -wal, no -shm
    check = sqlite3.connect(older)
    assert check.execute("PRAGMA user_version").fetchone() == (1,)  # not migrated
    check.close()


def test_a_read_only_store_reads_what_the_agent_wrote_and_refuses_writes(db_path: Path) -> None:
    writer = Store.open(db_path)
    writer.set("agent_port", "1024")
    try:
        reader = Store.open_readonly(db_path)
        try:
            assert reader.get("agent_port") == "1024"
            with pytest.raises(Unavailable):
                reader.set("agent_port", "1")
        finally:
            reader.close()
        assert writer.get("agent_port") == "1024"
    finally:
        writer.close()
    # With the agent gone, a read-only open leaves no file behind.
    names = sorted(p.name for p in db_path.parent.iterdir())
    reader = Store.open_readonly(db_path)
    assert reader.get("agent_port") == "1024"
    reader.close()
    assert sorted(p.name for p in db_path.parent.iterdir()) == names


def test_reads_do_not_wait_for_a_write_in_progress(store: Store, db_path: Path) -> None:
    """A writer holds the store's write side while SQLite syncs the file; reads go on."""
    store.set("agent_id", "a-1")
    got: list[object] = []
    with store._lock:  # a write is in progress (its commit waiting for the disk)
        reader = threading.Thread(target=lambda: got.extend([store.get("agent_id")]))
        reader.start()
        reader.join(timeout=2)
        assert got == ["a-1"]
    outside = sqlite3.connect(db_path)
    try:
        outside.execute("BEGIN IMMEDIATE")  # another writer holds SQLite's write lock
        assert store.list_instances() == [] and store.get("agent_id") == "a-1"
    finally:
        outside.rollback()
        outside.close()


def test_the_ssh_states_and_image_checks_of_the_instances_asked_for(store: Store) -> None:
    for name in ("a", "b", "c"):
        store.insert_instance(
            Instance(name, Status.PENDING, Wanted.RUNNING, "busybox:1", f"qudata-{name}")
        )
    store.set_ssh_state("a", "ready", None, "run-1")
    store.set_ssh_state("c", "failed", "no shell")
    store.set_instance_image("b", "sha256:b", "sha256:d", 5.0, "checked")
    assert store.ssh_states(["a", "b", "c"]) == {
        "a": ("ready", None, "run-1"),
        "c": ("failed", "no shell", None),
    }
    assert store.ssh_states(["c"]) == {"c": ("failed", "no shell", None)}
    assert store.ssh_states([]) == {}
    assert store.ssh_state("a") == ("ready", None, "run-1") and store.ssh_state("b") is None
    assert store.instance_images(["a", "b"]) == {"b": ("sha256:b", "sha256:d", 5.0, "checked")}
    assert store.instance_image("b") == ("sha256:b", "sha256:d", 5.0, "checked")
    assert store.instance_images([]) == {} and store.instance_image("a") is None
