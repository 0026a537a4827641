"""The control-plane client over httpx.MockTransport: paths, headers, parsing, errors."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from qudata_agent.adapters.control_plane import ControlPlane, ControlPlaneError, InitAnswer

BASE = "https://cp.example.test/v0"
API_KEY = "api-key-0123456789abcdef"
SECRET = "agent-secret-fedcba9876543210"
INIT = {
    "agent_id": "a-1",
    "agent_port": 8000,
    "address": "203.0.113.9",
    "fingerprint": "f" * 64,
    "pid": 42,
    "version": "0.1.0",
}

Handler = Callable[[httpx.Request], httpx.Response]


class Recorder:
    """A MockTransport handler that records requests and answers from a queue."""

    def __init__(self, *answers: httpx.Response | Exception) -> None:
        self.requests: list[httpx.Request] = []
        self._answers = list(answers)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self._answers.pop(0) if len(self._answers) > 1 else self._answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


def ok(data: Any) -> httpx.Response:
    return httpx.Response(200, json={"ok": True, "data": data})


INIT_DATA = {"agent_created": True, "emergency_reinit": False, "host_exists": False}


@pytest.fixture
async def cp_factory() -> AsyncIterator[Callable[[Recorder], ControlPlane]]:
    made: list[ControlPlane] = []

    def make(recorder: Recorder) -> ControlPlane:
        cp = ControlPlane(BASE, API_KEY, transport=httpx.MockTransport(recorder))
        made.append(cp)
        return cp

    yield make
    for cp in made:
        await cp.aclose()


async def test_init_posts_json_with_the_api_key_and_no_secret(
    cp_factory: Callable[[Recorder], ControlPlane],
) -> None:
    recorder = Recorder(ok(INIT_DATA))
    answer = await cp_factory(recorder).init(INIT)
    (request,) = recorder.requests
    assert request.method == "POST"
    assert str(request.url) == f"{BASE}/init"
    assert request.headers["X-Api-Key"] == API_KEY
    assert "X-Agent-Secret" not in request.headers
    assert request.headers["Content-Type"] == "application/json"
    assert json.loads(request.content) == INIT
    assert answer == InitAnswer(
        agent_created=True, emergency_reinit=False, host_exists=False, secret_key=None
    )


async def test_the_secret_goes_out_once_set_and_stops_when_cleared(
    cp_factory: Callable[[Recorder], ControlPlane],
) -> None:
    recorder = Recorder(ok(INIT_DATA))
    cp = cp_factory(recorder)
    cp.set_secret(SECRET)
    await cp.init(INIT)
    await cp.init_host({"gpu_amount": 0})
    cp.set_secret(None)
    await cp.init(INIT)
    assert [r.headers.get("X-Agent-Secret") for r in recorder.requests] == [SECRET, SECRET, None]
    assert all(r.headers["X-Api-Key"] == API_KEY for r in recorder.requests)


async def test_init_parses_the_secret_key_and_flags(
    cp_factory: Callable[[Recorder], ControlPlane],
) -> None:
    data = {"agent_created": False, "emergency_reinit": True, "host_exists": True}
    recorder = Recorder(ok({**data, "secret_key": "new-secret-value"}))
    answer = await cp_factory(recorder).init(INIT)
    assert answer == InitAnswer(
        agent_created=False, emergency_reinit=True, host_exists=True, secret_key="new-secret-value"
    )


@pytest.mark.parametrize("secret_key", [None, "", 123, ["x"]])
async def test_an_absent_empty_or_odd_secret_key_is_none(
    cp_factory: Callable[[Recorder], ControlPlane], secret_key: object
) -> None:
    recorder = Recorder(ok({**INIT_DATA, "secret_key": secret_key}))
    answer = await cp_factory(recorder).init(INIT)
    assert answer.secret_key is None


async def test_missing_flags_read_as_false(cp_factory: Callable[[Recorder], ControlPlane]) -> None:
    answer = await cp_factory(Recorder(ok({}))).init(INIT)
    assert answer == InitAnswer(False, False, False, None)


async def test_init_host_posts_to_init_host(cp_factory: Callable[[Recorder], ControlPlane]) -> None:
    recorder = Recorder(ok(None))
    payload = {"gpu_name": None, "gpu_amount": 0, "vram": 0}
    await cp_factory(recorder).init_host(payload)
    (request,) = recorder.requests
    assert request.method == "POST"
    assert str(request.url) == f"{BASE}/init/host"
    assert json.loads(request.content) == payload
    assert request.headers["X-Api-Key"] == API_KEY


async def test_a_base_url_with_a_trailing_slash_keeps_its_path() -> None:
    recorder = Recorder(ok(None))
    cp = ControlPlane(BASE + "/", API_KEY, transport=httpx.MockTransport(recorder))
    try:
        await cp.init_host({})
    finally:
        await cp.aclose()
    assert str(recorder.requests[0].url) == f"{BASE}/init/host"


def _assert_hides_credentials(error: ControlPlaneError) -> None:
    text = f"{error} {error!r} {error.args}"
    assert API_KEY not in text
    assert SECRET not in text


@pytest.mark.parametrize(
    ("answer", "status", "fragment"),
    [
        (httpx.Response(500, text="<html>oops</html>"), 500, "HTTP 500"),
        (httpx.Response(502, json={"detail": "bad gateway"}), 502, "bad gateway"),
        (httpx.Response(401, json={"ok": False, "error": "unknown api key"}), 401, "HTTP 401"),
        (httpx.Response(200, text="not json at all"), 200, "not JSON"),
    ],
)
async def test_an_http_failure_raises_with_its_status(
    cp_factory: Callable[[Recorder], ControlPlane],
    answer: httpx.Response,
    status: int,
    fragment: str,
) -> None:
    cp = cp_factory(Recorder(answer))
    cp.set_secret(SECRET)
    with pytest.raises(ControlPlaneError) as caught:
        await cp.init(INIT)
    assert caught.value.status == status
    assert fragment in str(caught.value)
    assert "/init" in str(caught.value)
    _assert_hides_credentials(caught.value)


async def test_an_ok_false_envelope_raises_with_its_error(
    cp_factory: Callable[[Recorder], ControlPlane],
) -> None:
    cp = cp_factory(Recorder(httpx.Response(200, json={"ok": False, "error": "host banned"})))
    with pytest.raises(ControlPlaneError, match="host banned"):
        await cp.init_host({})


async def test_a_long_server_error_is_shortened(
    cp_factory: Callable[[Recorder], ControlPlane],
) -> None:
    cp = cp_factory(Recorder(httpx.Response(400, json={"error": "x" * 5000})))
    with pytest.raises(ControlPlaneError) as caught:
        await cp.init(INIT)
    assert len(str(caught.value)) < 300


async def test_an_init_answer_without_a_data_object_raises(
    cp_factory: Callable[[Recorder], ControlPlane],
) -> None:
    cp = cp_factory(
        Recorder(httpx.Response(200, json={"ok": True, "data": ["not", "an", "object"]}))
    )
    with pytest.raises(ControlPlaneError, match="no data object"):
        await cp.init(INIT)


@pytest.mark.parametrize(
    ("exc", "fragment"),
    [
        (httpx.ConnectError("connection refused"), "ConnectError"),
        (httpx.ConnectTimeout("connect timed out"), "timed out"),
        (httpx.ReadTimeout("read timed out"), "timed out"),
        (httpx.RemoteProtocolError("server hung up"), "RemoteProtocolError"),
    ],
)
async def test_a_transport_failure_raises_without_a_status(
    cp_factory: Callable[[Recorder], ControlPlane], exc: Exception, fragment: str
) -> None:
    cp = cp_factory(Recorder(exc))
    cp.set_secret(SECRET)
    with pytest.raises(ControlPlaneError) as caught:
        await cp.init(INIT)
    assert caught.value.status is None
    assert fragment in str(caught.value)
    assert isinstance(caught.value.__cause__, httpx.HTTPError)
    _assert_hides_credentials(caught.value)


@pytest.mark.parametrize("status", [400, 401, 403, 500])
async def test_a_server_echoing_the_credentials_does_not_leak_them_into_the_error(
    cp_factory: Callable[[Recorder], ControlPlane], status: int
) -> None:
    echo = f"invalid key {API_KEY} or secret {SECRET}"
    cp = cp_factory(Recorder(httpx.Response(status, json={"ok": False, "error": echo})))
    cp.set_secret(SECRET)
    with pytest.raises(ControlPlaneError) as caught:
        await cp.init(INIT)
    assert caught.value.status == status
    assert "invalid key" in str(caught.value)
    _assert_hides_credentials(caught.value)


async def test_an_ok_false_envelope_echoing_the_credentials_does_not_leak_them(
    cp_factory: Callable[[Recorder], ControlPlane],
) -> None:
    echo = {"ok": False, "error": f"key {API_KEY} / secret {SECRET} refused"}
    cp = cp_factory(Recorder(httpx.Response(200, json=echo)))
    cp.set_secret(SECRET)
    with pytest.raises(ControlPlaneError) as caught:
        await cp.init_host({})
    assert "refused" in str(caught.value)
    _assert_hides_credentials(caught.value)


async def test_redirects_are_not_followed(cp_factory: Callable[[Recorder], ControlPlane]) -> None:
    recorder = Recorder(httpx.Response(307, headers={"Location": "https://elsewhere.test/init"}))
    with pytest.raises(ControlPlaneError) as caught:
        await cp_factory(recorder).init(INIT)
    assert len(recorder.requests) == 1  # the API key never went to another host
    assert caught.value.status == 307 or "307" in str(caught.value)


async def test_a_credential_cut_by_the_shortening_does_not_leak_its_start(
    cp_factory: Callable[[Recorder], ControlPlane],
) -> None:
    echo = "x" * 190 + API_KEY  # shortening at 200 characters would keep the key's first 10
    cp = cp_factory(Recorder(httpx.Response(400, json={"error": echo})))
    with pytest.raises(ControlPlaneError) as caught:
        await cp.init(INIT)
    assert API_KEY[:10] not in str(caught.value)
