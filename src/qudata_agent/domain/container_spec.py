"""The agent's own description of a tenant container, free of Docker SDK types.

Owns `ContainerSpec` (what to create), `ContainerState` (what Docker reports
back, reduced to what the agent decides on) and the hardening defaults. The
Docker adapter turns a spec into SDK arguments in one short function; nothing
else needs to know the SDK's shape.

What stays true:
- a spec never holds registry credentials;
- every container the agent makes carries the labels `qudata.agent_id` and
  `qudata.instance_id` and the deterministic name `qudata-<instance id>`;
- no spec mounts the Docker socket, runs privileged, or lacks
  `no-new-privileges`; the only host paths a spec mounts are the agent's SSH
  bundle and that instance's own SSH directory, both read-only (an
  SSH-enabled instance, `domain.ssh_init`), so one instance's keys never
  reach another.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

LABEL_AGENT = "qudata.agent_id"
LABEL_INSTANCE = "qudata.instance_id"
NAME_PREFIX = "qudata-"

# What `command: null` runs: an idle process, so the renter can SSH in. Docker's
# init (tini) is PID 1 and forwards SIGTERM, so a stop takes milliseconds.
IDLE_COMMAND: tuple[str, ...] = ("tail", "-f", "/dev/null")

# Capabilities kept: Docker's default set minus those a tenant never needs
# (raw packets, mknod, audit writes). sshd needs SETUID/SETGID/CHOWN/
# SYS_CHROOT; package managers need CHOWN/FOWNER/DAC_OVERRIDE/SETFCAP.
CAPABILITIES: tuple[str, ...] = (
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "SETFCAP",
)
SECURITY_OPTS: tuple[str, ...] = ("no-new-privileges:true",)
DEFAULT_PIDS_LIMIT = 4096
MIN_SHM_BYTES = 64 * 1024**2


def container_name(instance_id: str) -> str:
    return f"{NAME_PREFIX}{instance_id}"


@dataclass(frozen=True)
class PortBinding:
    container_port: int
    host_port: int
    protocol: str = "tcp"  # "tcp" or "udp"


@dataclass(frozen=True)
class Mount:
    """A read-only bind mount of a host directory (the only kind the agent makes)."""

    source: str
    target: str
    read_only: bool = True


@dataclass(frozen=True)
class ContainerSpec:
    instance_id: str
    agent_id: str
    image: str  # the full reference to run (as pulled)
    command: tuple[str, ...]  # argv given to the image's entrypoint
    env: dict[str, str] = field(default_factory=dict)
    nano_cpus: int | None = None  # CPU limit, 1e9 per core
    memory_bytes: int | None = None  # memory limit; swap limit is the same (no extra swap)
    shm_bytes: int = MIN_SHM_BYTES
    pids_limit: int = DEFAULT_PIDS_LIMIT
    ports: tuple[PortBinding, ...] = ()
    gpu_uuids: tuple[str, ...] = ()
    storage_bytes: int | None = None  # writable-layer size, where the driver enforces it
    restart_policy: str = "unless-stopped"
    network: str | None = None  # None: Docker's default bridge
    cap_add: tuple[str, ...] = CAPABILITIES
    security_opt: tuple[str, ...] = SECURITY_OPTS
    init: bool = True
    entrypoint: tuple[str, ...] | None = None  # None: the image's ENTRYPOINT
    user: str | None = None  # None: the image's USER
    mounts: tuple[Mount, ...] = ()
    tmpfs: tuple[tuple[str, str], ...] = ()  # (container path, mount options)

    @property
    def name(self) -> str:
        return container_name(self.instance_id)

    @property
    def labels(self) -> dict[str, str]:
        return {LABEL_AGENT: self.agent_id, LABEL_INSTANCE: self.instance_id}

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ContainerSpec:
        record: dict[str, Any] = json.loads(text)
        record["ports"] = tuple(PortBinding(**p) for p in record.get("ports", ()))
        for key in ("command", "gpu_uuids", "cap_add", "security_opt"):
            record[key] = tuple(record.get(key, ()))
        if record.get("entrypoint") is not None:
            record["entrypoint"] = tuple(record["entrypoint"])
        record["mounts"] = tuple(Mount(**m) for m in record.get("mounts", ()))
        record["tmpfs"] = tuple(tuple(t) for t in record.get("tmpfs", ()))
        return cls(**record)


@dataclass(frozen=True)
class ContainerState:
    """What Docker says about one container, reduced to what the agent uses."""

    container_id: str
    name: str
    instance_id: str | None  # from the label; None if the label is missing
    agent_id: str | None
    status: str  # Docker's: created, running, paused, restarting, removing, exited, dead
    exit_code: int | None = None
    oom_killed: bool = False
    error: str = ""  # Docker's State.Error (e.g. a failed start)
    started_at: str | None = None
    finished_at: str | None = None
    restart_count: int = 0
    ports: dict[str, int] = field(default_factory=dict)  # "8080/tcp" -> host port
    pid: int | None = None  # the container's init process on the host, while it runs
    env: tuple[str, ...] = ()  # Config.Env: the image's ENV and the instance's, "NAME=value"

    @property
    def running(self) -> bool:
        return self.status == "running"
