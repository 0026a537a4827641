"""The instance lifecycle through the real agent process and the real Docker engine."""

from __future__ import annotations

import concurrent.futures
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from support.agent_proc import AgentProcess, free_port
from support.docker_api import (
    Api,
    agent_id,
    containers,
    docker,
    inspect,
    remove_containers_of,
    serve_api,
)

BUSYBOX = {"image": "qudata-test/busybox", "image_tag": "1"}
AgentFactory = Callable[..., AgentProcess]


@pytest.fixture
def api(agent_factory: AgentFactory) -> Iterator[Api]:
    # 127.0.0.1:1 is the failed pull's registry: allowed, so Docker really tries it.
    env = {"QUDATA_SYNC_INTERVAL": "1", "QUDATA_REGISTRY_ALLOW": "127.0.0.1:1"}
    yield from serve_api(agent_factory(env).start())


def test_create_runs_the_container_exactly_as_asked(api: Api) -> None:
    fixed = free_port()
    resp = api.create(
        **BUSYBOX,
        env_variables={"QUDATA_CPU_CORES": "0.5", "QUDATA_MEMORY_GB": "0.25", "FOO": "bar"},
        ports={"8080": "auto", "3000": str(fixed)},
        ssh_enabled=True,
    )
    assert resp.status_code == 202, resp.text
    data = resp.json()["data"]
    assert data["success"] is True and data["status"] == "pending"
    ports = data["ports"]
    assert set(ports) == {"22", "8080", "3000"}
    assert ports["3000"] == str(fixed)
    assert len(set(ports.values())) == 3
    assert all(20000 <= int(ports[k]) <= 20999 for k in ("22", "8080"))

    state = api.wait("running")
    assert state["instance_id"] == data["instance_id"]
    assert state["allocated_ports"] == ports
    attrs = inspect(state["container_id"])
    host = attrs["HostConfig"]
    assert attrs["Name"] == f"/qudata-{data['instance_id']}"
    assert attrs["Config"]["Labels"]["qudata.instance_id"] == data["instance_id"]
    assert host["NanoCpus"] == 500_000_000
    assert host["Memory"] == 256 * 1024**2 == host["MemorySwap"]
    assert host["ShmSize"] == 128 * 1024**2
    assert host["PidsLimit"] > 0
    assert host["RestartPolicy"]["Name"] == "unless-stopped"
    assert host["Privileged"] is False and host["Init"] is True
    assert "ALL" in host["CapDrop"] and "no-new-privileges:true" in host["SecurityOpt"]
    # SSH's two read-only mounts are the only host paths: the bundle, the instance's own dir.
    binds = {m["Source"]: m["RW"] for m in attrs["Mounts"] if m["Type"] == "bind"}
    state_dir = api.agent.state_dir
    assert binds == {
        str(state_dir / "ssh" / "bundles"): False,
        str(state_dir / "ssh" / "instances" / data["instance_id"]): False,
    }
    assert "docker.sock" not in str(attrs)
    assert {"FOO=bar", "QUDATA_CPU_CORES=0.5"} <= set(attrs["Config"]["Env"])
    bindings = {k.split("/")[0]: v[0]["HostPort"] for k, v in host["PortBindings"].items()}
    assert bindings == ports

    second = api.create(**BUSYBOX)
    assert second.status_code == 409
    assert second.json()["ok"] is False
    assert api.get()["container_id"] == state["container_id"]
    assert inspect(state["container_id"])["State"]["Running"] is True


def test_stop_start_restart_keep_the_data(api: Api) -> None:
    assert api.create(**BUSYBOX).status_code == 202
    cid = api.wait("running")["container_id"]
    docker("exec", cid, "sh", "-c", "echo kept > /root/data.txt")

    stopped = api.act("stop")
    assert stopped.status_code == 200, stopped.text
    assert stopped.json()["data"]["status"] == "paused"
    assert inspect(cid)["State"]["Running"] is False

    started = api.act("start", key="command")  # the alias key
    assert started.json()["data"]["status"] == "running"
    assert docker("exec", cid, "cat", "/root/data.txt").strip() == "kept"

    before = inspect(cid)["State"]["StartedAt"]
    assert api.act("restart").json()["data"]["status"] == "running"
    assert inspect(cid)["State"]["StartedAt"] != before

    bad = api.act("explode")
    assert bad.status_code == 400 and "action" in bad.json()["error"]
    assert api.get()["status"] == "running"


def test_delete_removes_the_container_and_frees_its_ports(api: Api) -> None:
    fixed = free_port()
    created = api.create(**BUSYBOX, ports={"3000": fixed}).json()["data"]
    cid = api.wait("running")["container_id"]
    deleted = api.delete()
    assert deleted.status_code == 200
    assert deleted.json()["data"]["status"] == "destroyed"
    assert docker("ps", "-aq", "--filter", f"id={cid}").strip() == ""
    state = api.get()
    assert state == {**state, "status": "destroyed", "instance_id": None, "container_id": None}
    assert api.act("stop").status_code == 404

    again = api.create(**BUSYBOX, ports={"3000": fixed})  # the port was freed
    assert again.status_code == 202, again.text
    assert again.json()["data"]["instance_id"] != created["instance_id"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"image_tag": "1"}, "image"),
        ({**BUSYBOX, "env_variables": {"QUDATA_CPU_CORES": "four"}}, "QUDATA_CPU_CORES"),
        ({**BUSYBOX, "env_variables": {"QUDATA_MEMORY_GB": "-1"}}, "QUDATA_MEMORY_GB"),
        ({**BUSYBOX, "env_variables": {"QUDATA_GPU_COUNT": "1.5"}}, "QUDATA_GPU_COUNT"),
        ({**BUSYBOX, "ports": {"8080": "70000"}}, "ports"),
        ({**BUSYBOX, "ports": {"http": "auto"}}, "ports"),
        ({**BUSYBOX, "ports": ["8080"]}, "ports"),
        ({**BUSYBOX, "ssh_enabled": "yes"}, "ssh_enabled"),
        ({**BUSYBOX, "storage_gb": "ten"}, "storage_gb"),
        ({**BUSYBOX, "command": 42}, "command"),
        ({"image": "Bad Image!"}, "image"),
    ],
)
def test_bad_input_is_refused_and_creates_nothing(
    api: Api, body: dict[str, Any], field: str
) -> None:
    resp = api.create(**body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["ok"] is False
    assert field in resp.json()["error"]
    assert api.get()["status"] == "destroyed"
    assert containers(agent_id(api.agent.state_dir)) == []


def test_gpus_refused_on_a_host_without_gpus(api: Api) -> None:
    resp = api.create(**BUSYBOX, env_variables={"QUDATA_GPU_COUNT": "1"})
    assert resp.status_code == 409
    assert "GPU" in resp.json()["error"]
    assert api.get()["status"] == "destroyed"


def test_a_failed_pull_ends_in_error_and_frees_everything(api: Api) -> None:
    resp = api.create(image="127.0.0.1:1/nothing", image_tag="1", ports={"8080": "auto"})
    assert resp.status_code == 202
    state = api.wait("error")
    assert "127.0.0.1:1/nothing" in state["reason"]
    assert state["allocated_ports"] == {} and state["container_id"] is None
    assert containers(agent_id(api.agent.state_dir)) == []
    assert api.delete().status_code == 200
    assert api.get()["status"] == "destroyed"


def test_a_command_that_exits_is_reported_not_deleted(api: Api) -> None:
    api.create(**BUSYBOX, command="echo bye-from-the-tenant; exit 3")
    deadline = time.monotonic() + 20
    state = api.get()
    while time.monotonic() < deadline:
        state = api.get()
        if state["status"] == "paused" and state["exit_code"] == 3:
            break
        time.sleep(0.05)
    assert state["status"] == "paused" and state["exit_code"] == 3, state
    assert "bye-from-the-tenant" in (state["last_logs"] or "")
    assert docker("ps", "-aq", "--filter", f"id={state['container_id']}").strip()
    logs = api.get(logs="true", tail=5)["logs"]
    assert "bye-from-the-tenant" in logs


def test_a_container_removed_behind_the_agents_back_is_destroyed(api: Api) -> None:
    fixed = free_port()
    api.create(**BUSYBOX, ports={"3000": fixed})
    cid = api.wait("running")["container_id"]
    docker("rm", "-f", cid)
    state = api.wait("destroyed", timeout=10)
    assert state["allocated_ports"] == {}
    assert api.create(**BUSYBOX, ports={"3000": fixed}).status_code == 202


def test_concurrent_creates_make_one_instance(api: Api) -> None:
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        codes = list(pool.map(lambda _: api.create(**BUSYBOX).status_code, range(20)))
    assert sorted(codes) == [202] + [409] * 19
    api.wait("running")
    assert len(containers(agent_id(api.agent.state_dir))) == 1


def test_ping_stays_fast_while_a_pull_hangs(agent_factory: AgentFactory) -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        silent.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(silent.accept()[0])
            except OSError:
                continue

    threading.Thread(target=accept, daemon=True).start()
    registry = f"127.0.0.1:{silent.getsockname()[1]}"
    env = {"QUDATA_PULL_INACTIVITY_TIMEOUT": "4", "QUDATA_REGISTRY_ALLOW": registry}
    agent = agent_factory(env).start()
    api = Api(agent)
    try:
        assert api.create(image=f"{registry}/stalls", image_tag="1").status_code == 202
        worst = 0.0
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            started = time.monotonic()
            assert httpx.get(agent.url + "/ping").status_code == 200
            worst = max(worst, time.monotonic() - started)
            time.sleep(0.05)
        assert worst < 0.25, f"/ping took {worst:.3f}s while a pull hung"
        state = api.wait("error", timeout=30)
        assert f"{registry}/stalls" in state["reason"]
    finally:
        stop.set()
        silent.close()
        for conn in accepted:
            conn.close()


def test_kill_9_during_and_after_create_leaves_one_instance(
    agent_factory: AgentFactory, tmp_path: Path
) -> None:
    env = {"QUDATA_SYNC_INTERVAL": "1"}
    agent = agent_factory(env).start()
    api = Api(agent)
    owner = agent_id(agent.state_dir)
    try:
        created = api.create(**BUSYBOX, ports={"8080": "auto"}).json()["data"]
        agent.stop(signal.SIGKILL)  # during the build
        agent = agent_factory(env, state_dir=agent.state_dir, port=agent.port).start()
        api = Api(agent)
        state = api.wait("running")
        assert state["instance_id"] == created["instance_id"]
        assert state["allocated_ports"] == created["ports"]
        assert len(containers(owner)) == 1

        agent.stop(signal.SIGKILL)  # after it is up
        agent = agent_factory(env, state_dir=agent.state_dir, port=agent.port).start()
        api = Api(agent)
        again = api.wait("running")
        assert again["container_id"] == state["container_id"]
        assert again["allocated_ports"] == created["ports"]
        assert len(containers(owner)) == 1
    finally:
        remove_containers_of(owner)


def test_stopping_the_agent_leaves_the_instance_running(agent_factory: AgentFactory) -> None:
    agent = agent_factory().start()
    api = Api(agent)
    owner = agent_id(agent.state_dir)
    try:
        api.create(**BUSYBOX)
        cid = api.wait("running")["container_id"]
        assert agent.stop()[0] == 0
        assert inspect(cid)["State"]["Running"] is True
    finally:
        remove_containers_of(owner)
