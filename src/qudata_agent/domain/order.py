"""A create order: what the control plane asked for, after wire validation.

Owns the step from an order to a `ContainerSpec` (`build_spec`): resources
become limits, the command becomes argv, `/dev/shm` is sized for ML work.
What stays true: the order's credentials never reach the spec or the store;
`command: None` means an idle container; a command string runs under
`/bin/sh -c` (given to the image's entrypoint, as `docker run IMAGE CMD` does).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qudata_agent.domain.container_spec import (
    DEFAULT_CRASH_RESTARTS,
    DEFAULT_LOG_MAX_BYTES,
    IDLE_COMMAND,
    IPV6_OFF,
    MIN_SHM_BYTES,
    ContainerSpec,
    Mount,
    PortBinding,
    gpu_env,
    is_hook_variable,
    restart_policy,
)
from qudata_agent.domain.gpus import Resources
from qudata_agent.domain.isolation import DEFAULT_SANDBOX_RUNTIME, Tier, runtime_of
from qudata_agent.domain.registry_credentials import RegistryCredentials

GIB = 1024**3


@dataclass(frozen=True)
class HostDefaults:
    """What every container on this host gets, whatever the order (from the settings)."""

    network: str | None = None  # None: Docker's default bridge
    crash_restarts: int = DEFAULT_CRASH_RESTARTS
    log_max_bytes: int = DEFAULT_LOG_MAX_BYTES
    disable_ipv6: bool = False  # the host has IPv6 and the wall is IPv4 only
    sandbox_runtime: str = DEFAULT_SANDBOX_RUNTIME  # Docker's name of gVisor's runtime
    cdi_gpus: bool = False  # the container tier's GPUs by CDI name (domain.isolation.cdi_refusal)


NO_DEFAULTS = HostDefaults()


@dataclass(frozen=True)
class CreateOrder:
    image: str
    image_tag: str | None = None
    storage_gb: float | None = None
    env: dict[str, str] = field(default_factory=dict)
    ports: dict[str, object] = field(default_factory=dict)
    command: str | None = None
    ssh_enabled: bool = False
    credentials: RegistryCredentials | None = field(default=None, repr=False)
    volumes: dict[str, str] = field(default_factory=dict)  # volume id -> mount path
    isolation: Tier = Tier.CONTAINER


def shm_bytes(memory_bytes: int | None) -> int:
    """Half the memory limit (PyTorch data loaders live in /dev/shm), at least 64 MiB.

    Without a memory limit: 8 GiB, far above Docker's 64 MiB default that
    breaks multi-worker data loading, yet bounded (tmpfs counts as memory).
    """
    if memory_bytes is None:
        return 8 * GIB
    return max(MIN_SHM_BYTES, memory_bytes // 2)


def _binding(key: str, host_port: int) -> PortBinding:
    number, _, protocol = key.partition("/")
    return PortBinding(int(number), host_port, protocol or "tcp")


def dropped_env(order: CreateOrder) -> tuple[str, ...]:
    """The order's variables the agent owns (every `NVIDIA_*`): dropped, and logged."""
    return tuple(name for name in order.env if is_hook_variable(name))


def build_spec(
    order: CreateOrder,
    *,
    instance_id: str,
    agent_id: str,
    image: str,
    resources: Resources,
    ports: dict[str, int],
    gpus: tuple[str, ...],
    storage_bytes: int | None,
    cpuset: str | None = None,
    host: HostDefaults = NO_DEFAULTS,
    mounts: tuple[Mount, ...] = (),
) -> ContainerSpec:
    idle = order.command is None
    command = IDLE_COMMAND if order.command is None else ("/bin/sh", "-c", order.command)
    policy, retries = restart_policy(idle, host.crash_restarts)
    env = {k: v for k, v in order.env.items() if not is_hook_variable(k)}
    return ContainerSpec(
        instance_id=instance_id,
        agent_id=agent_id,
        image=image,
        command=command,
        env=env | gpu_env(gpus),
        restart_policy=policy,
        restart_retries=retries,
        log_max_bytes=host.log_max_bytes,
        sysctls={IPV6_OFF: "1"} if host.disable_ipv6 else {},
        nano_cpus=None if resources.cpu_cores is None else int(resources.cpu_cores * 1e9),
        cpuset_cpus=cpuset,
        memory_bytes=resources.memory_bytes,
        shm_bytes=shm_bytes(resources.memory_bytes),
        ports=tuple(_binding(key, port) for key, port in sorted(ports.items())),
        gpu_uuids=gpus,
        storage_bytes=storage_bytes,
        storage_asked=order.storage_gb is not None,
        network=host.network,
        mounts=mounts,
        runtime=runtime_of(order.isolation, host.sandbox_runtime),
        cdi_gpus=host.cdi_gpus and bool(gpus) and order.isolation is Tier.CONTAINER,
    )
