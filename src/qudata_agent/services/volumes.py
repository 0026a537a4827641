"""The volume service: renters' volumes on this host (CONTRACT.md section 7).

Owns the use cases on volumes: create (empty, or a copy of another), list,
get, delete; the check of a create order's `volumes` map (each volume
known, whole and free, mounted, its data directory bound into the
container); the restore at the agent's start (every volume mounted again,
before the reconciler starts the containers that use one); and what
admission and `GET /v1/host` need (the disk volumes promise and hold).

What stays true:
- the record comes before the backing and goes after it: a create cut short
  is removed at the next start, a delete cut short is finished; a volume
  being created is never listed;
- a volume whose backing cannot be mounted or is not whole is `error` with
  the reason, and no instance is given it (so never an empty directory in
  its place);
- a volume held by an instance is never deleted (the store's conditional
  update decides, in the same database as the instance's claim);
- one volume operation at a time (the create lock), so two creates never
  share the same free disk.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from qudata_agent.blocking import Blocking
from qudata_agent.domain.container_spec import Mount
from qudata_agent.domain.volumes import (
    GIB,
    BackingError,
    Mechanism,
    State,
    Volume,
    admit_size,
    promised_bytes,
)
from qudata_agent.errors import Conflict, InvalidRequest, NotFound

log = logging.getLogger(__name__)


class Backing(Protocol):
    """One mechanism's adapter (`adapters.volume_fs`)."""

    def create(self, volume: Volume) -> None: ...

    def attach(self, volume: Volume, fresh: bool = False) -> Path: ...

    def remove(self, volume: Volume) -> None: ...

    def used_bytes(self, volume: Volume) -> int | None: ...

    def disk_bytes(self, volume: Volume) -> int: ...

    def data_dir(self, volume: Volume) -> Path: ...


CopyTree = Callable[[Path, Path], None]  # source directory -> target directory


class VolumeStore(Protocol):
    def insert_volume(self, volume: Volume) -> Volume: ...

    def set_volume_state(self, volume_id: str, state: State, reason: str | None = None) -> None: ...

    def start_volume_delete(self, volume_id: str) -> bool: ...

    def delete_volume(self, volume_id: str) -> None: ...

    def get_volume(self, volume_id: str) -> Volume | None: ...

    def list_volumes(self) -> list[Volume]: ...


@dataclass(frozen=True)
class VolumeView:
    volume: Volume
    used_bytes: int | None  # None: not measurable now (not mounted, damaged)


@dataclass(frozen=True)
class VolumeTotals:
    """`GET /v1/host`'s volumes: how many, and the disk they are given."""

    count: int
    size_bytes: int
    disk_bytes: int  # of that, what their backings take on the disk now


class VolumeService:
    def __init__(
        self,
        *,
        store: VolumeStore,
        blocking: Blocking,
        backings: Mapping[Mechanism, Backing],
        mechanism: Mechanism,
        free_bytes: Callable[[], int | None],
        copy_tree: CopyTree,
        promised_elsewhere: Callable[[], Awaitable[int]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._blocking = blocking
        self._backings = backings
        self.mechanism = mechanism
        self._free_bytes = free_bytes  # of the volume root's filesystem
        self._elsewhere = promised_elsewhere  # the instances' storage_gb not yet written
        self._clock = clock
        self._copy_tree = copy_tree
        self._lock = asyncio.Lock()

    def _backing(self, volume: Volume) -> Backing:
        return self._backings[volume.mechanism]

    # -- reading --------------------------------------------------------------

    def _listed(self) -> list[Volume]:
        return [v for v in self._store.list_volumes() if v.state in (State.READY, State.ERROR)]

    def _view(self, volume: Volume) -> VolumeView:
        used = None if volume.state is State.ERROR else self._backing(volume).used_bytes(volume)
        return VolumeView(volume, used)

    def views_now(self) -> list[VolumeView]:
        """Every volume with its use (blocking: for the metrics' scrape)."""
        return [self._view(v) for v in self._listed()]

    async def all(self) -> list[VolumeView]:
        return await self._blocking.quick(self.views_now)

    async def get(self, volume_id: str) -> VolumeView:
        volume = await self._blocking.quick(self._store.get_volume, volume_id)
        if volume is None or volume.state not in (State.READY, State.ERROR):
            raise NotFound(f"no volume {volume_id}")
        return await self._blocking.quick(self._view, volume)

    def _promised_now(self) -> int:
        volumes = self._store.list_volumes()
        used = {v.id: self._backing(v).disk_bytes(v) for v in volumes}
        return promised_bytes(volumes, used)

    async def promised(self) -> int:
        """Disk promised to volumes and not yet written (counts in instance admission)."""
        return await self._blocking.quick(self._promised_now)

    def promised_sync(self) -> int:
        return self._promised_now()

    def _totals(self) -> VolumeTotals:
        volumes = self._listed()
        return VolumeTotals(
            count=len(volumes),
            size_bytes=sum(v.size_bytes for v in volumes),
            disk_bytes=sum(self._backing(v).disk_bytes(v) for v in volumes),
        )

    async def totals(self) -> VolumeTotals:
        return await self._blocking.quick(self._totals)

    # -- create and delete -----------------------------------------------------

    async def create(self, size_gb: float | None, source_id: str | None = None) -> VolumeView:
        async with self._lock:
            source = None if source_id is None else await self._source(source_id)
            if size_gb is None:
                if source is None:
                    raise InvalidRequest("field 'size_gb': required (unless 'from' is given)")
                size_bytes = source.size_bytes
            else:
                size_bytes = int(size_gb * GIB)
            elsewhere = 0 if self._elsewhere is None else await self._elsewhere()
            promised = await self.promised() + elsewhere
            admit_size(size_bytes, await self._blocking.quick(self._free_bytes), promised)
            volume = Volume(
                id=str(uuid.uuid4()),
                size_bytes=size_bytes,
                mechanism=self.mechanism,
                state=State.CREATING,
                created_at=self._clock(),
            )
            volume = await self._blocking.quick(self._store.insert_volume, volume)
            try:
                await self._blocking.slow(self._make, volume, source)
            except BaseException:
                await self._blocking.slow(self._discard, volume)
                raise
            ready = replace(volume, state=State.READY)
        log.info(
            "volume created",
            extra={"volume_id": volume.id, "size_bytes": size_bytes, "from": source_id},
        )
        return await self._blocking.quick(self._view, ready)

    async def _source(self, source_id: str) -> Volume:
        source = await self._blocking.quick(self._store.get_volume, source_id)
        if source is None or source.state not in (State.READY, State.ERROR):
            raise NotFound(f"no volume {source_id} to copy from")
        if source.state is State.ERROR:
            raise Conflict(f"volume {source_id} is damaged: {source.reason}")
        return source

    def _make(self, volume: Volume, source: Volume | None) -> None:
        backing = self._backing(volume)
        try:
            backing.create(volume)
            if source is not None:
                # The copy reads the source as it is now: files being written meanwhile
                # may come over half-written (the renter stops writers for a clean copy).
                self._copy_tree(self._attach(source), backing.data_dir(volume))
        except BackingError as e:
            raise Conflict(f"the volume cannot be made: {e}") from e
        self._store.set_volume_state(volume.id, State.READY)

    def _discard(self, volume: Volume) -> None:
        try:
            self._backing(volume).remove(volume)
        except BackingError as e:
            log.warning(
                "a failed volume's backing is left", extra={"volume_id": volume.id, "error": str(e)}
            )
            self._store.set_volume_state(volume.id, State.DELETING, str(e))
            return
        self._store.delete_volume(volume.id)

    async def delete(self, volume_id: str) -> Volume:
        async with self._lock:
            volume = await self._blocking.quick(self._store.get_volume, volume_id)
            if volume is None or volume.state is State.CREATING:
                raise NotFound(f"no volume {volume_id}")
            if not await self._blocking.quick(self._store.start_volume_delete, volume_id):
                fresh = await self._blocking.quick(self._store.get_volume, volume_id)
                holder = None if fresh is None else fresh.instance_id
                raise Conflict(
                    f"volume {volume_id} is in use by instance {holder}: delete that first"
                )
            try:
                await self._blocking.slow(self._backing(volume).remove, volume)
            except BackingError as e:
                raise Conflict(f"volume {volume_id} cannot be removed: {e}") from e
            await self._blocking.quick(self._store.delete_volume, volume_id)
        log.info("volume deleted", extra={"volume_id": volume_id})
        return volume

    # -- instances ---------------------------------------------------------------

    def _attach(self, volume: Volume) -> Path:
        """Mounted and whole: its data directory; a damaged one is recorded `error` (Conflict)."""
        try:
            data = self._backing(volume).attach(volume)
        except BackingError as e:
            reason = f"its backing is damaged: {e}"
            log.error("volume damaged", extra={"volume_id": volume.id, "reason": reason})
            self._store.set_volume_state(volume.id, State.ERROR, reason)
            raise Conflict(f"volume {volume.id} is damaged: {reason}") from e
        if volume.state is State.ERROR:
            self._store.set_volume_state(volume.id, State.READY)
        return data

    def _bind(self, mounts: Mapping[str, str]) -> tuple[Mount, ...]:
        bound: list[Mount] = []
        for volume_id, path in mounts.items():
            volume = self._store.get_volume(volume_id)
            if volume is None or volume.state in (State.CREATING, State.DELETING):
                raise NotFound(f"no volume {volume_id}")
            volume.check_attachable()
            bound.append(Mount(source=str(self._attach(volume)), target=path, read_only=False))
        return tuple(bound)

    async def bind(self, mounts: Mapping[str, str]) -> tuple[Mount, ...]:
        """The bind mounts of an order's volumes: each known (404), free and whole (409).

        The store takes them for the instance in the transaction that records it.
        """
        if not mounts:
            return ()
        return await self._blocking.slow(self._bind, mounts)

    # -- restore ------------------------------------------------------------------

    def _restore_one(self, volume: Volume) -> None:
        if volume.state in (State.CREATING, State.DELETING):
            log.info("finishing an interrupted volume change", extra={"volume_id": volume.id})
            self._discard(volume)
            return
        try:
            self._attach(volume)
        except Conflict:
            return  # recorded as error, with the reason

    def _restore(self) -> None:
        for volume in self._store.list_volumes():
            try:
                self._restore_one(volume)
            except Exception:
                log.exception("volume restore failed", extra={"volume_id": volume.id})

    async def restore(self) -> None:
        """At start: every volume mounted again (before instances that use one start)."""
        async with self._lock:
            await self._blocking.slow(self._restore)
