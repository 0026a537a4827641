"""Several instances on one host (CONTRACT.md section 4), through the real agent and dockerd.

With QUDATA_MAX_INSTANCES=4 and no CPU reserve (this host has two cores):
three instances at once (busybox and Debian, SSH on two) with distinct
ports, a whole core of its own where one was asked for, a fourth that does
not fit refused with 409 and nothing made; keys that log into one instance
only; no traffic between instances; one deleted while the others run on
untouched; kill -9 and a restart bringing every instance back; the section 1
routes answering as section 4 says; and 20 concurrent creates that never
over-commit the CPUs.
"""

from __future__ import annotations

import concurrent.futures
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from faults.rig import ssh_keypair, ssh_until
from support.agent_proc import AgentProcess
from support.docker_api import agent_id, containers, docker, inspect, remove_containers_of

AgentFactory = Callable[..., AgentProcess]
BUSYBOX = {"image": "qudata-test/busybox", "image_tag": "1"}
DEBIAN_SSH = {"image": "qudata-test/debian-ssh", "image_tag": "12"}
ENV = {
    "QUDATA_MAX_INSTANCES": "4",
    "QUDATA_RESERVED_CPU_CORES": "0",
    "QUDATA_RESERVED_MEMORY_GB": "2",
    "QUDATA_SYNC_INTERVAL": "2",
}


class V1:
    """The v1 routes of one agent process."""

    def __init__(self, agent: AgentProcess) -> None:
        self.agent = agent
        self.http = httpx.Client(
            base_url=agent.url, headers={"X-Agent-Secret": agent.secret()}, timeout=30
        )

    def create(self, cores: str, memory_gb: str = "0.25", **body: Any) -> httpx.Response:
        env = {"QUDATA_CPU_CORES": cores, "QUDATA_MEMORY_GB": memory_gb}
        return self.http.post("/v1/instances", json={**body, "env_variables": env})

    def get(self, instance_id: str) -> dict[str, Any]:
        resp = self.http.get(f"/v1/instances/{instance_id}")
        assert resp.status_code == 200, resp.text
        return resp.json()["data"]  # type: ignore[no-any-return]

    def all(self) -> list[dict[str, Any]]:
        return self.http.get("/v1/instances").json()["data"]["instances"]  # type: ignore[no-any-return]

    def wait(
        self, instance_id: str, done: Callable[[dict[str, Any]], bool], timeout: float = 120
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        state = self.get(instance_id)
        while not done(state):
            assert time.monotonic() < deadline, f"{instance_id} never got there: {state}"
            time.sleep(0.1)
            state = self.get(instance_id)
        return state


def _ssh_ready(state: dict[str, Any]) -> bool:
    assert state["status"] != "error", state
    assert (state.get("ssh") or {}).get("status") != "failed", state
    return state["status"] == "running" and state["ssh"]["status"] == "ready"


@pytest.fixture
def v1(agent_factory: AgentFactory) -> Iterator[V1]:
    agent = agent_factory(ENV).start()
    owner = agent_id(agent.state_dir)
    client = V1(agent)
    yield client
    client.http.close()
    if client.agent.proc is not None and client.agent.proc.poll() is None:
        client.agent.stop(signal.SIGKILL)
    remove_containers_of(owner)


def _ip(container_id: str) -> str:
    networks = inspect(container_id)["NetworkSettings"]["Networks"]
    return str(next(iter(networks.values()))["IPAddress"])


def test_three_instances_walled_off_from_each_other(
    v1: V1, agent_factory: AgentFactory, tmp_path: Path
) -> None:
    owner = agent_id(v1.agent.state_dir)
    made = [
        v1.create("1", **BUSYBOX, ports={"8080": "auto"}),
        v1.create("0.5", **DEBIAN_SSH, ssh_enabled=True, ports={"3000": "auto"}),
        v1.create("0.25", **DEBIAN_SSH, ssh_enabled=True),
    ]
    assert [r.status_code for r in made] == [202, 202, 202], [r.text for r in made]
    a, b, c = (r.json()["data"]["instance_id"] for r in made)
    ports = [p for r in made for p in r.json()["data"]["ports"].values()]
    assert len(ports) == len(set(ports)) == 4

    # The fourth does not fit (0.25 of the two cores is left): 409, nothing made.
    refused = v1.create("1", **BUSYBOX, ports={"9000": "auto"})
    assert refused.status_code == 409 and "CPU" in refused.json()["error"], refused.text
    assert len(v1.all()) == 3

    state_a = v1.wait(a, lambda s: s["status"] == "running")
    state_b = v1.wait(b, _ssh_ready)
    state_c = v1.wait(c, _ssh_ready)
    assert len(containers(owner)) == 3
    host_a = inspect(state_a["container_id"])["HostConfig"]
    assert host_a["CpusetCpus"] in ("0", "1")  # a whole core of its own
    other = "1" if host_a["CpusetCpus"] == "0" else "0"
    for state in (state_b, state_c):  # the others are kept off it
        _until_cpuset(state["container_id"], other)

    # Keys belong to one instance: a key added to B never logs into C.
    key_b, pub_b = ssh_keypair(_dir(tmp_path, "b"))
    key_c, pub_c = ssh_keypair(_dir(tmp_path, "c"))
    assert v1.http.post(f"/v1/instances/{b}/ssh", json={"ssh_pubkey": pub_b}).status_code == 200
    assert v1.http.post(f"/v1/instances/{c}/ssh", json={"ssh_pubkey": pub_c}).status_code == 200
    port_b, port_c = state_b["ssh"]["port"], state_c["ssh"]["port"]
    assert ssh_until(key_b, port_b, "hostname").strip()
    assert ssh_until(key_c, port_c, "hostname").strip()
    for key, port in ((key_b, port_c), (key_c, port_b)):
        assert _ssh_once(key, port).returncode == 255  # Permission denied
    assert v1.http.get(f"/v1/instances/{b}/ssh").json()["data"]["keys"] == [pub_b]

    # No traffic between instances: A cannot reach B's sshd on their network, though
    # it listens there (the host, off that network's wall, reads its banner).
    with socket.create_connection((_ip(state_b["container_id"]), 22), timeout=5) as conn:
        assert conn.recv(64).startswith(b"SSH-2.0")
    probe = docker(
        "exec", state_a["container_id"], "sh", "-c",
        f"nc -w 3 {_ip(state_b['container_id'])} 22 </dev/null; echo exit=$?",
        check=False,
    )  # fmt: skip
    assert "SSH-2.0" not in probe and "exit=0" not in probe, probe

    # The section 1 routes with several instances.
    assert v1.http.get("/instances").json()["data"]["instance_id"] == c  # the latest
    for method, path in (("PUT", "/instances"), ("DELETE", "/instances"), ("GET", "/ssh")):
        body = {"action": "stop"} if method == "PUT" else None
        resp = v1.http.request(method, path, json=body)
        assert resp.status_code == 409 and "/v1/instances" in resp.json()["error"], resp.text

    # One deleted; the others keep running, untouched.
    started = {i: inspect(v1.get(i)["container_id"])["State"]["StartedAt"] for i in (b, c)}
    assert v1.http.delete(f"/v1/instances/{a}").status_code == 200
    assert v1.http.get(f"/v1/instances/{a}").status_code == 404
    assert v1.http.delete(f"/v1/instances/{a}").status_code == 404
    for i in (b, c):
        state = v1.get(i)
        assert state["status"] == "running"
        assert inspect(state["container_id"])["State"]["StartedAt"] == started[i]
    host = v1.http.get("/v1/host").json()["data"]
    assert host["instances"] == 2 and host["cpu_cores"]["free"] == pytest.approx(1.25)
    for i in (b, c):  # A's core is free again: back in the shared pool
        _until_cpuset(v1.get(i)["container_id"], "0-1")

    # kill -9 and a restart: every instance comes back, SSH with it.
    v1.agent.stop(signal.SIGKILL)
    v1.agent = agent_factory(ENV, state_dir=v1.agent.state_dir, port=v1.agent.port).start()
    for i, key, port in ((b, key_b, port_b), (c, key_c, port_c)):
        state = v1.wait(i, _ssh_ready)
        assert inspect(state["container_id"])["State"]["StartedAt"] == started[i]
        assert ssh_until(key, port, "echo back").strip() == "back"
    assert sorted(s["instance_id"] for s in v1.all()) == sorted((b, c))
    assert len(containers(owner)) == 2


def test_concurrent_creates_never_over_commit(v1: V1) -> None:
    """20 orders of 0.75 CPU at once on two cores: exactly two fit."""
    owner = agent_id(v1.agent.state_dir)
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda _: v1.create("0.75", **BUSYBOX), range(20)))
    codes = sorted(r.status_code for r in answers)
    assert codes == [202, 202] + [409] * 18, codes
    accepted = [r.json()["data"]["instance_id"] for r in answers if r.status_code == 202]
    for instance_id in accepted:
        v1.wait(instance_id, lambda s: s["status"] == "running")
    found = containers(owner)
    assert len(found) == 2
    assert sum(inspect(cid)["HostConfig"]["NanoCpus"] for cid in found) <= 2_000_000_000


def _until_cpuset(container_id: str, cpus: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while (seen := inspect(container_id)["HostConfig"]["CpusetCpus"]) != cpus:
        assert time.monotonic() < deadline, f"cpuset {seen!r}, not {cpus!r}"
        time.sleep(0.1)


def _dir(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.mkdir()
    return path


def _ssh_once(key: Path, port: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ssh", "-i", str(key), "-p", port, "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
         "-o", "ConnectTimeout=5", "-o", "StrictHostKeyChecking=no",
         "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "root@127.0.0.1", "true"],
        capture_output=True, text=True, timeout=20, check=False,
    )  # fmt: skip
