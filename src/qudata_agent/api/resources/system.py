"""Resources that describe the agent itself: /ping, /openapi.json and /metrics."""

from __future__ import annotations

from typing import Any, Protocol

import falcon
import falcon.asgi

from qudata_agent.api.envelope import ok


class PingResource:
    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        ok(resp, None)


class MetricsApi(Protocol):
    def render(self) -> tuple[bytes, str]: ...


class MetricsResource:
    """Prometheus's text format as is (not in the envelope)."""

    def __init__(self, metrics: MetricsApi) -> None:
        self._metrics = metrics

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        body, content_type = self._metrics.render()
        resp.data = body
        resp.content_type = content_type


class OpenApiResource:
    def __init__(self, document: dict[str, Any]) -> None:
        self._document = document

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.media = self._document
