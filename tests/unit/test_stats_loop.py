"""The stats loop's queue and poke, with a small fake sender (the wire is covered in e2e)."""

from __future__ import annotations

import asyncio
from typing import Any

from qudata_agent.loops.stats import StatsReporter


class Down(Exception):
    pass


async def test_a_failing_sender_keeps_the_queue_bounded_and_sampling_on_time() -> None:
    samples = 0
    sent: list[dict[str, Any]] = []
    up = asyncio.Event()

    async def sample() -> dict[str, Any]:
        nonlocal samples
        samples += 1
        return {"n": samples}

    async def send(payload: dict[str, Any]) -> None:
        if not up.is_set():
            await asyncio.sleep(0.05)
            raise Down("control plane down")
        sent.append(payload)

    reporter = StatsReporter(sample, send, (Down,), interval_s=0.01, queue_max=5, backoff_cap_s=0.2)
    task = asyncio.create_task(reporter.run())
    await asyncio.sleep(0.5)
    assert samples >= 30, "sampling slowed down while the sender failed"
    assert reporter.dropped > 0
    assert reporter._queue.qsize() <= 5
    up.set()
    await asyncio.sleep(0.5)
    assert sent and sent[-1]["n"] >= samples - 10  # fresh reports flow again
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_a_poke_adds_a_report_at_once() -> None:
    sent: list[dict[str, Any]] = []

    async def sample() -> dict[str, Any]:
        return {"at": asyncio.get_running_loop().time()}

    async def send(payload: dict[str, Any]) -> None:
        sent.append(payload)

    reporter = StatsReporter(sample, send, (Down,), interval_s=60)
    task = asyncio.create_task(reporter.run())
    await asyncio.sleep(0.05)
    assert len(sent) == 1  # the first grid point is at once
    reporter.poke()
    await asyncio.sleep(0.05)
    assert len(sent) == 2
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_a_poke_s_report_is_made_by_its_own_sampler() -> None:
    """The grid's reports read the network meter fresh; a lifecycle change's report takes
    the meter's last pass (`Telemetry.sample_on_change`)."""
    sent: list[str] = []

    async def tick() -> dict[str, Any]:
        return {"by": "tick"}

    async def change() -> dict[str, Any]:
        return {"by": "change"}

    async def send(payload: dict[str, Any]) -> None:
        sent.append(payload["by"])

    reporter = StatsReporter(tick, send, (Down,), interval_s=60, sample_on_poke=change)
    task = asyncio.create_task(reporter.run())
    await asyncio.sleep(0.05)
    reporter.poke()
    await asyncio.sleep(0.05)
    assert sent == ["tick", "change"]
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
