"""The agent's port: accepting connections, TLS or plain, and no room for strangers.

Owns the listening socket's accept loop and every connection until it closes:
its first byte (a TLS handshake or plain HTTP, CONTRACT.md section 5), its TLS
handshake, its deadline for request headers and its slot in the connection
table (domain/connections.py). The HTTP protocol (server.py) reports what
happens on a connection through its `Link`.

What stays true:
- a connection whose request headers (TLS handshake included) have not
  arrived within the header timeout of its accept, or of the first byte of
  a later request on it, is closed;
- at most `max_connections` are open; over that the oldest stranger makes room
  or the newcomer is closed at once, and the accept loop goes on (running out
  of file descriptors pauses accepting briefly, it never spins or stops);
- closing the acceptor stops accepting and ends the connections still in their
  first byte or handshake; connections already serving HTTP are uvicorn's to
  close.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import resource
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qudata_agent.domain.connections import Conn, ConnectionTable
from qudata_agent.domain.tls import Route, TlsMode, peeks, route

log = logging.getLogger(__name__)

_ACCEPT_BATCH = 64  # connections taken per wake-up, so one flood cannot starve the loop
_PAUSE_ON_EXHAUSTION_S = 0.1
_NOTE_EVERY_S = 60.0  # a warning about the cap at most this often
FD_HEADROOM = 512  # file descriptors kept for Docker, SQLite, logs beyond the connections
_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


@dataclass(frozen=True)
class PortPolicy:
    mode: TlsMode
    context: ssl.SSLContext | None  # None only with mode off
    client_ca: bool
    header_timeout_s: float
    max_connections: int


class Link:
    """One connection as the HTTP protocol sees it: what it reports, what it is told."""

    def __init__(self, acceptor: Acceptor, conn: Conn, deadline: float) -> None:
        self._acceptor = acceptor
        self._conn = conn
        self._deadline = deadline
        self._timer: asyncio.TimerHandle | None = None
        self._abort: Callable[[], None] | None = None

    def attach(self, abort: Callable[[], None]) -> None:
        """The protocol has the transport; its request headers are due by the deadline."""
        self._abort = abort
        self._arm(self._deadline)
        self._acceptor.attach(self._conn, self._expire)

    def waiting_for_headers(self) -> None:
        """Bytes of a request arrived, its headers not yet: they are due within the timeout."""
        if self._timer is None and self._acceptor.holds(self._conn):
            self._arm(self._acceptor.loop.time() + self._acceptor.policy.header_timeout_s)

    def headers_arrived(self) -> None:
        self._disarm()
        self._conn.in_request = True

    def response_sent(self) -> None:
        self._conn.in_request = False

    def trust(self) -> None:
        """A request on this connection proved the secret."""
        self._conn.trusted = True

    def lost(self) -> None:
        self._disarm()
        self._acceptor.forget(self._conn)

    def _arm(self, when: float) -> None:
        self._disarm()
        self._timer = self._acceptor.loop.call_at(when, self._too_slow)

    def _too_slow(self) -> None:
        self._acceptor.header_timeouts += 1
        self._expire()

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._disarm()
        self._acceptor.forget(self._conn)
        if self._abort is not None:
            self._abort()  # no TLS close_notify dance with a peer that does not read


ProtocolFactory = Callable[[Link, Route], asyncio.Protocol]


class Acceptor:
    """Accepts on the agent's socket and hands each connection to a new HTTP protocol."""

    def __init__(self, sock: socket.socket, policy: PortPolicy, factory: ProtocolFactory) -> None:
        self.policy = policy
        self.loop = asyncio.get_running_loop()
        self._sock = sock
        self._factory = factory
        self._table = ConnectionTable(policy.max_connections)
        self._closers: dict[int, Callable[[], None]] = {}
        self._pending: dict[int, asyncio.Task[bool]] = {}  # first byte or handshake
        self._accepting = False
        self._noted_at = -_NOTE_EVERY_S
        self.evicted = 0
        self.refused = 0
        self.header_timeouts = 0  # the first byte, the handshake or the headers came too late

    def start(self) -> None:
        self._sock.setblocking(False)
        self._accepting = True
        self.loop.add_reader(self._sock.fileno(), self._on_readable)

    def close(self) -> None:
        if self._accepting:
            self._accepting = False
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(self._sock.fileno())
        for task in list(self._pending.values()):
            task.cancel()

    async def wait_closed(self) -> None:
        await asyncio.gather(*self._pending.values(), return_exceptions=True)

    def figures(self) -> dict[str, int]:
        """What /metrics shows of the port: open connections by kind, and the counters."""
        strangers, trusted = self._table.counts()
        return {
            "strangers": strangers,
            "trusted": trusted,
            "evicted": self.evicted,
            "refused": self.refused,
            "header_timeouts": self.header_timeouts,
        }

    def holds(self, conn: Conn) -> bool:
        return self._table.holds(conn)

    def attach(self, conn: Conn, close: Callable[[], None]) -> None:
        """A protocol holds the connection now; `close` ends it (at once if it lost its slot)."""
        if self._table.holds(conn):
            self._closers[conn.id] = close
        else:
            close()

    def forget(self, conn: Conn) -> None:
        self._table.close(conn)
        self._closers.pop(conn.id, None)

    def _close(self, conn: Conn) -> None:
        closer = self._closers.pop(conn.id, None)
        self._table.close(conn)
        if closer is not None:
            closer()

    def _on_readable(self) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                client, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in _OUT_OF_FDS:
                    self._pause(e)
                    return
                log.debug("accept failed", extra={"error": str(e)})
                continue
            self._admit(client)

    def _pause(self, error: OSError) -> None:
        """Out of file descriptors: stop accepting for a moment instead of spinning."""
        self._note("cannot accept: out of file descriptors", error=str(error))
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self._sock.fileno())
        self.loop.call_later(_PAUSE_ON_EXHAUSTION_S, self._resume)

    def _resume(self) -> None:
        if self._accepting:
            self.loop.add_reader(self._sock.fileno(), self._on_readable)

    def _admit(self, client: socket.socket) -> None:
        admission = self._table.admit(self.loop.time())
        if admission.evicted is not None:
            self.evicted += 1
            self._close(admission.evicted)
        if admission.conn is None:
            self.refused += 1
            client.close()
            self._note("connection refused: every slot is serving requests")
            return
        if admission.evicted is not None:
            self._note("connection cap reached: the oldest waiting stranger was closed")
        conn = admission.conn
        client.setblocking(False)
        task = self.loop.create_task(self._serve(client, conn))
        self._pending[conn.id] = task
        self._closers[conn.id] = functools.partial(_cancel, task)
        task.add_done_callback(functools.partial(self._served, client, conn))

    def _served(self, client: socket.socket, conn: Conn, task: asyncio.Task[bool]) -> None:
        """The first byte and handshake are over; a socket no protocol took is closed here.

        Here, not in `_serve`: a task cancelled before its first step never runs its body.
        """
        self._pending.pop(conn.id, None)
        error = None if task.cancelled() else task.exception()
        if error is not None:
            log.error("a connection failed before HTTP", exc_info=error)
        if task.cancelled() or error is not None or not task.result():
            client.close()
            self.forget(conn)

    def _note(self, message: str, **extra: Any) -> None:
        now = self.loop.time()
        if now - self._noted_at >= _NOTE_EVERY_S:
            self._noted_at = now
            strangers, trusted = self._table.counts()
            log.warning(
                message,
                extra={
                    **extra,
                    "cap": self.policy.max_connections,
                    "strangers": strangers,
                    "trusted": trusted,
                    "evicted_total": self.evicted,
                    "refused_total": self.refused,
                },
            )

    async def _serve(self, client: socket.socket, conn: Conn) -> bool:
        """Routes the connection and hands it to a protocol; True once one holds it."""
        policy = self.policy
        deadline = conn.opened_at + policy.header_timeout_s
        try:
            way = Route.PLAIN
            if peeks(policy.mode):
                first = await self._first_byte(client, deadline)
                if first is None:
                    return False  # closed before a byte
                way = route(policy.mode, policy.client_ca, first)
            link = Link(self, conn, deadline)
            tls: dict[str, Any] = {}
            if way is Route.TLS and policy.context is not None:
                tls = {
                    "ssl": policy.context,
                    "ssl_handshake_timeout": max(0.01, deadline - self.loop.time()),
                    "ssl_shutdown_timeout": policy.header_timeout_s,
                }
            await self.loop.connect_accepted_socket(lambda: self._factory(link, way), client, **tls)
        except (OSError, ssl.SSLError, TimeoutError) as e:
            # asyncio ends a handshake past its timeout with ConnectionAbortedError.
            if isinstance(e, TimeoutError) or self.loop.time() >= deadline:
                self.header_timeouts += 1
            log.debug("connection ended before HTTP", extra={"error": repr(e)})
            return False
        return True

    async def _first_byte(self, client: socket.socket, deadline: float) -> int | None:
        ready: asyncio.Future[None] = self.loop.create_future()

        def readable() -> None:
            if not ready.done():
                ready.set_result(None)

        fd = client.fileno()
        self.loop.add_reader(fd, readable)
        try:
            async with asyncio.timeout_at(deadline):
                await ready
        finally:
            self.loop.remove_reader(fd)
        data = client.recv(1, socket.MSG_PEEK)
        return data[0] if data else None


def _cancel(task: asyncio.Task[bool]) -> None:
    task.cancel()


def raise_open_files_limit(max_connections: int) -> tuple[int, int]:
    """Lifts the soft RLIMIT_NOFILE towards what the cap needs; returns (soft, needed)."""
    needed = max_connections + FD_HEADROOM
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning(
            "the open-files limit is below what the connection cap needs",
            extra={"limit": soft, "needed": needed, "fix": "raise LimitNOFILE= in the unit"},
        )
    return soft, needed
