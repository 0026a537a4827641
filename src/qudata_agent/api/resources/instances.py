"""`/instances` (the single-instance routes) and `/v1/instances`, `/v1/host`.

Thin: each responder validates into a schema, makes one service call, and
renders the envelope. The service's domain objects are turned into the wire
format here and nowhere else.

"The" instance of the section 1 routes is chosen here, over the collection
(CONTRACT.md section 4): `GET /instances` shows the most recently created
one; `PUT`, `DELETE` and `/ssh` act on it while the host has at most one,
and answer 409 naming the v1 routes while it has several.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, Protocol

import falcon
import falcon.asgi

from qudata_agent.api.body import read_json
from qudata_agent.api.envelope import ok
from qudata_agent.api.schemas import (
    Amount,
    CreatedInstance,
    CreateInstance,
    GpuCapacity,
    GpuHealthEvent,
    HostState,
    ImageCheckState,
    InstanceAction,
    InstanceList,
    InstanceState,
    NetworkState,
    PortCapacity,
    PullProgressView,
    SshState,
    StorageState,
    TunnelState,
    VolumeTotals,
)
from qudata_agent.domain.gpu_health import GpuEvent
from qudata_agent.domain.instance import Action, Instance
from qudata_agent.domain.isolation import Tier
from qudata_agent.domain.netpolicy import NetworkUse
from qudata_agent.domain.order import CreateOrder
from qudata_agent.domain.registry_credentials import RegistryCredentials
from qudata_agent.domain.storage import StorageUsage
from qudata_agent.errors import Conflict, InvalidRequest, NotFound
from qudata_agent.services.images import ImageCheck
from qudata_agent.services.views import InstanceView

MAX_TAIL = 10_000
GIB = 1024**3


class InstancesApi(Protocol):
    async def create(self, order: CreateOrder) -> Instance: ...

    async def all(self) -> list[Instance]: ...

    async def get(self, instance_id: str) -> Instance: ...

    async def latest(self) -> Instance | None: ...

    async def describe(
        self, instance: Instance | None, logs: bool = False, tail: int = 100
    ) -> InstanceView: ...

    async def describe_all(self) -> list[InstanceView]: ...

    async def act(self, instance_id: str, action: Action) -> Instance: ...

    async def delete(self, instance_id: str) -> Instance: ...

    async def host(self) -> Any: ...


async def sole_instance(service: InstancesApi) -> Instance | None:
    """The one instance the section 1 routes act on; 409 while the host has several."""
    instances = await service.all()
    if len(instances) > 1:
        raise Conflict(
            f"this host runs {len(instances)} instances: use /v1/instances/{{id}}"
            " to address one of them"
        )
    return instances[0] if instances else None


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
        volumes=dict(body.volumes),
        isolation=Tier(body.isolation),
    )


def _ports(instance: Instance) -> dict[str, str]:
    return {key: str(port) for key, port in instance.ports.items()}


def to_state(view: InstanceView) -> InstanceState:
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
        gpu_health=[event for e in view.gpu_health if (event := _gpu_event(e)) is not None],
        storage=_storage(view.storage),
        image_check=_image_check(view.image_check),
        network=_network(view.network),
        isolation=None if view.isolation is None else _TIERS[view.isolation],
        isolation_notes=list(view.isolation_notes),
    )


_TIERS: dict[Tier, Literal["container", "sandbox"]] = {
    Tier.CONTAINER: "container",
    Tier.SANDBOX: "sandbox",
}


def _gpu_event(event: GpuEvent) -> GpuHealthEvent | None:
    """A problem on the wire; a corrected ECC error is counted, never a problem (none comes)."""
    if event.kind == "ecc_corrected":
        return None
    return GpuHealthEvent(uuid=event.uuid, event=event.kind, xid=event.xid, at=event.at)


def _image_check(check: ImageCheck | None) -> ImageCheckState | None:
    if check is None:
        return None
    return ImageCheckState(digest=check.digest, checked=check.checked, note=check.note)


def _network(use: NetworkUse | None) -> NetworkState | None:
    return None if use is None else NetworkState(**use.wire())


def _storage(usage: StorageUsage | None) -> StorageState | None:
    if usage is None:
        return None
    return StorageState(
        requested_gb=usage.requested_gb,
        enforced=usage.enforced,
        used_gb=usage.used_gb,
        over_limit=usage.over_limit,
        default=usage.default,
    )


def _query(req: falcon.asgi.Request) -> tuple[bool, int]:
    logs_raw = req.get_param("logs", default="false").lower()
    if logs_raw not in ("true", "false", "1", "0"):
        raise InvalidRequest("query 'logs': expected true or false")
    tail_raw = req.get_param("tail", default="100")
    if not tail_raw.isdigit() or not 1 <= int(tail_raw) <= MAX_TAIL:
        raise InvalidRequest(f"query 'tail': expected an integer 1-{MAX_TAIL}")
    return logs_raw in ("true", "1"), int(tail_raw)


def _destroyed(deleted: Instance | None) -> InstanceState:
    return InstanceState(
        instance_id=None if deleted is None else deleted.id, container_id=None, status="destroyed"
    )


async def _create(service: InstancesApi, req: falcon.asgi.Request, limit: int) -> CreatedInstance:
    body = await read_json(req, CreateInstance, limit)
    instance = await service.create(to_order(body))
    return CreatedInstance(
        instance_id=instance.id, status=instance.status.value, ports=_ports(instance)
    )


async def _action(req: falcon.asgi.Request, limit: int) -> Action:
    return Action((await read_json(req, InstanceAction, limit)).action)


async def _act(service: InstancesApi, instance_id: str, action: Action) -> InstanceState:
    # The answer is the state this action left, whatever a later request did since.
    acted = await service.act(instance_id, action)
    return to_state(await service.describe(acted))


class InstancesResource:
    """`/instances`: the single-instance contract (section 1)."""

    def __init__(self, service: InstancesApi, max_body_bytes: int) -> None:
        self._service = service
        self._limit = max_body_bytes

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        ok(resp, await _create(self._service, req, self._limit), status=202)

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        logs, tail = _query(req)
        latest = await self._service.latest()
        ok(resp, to_state(await self._service.describe(latest, logs=logs, tail=tail)))

    async def on_put(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        action = await _action(req, self._limit)
        instance = await sole_instance(self._service)
        if instance is None:
            raise NotFound("there is no instance")
        ok(resp, await _act(self._service, instance.id, action))

    async def on_delete(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        instance = await sole_instance(self._service)
        deleted = None
        if instance is not None:
            try:
                deleted = await self._service.delete(instance.id)
            except NotFound:
                deleted = instance  # a delete racing this one removed it: the same answer
        ok(resp, _destroyed(deleted))


class V1InstancesResource:
    """`/v1/instances`: every instance, and creating one (section 4)."""

    def __init__(self, service: InstancesApi, max_body_bytes: int) -> None:
        self._service = service
        self._limit = max_body_bytes

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        views = await self._service.describe_all()
        ok(resp, InstanceList(instances=[to_state(view) for view in views]))

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        ok(resp, await _create(self._service, req, self._limit), status=202)


class V1InstanceResource:
    """`/v1/instances/{instance_id}`: one instance by its id."""

    def __init__(self, service: InstancesApi, max_body_bytes: int) -> None:
        self._service = service
        self._limit = max_body_bytes

    async def on_get(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, instance_id: str
    ) -> None:
        logs, tail = _query(req)
        instance = await self._service.get(instance_id)
        ok(resp, to_state(await self._service.describe(instance, logs=logs, tail=tail)))

    async def on_put(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, instance_id: str
    ) -> None:
        ok(resp, await _act(self._service, instance_id, await _action(req, self._limit)))

    async def on_delete(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, instance_id: str
    ) -> None:
        ok(resp, _destroyed(await self._service.delete(instance_id)))


def _gb(value: float | None) -> float | None:
    return None if value is None else round(value / GIB, 2)


def _free_gb(value: float | None) -> float | None:
    """Rounded down: what is shown free is what an order may ask for (admission floors too)."""
    return None if value is None else math.floor(value / GIB * 100) / 100


class HostResource:
    """`/v1/host`: what the host has for instances and what is free."""

    def __init__(
        self,
        service: InstancesApi,
        tunnel: Callable[[], dict[str, Any]] | None = None,
        tls_pin: str | None = None,
    ) -> None:
        self._service = service
        self._tunnel = tunnel
        self._tls_pin = tls_pin

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        host = await self._service.host()
        tunnel = TunnelState(**self._tunnel()) if self._tunnel else None
        low, high = host.port_range
        ok(
            resp,
            HostState(
                max_instances=host.max_instances,
                instances=host.instances,
                gpus=GpuCapacity(total=len(host.gpus), free=list(host.free.gpus)),
                cpu_cores=Amount(total=host.cpu_cores, free=host.free.cpu_cores),
                memory_gb=Amount(
                    total=_gb(host.memory_bytes), free=_free_gb(host.free.memory_bytes)
                ),
                disk_gb=Amount(
                    total=_gb(host.disk.total_bytes), free=_free_gb(host.free.disk_bytes)
                ),
                ports=PortCapacity(range=f"{low}-{high}", free=host.ports_free),
                volumes=None
                if host.volumes is None
                else VolumeTotals(
                    count=host.volumes.count,
                    disk_gb=round(host.volumes.size_bytes / GIB, 3),
                    used_gb=round(host.volumes.disk_bytes / GIB, 3),
                ),
                tunnel=tunnel,
                tls_pubkey_sha256=self._tls_pin,
                isolation=list(getattr(host, "isolation", ("container",))),
            ),
        )
