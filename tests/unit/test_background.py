"""The recurring shapes of background work (qudata_agent.background), each once."""

from __future__ import annotations

import asyncio

import pytest

from qudata_agent.background import KeyedLocks, Rerun, Reruns, Streak, Streaks, both


def test_a_streak_says_its_first_failure_and_its_end_once_each() -> None:
    streak = Streak()
    assert streak.recovered() is False  # nothing to recover from
    assert [streak.failed() for _ in range(3)] == [True, False, False]
    assert streak.failing
    assert [streak.recovered(), streak.recovered()] == [True, False]
    assert streak.failed() is True  # a new streak is said again


def test_streaks_are_kept_per_key() -> None:
    streaks: Streaks[str] = Streaks()
    assert streaks.failed("a") and streaks.failed("b") and not streaks.failed("a")
    assert streaks.recovered("a") and not streaks.recovered("a")
    streaks.forget("b")
    assert streaks.recovered("b") is False


async def test_a_poke_during_a_pass_makes_exactly_one_more_and_passes_never_overlap() -> None:
    running = 0
    overlaps = 0
    passes = 0
    gate = asyncio.Event()

    async def one_pass() -> None:
        nonlocal running, overlaps, passes
        running += 1
        overlaps += running > 1
        passes += 1
        await gate.wait()
        running -= 1

    rerun = Rerun(one_pass, "test")
    rerun.poke()
    await asyncio.sleep(0)
    for _ in range(5):  # a burst while the first pass runs
        rerun.poke()
    assert rerun.running and passes == 1
    gate.set()
    for _ in range(20):
        await asyncio.sleep(0)
    assert (passes, overlaps, rerun.running) == (2, 0, False)
    rerun.poke()  # after the passes ended: a new one
    for _ in range(5):
        await asyncio.sleep(0)
    assert passes == 3


async def test_reruns_keep_one_pass_per_key_and_close_cancels_what_runs() -> None:
    started: list[str] = []
    cancelled: list[str] = []

    async def one_pass(key: str) -> None:
        started.append(key)
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.append(key)
            raise

    reruns: Reruns[str] = Reruns(one_pass, "test")
    reruns.poke("a")
    reruns.poke("b")
    reruns.poke("a")
    await asyncio.sleep(0)
    assert sorted(started) == ["a", "b"] and reruns.running("a") and reruns.running("b")
    await reruns.close(timeout_s=1)
    assert sorted(cancelled) == ["a", "b"]
    assert not reruns.running("a") and not reruns.running("b")


async def test_a_pass_that_raises_ends_its_run_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[str] = []

    async def broken(key: str) -> None:
        calls.append(key)
        raise RuntimeError("boom")

    reruns: Reruns[str] = Reruns(broken, "test")
    reruns.poke("a")
    await reruns.settled()
    for _ in range(3):  # the done callback runs on the next loop turn
        await asyncio.sleep(0)
    assert not reruns.running("a")
    failed = [r for r in caplog.records if r.getMessage() == "background pass failed"]
    assert len(failed) == 1 and failed[0].task == "test a"  # type: ignore[attr-defined]
    reruns.poke("a")  # a later poke starts afresh
    await reruns.settled()
    assert calls == ["a", "a"]


async def test_keyed_locks_are_one_per_key_until_forgotten() -> None:
    locks: KeyedLocks[str] = KeyedLocks()
    assert locks("a") is locks("a") and locks("a") is not locks("b")
    first = locks("a")
    locks.forget("a")
    assert locks("a") is not first


async def test_both_runs_each_to_its_end_and_raises_the_first_ones_failure() -> None:
    finished: list[str] = []

    async def fails(after_s: float, why: str) -> None:
        await asyncio.sleep(after_s)
        finished.append(why)
        raise RuntimeError(why)

    async def slow_write() -> str:
        await asyncio.sleep(0.05)
        finished.append("written")
        return "written"

    with pytest.raises(RuntimeError, match="start failed"):
        await both(fails(0, "start failed"), slow_write())
    assert finished == ["start failed", "written"]  # the write ended before the raise
    with pytest.raises(RuntimeError, match="first"):
        await both(fails(0.02, "first"), fails(0, "second"))
    assert await both(slow_write(), asyncio.sleep(0, "slept")) == ("written", "slept")
