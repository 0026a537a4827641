"""The HTTP listener: binds the agent's port and runs uvicorn on it.

The agent binds its own socket (so the port it reports is the port it holds,
with no window for another process to take it between choosing and binding)
and hands it to uvicorn. What stays true: without a configured port, the port
used last time is preferred, then the first free one from 1024 up, skipping
the range kept for instances. Requests the HTTP parser refuses before the
application sees them (a NUL in a header, broken framing) are answered with
the same JSON envelope as every other error. Connections come from the
acceptor (acceptor.py: TLS or plain, header deadline, connection cap), not from
uvicorn's own listener; an idle kept-alive connection is closed after
`KEEP_ALIVE_S`, and plain HTTP where TLS is required gets the contract's 400.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import json
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from qudata_agent.acceptor import Acceptor, Link, PortPolicy
from qudata_agent.domain.connections import TRUST_EXTENSION
from qudata_agent.domain.tls import TLS_REQUIRED_ERROR, Route

log = logging.getLogger(__name__)

FIRST_DEFAULT_PORT = 1024


class PortUnavailable(OSError):
    pass


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def bind_socket(host: str, port: int) -> socket.socket:
    # IPPROTO_TCP, not 0: asyncio turns TCP_NODELAY on only for sockets that say
    # so, and without it every answer on a kept-alive connection waits ~40 ms
    # for a delayed ACK between uvicorn's header and body writes.
    sock = socket.socket(_family(host), socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(511)
        sock.set_inheritable(True)
    except OSError:
        sock.close()
        raise
    return sock


def _candidates(preferred: int | None, skip: tuple[int, int], inside: bool) -> Iterable[int]:
    """From the first default port outside `skip`; with `inside`, only ports within it."""
    if preferred is not None and (skip[0] <= preferred <= skip[1]) == inside:
        yield preferred
    ports = range(skip[0], skip[1] + 1) if inside else range(FIRST_DEFAULT_PORT, 65536)
    for port in ports:
        if (skip[0] <= port <= skip[1]) == inside and port != preferred:
            yield port


def listen(
    host: str,
    configured: int | None,
    previous: int | None,
    skip: tuple[int, int],
    *,
    inside: bool = False,
) -> socket.socket:
    """Binds the configured port, or the previous/first free one when none is set.

    The first free one lies outside `skip` (the instances' ports), or, with
    `inside` (tunnel mode: the relay forwards only that block), within it.
    """
    if configured is not None:
        try:
            return bind_socket(host, configured)
        except OSError as e:
            raise PortUnavailable(
                e.errno, f"cannot listen on {host}:{configured}: {e.strerror}"
            ) from e
    for port in _candidates(previous, skip, inside):
        try:
            return bind_socket(host, port)
        except OSError as e:
            if e.errno not in (errno.EADDRINUSE, errno.EACCES):
                raise PortUnavailable(e.errno, f"cannot listen on {host}: {e.strerror}") from e
    raise PortUnavailable(errno.EADDRINUSE, f"no free port on {host} from {FIRST_DEFAULT_PORT}")


MALFORMED_BODY = json.dumps({"ok": False, "error": "malformed HTTP request"}).encode()


class EnvelopeH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, but its own 400 (a request h11 refuses) is the envelope."""

    def send_400_response(self, msg: str) -> None:
        log.debug("malformed HTTP request refused", extra={"reason": msg})
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(MALFORMED_BODY)).encode()),
            (b"connection", b"close"),
        ]
        for event in (
            h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
            h11.Data(data=MALFORMED_BODY),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event) or b"")
        self.transport.close()


PORT_FIGURES = ("strangers", "trusted", "evicted", "refused", "header_timeouts")
KEEP_ALIVE_S = 30  # an idle kept-alive connection is closed after this (CONTRACT.md section 5)
TLS_REQUIRED_BODY = json.dumps({"ok": False, "error": TLS_REQUIRED_ERROR}).encode()

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def tls_required_app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    """What a plain-HTTP request gets where TLS is required: the 400, then the close."""
    await send(
        {
            "type": "http.response.start",
            "status": 400,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(TLS_REQUIRED_BODY)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": TLS_REQUIRED_BODY})


class GuardedH11Protocol(EnvelopeH11Protocol):
    """The envelope protocol that reports its connection's life to the acceptor's `Link`."""

    link: Link | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.link is not None:
            self.link.attach(transport.abort)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.link is not None and self.conn.their_state is h11.IDLE:
            self.link.waiting_for_headers()

    def handle_events(self) -> None:
        before = self.scope
        super().handle_events()
        if self.scope is not before and self.link is not None:
            self.link.headers_arrived()
            self.scope.setdefault("extensions", {})[TRUST_EXTENSION] = {"trust": self.link.trust}

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.link is not None:
            self.link.response_sent()
        if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
            # Answered before the body arrived (a 401, a 413): no slot for the rest of it.
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.link is not None:
            self.link.lost()


class AgentServer(uvicorn.Server):
    """uvicorn, with the agent's acceptor in place of its listener."""

    def __init__(self, config: uvicorn.Config, policy: PortPolicy) -> None:
        super().__init__(config)
        self.policy = policy
        self.acceptor: Acceptor | None = None

    def port_figures(self) -> dict[str, int]:
        """The acceptor's figures for /metrics (zeros before it starts)."""
        if self.acceptor is None:
            return dict.fromkeys(
                ("strangers", "trusted", "evicted", "refused", "header_timeouts"), 0
            )
        return self.acceptor.figures()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        config = self.config
        if not config.loaded:
            config.load()
        make = functools.partial(
            GuardedH11Protocol,
            config=config,
            server_state=self.server_state,
            app_state=self.lifespan.state,
        )

        def protocol(link: Link, way: Route) -> asyncio.Protocol:
            made = make()
            made.link = link
            if way is Route.REFUSE_PLAIN:
                made.app = tls_required_app
            return made

        if not sockets or len(sockets) != 1:
            raise ValueError("the agent serves exactly one socket")
        self.acceptor = Acceptor(sockets[0], self.policy, protocol)
        self.acceptor.start()
        self.servers = [self.acceptor]  # type: ignore[list-item]  # close() and wait_closed()
        self.started = True


def make_server(app: object, shutdown_timeout_s: float, policy: PortPolicy) -> AgentServer:
    config = uvicorn.Config(
        app,  # type: ignore[arg-type]
        http=GuardedH11Protocol,
        timeout_keep_alive=KEEP_ALIVE_S,
        ws="none",
        log_config=None,
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=max(1, int(shutdown_timeout_s)),
        server_header=False,
        proxy_headers=False,
    )
    return AgentServer(config, policy)


async def wait_started(server: uvicorn.Server, serving: asyncio.Task[None]) -> bool:
    """True once uvicorn accepts connections; False if it ended first."""
    while not server.started:
        if serving.done():
            return False
        await asyncio.sleep(0.01)
    return True
