"""`/v1/volumes` and `/v1/volumes/{volume_id}`: renters' volumes (CONTRACT.md section 7).

Thin: each responder validates into a schema, makes one service call, and
renders the envelope; the service's volumes become the wire format here.
"""

from __future__ import annotations

from typing import Any, Protocol

import falcon
import falcon.asgi

from qudata_agent.api.body import read_json
from qudata_agent.api.envelope import ok
from qudata_agent.api.schemas import CreateVolume, VolumeDeleted, VolumeList, VolumeState

GIB = 1024**3


class VolumesApi(Protocol):
    async def create(self, size_gb: float | None, source_id: str | None = None) -> Any: ...

    async def all(self) -> list[Any]: ...

    async def get(self, volume_id: str) -> Any: ...

    async def delete(self, volume_id: str) -> Any: ...


def to_volume(view: Any) -> VolumeState:
    volume = view.volume
    used = view.used_bytes
    return VolumeState(
        volume_id=volume.id,
        size_gb=round(volume.size_bytes / GIB, 3),
        used_gb=None if used is None else round(used / GIB, 3),
        status=volume.status,
        instance_id=volume.instance_id,
        created_at=volume.created_at,
        reason=volume.reason,
        mechanism=volume.mechanism.value,
    )


class VolumesResource:
    """`/v1/volumes`: every volume, and making one (empty, or a copy)."""

    def __init__(self, service: VolumesApi, max_body_bytes: int) -> None:
        self._service = service
        self._limit = max_body_bytes

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        ok(resp, VolumeList(volumes=[to_volume(v) for v in await self._service.all()]))

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        body = await read_json(req, CreateVolume, self._limit)
        size = None if body.size_gb is None else float(body.size_gb)
        ok(resp, to_volume(await self._service.create(size, body.source)), status=201)


class VolumeResource:
    """`/v1/volumes/{volume_id}`: one volume."""

    def __init__(self, service: VolumesApi) -> None:
        self._service = service

    async def on_get(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, volume_id: str
    ) -> None:
        ok(resp, to_volume(await self._service.get(volume_id)))

    async def on_delete(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, volume_id: str
    ) -> None:
        volume = await self._service.delete(volume_id)
        ok(resp, VolumeDeleted(volume_id=volume.id))
