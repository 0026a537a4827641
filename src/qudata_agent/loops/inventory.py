"""The inventory loop: re-reads the host inventory every few minutes, resends it when it changed.

A GPU that disappears, a module added, a new link speed: the control plane
prices and schedules on these figures, so they go out again (`/init/host`)
whenever the inventory's digest differs from the one last accepted. What
stays true: the loop starts only after registration (the digest is current
then), runs on a fixed schedule without overlapping itself, and a failed send
is logged once per failure streak and tried again on the next tick (the
stored digest is not updated until the control plane accepted the payload).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from qudata_agent.loops.periodic import run_every

INTERVAL_S = 300.0


async def inventory_loop(
    refresh: Callable[[], Awaitable[bool]], interval_s: float = INTERVAL_S
) -> None:
    """Calls `refresh` (the registrar's compare-and-send) every `interval_s` seconds."""

    async def tick() -> None:
        await refresh()

    await run_every(interval_s, tick, "inventory")
