"""The agent's state database: SQLite in WAL mode, the only module that runs SQL.

Owns the schema and its migrations (numbered, applied in order, recorded in
`PRAGMA user_version`) and every query. What stays true:
- a migration runs once, inside a transaction, and a database newer than this
  code is refused rather than guessed at;
- a value written with `set` is durable when the call returns;
- calls are blocking: async code reaches them through `blocking.Blocking`.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

from qudata_agent.errors import Unavailable

log = logging.getLogger(__name__)

# Each entry upgrades the schema by one version (its statements run in one
# transaction); never edit a released one, append a new one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    ("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",),
)


class Store:
    """A small key/value view over the state database (instances come later)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: Path) -> Store:
        try:
            conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=5000")
            conn.execute("PRAGMA foreign_keys=ON")
            store = cls(conn)
            store._migrate()
        except sqlite3.Error as e:
            raise Unavailable(f"state database {path} cannot be opened: {e}") from e
        return store

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
        with self._lock:
            row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set(self, key: str, value: str) -> None:
        with self._lock:
            self._conn.execute(
                "INSERT INTO meta(key, value) VALUES(?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    def get_or_create(self, key: str, factory: Callable[[], str]) -> str:
        """Returns the stored value, storing `factory()` first if there is none."""
        with self._lock:
            self._conn.execute(
                "INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO NOTHING",
                (key, factory()),
            )
            (value,) = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return str(value)

    def close(self) -> None:
        with self._lock:
            self._conn.close()
