"""`/ssh` (the single-instance route) and `/v1/instances/{instance_id}/ssh`: the renter's keys.

Keys belong to one instance: a key given for one never reaches another.
"""

from __future__ import annotations

from typing import Protocol

import falcon
import falcon.asgi

from qudata_agent.api.body import read_json
from qudata_agent.api.envelope import ok
from qudata_agent.api.resources.instances import InstancesApi, sole_instance
from qudata_agent.api.schemas import SshKeyRequest, SshKeys
from qudata_agent.errors import NotFound


class SshApi(Protocol):
    async def keys(self, instance_id: str) -> list[str]: ...

    async def add_key(self, instance_id: str, text: str) -> bool: ...

    async def remove_key(self, instance_id: str, text: str) -> None: ...


class _Keys:
    def __init__(self, service: SshApi, max_body_bytes: int) -> None:
        self._service = service
        self._limit = max_body_bytes

    async def _get(self, resp: falcon.asgi.Response, instance_id: str) -> None:
        ok(resp, SshKeys(keys=await self._service.keys(instance_id)))

    async def _key(self, req: falcon.asgi.Request) -> str:
        return (await read_json(req, SshKeyRequest, self._limit)).ssh_pubkey

    async def _post(self, resp: falcon.asgi.Response, instance_id: str, key: str) -> None:
        added = await self._service.add_key(instance_id, key)
        ok(resp, SshKeys(keys=await self._service.keys(instance_id), added=added))

    async def _delete(self, resp: falcon.asgi.Response, instance_id: str, key: str) -> None:
        await self._service.remove_key(instance_id, key)
        ok(resp, SshKeys(keys=await self._service.keys(instance_id)))


class SshResource(_Keys):
    """`/ssh`: the keys of the host's one instance (409 while it has several)."""

    def __init__(self, service: SshApi, instances: InstancesApi, max_body_bytes: int) -> None:
        super().__init__(service, max_body_bytes)
        self._instances = instances

    async def _sole(self) -> str:
        instance = await sole_instance(self._instances)
        if instance is None:
            raise NotFound("there is no instance")
        return instance.id

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        await self._get(resp, await self._sole())

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        key = await self._key(req)
        await self._post(resp, await self._sole(), key)

    async def on_delete(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        key = await self._key(req)
        await self._delete(resp, await self._sole(), key)


class V1SshResource(_Keys):
    """`/v1/instances/{instance_id}/ssh`: the keys of that instance."""

    async def on_get(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, instance_id: str
    ) -> None:
        await self._get(resp, instance_id)

    async def on_post(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, instance_id: str
    ) -> None:
        await self._post(resp, instance_id, await self._key(req))

    async def on_delete(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, instance_id: str
    ) -> None:
        await self._delete(resp, instance_id, await self._key(req))
