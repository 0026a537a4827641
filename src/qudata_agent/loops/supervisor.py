"""The supervisor: owner of every long-running background task.

What stays true: a loop is started only through `start`, so `stop` reaches all
of them; `stop` cancels and awaits each (bounded by a timeout) and is safe to
call twice; a loop that dies of an exception is logged with its name, counted
(`on_death`, e.g. into /metrics) and started again after a backoff that grows
while it keeps dying (and resets once it has run for a while); it never takes
the agent down with it. A loop that returns normally is done and is not
restarted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from qudata_agent.domain.backoff import Backoff

log = logging.getLogger(__name__)

LoopFactory = Callable[[], Coroutine[Any, Any, None]]
HEALTHY_AFTER_S = 60.0  # a loop that ran this long before dying starts its backoff afresh


class Supervisor:
    def __init__(
        self,
        on_death: Callable[[str], None] = lambda _name: None,
        backoff_base_s: float = 1.0,
        backoff_cap_s: float = 60.0,
    ) -> None:
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stopping = False
        self._on_death = on_death
        self._base_s = backoff_base_s
        self._cap_s = backoff_cap_s

    def start(self, name: str, make: LoopFactory) -> None:
        """Runs `make()` as the loop `name`, again after each death, until `stop`."""
        if self._stopping:
            raise RuntimeError(f"supervisor is stopping; {name} not started")
        if name in self._tasks and not self._tasks[name].done():
            raise RuntimeError(f"loop {name} is already running")
        self._tasks[name] = asyncio.create_task(self._keep(name, make), name=name)

    async def _keep(self, name: str, make: LoopFactory) -> None:
        backoff = Backoff(base_s=self._base_s, cap_s=self._cap_s)
        while True:
            began = time.monotonic()
            try:
                await make()
                return
            except asyncio.CancelledError:
                raise
            except Exception as error:
                if time.monotonic() - began >= HEALTHY_AFTER_S:
                    backoff.reset()
                delay = backoff.next_delay()
                log.error(
                    "background loop died; restarting it",
                    exc_info=error,
                    extra={"loop": name, "restart_in_s": round(delay, 2)},
                )
                self._on_death(name)
            await asyncio.sleep(delay)

    def running(self) -> list[str]:
        return sorted(name for name, task in self._tasks.items() if not task.done())

    async def stop(self, timeout_s: float = 5.0) -> None:
        self._stopping = True
        tasks = [task for task in self._tasks.values() if not task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout_s)
            for task in pending:
                log.warning("loop did not stop in time", extra={"loop": task.get_name()})
