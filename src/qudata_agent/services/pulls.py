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
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from qudata_agent.blocking import Blocking

log = logging.getLogger(__name__)


class Puller(Protocol):
    def pull(self, ref: str, auth: Any, on_progress: Any, inactivity_s: float) -> None: ...


class PullCoordinator:
    def __init__(self, engine: Puller, blocking: Blocking, inactivity_s: float) -> None:
        self._engine = engine
        self._blocking = blocking
        self._inactivity_s = inactivity_s
        # Keyed by (ref, credentials): the credentials object is hashed in memory only.
        self._pulls: dict[tuple[str, Any], asyncio.Task[None]] = {}
        self._progress: dict[str, Any] = {}

    def progress(self, ref: str) -> Any | None:
        """The latest progress report of a running pull of `ref`, if any."""
        return self._progress.get(ref)

    def pulling(self) -> frozenset[str]:
        """The references with a pull in flight."""
        return frozenset(ref for ref, _ in self._pulls)

    async def ensure(self, ref: str, auth: Any | None) -> None:
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

    def _forget(self, key: tuple[str, Any], task: asyncio.Task[None]) -> None:
        self._pulls.pop(key, None)
        if key[0] not in self.pulling():
            self._progress.pop(key[0], None)
        if not task.cancelled():
            task.exception()  # retrieved here; every waiter gets it through the shield

    async def _pull(self, ref: str, auth: Any | None) -> None:
        def on_progress(report: Any) -> None:
            self._progress[ref] = report  # called from the pulling thread

        log.info("pulling image", extra={"image": ref})
        await self._blocking.slow(self._engine.pull, ref, auth, on_progress, self._inactivity_s)
        log.info("image pulled", extra={"image": ref})

    async def close(self) -> None:
        for task in list(self._pulls.values()):
            task.cancel()
        if self._pulls:
            await asyncio.wait(list(self._pulls.values()), timeout=1)
