"""The stats loop: a `/stats` report every 3 seconds on a fixed grid, and one at once on poke.

Sampling and sending are separate tasks joined by a bounded queue. What stays
true: a slow or failing control plane delays neither the next sample nor the
API; the queue never holds more than `queue_max` reports (the oldest is
dropped); an outage is logged when it starts and when it ends, not every tick;
a poke (after a lifecycle action) adds a report without moving the grid, made
by its own sampler when given one (`sample_on_poke`: the agent's reads the
network meter's last pass rather than making one beside the action).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from qudata_agent.domain.backoff import Backoff
from qudata_agent.loops.periodic import run_every
from qudata_agent.services.instance_events import InstanceEvents

log = logging.getLogger(__name__)

INTERVAL_S = 3.0


class StatsReporter:
    def __init__(
        self,
        sample: Callable[[], Awaitable[dict[str, Any]]],
        send: Callable[[dict[str, Any]], Awaitable[None]],
        retry_on: tuple[type[BaseException], ...],
        *,
        interval_s: float = INTERVAL_S,
        queue_max: int = 64,
        backoff_cap_s: float = 3.0,
        events: InstanceEvents | None = None,
        sample_on_poke: Callable[[], Awaitable[dict[str, Any]]] | None = None,
    ) -> None:
        self._sample = sample
        self._sample_on_poke = sample_on_poke or sample
        self._send = send
        self._retry_on = retry_on
        self._interval_s = interval_s
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=queue_max)
        self._poked = asyncio.Event()
        self._backoff = Backoff(base_s=0.25, cap_s=backoff_cap_s)
        self.dropped = 0
        self.sent = 0
        if events is not None:
            events.on_change(self.poke)  # a lifecycle action is reported at once

    def poke(self) -> None:
        """Asks for one report now (a lifecycle action happened)."""
        self._poked.set()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(run_every(self._interval_s, self._enqueue, "stats", first_delay_s=0))
            group.create_task(self._on_poke())
            group.create_task(self._sender())

    async def _on_poke(self) -> None:
        while True:
            await self._poked.wait()
            self._poked.clear()
            try:
                await self._enqueue(self._sample_on_poke)
            except Exception as e:  # the grid's next tick tries again
                log.debug("stats sample failed", exc_info=e)

    async def _enqueue(self, sample: Callable[[], Awaitable[dict[str, Any]]] | None = None) -> None:
        payload = await (sample or self._sample)()
        if self._queue.full():
            self._queue.get_nowait()
            self.dropped += 1
        self._queue.put_nowait(payload)

    async def _sender(self) -> None:
        failing = 0
        while True:
            payload = await self._queue.get()
            try:
                await self._send(payload)
            except self._retry_on as e:
                failing += 1
                if failing == 1:
                    log.warning("stats not delivered; will keep trying", extra={"error": str(e)})
                await asyncio.sleep(self._backoff.next_delay())
                continue
            self.sent += 1
            if failing:
                log.info(
                    "stats delivered again", extra={"failed": failing, "dropped": self.dropped}
                )
                failing = 0
                self._backoff.reset()
