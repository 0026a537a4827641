"""The GPU event loop: NVML's XID and ECC events into the health record and the log.

Polls the NVML adapter: each poll waits a short moment on the NVML thread for
events and drains what is queued (NVML keeps events between polls), so the
thread is never held for long and a stop is prompt. What stays true: with no
NVML, GPU or event support the adapter answers None and the loop only asks
again after `retry_s`, logging nothing (the inventory already said why);
application-caused XIDs are dropped by the record and only reach the debug
log; each distinct problem (GPU, kind, XID) is logged as a warning the first
time, repeats go to the debug log and the metrics' counts.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from qudata_agent.domain.gpu_health import GpuEvent, HealthRecord, is_health_problem

log = logging.getLogger(__name__)

POLL_S = 1.0
RETRY_S = 60.0
WAIT_MS = 100


class EventSource(Protocol):
    async def events_async(self, wait_ms: int = WAIT_MS) -> tuple[GpuEvent, ...] | None: ...


async def gpu_events_loop(
    source: EventSource,
    record: HealthRecord,
    *,
    poll_s: float = POLL_S,
    retry_s: float = RETRY_S,
    wait_ms: int = WAIT_MS,
) -> None:
    while True:
        try:
            events = await source.events_async(wait_ms)
        except Exception as e:  # the adapter should not raise; never let it end the loop
            log.warning("GPU events unreadable", exc_info=e)
            events = None
        if events is None:
            await asyncio.sleep(retry_s)
            continue
        for event in events:
            note(record, event)
        await asyncio.sleep(poll_s)


def note(record: HealthRecord, event: GpuEvent) -> None:
    """Records one event and logs it (a warning for the first of each problem)."""
    seen = record.add(event)
    fields = {"gpu": event.uuid, "event": event.kind, "xid": event.xid, "count": seen}
    if seen == 0:
        log.debug("application-caused XID ignored", extra=fields)
    elif seen == 1 and is_health_problem(event):
        log.warning("GPU health problem", extra=fields)
    else:
        log.debug("GPU event", extra=fields)
