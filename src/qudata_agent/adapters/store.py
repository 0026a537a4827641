"""The agent's state database: SQLite in WAL mode, the only module that runs SQL.

Owns the schema and its migrations (numbered, applied in order, recorded in
`PRAGMA user_version`) and every query. What stays true:
- a migration runs once, inside a transaction, and a database newer than this
  code is refused rather than guessed at;
- a value written with `set` is durable when the call returns;
- a write SQLite cannot make (a full disk, an I/O error) raises `Unavailable`,
  and a failed transaction is rolled back, never left open;
- a write that a constraint refuses never escapes as sqlite3's error: one that
  names a missing instance (its record was deleted meanwhile) is `NotFound`,
  any other `Conflict`;
- calls are blocking: async code reaches them through `blocking.Blocking`.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from qudata_agent.adapters.store_codec import (
    instance_from_json,
    instance_to_json,
    spec_from_json,
    spec_to_json,
)
from qudata_agent.domain.instance import Instance
from qudata_agent.domain.ssh_keys import PublicKey
from qudata_agent.domain.storage import StorageRequest
from qudata_agent.domain.volumes import Mechanism, State, Volume
from qudata_agent.errors import Conflict, NotFound, Unavailable

log = logging.getLogger(__name__)

PROJECT_ID_BASE = 40000  # XFS project ids of volumes start here, clear of a host's own

# Each entry upgrades the schema by one version (its statements run in one
# transaction); never edit a released one, append a new one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    ("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",),
    (
        # One row per instance; `record` is the domain's JSON form of Instance.
        "CREATE TABLE instances (id TEXT PRIMARY KEY, status TEXT NOT NULL, record TEXT NOT NULL)",
        # A host port or a GPU belongs to at most one instance: the primary
        # keys make a double allocation impossible even if a caller errs.
        "CREATE TABLE port_allocations (port INTEGER PRIMARY KEY,"
        " instance_id TEXT NOT NULL REFERENCES instances(id) ON DELETE CASCADE,"
        " container_port TEXT NOT NULL)",
        "CREATE TABLE gpu_allocations (uuid TEXT PRIMARY KEY,"
        " instance_id TEXT NOT NULL REFERENCES instances(id) ON DELETE CASCADE)",
    ),
    (
        # The renter's keys, in the order given; a key is its type and body.
        "CREATE TABLE ssh_keys (seq INTEGER PRIMARY KEY AUTOINCREMENT,"
        " instance_id TEXT NOT NULL REFERENCES instances(id) ON DELETE CASCADE,"
        " kind TEXT NOT NULL, blob TEXT NOT NULL, comment TEXT NOT NULL,"
        " UNIQUE (instance_id, kind, blob))",
        # SSH setup state of an instance (installing, ready, failed) and the
        # container run (Docker's StartedAt) in which sshd was last brought up.
        "CREATE TABLE ssh_state (instance_id TEXT PRIMARY KEY"
        " REFERENCES instances(id) ON DELETE CASCADE,"
        " status TEXT NOT NULL, reason TEXT, run TEXT)",
    ),
    (
        # Images pulled with credentials, by repository and manifest digest: a
        # later order must have the registry confirm its own access. Never
        # credentials: only what names the image.
        "CREATE TABLE private_images (repository TEXT NOT NULL, digest TEXT NOT NULL,"
        " PRIMARY KEY (repository, digest))",
        # Images the agent pulled (the cache its GC manages): the references it
        # pulled into each, and when an instance last used it (else its pull).
        "CREATE TABLE cached_images (image_id TEXT PRIMARY KEY, refs TEXT NOT NULL,"
        " last_used REAL NOT NULL)",
        # What each instance's image check found (digest, when checked, a note).
        "CREATE TABLE instance_images (instance_id TEXT PRIMARY KEY"
        " REFERENCES instances(id) ON DELETE CASCADE,"
        " image_id TEXT NOT NULL, digest TEXT, checked_at REAL, note TEXT)",
    ),
    (
        # Renters' volumes (domain.volumes). The instance that holds one is
        # cleared when its record goes (a deleted instance frees its volumes).
        "CREATE TABLE volumes (id TEXT PRIMARY KEY, size_bytes INTEGER NOT NULL,"
        " mechanism TEXT NOT NULL, state TEXT NOT NULL, reason TEXT,"
        " instance_id TEXT REFERENCES instances(id) ON DELETE SET NULL,"
        " project_id INTEGER UNIQUE, created_at REAL NOT NULL)",
    ),
    (
        # Private images by image ID too: a spelling of the reference that names no
        # repository digest (another tag, an ID prefix) still finds the record.
        "CREATE TABLE private_image_ids (image_id TEXT PRIMARY KEY)",
    ),
    (
        # The container spec in a column of its own (adapters.store_codec), out of
        # the record, where it was a JSON string inside the JSON; '{}' was no spec.
        "ALTER TABLE instances ADD COLUMN spec TEXT",
        "UPDATE instances SET spec = NULLIF(json_extract(record, '$.spec_json'), '{}'),"
        " record = json_remove(record, '$.spec_json')",
    ),
    (
        # What each instance's storage_gb asked for (domain.storage.StorageRequest),
        # recorded at admission, before the instance's own row: no foreign key;
        # a row goes with its instance's, and a recording prunes orphans.
        "CREATE TABLE storage_requests (instance_id TEXT PRIMARY KEY,"
        " requested_bytes INTEGER NOT NULL, enforced INTEGER NOT NULL,"
        " is_default INTEGER NOT NULL)",
        # Until now one JSON object in the meta key 'storage_requests'. An entry
        # that cannot be read (or a blob that is not an object) is dropped, as
        # the reader of the blob did.
        "INSERT INTO storage_requests(instance_id, requested_bytes, enforced, is_default)"
        " SELECT key, json_extract(value, '$.requested_bytes'),"
        " COALESCE(json_extract(value, '$.enforced'), 0),"
        " COALESCE(json_extract(value, '$.default'), 0)"
        " FROM json_each((SELECT value FROM meta WHERE key = 'storage_requests'"
        " AND json_valid(value) AND json_type(value) = 'object'))"
        " WHERE json_type(value) = 'object'"
        " AND json_type(value, '$.requested_bytes') = 'integer'",
        "DELETE FROM meta WHERE key = 'storage_requests'",
    ),
)


class _VolumeTaken(Conflict):
    pass


def _columns(instance: Instance) -> tuple[str, str | None]:
    """The `record` and `spec` columns of an instance row."""
    return instance_to_json(instance), spec_to_json(instance.spec)


def _reader(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA busy_timeout=5000")
    conn.execute("PRAGMA query_only=ON")
    return conn


class Store:
    """A small key/value view over the state database (instances come later)."""

    def __init__(self, conn: sqlite3.Connection, reader: sqlite3.Connection | None = None) -> None:
        self._conn = conn
        self._lock = threading.Lock()
        # Reads have a connection of their own where the database is written: in WAL
        # mode a reader sees the last commit and never waits for a writer's fsync (a
        # list answer during a burst of creates waited behind each build step's).
        self._reader = reader or conn
        self._read_lock = threading.Lock() if reader is not None else self._lock

    @classmethod
    def open(cls, path: Path) -> Store:
        conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=5000")
            conn.execute("PRAGMA foreign_keys=ON")
            cls(conn)._migrate()
            store = cls(conn, _reader(path))  # once the schema is this agent's
        except sqlite3.Error as e:
            if conn is not None:
                conn.close()
            raise Unavailable(f"state database {path} cannot be opened: {e}") from e
        return store

    @classmethod
    def open_readonly(cls, path: Path) -> Store:
        """For `doctor` and `status`: never creates, migrates or writes the database.

        Raises `Unavailable` when the file cannot be read, or when its schema is
        not this agent's (older: the agent migrates it when it next starts).
        """
        conn: sqlite3.Connection | None = None
        try:
            uri = f"{path.resolve().as_uri()}?mode=ro"
            if not Path(f"{path}-wal").exists():
                # No connection has it open (WAL mode keeps a -wal file while one does):
                # read it as a plain file, or SQLite would leave a -wal and -shm behind.
                uri += "&immutable=1"
            conn = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA busy_timeout=5000")
            conn.execute("PRAGMA query_only=ON")
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            if version != len(MIGRATIONS):
                raise sqlite3.DatabaseError(
                    f"schema version {version}, this agent's is {len(MIGRATIONS)}"
                )
        except sqlite3.Error as e:
            if conn is not None:
                conn.close()
            raise Unavailable(f"state database {path} cannot be read: {e}") from e
        return cls(conn)

    def _migrate(self) -> None:
        (current,) = self._conn.execute("PRAGMA user_version").fetchone()
        if current > len(MIGRATIONS):
            raise sqlite3.DatabaseError(
                f"schema version {current} is newer than this agent knows ({len(MIGRATIONS)})"
            )
        for version in range(current, len(MIGRATIONS)):
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in MIGRATIONS[version]:
                    self._conn.execute(statement)
                self._conn.execute(f"PRAGMA user_version = {version + 1}")
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            log.info("state database migrated", extra={"schema_version": version + 1})

    def journal_mode(self) -> str:
        with self._lock:
            (mode,) = self._conn.execute("PRAGMA journal_mode").fetchone()
        return str(mode)

    def schema_version(self) -> int:
        with self._lock:
            (version,) = self._conn.execute("PRAGMA user_version").fetchone()
        return int(version)

    def get(self, key: str) -> str | None:
        with self._reading() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set(self, key: str, value: str) -> None:
        with self._writing():
            self._conn.execute(
                "INSERT INTO meta(key, value) VALUES(?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    def get_or_create(self, key: str, factory: Callable[[], str]) -> str:
        """Returns the stored value, storing `factory()` first if there is none."""
        with self._writing():
            self._conn.execute(
                "INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO NOTHING",
                (key, factory()),
            )
            (value,) = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return str(value)

    def _of_instances(
        self, table: str, columns: str, instance_ids: Sequence[str]
    ) -> list[tuple[Any, ...]]:
        """`instance_id, columns` of the rows of these instances (`table` and `columns`:
        this module's constants; the ids go in as parameters)."""
        marks = ", ".join("?" * len(instance_ids)) or "NULL"  # `IN ()` is an error
        sql = f"SELECT instance_id, {columns} FROM {table} WHERE instance_id IN ({marks})"  # noqa: S608
        with self._reading() as conn:
            return list(conn.execute(sql, tuple(instance_ids)).fetchall())

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        with self._read_lock:
            yield self._reader

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """Holds the lock for a write; a write SQLite cannot make (a full disk) is Unavailable."""
        with self._lock:
            try:
                yield
            except sqlite3.OperationalError as e:
                raise Unavailable(f"the state database cannot be written: {e}") from e
            except sqlite3.IntegrityError as e:
                if e.sqlite_errorname == "SQLITE_CONSTRAINT_FOREIGNKEY":
                    raise NotFound("the instance is gone (deleted meanwhile)") from e
                raise Conflict("the change conflicts with what is recorded") from e

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._writing():
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:  # SQLite may have rolled back already
                    self._conn.execute("ROLLBACK")
                raise

    def insert_instance(self, instance: Instance, volumes: Iterable[str] = ()) -> None:
        """Stores a new instance with its ports, GPUs and volumes, all or nothing."""
        try:
            with self._transaction() as tx:
                tx.execute(
                    "INSERT INTO instances(id, status, record, spec) VALUES(?, ?, ?, ?)",
                    (instance.id, instance.status.value, *_columns(instance)),
                )
                self._take_volumes(tx, instance.id, volumes)
                tx.executemany(
                    "INSERT INTO port_allocations(port, instance_id, container_port)"
                    " VALUES(?, ?, ?)",
                    [(port, instance.id, key) for key, port in instance.ports.items()],
                )
                tx.executemany(
                    "INSERT INTO gpu_allocations(uuid, instance_id) VALUES(?, ?)",
                    [(uuid, instance.id) for uuid in instance.gpus],
                )
        except _VolumeTaken:
            raise
        except Conflict as e:  # a primary key of the allocations refused it
            raise Conflict("a host port or GPU of this instance is already allocated") from e

    def update_instance(self, instance: Instance) -> None:
        with self._writing():
            self._conn.execute(
                "UPDATE instances SET status = ?, record = ?, spec = ? WHERE id = ?",
                (instance.status.value, *_columns(instance), instance.id),
            )

    def release_resources(self, instance_id: str) -> None:
        """Frees the instance's ports and GPUs (its record stays)."""
        with self._transaction() as tx:
            self._release(tx, instance_id)

    def fail_instance(self, instance: Instance) -> None:
        """Records a failed build and frees its ports and GPUs, in one transaction."""
        with self._transaction() as tx:
            tx.execute(
                "UPDATE instances SET status = ?, record = ?, spec = ? WHERE id = ?",
                (instance.status.value, *_columns(instance), instance.id),
            )
            self._release(tx, instance.id)

    @staticmethod
    def _release(tx: sqlite3.Connection, instance_id: str) -> None:
        tx.execute("DELETE FROM port_allocations WHERE instance_id = ?", (instance_id,))
        tx.execute("DELETE FROM gpu_allocations WHERE instance_id = ?", (instance_id,))
        tx.execute("UPDATE volumes SET instance_id = NULL WHERE instance_id = ?", (instance_id,))

    @staticmethod
    def _take_volumes(tx: sqlite3.Connection, instance_id: str, volumes: Iterable[str]) -> None:
        """Each volume goes to the instance, or none does: a taken or unready one is Conflict."""
        for volume_id in volumes:
            taken = tx.execute(
                "UPDATE volumes SET instance_id = ? WHERE id = ? AND instance_id IS NULL"
                " AND state = ?",
                (instance_id, volume_id, State.READY.value),
            ).rowcount
            if taken != 1:
                raise _VolumeTaken(f"volume {volume_id} is in use or not ready")

    def delete_instance(self, instance_id: str) -> None:
        """Removes the record; its ports and GPUs go with it (ON DELETE CASCADE), and its
        storage request."""
        with self._transaction() as tx:
            tx.execute("DELETE FROM instances WHERE id = ?", (instance_id,))
            tx.execute("DELETE FROM storage_requests WHERE instance_id = ?", (instance_id,))

    def storage_requests(self) -> dict[str, StorageRequest]:
        """What each instance's storage_gb asked for, by instance id."""
        with self._reading() as conn:
            rows = conn.execute(
                "SELECT instance_id, requested_bytes, enforced, is_default FROM storage_requests"
            ).fetchall()
        return {str(i): StorageRequest(int(n), bool(e), bool(d)) for i, n, e, d in rows}

    def record_storage_request(self, instance_id: str, request: StorageRequest) -> None:
        """Records (or replaces) one request; those of instances that are gone are pruned.

        Called at admission, before the instance's row is inserted: its own
        request is kept whether or not the row exists yet.
        """
        with self._transaction() as tx:
            tx.execute(
                "DELETE FROM storage_requests WHERE instance_id != ?"
                " AND instance_id NOT IN (SELECT id FROM instances)",
                (instance_id,),
            )
            tx.execute(
                "INSERT OR REPLACE INTO storage_requests"
                "(instance_id, requested_bytes, enforced, is_default) VALUES(?, ?, ?, ?)",
                (instance_id, request.requested_bytes, request.enforced, request.default),
            )

    def get_instance(self, instance_id: str) -> Instance | None:
        with self._reading() as conn:
            row = conn.execute(
                "SELECT record, spec FROM instances WHERE id = ?", (instance_id,)
            ).fetchone()
        return None if row is None else instance_from_json(row[0], spec_from_json(row[1]))

    def list_instances(self) -> list[Instance]:
        with self._reading() as conn:
            rows = conn.execute("SELECT record, spec FROM instances ORDER BY rowid").fetchall()
        return [instance_from_json(record, spec_from_json(spec)) for record, spec in rows]

    def allocated_ports(self) -> frozenset[int]:
        with self._reading() as conn:
            rows = conn.execute("SELECT port FROM port_allocations").fetchall()
        return frozenset(int(row[0]) for row in rows)

    def allocated_gpus(self) -> frozenset[str]:
        with self._reading() as conn:
            rows = conn.execute("SELECT uuid FROM gpu_allocations").fetchall()
        return frozenset(str(row[0]) for row in rows)

    def ssh_keys(self, instance_id: str) -> list[PublicKey]:
        with self._reading() as conn:
            rows = conn.execute(
                "SELECT kind, blob, comment FROM ssh_keys WHERE instance_id = ? ORDER BY seq",
                (instance_id,),
            ).fetchall()
        return [PublicKey(str(k), str(b), str(c)) for k, b, c in rows]

    def add_ssh_key(self, instance_id: str, key: PublicKey) -> bool:
        """False when the same key (type and body) is already there."""
        with self._writing():
            cursor = self._conn.execute(
                "INSERT INTO ssh_keys(instance_id, kind, blob, comment) VALUES(?, ?, ?, ?)"
                " ON CONFLICT(instance_id, kind, blob) DO NOTHING",
                (instance_id, key.kind, key.blob, key.comment),
            )
        return cursor.rowcount == 1

    def remove_ssh_key(self, instance_id: str, key: PublicKey) -> bool:
        """Removes exactly that key (type and body); False when it was not there."""
        with self._writing():
            cursor = self._conn.execute(
                "DELETE FROM ssh_keys WHERE instance_id = ? AND kind = ? AND blob = ?",
                (instance_id, key.kind, key.blob),
            )
        return cursor.rowcount == 1

    def ssh_state(self, instance_id: str) -> tuple[str, str | None, str | None] | None:
        """(status, reason, run) of the instance's SSH setup, if any."""
        return self.ssh_states([instance_id]).get(instance_id)

    def ssh_states(
        self, instance_ids: Sequence[str]
    ) -> dict[str, tuple[str, str | None, str | None]]:
        """(status, reason, run) of each of these instances' SSH setup that has one."""
        rows = self._of_instances("ssh_state", "status, reason, run", instance_ids)
        return {str(r[0]): (str(r[1]), r[2], r[3]) for r in rows}

    def set_ssh_state(
        self, instance_id: str, status: str, reason: str | None, run: str | None = None
    ) -> None:
        with self._writing():
            self._conn.execute(
                "INSERT INTO ssh_state(instance_id, status, reason, run) VALUES(?, ?, ?, ?)"
                " ON CONFLICT(instance_id) DO UPDATE SET status = excluded.status,"
                " reason = excluded.reason, run = excluded.run",
                (instance_id, status, reason, run),
            )

    # -- images ------------------------------------------------------------------

    def mark_private(
        self, repository: str, digests: Iterable[str], image_id: str | None = None
    ) -> None:
        """Records an image pulled with credentials: by repository and digest, and by ID."""
        with self._transaction() as tx:
            tx.executemany(
                "INSERT INTO private_images(repository, digest) VALUES(?, ?)"
                " ON CONFLICT DO NOTHING",
                [(repository, d) for d in digests],
            )
            if image_id:
                tx.execute(
                    "INSERT INTO private_image_ids(image_id) VALUES(?) ON CONFLICT DO NOTHING",
                    (image_id,),
                )

    def is_private(
        self, repository: str, digests: Iterable[str], image_id: str | None = None
    ) -> bool:
        """Whether the image was recorded private, by any of its digests here or by its ID."""
        wanted = list(digests)
        marks = ",".join("?" * len(wanted))
        with self._lock:
            if (
                image_id
                and self._conn.execute(
                    "SELECT 1 FROM private_image_ids WHERE image_id = ?", (image_id,)
                ).fetchone()
            ):
                return True
            if not wanted:
                return False
            row = self._conn.execute(
                f"SELECT 1 FROM private_images WHERE repository = ? AND digest IN ({marks})",  # noqa: S608 (only placeholders)
                (repository, *wanted),
            ).fetchone()
        return row is not None

    def cache_pulled(self, image_id: str, ref: str, at: float) -> None:
        """Records that the agent pulled `ref` into `image_id` (the image becomes the GC's)."""
        with self._transaction() as tx:
            row = tx.execute(
                "SELECT refs FROM cached_images WHERE image_id = ?", (image_id,)
            ).fetchone()
            refs = [] if row is None else list(json.loads(row[0]))
            if ref not in refs:
                refs.append(ref)
            tx.execute(
                "INSERT INTO cached_images(image_id, refs, last_used) VALUES(?, ?, ?)"
                " ON CONFLICT(image_id) DO UPDATE SET refs = excluded.refs,"
                " last_used = excluded.last_used",
                (image_id, json.dumps(refs), at),
            )

    def cache_used(self, image_id: str, at: float) -> None:
        """An instance was created from `image_id` (nothing happens for an image not cached)."""
        with self._writing():
            self._conn.execute(
                "UPDATE cached_images SET last_used = ? WHERE image_id = ?", (at, image_id)
            )

    def cached_images(self) -> list[tuple[str, tuple[str, ...], float]]:
        """(image id, refs the agent pulled into it, last use) of every cached image."""
        with self._reading() as conn:
            rows = conn.execute(
                "SELECT image_id, refs, last_used FROM cached_images ORDER BY image_id"
            ).fetchall()
        return [(str(i), tuple(json.loads(r)), float(t)) for i, r, t in rows]

    def forget_cached(self, image_id: str) -> None:
        with self._writing():
            self._conn.execute("DELETE FROM cached_images WHERE image_id = ?", (image_id,))

    def set_instance_image(
        self,
        instance_id: str,
        image_id: str,
        digest: str | None,
        checked_at: float | None,
        note: str | None,
    ) -> None:
        with self._writing():
            self._conn.execute(
                "INSERT INTO instance_images(instance_id, image_id, digest, checked_at, note)"
                " VALUES(?, ?, ?, ?, ?) ON CONFLICT(instance_id) DO UPDATE SET"
                " image_id = excluded.image_id, digest = excluded.digest,"
                " checked_at = excluded.checked_at, note = excluded.note",
                (instance_id, image_id, digest, checked_at, note),
            )

    def instance_image(
        self, instance_id: str
    ) -> tuple[str, str | None, float | None, str | None] | None:
        """(image id, digest, checked at, note) of the instance's image check, if any."""
        return self.instance_images([instance_id]).get(instance_id)

    def instance_images(
        self, instance_ids: Sequence[str]
    ) -> dict[str, tuple[str, str | None, float | None, str | None]]:
        """The image check of each of these instances that has one (as `instance_image`)."""
        rows = self._of_instances(
            "instance_images", "image_id, digest, checked_at, note", instance_ids
        )
        return {str(r[0]): (str(r[1]), r[2], r[3], r[4]) for r in rows}

    # -- volumes -----------------------------------------------------------------

    _VOLUME_COLUMNS = (
        "id, size_bytes, mechanism, state, reason, instance_id, project_id, created_at"
    )

    @staticmethod
    def _volume(row: tuple[object, ...]) -> Volume:
        vid, size, mechanism, state, reason, instance_id, project_id, created_at = row
        return Volume(
            id=str(vid),
            size_bytes=int(str(size)),
            mechanism=Mechanism(str(mechanism)),
            state=State(str(state)),
            created_at=float(str(created_at)),
            instance_id=None if instance_id is None else str(instance_id),
            reason=None if reason is None else str(reason),
            project_id=None if project_id is None else int(str(project_id)),
        )

    def insert_volume(self, volume: Volume) -> Volume:
        """Records a new volume; an XFS one gets the next free project id."""
        with self._transaction() as tx:
            project_id = volume.project_id
            if volume.mechanism is Mechanism.XFS_PROJECT:
                (top,) = tx.execute("SELECT MAX(project_id) FROM volumes").fetchone()
                project_id = max(int(top or 0) + 1, PROJECT_ID_BASE)
            tx.execute(
                f"INSERT INTO volumes({self._VOLUME_COLUMNS}) VALUES(?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    volume.id,
                    volume.size_bytes,
                    volume.mechanism.value,
                    volume.state.value,
                    volume.reason,
                    volume.instance_id,
                    project_id,
                    volume.created_at,
                ),
            )
        return replace(volume, project_id=project_id)

    def set_volume_state(self, volume_id: str, state: State, reason: str | None = None) -> None:
        with self._writing():
            self._conn.execute(
                "UPDATE volumes SET state = ?, reason = ? WHERE id = ?",
                (state.value, reason, volume_id),
            )

    def start_volume_delete(self, volume_id: str) -> bool:
        """Marks a volume that no instance holds as being deleted; False when one holds it."""
        with self._writing():
            cursor = self._conn.execute(
                "UPDATE volumes SET state = ? WHERE id = ? AND instance_id IS NULL",
                (State.DELETING.value, volume_id),
            )
        return cursor.rowcount == 1

    def delete_volume(self, volume_id: str) -> None:
        with self._writing():
            self._conn.execute("DELETE FROM volumes WHERE id = ?", (volume_id,))

    def get_volume(self, volume_id: str) -> Volume | None:
        with self._reading() as conn:
            row = conn.execute(
                f"SELECT {self._VOLUME_COLUMNS} FROM volumes WHERE id = ?",  # noqa: S608 (a constant)
                (volume_id,),
            ).fetchone()
        return None if row is None else self._volume(tuple(row))

    def list_volumes(self) -> list[Volume]:
        with self._reading() as conn:
            rows = conn.execute(
                f"SELECT {self._VOLUME_COLUMNS} FROM volumes ORDER BY created_at, rowid"  # noqa: S608
            ).fetchall()
        return [self._volume(tuple(row)) for row in rows]

    def close(self) -> None:
        if self._reader is not self._conn:
            with self._read_lock:
                self._reader.close()
        with self._lock:
            self._conn.close()  # the last one: it checkpoints and removes the -wal file


# -- whole files, for the installer (`qudata-agent state ...`) ----------------------------


def file_schema_version(path: Path) -> int:
    """The schema version of the database at `path`, whatever it is (read-only, no check).

    Raises `Unavailable` when it cannot be read.
    """
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            (version,) = conn.execute("PRAGMA user_version").fetchone()
        finally:
            conn.close()
    except sqlite3.Error as e:
        raise Unavailable(f"state database {path} cannot be read: {e}") from e
    return int(version)


def copy_database(source: Path, target: Path) -> None:
    """A consistent copy of `source` in `target` (replaced), through SQLite's backup API.

    A running agent's database is copied with what its WAL holds, as of one
    moment; `source` is opened read-only. Raises `Unavailable` on failure.
    """
    try:
        src = sqlite3.connect(f"{source.resolve().as_uri()}?mode=ro", uri=True)
        try:
            dst = sqlite3.connect(target)
            try:
                with dst:
                    src.backup(dst)
            finally:
                dst.close()
        finally:
            src.close()
    except sqlite3.Error as e:
        raise Unavailable(f"state database {source} cannot be copied: {e}") from e
