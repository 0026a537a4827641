"""The periodic loop: a fixed grid, no overlap, no bunching after an overrun, one log per streak.

The loop's clock is the monotonic clock plus a skew a tick may add to, so a
tick's duration or an overrun of several intervals costs the test no real
time. A tick is placed on the grid by rounding down from a time read before
the loop started: a wake-up made late by a loaded machine (up to most of an
interval) still lands on its own grid point.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable

import pytest

from qudata_agent.loops.periodic import run_every

LOGGER = "qudata_agent.loops.periodic"


class Clock:
    def __init__(self) -> None:
        self.skew = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.skew


async def run_ticks(
    n: int, interval_s: float, tick: Callable[[int], Awaitable[None]], **options: object
) -> None:
    """Runs the loop until its `n`th tick has ended, then cancels it (and checks it stops)."""
    done = asyncio.Event()
    count = 0

    async def counted() -> None:
        nonlocal count
        count += 1
        try:
            await tick(count)
        finally:
            if count == n:
                done.set()

    loop = asyncio.create_task(run_every(interval_s, counted, "test", **options))  # type: ignore[arg-type]
    try:
        await asyncio.wait_for(done.wait(), 10)
    finally:
        loop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loop
    ended = count
    await asyncio.sleep(min(interval_s * 3, 0.1))
    assert count == ended  # no tick after the cancel


def grid_points(t0: float, times: list[float], interval_s: float) -> list[int]:
    return [math.floor((t - t0) / interval_s) for t in times]


async def test_a_slow_tick_delays_only_itself() -> None:
    """Ticks stay on the grid: a tick's own duration does not push the ones after it."""
    interval = 0.15
    clock = Clock()
    began: list[float] = []

    async def tick(_n: int) -> None:
        began.append(clock())
        clock.skew += interval * 0.4  # each tick runs for 40 % of the interval

    t0 = clock()
    await run_ticks(4, interval, tick, first_delay_s=0, clock=clock)
    assert grid_points(t0, began, interval) == [0, 1, 2, 3]  # drifting: 0, 1, 2, 4


async def test_an_overrun_skips_the_grid_points_it_missed() -> None:
    interval = 0.15
    clock = Clock()
    began: list[float] = []

    async def tick(n: int) -> None:
        began.append(clock())
        if n == 1:
            clock.skew += interval * 2.2  # this tick ran two intervals and a bit

    t0 = clock()
    await run_ticks(4, interval, tick, first_delay_s=0, clock=clock)
    assert grid_points(t0, began, interval) == [0, 3, 4, 5]  # no burst to catch up 1 and 2


async def test_ticks_never_overlap() -> None:
    running = 0
    most = 0

    async def tick(_n: int) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.03)  # three intervals
        running -= 1

    await run_ticks(4, 0.01, tick, first_delay_s=0)
    assert most == 1


async def test_the_first_tick_waits_one_interval_unless_told() -> None:
    started = time.monotonic()
    waits: list[float] = []

    async def tick(_n: int) -> None:
        waits.append(time.monotonic() - started)

    await run_ticks(1, 0.2, tick)
    assert waits[0] >= 0.19
    started = time.monotonic()
    await run_ticks(1, 10.0, tick, first_delay_s=0)
    assert waits[1] < 5.0  # not the interval


async def test_a_failure_streak_is_logged_when_it_starts_and_when_it_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    failing = {1, 2, 3, 6}

    async def tick(n: int) -> None:
        if n in failing:
            raise RuntimeError(f"tick {n} failed")

    with caplog.at_level(logging.INFO, logger=LOGGER):
        await run_ticks(7, 0.005, tick, first_delay_s=0)
    said = [(r.levelno, r.message) for r in caplog.records if r.name == LOGGER]
    assert said == [
        (logging.WARNING, "loop tick failed"),
        (logging.INFO, "loop recovered"),
        (logging.WARNING, "loop tick failed"),
        (logging.INFO, "loop recovered"),
    ]
    first = next(r for r in caplog.records if r.name == LOGGER)
    assert first.exc_info is not None and str(first.exc_info[1]) == "tick 1 failed"
    assert first.loop == "test"


async def test_a_cancel_during_a_tick_ends_the_loop() -> None:
    inside = asyncio.Event()

    async def tick() -> None:
        inside.set()
        await asyncio.sleep(10)

    loop = asyncio.create_task(run_every(10.0, tick, "test", first_delay_s=0))
    await asyncio.wait_for(inside.wait(), 5)
    loop.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(loop, 5)
    assert loop.cancelled()
