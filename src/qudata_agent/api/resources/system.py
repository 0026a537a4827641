"""Resources that describe the agent itself: /ping and /openapi.json."""

from __future__ import annotations

from typing import Any

import falcon
import falcon.asgi

from qudata_agent.api.envelope import ok


class PingResource:
    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        ok(resp, None)


class OpenApiResource:
    def __init__(self, document: dict[str, Any]) -> None:
        self._document = document

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        resp.media = self._document
