"""`qudata-agent --version` and `run --help` (settings and exit codes), run as the real command."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from qudata_agent import __version__

README = Path(__file__).resolve().parents[2] / "README.md"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qudata_agent", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_version_option() -> None:
    done = _cli("--version")
    assert done.returncode == 0 and done.stdout.strip() == __version__


def test_run_help_lists_every_documented_setting_and_the_exit_codes() -> None:
    done = _cli("run", "--help")
    assert done.returncode == 0, done.stderr
    table = README.read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`((?:QUDATA_|DOCKER_)[A-Z_]+)`", table))
    assert "QUDATA_API_KEY" in documented and "QUDATA_METRICS_LISTEN" in documented
    missing = sorted(name for name in documented if name not in done.stdout)
    assert missing == [], missing
    codes = done.stdout.split("exit codes:", 1)[1]
    for code in ("0", "1", "2"):
        assert re.search(rf"^\s+{code}\s+\w", codes, re.M), codes
