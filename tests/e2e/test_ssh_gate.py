"""A blind client never meets an SSH port that accepts and then drops.

Through the real agent and Docker: from the moment the create is answered, a
client connects to the published SSH port again and again (loopback only).
Every attempt is either refused at once (a TCP reset: the agent's gate, or
nothing listening yet) or reads sshd's banner; none is accepted and then
closed or left hanging, which is what Docker's userland proxy does while the
container's network and sshd are not up. At least one refusal comes while
Docker's proxy already listens on the port, so the gate, not luck, did it.
The gate's rule is gone once SSH is ready, and after a delete made before
sshd could answer: no rule outlives its instance.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from qudata_agent.domain.port_gate import CHAIN, comment
from support.agent_proc import AgentProcess
from support.docker_api import Api, agent_id, remove_containers_of

AgentFactory = Callable[..., AgentProcess]
DEBIAN_SSH = {"image": "qudata-test/debian-ssh", "image_tag": "12"}
BUSYBOX = {"image": "qudata-test/busybox", "image_tag": "1"}


@pytest.fixture
def api(agent_factory: AgentFactory) -> Iterator[tuple[Api, str]]:
    agent = agent_factory({"QUDATA_PORT_RANGE": "27600-27699"}).start()
    owner = agent_id(agent.state_dir)
    yield Api(agent), owner
    if agent.proc is not None and agent.proc.poll() is None:
        agent.stop(signal.SIGKILL)
    remove_containers_of(owner)


def _gate_rules(owner: str) -> list[str]:
    out = subprocess.run(["iptables", "-w", "5", "-S", CHAIN], capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if comment(owner) in line]


def _listening(port: int) -> bool:
    """Whether some socket of the host listens on `port` (Docker's proxy, here)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    return True
    return False


def _attempt(port: int) -> str:
    with socket.socket() as client:
        client.settimeout(2)
        try:
            client.connect(("127.0.0.1", port))
        except ConnectionRefusedError:
            return "refused"
        except TimeoutError:
            return "connect hung"
        try:
            line = client.recv(256)
        except TimeoutError:
            return "accepted, then silence"
        except ConnectionResetError:
            return "accepted, then reset"
        return "banner" if line.startswith(b"SSH-") else f"accepted, then closed ({line!r})"


def _blind_client(port: int, timeout: float = 60) -> tuple[list[str], int]:
    """Attempts until a banner: (every outcome, refusals while a proxy listened)."""
    outcomes: list[str] = []
    gated = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listening = _listening(port)
        outcome = _attempt(port)
        outcomes.append(outcome)
        gated += listening and outcome == "refused"
        if outcome == "banner":
            return outcomes, gated
        time.sleep(0.005)
    raise AssertionError(f"no banner on {port} within {timeout:g} s: {outcomes[-5:]}")


def _ssh_status(api: Api, timeout: float = 10) -> Any:
    """The SSH status once it leaves `installing` (the gate opens just before `ready`)."""
    deadline = time.monotonic() + timeout
    status = api.get()["ssh"]["status"]
    while status == "installing" and time.monotonic() < deadline:
        time.sleep(0.05)
        status = api.get()["ssh"]["status"]
    return status


def test_a_blind_client_is_refused_until_sshd_answers_and_never_dropped(
    api: tuple[Api, str],
) -> None:
    client, owner = api
    for image in (DEBIAN_SSH, BUSYBOX):
        resp = client.create(**image, ssh_enabled=True)
        assert resp.status_code == 202, resp.text
        port = int(resp.json()["data"]["ports"]["22"])
        outcomes, gated = _blind_client(port)
        dropped = [o for o in outcomes if o not in ("refused", "banner")]
        assert dropped == [], f"{image}: a connection was accepted and then dropped: {outcomes}"
        assert gated >= 1, f"{image}: never refused while the proxy listened: {outcomes}"
        assert _ssh_status(client) == "ready"
        assert _gate_rules(owner) == []
        assert client.delete().status_code == 200
        client.wait("destroyed")


def test_no_gate_outlives_an_instance_deleted_before_sshd_answered(api: tuple[Api, str]) -> None:
    client, owner = api
    resp = client.create(**DEBIAN_SSH, ssh_enabled=True)
    assert resp.status_code == 202, resp.text
    port = int(resp.json()["data"]["ports"]["22"])
    deadline = time.monotonic() + 30
    while not _gate_rules(owner) and time.monotonic() < deadline:
        time.sleep(0.002)  # the build closes the gate before the container starts
    assert _gate_rules(owner), "the gate was never closed"
    assert client.delete().status_code == 200
    deadline = time.monotonic() + 10
    while _gate_rules(owner) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gate_rules(owner) == []
    assert _attempt(port) == "refused"  # nothing there any more
