"""The HTTP listener: binds the agent's port and runs uvicorn on it.

The agent binds its own socket (so the port it reports is the port it holds,
with no window for another process to take it between choosing and binding)
and hands it to uvicorn. What stays true: without a configured port, the port
used last time is preferred, then the first free one from 1024 up, skipping
the range kept for instances. Requests the HTTP parser refuses before the
application sees them (a NUL in a header, broken framing) are answered with
the same JSON envelope as every other error.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import socket
from collections.abc import Iterable

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

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


def make_server(app: object, shutdown_timeout_s: float) -> uvicorn.Server:
    config = uvicorn.Config(
        app,  # type: ignore[arg-type]
        http=EnvelopeH11Protocol,
        ws="none",
        log_config=None,
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=max(1, int(shutdown_timeout_s)),
        server_header=False,
        proxy_headers=False,
    )
    return uvicorn.Server(config)


async def wait_started(server: uvicorn.Server, serving: asyncio.Task[None]) -> bool:
    """True once uvicorn accepts connections; False if it ended first."""
    while not server.started:
        if serving.done():
            return False
        await asyncio.sleep(0.01)
    return True
