"""install.sh and the deploy scripts hold no Python or SQL, and name the state dir as the agent.

The agent's state_dir.py owns the names in the state directory; the installer
reaches the database and its backup through `qudata-agent state` and daemon.json
through `qudata-agent docker-config`, and spells only the API-key file itself.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from qudata_agent.state_dir import API_KEY_FILE, BACKUP_DIR, DB_FILE

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = [
    REPO / "install.sh",
    REPO / "uninstall.sh",
    REPO / "scripts" / "lib.sh",
    *sorted((REPO / "deploy").rglob("*.sh")),
    *sorted((REPO / "deploy").rglob("*.yml")),
    *sorted((REPO / "deploy").rglob("*.yaml")),
    *sorted((REPO / "deploy").rglob("*.j2")),
]
# Code the package already knows, spelled in a script: a Python heredoc, a JSON or
# SQLite one-liner, SQL itself.
EMBEDDED = re.compile(r"<<-?\s*'?PY'?|import (json|sqlite3)|\bsqlite3\b|PRAGMA|\bSELECT\b")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_no_script_embeds_python_or_sql(script: Path) -> None:
    found = [
        f"{script.name}:{number}: {line.strip()}"
        for number, line in enumerate(script.read_text().splitlines(), 1)
        if EMBEDDED.search(line)
    ]
    assert found == [], "\n".join(found)


def test_install_sh_spells_the_key_file_as_the_agent_does_and_no_other_state_name() -> None:
    text = (REPO / "install.sh").read_text()
    assert re.findall(r"^\s*KEY_FILE=\$STATE_DIR/(\S+)$", text, re.M) == [API_KEY_FILE] * 2
    for name in (DB_FILE, f"/{BACKUP_DIR}"):
        assert name not in text
    assert '"$AGENT" state backup' in text
    assert '"$AGENT" state restore' in text and '"$AGENT" docker-config merge' in text


def test_the_checker_finds_embedded_code() -> None:
    for line in (
        '"$PYTHON" - "$F" <<\'PY\'',
        "python3 -c 'import json; ...'",
        "PRAGMA user_version",
    ):
        assert EMBEDDED.search(line), line
    assert not EMBEDDED.search('"$AGENT" docker-config merge "$DAEMON_JSON" live-restore=true')
