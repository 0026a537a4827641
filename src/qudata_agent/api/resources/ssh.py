"""`/ssh`: the renter's public keys on the instance."""

from __future__ import annotations

from typing import Protocol

import falcon
import falcon.asgi

from qudata_agent.api.body import read_json
from qudata_agent.api.envelope import ok
from qudata_agent.api.schemas import SshKeyRequest, SshKeys


class SshApi(Protocol):
    async def keys(self) -> list[str]: ...

    async def add_key(self, text: str) -> bool: ...

    async def remove_key(self, text: str) -> None: ...


class SshResource:
    def __init__(self, service: SshApi, max_body_bytes: int) -> None:
        self._service = service
        self._limit = max_body_bytes

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        ok(resp, SshKeys(keys=await self._service.keys()))

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        body = await read_json(req, SshKeyRequest, self._limit)
        added = await self._service.add_key(body.ssh_pubkey)
        ok(resp, SshKeys(keys=await self._service.keys(), added=added))

    async def on_delete(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        body = await read_json(req, SshKeyRequest, self._limit)
        await self._service.remove_key(body.ssh_pubkey)
        ok(resp, SshKeys(keys=await self._service.keys()))
