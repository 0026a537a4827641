"""`/instances`: create, show, act on and delete the renter's instance.

Thin: each responder validates into a schema, makes one service call, and
renders the envelope. The service's domain objects are turned into the wire
format here and nowhere else.
"""

from __future__ import annotations

from typing import Any, Protocol

import falcon
import falcon.asgi

from qudata_agent.api.body import read_json
from qudata_agent.api.envelope import ok
from qudata_agent.api.schemas import (
    CreatedInstance,
    CreateInstance,
    GpuHealthEvent,
    ImageCheckState,
    InstanceAction,
    InstanceState,
    PullProgressView,
    SshState,
    StorageState,
)
from qudata_agent.domain.instance import Action, Instance
from qudata_agent.domain.order import CreateOrder, RegistryCredentials
from qudata_agent.errors import InvalidRequest

MAX_TAIL = 10_000


class InstancesApi(Protocol):
    async def create(self, order: CreateOrder) -> Instance: ...

    async def describe(
        self, logs: bool = False, tail: int = 100, instance: Instance | None = None
    ) -> Any: ...

    async def act(self, action: Action) -> Instance: ...

    async def delete(self) -> Instance | None: ...


def to_order(body: CreateInstance) -> CreateOrder:
    credentials = None
    if body.login or body.password:
        if not (body.login and body.password):
            raise InvalidRequest("field 'login': login and password come together")
        credentials = RegistryCredentials(
            body.login, body.password.get_secret_value(), body.registry
        )
    return CreateOrder(
        image=body.image,
        image_tag=body.image_tag,
        storage_gb=None if body.storage_gb is None else float(body.storage_gb),
        env={key: str(value) for key, value in body.env_variables.items()},
        ports=dict(body.ports),
        command=body.command,
        ssh_enabled=body.ssh_enabled,
        credentials=credentials,
    )


def _ports(instance: Instance) -> dict[str, str]:
    return {key: str(port) for key, port in instance.ports.items()}


def to_state(view: Any) -> InstanceState:
    instance: Instance | None = view.instance
    if instance is None:
        return InstanceState(instance_id=None, container_id=None, status="destroyed")
    pull = view.pull
    return InstanceState(
        instance_id=instance.id,
        container_id=instance.container_id,
        status=instance.status.value,
        allocated_ports=_ports(instance),
        image=instance.image,
        phase=instance.phase,
        reason=instance.reason,
        exit_code=instance.exit_code,
        gpus=list(instance.gpus),
        ssh_enabled=instance.ssh_enabled,
        created_at=instance.created_at,
        pull=None
        if pull is None
        else PullProgressView(
            bytes_done=pull.bytes_done,
            bytes_total=pull.bytes_total,
            layers_done=pull.layers_done,
            layers_total=pull.layers_total,
        ),
        ssh=None
        if view.ssh is None
        else SshState(
            status=view.ssh.status,
            port=None if view.ssh.port is None else str(view.ssh.port),
            reason=view.ssh.reason,
        ),
        last_logs=view.last_logs,
        logs=view.logs,
        gpu_health=[
            GpuHealthEvent(uuid=e.uuid, event=e.kind, xid=e.xid, at=e.at)
            for e in getattr(view, "gpu_health", ())
        ],
        storage=_storage(getattr(view, "storage", None)),
        image_check=_image_check(getattr(view, "image_check", None)),
    )


def _image_check(check: Any) -> ImageCheckState | None:
    if check is None:
        return None
    return ImageCheckState(digest=check.digest, checked=check.checked, note=check.note)


def _storage(usage: Any) -> StorageState | None:
    if usage is None:
        return None
    return StorageState(
        requested_gb=usage.requested_gb,
        enforced=usage.enforced,
        used_gb=usage.used_gb,
        over_limit=usage.over_limit,
    )


def _query(req: falcon.asgi.Request) -> tuple[bool, int]:
    logs_raw = req.get_param("logs", default="false").lower()
    if logs_raw not in ("true", "false", "1", "0"):
        raise InvalidRequest("query 'logs': expected true or false")
    tail_raw = req.get_param("tail", default="100")
    if not tail_raw.isdigit() or not 1 <= int(tail_raw) <= MAX_TAIL:
        raise InvalidRequest(f"query 'tail': expected an integer 1-{MAX_TAIL}")
    return logs_raw in ("true", "1"), int(tail_raw)


class InstancesResource:
    def __init__(self, service: InstancesApi, max_body_bytes: int) -> None:
        self._service = service
        self._limit = max_body_bytes

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        body = await read_json(req, CreateInstance, self._limit)
        instance = await self._service.create(to_order(body))
        answer = CreatedInstance(
            instance_id=instance.id, status=instance.status.value, ports=_ports(instance)
        )
        ok(resp, answer, status=202)

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        logs, tail = _query(req)
        ok(resp, to_state(await self._service.describe(logs=logs, tail=tail)))

    async def on_put(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        body = await read_json(req, InstanceAction, self._limit)
        # The answer is the state this action left, whatever a later request did since.
        acted = await self._service.act(Action(body.action))
        ok(resp, to_state(await self._service.describe(instance=acted)))

    async def on_delete(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        deleted = await self._service.delete()
        ok(
            resp,
            InstanceState(
                instance_id=None if deleted is None else deleted.id,
                container_id=None,
                status="destroyed",
            ),
        )
