"""The loopback /metrics listener, over a real socket: no secret, /metrics only."""

from __future__ import annotations

import asyncio

import pytest

from qudata_agent.loops.metrics_listener import metrics_listener
from qudata_agent.metrics import Metrics
from qudata_agent.server import bind_socket


async def _get(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    return data


async def test_get_metrics_needs_no_secret_and_nothing_else_is_served() -> None:
    metrics = Metrics()
    metrics.count_request("/ping", "GET", 200)
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    task = asyncio.create_task(metrics_listener(sock, metrics.render))
    try:
        reply = await _get(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK")
        assert b"Content-Type: text/plain; version=0.0.4" in head
        assert b'qudata_api_requests_total{code="200",method="GET",route="/ping"} 1.0' in body
        assert b"qudata_build_info" in body
        for other in (b"GET / HTTP/1.1", b"GET /instances HTTP/1.1", b"POST /metrics HTTP/1.1"):
            reply = await _get(port, other + b"\r\n\r\n")
            assert reply.startswith(b"HTTP/1.1 404")
        # A client that never finishes its request head does not hold the listener.
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /metr")
        reply = await _get(port, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 200")
        writer.close()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
