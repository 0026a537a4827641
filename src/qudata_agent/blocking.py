"""The one bridge from blocking code (Docker SDK, NVML, sqlite3, /proc) to asyncio.

Two thread pools: `quick` for calls that answer in milliseconds (inspect, a
database write, an inventory read) and `slow` for calls that may block for
seconds or minutes (image pulls, container create, start, stop, restart,
the full container listing, log streams), so neither a long pull nor eight
container starts on a loaded host can starve the quick calls the API needs
(under a burst of creates, `GET /instances` waited behind `docker start`
when both shared one pool). The pool belongs to the call, not the caller:
every Docker call's is declared once, in the adapter's async ports
(`adapters/docker/ports.py`), so services await Docker without naming a
pool; what else blocks (the store, /proc and /sys reads, host tools) is
handed here by its owner, which picks the pool.

A call that reads what a tenant controls (a file in its container) runs
`alone`: in a thread of its own, never a pool's, one at a time per key, so
a tenant that makes it hang holds only that thread and only its own key.

What stays true: nothing blocking runs on the event
loop thread; `close()` waits for running quick calls, refuses new ones, and
leaves slow calls to be aborted by their owners.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


class StillRunning(Exception):
    """An earlier `alone` call for the same key has not ended yet (it hangs)."""


class Blocking:
    def __init__(self, quick_workers: int = 8, slow_workers: int = 16) -> None:
        self._quick = ThreadPoolExecutor(quick_workers, thread_name_prefix="quick")
        self._slow = ThreadPoolExecutor(slow_workers, thread_name_prefix="slow")
        self._alone: dict[str, Future[object]] = {}
        self._alone_lock = threading.Lock()

    async def quick(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._quick, functools.partial(fn, *args, **kwargs))

    async def slow(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._slow, functools.partial(fn, *args, **kwargs))

    async def alone(
        self, key: str, timeout_s: float, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """`fn` in a thread of its own; TimeoutError past `timeout_s` (the thread runs on).

        While an earlier call for `key` still runs, refuses at once (`StillRunning`):
        a call that hangs costs one thread per key, never more.
        """
        done: Future[T] = Future()
        with self._alone_lock:
            if key in self._alone:
                raise StillRunning(key)
            self._alone[key] = done  # type: ignore[assignment]

        def run() -> None:
            try:
                if done.set_running_or_notify_cancel():  # else cancelled before it began
                    done.set_result(fn(*args, **kwargs))
            except BaseException as e:  # handed to the awaiting side
                done.set_exception(e)
            finally:
                with self._alone_lock:
                    self._alone.pop(key, None)

        threading.Thread(target=run, name=f"alone {key}", daemon=True).start()
        return await asyncio.wait_for(asyncio.wrap_future(done), timeout_s)

    def close(self) -> None:
        self._quick.shutdown(wait=True, cancel_futures=True)
        # A pull may block for minutes; its owner aborts it (closing the Docker
        # connection) rather than shutdown waiting on it here.
        self._slow.shutdown(wait=False, cancel_futures=True)
