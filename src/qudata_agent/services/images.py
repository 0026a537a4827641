"""The image service: gets an order's image ready, and keeps private images private.

Owns `ensure` (the one call a build makes for its image: check access and the
tag's digest with the registry when needed, pull when the image is missing
or its tag moved), the record of private images and of the agent's cache
(through the store), and what `GET /instances` shows about the check.

What stays true:
- an image pulled with credentials is recorded private (repository and
  digest, and its image ID, so no other spelling of a reference reaches it;
  never the credentials); a later order for it runs only once the
  registry has confirmed access with that order's credentials, and a
  registry that cannot be asked refuses it (fail closed);
- a public cached tag runs as it is when the registry cannot be asked, and
  the check's note says so; a digest reference is never checked again;
- a tag whose digest is unchanged costs one registry check and no pull;
- pulls are shared by image and credentials (see `PullCoordinator`);
- credentials live in memory for the call only: no log line, record or
  message made here holds a password;
- no registry check and no pull starts before the registry guard passed
  the reference's host (`services.registry_guard`): dockerd is never sent to
  loopback, private or the host's own addresses; an image used as it is
  (built or loaded here, a public digest reference) contacts nothing;
- each instance's check is recorded, so a build resumed after a restart
  (which has no credentials) uses the image it was already granted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from qudata_agent.blocking import Blocking
from qudata_agent.domain.image_access import (
    LocalImage,
    RegistryRefused,
    RegistryUnreachable,
    Step,
    after_check,
    first_step,
    repository_digests,
)
from qudata_agent.domain.image_ref import (
    ImageRef,
    familiar_ref,
    normal_repository,
    resolve_image,
)
from qudata_agent.domain.pull_progress import PullProgress
from qudata_agent.domain.registry_credentials import RegistryCredentials
from qudata_agent.errors import AgentError, Conflict
from qudata_agent.services.engine import Images
from qudata_agent.services.pulls import PullCoordinator
from qudata_agent.services.registry_guard import RegistryGuard

log = logging.getLogger(__name__)

NOTE_PINNED = "pinned by digest: used as it is, never checked again"
NOTE_LOCAL = "built or loaded on this host (not from a registry): used as it is"
NOTE_UNREACHABLE = "registry not reachable: the cached image is used as it is"


class ImageStore(Protocol):
    def mark_private(self, repository: str, digests: Any, image_id: str | None = None) -> None: ...

    def is_private(self, repository: str, digests: Any, image_id: str | None = None) -> bool: ...

    def cache_pulled(self, image_id: str, ref: str, at: float) -> None: ...

    def cache_used(self, image_id: str, at: float) -> None: ...

    def set_instance_image(
        self,
        instance_id: str,
        image_id: str,
        digest: str | None,
        checked_at: float | None,
        note: str | None,
    ) -> None: ...

    def instance_image(
        self, instance_id: str
    ) -> tuple[str, str | None, float | None, str | None] | None: ...

    def instance_images(
        self, instance_ids: Sequence[str]
    ) -> dict[str, tuple[str, str | None, float | None, str | None]]: ...


@dataclass(frozen=True)
class ImageCheck:
    """What the answer shows about an instance's image: its digest and how it was vouched for."""

    digest: str | None  # the manifest digest (None: never came from a registry)
    checked: bool  # the registry was asked for this order
    note: str | None = None


class ImageService:
    def __init__(
        self,
        engine: Images,
        store: ImageStore,
        blocking: Blocking,
        pulls: PullCoordinator,
        clock: Callable[[], float] = time.time,
        guard: RegistryGuard | None = None,  # None: any registry host (tests only)
    ) -> None:
        self._guard = guard
        self._engine = engine
        self._store = store
        self._blocking = blocking
        self._pulls = pulls
        self._clock = clock
        self._busy: Counter[str] = Counter()  # refs inside ensure (checked or pulled now)
        # Repositories with a pull under credentials in flight: private until recorded,
        # so a digest order racing the record is checked too.
        self._private_pulls: Counter[str] = Counter()
        self._renters = 0  # ensure calls for an instance (pre-pulls yield to these)
        self._idle = asyncio.Event()
        self._idle.set()

    def progress(self, ref: str) -> PullProgress | None:
        return self._pulls.progress(ref)

    def busy(self) -> frozenset[str]:
        """References being checked or pulled right now (the GC leaves them alone)."""
        refs = {ref for ref, n in self._busy.items() if n} | self._pulls.pulling()
        return frozenset(familiar_ref(ref) for ref in refs)

    async def renters_idle(self) -> None:
        """Returns once no renter's image is being checked or pulled."""
        await self._idle.wait()

    async def admit(self, ref: ImageRef) -> None:
        """Refuses (400) an order whose image needs a registry the guard forbids.

        Called before anything is recorded. An image that would be used as it
        is passes whatever its name says; a host that cannot be resolved now
        passes here and is judged again (and not contacted) by the build.
        """
        if self._guard is None or ref.registry is None:
            return
        name, repository = str(ref), normal_repository(ref.repository)
        local = await self._engine.local_image(name)
        if local is not None:
            private = await self._is_private(local, repository)
            if first_step(local, repository, ref.digest is not None, private) is Step.USE:
                return
        try:
            await self._guard.check(ref)
        except RegistryUnreachable:
            return

    async def _is_private(self, local: LocalImage, repository: str) -> bool:
        if self._private_pulls[repository] > 0:
            return True
        return await self._blocking.quick(
            self._store.is_private,
            repository,
            repository_digests(local, repository),
            local.image_id,
        )

    async def views(self, instance_ids: Sequence[str]) -> dict[str, ImageCheck]:
        """These instances' image checks (one read of the store), by instance id."""
        rows = await self._blocking.quick(self._store.instance_images, instance_ids)
        return {
            instance_id: ImageCheck(digest=digest, checked=checked_at is not None, note=note)
            for instance_id, (_image_id, digest, checked_at, note) in rows.items()
        }

    async def ensure(
        self,
        ref: str,
        auth: RegistryCredentials | None,
        instance_id: str | None = None,
        on_pull: Callable[[], Awaitable[None]] | None = None,
    ) -> ImageCheck:
        """Makes `ref` usable for this order; raises an AgentError saying why not.

        `instance_id` None: a pre-pull (no use recorded). `on_pull` is awaited
        just before a pull starts (the build shows phase `pulling`).
        """
        with self._working(ref, renter=instance_id is not None):
            if instance_id is not None:
                granted = await self._granted(ref, instance_id)
                if granted is not None:
                    return granted
            check, image = await self._decide(resolve_image(ref, None), auth, on_pull)
            now = self._clock()
            if instance_id is not None:
                await self._blocking.quick(self._store.cache_used, image.image_id, now)
                await self._blocking.quick(
                    self._store.set_instance_image,
                    instance_id,
                    image.image_id,
                    check.digest,
                    now if check.checked else None,
                    check.note,
                )
            return check

    @contextmanager
    def _working(self, ref: str, renter: bool) -> Iterator[None]:
        self._busy[ref] += 1
        if renter:
            self._renters += 1
            self._idle.clear()
        try:
            yield
        finally:
            self._busy[ref] -= 1
            if not self._busy[ref]:
                del self._busy[ref]
            if renter:
                self._renters -= 1
                if not self._renters:
                    self._idle.set()

    async def _granted(self, ref: str, instance_id: str) -> ImageCheck | None:
        """The earlier check of this instance, if its image is still the one granted."""
        row = await self._blocking.quick(self._store.instance_image, instance_id)
        if row is None:
            return None
        local = await self._engine.local_image(ref)
        if local is None or local.image_id != row[0]:
            return None
        return ImageCheck(digest=row[1], checked=row[2] is not None, note=row[3])

    async def _decide(
        self,
        ref: ImageRef,
        auth: RegistryCredentials | None,
        on_pull: Callable[[], Awaitable[None]] | None,
    ) -> tuple[ImageCheck, LocalImage]:
        name = str(ref)
        repository = normal_repository(ref.repository)
        local = await self._engine.local_image(name)
        private = local is not None and await self._is_private(local, repository)
        step = first_step(local, repository, ref.digest is not None, private)
        if step is Step.USE:
            assert local is not None
            note = NOTE_PINNED if ref.digest is not None else NOTE_LOCAL
            return ImageCheck(_digest_of(local, repository, ref), False, note), local
        if step is Step.CHECK:
            assert local is not None
            check = await self._check(name, repository, ref, local, auth, private)
            if check is not None:
                return check, local
            log.info("image tag moved in the registry; pulling", extra={"image": name})
        elif self._guard is not None:
            await self._guard.check(ref)
        pulled = await self._pull(name, repository, auth, on_pull)
        return ImageCheck(_digest_of(pulled, repository, ref), True, None), pulled

    async def _check(
        self,
        name: str,
        repository: str,
        ref: ImageRef,
        local: LocalImage,
        auth: RegistryCredentials | None,
        private: bool,
    ) -> ImageCheck | None:
        """Asks the registry; the check when the local copy may be used, None to pull."""
        try:
            if self._guard is not None:
                await self._guard.check(ref)
            # The slow pool: a registry that drops packets may hold this for seconds.
            remote = await self._engine.registry_digest(name, auth)
        except RegistryRefused as e:
            raise Conflict(f"image {name}: {e.message}") from None
        except RegistryUnreachable as e:
            if private:
                given = "no credentials" if auth is None else "credentials"
                raise Conflict(
                    f"image {name} is private (it was pulled with credentials); this order"
                    f" has {given} and access could not be confirmed with the registry:"
                    f" {e.message}"
                ) from None
            log.warning("registry not reachable; cached image used", extra={"image": name})
            return ImageCheck(_digest_of(local, repository, ref), False, NOTE_UNREACHABLE)
        if after_check(local, repository, remote) is Step.USE:
            log.info("image unchanged in the registry", extra={"image": name})
            return ImageCheck(remote, True, None)
        return None

    async def _pull(
        self,
        name: str,
        repository: str,
        auth: RegistryCredentials | None,
        on_pull: Callable[[], Awaitable[None]] | None,
    ) -> LocalImage:
        if on_pull is not None:
            await on_pull()
        if auth is not None:
            self._private_pulls[repository] += 1
        try:
            await self._pulls.ensure(name, auth)
            image = await self._engine.local_image(name)
            if image is None:
                raise AgentError(f"image {name} is not here after its pull")
            if auth is not None:
                digests = repository_digests(image, repository)
                await self._blocking.quick(
                    self._store.mark_private, repository, digests, image.image_id
                )
                log.info("private image recorded", extra={"image": name})
        finally:
            if auth is not None:
                self._private_pulls[repository] -= 1
        # Recorded as Docker lists it (what the GC compares), not as the order spelt it.
        pulled = (image.image_id, familiar_ref(name), self._clock())
        await self._blocking.quick(self._store.cache_pulled, *pulled)
        return image


def _digest_of(image: LocalImage, repository: str, ref: ImageRef) -> str | None:
    if ref.digest is not None:
        return ref.digest
    digests = sorted(repository_digests(image, repository))
    return digests[0] if len(digests) == 1 else (digests[-1] if digests else None)
