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
  reach another, and the data directories of the renter's volumes the
  instance holds, read-write (`domain.volumes`);
- the GPU variables the NVIDIA runtime reads (`GPU_ENV`) are the agent's:
  exactly the rented GPUs, `void` when none, whatever the order or the image
  says; every other `NVIDIA_*` variable (the toolkit hook reads IMEX
  channels, MIG config and monitor devices, CUDA requirements, GDRCopy,
  fabric devices... from them, and new ones appear) is the agent's too: an
  order's is dropped, an image's is set empty (`neutral_hook_env`), so the
  hook sees only what the agent decided; the OCI runtime is pinned
  (`runc`), so a host whose default runtime is `nvidia` cannot widen what a
  container sees;
- the restart policy follows what the instance runs (see `restart_policy`)
  and the container's log is capped and rotated.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

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
RUNTIME = "runc"
# The variables through which the NVIDIA container runtime (or a default
# runtime set to it) decides what a container sees: the agent sets them.
VISIBLE_DEVICES = "NVIDIA_VISIBLE_DEVICES"
DRIVER_CAPABILITIES = "NVIDIA_DRIVER_CAPABILITIES"
GPU_ENV: tuple[str, ...] = (VISIBLE_DEVICES, DRIVER_CAPABILITIES)
HOOK_ENV_PREFIX = "NVIDIA_"  # what the NVIDIA container toolkit's hook reads its orders from
NO_GPU = "void"
IPV6_OFF = "net.ipv6.conf.all.disable_ipv6"  # a sysctl of the container's own network namespace
GPU_CAPABILITIES = "compute,utility"
DEFAULT_CRASH_RESTARTS = 5
DEFAULT_LOG_MAX_BYTES = 100 * 1024**2
LOG_FILES = 5  # the log is kept in this many rotated files


def restart_policy(idle: bool, crash_restarts: int) -> tuple[str, int]:
    """(Docker restart policy, retries) for an instance.

    An idle instance (`command: null`) always comes back (`unless-stopped`:
    after a crash, a dockerd restart or a reboot, but not after a stop through
    the API). A command is a job: when it exits 0 it is done and stays
    stopped; when it crashes Docker restarts it with its own doubling delay at
    most `crash_restarts` times, then leaves it stopped (`on-failure:N`).
    """
    return ("unless-stopped", 0) if idle else ("on-failure", crash_restarts)


def gpu_env(gpu_uuids: tuple[str, ...]) -> dict[str, str]:
    """What the NVIDIA runtime is told: exactly these GPUs, or none at all."""
    if not gpu_uuids:
        return {VISIBLE_DEVICES: NO_GPU}
    return {VISIBLE_DEVICES: ",".join(gpu_uuids), DRIVER_CAPABILITIES: GPU_CAPABILITIES}


def is_hook_variable(name: str) -> bool:
    """Whether the NVIDIA toolkit's hook may read this variable (every `NVIDIA_*`)."""
    return name.upper().startswith(HOOK_ENV_PREFIX)


def neutral_hook_env(image_env: Iterable[str], env: Mapping[str, str]) -> dict[str, str]:
    """`env` with every `NVIDIA_*` the image sets (and `env` does not) set empty.

    A container's variable overrides the image's of the same name, so the
    hook sees empty values (no devices, no requirement, nothing enabled).
    """
    neutral = dict(env)
    for item in image_env:
        name = item.partition("=")[0]
        if is_hook_variable(name) and name not in neutral:
            neutral[name] = ""
    return neutral


def container_name(instance_id: str) -> str:
    return f"{NAME_PREFIX}{instance_id}"


@dataclass(frozen=True)
class PortBinding:
    container_port: int
    host_port: int
    protocol: str = "tcp"  # "tcp" or "udp"


@dataclass(frozen=True)
class Mount:
    """A bind mount of a host directory: read-only, but a renter's volume."""

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
    cpuset_cpus: str | None = None  # CPUs of its own ("0-3,56-59"); None: any CPU
    memory_bytes: int | None = None  # memory limit; swap limit is the same (no extra swap)
    shm_bytes: int = MIN_SHM_BYTES
    pids_limit: int = DEFAULT_PIDS_LIMIT
    ports: tuple[PortBinding, ...] = ()
    gpu_uuids: tuple[str, ...] = ()
    cdi_gpus: bool = False  # the GPUs by CDI device name (domain.isolation.cdi_device)
    storage_bytes: int | None = None  # writable-layer size, where the driver enforces it
    storage_asked: bool = True  # False: the host's default size, a cap that promises nothing
    restart_policy: str = "unless-stopped"
    restart_retries: int = 0  # with "on-failure": how many restarts before it stays stopped
    log_max_bytes: int = DEFAULT_LOG_MAX_BYTES  # container log, all rotated files together
    runtime: str = RUNTIME
    sysctls: dict[str, str] = field(default_factory=dict)
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
    restart_policy: str = ""  # HostConfig.RestartPolicy.Name ("on-failure", "unless-stopped")
    max_retries: int = 0  # HostConfig.RestartPolicy.MaximumRetryCount (on-failure)
    created_ts: float | None = None  # Created, Unix seconds
    started_ts: float | None = None  # StartedAt, Unix seconds (None: never started)
    ports: dict[str, int] = field(default_factory=dict)  # "8080/tcp" -> host port
    pid: int | None = None  # the container's init process on the host, while it runs
    address: str | None = None  # its IPv4 address on its (first) network, while it runs
    env: tuple[str, ...] = ()  # Config.Env: the image's ENV and the instance's, "NAME=value"
    # Host directories of the anonymous volumes Docker made for the image's VOLUME paths.
    anonymous_volumes: tuple[str, ...] = ()

    @property
    def running(self) -> bool:
        return self.status == "running"

    @property
    def gave_up(self) -> bool:
        """Docker's on-failure policy used up its restarts and left the crash stopped."""
        return (
            self.status == "exited"
            and bool(self.exit_code)
            and self.restart_policy == "on-failure"
            and self.restart_count >= self.max_retries
        )
