"""The Docker event loop: container events of this agent's containers, as they happen.

Reads Docker's event stream in windows of a few seconds (`since` the end of
the last window, `until` a little ahead), each window one blocking call in
the slow pool. That keeps every event (windows join without gaps), lets a
stop of the agent finish within one window without having to interrupt a
blocked socket read, and reconnects by itself after dockerd restarts.

What stays true: each event reaches `on_event` in order, on the event loop;
a handler that fails is logged and the next event is handled (a handler's
error is never taken for a lost stream); after a gap (Docker down),
`on_resume` runs once so that what happened meanwhile is caught by a full
sync; failures are logged once per streak.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Protocol

from qudata_agent.blocking import Blocking
from qudata_agent.domain.backoff import Backoff
from qudata_agent.errors import AgentError

log = logging.getLogger(__name__)

WINDOW_S = 2.0


class EventStream(Protocol):
    def __iter__(self) -> Iterator[tuple[str, str]]: ...

    def close(self) -> None: ...


class EventSource(Protocol):
    def events(self, agent_id: str, since: float, until: float) -> EventStream: ...


async def docker_events_loop(
    engine: EventSource,
    agent_id: str,
    on_event: Callable[[str], Awaitable[None]],
    on_resume: Callable[[], Awaitable[None]],
    blocking: Blocking,
    *,
    window_s: float = WINDOW_S,
    clock: Callable[[], float] = time.time,
) -> None:
    loop = asyncio.get_running_loop()
    # Docker is a local socket: a retry costs nothing, and every second spent
    # waiting after dockerd is back is a second of stale statuses.
    backoff = Backoff(base_s=0.5, cap_s=2)
    since = clock()
    failing = False
    while True:
        until = max(clock(), since) + window_s
        queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

        def read_window(
            since: float = since,
            until: float = until,
            queue: asyncio.Queue[tuple[str, str]] = queue,
        ) -> None:
            with contextlib.closing(engine.events(agent_id, since, until)) as stream:
                for item in stream:
                    loop.call_soon_threadsafe(queue.put_nowait, item)

        reader = asyncio.ensure_future(blocking.slow(read_window))
        try:
            while not (reader.done() and queue.empty()):
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    action, container_id = getter.result()
                    log.debug("docker event", extra={"action": action, "container": container_id})
                    await _handle(on_event, container_id)
                else:
                    getter.cancel()
            reader.result()
            if failing:
                log.info("Docker event stream back")
                failing = False
                backoff.reset()
                await _handle(lambda _cid: on_resume(), "")
        except AgentError as e:
            if not failing:
                log.warning("Docker event stream lost; reconnecting", extra={"error": e.message})
            failing = True
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
