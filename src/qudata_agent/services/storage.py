"""The tenant's writable disk at run time: detect the host's support, admit, watch.

Owns: finding out whether this host's Docker can cap a container's writable
layer (`QuotaSupport`: logged at start, checked again on every watch pass,
logged again when it changed); the admission of a create's `storage_gb`
(the policy and the free space of Docker's data root decide, through
`domain.storage.admit`); the record of what each instance asked for (or got
by default); and the watch of what no cap holds: layers that are not capped,
and the anonymous volumes Docker makes for an image's VOLUME paths (outside
any layer cap), measured with their layer every interval, a warning logged
when an instance passes its size and a note when it is back under.

What stays true:
- a request is enforced, watched, or refused; never silently dropped;
- what an instance asked for is kept in the store (a row per instance, pruned
  of instances that no longer exist whenever a new one is recorded), so the
  answer survives an agent restart;
- the layer is measured only where nothing caps it or where VOLUME paths
  lie outside the cap (Docker walks the layer to count it; the volumes are
  walked with a bound in time and entries), on the slow pool, once per
  interval, never from a request.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from qudata_agent.blocking import Blocking
from qudata_agent.domain.instance import Instance
from qudata_agent.domain.storage import (
    GIB,
    QuotaSupport,
    StorageInfo,
    StoragePolicy,
    StorageRequest,
    StorageUsage,
    admit,
    quota_support,
    usage,
)
from qudata_agent.errors import AgentError, NotFound
from qudata_agent.services.engine import Containers

log = logging.getLogger(__name__)

MountOptions = Callable[[str], frozenset[str] | None]  # data root -> its mount options
FreeBytes = Callable[[str], int | None]  # path -> free bytes on its filesystem
TreeBytes = Callable[[str], int]  # host directory -> space its files take (a bounded walk)
# Docker's storage driver and data root: the blocking engine's read (`storage_info`),
# called from worker threads (an admission detects in one when nothing is known yet).
StorageInfoRead = Callable[[], StorageInfo]


class StorageStore(Protocol):
    def storage_requests(self) -> dict[str, StorageRequest]: ...

    def record_storage_request(self, instance_id: str, request: StorageRequest) -> None: ...


def detect_quota_support(
    storage_info: StorageInfoRead, mount_options: MountOptions
) -> QuotaSupport:
    """Whether Docker can cap a container's writable layer here (blocking; for `doctor` too).

    `storage_info` is the Docker adapter's, `mount_options` is
    `adapters.host.mount_options`. Raises `Unavailable` when Docker does not answer.
    """
    info = storage_info()
    return quota_support(
        info.driver, info.backing_filesystem, mount_options(info.data_root), info.data_root
    )


class StorageGuard:
    def __init__(
        self,
        engine: Containers,
        store: StorageStore,
        blocking: Blocking,
        *,
        storage_info: StorageInfoRead,
        policy: StoragePolicy,
        mount_options: MountOptions,
        free_bytes: FreeBytes,
        tree_bytes: TreeBytes | None = None,  # None: VOLUME paths are not counted
    ) -> None:
        self._tree_bytes = tree_bytes
        self._engine = engine
        self._storage_info = storage_info
        self._store = store
        self._blocking = blocking
        self._policy = policy
        self._mount_options = mount_options
        self._free_bytes = free_bytes
        self._lock = threading.Lock()  # admit runs in worker threads
        self._support: QuotaSupport | None = None
        self._used: dict[str, int] = {}  # instance id -> its layer's size at the last pass
        self._over: set[str] = set()  # instances whose layer was over its size
        self._missed: set[str] = set()  # instances whose last measure failed (logged once)

    @property
    def policy(self) -> StoragePolicy:
        return self._policy

    # -- what the host can do -------------------------------------------------

    def known_data_root(self) -> str | None:
        """Docker's data root as last detected (None before the first detection); no I/O."""
        with self._lock:
            return self._support.data_root if self._support is not None else None

    def support(self) -> QuotaSupport:
        """The host's quota support, detected once (blocking; raises Unavailable)."""
        with self._lock:
            known = self._support
        return known if known is not None else self.redetect()

    def redetect(self) -> QuotaSupport:
        """Detects again; logs the result when it is the first or a changed one (blocking)."""
        support = detect_quota_support(self._storage_info, self._mount_options)
        with self._lock:
            changed, self._support = support != self._support, support
        if changed:
            self._announce(support)
        return support

    async def detect(self) -> None:
        """Detects again, off the event loop (logs a first or changed result)."""
        await self._blocking.quick(self.redetect)

    def _announce(self, support: QuotaSupport) -> None:
        facts = {
            "driver": support.driver,
            "backing_filesystem": support.backing_filesystem,
            "data_root": support.data_root,
            "how": support.how,
        }
        if support.enforceable:
            log.info("storage_gb is enforced as a container size limit", extra=facts)
            return
        then = (
            "creates that ask for storage_gb are refused"
            if self._policy is StoragePolicy.REFUSE
            else "creates that ask for storage_gb are accepted; the layer is watched"
        )
        log.warning(
            f"storage_gb cannot be enforced on this host; {then}",
            extra={**facts, "fix": support.fix, "policy": self._policy.value},
        )

    # -- create ---------------------------------------------------------------

    def admit(self, instance_id: str, storage_gb: float, asked: bool = True) -> int | None:
        """The size limit for the new instance's container (None: watched, not capped).

        Blocking (runs where the instance is placed). Raises Conflict when the
        request cannot be met (see `domain.storage.admit`); records it otherwise.
        `asked` False: the host's default for an order that named no size.
        """
        support = self.support()
        free = self._free_bytes(support.data_root) if support.data_root else None
        limit = admit(storage_gb, support, self._policy, free, asked)
        request = StorageRequest(int(storage_gb * GIB), limit is not None, default=not asked)
        self._store.record_storage_request(instance_id, request)
        return limit

    def _requests(self) -> dict[str, StorageRequest]:
        return self._store.storage_requests()

    # -- read and watch -------------------------------------------------------

    async def views(self, instances: Sequence[Instance]) -> dict[str, StorageUsage]:
        """The storage part of each instance's answer (one read of the store), by id;
        an instance that asked for none is not in it."""
        requests = await self._blocking.quick(self._requests)
        return {
            i.id: usage(requests[i.id], self._used.get(i.id)) for i in instances if i.id in requests
        }

    async def check_all(self, instances: Callable[[], Awaitable[Sequence[Instance]]]) -> None:
        """One watch pass over every instance there is now (the storage loop's pass)."""
        await self.check(await instances())

    async def check(self, instances: Sequence[Instance]) -> None:
        """One watch pass: support detected again, every uncapped layer measured.

        An image's VOLUME paths are anonymous volumes outside the layer and
        outside any cap on it: they are measured too, capped layer or not,
        and counted with the layer against the instance's size.
        """
        await self.detect()
        requests = await self._blocking.quick(self._requests)
        used: dict[str, int] = {}
        for instance in instances:
            request = requests.get(instance.id)
            if instance.container_id is None or request is None:
                continue
            try:
                measured = await self._measure(instance.container_id, request)
            except NotFound:
                continue  # removed a moment ago; the reconciler sees it too
            except AgentError as e:  # this layer alone (a walk too long): the others go on
                self._unmeasured(instance.id, e, used)
                continue
            if measured is not None:
                used[instance.id] = measured
                self._missed.discard(instance.id)
                self._judge(instance.id, request, measured)
        self._used = used
        self._over &= set(used)

    async def _measure(self, container_id: str, request: StorageRequest) -> int | None:
        """The layer and the VOLUME paths together; None where nothing needs measuring."""
        volumes: tuple[str, ...] = ()
        if self._tree_bytes is not None:
            state = await self._engine.inspect(container_id)
            volumes = state.anonymous_volumes
        if request.enforced and not volumes:
            return None  # the cap holds the layer, and nothing lies outside it
        total = await self._engine.writable_layer_bytes(container_id)
        for path in volumes:
            assert self._tree_bytes is not None
            total += await self._blocking.slow(self._tree_bytes, path)
        return total

    def _unmeasured(self, instance_id: str, error: AgentError, used: dict[str, int]) -> None:
        """Keeps the last figure of a layer that could not be measured; logs the first miss."""
        if instance_id in self._used:
            used[instance_id] = self._used[instance_id]
        if instance_id not in self._missed:
            self._missed.add(instance_id)
            log.warning(
                "instance disk use not measured",
                extra={"instance_id": instance_id, "error": error.message},
            )

    def _judge(self, instance_id: str, request: StorageRequest, used: int) -> None:
        facts = {
            "instance_id": instance_id,
            "used_gb": round(used / GIB, 3),
            "requested_gb": round(request.requested_bytes / GIB, 3),
        }
        if used > request.requested_bytes and instance_id not in self._over:
            self._over.add(instance_id)
            log.warning("instance disk use is over its storage_gb", extra=facts)
        elif used <= request.requested_bytes and instance_id in self._over:
            self._over.discard(instance_id)
            log.info("instance disk use is back within its storage_gb", extra=facts)
