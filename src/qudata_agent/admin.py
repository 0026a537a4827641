"""The installer's commands: `qudata-agent state ...` and `qudata-agent docker-config merge`.

install.sh, scripts/lib.sh and the deploy roles call these instead of holding
Python or SQL themselves: a consistent backup of the state database before an
upgrade, its restore on a rollback when the schema changed, the schema version
of a database, and settings merged into Docker's daemon.json.

What stays true: they read no settings and need no running agent or Docker;
every path in the state directory comes from `state_dir.StateDir`; a file is
replaced atomically (a temporary file, then a rename), never half written; a
daemon.json that is not a JSON object is left untouched (exit 1); a command
that finds nothing to do says so and exits 0.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from qudata_agent.adapters.store import copy_database, file_schema_version
from qudata_agent.domain.docker_config import (
    Assignment,
    DockerConfigError,
    merged,
    parse_assignment,
    parse_config,
    render,
)
from qudata_agent.errors import AgentError
from qudata_agent.state_dir import StateDir

COMMANDS = ("state", "docker-config")


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The two commands and their actions, under the main parser's subcommands."""
    state = sub.add_parser(
        "state",
        help="the state database, for the installer: backup, restore, schema-version",
        description="Copies of the state database around an upgrade (install.sh runs these).",
    )
    actions = state.add_subparsers(dest="action", required=True)
    backup = actions.add_parser(
        "backup",
        help="copy the database to STATE_DIR/backup (consistent, also while the agent runs)",
    )
    restore = actions.add_parser(
        "restore",
        help="put the backup taken for LABEL back in place if the schema changed since",
    )
    version = actions.add_parser("schema-version", help="print the database's schema version")
    for parser in (backup, restore, version):
        parser.add_argument("--state-dir", type=Path, required=True, metavar="DIR")
    for parser in (backup, restore):
        parser.add_argument(
            "--label", required=True, help="the version the backup is for (install.sh: its venv)"
        )
    version.add_argument("--backup", action="store_true", help="the backup's, not the database's")
    docker = sub.add_parser(
        "docker-config",
        help="merge settings into Docker's daemon.json, keeping every other key",
        description="merge: sets each KEY to the JSON value given (a dotted KEY reaches into"
        " objects: runtimes.runsc) and keeps every other key; prints 'changed' or 'unchanged'."
        " Exit 1, and nothing written, when FILE is not a JSON object.",
    )
    docker.add_argument("action", choices=["merge"])
    docker.add_argument("file", type=Path, metavar="FILE")
    docker.add_argument("settings", nargs="+", metavar="KEY=JSON")
    docker.add_argument(
        "--dry-run", action="store_true", help="say what would change, write nothing"
    )


def run(args: argparse.Namespace) -> int:
    try:
        if args.command == "docker-config":
            return _merge(args.file, args.settings, args.dry_run)
        layout = StateDir(args.state_dir)
        if args.action == "backup":
            return backup(layout, args.label)
        if args.action == "restore":
            return restore(layout, args.label)
        db = layout.backup_db if args.backup else layout.db
        if not db.is_file():
            return _fail(f"no database at {db}")
        print(file_schema_version(db))
        return 0
    except (AgentError, OSError) as e:
        return _fail(e.message if isinstance(e, AgentError) else str(e))


def _fail(message: str) -> int:
    print(f"qudata-agent: {message}", file=sys.stderr)
    return 1


def backup(layout: StateDir, label: str) -> int:
    """The database copied to backup/ (mode 0600) with the label it is for."""
    if not layout.db.is_file():
        print(f"no database at {layout.db}: nothing to back up")
        return 0
    layout.backup_dir.mkdir(mode=0o700, exist_ok=True)
    partial = layout.backup_db.with_name(layout.backup_db.name + ".next")
    partial.unlink(missing_ok=True)
    copy_database(layout.db, partial)
    partial.chmod(0o600)
    partial.replace(layout.backup_db)
    _write_atomically(layout.backup_label, label + "\n", 0o600)
    print(f"database saved to {layout.backup_db} (for a rollback to {label})")
    return 0


def restore(layout: StateDir, label: str) -> int:
    """The backup back in place when it was taken for `label` and the schemas differ."""
    saved_for = layout.backup_label.read_text().strip() if layout.backup_label.is_file() else None
    if not (layout.backup_db.is_file() and layout.db.is_file() and saved_for == label):
        print(f"no backup taken for {label}: database kept")
        return 0
    now, was = file_schema_version(layout.db), file_schema_version(layout.backup_db)
    if now == was:
        print(f"database kept (same schema {now}; what changed since the upgrade stays)")
        return 0
    # The upgrade migrated the schema, which the older agent refuses: take the copy.
    for suffix in ("-wal", "-shm"):
        layout.db.with_name(layout.db.name + suffix).unlink(missing_ok=True)
    _write_atomically(layout.db, layout.backup_db.read_bytes(), 0o600)
    print(f"database restored from {layout.backup_db} (schema {now} -> {was})")
    return 0


def _merge(path: Path, settings: Sequence[str], dry_run: bool) -> int:
    try:
        assignments: list[Assignment] = [parse_assignment(text) for text in settings]
        text = path.read_text(encoding="utf-8") if path.exists() else ""
        config = parse_config(text, str(path))
        wanted = render(merged(config, assignments))
    except DockerConfigError as e:
        return _fail(str(e))
    if path.exists() and render(config) == wanted:
        print("unchanged")
        return 0
    if not dry_run:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(path, wanted, 0o644)
    print("changed")
    return 0


def _write_atomically(path: Path, content: str | bytes, mode: int) -> None:
    data = content.encode("utf-8") if isinstance(content, str) else content
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(name, mode)
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
