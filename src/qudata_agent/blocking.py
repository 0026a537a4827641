"""The one bridge from blocking code (Docker SDK, NVML, sqlite3, /proc) to asyncio.

Two thread pools: `quick` for calls that answer in milliseconds (inspect, a
database write, an inventory read) and `slow` for calls that may block for
seconds or minutes (image pulls, container create, start, stop, restart,
the full container listing, log streams), so neither a long pull nor eight
container starts on a loaded host can starve the quick calls the API needs
(under a burst of creates, `GET /instances` waited behind `docker start`
when both shared one pool). What stays true: nothing blocking runs on the
event loop thread; `close()` waits for running quick calls, refuses new ones,
and leaves slow calls to be aborted by their owners.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


class Blocking:
    def __init__(self, quick_workers: int = 8, slow_workers: int = 16) -> None:
        self._quick = ThreadPoolExecutor(quick_workers, thread_name_prefix="quick")
        self._slow = ThreadPoolExecutor(slow_workers, thread_name_prefix="slow")

    async def quick(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._quick, functools.partial(fn, *args, **kwargs))

    async def slow(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._slow, functools.partial(fn, *args, **kwargs))

    def close(self) -> None:
        self._quick.shutdown(wait=True, cancel_futures=True)
        # A pull may block for minutes; its owner aborts it (closing the Docker
        # connection) rather than shutdown waiting on it here.
        self._slow.shutdown(wait=False, cancel_futures=True)
