"""The image-pull coordinator: one pull per image and credentials, however many ask, with progress.

What stays true: while a pull of an image runs, a second request for the same
image with the same credentials waits on that pull instead of starting
another; a request with other credentials (or none) makes its own pull, so
the registry judges each set of credentials itself and a wrong one is never
carried along by a right one; its progress (bytes and
layers, as Docker reports them) can be read at any time without touching
Docker; a finished or failed pull leaves no entry behind, so the next request
starts afresh. The pull itself runs in the slow thread pool and is bounded by
the engine's inactivity deadline.

The image's size is weighed while it comes: Docker's API tells no image size
before a pull (a registry check returns the manifest's digest and size only),
but the pull reports each layer's compressed size as its download starts. As
soon as the compressed layers known so far exceed the free space Docker's
disk had when the pull began (a lower bound of what the pull needs: layers
are stored unpacked), the pull is cut (its connection closed, so Docker stops
it) and fails with `ImageTooLarge`, naming both figures.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from qudata_agent.blocking import Blocking
from qudata_agent.domain.pull_progress import PullProgress
from qudata_agent.domain.registry_credentials import RegistryCredentials
from qudata_agent.errors import Conflict
from qudata_agent.services.engine import Images

log = logging.getLogger(__name__)


GIB = 1024**3


def _size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB // 10 else f"{n / 1024**2:.1f} MiB"


class ImageTooLarge(Conflict):
    """The layers of the image being pulled cannot fit in the free space of Docker's disk."""


class PullCoordinator:
    def __init__(
        self,
        engine: Images,
        blocking: Blocking,
        inactivity_s: float,
        free_bytes: Callable[[], int | None] | None = None,  # Docker's disk; None: not weighed
    ) -> None:
        self._free_bytes = free_bytes
        self._engine = engine
        self._blocking = blocking
        self._inactivity_s = inactivity_s
        # Keyed by (ref, credentials): the credentials object is hashed in memory only.
        self._pulls: dict[tuple[str, RegistryCredentials | None], asyncio.Task[None]] = {}
        self._progress: dict[str, PullProgress] = {}

    def progress(self, ref: str) -> PullProgress | None:
        """The latest progress report of a running pull of `ref`, if any."""
        return self._progress.get(ref)

    def pulling(self) -> frozenset[str]:
        """The references with a pull in flight."""
        return frozenset(ref for ref, _ in self._pulls)

    async def ensure(self, ref: str, auth: RegistryCredentials | None) -> None:
        """Returns once `ref` is present locally; raises the engine's error if not."""
        key = (ref, auth)
        task = self._pulls.get(key)
        if task is None:
            task = asyncio.create_task(self._pull(ref, auth), name=f"pull {ref}")
            self._pulls[key] = task
            task.add_done_callback(lambda t: self._forget(key, t))
        # A waiter that is cancelled (its instance deleted) must not cancel the
        # pull that others may share.
        await asyncio.shield(task)

    def _forget(
        self, key: tuple[str, RegistryCredentials | None], task: asyncio.Task[None]
    ) -> None:
        self._pulls.pop(key, None)
        if key[0] not in self.pulling():
            self._progress.pop(key[0], None)
        if not task.cancelled():
            task.exception()  # retrieved here; every waiter gets it through the shield

    async def _pull(self, ref: str, auth: RegistryCredentials | None) -> None:
        free = None
        if self._free_bytes is not None:
            free = await self._blocking.quick(self._free_bytes)

        def on_progress(report: PullProgress) -> None:
            self._progress[ref] = report  # called from the pulling thread
            if free is not None and report.bytes_total > free:
                raise ImageTooLarge(
                    f"image {ref} does not fit: its layers are at least"
                    f" {_size(report.bytes_total)} compressed, and Docker's disk has"
                    f" {_size(free)} free"
                )

        log.info("pulling image", extra={"image": ref})
        await self._engine.pull(ref, auth, on_progress, self._inactivity_s)
        log.info("image pulled", extra={"image": ref})

    async def close(self) -> None:
        for task in list(self._pulls.values()):
            task.cancel()
        if self._pulls:
            await asyncio.wait(list(self._pulls.values()), timeout=1)
