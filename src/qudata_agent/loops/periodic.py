"""A periodic loop on a fixed schedule that never overlaps itself.

What stays true: ticks are planned on a fixed grid (start + n * interval), so
a slow tick delays only itself and the schedule does not drift; a tick that
overruns skips the grid points it missed instead of bunching up; an error is
logged when a failure streak starts and when it ends, not on every tick.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable

from qudata_agent.background import Streak

log = logging.getLogger(__name__)


async def run_every(
    interval_s: float,
    tick: Callable[[], Awaitable[None]],
    name: str,
    *,
    first_delay_s: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    start = clock() + (interval_s if first_delay_s is None else first_delay_s)
    n = 0
    streak = Streak()
    while True:
        due = start + n * interval_s
        await asyncio.sleep(max(0.0, due - clock()))
        try:
            await tick()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if streak.failed():
                log.warning("loop tick failed", exc_info=e, extra={"loop": name})
        else:
            if streak.recovered():
                log.info("loop recovered", extra={"loop": name})
        # The next grid point still ahead of now (skips the ones an overrun missed).
        n = max(n + 1, math.floor((clock() - start) / interval_s) + 1)
