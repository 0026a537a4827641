"""The recurring shapes of the agent's background work, each written once.

- `Streak` / `Streaks`: of a run of failures, the first is logged and then its
  end, not every failure (a loop that fails every 3 s for an hour logs twice).
- `Rerun` / `Reruns`: one pass at a time (per key); a poke while a pass runs
  makes exactly one more after it, however many pokes came, so a burst of
  events costs at most two passes and none is missed.
- `KeyedLocks`: one asyncio lock per key (an instance), forgotten with it.
- `both`: two independent awaits at once, each run to its end before either's
  failure is raised (a store write never lands after the failure's handling).

What stays true: a `Rerun`'s pass never overlaps itself; `close()` cancels
and awaits every pass still running, so nothing outlives its owner's stop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
A = TypeVar("A")
B = TypeVar("B")


async def both(first: Awaitable[A], second: Awaitable[B]) -> tuple[A, B]:
    """Awaits `first` and `second` at once, both to their end; then raises the first's
    failure, else the second's, else returns both results."""
    a, b = await asyncio.gather(first, second, return_exceptions=True)
    if isinstance(a, BaseException):
        raise a
    if isinstance(b, BaseException):
        raise b
    return a, b


class Streak:
    """Whether a failure starts a streak, and whether a success ends one."""

    def __init__(self) -> None:
        self.failing = False

    def failed(self) -> bool:
        """Records a failure; True when it is the first of its streak (log it)."""
        first = not self.failing
        self.failing = True
        return first

    def recovered(self) -> bool:
        """Records a success; True when it ends a streak (log the recovery)."""
        ended = self.failing
        self.failing = False
        return ended


class Streaks(Generic[K]):
    """A `Streak` per key (an instance whose figures cannot be read, say)."""

    def __init__(self) -> None:
        self._failing: set[K] = set()

    def failed(self, key: K) -> bool:
        first = key not in self._failing
        self._failing.add(key)
        return first

    def recovered(self, key: K) -> bool:
        ended = key in self._failing
        self._failing.discard(key)
        return ended

    def forget(self, key: K) -> None:
        self._failing.discard(key)


class Reruns(Generic[K]):
    """One pass per key at a time; a poke during a pass makes one more after it."""

    def __init__(self, run_pass: Callable[[K], Awaitable[None]], name: str) -> None:
        self._run_pass = run_pass
        self._name = name
        self._tasks: dict[K, asyncio.Task[None]] = {}
        self._again: set[K] = set()

    def poke(self, key: K) -> None:
        """Asks for a pass for `key`; never waits."""
        if self.running(key):
            self._again.add(key)
            return
        task = asyncio.create_task(self._passes(key), name=f"{self._name} {key}")
        task.add_done_callback(_retrieved)
        self._tasks[key] = task

    def running(self, key: K) -> bool:
        task = self._tasks.get(key)
        return task is not None and not task.done()

    async def _passes(self, key: K) -> None:
        try:
            while True:
                self._again.discard(key)
                await self._run_pass(key)
                if key not in self._again:
                    return
        finally:
            if self._tasks.get(key) is asyncio.current_task():
                del self._tasks[key]

    async def settled(self) -> None:
        """Returns once no pass runs (a pass may end by an error: it is logged, not raised)."""
        while tasks := [t for t in self._tasks.values() if not t.done()]:
            await asyncio.wait(tasks)

    async def close(self, timeout_s: float | None = None) -> None:
        tasks = [t for t in self._tasks.values() if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)


class Rerun:
    """`Reruns` with one key: one pass at a time, a poke during it makes one more."""

    def __init__(self, run_pass: Callable[[], Awaitable[None]], name: str) -> None:
        async def keyed(_key: None) -> None:
            await run_pass()

        self._reruns: Reruns[None] = Reruns(keyed, name)

    def poke(self) -> None:
        self._reruns.poke(None)

    @property
    def running(self) -> bool:
        return self._reruns.running(None)

    async def settled(self) -> None:
        await self._reruns.settled()

    async def close(self, timeout_s: float | None = None) -> None:
        await self._reruns.close(timeout_s)


class KeyedLocks(Generic[K]):
    """One asyncio lock per key; `forget` drops a key's lock once the key is gone."""

    def __init__(self) -> None:
        self._locks: dict[K, asyncio.Lock] = {}

    def __call__(self, key: K) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    def forget(self, key: K) -> None:
        self._locks.pop(key, None)


def _retrieved(task: asyncio.Task[None]) -> None:
    """A pass that failed is logged here, not left as 'exception never retrieved'."""
    if not task.cancelled() and task.exception() is not None:
        log.error(
            "background pass failed", exc_info=task.exception(), extra={"task": task.get_name()}
        )
