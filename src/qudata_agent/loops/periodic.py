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

from qudata_agent.domain.backoff import Backoff
from qudata_agent.errors import AgentError

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
    failing = False
    while True:
        due = start + n * interval_s
        await asyncio.sleep(max(0.0, due - clock()))
        try:
            await tick()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if not failing:
                log.warning("loop tick failed", exc_info=e, extra={"loop": name})
            failing = True
        else:
            if failing:
                log.info("loop recovered", extra={"loop": name})
            failing = False
        # The next grid point still ahead of now (skips the ones an overrun missed).
        n = max(n + 1, math.floor((clock() - start) / interval_s) + 1)


async def until_done(
    step: Callable[[], Awaitable[None]], what: str, *, base_s: float = 0.5, cap_s: float = 15.0
) -> None:
    """Runs `step` until it succeeds (Docker may come up after the agent), with backoff.

    The first failure is logged, and the success after a streak of them.
    """
    backoff = Backoff(base_s=base_s, cap_s=cap_s)
    failures = 0
    while True:
        try:
            await step()
            if failures:
                log.info("succeeded after retries", extra={"step": what, "failures": failures})
            return
        except AgentError as e:
            failures += 1
            if failures == 1:
                log.warning("step failed; retrying", extra={"step": what, "error": e.message})
            await asyncio.sleep(backoff.next_delay())
