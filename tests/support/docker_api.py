"""Driving the agent's instance API and looking at what Docker holds, for e2e tests."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker as dockersdk
import httpx

from support.agent_proc import AgentProcess


def docker(*args: str, check: bool = True) -> str:
    out = subprocess.run(["docker", *args], capture_output=True, text=True, check=check)
    return out.stdout


def exec_sh(
    container_id: str, script: str, base_url: str | None = None, timeout_s: float = 30
) -> tuple[int, str]:
    """(exit code, output) of `sh -c script` run as root in the container: for tests only;
    the agent itself never runs anything in a container."""
    sdk = dockersdk.DockerClient(
        base_url=base_url or "unix:///var/run/docker.sock", version="auto", timeout=int(timeout_s)
    )
    try:
        code, out = sdk.containers.get(container_id).exec_run(["sh", "-c", script], user="root")
    finally:
        sdk.close()
    return int(code), bytes(out).decode("utf-8", errors="replace")


def agent_id(state_dir: Path) -> str:
    with sqlite3.connect(state_dir / "agent.db") as db:
        (value,) = db.execute("SELECT value FROM meta WHERE key = 'agent_id'").fetchone()
    return str(value)


def containers(agent_id: str) -> list[str]:
    return docker("ps", "-aq", "--filter", f"label=qudata.agent_id={agent_id}").split()


def inspect(container_id: str) -> dict[str, Any]:
    return json.loads(docker("inspect", container_id))[0]  # type: ignore[no-any-return]


class Api:
    def __init__(self, agent: AgentProcess) -> None:
        self.agent = agent
        self.client = httpx.Client(
            base_url=agent.url, headers={"X-Agent-Secret": agent.secret()}, timeout=30
        )

    def create(self, **body: Any) -> httpx.Response:
        return self.client.post("/instances", json=body)

    def get(self, **params: Any) -> dict[str, Any]:
        resp = self.client.get("/instances", params=params)
        assert resp.status_code == 200, resp.text
        return resp.json()["data"]  # type: ignore[no-any-return]

    def act(self, action: str, key: str = "action") -> httpx.Response:
        return self.client.put("/instances", json={key: action})

    def delete(self) -> httpx.Response:
        return self.client.delete("/instances")

    def wait(self, *statuses: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        state = self.get()
        while time.monotonic() < deadline:
            state = self.get()
            if state["status"] in statuses:
                return state
            time.sleep(0.1)
        raise AssertionError(
            f"status {state['status']} not in {statuses} after {timeout}s: {state}"
        )


def remove_containers_of(owner: str) -> None:
    """Removes every container labelled with this agent id (test cleanup)."""
    leftovers = containers(owner)
    if leftovers:
        docker("rm", "-f", "-v", *leftovers, check=False)


def serve_api(agent: AgentProcess) -> Iterator[Api]:
    """A fixture body: the started agent's API, and at the end the agent and its containers gone."""
    client = Api(agent)
    owner = agent_id(agent.state_dir)
    yield client
    client.client.close()
    if agent.proc is not None and agent.proc.poll() is None:
        agent.stop(signal.SIGKILL)
    remove_containers_of(owner)
