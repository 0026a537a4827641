"""Retrying an async step with backoff: the one helper for "until it works".

What stays true: the first failure of a streak is logged (as a warning), a
success after failures is logged once; only `AgentError`s are retried
(anything else is a bug and propagates); with `attempts` the caller gets
False once they are used up, else the step is tried until it succeeds or
the caller is cancelled.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from qudata_agent.domain.backoff import Backoff
from qudata_agent.errors import AgentError

log = logging.getLogger(__name__)


async def until_done(
    step: Callable[[], Awaitable[object]],
    what: str,
    *,
    base_s: float = 0.5,
    cap_s: float = 15.0,
    attempts: int | None = None,
) -> bool:
    """Runs `step` until it succeeds (True) or `attempts` failures were had (False)."""
    backoff = Backoff(base_s=base_s, cap_s=cap_s)
    failures = 0
    while True:
        try:
            await step()
        except AgentError as e:
            failures += 1
            if failures == 1:
                log.warning("step failed; retrying", extra={"step": what, "error": e.message})
            if attempts is not None and failures >= attempts:
                return False
            await asyncio.sleep(backoff.next_delay())
            continue
        if failures:
            log.info("succeeded after retries", extra={"step": what, "failures": failures})
        return True
