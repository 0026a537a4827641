"""The Docker event loop: container events of this agent's containers, as they happen.

Reads Docker's event stream in windows of a few seconds (`since` the end of
the last window, `until` a little ahead), each window one blocking read that
the adapter runs in its slow pool. That keeps every event (windows join
without gaps), lets a stop of the agent finish within one window without
having to interrupt a blocked socket read, and reconnects by itself after
dockerd restarts.

What stays true: each event reaches `on_event` in order, on the event loop;
a handler that fails is logged and the next event is handled (a handler's
error is never taken for a lost stream); after a gap (Docker down),
`on_resume` runs once so that what happened meanwhile is caught by a full
sync; failures are logged once per streak.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from qudata_agent.background import Streak
from qudata_agent.domain.backoff import Backoff
from qudata_agent.errors import AgentError
from qudata_agent.services.engine import Events

log = logging.getLogger(__name__)

WINDOW_S = 2.0


async def docker_events_loop(
    engine: Events,
    agent_id: str,
    on_event: Callable[[str], Awaitable[None]],
    on_resume: Callable[[], Awaitable[None]],
    *,
    window_s: float = WINDOW_S,
    clock: Callable[[], float] = time.time,
) -> None:
    # Docker is a local socket: a retry costs nothing, and every second spent
    # waiting after dockerd is back is a second of stale statuses.
    backoff = Backoff(base_s=0.5, cap_s=2)
    since = clock()
    streak = Streak()
    while True:
        until = max(clock(), since) + window_s
        try:
            async for action, container_id in engine.events(agent_id, since, until):
                log.debug("docker event", extra={"action": action, "container": container_id})
                await _handle(on_event, container_id)
            if streak.recovered():
                log.info("Docker event stream back")
                backoff.reset()
                await _handle(lambda _cid: on_resume(), "")
        except AgentError as e:
            if streak.failed():
                log.warning("Docker event stream lost; reconnecting", extra={"error": e.message})
            await asyncio.sleep(backoff.next_delay())
            continue
        since = until


async def _handle(handler: Callable[[str], Awaitable[None]], container_id: str) -> None:
    """One event's handling: its failure is its own (the sync catches up later)."""
    try:
        await handler(container_id)
    except asyncio.CancelledError:
        raise
    except Exception as e:
        log.warning("handling a Docker event failed", exc_info=e, extra={"container": container_id})
