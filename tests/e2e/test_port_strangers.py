"""Strangers cannot hold the agent's port (CONTRACT.md section 5), against the real process.

Slowloris: 1000 connections that never finish their request headers are all
closed within the header deadline (2 s here), and meanwhile a call with the
secret answers in under a second. Over the connection cap the oldest waiting
stranger makes room, so the agent never holds more than the cap; when every
slot has proved the secret, a new stranger is closed at once; the agent stays
healthy throughout. All traffic is on loopback. The test process raises its
own open-files limit (the agent inherits it) to hold 1000 sockets.
"""

from __future__ import annotations

import http.client
import os
import resource
import selectors
import socket
import time
from collections.abc import Callable, Iterator

import pytest

from support.agent_proc import AgentProcess

AgentFactory = Callable[..., AgentProcess]
BASE = {"QUDATA_FIREWALL": "off", "QUDATA_PORT_RANGE": "20950-20999"}
STRANGERS = 1000
DEADLINE_S = 2.0
SLACK_S = 1.5  # the agent's timer, this test's polling and a busy shared machine


@pytest.fixture(autouse=True)
def many_files() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 8192 if hard == resource.RLIM_INFINITY else min(8192, hard)
    assert want >= STRANGERS + 512, f"the hard open-files limit {hard} is too low for this test"
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _stranger(port: int, partial: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setblocking(False)
    if partial:
        sock.send(partial)
    return sock


def _authenticated_call(agent: AgentProcess) -> float:
    """Seconds for GET /v1/host with the secret on a new connection (a newcomer, too)."""
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=5)
    try:
        conn.request("GET", "/v1/host", headers={"X-Agent-Secret": agent.secret()})
        answer = conn.getresponse()
        assert answer.status == 200, answer.read()
        answer.read()
    finally:
        conn.close()
    return time.monotonic() - started


def _closed_at(socks: dict[socket.socket, float], until: float) -> dict[socket.socket, float]:
    """When each socket saw the agent close it (EOF or reset); polled until `until`."""
    closed: dict[socket.socket, float] = {}
    with selectors.DefaultSelector() as sel:
        for sock in socks:
            sel.register(sock, selectors.EVENT_READ)
        while len(closed) < len(socks) and time.monotonic() < until:
            for key, _ in sel.select(timeout=0.05):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(4096)
                except (ConnectionResetError, BrokenPipeError):
                    data = b""
                except BlockingIOError:
                    continue
                if not data:
                    closed[sock] = time.monotonic()
                    sel.unregister(sock)
    return closed


def _port_figures(
    agent: AgentProcess, conn: http.client.HTTPConnection | None = None
) -> dict[str, float]:
    """The API port's counters from /metrics (on `conn` when given, else a new connection)."""
    own = conn or http.client.HTTPConnection("127.0.0.1", agent.port, timeout=30)
    try:
        own.request("GET", "/metrics", headers={"X-Agent-Secret": agent.secret()})
        text = own.getresponse().read().decode()
    finally:
        if conn is None:
            own.close()
    figures = {}
    for line in text.splitlines():
        if line.startswith("qudata_api_connections_") and "_total " in line:
            name, value = line.split()
            short = name.removeprefix("qudata_api_connections_").removesuffix("_total")
            figures[short] = float(value)
    return figures


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_slowloris_strangers_are_closed_within_the_deadline_and_the_secret_is_served(
    agent_factory: AgentFactory,
) -> None:
    agent = agent_factory({**BASE, "QUDATA_HTTP_HEADER_TIMEOUT": str(DEADLINE_S)}).start()
    assert agent.proc is not None
    _authenticated_call(agent)  # the first /v1/host warms the agent's caches: not measured
    idle_fds = _open_fds(agent.proc.pid)
    opened: dict[socket.socket, float] = {}
    latencies: list[float] = []
    try:
        for n in range(STRANGERS):
            # A third send nothing, a third a request line and one header (never the blank
            # line), a third the first bytes of a TLS handshake record (never the rest).
            partial = (b"", b"GET /ping HTTP/1.1\r\nHost: x\r\n", b"\x16\x03\x01\x00")[n % 3]
            opened[_stranger(agent.port, partial)] = time.monotonic()
            if n % 250 == 249:
                latencies.append(_authenticated_call(agent))
        held_fds = _open_fds(agent.proc.pid)
        latencies += [_authenticated_call(agent) for _ in range(3)]
        closed = _closed_at(opened, time.monotonic() + DEADLINE_S + SLACK_S + 1)
    finally:
        for sock in opened:
            sock.close()
    print(
        f"slowloris: {STRANGERS} strangers, authenticated calls {[round(x, 3) for x in latencies]}"
        f" s, agent fds idle {idle_fds} held {held_fds}"
    )
    assert len(closed) == STRANGERS, f"{STRANGERS - len(closed)} strangers still open"
    worst = max(closed[sock] - opened[sock] for sock in opened)
    assert worst <= DEADLINE_S + SLACK_S, f"a stranger was held {worst:.2f}s"
    assert max(latencies) < 1.0, latencies
    assert held_fds <= idle_fds + 256 + 16  # never more than the cap of connections
    assert agent.proc.poll() is None
    assert _authenticated_call(agent) < 1.0
    figures = _port_figures(agent)  # every stranger was either evicted or cut at the deadline
    assert figures["evicted"] + figures["header_timeouts"] >= STRANGERS, figures
    assert figures["evicted"] >= STRANGERS - 256 and figures["header_timeouts"] > 0, figures


def test_a_kept_alive_connection_gets_the_deadline_for_its_next_request(
    agent_factory: AgentFactory,
) -> None:
    """Not the 30 s idle timeout: a next request that never ends is cut at the header deadline."""
    agent = agent_factory({**BASE, "QUDATA_HTTP_HEADER_TIMEOUT": str(DEADLINE_S)}).start()
    sock = socket.create_connection(("127.0.0.1", agent.port), timeout=5)
    try:
        sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while not answer.endswith(b"}"):  # the head and the body may come apart
            answer += sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 200")
        time.sleep(DEADLINE_S + 0.5)  # idle, kept alive: well within the 30 s, still open
        sock.setblocking(False)
        with pytest.raises(BlockingIOError):  # nothing to read, and no end of stream either
            sock.recv(1)
        sock.sendall(b"GET /ping HTTP/1.1\r\n")
        started = time.monotonic()
        closed = _closed_at({sock: started}, started + DEADLINE_S + SLACK_S + 1)
    finally:
        sock.close()
    assert sock in closed and closed[sock] - started <= DEADLINE_S + SLACK_S


def test_over_the_cap_strangers_make_room_and_trusted_slots_are_kept(
    agent_factory: AgentFactory,
) -> None:
    cap = 16
    env = {**BASE, "QUDATA_HTTP_MAX_CONNECTIONS": str(cap), "QUDATA_HTTP_HEADER_TIMEOUT": "30"}
    agent = agent_factory(env).start()
    assert agent.proc is not None
    first = {_stranger(agent.port, b"GET /"): time.monotonic() for _ in range(cap)}
    later = {_stranger(agent.port, b"GET /"): time.monotonic() for _ in range(3 * cap)}
    try:
        # Each newcomer took the slot of the oldest stranger: every first one is gone, and
        # of all, no more than the cap are still held.
        closed = _closed_at({**first, **later}, time.monotonic() + 2)
        assert set(first) <= set(closed)
        assert len(first) + len(later) - len(closed) <= cap
        assert _authenticated_call(agent) < 1.0
    finally:
        for sock in (*first, *later):
            sock.close()

    # Every slot proved the secret (kept-alive connections): a stranger is closed at once.
    trusted = [http.client.HTTPConnection("127.0.0.1", agent.port, timeout=5) for _ in range(cap)]
    try:
        for conn in trusted:
            conn.request("GET", "/v1/host", headers={"X-Agent-Secret": agent.secret()})
            answer = conn.getresponse()
            answer.read()
            assert answer.status == 200
        newcomer = _stranger(agent.port, b"")
        refused = _closed_at({newcomer: time.monotonic()}, time.monotonic() + 2)
        newcomer.close()
        assert refused, "a stranger got a slot held by connections that proved the secret"
        assert _port_figures(agent, trusted[0])["refused"] >= 1  # asked on a trusted one
        for conn in trusted:  # and those are still served on the connections they hold
            conn.request("GET", "/ping")
            answer = conn.getresponse()
            answer.read()
            assert answer.status == 200
    finally:
        for conn in trusted:
            conn.close()
    assert agent.proc.poll() is None
