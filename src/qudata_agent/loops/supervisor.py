"""The supervisor: owner of every long-running background task.

What stays true: a loop is started only through `start`, so `stop` reaches all
of them; `stop` cancels and awaits each (bounded by a timeout) and is safe to
call twice; a loop that dies of an exception is logged once with its name, and
does not take the agent down with it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)


class Supervisor:
    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stopping = False

    def start(self, name: str, coro: Coroutine[Any, Any, None]) -> None:
        if self._stopping:
            coro.close()
            raise RuntimeError(f"supervisor is stopping; {name} not started")
        if name in self._tasks and not self._tasks[name].done():
            coro.close()
            raise RuntimeError(f"loop {name} is already running")
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._on_done)
        self._tasks[name] = task

    def running(self) -> list[str]:
        return sorted(name for name, task in self._tasks.items() if not task.done())

    def _on_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            log.error(
                "background loop died",
                exc_info=(type(error), error, error.__traceback__),
                extra={"loop": task.get_name()},
            )

    async def stop(self, timeout_s: float = 5.0) -> None:
        self._stopping = True
        tasks = [task for task in self._tasks.values() if not task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout_s)
            for task in pending:
                log.warning("loop did not stop in time", extra={"loop": task.get_name()})
