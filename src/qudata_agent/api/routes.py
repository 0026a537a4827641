"""The route table: every path and method the API serves, in one place.

`app.py` mounts resources from it and `openapi.py` documents it, so a route
cannot exist undocumented. What stays true: only operations marked `public`
are reachable without `X-Agent-Secret`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from qudata_agent.api.schemas import (
    CreatedInstance,
    CreateInstance,
    CreateVolume,
    HostState,
    InstanceAction,
    InstanceList,
    InstanceState,
    SshKeyRequest,
    SshKeys,
    VolumeDeleted,
    VolumeList,
    VolumeState,
)


@dataclass(frozen=True)
class QueryParam:
    name: str
    schema: dict[str, Any]
    description: str = ""


@dataclass(frozen=True)
class Operation:
    method: str
    summary: str
    response: Any  # a pydantic model type (the `data` payload) or None
    request: type[BaseModel] | None = None
    status: int = 200
    public: bool = False
    raw: bool = False  # answer is not wrapped in the envelope (the OpenAPI document, metrics)
    media: str = "application/json"  # content type of the success answer
    query: tuple[QueryParam, ...] = ()
    errors: tuple[int, ...] = ()


@dataclass(frozen=True)
class Route:
    path: str
    resource: str  # key into the resources mapping given to create_app
    operations: tuple[Operation, ...] = field(default_factory=tuple)


_LOG_QUERY = (
    QueryParam("logs", {"type": "boolean"}, "include the container's logs"),
    QueryParam(
        "tail",
        {"type": "integer", "minimum": 1, "maximum": 10000},
        "how many log lines (default 100)",
    ),
)


def _ssh_operations(of: str, errors: tuple[int, ...]) -> tuple[Operation, ...]:
    return (
        Operation("GET", f"The public keys on {of}", SshKeys, errors=errors),
        Operation(
            "POST",
            f"Add a public key to {of} (applied at once if sshd is up, else when it is)",
            SshKeys,
            request=SshKeyRequest,
            errors=(*errors, 503),
        ),
        Operation(
            "DELETE",
            f"Remove exactly that key from {of} (matched on type and body)",
            SshKeys,
            request=SshKeyRequest,
            errors=(*errors, 503),
        ),
    )


ROUTES: tuple[Route, ...] = (
    Route(
        "/ping",
        "ping",
        (Operation("GET", "Liveness check; needs no secret", None, public=True),),
    ),
    Route(
        "/instances",
        "instances",
        (
            Operation(
                "POST",
                "Create the instance; answers at once, the build goes on in the background",
                CreatedInstance,
                request=CreateInstance,
                status=202,
                errors=(409, 503),
            ),
            Operation(
                "GET",
                "The instance's state (status destroyed when there is none; with several,"
                " the most recently created one)",
                InstanceState,
                query=_LOG_QUERY,
                errors=(503,),
            ),
            Operation(
                "PUT",
                "stop, start or restart the instance",
                InstanceState,
                request=InstanceAction,
                errors=(404, 409, 503),
            ),
            Operation(
                "DELETE",
                "Delete the instance: its container, ports and GPUs",
                InstanceState,
                errors=(503,),
            ),
        ),
    ),
    Route("/ssh", "ssh", _ssh_operations("the instance", (404, 409))),
    Route(
        "/v1/host",
        "v1_host",
        (Operation("GET", "What the host has for instances, and what is free", HostState),),
    ),
    Route(
        "/v1/instances",
        "v1_instances",
        (
            Operation("GET", "Every instance on the host, oldest first", InstanceList),
            Operation(
                "POST",
                "Create an instance if it fits what is free (409 naming what is short)",
                CreatedInstance,
                request=CreateInstance,
                status=202,
                errors=(409, 503),
            ),
        ),
    ),
    Route(
        "/v1/instances/{instance_id}",
        "v1_instance",
        (
            Operation("GET", "One instance's state", InstanceState, query=_LOG_QUERY),
            Operation(
                "PUT",
                "stop, start or restart this instance",
                InstanceState,
                request=InstanceAction,
                errors=(409, 503),
            ),
            Operation(
                "DELETE",
                "Delete this instance: its container, ports and GPUs",
                InstanceState,
                errors=(503,),
            ),
        ),
    ),
    Route(
        "/v1/instances/{instance_id}/ssh",
        "v1_ssh",
        _ssh_operations("this instance", (404, 409)),
    ),
    Route(
        "/v1/volumes",
        "v1_volumes",
        (
            Operation("GET", "Every volume on the host", VolumeList),
            Operation(
                "POST",
                "Make a volume of size_gb (with `from`: a copy of that volume's data);"
                " 409 naming what does not fit",
                VolumeState,
                request=CreateVolume,
                status=201,
                errors=(404, 409, 503),
            ),
        ),
    ),
    Route(
        "/v1/volumes/{volume_id}",
        "v1_volume",
        (
            Operation("GET", "One volume", VolumeState, errors=(404,)),
            Operation(
                "DELETE",
                "Delete a volume and its data (409 while an instance holds it)",
                VolumeDeleted,
                errors=(404, 409),
            ),
        ),
    ),
    Route(
        "/openapi.json",
        "openapi",
        (Operation("GET", "This API's OpenAPI 3.1 document (not enveloped)", None, raw=True),),
    ),
    Route(
        "/metrics",
        "metrics",
        (
            Operation(
                "GET",
                "Prometheus metrics in the text exposition format (not enveloped)",
                None,
                raw=True,
                media="text/plain",
            ),
        ),
    ),
)


def public_operations(routes: tuple[Route, ...] = ROUTES) -> frozenset[tuple[str, str]]:
    return frozenset(
        (op.method, route.path) for route in routes for op in route.operations if op.public
    )
