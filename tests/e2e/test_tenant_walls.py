"""A hostile renter against other renters' images, the host's daemon and the host's ports.

Each test runs the real agent process against the real dockerd and checks
that the order is refused with 400 before anything is made: no container, no
record, and (for a registry host) no connection to it at all.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import pytest

from support.agent_proc import AgentProcess, free_port
from support.docker_api import Api, agent_id, containers, docker, remove_containers_of

pytestmark = pytest.mark.docker

AgentFactory = Callable[..., AgentProcess]
BUSYBOX = "qudata-test/busybox:1"
PORT_RANGE = "20850-20899"  # this file's own, beside other agents under test


@contextmanager
def _serving(agent: AgentProcess) -> Iterator[Api]:
    api = Api(agent)
    owner = agent_id(agent.state_dir)
    try:
        yield api
    finally:
        api.client.close()
        agent.stop(signal.SIGTERM)
        remove_containers_of(owner)


def _nothing_made(api: Api) -> None:
    assert containers(agent_id(api.agent.state_dir)) == []
    assert api.get()["status"] == "destroyed"


class Listener:
    """A TCP listener on loopback that records every connection made to it and hangs up."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    served = Listener()
    yield served
    served.close()


def test_an_image_id_is_refused_and_nothing_is_made(agent_factory: AgentFactory) -> None:
    image_id = json.loads(docker("image", "inspect", BUSYBOX))[0]["Id"]  # "sha256:<64 hex>"
    hex_id = image_id.removeprefix("sha256:")
    agent = agent_factory({"QUDATA_PORT_RANGE": PORT_RANGE}).start()
    with _serving(agent) as api:
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
        # an image named by its repository still runs
        assert api.create(image=BUSYBOX).status_code == 202
        api.wait("running")


def test_a_loopback_registry_is_refused_and_not_contacted_unless_allowed(
    agent_factory: AgentFactory, listener: Listener
) -> None:
    registry = f"127.0.0.1:{listener.port}"
    agent = agent_factory({"QUDATA_PORT_RANGE": PORT_RANGE}).start()
    with _serving(agent) as api:
        own = f"127.0.0.1:{agent.port}/x"  # the agent's own port, as a registry
        for image in (f"{registry}/team/app", f"localhost:{listener.port}/x", own):
            resp = api.create(image=image, image_tag="1")
            assert resp.status_code == 400, (image, resp.text)
            assert "QUDATA_REGISTRY_ALLOW" in resp.json()["error"]
        _nothing_made(api)
        time.sleep(0.5)
        assert listener.connections == 0  # nothing contacted the registry host
        assert "order refused: its registry host" in agent.log()

    allowed = agent_factory(
        {"QUDATA_PORT_RANGE": PORT_RANGE, "QUDATA_REGISTRY_ALLOW": registry},
        state_dir=agent.state_dir,
    ).start()
    with _serving(allowed) as api:
        # the same host by another name is still refused
        assert api.create(image=f"localhost:{listener.port}/x").status_code == 400
        assert api.create(image=f"{registry}/team/app", image_tag="1").status_code == 202
        failed = api.wait("error", timeout=60)  # the listener is no registry
        assert f"{registry}/team/app" in failed["reason"]
        assert listener.connections > 0  # the provider allowed it: Docker went there


def test_an_image_built_here_runs_whatever_its_registry_name_says(
    agent_factory: AgentFactory, listener: Listener
) -> None:
    local = f"127.0.0.1:{listener.port}/built/here:1"
    docker("tag", BUSYBOX, local)
    try:
        agent = agent_factory({"QUDATA_PORT_RANGE": PORT_RANGE}).start()
        with _serving(agent) as api:
            assert api.create(image=local).status_code == 202
            running = api.wait("running")
            assert "built or loaded on this host" in running["image_check"]["note"]
        assert listener.connections == 0
    finally:
        docker("rmi", local, check=False)


def test_privileged_fixed_ports_and_the_agents_port_are_refused(
    agent_factory: AgentFactory,
) -> None:
    agent = agent_factory({"QUDATA_PORT_RANGE": PORT_RANGE}).start()
    with _serving(agent) as api:
        for port in (81, 443, 1023):
            resp = api.create(image=BUSYBOX, ports={"8080": str(port)})
            assert resp.status_code == 400, (port, resp.text)
            assert "outside 1024-65535" in resp.json()["error"]
        own = api.create(image=BUSYBOX, ports={"8080": str(agent.port)})
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
        assert httpx.get(agent.url + "/ping").status_code == 200
