"""`qudata-agent status` against the real agent process: up, registered, then down."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from support.agent_proc import AgentProcess
from support.fake_cp import FakeControlPlane

API_KEY = "test-api-key-status-1"


def _status(agent: AgentProcess, tmp_path: Path, *args: str) -> tuple[int, str]:
    config = tmp_path / "status.env"
    config.write_text("")  # hermetic: never the host's /etc/qudata-agent/agent.env
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUDATA_")}
    env.update({k: v for k, v in agent.env.items() if k.startswith("QUDATA_")})
    done = subprocess.run(
        [sys.executable, "-m", "qudata_agent", "status", "--config", str(config), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr


def test_status_of_a_standalone_agent_up_then_down(
    agent_factory: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    agent = agent_factory().start()
    code, text = _status(agent, tmp_path)
    assert code == 0, text
    assert f"agent       running, API on 127.0.0.1:{agent.port}" in text
    assert "instance    none" in text
    assert "standalone (no API key)" in text
    assert agent.secret() not in text

    agent.stop()
    code, text = _status(agent, tmp_path)
    assert code == 3, text
    assert f"NOT running (nothing answers on 127.0.0.1:{agent.port}" in text
    (agent_id,) = {r["agent_id"] for r in agent.log_records() if "agent_id" in r}
    assert f"agent id {agent_id}" in text
    code, output = _status(agent, tmp_path, "--json")
    data = json.loads(output)
    assert code == 3 and data["running"] is False and data["agent_id"] == agent_id


def test_status_shows_the_control_plane_link(
    agent_factory: Callable[..., AgentProcess], fake_cp: FakeControlPlane, tmp_path: Path
) -> None:
    agent = agent_factory({"QUDATA_API_KEY": API_KEY, "QUDATA_API_URL": fake_cp.url}).start()
    deadline = time.monotonic() + 15
    text = ""
    while time.monotonic() < deadline:
        code, text = _status(agent, tmp_path)
        if "host registered" in text:
            break
        time.sleep(0.3)
    assert code == 0
    assert f"control     {fake_cp.url}: host registered; failed calls since start: " in text
    assert API_KEY not in text
