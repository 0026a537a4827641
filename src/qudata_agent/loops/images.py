"""Background work on the image cache: the GC pass and the pre-pulls.

What stays true:
- the GC runs once at start, then every interval and soon after each poke
  (a delete), never overlapping itself; a failure is logged when a streak
  starts and when it ends;
- pre-pulls run one at a time, each only once no renter's image is being
  checked or pulled (a renter never waits behind a pre-pull that had not
  started), right after start and then every interval (a moved tag is
  pulled again); a failing pre-pull is logged and the next one goes on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from qudata_agent.background import Streak
from qudata_agent.errors import AgentError
from qudata_agent.loops.periodic import run_every

log = logging.getLogger(__name__)


class Collector(Protocol):
    async def collect(self) -> list[Any]: ...

    async def wait_poke(self, timeout_s: float) -> None: ...


async def image_gc_loop(cache: Collector, interval_s: float) -> None:
    streak = Streak()
    while True:
        try:
            await cache.collect()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if streak.failed():
                log.warning("image GC pass failed", exc_info=e)
        else:
            if streak.recovered():
                log.info("image GC recovered")
        await cache.wait_poke(interval_s)


async def prepull_loop(
    refs: tuple[str, ...],
    ensure: Callable[[str], Awaitable[Any]],
    renters_idle: Callable[[], Awaitable[None]],
    interval_s: float,
) -> None:
    async def tick() -> None:
        for ref in refs:
            await renters_idle()
            try:
                await ensure(ref)
            except AgentError as e:
                log.warning("pre-pull failed", extra={"image": ref, "error": e.message})
            else:
                log.info("pre-pull ready", extra={"image": ref})

    await run_every(interval_s, tick, "prepull", first_delay_s=0)
