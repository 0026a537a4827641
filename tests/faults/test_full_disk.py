"""The state directory on a full filesystem (a 2 MiB tmpfs filled with zeros).

Every request that must write answers at once with a clear error (503 naming
the state database, or the 409 a second create always gets), never a 500 or
a hang; the running instance is left alone; after space is freed the
database passes `PRAGMA integrity_check` and the agent writes again.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from faults.rig import BUSYBOX, Rig, RigFactory
from support.docker_api import inspect

ENV = {"QUDATA_SYNC_INTERVAL": "1"}
FILLER = "filler"


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs as the state directory (asked for before `rigs`: unmounted after)."""
    state = tmp_path / "state"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", state], check=True)
    try:
        yield state
    finally:
        subprocess.run(["umount", "-l", state], check=False)


def _fill(directory: Path) -> None:
    """Writes zeros until the filesystem refuses one more byte."""
    with contextlib.suppress(OSError), (directory / FILLER).open("wb") as out:
        while True:
            out.write(b"\0" * 4096)
            out.flush()
    with contextlib.suppress(OSError), (directory / f"{FILLER}-tail").open("wb") as out:
        while True:  # whatever a partial page left
            out.write(b"\0")
            out.flush()
    assert _free_bytes(directory) == 0


def _free_bytes(directory: Path) -> int:
    fs = os.statvfs(directory)
    return fs.f_bavail * fs.f_frsize


def _refused(resp: httpx.Response, elapsed: float) -> str:
    """A clear refusal: the envelope, a 4xx or 503, quickly; its message."""
    assert elapsed < 5, f"took {elapsed:.1f}s"
    assert resp.status_code == 503 or 400 <= resp.status_code < 500, resp.text
    body = resp.json()
    assert body["ok"] is False and body["error"] != "internal error", body
    assert "Traceback" not in resp.text
    return str(body["error"])


def _timed(call: Callable[[], httpx.Response]) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    resp = call()
    return resp, time.monotonic() - started


def _integrity_ok(db: Path) -> None:
    with contextlib.closing(sqlite3.connect(db, timeout=5)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


@pytest.mark.timeout(90)
def test_actions_on_a_full_state_disk_fail_clearly_and_touch_nothing(
    tiny_fs: Path, rigs: RigFactory, ssh_key: tuple[Path, str]
) -> None:
    rig = rigs(ENV, state_dir=tiny_fs)
    created = rig.api.create(**BUSYBOX, ports={"8080": "auto"}, ssh_enabled=True)
    assert created.status_code == 202, created.text
    ports = created.json()["data"]["ports"]
    state = rig.wait(lambda s: s["status"] == "running", 30, "running")
    started = inspect(state["container_id"])["State"]["StartedAt"]

    _fill(tiny_fs)
    for action in ("stop", "restart", "start"):
        resp, elapsed = _timed(lambda a=action: rig.api.act(a))
        assert "state database" in _refused(resp, elapsed), resp.text
    resp, elapsed = _timed(lambda: rig.api.client.post("/ssh", json={"ssh_pubkey": ssh_key[1]}))
    assert "state database" in _refused(resp, elapsed)
    resp, elapsed = _timed(lambda: rig.api.create(**BUSYBOX))
    assert "already exists" in _refused(resp, elapsed)
    assert rig.api.get()["status"] == "running"  # reads still answer
    time.sleep(2)  # a sync or two on the full disk

    attrs = inspect(state["container_id"])["State"]
    assert attrs["Running"] is True and attrs["StartedAt"] == started, "the instance was touched"
    assert rig.agent.proc is not None and rig.agent.proc.poll() is None

    (tiny_fs / FILLER).unlink()
    (tiny_fs / f"{FILLER}-tail").unlink()
    _integrity_ok(rig.db_path)
    assert rig.api.act("stop").status_code == 200  # writes again
    assert inspect(state["container_id"])["State"]["Running"] is False
    assert rig.api.act("start").status_code == 200
    rig.assert_consistent(ports)
    assert not [r for r in rig.agent.log_records() if r.get("msg") == "background loop died"]


@pytest.mark.timeout(60)
def test_a_create_on_a_full_state_disk_fails_clearly_and_creates_nothing(
    tiny_fs: Path, rigs: RigFactory
) -> None:
    rig: Rig = rigs(ENV, state_dir=tiny_fs)
    _fill(tiny_fs)
    resp, elapsed = _timed(lambda: rig.api.create(**BUSYBOX, ports={"8080": "auto"}))
    assert "state database" in _refused(resp, elapsed)
    assert rig.api.get()["status"] == "destroyed"
    time.sleep(1.5)
    assert rig.containers() == []
    (tiny_fs / FILLER).unlink()
    (tiny_fs / f"{FILLER}-tail").unlink()
    _integrity_ok(rig.db_path)
    assert rig.query("SELECT count(*) FROM port_allocations") == [(0,)]
    assert rig.api.create(**BUSYBOX).status_code == 202  # works once there is room
    rig.wait(lambda s: s["status"] == "running", 30, "running")
