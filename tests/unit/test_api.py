"""The Falcon app: envelope, auth, request ids, body limits, JSON bodies, errors, OpenAPI truth.

Probe resources are added to an app built by `create_app`, so they run behind
the real middleware and error handlers; the OpenAPI checks use apps without
them.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

import falcon
import falcon.asgi
import falcon.inspect
import falcon.testing
import pytest
from pydantic import BaseModel, ConfigDict, Field

from qudata_agent.api.app import ApiDeps, AsgiApp, create_app
from qudata_agent.api.body import read_json
from qudata_agent.api.envelope import ok
from qudata_agent.errors import (
    AgentError,
    Conflict,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    Unavailable,
)
from qudata_agent.metrics import Metrics

SECRET = "s3cret-value"
AUTH = {"X-Agent-Secret": SECRET}
LIMIT = 1024
JSON = {"Content-Type": "application/json"}


def _client(
    secret: Callable[[], str | None] = lambda: SECRET, **deps: Any
) -> falcon.testing.TestClient:
    deps.setdefault("max_body_bytes", LIMIT)
    return falcon.testing.TestClient(create_app(ApiDeps(secret=secret, **deps)))


@pytest.fixture
def client() -> falcon.testing.TestClient:
    return _client()


def _assert_failure(result: falcon.testing.Result, status: int) -> str:
    """The answer is the failure envelope and nothing else; returns its message."""
    assert result.status_code == status
    assert result.headers["Content-Type"].startswith("application/json")
    body = result.json
    assert set(body) == {"ok", "error"}
    assert body["ok"] is False
    assert isinstance(body["error"], str)
    assert body["error"]
    return str(body["error"])


# /ping and request ids


def test_ping_is_public(client: falcon.testing.TestClient) -> None:
    result = client.simulate_get("/ping")
    assert result.status_code == 200
    assert result.json == {"ok": True, "data": None}
    assert result.headers["Content-Type"].startswith("application/json")


def test_ping_ignores_a_wrong_secret(client: falcon.testing.TestClient) -> None:
    result = client.simulate_get("/ping", headers={"X-Agent-Secret": "wrong"})
    assert result.status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [
        ("GET", "/ping", {}),
        ("GET", "/openapi.json", {}),
        ("GET", "/no-such-route", AUTH),
        ("DELETE", "/ping", AUTH),
    ],
)
def test_every_answer_has_a_request_id(
    client: falcon.testing.TestClient, method: str, path: str, headers: dict[str, str]
) -> None:
    result = client.simulate_request(method, path, headers=headers)
    assert re.fullmatch(r"[A-Za-z0-9._-]{1,64}", result.headers["X-Request-Id"])


def test_request_ids_differ_between_requests(client: falcon.testing.TestClient) -> None:
    ids = {client.simulate_get("/ping").headers["X-Request-Id"] for _ in range(5)}
    assert len(ids) == 5


@pytest.mark.parametrize("given", ["abc-123", "A.b_C-9", "x" * 64])
def test_a_valid_request_id_is_echoed(client: falcon.testing.TestClient, given: str) -> None:
    result = client.simulate_get("/ping", headers={"X-Request-Id": given})
    assert result.headers["X-Request-Id"] == given


@pytest.mark.parametrize(
    "given", ["has spaces", "x" * 65, "y" * 200, "semi;colon", 'quote"d', "new\\nline", "é"]
)
def test_an_invalid_request_id_is_replaced(client: falcon.testing.TestClient, given: str) -> None:
    result = client.simulate_get("/ping", headers={"X-Request-Id": given})
    rid = result.headers["X-Request-Id"]
    assert rid != given
    assert re.fullmatch(r"[0-9a-f]{16}", rid)


# authentication


def test_openapi_without_the_secret_is_401(client: falcon.testing.TestClient) -> None:
    message = _assert_failure(client.simulate_get("/openapi.json"), 401)
    assert "X-Agent-Secret" in message


@pytest.mark.parametrize(
    "given",
    [
        "wrong",
        "",
        SECRET + "x",
        SECRET[:-1],
        SECRET.upper(),
        " " + SECRET + "x",
        SECRET.replace("3", "e"),
        SECRET[:-1] + "é",
        SECRET * 2,
    ],
)
def test_a_wrong_or_nearly_right_secret_is_401(
    client: falcon.testing.TestClient, given: str
) -> None:
    result = client.simulate_get("/openapi.json", headers={"X-Agent-Secret": given})
    _assert_failure(result, 401)
    assert SECRET not in result.text


def test_the_right_secret_opens_the_door(client: falcon.testing.TestClient) -> None:
    result = client.simulate_get("/openapi.json", headers=AUTH)
    assert result.status_code == 200
    assert result.json["openapi"].startswith("3.1")
    assert "ok" not in result.json  # the document is not enveloped


def test_the_header_name_is_case_insensitive(client: falcon.testing.TestClient) -> None:
    result = client.simulate_get("/openapi.json", headers={"x-agent-secret": SECRET})
    assert result.status_code == 200


@pytest.mark.parametrize("given", [None, "", "None", SECRET])
def test_no_secret_known_yet_refuses_everyone(given: str | None) -> None:
    client = _client(secret=lambda: None)
    headers = {} if given is None else {"X-Agent-Secret": given}
    _assert_failure(client.simulate_get("/openapi.json", headers=headers), 401)
    assert client.simulate_get("/ping").status_code == 200


def test_the_secret_is_asked_for_on_every_request() -> None:
    current = {"secret": "first-secret"}
    client = _client(secret=lambda: current["secret"])
    first = client.simulate_get("/openapi.json", headers={"X-Agent-Secret": "first-secret"})
    assert first.status_code == 200
    current["secret"] = "second-secret"
    old = client.simulate_get("/openapi.json", headers={"X-Agent-Secret": "first-secret"})
    assert old.status_code == 401
    new = client.simulate_get("/openapi.json", headers={"X-Agent-Secret": "second-secret"})
    assert new.status_code == 200


# framework errors are enveloped


def test_an_unknown_route_with_the_secret_is_a_404_envelope(
    client: falcon.testing.TestClient,
) -> None:
    result = client.simulate_get("/no/such/route", headers=AUTH)
    message = _assert_failure(result, 404)
    assert "title" not in result.json
    assert "/no/such/route" in message


def test_an_unknown_route_without_the_secret_is_401(client: falcon.testing.TestClient) -> None:
    result = client.simulate_get("/no/such/route")
    _assert_failure(result, 401)
    assert "route" not in result.json["error"]


@pytest.mark.parametrize(("method", "path"), [("DELETE", "/ping"), ("POST", "/openapi.json")])
def test_a_wrong_method_with_the_secret_is_a_405_envelope(
    client: falcon.testing.TestClient, method: str, path: str
) -> None:
    result = client.simulate_request(method, path, headers=AUTH)
    _assert_failure(result, 405)
    assert "GET" in result.headers["Allow"]
    assert method not in result.headers["Allow"]


def test_a_wrong_method_without_the_secret_is_401(client: falcon.testing.TestClient) -> None:
    _assert_failure(client.simulate_delete("/ping"), 401)


def test_a_declared_body_over_the_limit_is_413_after_auth(
    client: falcon.testing.TestClient,
) -> None:
    big = b"{" + b" " * LIMIT + b"}"
    with_secret = client.simulate_post("/openapi.json", headers={**AUTH, **JSON}, body=big)
    message = _assert_failure(with_secret, 413)
    assert str(LIMIT) in message
    # auth runs first: a caller without the secret learns nothing about limits
    without = client.simulate_post("/openapi.json", headers=JSON, body=big)
    _assert_failure(without, 401)


def test_a_body_at_the_limit_passes_the_size_check(client: falcon.testing.TestClient) -> None:
    result = client.simulate_post("/openapi.json", headers={**AUTH, **JSON}, body=b" " * LIMIT)
    assert result.status_code == 405  # routing reached: the size was fine


def test_a_malformed_content_length_is_a_400_envelope(client: falcon.testing.TestClient) -> None:
    headers = {**AUTH, "Content-Length": "lots"}
    _assert_failure(client.simulate_get("/openapi.json", headers=headers), 400)


# JSON bodies through read_json, behind the real middleware and handlers


class Payload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=16)
    count: int = Field(ge=0)


class JsonProbe:
    def __init__(self, limit: int) -> None:
        self._limit = limit

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        ok(resp, await read_json(req, Payload, self._limit))


class BoomProbe:
    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        raise RuntimeError("kaboom: /internal/detail and more")


ERRORS: dict[str, type[AgentError]] = {
    "invalid": InvalidRequest,
    "unauthorized": Unauthorized,
    "notfound": NotFound,
    "conflict": Conflict,
    "toolarge": PayloadTooLarge,
    "unavailable": Unavailable,
    "plain": AgentError,
}


class ErrorProbe:
    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response, kind: str) -> None:
        raise ERRORS[kind](f"{kind} happened")


class HttpErrorProbe:
    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        raise falcon.HTTPBadRequest(title="Bad thing", description="the description")


def _probe_app(limit: int = LIMIT) -> AsgiApp:
    app = create_app(ApiDeps(secret=lambda: SECRET, max_body_bytes=limit))
    app.add_route("/probe/json", JsonProbe(limit))
    app.add_route("/probe/boom", BoomProbe())
    app.add_route("/probe/error/{kind}", ErrorProbe())
    app.add_route("/probe/http-error", HttpErrorProbe())
    return app


@pytest.fixture
def probe() -> falcon.testing.TestClient:
    return falcon.testing.TestClient(_probe_app())


def _post_json(
    client: falcon.testing.TestClient,
    body: bytes | str,
    content_type: str | None = "application/json",
) -> falcon.testing.Result:
    headers = dict(AUTH)
    if content_type is not None:
        headers["Content-Type"] = content_type
    return client.simulate_post("/probe/json", headers=headers, body=body)


@pytest.mark.parametrize(
    "content_type", ["application/json", "application/json; charset=utf-8", "Application/JSON"]
)
def test_a_valid_body_is_parsed(probe: falcon.testing.TestClient, content_type: str) -> None:
    result = _post_json(probe, json.dumps({"name": "gpu", "count": 3}), content_type)
    assert result.status_code == 200
    assert result.json == {"ok": True, "data": {"name": "gpu", "count": 3}}


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_a_wrong_content_type_is_400(
    probe: falcon.testing.TestClient, content_type: str | None
) -> None:
    result = _post_json(probe, json.dumps({"name": "gpu", "count": 3}), content_type)
    assert "Content-Type" in _assert_failure(result, 400)


@pytest.mark.parametrize("body", ["", "   \n\t "])
def test_an_empty_body_is_400(probe: falcon.testing.TestClient, body: str) -> None:
    assert "empty" in _assert_failure(_post_json(probe, body), 400)


def test_invalid_json_is_400_with_line_and_column(probe: falcon.testing.TestClient) -> None:
    message = _assert_failure(_post_json(probe, '{\n  "name": "gpu",\n  count: 3\n}'), 400)
    assert "not valid JSON" in message
    assert "line 3 column 3" in message


@pytest.mark.parametrize("body", [b"\xff\xfe\x00garbage", b'{"name": "\xc3\x28"}'])
def test_a_body_that_is_not_utf8_is_400(probe: falcon.testing.TestClient, body: bytes) -> None:
    _assert_failure(_post_json(probe, body), 400)


@pytest.mark.parametrize("body", ["[1, 2]", '"text"', "42", "null", "true"])
def test_a_json_document_that_is_not_an_object_is_400(
    probe: falcon.testing.TestClient, body: str
) -> None:
    assert "JSON object" in _assert_failure(_post_json(probe, body), 400)


@pytest.mark.parametrize(
    "body",
    [
        "[" * 100_000,
        "[" * 100_000 + "]" * 100_000,
        '{"a":' * 50_000 + "1" + "}" * 50_000,
        '{"name": ' + "[" * 100_000,
    ],
)
def test_deeply_nested_json_is_400_not_500(body: str) -> None:
    client = falcon.testing.TestClient(_probe_app(limit=1_000_000))
    result = _post_json(client, body)
    _assert_failure(result, 400)
    assert result.json["error"] != "internal error"


def test_a_validation_error_names_the_field_without_echoing_the_value(
    probe: falcon.testing.TestClient,
) -> None:
    result = _post_json(probe, json.dumps({"name": "gpu", "count": -987654}))
    message = _assert_failure(result, 400)
    assert "field 'count'" in message
    assert "987654" not in message


def test_a_validation_error_does_not_echo_a_long_string(probe: falcon.testing.TestClient) -> None:
    leaked = "hunter2-password-like-value"
    result = _post_json(probe, json.dumps({"name": leaked, "count": 1}))
    message = _assert_failure(result, 400)
    assert "field 'name'" in message
    assert leaked not in result.text


def test_missing_and_extra_fields_are_named(probe: falcon.testing.TestClient) -> None:
    body = json.dumps({"name": "a", "colour": "vermilion"})
    message = _assert_failure(_post_json(probe, body), 400)
    assert "field 'count'" in message
    assert "field 'colour'" in message
    assert "vermilion" not in message


def test_a_json_body_over_the_limit_is_413(probe: falcon.testing.TestClient) -> None:
    body = json.dumps({"name": "a", "count": 1, "pad": "x" * LIMIT})
    _assert_failure(_post_json(probe, body), 413)


async def test_a_streamed_body_without_content_length_is_cut_at_the_limit() -> None:
    """A chunked upload declares no length: read_json stops reading past the limit."""
    app = _probe_app()
    chunk = b" " * 256
    pulled = 0
    total_chunks = 4000  # ~1 MiB offered

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        if pulled >= chunk.__len__() * total_chunks:
            return {"type": "http.disconnect"}
        pulled += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    scope = falcon.testing.create_scope(
        path="/probe/json",
        method="POST",
        headers={**AUTH, "Content-Type": "application/json", "Transfer-Encoding": "chunked"},
    )
    scope["headers"] = [tuple(header) for header in scope["headers"]]  # single-use iterators
    assert all(name != b"content-length" for name, _ in scope["headers"])
    collector = falcon.testing.ASGIResponseEventCollector()
    await app(scope, receive, collector.collect)

    assert collector.status == 413
    assert json.loads(b"".join(collector.body_chunks))["ok"] is False
    assert pulled <= LIMIT + 1 + 2 * len(chunk)  # never buffered much past the limit


class _FakeStream:
    def __init__(self) -> None:
        self.asked: list[int] = []

    async def read(self, size: int) -> bytes:
        self.asked.append(size)
        return b"x" * size  # an endless sender


class _FakeRequest:
    """The two parts of a falcon request that read_json uses."""

    def __init__(self) -> None:
        self.content_type = "application/json"
        self.stream = _FakeStream()


async def test_read_json_asks_for_at_most_one_byte_past_the_limit() -> None:
    req = _FakeRequest()
    with pytest.raises(PayloadTooLarge):
        await read_json(req, Payload, 100)  # type: ignore[arg-type]
    assert req.stream.asked == [101]


# errors from resources


def test_an_unexpected_exception_is_a_bare_500_logged_once(
    probe: falcon.testing.TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    result = probe.simulate_get("/probe/boom", headers=AUTH)
    assert result.status_code == 500
    assert result.json == {"ok": False, "error": "internal error"}
    assert "kaboom" not in result.text
    assert "Traceback" not in result.text
    assert result.headers["X-Request-Id"]

    with_trace = [r for r in caplog.records if r.exc_info is not None]
    assert len(with_trace) == 1
    assert isinstance(with_trace[0].exc_info[1], RuntimeError)  # type: ignore[index]
    assert caplog.text.count("Traceback") == 1
    assert caplog.text.count("RuntimeError: kaboom: /internal/detail") == 1


@pytest.mark.parametrize(
    ("kind", "status"),
    [
        ("invalid", 400),
        ("unauthorized", 401),
        ("notfound", 404),
        ("conflict", 409),
        ("toolarge", 413),
        ("unavailable", 503),
    ],
)
def test_each_agent_error_has_its_code_and_message(
    probe: falcon.testing.TestClient, caplog: pytest.LogCaptureFixture, kind: str, status: int
) -> None:
    caplog.set_level(logging.DEBUG)
    result = probe.simulate_get(f"/probe/error/{kind}", headers=AUTH)
    assert _assert_failure(result, status) == f"{kind} happened"
    assert [r for r in caplog.records if r.exc_info is not None] == []


def test_a_plain_agent_error_is_an_internal_error(
    probe: falcon.testing.TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    result = probe.simulate_get("/probe/error/plain", headers=AUTH)
    assert result.status_code == 500
    assert result.json == {"ok": False, "error": "internal error"}
    assert len([r for r in caplog.records if r.exc_info is not None]) == 1


def test_a_subclass_takes_the_code_of_its_closest_parent(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class NoSuchKey(NotFound):
        pass

    class Probe:
        async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
            raise NoSuchKey("no such key")

    app = _probe_app()
    app.add_route("/probe/subclass", Probe())
    result = falcon.testing.TestClient(app).simulate_get("/probe/subclass", headers=AUTH)
    assert _assert_failure(result, 404) == "no such key"


def test_a_falcon_http_error_in_a_resource_is_enveloped(probe: falcon.testing.TestClient) -> None:
    result = probe.simulate_get("/probe/http-error", headers=AUTH)
    assert _assert_failure(result, 400) == "the description"
    assert "title" not in result.json


# the OpenAPI document is true to the routes


class _UnusedInstances:
    """Stands in for the instance service: mounted, never called by these tests."""

    async def create(self, order: Any) -> Any:
        raise AssertionError("not called")

    async def all(self) -> Any:
        raise AssertionError("not called")

    async def get(self, instance_id: str) -> Any:
        raise AssertionError("not called")

    async def latest(self) -> Any:
        raise AssertionError("not called")

    async def describe(self, instance: Any, logs: bool = False, tail: int = 100) -> Any:
        raise AssertionError("not called")

    async def act(self, instance_id: str, action: Any) -> Any:
        raise AssertionError("not called")

    async def delete(self, instance_id: str) -> Any:
        raise AssertionError("not called")

    async def host(self) -> Any:
        raise AssertionError("not called")


def _apps() -> Iterator[tuple[str, AsgiApp]]:
    yield "minimal", create_app(ApiDeps(secret=lambda: SECRET))
    yield (
        "full",
        create_app(ApiDeps(secret=lambda: SECRET, instances=_UnusedInstances(), metrics=Metrics())),
    )


APPS = dict(_apps())


def _served(app: AsgiApp) -> set[tuple[str, str]]:
    return {
        (method.method, route.path)
        for route in falcon.inspect.inspect_routes(app)
        for method in route.methods
        if not method.internal and method.method != "OPTIONS"
    }


def _document(app: AsgiApp) -> dict[str, Any]:
    result = falcon.testing.TestClient(app).simulate_get("/openapi.json", headers=AUTH)
    assert result.status_code == 200
    return dict(result.json)


def _documented(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}


@pytest.mark.parametrize("name", sorted(APPS))
def test_every_served_operation_is_documented_and_every_documented_one_served(name: str) -> None:
    app = APPS[name]
    served, documented = _served(app), _documented(_document(app))
    assert served - documented == set(), "served but not documented"
    assert documented - served == set(), "documented but not served"
    assert ("GET", "/ping") in served
    assert ("GET", "/openapi.json") in served


def test_the_full_app_serves_more_than_the_minimal_one() -> None:
    assert _served(APPS["minimal"]) < _served(APPS["full"])


@pytest.mark.parametrize("name", sorted(APPS))
def test_security_in_the_document_matches_what_the_app_enforces(name: str) -> None:
    app = APPS[name]
    doc = _document(app)
    assert doc["components"]["securitySchemes"]["agentSecret"] == {
        "type": "apiKey",
        "in": "header",
        "name": "X-Agent-Secret",
    }
    client = falcon.testing.TestClient(app)
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            answer = client.simulate_request(method.upper(), path, headers=JSON, body="{}")
            if (method, path) == ("get", "/ping"):
                assert op["security"] == []
                assert answer.status_code == 200
            else:
                assert op["security"] == [{"agentSecret": []}], (method, path)
                assert "401" in op["responses"], (method, path)
                assert answer.status_code == 401, (method, path)


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


@pytest.mark.parametrize("name", sorted(APPS))
def test_every_schema_ref_resolves(name: str) -> None:
    doc = _document(APPS[name])
    schemas = doc["components"]["schemas"]
    refs = list(_refs(doc))
    assert refs, "the document references no schema at all"
    prefix = "#/components/schemas/"
    for ref in refs:
        assert ref.startswith(prefix), ref
        assert ref.removeprefix(prefix) in schemas, ref


@pytest.mark.parametrize("name", sorted(APPS))
def test_every_enveloped_answer_is_documented_with_the_envelope(name: str) -> None:
    doc = _document(APPS[name])
    schemas = doc["components"]["schemas"]
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            for code, response in op["responses"].items():
                if "application/json" not in response["content"]:
                    assert (path, code) == ("/metrics", "200"), (method, path, code)
                    continue
                schema = response["content"]["application/json"]["schema"]
                if "$ref" not in schema:
                    assert path == "/openapi.json", (method, path, code)
                    continue
                target = schemas[schema["$ref"].rsplit("/", 1)[1]]
                assert "ok" in target["properties"], (method, path, code)
                expected = "data" if code.startswith("2") else "error"
                assert expected in target["properties"], (method, path, code)
