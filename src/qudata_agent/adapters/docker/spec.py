"""A `ContainerSpec` turned into the SDK's `containers.create` arguments: the one place
a spec meets Docker.

What stays true: nothing outside the spec reaches Docker; every container
drops all capabilities, is never privileged, and logs to Docker's `local`
driver, rotated within the spec's byte budget.
"""

from __future__ import annotations

from typing import Any

import docker.types

from qudata_agent.domain.container_spec import LOG_FILES, ContainerSpec
from qudata_agent.domain.isolation import cdi_device


def create_kwargs(spec: ContainerSpec) -> dict[str, Any]:
    """The SDK's `containers.create` arguments for a spec: nothing else reaches Docker."""
    kwargs: dict[str, Any] = {
        "image": spec.image,
        "name": spec.name,
        "labels": spec.labels,
        "command": list(spec.command) or None,
        "environment": dict(spec.env),
        "shm_size": spec.shm_bytes,
        "pids_limit": spec.pids_limit,
        "ports": {f"{p.container_port}/{p.protocol}": ("0.0.0.0", p.host_port) for p in spec.ports},
        "restart_policy": _restart_policy(spec),
        "log_config": docker.types.LogConfig(
            type="local",
            config={
                "max-size": str(max(1, spec.log_max_bytes // LOG_FILES)),
                "max-file": str(LOG_FILES),
            },
        ),
        "runtime": spec.runtime,
        "cap_drop": ["ALL"],
        "cap_add": list(spec.cap_add),
        "security_opt": list(spec.security_opt),
        "init": spec.init,
        "privileged": False,
        "tty": False,
        "detach": True,
    }
    if spec.nano_cpus:
        kwargs["nano_cpus"] = spec.nano_cpus
    if spec.cpuset_cpus:
        kwargs["cpuset_cpus"] = spec.cpuset_cpus
    if spec.memory_bytes:
        kwargs["mem_limit"] = kwargs["memswap_limit"] = spec.memory_bytes  # no extra swap
    if spec.gpu_uuids and spec.cdi_gpus:
        kwargs["device_requests"] = [
            docker.types.DeviceRequest(
                driver="cdi", device_ids=[cdi_device(u) for u in spec.gpu_uuids]
            )
        ]
    elif spec.gpu_uuids:
        kwargs["device_requests"] = [
            docker.types.DeviceRequest(device_ids=list(spec.gpu_uuids), capabilities=[["gpu"]])
        ]
    if spec.storage_bytes:
        kwargs["storage_opt"] = {"size": str(spec.storage_bytes)}
    if spec.network:
        kwargs["network"] = spec.network
    if spec.sysctls:
        kwargs["sysctls"] = dict(spec.sysctls)
    if spec.entrypoint is not None:
        kwargs["entrypoint"] = list(spec.entrypoint)
    if spec.user is not None:
        kwargs["user"] = spec.user
    if spec.mounts:
        kwargs["mounts"] = [
            docker.types.Mount(m.target, m.source, type="bind", read_only=m.read_only)
            for m in spec.mounts
        ]
    if spec.tmpfs:
        kwargs["tmpfs"] = dict(spec.tmpfs)
    return kwargs


def _restart_policy(spec: ContainerSpec) -> dict[str, Any]:
    policy: dict[str, Any] = {"Name": spec.restart_policy}
    if spec.restart_policy == "on-failure":
        policy["MaximumRetryCount"] = spec.restart_retries
    return policy
