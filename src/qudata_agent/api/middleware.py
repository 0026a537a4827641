"""Request-level checks that run before any resource: request id, secret, body size; counts.

What stays true:
- every non-public request carries the agent secret, compared in constant time,
  or it is answered 401 before routing (so unknown routes do not reveal
  themselves to a caller without the secret);
- a declared body over the limit is answered 413 before a byte of it is read;
- every answer carries `X-Request-Id`, and log lines of the request carry it;
- every answer is counted once by route, method and status code, refused ones
  included; the route label is a path of the route table or "unmatched", never
  a raw path (which a caller could vary without end).
"""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid
from collections.abc import Callable, Collection
from typing import Protocol

import falcon.asgi

from qudata_agent import logs
from qudata_agent.domain.connections import TRUST_EXTENSION
from qudata_agent.errors import PayloadTooLarge, Unauthorized

log = logging.getLogger(__name__)

SECRET_HEADER = "X-Agent-Secret"  # noqa: S105 (a header name)
_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class RequestContext:
    async def process_request(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        given = req.get_header("X-Request-Id")
        rid = given if given and _REQUEST_ID_OK.match(given) else uuid.uuid4().hex[:16]
        req.context.request_id = rid
        req.context.started = time.monotonic()
        logs.request_id.set(rid)

    async def process_response(
        self,
        req: falcon.asgi.Request,
        resp: falcon.asgi.Response,
        resource: object,
        req_succeeded: bool,
    ) -> None:
        rid = getattr(req.context, "request_id", None)
        if rid:
            resp.set_header("X-Request-Id", rid)
        started = getattr(req.context, "started", None)
        if started is not None:
            log.debug(
                "request",
                extra={
                    "method": req.method,
                    "path": req.path,
                    "status": resp.status_code,
                    "ms": round((time.monotonic() - started) * 1000, 2),
                },
            )


class RequestCounter(Protocol):
    def count_request(self, route: str, method: str, code: int) -> None: ...


class RequestMetrics:
    """Counts each answer; first in the middleware list, so it sees the final status."""

    def __init__(self, counter: RequestCounter, paths: Collection[str]) -> None:
        self._counter = counter
        self._paths = frozenset(paths)

    async def process_response(
        self,
        req: falcon.asgi.Request,
        resp: falcon.asgi.Response,
        resource: object,
        req_succeeded: bool,
    ) -> None:
        route = req.uri_template or (req.path if req.path in self._paths else "unmatched")
        self._counter.count_request(route, req.method, resp.status_code)


class SecretAuth:
    def __init__(
        self, secret: Callable[[], str | None], public: frozenset[tuple[str, str]]
    ) -> None:
        self._secret = secret
        self._public = public

    async def process_request(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        if (req.method, req.path) in self._public:
            return
        expected = self._secret()
        given = req.get_header(SECRET_HEADER)
        if expected is None or given is None:
            raise Unauthorized(f"missing or wrong {SECRET_HEADER}")
        if not hmac.compare_digest(
            given.encode("utf-8", "surrogateescape"), expected.encode("utf-8")
        ):
            raise Unauthorized(f"missing or wrong {SECRET_HEADER}")
        _trust_connection(req)


def _trust_connection(req: falcon.asgi.Request) -> None:
    """Tells the server this connection proved the secret (it is no stranger: never evicted)."""
    extension = req.scope.get("extensions", {}).get(TRUST_EXTENSION, {})
    trust = extension.get("trust")
    if callable(trust):
        trust()


class BodyLimit:
    def __init__(self, max_bytes: int) -> None:
        self._max = max_bytes

    async def process_request(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        length = req.content_length  # a malformed header raises falcon's 400
        if length is not None and length > self._max:
            raise PayloadTooLarge(f"request body over the limit of {self._max} bytes")
