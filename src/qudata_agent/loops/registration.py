"""The registration loop: keeps calling the registrar until the host is registered.

Starts only once the API listens (the port it reports must answer). What stays
true: an unreachable or refusing control plane is retried with capped,
jittered backoff for as long as the agent runs, never blocking the API; a
failure streak is logged once when it starts and once when it ends, not on
every try.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from qudata_agent.domain.backoff import Backoff

log = logging.getLogger(__name__)


class Registers(Protocol):
    async def register(self, port: int) -> None: ...


async def registration_loop(
    registrar: Registers,
    listening: asyncio.Future[int],
    backoff: Backoff,
    retry_on: tuple[type[BaseException], ...],
) -> None:
    port = await listening
    failures = 0
    while True:
        try:
            await registrar.register(port)
        except retry_on as e:
            failures += 1
            delay = backoff.next_delay()
            if failures == 1:
                log.warning(
                    "control plane registration failed; retrying in the background",
                    extra={"error": str(e), "retry_in_s": round(delay, 2)},
                )
            else:
                log.debug("registration retry failed", extra={"error": str(e), "try": failures})
            await asyncio.sleep(delay)
            continue
        if failures:
            log.info("control plane reachable again", extra={"failed_tries": failures})
        return
