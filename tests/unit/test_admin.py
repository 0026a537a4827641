"""The installer's commands (`qudata-agent state ...`, `docker-config merge`) on real files."""

from __future__ import annotations

import json
import sqlite3
import stat
from pathlib import Path

import pytest

from qudata_agent import cli
from qudata_agent.adapters.store import Store
from qudata_agent.state_dir import StateDir


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out.strip(), err.strip()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _state(tmp_path: Path, agent_id: str = "id-1") -> StateDir:
    layout = StateDir(tmp_path / "state")
    layout.root.mkdir()
    store = Store.open(layout.db)
    store.set("agent_id", agent_id)
    store.close()
    return layout


def _set_version(db: Path, version: int) -> None:
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {version}")
    conn.close()


def _agent_id(db: Path) -> str:
    conn = sqlite3.connect(db)
    try:
        return str(conn.execute("SELECT value FROM meta WHERE key = 'agent_id'").fetchone()[0])
    finally:
        conn.close()


# -- state ---------------------------------------------------------------------------------


def test_backup_copies_the_database_privately_with_its_label(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    layout = _state(tmp_path)
    code, out, _ = _run(capsys, "state", "backup", "--state-dir", str(layout.root), "--label", "v1")
    assert code == 0 and f"database saved to {layout.backup_db}" in out
    assert _agent_id(layout.backup_db) == "id-1"
    assert _mode(layout.backup_db) == 0o600 and _mode(layout.backup_dir) == 0o700
    assert layout.backup_label.read_text() == "v1\n"
    assert sorted(p.name for p in layout.backup_dir.iterdir()) == ["agent.db", "venv"]


def test_backup_includes_what_a_live_agent_holds_in_its_wal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    layout = _state(tmp_path)
    live = Store.open(layout.db)  # open: the last write may sit in the WAL only
    try:
        live.set("agent_id", "written-while-running")
        assert Path(f"{layout.db}-wal").exists()
        assert (
            _run(capsys, "state", "backup", "--state-dir", str(layout.root), "--label", "v")[0] == 0
        )
    finally:
        live.close()
    assert _agent_id(layout.backup_db) == "written-while-running"


def test_backup_without_a_database_does_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _run(capsys, "state", "backup", "--state-dir", str(tmp_path), "--label", "v")
    assert code == 0 and "nothing to back up" in out
    assert list(tmp_path.iterdir()) == []


def test_schema_version_of_the_database_and_of_its_backup(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    layout = _state(tmp_path)
    current = Store.open(layout.db)
    version = current.schema_version()
    current.close()
    assert _run(capsys, "state", "schema-version", "--state-dir", str(layout.root)) == (
        0, str(version), ""
    )  # fmt: skip
    _run(capsys, "state", "backup", "--state-dir", str(layout.root), "--label", "v")
    _set_version(layout.backup_db, 3)
    code, out, _ = _run(
        capsys, "state", "schema-version", "--state-dir", str(layout.root), "--backup"
    )
    assert (code, out) == (0, "3")
    code, _, err = _run(capsys, "state", "schema-version", "--state-dir", str(tmp_path / "none"))
    assert code == 1 and "no database at" in err


def test_restore_takes_the_backup_when_the_schema_changed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    layout = _state(tmp_path, "before-upgrade")
    _run(capsys, "state", "backup", "--state-dir", str(layout.root), "--label", "venvs/v1")
    store = Store.open(layout.db)
    store.set("agent_id", "after-upgrade")
    store.close()
    _set_version(layout.db, 99)  # as if the upgrade had migrated it
    Path(f"{layout.db}-wal").write_bytes(b"")
    code, out, _ = _run(
        capsys, "state", "restore", "--state-dir", str(layout.root), "--label", "venvs/v1"
    )
    assert code == 0 and "database restored" in out and "-> " in out
    assert _agent_id(layout.db) == "before-upgrade"
    assert _mode(layout.db) == 0o600 and not Path(f"{layout.db}-wal").exists()


def test_restore_keeps_the_database_when_the_schema_is_the_same_or_the_label_differs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    layout = _state(tmp_path, "before")
    _run(capsys, "state", "backup", "--state-dir", str(layout.root), "--label", "v1")
    store = Store.open(layout.db)
    store.set("agent_id", "after")
    store.close()
    code, out, _ = _run(
        capsys, "state", "restore", "--state-dir", str(layout.root), "--label", "v1"
    )
    assert code == 0 and "database kept (same schema" in out
    _set_version(layout.db, 99)
    code, out, _ = _run(
        capsys, "state", "restore", "--state-dir", str(layout.root), "--label", "v0"
    )
    assert code == 0 and "no backup taken for v0" in out
    assert _agent_id(layout.db) == "after"


# -- docker-config merge ------------------------------------------------------------------


def test_merge_sets_the_keys_named_and_keeps_the_others(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon = tmp_path / "daemon.json"
    daemon.write_text(
        '{"log-driver": "json-file", "live-restore": false,'
        ' "runtimes": {"nvidia": {"path": "nvidia-container-runtime"}}}'
    )
    code, out, _ = _run(
        capsys,
        "docker-config", "merge", str(daemon),
        "live-restore=true",
        "max-concurrent-downloads=5",
        'registry-mirrors=["http://m.test"]',
        'runtimes.runsc={"path": "/usr/bin/runsc", "runtimeArgs": ["--network=host"]}',
    )  # fmt: skip
    assert (code, out) == (0, "changed")
    assert json.loads(daemon.read_text()) == {
        "log-driver": "json-file",
        "live-restore": True,
        "max-concurrent-downloads": 5,
        "registry-mirrors": ["http://m.test"],
        "runtimes": {
            "nvidia": {"path": "nvidia-container-runtime"},
            "runsc": {"path": "/usr/bin/runsc", "runtimeArgs": ["--network=host"]},
        },
    }
    assert _mode(daemon) == 0o644 and daemon.read_text().endswith("}\n")
    before = daemon.stat().st_mtime_ns, daemon.stat().st_ino
    assert (
        _run(capsys, "docker-config", "merge", str(daemon), "live-restore=true")[1] == "unchanged"
    )
    assert (daemon.stat().st_mtime_ns, daemon.stat().st_ino) == before


def test_merge_creates_a_missing_file_and_a_dry_run_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon = tmp_path / "docker" / "daemon.json"
    code, out, _ = _run(capsys, "docker-config", "merge", "--dry-run", str(daemon), "a=1")
    assert (code, out) == (0, "changed") and not daemon.parent.exists()
    assert _run(capsys, "docker-config", "merge", str(daemon), "live-restore=true")[1] == "changed"
    assert json.loads(daemon.read_text()) == {"live-restore": True}
    daemon.write_text('{"live-restore": false}')
    assert (
        _run(capsys, "docker-config", "merge", "--dry-run", str(daemon), "live-restore=true")[1]
        == "changed"
    )
    assert daemon.read_text() == '{"live-restore": false}'


@pytest.mark.parametrize(
    ("content", "setting", "message"),
    [
        ("{broken", "live-restore=true", "is not valid JSON"),
        ("[1, 2]", "live-restore=true", "is not a JSON object"),
        ('{"runtimes": 3}', 'runtimes.runsc={"path": "x"}', "runtimes is not a JSON object"),
        ("{}", "live-restore=yes", "the value is not JSON"),
        ("{}", "=true", "expected KEY=JSON"),
    ],
)
def test_merge_refuses_and_leaves_the_file_as_it_is(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, setting: str, message: str
) -> None:
    daemon = tmp_path / "daemon.json"
    daemon.write_text(content)
    code, out, err = _run(capsys, "docker-config", "merge", str(daemon), setting)
    assert code == 1 and out == "" and message in err, err
    assert daemon.read_text() == content
    assert [p.name for p in tmp_path.iterdir()] == ["daemon.json"]


def test_the_commands_have_help(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["state", "--help"], ["state", "restore", "--help"], ["docker-config", "--help"]):
        with pytest.raises(SystemExit) as done:
            cli.main(argv)
        assert done.value.code == 0
    text = capsys.readouterr().out
    assert "backup" in text and "schema-version" in text and "KEY=JSON" in text
