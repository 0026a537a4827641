"""The fault tests' view of one agent: its process, its API, its database and its containers.

`Rig` starts the real `qudata-agent run`, kills it with SIGKILL and starts it
again on the same state directory and port, and checks the promises that
must hold after any fault: one instance, its ports and GPUs the same in the
answer, the database and Docker, and no container of this agent beyond it.
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from support.agent_proc import AgentProcess
from support.docker_api import Api, agent_id, containers, inspect

AgentFactory = Callable[..., AgentProcess]
BUSYBOX = {"image": "qudata-test/busybox", "image_tag": "1"}
DEBIAN = {"image": "qudata-test/debian", "image_tag": "12"}
DEBIAN_SSH = {"image": "qudata-test/debian-ssh", "image_tag": "12"}


@dataclass
class Rig:
    factory: AgentFactory
    env: dict[str, str]
    agent: AgentProcess
    api: Api
    owner: str  # the agent id: the label on every container this agent makes
    pids: list[int] = field(default_factory=list)  # every agent process started

    @classmethod
    def start(cls, factory: AgentFactory, env: dict[str, str], state_dir: Path | None) -> Rig:
        agent = factory(env, state_dir=state_dir).start()
        assert agent.proc is not None
        _wait_for_file(agent.state_dir / "agent_secret")  # with an API key: after /init
        return cls(factory, env, agent, Api(agent), agent_id(agent.state_dir), [agent.proc.pid])

    @property
    def db_path(self) -> Path:
        return self.agent.state_dir / "agent.db"

    def kill9_and_start(self) -> None:
        """SIGKILL, then a new agent process on the same state directory and port."""
        self.kill9()
        self.agent = self.factory(
            self.env, state_dir=self.agent.state_dir, port=self.agent.port
        ).start()
        assert self.agent.proc is not None
        self.pids.append(self.agent.proc.pid)
        self.api = Api(self.agent)

    def kill9(self) -> None:
        """SIGKILL (once: a second call finds it dead already)."""
        self.api.client.close()
        if self.agent.proc is not None and self.agent.proc.poll() is None:
            code, _ = self.agent.stop(signal.SIGKILL)
            assert code == -signal.SIGKILL

    def close(self) -> None:
        self.api.client.close()
        if self.agent.proc is not None and self.agent.proc.poll() is None:
            self.agent.stop(signal.SIGKILL)

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        """Reads the agent's database (WAL: safe while the agent writes)."""
        with closing(sqlite3.connect(self.db_path, timeout=5)) as db:
            return db.execute(sql).fetchall()

    def containers(self) -> list[str]:
        return containers(self.owner)

    def wait(self, done: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> dict:
        """Polls GET /instances until `done(state)`."""
        deadline = time.monotonic() + timeout
        state = self.api.get()
        while not done(state):
            assert time.monotonic() < deadline, f"{what} not reached in {timeout}s: {state}"
            time.sleep(0.1)
            state = self.api.get()
        return state

    def assert_consistent(self, ports: dict[str, str]) -> dict[str, Any]:
        """One running instance with `ports` everywhere, no GPU, nothing leaked; its state."""
        state = self.api.get()
        assert state["status"] == "running", state
        assert state["allocated_ports"] == ports, state
        assert state["gpus"] == [], "a host without GPUs got one"
        found = self.containers()
        assert len(found) == 1, f"{len(found)} containers labelled with this agent: {found}"
        attrs = inspect(found[0])
        assert attrs["Id"] == state["container_id"]
        assert attrs["Config"]["Labels"]["qudata.instance_id"] == state["instance_id"]
        assert attrs["State"]["Running"] is True
        assert not attrs["HostConfig"].get("DeviceRequests")
        published = {
            key.split("/")[0]: binding[0]["HostPort"]
            for key, binding in attrs["NetworkSettings"]["Ports"].items()
            if binding
        }
        assert published == ports, (published, ports)
        assert self.query("SELECT id FROM instances") == [(state["instance_id"],)]
        stored = self.query("SELECT container_port, port, instance_id FROM port_allocations")
        assert {c: str(p) for c, p, _ in stored} == ports
        assert {i for _, _, i in stored} == {state["instance_id"]}
        assert self.query("SELECT uuid FROM gpu_allocations") == []
        return state


RigFactory = Callable[..., Rig]


def _wait_for_file(path: Path, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout}s"
        time.sleep(0.05)


def ssh_keypair(directory: Path) -> tuple[Path, str]:
    key = directory / "id_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "renter@faults", "-f", key],
        check=True,
    )
    return key, key.with_suffix(".pub").read_text().strip()


def ssh_until(key: Path, port: str, command: str, timeout: float = 30) -> str:
    """Runs `command` over a real OpenSSH login, retrying until it works; its output."""
    deadline = time.monotonic() + timeout
    while True:
        result = subprocess.run(
            ["ssh", "-i", str(key), "-p", port, "-o", "BatchMode=yes",
             "-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=5",
             "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
             "-o", "LogLevel=ERROR", "root@127.0.0.1", command],
            capture_output=True, text=True, timeout=20, check=False,
        )  # fmt: skip
        if result.returncode == 0:
            return result.stdout
        assert time.monotonic() < deadline, f"ssh -p {port} failed: {result.stderr}"
        time.sleep(0.5)


def ping_ms(client: httpx.Client) -> float:
    started = time.perf_counter()
    resp = client.get("/ping")
    elapsed = (time.perf_counter() - started) * 1000
    assert resp.status_code == 200, resp.text
    return elapsed
