"""The tenant wall stands when the agent does not, and creates fail closed without it.

Real dockerd, real iptables, a real agent process. The agent runs on a network
and bridge of this file's own (so removing its jumps disturbs no other agent),
and a network namespace of the test's own stands for the provider's LAN
(10.219.19.2, a private address) and for the internet (203.0.113.218, a
documentation address) at once, behind one veth pair.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from support.agent_proc import AgentProcess, agent_command
from support.docker_api import Api, agent_id, containers, docker, inspect, remove_containers_of

AgentFactory = Callable[..., AgentProcess]
NETWORK, BRIDGE = "t19wall", "t19wall0"
NETNS, HOST_END, NS_END = "t19wall-ns", "t19w-h", "t19w-n"
LAN, LAN_HOST = "10.219.19.2", "10.219.19.1/30"
NET, NET_HOST = "203.0.113.218", "203.0.113.217/30"
SERVICE_PORT = 7919
BUSYBOX = {"image": "qudata-test/busybox", "image_tag": "1"}
ENV = {
    "QUDATA_NETWORK": NETWORK,
    "QUDATA_BRIDGE": BRIDGE,
    "QUDATA_PORT_RANGE": "20960-20979",
    "QUDATA_SYNC_INTERVAL": "2",
}
JUMPS = (("DOCKER-USER", "QUDATA-EGRESS"), ("INPUT", "QUDATA-HOST"))
SERVER = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(16)
    while True:
        c, _ = s.accept(); c.sendall(b"reached\\n"); c.close()
    """
)


def _sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=check)


@pytest.fixture
def namespace() -> Iterator[None]:
    """The LAN and the internet in one namespace of the test's own, removed at the end."""
    _sh("ip", "netns", "del", NETNS, check=False)
    _sh("ip", "link", "del", HOST_END, check=False)
    _sh("ip", "netns", "add", NETNS)
    server = None
    try:
        _sh("ip", "link", "add", HOST_END, "type", "veth", "peer", "name", NS_END)
        _sh("ip", "link", "set", NS_END, "netns", NETNS)
        for address in (LAN_HOST, NET_HOST):
            _sh("ip", "addr", "add", address, "dev", HOST_END)
        _sh("ip", "link", "set", HOST_END, "up")
        inside = ("ip", "netns", "exec", NETNS)
        for address in (f"{LAN}/30", f"{NET}/30"):
            _sh(*inside, "ip", "addr", "add", address, "dev", NS_END)
        _sh(*inside, "ip", "link", "set", NS_END, "up")
        _sh(*inside, "ip", "link", "set", "lo", "up")
        server = subprocess.Popen([*inside, sys.executable, "-c", SERVER, str(SERVICE_PORT)])
        time.sleep(0.3)
        yield
    finally:
        if server is not None:
            server.kill()
            server.wait()
        _sh("ip", "link", "del", HOST_END, check=False)
        _sh("ip", "netns", "del", NETNS, check=False)


@pytest.fixture
def host_service() -> Iterator[int]:
    """A TCP service on every host address (what a tenant must not reach)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", 0))
    sock.listen(16)
    sock.settimeout(0.2)
    stop = False

    def serve() -> None:
        while not stop:
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            with conn:
                conn.sendall(b"reached\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield int(sock.getsockname()[1])
    stop = True
    thread.join(2)
    sock.close()


@pytest.fixture
def own_network() -> Iterator[None]:
    """At the end: this file's network and the jumps for its bridge gone (the chains stay)."""
    yield
    docker("network", "rm", NETWORK, check=False)
    for chain, target in JUMPS:
        while _sh("iptables", "-w", "5", "-D", chain, "-i", BRIDGE, "-j", target, check=False) \
                .returncode == 0:  # fmt: skip
            pass


def _reach(container: str, address: str, port: int = SERVICE_PORT) -> bool:
    out = docker("exec", container, "sh", "-c", f"nc -w 2 {address} {port} </dev/null", check=False)
    return out.strip() == "reached"


def _jumps_present() -> list[bool]:
    return [
        _sh("iptables", "-w", "5", "-C", chain, "-i", BRIDGE, "-j", target, check=False)
        .returncode == 0
        for chain, target in JUMPS
    ]  # fmt: skip


def _wait_restarted(container: str, count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = inspect(container)
        if state["RestartCount"] > count and state["State"]["Running"]:
            return
        time.sleep(0.2)
    raise AssertionError(f"Docker did not restart {container}: {inspect(container)['State']}")


def test_a_container_docker_restarts_while_the_agent_is_down_stays_walled(
    agent_factory: AgentFactory, namespace: None, host_service: int, own_network: None
) -> None:
    agent = agent_factory(ENV).start()
    owner = agent_id(agent.state_dir)
    try:
        api = Api(agent)
        assert api.create(**BUSYBOX, command="sleep 3600").status_code == 202
        tenant = api.wait("running")["container_id"]
        gateway = inspect(tenant)["NetworkSettings"]["Networks"][NETWORK]["Gateway"]
        assert _reach(tenant, NET)  # the internet: the path works
        assert not _reach(tenant, LAN) and not _reach(tenant, gateway, host_service)

        # The agent's stop (SIGTERM) leaves the wall, and kill -9 cannot remove it.
        assert agent.stop()[0] == 0
        assert _jumps_present() == [True, True]
        assert not _reach(tenant, LAN)

        # A fresh boot before the agent: no wall for this bridge. The tenant gets
        # through (this is what the boot unit prevents; the probe can fail).
        for chain, target in JUMPS:
            _sh("iptables", "-w", "5", "-D", chain, "-i", BRIDGE, "-j", target)
        assert _reach(tenant, LAN) and _reach(tenant, gateway, host_service)

        # What the boot unit runs before Docker starts: the same wall, no agent.
        done = subprocess.run(
            [*agent_command(), "firewall", "apply"],
            env=agent.env, capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "installed" in done.stdout
        assert _jumps_present() == [True, True]

        # Docker restarts the tenant by itself (its PID 1 killed from the host): walled.
        restarts = inspect(tenant)["RestartCount"]
        os.kill(inspect(tenant)["State"]["Pid"], signal.SIGKILL)
        _wait_restarted(tenant, restarts)
        # Its new veth can take a moment to forward: the internet first (up to 10 s), so
        # the refusals below are the wall's and not a network still coming up.
        deadline = time.monotonic() + 10
        while not _reach(tenant, NET):
            assert time.monotonic() < deadline, "the restarted tenant never reached the internet"
        assert not _reach(tenant, LAN)
        assert not _reach(tenant, gateway, host_service)
    finally:
        remove_containers_of(owner)


def test_creates_are_refused_while_the_wall_cannot_be_verified(
    agent_factory: AgentFactory, tmp_path: Path, own_network: None
) -> None:
    """After a first good check, an iptables that fails gets 503 and nothing is made."""
    broken = tmp_path / "iptables-broken"
    wrapper = tmp_path / "bin" / "iptables"
    wrapper.parent.mkdir()
    real = _sh("sh", "-c", "command -v iptables").stdout.strip()
    wrapper.write_text(
        f'#!/bin/sh\n[ -e {broken} ] && {{ echo "iptables: test breakage" >&2; exit 4; }}\n'
        f'exec {real} "$@"\n'
    )
    wrapper.chmod(0o755)
    env = {**ENV, "PATH": f"{wrapper.parent}:{os.environ['PATH']}"}
    agent = agent_factory(env).start()
    owner = agent_id(agent.state_dir)
    try:
        api = Api(agent)
        assert api.create(**BUSYBOX, command="sleep 3600").status_code == 202
        api.wait("running")
        assert api.delete().status_code == 200
        assert containers(owner) == []

        broken.touch()
        refused = api.create(**BUSYBOX, command="sleep 3600")
        assert refused.status_code == 503, refused.text
        assert "firewall cannot be verified" in refused.text
        assert "test breakage" in refused.text
        assert containers(owner) == []
        nothing = api.get()  # nothing recorded
        assert nothing["status"] == "destroyed" and nothing["instance_id"] is None, nothing

        broken.unlink()
        assert api.create(**BUSYBOX, command="sleep 3600").status_code == 202
        api.wait("running")
    finally:
        remove_containers_of(owner)
