"""Hostile requests against the real agent process: no way in without the exact secret,
bodies too large or too deep, and malformed HTTP.

What must hold: every refusal is the JSON envelope with the right code (401,
413, 400), nothing is created by a refused request, and the process keeps
answering. That includes requests the HTTP parser (h11) refuses before the
application sees them (a NUL or bare CR in a header, a space in a header name, a
bad Content-Length, no Host): the agent's own uvicorn protocol answers those
with the envelope too.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from support.agent_proc import AgentProcess
from support.docker_api import agent_id, containers, remove_containers_of

pytestmark = pytest.mark.docker

LIMIT = 1024 * 1024
UNAUTHORIZED = {"ok": False, "error": "missing or wrong X-Agent-Secret"}
TOO_LARGE = {"ok": False, "error": f"request body over the limit of {LIMIT} bytes"}
BODY_ROUTES = [("POST", "/instances"), ("PUT", "/instances"), ("POST", "/ssh"), ("DELETE", "/ssh")]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"]


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    state = tmp_path_factory.mktemp("bad-requests") / "state"
    proc = AgentProcess(state, {"QUDATA_PORT_RANGE": "23500-23999"}).start()
    owner = agent_id(state)
    try:
        yield proc
    finally:
        if proc.proc is not None and proc.proc.poll() is None:
            proc.stop(signal.SIGTERM)
        remove_containers_of(owner)


@pytest.fixture
def secret(agent: AgentProcess) -> str:
    return agent.secret()


def _alive_and_untouched(agent: AgentProcess) -> None:
    """The process answers and no request so far made an instance or a container."""
    assert agent.proc is not None and agent.proc.poll() is None, "the agent died"
    assert httpx.get(agent.url + "/ping", timeout=5).json() == {"ok": True, "data": None}
    state = httpx.get(
        agent.url + "/instances", headers={"X-Agent-Secret": agent.secret()}, timeout=5
    ).json()["data"]
    assert state["status"] == "destroyed" and state["instance_id"] is None
    assert containers(agent_id(agent.state_dir)) == []


def _operations(agent: AgentProcess, secret: str) -> list[tuple[str, str]]:
    doc = httpx.get(agent.url + "/openapi.json", headers={"X-Agent-Secret": secret}).json()
    ops = [
        (method.upper(), path)
        for path, item in doc["paths"].items()
        for method, op in item.items()
        if op["security"]
    ]
    assert len(ops) >= 8, ops
    # Routes and methods that do not exist are guarded the same way.
    return [*ops, ("GET", "/no/such/route"), ("OPTIONS", "/instances"), ("PATCH", "/ssh")]


def _near_misses(secret: str) -> dict[str, str]:
    def flip(c: str) -> str:
        return "B" if c == "A" else "A"

    mid = len(secret) // 2
    return {
        "first char off": flip(secret[0]) + secret[1:],
        "middle char off": secret[:mid] + flip(secret[mid]) + secret[mid + 1 :],
        "last char off": secret[:-1] + flip(secret[-1]),
        "prefix": secret[:-1],
        "short prefix": secret[:8],
        "plus suffix": secret + "x",
        "doubled": secret + secret,
        "upper case": secret.upper(),
        "lower case": secret.lower(),
        "swapped case": secret.swapcase(),
        "wrong": "wrong",
        "empty": "",
        "bearer": f"Bearer {secret}",
    }


def test_no_route_opens_without_the_exact_secret(agent: AgentProcess, secret: str) -> None:
    variants = {k: v for k, v in _near_misses(secret).items() if v != secret}
    assert len(variants) >= 10
    with httpx.Client(base_url=agent.url, timeout=5) as client:
        for method, path in _operations(agent, secret):
            attempts: list[tuple[str, list[tuple[str, str]]]] = [("none", [])]
            attempts += [(name, [("X-Agent-Secret", v)]) for name, v in variants.items()]
            attempts += [
                ("sent twice", [("X-Agent-Secret", "wrong"), ("X-Agent-Secret", secret)]),
                ("other header", [("Authorization", secret), ("X-Agent-Token", secret)]),
            ]
            for name, headers in attempts:
                body = json.dumps({"image": "qudata-test/busybox:1", "ssh_pubkey": "x"})
                resp = client.request(
                    method,
                    path,
                    headers=[*headers, ("Content-Type", "application/json")],
                    params={"X-Agent-Secret": secret},
                    content=body,
                )
                assert resp.status_code == 401, (method, path, name, resp.text)
                assert resp.json() == UNAUTHORIZED, (method, path, name)
    # A secret with a byte that is not ASCII, sent raw (clients refuse to encode it).
    raw_secret = secret[:5].encode() + b"\xe9" + secret[6:].encode()
    status, _, body = _raw(
        agent, _request(b"GET", b"/instances", [(b"X-Agent-Secret", raw_secret)])
    )
    assert (status, json.loads(body)) == (401, UNAUTHORIZED)
    _alive_and_untouched(agent)


def test_every_answer_is_the_envelope_whatever_the_method(agent: AgentProcess, secret: str) -> None:
    raw_answers = {("GET", "/openapi.json"), ("GET", "/metrics")}
    with httpx.Client(base_url=agent.url, headers={"X-Agent-Secret": secret}, timeout=5) as client:
        for path in ["/ping", "/instances", "/ssh", "/openapi.json", "/metrics", "/nope"]:
            for method in METHODS:
                if (method, path) in raw_answers:
                    continue
                resp = client.request(method, path)
                assert resp.headers["content-type"].startswith("application/json"), (method, path)
                assert resp.json()["ok"] is (resp.status_code < 300), (method, path, resp.text)
                if resp.status_code >= 300:
                    assert isinstance(resp.json()["error"], str)
    _alive_and_untouched(agent)


@pytest.mark.parametrize(("method", "path"), BODY_ROUTES)
def test_declared_oversize_body_gets_413(
    agent: AgentProcess, secret: str, method: str, path: str
) -> None:
    resp = httpx.request(
        method,
        agent.url + path,
        headers={"X-Agent-Secret": secret, "Content-Type": "application/json"},
        content=b"{" + b" " * LIMIT + b"}",
        timeout=10,
    )
    assert resp.status_code == 413
    assert resp.json() == TOO_LARGE
    _alive_and_untouched(agent)


@pytest.mark.parametrize(("method", "path"), BODY_ROUTES)
def test_chunked_oversize_body_gets_413(
    agent: AgentProcess, secret: str, method: str, path: str
) -> None:
    """No Content-Length: the agent stops reading after the limit and answers."""
    head = _request(
        method.encode(),
        path.encode(),
        [
            (b"X-Agent-Secret", secret.encode()),
            (b"Content-Type", b"application/json"),
            (b"Transfer-Encoding", b"chunked"),
        ],
    )
    chunk = 64 * 1024
    body = b"".join(
        b"%x\r\n" % chunk + (b"[" if i == 0 else b" ") * chunk + b"\r\n" for i in range(40)
    )  # 2.5 MiB, never terminated: the agent must answer without waiting for the end
    status, _, answer = _raw(agent, head, body)
    assert status == 413, answer
    assert json.loads(answer) == TOO_LARGE
    _alive_and_untouched(agent)


def test_body_of_exactly_the_limit_is_read(agent: AgentProcess, secret: str) -> None:
    document = json.dumps({"ssh_pubkey": "not a key"}).encode()
    body = document + b" " * (LIMIT - len(document))
    resp = httpx.post(
        agent.url + "/ssh",
        headers={"X-Agent-Secret": secret, "Content-Type": "application/json"},
        content=body,
        timeout=10,
    )
    assert resp.status_code in (400, 404, 409), resp.text  # refused for what it says, not its size
    assert resp.json()["ok"] is False and "limit" not in resp.json()["error"]


NASTY_BODIES = {
    "nested arrays": b"[" * 100_000,
    "nested objects": b'{"a":' * 100_000,
    "nested arrays closed": b"[" * 50_000 + b"]" * 50_000,
    "nested in a field": b'{"image": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "huge integer": b'{"image": "busybox", "storage_gb": ' + b"9" * 50_000 + b"}",
    "infinity": b'{"image": "busybox", "storage_gb": 1e999}',
    "nan": b'{"image": "busybox", "storage_gb": NaN}',
    "invalid utf-8": b'{"image": "busy\xff\xfebox"}',
    "lone surrogate": b'{"image": "busybox", "command": "\\ud800"}',
    "nul in command": b'{"image": "busybox", "command": "a\\u0000b"}',
    "array body": b'["image", "busybox"]',
    "string body": b'"busybox"',
    "empty body": b"",
    "whitespace body": b" \r\n\t ",
    "truncated": b'{"image": "busybox"',
    "duplicate keys": b'{"image": 1, "image": {"x": [1]}}',
    "bad types": b'{"image": "busybox", "ssh_enabled": "yes", "ports": [22]}',
}


@pytest.mark.parametrize("name", list(NASTY_BODIES))
def test_malformed_json_gets_400(agent: AgentProcess, secret: str, name: str) -> None:
    started = time.monotonic()
    resp = httpx.post(
        agent.url + "/instances",
        headers={"X-Agent-Secret": secret, "Content-Type": "application/json"},
        content=NASTY_BODIES[name],
        timeout=10,
    )
    assert resp.status_code == 400, resp.text
    assert resp.json()["ok"] is False
    assert resp.json()["error"].startswith(("request body", "field '")), resp.json()
    assert time.monotonic() - started < 2
    _alive_and_untouched(agent)


def test_wrong_content_type_gets_400(agent: AgentProcess, secret: str) -> None:
    for content_type in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "",
        "application/jsonx",
    ]:
        resp = httpx.post(
            agent.url + "/instances",
            headers={"X-Agent-Secret": secret, "Content-Type": content_type},
            content=b'{"image": "qudata-test/busybox:1"}',
        )
        assert resp.status_code == 400, (content_type, resp.text)
        assert resp.json() == {"ok": False, "error": "Content-Type must be application/json"}
    _alive_and_untouched(agent)


def _refused_heads(secret: str) -> dict[str, bytes]:
    """Requests HTTP/1.1 says must be refused (CR, LF and NUL in a field, broken framing)."""
    auth = b"X-Agent-Secret: " + secret.encode() + b"\r\n"
    get = b"GET /instances HTTP/1.1\r\nHost: a\r\n"
    post = b"POST /instances HTTP/1.1\r\nHost: a\r\n" + auth
    return {
        "NUL in a header value": get + auth + b"X-A: a\x00b\r\n",
        "NUL in the secret": get + b"X-Agent-Secret: " + _spliced(secret, b"\x00") + b"\r\n",
        "bare CR in a header value": get + auth + b"X-A: a\rb\r\n",
        "bare CR in the secret": get + b"X-Agent-Secret: " + _spliced(secret, b"\r") + b"\r\n",
        "space in a header name": get + auth + b"X A: b\r\n",
        "control char in the path": b"GET /inst\x01ances HTTP/1.1\r\nHost: a\r\n" + auth,
        "bad Content-Length": post + b"Content-Length: 12abc\r\n",
        "negative Content-Length": post + b"Content-Length: -1\r\n",
        "no Host": b"GET /instances HTTP/1.1\r\n" + auth,
    }


def _spliced(secret: str, char: bytes) -> bytes:
    return secret[:4].encode() + char + secret[4:].encode()


def test_control_characters_in_headers_get_400_and_the_agent_stays_up(
    agent: AgentProcess, secret: str
) -> None:
    for name, head in _refused_heads(secret).items():
        status, headers, body = _raw(agent, head + b"Connection: close\r\n\r\n")
        assert status == 400, (name, status, body)
        assert headers.get("content-type", "").startswith("application/json"), (name, headers)
        answer = json.loads(body)
        assert answer["ok"] is False and answer["error"], (name, answer)
        assert secret.encode() not in body
        assert httpx.get(agent.url + "/ping", timeout=5).status_code == 200, name
    _alive_and_untouched(agent)


@pytest.mark.parametrize("char", [b"\x01", b"\x1b", b"\x7f", b"\x08"])
def test_other_control_characters_do_not_open_anything(
    agent: AgentProcess, secret: str, char: bytes
) -> None:
    """HTTP lets a server keep other control characters (RFC 9110, 5.5), and h11 does:
    in a header nobody reads they change nothing, in the secret they make it wrong."""
    get = b"GET /instances HTTP/1.1\r\nHost: a\r\n"
    auth = b"X-Agent-Secret: " + secret.encode() + b"\r\n"
    status, _, body = _raw(agent, get + auth + b"X-A: a" + char + b"b\r\nConnection: close\r\n\r\n")
    assert status == 200 and json.loads(body)["data"]["status"] == "destroyed"
    bad = get + b"X-Agent-Secret: " + _spliced(secret, char) + b"\r\nConnection: close\r\n\r\n"
    status, _, body = _raw(agent, bad)
    assert (status, json.loads(body)) == (401, UNAUTHORIZED)
    _alive_and_untouched(agent)


def test_a_flood_of_header_bytes_does_not_take_the_agent_down(agent: AgentProcess) -> None:
    head = b"GET /ping HTTP/1.1\r\nHost: a\r\nX-A: " + b"a" * 4_000_000 + b"\r\n\r\n"
    try:
        status, _, _ = _raw(agent, head)
        assert 400 <= status < 500
    except OSError:
        pass  # the agent may close the connection while the bytes still flow: fine
    _alive_and_untouched(agent)


def test_the_log_names_no_secret(agent: AgentProcess, secret: str) -> None:
    assert secret not in Path(agent.log_path).read_text(errors="replace")


# -- raw HTTP --------------------------------------------------------------------


def _request(method: bytes, path: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    lines = [method + b" " + path + b" HTTP/1.1", b"Host: 127.0.0.1"]
    lines += [name + b": " + value for name, value in headers]
    return b"\r\n".join(lines) + b"\r\nConnection: close\r\n\r\n"


def _raw(
    agent: AgentProcess, head: bytes, body: bytes = b"", timeout: float = 10
) -> tuple[int, dict[str, str], bytes]:
    """Sends bytes as they are; returns the status, headers and body of the answer.

    The body goes from a second thread, so an answer that comes before the body
    is all sent (413) is read while the sender is still writing.
    """
    with socket.create_connection(("127.0.0.1", agent.port), timeout=timeout) as conn:
        conn.sendall(head)

        def send_body() -> None:
            # The agent may answer and close before all is sent: expected for refused bodies.
            with contextlib.suppress(OSError):
                conn.sendall(body)

        sender = threading.Thread(target=send_body, daemon=True)
        if body:
            sender.start()
        answer = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = conn.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            answer += data
            if _complete(answer):
                break
    if body:
        sender.join(timeout)
    head_bytes, _, payload = answer.partition(b"\r\n\r\n")
    if not head_bytes:
        raise ConnectionResetError("no answer")
    status_line, *header_lines = head_bytes.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, payload


def _complete(answer: bytes) -> bool:
    head, sep, payload = answer.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(payload) >= int(value.strip())
    return False
