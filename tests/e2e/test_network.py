"""Instances are walled off from the host and private ranges; published ports still work."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from support.agent_proc import AgentProcess, free_port
from support.docker_api import Api, agent_id, docker, inspect, remove_containers_of
from support.listener import Listener

AgentFactory = Callable[..., AgentProcess]
BUSYBOX = {"image": "qudata-test/busybox", "image_tag": "1"}


@pytest.fixture
def listener() -> Iterator[Listener]:
    server = Listener()
    yield server
    server.close()


@pytest.fixture
def running(agent_factory: AgentFactory) -> Iterator[tuple[Api, dict[str, Any]]]:
    agent = agent_factory().start()
    api = Api(agent)
    owner = agent_id(agent.state_dir)
    published = free_port()
    api.create(
        **BUSYBOX,
        ports={"8080": published},
        command="while true; do echo tenant-service | nc -l -p 8080; done",
    )
    state = api.wait("running")
    yield api, state
    remove_containers_of(owner)


def _reach(container: str, address: str, port: int) -> str:
    """What the container reads from address:port (empty when it cannot connect)."""
    out = docker("exec", container, "sh", "-c", f"nc -w 2 {address} {port} </dev/null", check=False)
    return out.strip()


def _gateway(container: str, network: str) -> str:
    return str(inspect(container)["NetworkSettings"]["Networks"][network]["Gateway"])


def test_instances_run_on_the_agents_own_network(running: tuple[Api, dict[str, Any]]) -> None:
    _, state = running
    networks = inspect(state["container_id"])["NetworkSettings"]["Networks"]
    assert list(networks) == ["qudata"]
    options = docker("network", "inspect", "qudata", "--format", "{{json .Options}}")
    assert '"com.docker.network.bridge.enable_icc":"false"' in options


def test_the_host_and_private_ranges_are_out_of_reach(
    running: tuple[Api, dict[str, Any]], listener: Listener
) -> None:
    _, state = running
    # Control: a container on Docker's default bridge does reach the host service,
    # so an empty answer below means the wall, not a broken test.
    outside = docker("run", "-d", "--label", "qudata.test=network", "qudata-test/busybox:1",
                     "sleep", "60").strip()  # fmt: skip
    try:
        docker_host = _gateway(outside, "bridge")
        assert _reach(outside, docker_host, listener.port) == "host-service"
        tenant = state["container_id"]
        assert _reach(tenant, _gateway(tenant, "qudata"), listener.port) == ""
        assert _reach(tenant, docker_host, listener.port) == ""
        # A private address that is not the host: the other container.
        neighbour = inspect(outside)["NetworkSettings"]["Networks"]["bridge"]["IPAddress"]
        docker("exec", "-d", outside, "sh", "-c", "echo neighbour | nc -l -p 9000")
        time.sleep(0.3)
        assert _reach(tenant, neighbour, 9000) == ""
    finally:
        docker("rm", "-f", outside, check=False)


def test_published_ports_still_work_from_the_host(running: tuple[Api, dict[str, Any]]) -> None:
    _, state = running
    port = int(state["allocated_ports"]["8080"])
    deadline = time.monotonic() + 10
    answer = b""
    while time.monotonic() < deadline and not answer:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
                answer = conn.recv(64)
        except OSError:
            time.sleep(0.2)
    assert answer.strip() == b"tenant-service"


def test_the_hardening_of_a_created_container(running: tuple[Api, dict[str, Any]]) -> None:
    _, state = running
    attrs = inspect(state["container_id"])
    host = attrs["HostConfig"]
    assert host["Privileged"] is False
    assert host["CapDrop"] == ["ALL"]
    assert sorted(host["CapAdd"]) == sorted(
        ["CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID", "SETPCAP",
         "NET_BIND_SERVICE", "SYS_CHROOT", "SETFCAP"]
    )  # fmt: skip
    assert host["SecurityOpt"] == ["no-new-privileges:true"]  # and so Docker's default seccomp
    assert host["PidsLimit"] == 4096
    assert not host.get("Binds") and not attrs["Mounts"]
    assert not host.get("Devices") and not host.get("DeviceRequests")
    assert host["NetworkMode"] == "qudata"
    assert host["IpcMode"] in ("private", "shareable") and host["PidMode"] == ""
    assert "docker.sock" not in str(attrs)
