"""Reading Docker's answers: pure functions over the Engine API's JSON, no I/O.

Owns the translation of what Docker says back into the agent's types
(`ContainerState`, `LocalImage`, `NetworkInfo`, `ImageConfig`, `StorageInfo`,
container events). Tested against answers captured from Docker 20.10
(API 1.41) and 26 (API 1.45): tests/unit/samples/docker/.

What stays true: a field Docker leaves out reads as empty or zero, never as
an error; Docker's zero time reads as "did not happen".
"""

from __future__ import annotations

import itertools
import re
from datetime import datetime
from typing import Any

from qudata_agent.domain.container_spec import LABEL_AGENT, LABEL_INSTANCE, ContainerState
from qudata_agent.domain.image_access import LocalImage
from qudata_agent.domain.network import NetworkInfo
from qudata_agent.domain.ssh_init import ImageConfig
from qudata_agent.domain.storage import StorageInfo

_NEVER = "0001-01-01T00:00:00Z"  # Docker's zero time: "did not happen"
_ANONYMOUS = re.compile(r"[0-9a-f]{64}")  # the name Docker gives an anonymous volume


def local_image(attrs: dict[str, Any]) -> LocalImage:
    """`docker image inspect` (or an image list entry) -> LocalImage."""
    return LocalImage(
        image_id=str(attrs.get("Id") or ""),
        tags=tuple(t for t in attrs.get("RepoTags") or () if t and t != "<none>:<none>"),
        digests=tuple(d for d in attrs.get("RepoDigests") or () if d and "<none>" not in d),
        size=int(attrs.get("Size") or 0),
    )


def container_state(attrs: dict[str, Any]) -> ContainerState:
    """`docker inspect` output -> ContainerState."""
    state = attrs.get("State") or {}
    labels = (attrs.get("Config") or {}).get("Labels") or {}
    status = str(state.get("Status") or "unknown")
    policy = (attrs.get("HostConfig") or {}).get("RestartPolicy") or {}
    return ContainerState(
        container_id=str(attrs["Id"]),
        name=str(attrs.get("Name") or "").lstrip("/"),
        instance_id=labels.get(LABEL_INSTANCE),
        agent_id=labels.get(LABEL_AGENT),
        status=status,
        exit_code=(
            int(state.get("ExitCode") or 0) if status in ("exited", "dead", "restarting") else None
        ),
        oom_killed=bool(state.get("OOMKilled")),
        error=str(state.get("Error") or ""),
        started_at=_when(state.get("StartedAt")),
        finished_at=_when(state.get("FinishedAt")),
        restart_count=int(attrs.get("RestartCount") or 0),
        restart_policy=str(policy.get("Name") or ""),
        max_retries=int(policy.get("MaximumRetryCount") or 0),
        created_ts=_epoch(attrs.get("Created")),
        started_ts=_epoch(state.get("StartedAt")),
        ports=_host_ports(attrs),
        pid=int(state.get("Pid") or 0) or None,
        address=_address(attrs),
        env=tuple(str(item) for item in (attrs.get("Config") or {}).get("Env") or ()),
        anonymous_volumes=_anonymous_volumes(attrs),
    )


def _address(attrs: dict[str, Any]) -> str | None:
    networks = (attrs.get("NetworkSettings") or {}).get("Networks") or {}
    for network in networks.values():
        if (network or {}).get("IPAddress"):
            return str(network["IPAddress"])
    return None


def _anonymous_volumes(attrs: dict[str, Any]) -> tuple[str, ...]:
    """Host paths of the volumes Docker made for the image's VOLUME paths (64-hex names)."""
    found = []
    for mount in attrs.get("Mounts") or ():
        name = str(mount.get("Name") or "")
        if mount.get("Type") == "volume" and _ANONYMOUS.fullmatch(name) and mount.get("Source"):
            found.append(str(mount["Source"]))
    return tuple(found)


def _when(value: Any) -> str | None:
    return None if not value or value == _NEVER else str(value)


def _epoch(value: Any) -> float | None:
    """Docker's RFC 3339 time (nanoseconds, `Z`) as Unix seconds; None for its zero time."""
    text = _when(value)
    if text is None:
        return None
    main, dot, rest = text.partition(".")
    if dot:  # keep microseconds: datetime takes no more digits
        digits = "".join(itertools.takewhile(str.isdigit, rest))
        main = f"{main}.{digits[:6]}{rest[len(digits) :]}"
    try:
        return datetime.fromisoformat(main.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _host_ports(attrs: dict[str, Any]) -> dict[str, int]:
    """ "8080/tcp" -> host port: what is bound while running, else what was asked for.

    A stopped container has no NetworkSettings.Ports, yet still owns the ports
    of its HostConfig.PortBindings (it gets them back on start).
    """
    asked = (attrs.get("HostConfig") or {}).get("PortBindings") or {}
    bound = (attrs.get("NetworkSettings") or {}).get("Ports") or {}
    ports: dict[str, int] = {}
    for source in (asked, bound):
        for key, bindings in source.items():
            host_ports = [str(b.get("HostPort") or "") for b in bindings or ()]
            numeric = [int(p) for p in host_ports if p.isdigit()]
            if numeric:
                ports[key] = numeric[0]
    return ports


def network_info(name: str, attrs: dict[str, Any]) -> NetworkInfo:
    return NetworkInfo(
        name=name,
        network_id=str(attrs["Id"]),
        driver=str(attrs.get("Driver") or ""),
        options={str(k): str(v) for k, v in (attrs.get("Options") or {}).items()},
        ipv6=bool(attrs.get("EnableIPv6")),
        internal=bool(attrs.get("Internal")),
        containers=len(attrs.get("Containers") or {}),
    )


def image_config(attrs: dict[str, Any]) -> ImageConfig:
    """An image's Config (the only place Docker 26 keeps it: `ContainerConfig` is gone)."""
    config = attrs.get("Config") or {}
    return ImageConfig(
        entrypoint=tuple(str(a) for a in config.get("Entrypoint") or ()),
        cmd=tuple(str(a) for a in config.get("Cmd") or ()),
        user=str(config.get("User") or ""),
        env=tuple(str(item) for item in config.get("Env") or ()),
        architecture=str(attrs.get("Architecture") or ""),
        os=str(attrs.get("Os") or "linux"),
        volumes=tuple(sorted(str(path) for path in config.get("Volumes") or {})),
    )


def container_event(event: dict[str, Any]) -> tuple[str, str] | None:
    """(action, container id) of a container event, else None.

    `Action` and `Actor.ID` are read first: the older top-level `status` and
    `id` are deprecated since API 1.44 and gone from newer engines' answers.
    """
    if event.get("Type") != "container":
        return None
    actor = event.get("Actor") or {}
    container_id = actor.get("ID") or event.get("id")
    action = event.get("Action") or event.get("status")
    return (str(action), str(container_id)) if container_id and action else None


def storage_info(info: dict[str, Any]) -> StorageInfo:
    status = {str(k): str(v) for k, v in info.get("DriverStatus") or () if k}
    return StorageInfo(
        driver=str(info.get("Driver") or ""),
        backing_filesystem=status.get("Backing Filesystem"),
        data_root=str(info.get("DockerRootDir") or "/var/lib/docker"),
    )
