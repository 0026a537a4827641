"""The systemd watchdog: a keep-alive sent from the event loop itself.

What stays true: the ping goes out from a task of the agent's event loop, so
a loop that is blocked or wedged stops pinging and systemd restarts the agent
after WatchdogSec; the ping interval is half the watchdog's timeout, as
systemd recommends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


def ping_interval_s(watchdog_usec: int) -> float:
    return max(watchdog_usec / 2 / 1_000_000, 0.05)


async def watchdog_loop(ping: Callable[[], object], interval_s: float) -> None:
    while True:
        ping()
        await asyncio.sleep(interval_s)
