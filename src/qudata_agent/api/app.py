"""The Falcon ASGI application: routes, middleware and error handlers.

Thin by rule: resources parse the request into a schema, call one service
method and render the envelope; nothing here talks to Docker, SQLite, NVML or
the control plane. What stays true: every answer, the framework's own 404/405
and any unexpected crash included, is the JSON envelope; a 500 says only
"internal error" to the caller and logs the details once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import falcon
import falcon.asgi

from qudata_agent import __version__
from qudata_agent.api.envelope import fail, ok
from qudata_agent.api.middleware import (
    BodyLimit,
    RequestContext,
    RequestCounter,
    RequestMetrics,
    SecretAuth,
)
from qudata_agent.api.openapi import build_openapi
from qudata_agent.api.resources.instances import (
    HostResource,
    InstancesApi,
    InstancesResource,
    V1InstanceResource,
    V1InstancesResource,
)
from qudata_agent.api.resources.ssh import SshApi, SshResource, V1SshResource
from qudata_agent.api.resources.system import (
    MetricsApi,
    MetricsResource,
    OpenApiResource,
    PingResource,
)
from qudata_agent.api.resources.volumes import VolumeResource, VolumesApi, VolumesResource
from qudata_agent.api.routes import ROUTES, Route, public_operations
from qudata_agent.errors import AgentError, http_status

log = logging.getLogger(__name__)


class ApiMetrics(MetricsApi, RequestCounter, Protocol):
    """The agent's metrics: rendered by /metrics, moved by every request."""


@dataclass(frozen=True)
class ApiDeps:
    """What the API needs from the rest of the agent (services come in here)."""

    secret: Callable[[], str | None]
    max_body_bytes: int = 1024 * 1024
    instances: InstancesApi | None = None
    ssh: SshApi | None = None
    volumes: VolumesApi | None = None
    metrics: ApiMetrics | None = None
    tunnel: Callable[[], dict[str, Any]] | None = None  # tunnel mode: the tunnel's view
    tls_pin: str | None = None  # the port's `tls_pubkey_sha256`, shown by GET /v1/host


def _framework_message(req: falcon.asgi.Request, ex: falcon.HTTPError) -> str:
    if isinstance(ex, falcon.HTTPRouteNotFound) or ex.status_code == 404:
        return f"no route {req.method} {req.path}"
    if isinstance(ex, falcon.HTTPMethodNotAllowed):
        return f"method {req.method} is not allowed on {req.path}"
    return str(ex.description or ex.title or "request refused")


async def _on_agent_error(
    req: falcon.asgi.Request, resp: falcon.asgi.Response, ex: AgentError, params: dict[str, Any]
) -> None:
    status = http_status(ex)
    if status >= 500 and status != 503:
        log.error("request failed", exc_info=ex, extra={"method": req.method, "path": req.path})
        fail(resp, 500, "internal error")
        return
    fail(resp, status, ex.message)


async def _on_http_error(
    req: falcon.asgi.Request,
    resp: falcon.asgi.Response,
    ex: falcon.HTTPError,
    params: dict[str, Any],
) -> None:
    if ex.headers:
        resp.set_headers(ex.headers)
    fail(resp, ex.status_code, _framework_message(req, ex))


async def _on_unexpected(
    req: falcon.asgi.Request, resp: falcon.asgi.Response, ex: Exception, params: dict[str, Any]
) -> None:
    log.error("unhandled error", exc_info=ex, extra={"method": req.method, "path": req.path})
    fail(resp, 500, "internal error")


class _OptionsInEnvelope:
    """Falcon answers OPTIONS itself with an empty body; it gets the envelope like every answer."""

    async def process_response(
        self,
        req: falcon.asgi.Request,
        resp: falcon.asgi.Response,
        resource: object,
        req_succeeded: bool,
    ) -> None:
        if req.method == "OPTIONS" and req_succeeded and resp.get_header("Content-Length") == "0":
            resp.delete_header("Content-Length")
            ok(resp, None)


def _mounted(deps: ApiDeps, routes: tuple[Route, ...]) -> dict[str, object]:
    """The resources this app serves; routes of services not given are left out."""
    resources: dict[str, object] = {"ping": PingResource()}
    limit = deps.max_body_bytes
    if deps.instances is not None:
        resources["instances"] = InstancesResource(deps.instances, limit)
        resources["v1_instances"] = V1InstancesResource(deps.instances, limit)
        resources["v1_instance"] = V1InstanceResource(deps.instances, limit)
        resources["v1_host"] = HostResource(deps.instances, deps.tunnel, deps.tls_pin)
        if deps.ssh is not None:
            resources["ssh"] = SshResource(deps.ssh, deps.instances, limit)
            resources["v1_ssh"] = V1SshResource(deps.ssh, limit)
    if deps.volumes is not None:
        resources["v1_volumes"] = VolumesResource(deps.volumes, limit)
        resources["v1_volume"] = VolumeResource(deps.volumes)
    if deps.metrics is not None:
        resources["metrics"] = MetricsResource(deps.metrics)
    served = tuple(
        route for route in routes if route.resource in resources or route.resource == "openapi"
    )
    resources["openapi"] = OpenApiResource(build_openapi(served, __version__))
    return resources


AsgiApp = falcon.asgi.App[falcon.asgi.Request, falcon.asgi.Response]


def create_app(deps: ApiDeps, routes: tuple[Route, ...] = ROUTES) -> AsgiApp:
    middleware: list[Any] = (
        []
        if deps.metrics is None
        else [RequestMetrics(deps.metrics, [route.path for route in routes])]
    )
    middleware += [
        RequestContext(),
        SecretAuth(deps.secret, public_operations(routes)),
        BodyLimit(deps.max_body_bytes),
        _OptionsInEnvelope(),
    ]
    app: AsgiApp = falcon.asgi.App(middleware=middleware)
    app.add_error_handler(Exception, _on_unexpected)
    app.add_error_handler(falcon.HTTPError, _on_http_error)
    app.add_error_handler(AgentError, _on_agent_error)
    resources = _mounted(deps, routes)
    for route in routes:
        if route.resource in resources:
            app.add_route(route.path, resources[route.resource])
    return app
