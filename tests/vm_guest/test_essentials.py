"""Inside the VM: what a provider's Debian 13 host must do, with timeouts sized for emulation.

One agent process runs several instances on the guest's Docker 26 (cgroup v2,
systemd cgroup driver, iptables over nftables) and the tests follow them in
file order: limits in the cgroup v2 files, a published port, SSH logins on
busybox and Debian minbase, stats every 3 s, stop and start, the network
wall (seen in nftables), kill -9 of the agent and the restore. Under QEMU's
software emulation a container starts in seconds, not milliseconds, so every
wait here is long; nothing is timed.
"""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from support.agent_proc import AgentProcess
from support.docker_api import agent_id, docker, inspect, remove_containers_of
from support.fake_cp import DEFAULT_INIT, FakeControlPlane

pytestmark = [pytest.mark.docker, pytest.mark.timeout(1200)]
CGROUP = Path("/sys/fs/cgroup")
SECRET = {"X-Agent-Secret": DEFAULT_INIT["secret_key"]}  # what the fake control plane issues
SLOW = 240.0  # seconds: a create under emulation, with its pull-less start and SSH


class Host:
    def __init__(self, agent: AgentProcess, cp: FakeControlPlane, key: Path) -> None:
        self.agent, self.cp, self.key = agent, cp, key
        self.http = httpx.Client(base_url=agent.url, headers=SECRET, timeout=120)

    def create(self, **body: Any) -> str:
        resp = self.http.post("/v1/instances", json=body)
        assert resp.status_code == 202, resp.text
        return str(resp.json()["data"]["instance_id"])

    def get(self, iid: str) -> dict[str, Any]:
        resp = self.http.get(f"/v1/instances/{iid}")
        assert resp.status_code == 200, resp.text
        return resp.json()["data"]  # type: ignore[no-any-return]

    def wait(self, iid: str, done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        deadline = time.monotonic() + SLOW
        state = self.get(iid)
        while not done(state):
            assert state["status"] != "error", state
            assert time.monotonic() < deadline, state
            time.sleep(1)
            state = self.get(iid)
        return state

    def ssh(self, port: str, command: str = "echo in-$(hostname)") -> str:
        deadline = time.monotonic() + SLOW
        while True:
            done = subprocess.run(
                ["ssh", "-i", str(self.key), "-p", port, "-o", "BatchMode=yes",
                 "-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=20",
                 "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                 "-o", "LogLevel=ERROR", "root@127.0.0.1", command],
                capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
            if done.returncode == 0:
                return done.stdout
            assert time.monotonic() < deadline, done.stderr
            time.sleep(2)


def test_the_host_is_cgroup_v2_with_docker_26_and_nftables() -> None:
    assert (CGROUP / "cgroup.controllers").exists()
    info = json.loads(docker("info", "--format", "{{json .}}"))
    assert info["CgroupVersion"] == "2", info["CgroupVersion"]
    assert int(info["ServerVersion"].split(".")[0]) >= 26, info["ServerVersion"]
    assert "nf_tables" in subprocess.run(["iptables", "-V"], capture_output=True, text=True).stdout


def _ready(state: dict[str, Any]) -> bool:
    return state["status"] == "running" and (state.get("ssh") or {}).get("status") == "ready"


def _cgroup_dir(container_id: str) -> Path:
    found = [p.parent for p in CGROUP.rglob("cgroup.procs") if container_id in p.parent.name]
    assert found, f"no cgroup v2 directory for {container_id}"
    return found[0]


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    tmp = tmp_path_factory.mktemp("essentials")
    key = tmp / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    cp = FakeControlPlane().start()
    env = {
        "QUDATA_API_KEY": "vm-essentials-0123", "QUDATA_API_URL": cp.url,
        "QUDATA_MAX_INSTANCES": "3", "QUDATA_RESERVED_CPU_CORES": "0",
        "QUDATA_RESERVED_MEMORY_GB": "0.5", "QUDATA_SYNC_INTERVAL": "5",
    }  # fmt: skip
    agent = AgentProcess(tmp / "state", env).start(wait=False)
    agent.wait_ready(timeout=SLOW)
    cp.wait_for("/stats", timeout=SLOW)  # registered: the control plane's secret is in force
    owner = agent_id(agent.state_dir)
    try:
        yield Host(agent, cp, key)
    finally:
        if agent.proc is not None and agent.proc.poll() is None:
            agent.stop(signal.SIGKILL)
        remove_containers_of(owner)
        cp.stop()


@pytest.fixture(scope="module")
def instances(host: Host) -> dict[str, str]:
    pub = host.key.with_suffix(".pub").read_text().strip()
    busy = host.create(
        image="qudata-test/busybox", image_tag="1", ssh_enabled=True,
        env_variables={"QUDATA_CPU_CORES": "1", "QUDATA_MEMORY_GB": "0.5"},
        ports={"8080": "auto"},
        command="httpd -p 8080 -h /etc; while :; do :; done",
    )  # fmt: skip
    debian = host.create(
        image="qudata-test/debian", image_tag="12", ssh_enabled=True,
        env_variables={"QUDATA_CPU_CORES": "0.5", "QUDATA_MEMORY_GB": "0.5"},
    )  # fmt: skip
    for iid in (busy, debian):
        resp = host.http.post(f"/v1/instances/{iid}/ssh", json={"ssh_pubkey": pub})
        assert resp.status_code == 200, resp.text
        host.wait(iid, _ready)
    return {"busybox": busy, "debian": debian}


def test_limits_and_a_core_of_its_own_in_cgroup_v2(host: Host, instances: dict[str, str]) -> None:
    state = host.get(instances["busybox"])
    cg = _cgroup_dir(state["container_id"])
    assert (cg / "memory.max").read_text().strip() == str(512 * 1024**2)
    assert (cg / "cpu.max").read_text().split() == ["100000", "100000"]
    cpus = (cg / "cpuset.cpus").read_text().strip()
    assert cpus.isdigit(), f"one whole core of its own, not {cpus!r}"
    other = _cgroup_dir(host.get(instances["debian"])["container_id"])
    assert (other / "cpu.max").read_text().split() == ["50000", "100000"]
    assert cpus not in (other / "cpuset.cpus").read_text().strip().split(","), "shares the core"


def test_a_published_port_answers(host: Host, instances: dict[str, str]) -> None:
    port = host.get(instances["busybox"])["allocated_ports"]["8080"]
    deadline = time.monotonic() + SLOW
    while True:
        try:
            answer = httpx.get(f"http://127.0.0.1:{port}/hostname", timeout=20)
            break
        except httpx.HTTPError:
            assert time.monotonic() < deadline
            time.sleep(2)
    assert answer.status_code == 200 and answer.text.strip(), answer


def test_ssh_logins_on_busybox_and_debian_minbase(host: Host, instances: dict[str, str]) -> None:
    for name, iid in instances.items():
        port = host.get(iid)["allocated_ports"]["22"]
        assert host.ssh(port).startswith("in-"), name


def test_stats_every_three_seconds_with_cgroup_v2_figures(
    host: Host, instances: dict[str, str]
) -> None:
    host.cp.wait_for("/stats", count=len(host.cp.requests("/stats")) + 6, timeout=60)
    calls = host.cp.requests("/stats")[-6:]
    intervals = [b.at - a.at for a, b in itertools.pairwise(calls)]
    assert 2.7 <= sum(intervals) / len(intervals) <= 3.3, intervals
    busy = next(e for e in calls[-1].body["instances"] if e["instance_id"] == instances["busybox"])
    assert float(busy["cpu_util"]) > 50 and float(busy["ram_util"]) > 0, busy


def test_stop_and_start_keep_the_limits(host: Host, instances: dict[str, str]) -> None:
    iid = instances["debian"]
    assert host.http.put(f"/v1/instances/{iid}", json={"action": "stop"}).status_code == 200
    host.wait(iid, lambda s: s["status"] == "paused")
    assert host.http.put(f"/v1/instances/{iid}", json={"action": "start"}).status_code == 200
    state = host.wait(iid, _ready)
    cg = _cgroup_dir(state["container_id"])
    assert (cg / "memory.max").read_text().strip() == str(512 * 1024**2)


def test_the_wall_stands_in_nftables(host: Host, instances: dict[str, str]) -> None:
    ruleset = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True).stdout
    assert "QUDATA-EGRESS" in ruleset and "QUDATA-HOST" in ruleset
    cid = host.get(instances["busybox"])["container_id"]
    networks = inspect(cid)["NetworkSettings"]["Networks"]
    gateway = next(iter(networks.values()))["Gateway"]
    # The guest's own sshd listens on every address: the bridge's gateway too.
    reach = docker("exec", cid, "sh", "-c", f"nc -w 5 {gateway} 22 </dev/null; echo rc=$?",
                   check=False)  # fmt: skip
    assert "SSH-" not in reach, reach


def test_kill_9_and_the_restore(host: Host, instances: dict[str, str]) -> None:
    before = {n: host.get(i)["container_id"] for n, i in instances.items()}
    host.agent.stop(signal.SIGKILL)
    host.agent.start(wait=False)
    host.agent.wait_ready(timeout=SLOW)
    for name, iid in instances.items():
        state = host.wait(iid, _ready)
        assert state["container_id"] == before[name]
        assert host.ssh(state["allocated_ports"]["22"]).startswith("in-"), name
