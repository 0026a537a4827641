"""The SSH port gate on the real iptables: a listening port refuses new connections with a
reset while gated (never accepts them), accepts again once opened, and an agent's start
removes the rules it left, and another agent's only on a port of its own range (loopback
traffic only)."""

from __future__ import annotations

import socket
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from qudata_agent.adapters.port_gate import IptablesPortGate
from qudata_agent.domain.port_gate import CHAIN, comment


def _rules_of(agent_id: str) -> list[str]:
    out = subprocess.run(["iptables", "-w", "5", "-S", CHAIN], capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if comment(agent_id) in line]


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A listening socket on loopback, as Docker's userland proxy holds a published port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield sock
    sock.close()


@pytest.fixture
def gates() -> Iterator[tuple[IptablesPortGate, IptablesPortGate]]:
    ours, theirs = (IptablesPortGate(f"t27-test-{uuid.uuid4().hex[:8]}") for _ in range(2))
    ours.setup()
    yield ours, theirs
    for gate in (ours, theirs):
        for port in gate.closed():
            gate.open(port)


def _connect(port: int) -> str:
    with socket.socket() as client:
        client.settimeout(3)
        try:
            client.connect(("127.0.0.1", port))
        except ConnectionRefusedError:
            return "refused"
        return "accepted"


def test_a_gated_port_refuses_then_accepts_once_opened(
    listener: socket.socket, gates: tuple[IptablesPortGate, IptablesPortGate]
) -> None:
    gate, _ = gates
    port = listener.getsockname()[1]
    assert _connect(port) == "accepted"
    gate.close(port)
    gate.close(port)  # twice: still one rule
    assert gate.closed() == [port]
    assert _connect(port) == "refused"  # a reset, while a program listens on the port
    gate.open(port)
    assert gate.closed() == []
    assert _connect(port) == "accepted"
    gate.open(port)  # opening an open port does nothing


def test_setup_removes_only_the_agents_own_left_rules(
    listener: socket.socket, gates: tuple[IptablesPortGate, IptablesPortGate]
) -> None:
    ours, theirs = gates
    port = listener.getsockname()[1]
    ours.close(port)
    theirs.close(port + 1 if port < 65535 else port - 1)
    restarted = IptablesPortGate(ours._agent_id)  # the same agent, started again
    assert restarted.setup() == [port]
    assert _rules_of(ours._agent_id) == []
    assert len(_rules_of(theirs._agent_id)) == 1
    assert _connect(port) == "accepted"


def test_setup_removes_another_agents_rule_on_a_port_of_its_range(
    listener: socket.socket, gates: tuple[IptablesPortGate, IptablesPortGate]
) -> None:
    """An agent killed and installed anew (a new id) left a gate on a port the new one
    hands out: the new one's start removes it, and leaves one outside its range."""
    ours, theirs = gates
    port = listener.getsockname()[1]
    elsewhere = port + 1 if port < 65535 else port - 1
    theirs.close(port)
    theirs.close(elsewhere)
    assert _connect(port) == "refused"
    starting = IptablesPortGate(ours._agent_id, (port, port))
    assert starting.setup() == [port]
    assert _connect(port) == "accepted"
    assert theirs.closed() == [elsewhere]
