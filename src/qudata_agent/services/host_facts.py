"""What the agent settles about its host as it starts, each with its fallback.

- Docker's data root, the disk that `storage_gb` and the image cache weigh:
  where Docker cannot say (it is down), the default root.
- The inventory `/init/host` reports, with the isolation tiers on offer.
- The public address: the relay's in tunnel mode, the configured one, the
  lookups', else the default route's.
- The SSH bundle (made once per OpenSSH of the host) and the SSH port gate,
  each of which may be missing: the agent then runs without it and says why.
- Whether the container tier's GPUs go in by CDI name (decided once).

What stays true: none of these failing stops the agent; each failure is
logged once with what the agent does instead.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

from qudata_agent.blocking import Blocking
from qudata_agent.domain.inventory import HostInventory, init_host_payload
from qudata_agent.domain.isolation import cdi_refusal
from qudata_agent.errors import AgentError, Unavailable
from qudata_agent.services.capacity import Disk
from qudata_agent.services.engine import Daemon
from qudata_agent.services.isolation import Isolation

log = logging.getLogger(__name__)

FALLBACK_DOCKER_ROOT = "/var/lib/docker"
T = TypeVar("T")


class DockerDisk:
    """Docker's data root's filesystem (blocking calls: run them off the loop)."""

    def __init__(
        self,
        data_root: Callable[[], str],  # the blocking engine's
        usage: Callable[[str], tuple[int, int] | None],
        free: Callable[[str], int | None],
    ) -> None:
        self._data_root = data_root
        self._usage = usage
        self._free = free

    def root(self) -> str:
        try:
            return self._data_root()
        except AgentError:
            return FALLBACK_DOCKER_ROOT

    def disk(self) -> Disk:
        usage = self._usage(self.root())
        return Disk(*usage) if usage else Disk(None, None)

    def free_now(self) -> int | None:
        """The free space of Docker's data root now; None when Docker cannot say where it is."""
        try:
            return self._free(self._data_root())
        except AgentError:
            return None


async def inventory(
    engine: Daemon,
    probe: Callable[[str], HostInventory],
    isolation: Isolation | None,
    blocking: Blocking,
) -> dict[str, Any]:
    """The `/init/host` payload; the default data root's disk while Docker is unreachable."""
    try:
        root = await engine.data_root()
    except Unavailable as e:
        log.warning(
            "Docker unreachable; disk size taken from the default data root",
            extra={"error": e.message, "path": FALLBACK_DOCKER_ROOT},
        )
        root = FALLBACK_DOCKER_ROOT
    found = await blocking.quick(probe, root)
    tiers = None if isolation is None else (await isolation.offer()).names()
    return init_host_payload(found, tiers)


async def public_address(
    relay: str | None,
    configured: str | None,
    lookup: Callable[[], Awaitable[str | None]],
    default_route: Callable[[], str | None],
    blocking: Blocking,
) -> str | None:
    """The public IPv4: the relay's, the configured one, the lookups', the default route's."""
    if relay:
        return relay
    if configured:
        return configured
    return await lookup() or await blocking.quick(default_route)


async def ssh_bundle(ensure: Callable[[], T], blocking: Blocking) -> T | str:
    """The SSH bundle, or why the host cannot make one (instances then have no SSH)."""
    try:
        return await blocking.slow(ensure)
    except (AgentError, OSError) as e:
        error = e.message if isinstance(e, AgentError) else str(e)
        log.error("no SSH for instances: the SSH bundle cannot be made", extra={"error": error})
        return f"the agent's SSH is not available on this host: {error}"


class Gate(Protocol):
    def setup(self) -> list[int]: ...


async def port_gate(gate: Gate | None, blocking: Blocking) -> bool:
    """Whether the SSH port gate (`domain.port_gate`) is in place; stale gates removed."""
    if gate is None:
        return False
    try:
        stale = await blocking.quick(gate.setup)
    except AgentError as e:
        log.warning("ssh ports are not gated", extra={"error": e.message})
        return False
    if stale:
        log.info("ssh port gates left by an earlier run removed", extra={"ports": stale})
    return True


async def cdi_gpus(
    engine: Daemon,
    gpus: Callable[[], Awaitable[Sequence[str]]],
    spec_texts: Callable[[list[str]], Sequence[str]],
    blocking: Blocking,
) -> bool:
    """Whether the container tier's GPUs go in by CDI name (decided once, at start)."""
    try:
        info = await engine.info()
        uuids = await gpus()
    except AgentError:
        return False
    if not uuids:
        return False
    dirs = [str(d) for d in info.get("CDISpecDirs") or ()]
    texts = await blocking.quick(spec_texts, dirs)
    why = cdi_refusal(str(info.get("ServerVersion") or ""), dirs, texts, uuids)
    log.info("GPU injection", extra={"cdi": why is None, "why_not": why})
    return why is None
