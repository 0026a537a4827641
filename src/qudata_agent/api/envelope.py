"""Rendering the answer envelope: `{"ok": true, "data": ...}` / `{"ok": false, "error": ...}`."""

from __future__ import annotations

import falcon
import falcon.asgi
from pydantic import BaseModel


def ok(resp: falcon.asgi.Response, data: object, status: int = 200) -> None:
    if isinstance(data, BaseModel):
        data = data.model_dump(mode="json")
    resp.status = status
    resp.media = {"ok": True, "data": data}


def fail(resp: falcon.asgi.Response, status: int, message: str) -> None:
    resp.status = status
    resp.media = {"ok": False, "error": message}
