"""The optional Prometheus listener on loopback (QUDATA_METRICS_LISTEN): /metrics, no secret.

For the provider's own Prometheus on the host: it answers `GET /metrics` with
the same text as the API's `/metrics`, without `X-Agent-Secret`, and nothing
else (404). What stays true: it listens on a loopback address only (config.py
refuses any other), answers one request per connection, never reads more than
a request head of 8 KiB, and gives up on a client silent for 5 seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable

log = logging.getLogger(__name__)

MAX_HEAD = 8192
READ_TIMEOUT_S = 5.0


def _response(status: str, body: bytes, content_type: str) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


async def metrics_listener(sock: socket.socket, render: Callable[[], tuple[bytes, str]]) -> None:
    """Serves on the bound, listening `sock` until cancelled."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
            method, _, rest = head.partition(b" ")
            path = rest.split(b" ", 1)[0].split(b"?", 1)[0]
            if method in (b"GET", b"HEAD") and path == b"/metrics":
                body, content_type = render()
                reply = _response("200 OK", b"" if method == b"HEAD" else body, content_type)
            else:
                reply = _response("404 Not Found", b"only GET /metrics here\n", "text/plain")
            writer.write(reply)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    server = await asyncio.start_server(answer, sock=sock, limit=MAX_HEAD)
    host, port = sock.getsockname()[:2]
    log.info("metrics listener on loopback", extra={"host": host, "port": port})
    async with server:
        await server.serve_forever()
