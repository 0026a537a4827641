"""The image cache's garbage collector: removes the agent's unused images when space runs low.

Owns one pass (`collect`): read what the agent cached (the store), what
Docker has and what every container uses, ask `domain.image_gc.plan` what
to remove, and remove it. Only images the agent pulled are its to remove;
images the host's owner put there are left alone.

What stays true:
- an image any container uses (the agent's or not, running or stopped), one
  an instance record names (a build in flight), one being checked or pulled,
  and one on the pre-pull list is never removed;
- removal is never forced: the agent's own tags are removed, then the image
  by id only when no other tag is left (Docker refuses while a container
  uses it); an image still tagged by someone else stays and is forgotten;
- every removal is logged and counted (`on_removed(reason)`);
- passes never overlap (one lock), and `poke` asks for one soon (after a new run of a
  container, which may have brought an image, and after a delete).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, Protocol

from qudata_agent.blocking import Blocking
from qudata_agent.domain.image_access import LocalImage
from qudata_agent.domain.image_gc import CachedImage, Removal, Thresholds, plan
from qudata_agent.domain.image_ref import familiar_ref
from qudata_agent.errors import Conflict
from qudata_agent.services.engine import Engine
from qudata_agent.services.instance_events import InstanceEvents

log = logging.getLogger(__name__)


class CacheStore(Protocol):
    def cached_images(self) -> list[tuple[str, tuple[str, ...], float]]: ...

    def forget_cached(self, image_id: str) -> None: ...

    def list_instances(self) -> list[Any]: ...


class ImageCache:
    def __init__(
        self,
        engine: Engine,  # its images and Docker's data root
        store: CacheStore,
        blocking: Blocking,
        *,
        busy: Callable[[], frozenset[str]],
        keep: tuple[str, ...],
        thresholds: Thresholds,
        free_bytes: Callable[[str], int | None],
        on_removed: Callable[[str], None] = lambda _reason: None,
        events: InstanceEvents | None = None,
    ) -> None:
        self._engine = engine
        self._store = store
        self._blocking = blocking
        self._busy = busy
        self._keep = frozenset(familiar_ref(ref) for ref in keep)
        self._thresholds = thresholds
        self._free_bytes = free_bytes
        self._on_removed = on_removed
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        if events is not None:
            # Not after every change (a burst of creates would list the images for each
            # step): a new run may have brought an image (space taken), a removal may
            # leave one unused.
            events.on_new_run(lambda _started: self.poke())
            events.on_removed(lambda _gone: self.poke())

    def poke(self) -> None:
        """Asks for a pass soon (the loop waits on it)."""
        self._wake.set()

    async def wait_poke(self, timeout_s: float) -> None:
        """Returns when poked or after `timeout_s`, whichever is first."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout_s)
        self._wake.clear()

    async def collect(self) -> list[Removal]:
        """One pass: the removals made."""
        async with self._lock:
            return await self._collect()

    async def _collect(self) -> list[Removal]:
        q = self._blocking.quick
        local = {image.image_id: image for image in await self._engine.local_images()}
        cached = []
        for image_id, refs, last_used in await q(self._store.cached_images):
            image = local.get(image_id)
            if image is None:
                await q(self._store.forget_cached, image_id)  # removed outside the agent
                continue
            # Only the references that still name it: the old image of a moved tag
            # (pre-pulled or being pulled again) is not protected by the tag's name.
            current = tuple(r for r in refs if r in image.tags or r in image.digests)
            cached.append(CachedImage(image_id, current, image.size, last_used))
        if not cached:
            log.debug("image GC pass", extra={"cached": 0, "removed": 0})
            return []
        in_use = set(await self._engine.container_image_ids())
        in_use |= _ids_named(local.values(), [i.image for i in await q(self._store.list_instances)])
        root = await self._engine.data_root()
        free = await q(self._free_bytes, root)
        removals = plan(
            cached,
            in_use=in_use,
            pulling=self._busy(),
            keep=self._keep,
            free_bytes=free,
            thresholds=self._thresholds,
        )
        done = []
        for removal in removals:
            if await self._remove(removal, local[removal.image.image_id]):
                done.append(removal)
        log.debug(
            "image GC pass",
            extra={"cached": len(cached), "removed": len(done), "free_bytes": free},
        )
        return done

    async def _remove(self, removal: Removal, image: LocalImage) -> bool:
        q = self._blocking.quick
        cached = removal.image
        try:
            for ref in cached.refs:
                if ref in image.tags:
                    await self._engine.remove_image(ref)
            left = await self._engine.local_image(cached.image_id)
            if left is not None and not left.tags:
                await self._engine.remove_image(cached.image_id)
                left = await self._engine.local_image(cached.image_id)
        except Conflict as e:  # a container took it up meanwhile
            log.info("image in use; kept", extra={"image": cached.image_id, "why": e.message})
            return False
        await q(self._store.forget_cached, cached.image_id)
        if left is not None:
            log.info(
                "cached image untagged; kept for its other tags",
                extra={"image": cached.image_id, "tags": list(left.tags)},
            )
            return False
        log.info(
            "cached image removed",
            extra={
                "image": cached.image_id,
                "refs": list(cached.refs),
                "bytes": cached.size,
                "reason": removal.reason,
                "last_used": cached.last_used,
            },
        )
        self._on_removed(removal.reason)
        return True


def _ids_named(images: Any, refs: list[str]) -> set[str]:
    """The ids of the local images that `refs` name (by tag or by digest reference)."""
    wanted = {familiar_ref(ref) for ref in refs}
    return {
        image.image_id
        for image in images
        if wanted.intersection(image.tags) or wanted.intersection(image.digests)
    }
