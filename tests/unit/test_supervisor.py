"""Supervisor: owns background loops; stop cancels and awaits them; a dead loop is restarted."""

from __future__ import annotations

import asyncio
import logging

import pytest

from qudata_agent.loops.supervisor import Supervisor

SUPERVISOR_LOGGER = "qudata_agent.loops.supervisor"


async def _forever(started: asyncio.Event, cancelled: list[str], name: str) -> None:
    started.set()
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        cancelled.append(name)
        raise


async def test_stop_cancels_and_awaits_every_loop() -> None:
    supervisor = Supervisor()
    cancelled: list[str] = []
    a, b = asyncio.Event(), asyncio.Event()
    supervisor.start("a", lambda: _forever(a, cancelled, "a"))
    supervisor.start("b", lambda: _forever(b, cancelled, "b"))
    await asyncio.wait_for(asyncio.gather(a.wait(), b.wait()), 1)
    assert supervisor.running() == ["a", "b"]

    await supervisor.stop(timeout_s=1)

    assert sorted(cancelled) == ["a", "b"]  # their cancellation handlers ran before stop returned
    assert supervisor.running() == []


async def test_stop_waits_for_a_loop_that_cleans_up_on_cancel() -> None:
    supervisor = Supervisor()
    cleaned = asyncio.Event()
    started = asyncio.Event()

    async def loop() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0.01)  # cleanup that needs the loop
            cleaned.set()

    supervisor.start("cleanup", lambda: loop())
    await started.wait()
    await supervisor.stop(timeout_s=1)
    assert cleaned.is_set()


async def test_stop_twice_is_safe() -> None:
    supervisor = Supervisor()
    cancelled: list[str] = []
    started = asyncio.Event()
    supervisor.start("a", lambda: _forever(started, cancelled, "a"))
    await started.wait()
    await supervisor.stop(timeout_s=1)
    await supervisor.stop(timeout_s=1)
    assert cancelled == ["a"]


async def test_stop_with_nothing_started_returns() -> None:
    supervisor = Supervisor()
    await asyncio.wait_for(supervisor.stop(timeout_s=1), 1)
    assert supervisor.running() == []


async def test_a_dead_loop_is_logged_counted_and_restarted_while_others_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=SUPERVISOR_LOGGER)
    deaths: list[str] = []
    supervisor = Supervisor(on_death=deaths.append, backoff_base_s=0.01, backoff_cap_s=0.02)
    cancelled: list[str] = []
    healthy = asyncio.Event()
    runs: list[int] = []
    third_run = asyncio.Event()

    async def crash() -> None:
        runs.append(len(runs))
        if len(runs) >= 3:
            third_run.set()
            await asyncio.Event().wait()  # the third run stays up
        raise ValueError("boom in the loop")

    supervisor.start("healthy", lambda: _forever(healthy, cancelled, "healthy"))
    supervisor.start("crasher", crash)
    await asyncio.wait_for(asyncio.gather(healthy.wait(), third_run.wait()), 2)

    assert supervisor.running() == ["crasher", "healthy"]
    assert deaths == ["crasher", "crasher"]
    died = [r for r in caplog.records if r.name == SUPERVISOR_LOGGER and r.levelno >= logging.ERROR]
    assert [r.__dict__["loop"] for r in died] == ["crasher", "crasher"]
    assert died[0].exc_info is not None and isinstance(died[0].exc_info[1], ValueError)

    await supervisor.stop(timeout_s=1)
    assert cancelled == ["healthy"]
    assert supervisor.running() == []


async def test_a_loop_that_returns_normally_is_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=SUPERVISOR_LOGGER)
    supervisor = Supervisor()

    async def once() -> None:
        await asyncio.sleep(0)

    supervisor.start("once", lambda: once())
    await asyncio.sleep(0.01)
    assert supervisor.running() == []
    await supervisor.stop(timeout_s=1)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_starting_the_same_name_twice_while_running_raises() -> None:
    supervisor = Supervisor()
    cancelled: list[str] = []
    started = asyncio.Event()
    supervisor.start("a", lambda: _forever(started, cancelled, "a"))
    await started.wait()
    second_ran = []

    async def second() -> None:
        second_ran.append(True)

    with pytest.raises(RuntimeError, match="already running"):
        supervisor.start("a", second)
    await supervisor.stop(timeout_s=1)
    assert second_ran == []
    assert cancelled == ["a"]


async def test_a_name_can_be_reused_once_its_loop_has_ended() -> None:
    supervisor = Supervisor()
    runs: list[int] = []

    async def once(n: int) -> None:
        runs.append(n)

    supervisor.start("job", lambda: once(1))
    await asyncio.sleep(0.01)
    supervisor.start("job", lambda: once(2))
    await asyncio.sleep(0.01)
    assert runs == [1, 2]
    await supervisor.stop(timeout_s=1)


async def test_start_after_stop_raises() -> None:
    supervisor = Supervisor()
    await supervisor.stop(timeout_s=1)
    ran = []

    async def late() -> None:
        ran.append(True)

    with pytest.raises(RuntimeError, match="stopping"):
        supervisor.start("late", late)
    await asyncio.sleep(0)
    assert ran == []
    assert supervisor.running() == []


async def test_a_loop_that_ignores_cancellation_is_reported_after_the_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=SUPERVISOR_LOGGER)
    supervisor = Supervisor()
    release = asyncio.Event()
    started = asyncio.Event()

    async def stubborn() -> None:
        started.set()
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue

    supervisor.start("stubborn", lambda: stubborn())
    await started.wait()
    await supervisor.stop(timeout_s=0.05)
    late = [r for r in caplog.records if r.getMessage() == "loop did not stop in time"]
    assert [r.__dict__["loop"] for r in late] == ["stubborn"]
    release.set()
    await asyncio.sleep(0.01)
    assert supervisor.running() == []
