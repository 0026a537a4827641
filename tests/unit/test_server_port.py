"""The API server's connection settings, and the 400 plain HTTP gets where TLS is required."""

from __future__ import annotations

import json
import re
import resource
from pathlib import Path
from typing import Any

from qudata_agent.acceptor import FD_HEADROOM, PortPolicy, raise_open_files_limit
from qudata_agent.config import Settings
from qudata_agent.domain.tls import TlsMode
from qudata_agent.server import KEEP_ALIVE_S, make_server, tls_required_app


async def test_idle_kept_alive_connections_close_after_30_seconds() -> None:
    policy = PortPolicy(TlsMode.OFF, None, False, 10.0, 256)
    server = make_server(object(), 5.0, policy)
    assert KEEP_ALIVE_S == 30 == server.config.timeout_keep_alive  # CONTRACT.md section 5
    assert server.policy is policy


async def test_plain_http_where_tls_is_required_gets_the_contracts_400() -> None:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await tls_required_app({"type": "http", "path": "/v1/host"}, receive, send)
    start, body = sent
    assert start["status"] == 400
    assert (b"connection", b"close") in start["headers"]
    assert json.loads(body["body"]) == {"ok": False, "error": "TLS required: use https://"}


def test_the_units_open_files_limit_is_sized_above_the_connection_cap() -> None:
    unit = (Path(__file__).resolve().parents[2] / "packaging/qudata-agent.service").read_text()
    (limit,) = re.findall(r"^LimitNOFILE=(\d+)$", unit, re.MULTILINE)
    assert int(limit) >= Settings().http_max_connections + FD_HEADROOM


def test_the_agent_lifts_its_soft_open_files_limit_for_the_cap() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        now, needed = raise_open_files_limit(1024)
        assert needed == 1024 + FD_HEADROOM
        expected = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        assert now == expected == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
