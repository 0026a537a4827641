"""The inventory loop: calls the registrar's check on its interval, survives a failing one."""

from __future__ import annotations

import asyncio
import time

from qudata_agent.loops.inventory import inventory_loop


async def test_the_first_check_waits_one_interval_then_they_repeat() -> None:
    calls: list[float] = []
    started = time.monotonic()

    async def refresh() -> bool:
        calls.append(time.monotonic() - started)
        return False

    task = asyncio.create_task(inventory_loop(refresh, 0.05))
    await asyncio.sleep(0.28)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert 4 <= len(calls) <= 6, calls
    assert calls[0] >= 0.045  # registration has just sent it: no check at once


async def test_a_failing_check_does_not_end_the_loop() -> None:
    calls = 0

    async def refresh() -> bool:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise ConnectionError("control plane down")
        return True

    task = asyncio.create_task(inventory_loop(refresh, 0.02))
    for _ in range(100):
        await asyncio.sleep(0.01)
        if calls >= 4:
            break
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert calls >= 4
