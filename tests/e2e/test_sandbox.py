"""`"isolation": "sandbox"`: an instance under gVisor (runsc) through the real agent and Docker.

Needs Docker's `runsc` runtime registered (scripts/test.sh does it). One
sandbox instance is driven through what a renter does: SSH with scp and
sftp, a volume, a published port, the network wall from inside, its stats, a
process past the memory limit, and a kill -9 of the agent. A host without the
runtime answers 409 naming the tier.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from support.agent_proc import AgentProcess
from support.docker_api import Api, agent_id, containers, docker, inspect, remove_containers_of
from support.fake_cp import FakeControlPlane
from support.listener import Listener
from support.volumes import unmount_under

AgentFactory = Callable[..., AgentProcess]
DEBIAN = {"image": "qudata-test/debian", "image_tag": "12"}
BUSYBOX = "/.qudata/ssh/current/bin/busybox"
PORT_RANGE = "20650-20699"  # this file's own, so other agents under test never collide


def _keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", path], check=True)
    return path.with_suffix(".pub").read_text().strip()


class Renter:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.key = tmp / "key"
        self.pub = _keygen(self.key)

    def opts(self) -> list[str]:
        return [
            "-i", str(self.key), "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
            "-o", "ConnectTimeout=5", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
        ]  # fmt: skip

    def ssh(self, port: str, command: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ssh", *self.opts(), "-p", port, "root@127.0.0.1", command],
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip


@pytest.fixture
def renter(tmp_path: Path) -> Renter:
    (tmp_path / "renter").mkdir()
    return Renter(tmp_path / "renter")


@pytest.fixture
def listener() -> Iterator[Listener]:
    server = Listener()
    yield server
    server.close()


@pytest.fixture
def sandbox_agent(
    agent_factory: AgentFactory, fake_cp: FakeControlPlane
) -> Iterator[tuple[AgentProcess, Api]]:
    env = {
        "QUDATA_API_KEY": "sandbox-key-0123",
        "QUDATA_API_URL": fake_cp.url,
        "QUDATA_MAX_INSTANCES": "2",  # /stats carries each instance's own figures
        "QUDATA_PORT_RANGE": PORT_RANGE,
        "QUDATA_SYNC_INTERVAL": "2",
    }
    agent = agent_factory(env).start()
    fake_cp.wait_for("/init/host")  # registered: the control plane's secret is stored
    owner = agent_id(agent.state_dir)
    try:
        yield agent, Api(agent)
    finally:
        if agent.proc is not None and agent.proc.poll() is None:
            agent.stop(signal.SIGKILL)
        remove_containers_of(owner)
        unmount_under(agent.state_dir)  # the volume's loop mount


def _wait_ssh(api: Api, instance_id: str, timeout: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    state: dict[str, Any] = {}
    while time.monotonic() < deadline:
        state = api.client.get(f"/v1/instances/{instance_id}").json()["data"]
        if state["status"] == "running" and (state.get("ssh") or {}).get("status") == "ready":
            return state
        time.sleep(0.2)
    raise AssertionError(f"the sandbox's SSH never became ready: {state}")


def _scp_and_sftp(renter: Renter, port: str) -> None:
    up = renter.tmp / "up.txt"
    up.write_text("through the sandbox\n")
    scp = ["scp", *renter.opts(), "-P", port]
    assert subprocess.run([*scp, str(up), "root@127.0.0.1:/root/up.txt"]).returncode == 0
    down = renter.tmp / "down.txt"
    assert subprocess.run([*scp, "root@127.0.0.1:/root/up.txt", str(down)]).returncode == 0
    assert down.read_text() == "through the sandbox\n"
    batch = renter.tmp / "batch"
    back = renter.tmp / "back.txt"
    batch.write_text(f"put {up} /root/sftp.txt\nget /root/sftp.txt {back}\n")
    sftp = ["sftp", *renter.opts(), "-P", port, "-b", str(batch), "root@127.0.0.1"]
    assert subprocess.run(sftp, capture_output=True).returncode == 0
    assert back.read_text() == "through the sandbox\n"


def _http(port: str, timeout: float = 15) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/index.html", timeout=2).text.strip()
        except httpx.HTTPError:
            time.sleep(0.2)
    return ""


def _reach_from(renter: Renter, port: str, address: str, target: int) -> str:
    """What the sandbox reads from address:target (empty when the wall holds)."""
    done = renter.ssh(port, f"{BUSYBOX} nc -w 2 {address} {target} </dev/null")
    return done.stdout.strip()


def _instance_stats(fake_cp: FakeControlPlane, instance_id: str) -> list[dict[str, Any]]:
    return [
        entry
        for call in fake_cp.requests("/stats")
        for entry in call.body.get("instances", [])
        if entry["instance_id"] == instance_id and entry["status"] == "running"
    ]


def test_a_sandbox_instance_does_what_a_container_does(
    sandbox_agent: tuple[AgentProcess, Api],
    fake_cp: FakeControlPlane,
    renter: Renter,
    listener: Listener,
) -> None:
    agent, api = sandbox_agent
    host = api.client.get("/v1/host").json()["data"]
    assert host["isolation"] == ["container", "sandbox"], host
    inventory = fake_cp.wait_for("/init/host")[0].body
    assert inventory["isolation"] == ["container", "sandbox"]

    volume = api.client.post("/v1/volumes", json={"size_gb": 0.05})
    assert volume.status_code == 201, volume.text
    volume_id = volume.json()["data"]["volume_id"]
    created = api.client.post(
        "/v1/instances",
        json={
            **DEBIAN,
            "isolation": "sandbox",
            "ssh_enabled": True,
            "ports": {"8080": "auto"},
            "env_variables": {"QUDATA_CPU_CORES": "0.5", "QUDATA_MEMORY_GB": "0.25"},
            "volumes": {volume_id: "/workspace"},
        },
    )
    assert created.status_code == 202, created.text
    instance_id = created.json()["data"]["instance_id"]
    assert api.client.post(f"/v1/instances/{instance_id}/ssh", json={"ssh_pubkey": renter.pub})
    state = _wait_ssh(api, instance_id)
    assert state["isolation"] == "sandbox" and state["isolation_notes"], state
    container = inspect(state["container_id"])
    assert container["HostConfig"]["Runtime"] == "runsc"
    assert container["HostConfig"]["Memory"] == 256 * 1024**2
    port, web = state["ssh"]["port"], state["allocated_ports"]["8080"]

    # Its kernel is gVisor's, and the renter's tools work over SSH.
    dmesg = renter.ssh(port, "dmesg | head -3")
    assert "gVisor" in dmesg.stdout, dmesg
    _scp_and_sftp(renter, port)

    # Its volume takes writes up to its size, and no further.
    assert renter.ssh(port, "echo kept > /workspace/note && sync").returncode == 0
    fill = renter.ssh(port, "dd if=/dev/zero of=/workspace/fill bs=1M count=90 conv=fsync")
    assert fill.returncode != 0 and "No space left on device" in fill.stderr, fill
    assert renter.ssh(port, "rm /workspace/fill").returncode == 0

    # A published port reaches a server inside the sandbox.
    serve = (
        f"mkdir -p /srv && echo sandbox-web > /srv/index.html && {BUSYBOX} httpd -p 8080 -h /srv"
    )
    assert renter.ssh(port, serve).returncode == 0
    assert _http(web) == "sandbox-web"

    # The wall holds from inside: the host's service is out of reach through the
    # gateway, while a plain sandbox on Docker's default bridge reaches it (control).
    gateway = container["NetworkSettings"]["Networks"]["qudata"]["Gateway"]
    assert _reach_from(renter, port, gateway, listener.port) == ""
    outside = docker("run", "-d", "--runtime=runsc", "--label", "qudata.test=sandbox",
                     "qudata-test/busybox:1", "sleep", "60").strip()  # fmt: skip
    try:
        bridge_gw = inspect(outside)["NetworkSettings"]["Networks"]["bridge"]["Gateway"]
        reached = docker("exec", outside, "sh", "-c", f"nc -w 2 {bridge_gw} {listener.port}")
        assert reached.strip() == "host-service"
    finally:
        docker("rm", "-f", outside, check=False)

    # Its stats come from the sandbox's cgroup: CPU while busy, memory in use.
    spin = "timeout 20 sh -c 'while :; do :; done'"
    busy = subprocess.Popen(["ssh", *renter.opts(), "-p", port, "root@127.0.0.1", spin])
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            seen = _instance_stats(fake_cp, instance_id)
            if any(e["cpu_util"] > 20 for e in seen) and seen[-1]["ram_util"] > 0:
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"no busy sandbox in the stats: {seen[-3:]}")
    finally:
        busy.kill()
        busy.wait()

    # A process past the memory limit is killed (the whole sandbox, see the notes),
    # and the idle instance comes back on its own with SSH.
    started = container["State"]["StartedAt"]
    hog = renter.ssh(port, "dd if=/dev/zero of=/dev/null bs=400M count=1; echo survived", 60)
    assert "survived" not in hog.stdout, hog
    deadline = time.monotonic() + 60
    while (
        time.monotonic() < deadline
        and inspect(state["container_id"])["State"]["StartedAt"] == started
    ):
        time.sleep(0.5)
    after = inspect(state["container_id"])["State"]
    assert after["StartedAt"] != started and after["Running"], after
    state = _wait_ssh(api, instance_id)
    assert renter.ssh(port, "cat /root/up.txt").stdout == "through the sandbox\n"

    # kill -9 of the agent: the sandbox runs on; a new agent adopts it and SSH works.
    agent.stop(signal.SIGKILL)
    assert inspect(state["container_id"])["State"]["Running"]
    agent.start()
    state = _wait_ssh(Api(agent), instance_id)
    assert state["isolation"] == "sandbox"
    assert renter.ssh(port, "cat /workspace/note").stdout.strip() == "kept"


def test_an_order_for_a_tier_the_host_lacks_is_409_naming_it(agent_factory: AgentFactory) -> None:
    agent = agent_factory(
        {"QUDATA_SANDBOX_RUNTIME": "qudata-no-such-runtime", "QUDATA_PORT_RANGE": PORT_RANGE}
    ).start()
    api = Api(agent)
    owner = agent_id(agent.state_dir)
    try:
        refused = api.create(**DEBIAN, isolation="sandbox")  # waits for the first pass
        host = api.client.get("/v1/host").json()["data"]
        assert host["isolation"] == ["container"]
        assert refused.status_code == 409, refused.text
        error = refused.json()["error"]
        assert "'sandbox'" in error and "qudata-no-such-runtime" in error, error
        assert api.client.get("/v1/instances").json()["data"]["instances"] == []
        assert containers(owner) == []
        bad = api.create(**DEBIAN, isolation="vm")
        assert bad.status_code == 400 and "isolation" in bad.json()["error"]
    finally:
        remove_containers_of(owner)
