"""A hostile renter against other renters' images, the host's daemon, its ports and its disk.

The real agent process against the real dockerd. A refused order must be
refused with 400 before anything is made: no container, no record, and (for
a registry host) no connection to it at all. Most tests share one agent
(starting one costs seconds); those that need settings of their own start
their own.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from support.agent_proc import AgentProcess, free_port
from support.docker_api import Api, agent_id, containers, docker, remove_containers_of
from support.listener import Listener

pytestmark = pytest.mark.docker

AgentFactory = Callable[..., AgentProcess]
BUSYBOX = "qudata-test/busybox:1"
PORT_RANGE = "20850-20899"  # this file's own, beside other agents under test


SHARED_ENV = {
    "QUDATA_PORT_RANGE": PORT_RANGE,
    "QUDATA_MAX_INSTANCES": "1",
    "QUDATA_STORAGE_CHECK_INTERVAL": "1",
    "QUDATA_DEFAULT_STORAGE_GB": "3",
    "QUDATA_RESERVED_CPU_CORES": "0.5",
    "QUDATA_RESERVED_MEMORY_GB": "2",
}


@pytest.fixture(scope="module")
def shared_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    """One agent for the tests that need no settings of their own (starts cost seconds)."""
    agent = AgentProcess(tmp_path_factory.mktemp("walls") / "state", SHARED_ENV).start()
    owner = agent_id(agent.state_dir)
    yield agent
    if agent.proc is not None and agent.proc.poll() is None:
        agent.stop(signal.SIGTERM)
    remove_containers_of(owner)


@pytest.fixture
def api(shared_agent: AgentProcess) -> Iterator[Api]:
    """The shared agent's API; whatever instance a test left is deleted after it."""
    client = Api(shared_agent)
    yield client
    if client.get()["status"] != "destroyed":
        assert client.delete().status_code == 200
    client.client.close()


def _nothing_made(api: Api) -> None:
    assert containers(agent_id(api.agent.state_dir)) == []
    assert api.get()["status"] == "destroyed"


@pytest.fixture
def listener() -> Iterator[Listener]:
    served = Listener("127.0.0.1", greeting=b"")  # records and hangs up
    yield served
    served.close()


def test_an_image_id_is_refused_and_nothing_is_made(api: Api) -> None:
    image_id = json.loads(docker("image", "inspect", BUSYBOX))[0]["Id"]  # "sha256:<64 hex>"
    hex_id = image_id.removeprefix("sha256:")
    for body in (
        {"image": "sha256:" + hex_id[:12]},  # Docker would find the image by this prefix
        {"image": image_id},
        {"image": "sha256", "image_tag": hex_id[:12]},
        {"image": hex_id[:12]},
        {"image": hex_id},
    ):
        resp = api.create(**body)
        assert resp.status_code == 400, (body, resp.text)
        assert "image ID" in resp.json()["error"]
    _nothing_made(api)
    # the same image named by its repository still runs
    assert api.create(image=BUSYBOX).status_code == 202
    api.wait("running")


def test_a_loopback_registry_is_refused_and_not_contacted_unless_allowed(
    api: Api, agent_factory: AgentFactory, listener: Listener
) -> None:
    registry = f"127.0.0.1:{listener.port}"
    own = f"127.0.0.1:{api.agent.port}/x"  # the agent's own port, as a registry
    for image in (f"{registry}/team/app", f"localhost:{listener.port}/x", own):
        resp = api.create(image=image, image_tag="1")
        assert resp.status_code == 400, (image, resp.text)
        assert "QUDATA_REGISTRY_ALLOW" in resp.json()["error"]
    _nothing_made(api)
    time.sleep(0.5)
    assert listener.connections == 0  # nothing contacted the registry host
    assert "order refused: its registry host" in api.agent.log()

    allowed = agent_factory({"QUDATA_PORT_RANGE": PORT_RANGE, "QUDATA_REGISTRY_ALLOW": registry})
    allowed.start()
    other = Api(allowed)
    owner = agent_id(allowed.state_dir)
    try:
        # the same host by another name is still refused
        assert other.create(image=f"localhost:{listener.port}/x").status_code == 400
        assert other.create(image=f"{registry}/team/app", image_tag="1").status_code == 202
        deadline = time.monotonic() + 30
        while listener.connections == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert listener.connections > 0  # the provider allowed it: Docker went there
    finally:
        other.client.close()
        allowed.stop(signal.SIGTERM)
        remove_containers_of(owner)


def test_an_image_built_here_runs_whatever_its_registry_name_says(
    api: Api, listener: Listener
) -> None:
    local = f"127.0.0.1:{listener.port}/built/here:1"
    docker("tag", BUSYBOX, local)
    try:
        assert api.create(image=local).status_code == 202
        running = api.wait("running")
        assert "built or loaded on this host" in running["image_check"]["note"]
        assert listener.connections == 0
    finally:
        assert api.delete().status_code == 200
        docker("rmi", local, check=False)


def test_privileged_fixed_ports_and_the_agents_port_are_refused(api: Api) -> None:
    for port in (81, 443, 1023):
        resp = api.create(image=BUSYBOX, ports={"8080": str(port)})
        assert resp.status_code == 400, (port, resp.text)
        assert "outside 1024-65535" in resp.json()["error"]
    own = api.create(image=BUSYBOX, ports={"8080": str(api.agent.port)})
    assert own.status_code == 409 and "agent's own port" in own.json()["error"]
    with socket.socket() as service:  # a host service listening on loopback only
        service.bind(("127.0.0.1", 0))
        service.listen()
        taken = service.getsockname()[1]
        resp = api.create(image=BUSYBOX, ports={"8080": str(taken)})
        assert resp.status_code == 409 and "in use on this host" in resp.json()["error"]
    _nothing_made(api)
    fixed = free_port()
    assert fixed >= 1024
    resp = api.create(image=BUSYBOX, ports={"8080": str(fixed)})
    assert resp.status_code == 202, resp.text
    assert resp.json()["data"]["ports"]["8080"] == str(fixed)
    api.wait("running")
    assert httpx.get(api.agent.url + "/ping").status_code == 200


# -- the disk and the host's share ---------------------------------------------------------

GIB = 1024**3


@pytest.fixture(scope="module")
def volume_image() -> Iterator[str]:
    """busybox with a VOLUME: Docker gives each container an anonymous volume there."""
    name = "qudata-test/volume-walls:1"
    cid = docker("create", BUSYBOX, "true").strip()
    try:
        docker("commit", "--change", "VOLUME /data", cid, name)
    finally:
        docker("rm", "-f", cid, check=False)
    yield name
    docker("rmi", "-f", name, check=False)


def _storage_until(api: Api, what: Callable[[dict[str, object]], bool]) -> dict[str, object]:
    deadline = time.monotonic() + 30
    storage = api.get()["storage"]
    while time.monotonic() < deadline and not what(storage):
        time.sleep(0.3)
        storage = api.get()["storage"]
    assert what(storage), storage
    return storage  # type: ignore[no-any-return]


def _mounts(cid: str) -> list[dict[str, str]]:
    return json.loads(docker("inspect", cid))[0]["Mounts"]  # type: ignore[no-any-return]


def test_writes_into_a_volume_path_count_against_storage_gb_and_the_volume_goes_with_it(
    api: Api, volume_image: str
) -> None:
    assert api.create(image=volume_image, storage_gb=0.1).status_code == 202  # 102 MiB
    cid = api.wait("running")["container_id"]
    [volume] = [m for m in _mounts(cid) if m["Type"] == "volume"]
    # 160 MiB into the VOLUME path: outside the writable layer, yet counted
    docker("exec", cid, "dd", "if=/dev/zero", "of=/data/fill", "bs=1M", "count=160")
    # a pass may have measured while dd was still writing: wait for one after it
    storage = _storage_until(
        api, lambda s: bool(s["over_limit"]) and float(str(s["used_gb"])) >= 0.15
    )
    assert float(str(storage["used_gb"])) < 0.2, storage
    assert "over its storage_gb" in api.agent.log()
    assert api.delete().status_code == 200
    # the anonymous volume went with the instance: nothing left on the disk
    assert volume["Name"] not in docker("volume", "ls", "-q").split()


def test_an_order_without_storage_gb_gets_the_default_and_says_so(api: Api) -> None:
    assert api.create(image=BUSYBOX).status_code == 202  # QUDATA_DEFAULT_STORAGE_GB=3
    storage = api.wait("running")["storage"]
    assert storage["default"] is True and storage["requested_gb"] == 3.0, storage
    assert storage["enforced"] is False  # this host's overlay2 on ext4: watched


def test_one_instance_per_host_naming_no_cpu_or_memory_gets_the_host_less_its_reserves(
    api: Api,
) -> None:
    assert api.create(image=BUSYBOX).status_code == 202  # reserves: 0.5 CPU, 2 GiB
    cid = api.wait("running")["container_id"]
    host = json.loads(docker("inspect", cid))[0]["HostConfig"]
    cpus = os.cpu_count() or 1  # the host's logical CPUs, as the agent counts them
    assert host["NanoCpus"] == round((cpus - 0.5) * 1e9), host["NanoCpus"]
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < host["Memory"] <= total - 2 * GIB
    assert host["Memory"] > total - 2 * GIB - 64 * 1024**2  # the share, rounded to MiB
    assert 0 < host["ShmSize"] <= host["Memory"] // 2  # /dev/shm within the memory limit
