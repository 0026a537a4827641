"""The read view of an instance: its record with what is live around it, for an answer.

Owns `InstanceView` and how it is put together: the pull's progress while
pulling, the container's logs when asked (and its last lines when it
finished or crashed on its own: the tenant writes those, so an answer
carries a bounded end of them, read outside the quick pool), the SSH
state, the health of its GPUs, what its `storage_gb` got, and how its
image was vouched for (private, checked with the registry, or run from the
cache). Reads only; changes nothing. A list answer reads each of the SSH
states, storage requests and image checks once for every instance, not once
per instance. The last lines of a run that ended are read from Docker once
(within `LAST_LOG_READ_S`, so an answer never waits on a Docker that is
shutting down) and kept for that run: every later answer shows them again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from qudata_agent.domain.gpu_health import GpuEvent
from qudata_agent.domain.instance import Instance, Status, Wanted
from qudata_agent.domain.isolation import Tier, notes_of, tier_of
from qudata_agent.domain.log_tail import (
    LAST_LOG_BYTES,
    LOG_ANSWER_BYTES,
    LOG_READ_TIMEOUT_S,
)
from qudata_agent.domain.netpolicy import NetworkUse
from qudata_agent.domain.pull_progress import PullProgress
from qudata_agent.domain.storage import StorageUsage
from qudata_agent.errors import NotFound
from qudata_agent.services.engine import Containers
from qudata_agent.services.images import ImageCheck, ImageService
from qudata_agent.services.ssh import SshView

LAST_LOG_LINES = 20
LAST_LOG_READ_S = 1.0  # the last lines' read: an answer waits no longer for them
LAST_LOG_RUNS_KEPT = 256  # ended runs whose last lines are kept (the oldest go first)
LOG_CUT = "[qudata: older output left out; an answer carries at most the last {} bytes]"
LOG_TIMED_OUT = "[qudata: the log was read for {} s only; newer output left out]"


class StorageView(Protocol):
    async def views(self, instances: Sequence[Instance]) -> dict[str, StorageUsage]: ...


@dataclass(frozen=True)
class InstanceView:
    """What GET /instances shows: the record plus live extras."""

    instance: Instance | None
    pull: PullProgress | None = None  # while pulling
    logs: str | None = None
    last_logs: str | None = None  # after the container exited on its own
    ssh: SshView | None = None  # status, port, reason
    gpu_health: tuple[GpuEvent, ...] = ()  # health problems of its GPUs
    storage: StorageUsage | None = None  # what storage_gb gets
    image_check: ImageCheck | None = None  # how its image was vouched for
    network: NetworkUse | None = None  # its bytes so far
    isolation: Tier | None = None  # its tier, from its spec's runtime
    isolation_notes: tuple[str, ...] = ()  # what differs in that tier


def exited_on_its_own(instance: Instance) -> bool:
    """Finished or crashed (not stopped through the API): its last lines tell why."""
    stopped = instance.status in (Status.PAUSED, Status.ERROR)
    return stopped and instance.wanted is Wanted.RUNNING and instance.container_id is not None


class InstanceViews:
    def __init__(
        self,
        *,
        engine: Containers,
        images: ImageService,
        ssh: Callable[[Sequence[Instance]], Awaitable[dict[str, SshView]]] | None = None,
        gpu_health: Callable[[Instance], Sequence[GpuEvent]] | None = None,
        storage: StorageView | None = None,
        network: Callable[[str], NetworkUse | None] | None = None,
    ) -> None:
        self._engine = engine
        self._images = images
        self._ssh = ssh
        self._gpu_health = gpu_health
        self._storage = storage
        self._network = network
        self._last: dict[tuple[str, str | None], str] = {}  # (container, run) -> last lines

    async def describe(
        self, instance: Instance | None, logs: bool = False, tail: int = 100
    ) -> InstanceView:
        if instance is None:
            return InstanceView(None)
        (view,) = await self.describe_all([instance], logs=logs, tail=tail)
        return view

    async def describe_all(
        self, instances: Sequence[Instance], logs: bool = False, tail: int = 100
    ) -> list[InstanceView]:
        """The views of `instances`, in their order, from one read of each extra."""
        ssh = await self._ssh(instances) if self._ssh is not None else {}
        storage = await self._storage.views(instances) if self._storage is not None else {}
        checks = await self._images.views([i.id for i in instances])
        return [
            await self._one(i, logs, tail, ssh.get(i.id), storage.get(i.id), checks.get(i.id))
            for i in instances
        ]

    async def _one(
        self,
        instance: Instance,
        logs: bool,
        tail: int,
        ssh: SshView | None,
        storage: StorageUsage | None,
        image_check: ImageCheck | None,
    ) -> InstanceView:
        pull = self._images.progress(instance.image) if instance.phase == "pulling" else None
        text = last = None
        if instance.container_id and (logs or exited_on_its_own(instance)):
            try:
                if logs:
                    text = await self._logs(instance.container_id, tail, LOG_ANSWER_BYTES)
                if exited_on_its_own(instance):
                    last = await self._last_lines(instance.container_id, instance.started_at)
            except NotFound:
                pass  # removed a moment ago; the event will say so
        tier = tier_of(instance.require_spec().runtime)
        return InstanceView(
            instance,
            isolation=tier,
            isolation_notes=notes_of(tier),
            pull=pull,
            logs=text,
            last_logs=last,
            ssh=ssh,
            gpu_health=tuple(self._gpu_health(instance)) if self._gpu_health is not None else (),
            storage=storage,
            image_check=image_check,
            network=self._network(instance.id) if self._network is not None else None,
        )

    async def _logs(self, container_id: str, tail: int, max_bytes: int) -> str:
        text, _ = await self._read(container_id, tail, max_bytes, LOG_READ_TIMEOUT_S)
        return text

    async def _read(
        self, container_id: str, tail: int, max_bytes: int, timeout_s: float
    ) -> tuple[str, bool]:
        """The log's end, bounded in bytes and time (the tenant writes it), with a first
        line saying so when older output was left out; and whether it was read to its end."""
        got = await self._engine.logs(container_id, tail, max_bytes, timeout_s)
        if not got.complete:
            return f"{LOG_TIMED_OUT.format(timeout_s)}\n{got.text}", False
        if got.cut:
            return f"{LOG_CUT.format(max_bytes)}\n{got.text}", True
        return got.text, True

    async def _last_lines(self, container_id: str, run: str | None) -> str:
        """The ended run's last lines: read once in full, then kept (a partial read is
        shown and read again next time)."""
        key = (container_id, run)
        kept = self._last.get(key)
        if kept is not None:
            return kept
        text, whole = await self._read(
            container_id, LAST_LOG_LINES, LAST_LOG_BYTES, LAST_LOG_READ_S
        )
        if whole:
            self._last[key] = text
            while len(self._last) > LAST_LOG_RUNS_KEPT:
                del self._last[next(iter(self._last))]
        return text
