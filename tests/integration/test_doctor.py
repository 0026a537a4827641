"""`qudata-agent doctor`, the real command against the real dockerd and real sockets.

A state dir with loose permissions and a port range partly held by the test
are each reported with their fix (exit code 1); a good state dir and a free
range pass. The config file is always given, so a host's own
/etc/qudata-agent/agent.env never leaks in.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from qudata_agent.adapters.netcheck import port_is_free

pytestmark = pytest.mark.docker

RANGE_SIZE = 5


def _free_range(start: int = 23000) -> tuple[int, int]:
    """The first RANGE_SIZE consecutive ports from `start` that bind now."""
    lo = start
    while lo < start + 2000:
        if all(port_is_free(p) for p in range(lo, lo + RANGE_SIZE)):
            return lo, lo + RANGE_SIZE - 1
        lo += RANGE_SIZE
    raise AssertionError(f"no {RANGE_SIZE} free ports in a row from {start}")


def _doctor(tmp_path: Path, *, as_json: bool, **settings: str) -> tuple[int, str]:
    config = tmp_path / "agent.env"
    config.write_text("".join(f"{key}={value}\n" for key, value in settings.items()))
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUDATA_")}
    done = subprocess.run(
        [sys.executable, "-m", "qudata_agent", "doctor", "--config", str(config)]
        + (["--json"] if as_json else []),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, done.stdout


def _checks(output: str) -> dict[str, dict[str, Any]]:
    return {check["name"]: check for check in json.loads(output)["checks"]}


def _docker_version() -> str:
    return subprocess.run(
        ["docker", "version", "--format", "{{.Server.Version}}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


@pytest.fixture
def busy_ports() -> Iterator[tuple[int, int, list[int]]]:
    """A free range with its first three ports then held by listening sockets."""
    lo, hi = _free_range()
    held = []
    taken = [lo, lo + 1, lo + 2]
    try:
        for port in taken:
            sock = socket.socket()
            held.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("0.0.0.0", port))
            sock.listen()
        yield lo, hi, taken
    finally:
        for sock in held:
            sock.close()


def _state_dir(tmp_path: Path, dir_mode: int, secret_mode: int) -> Path:
    state = tmp_path / "state"
    state.mkdir()
    secret = state / "agent_secret"
    secret.write_text("s3cret-value-for-doctor\n")
    secret.chmod(secret_mode)
    state.chmod(dir_mode)
    return state


def test_loose_permissions_and_busy_ports_are_reported_with_their_fixes(
    tmp_path: Path, busy_ports: tuple[int, int, list[int]]
) -> None:
    lo, hi, taken = busy_ports
    state = _state_dir(tmp_path, 0o755, 0o644)
    settings = {"QUDATA_STATE_DIR": str(state), "QUDATA_PORT_RANGE": f"{lo}-{hi}"}

    code, text = _doctor(tmp_path, as_json=False, **settings)
    assert code == 1, text
    assert f"fix: chmod 700 {state}" in text
    assert f"fix: chmod 600 {state / 'agent_secret'}" in text
    assert f"2 of 5 ports of {lo}-{hi} free; busy: {', '.join(map(str, taken))}" in text
    assert "QUDATA_PORT_RANGE to a free range" in text
    assert text.rstrip().endswith("warning(s)") and "host NOT ready" in text
    assert "s3cret-value-for-doctor" not in text

    code, output = _doctor(tmp_path, as_json=True, **settings)
    checks = _checks(output)
    assert code == 1 and json.loads(output)["ready"] is False
    assert checks["state dir"]["level"] == "fail"
    assert "0755" in checks["state dir"]["detail"]
    assert checks["secret files"]["level"] == "fail"
    assert checks["port range"]["level"] == "warn"
    # The real dockerd answers, with its real version.
    assert checks["docker"]["level"] == "pass"
    assert _docker_version() in checks["docker"]["detail"]
    assert checks["storage quota"]["level"] in ("pass", "warn")
    # doctor only looks: nothing was tightened behind the report.
    assert stat.S_IMODE(state.stat().st_mode) == 0o755
    assert stat.S_IMODE((state / "agent_secret").stat().st_mode) == 0o644


def test_a_good_state_dir_and_a_free_range_pass(tmp_path: Path) -> None:
    lo, hi = _free_range(23500)
    state = _state_dir(tmp_path, 0o700, 0o600)
    code, output = _doctor(
        tmp_path, as_json=True, QUDATA_STATE_DIR=str(state), QUDATA_PORT_RANGE=f"{lo}-{hi}"
    )
    checks = _checks(output)
    assert checks["state dir"] == {
        "name": "state dir",
        "level": "pass",
        "detail": f"{state} is 0700",
        "fix": None,
    }
    assert checks["secret files"]["level"] == "pass"
    assert checks["port range"]["level"] == "pass"
    assert checks["port range"]["detail"] == f"5 of 5 ports of {lo}-{hi} free"
    assert checks["docker"]["level"] == "pass"
    failed = [name for name, check in checks.items() if check["level"] == "fail"]
    assert code == (1 if failed else 0), output


class _Answer404(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_the_control_plane_is_asked_when_a_key_is_set(tmp_path: Path) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Answer404)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v0"
        settings = {
            "QUDATA_STATE_DIR": str(tmp_path / "none"),
            "QUDATA_API_KEY": "k-1234",
            "QUDATA_API_URL": url,
        }
        _, output = _doctor(tmp_path, as_json=True, **settings)
        assert _checks(output)["control plane"]["level"] == "pass"
        assert "HTTP 404" in _checks(output)["control plane"]["detail"]
    finally:
        server.shutdown()
        server.server_close()
    # The same URL with nothing listening: unreachable, with a fix.
    code, output = _doctor(tmp_path, as_json=True, **settings)
    check = _checks(output)["control plane"]
    assert code == 1 and check["level"] == "fail" and check["fix"]
    assert "k-1234" not in output
