"""Backoff (doubling, a cap, equal jitter, reset) and retry.until_done."""

from __future__ import annotations

import pytest

from qudata_agent.domain.backoff import Backoff
from qudata_agent.errors import Unavailable
from qudata_agent.retry import until_done


def _delays(backoff: Backoff, n: int) -> list[float]:
    return [backoff.next_delay() for _ in range(n)]


def test_with_the_highest_jitter_delays_double_from_the_base_up_to_the_cap() -> None:
    backoff = Backoff(base_s=1.0, cap_s=10.0, rand=lambda: 1.0)
    assert _delays(backoff, 7) == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]


def test_with_the_lowest_jitter_delays_are_half_of_the_raw_delay() -> None:
    backoff = Backoff(base_s=1.0, cap_s=10.0, rand=lambda: 0.0)
    assert _delays(backoff, 7) == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]


def test_a_custom_factor_is_used() -> None:
    backoff = Backoff(base_s=0.5, cap_s=100.0, factor=3.0, rand=lambda: 1.0)
    assert _delays(backoff, 4) == [0.5, 1.5, 4.5, 13.5]


@pytest.mark.parametrize("r", [0.0, 0.25, 0.5, 0.999, 1.0])
def test_every_delay_lies_between_half_the_raw_delay_and_the_raw_delay(r: float) -> None:
    backoff = Backoff(base_s=0.2, cap_s=30.0, rand=lambda: r)
    for attempt in range(40):
        raw = min(30.0, 0.2 * 2.0**attempt)
        delay = backoff.next_delay()
        assert raw / 2 <= delay <= raw
        assert delay == pytest.approx(raw / 2 + raw / 2 * r)


def test_a_very_long_streak_stays_at_the_cap_without_overflow() -> None:
    backoff = Backoff(base_s=1.0, cap_s=60.0, rand=lambda: 1.0)
    backoff.attempt = 10_000
    assert backoff.next_delay() == 60.0
    assert backoff.attempt == 10_001


def test_each_call_moves_one_step_and_reset_starts_over() -> None:
    backoff = Backoff(base_s=1.0, cap_s=60.0, rand=lambda: 1.0)
    _delays(backoff, 5)
    assert backoff.attempt == 5
    backoff.reset()
    assert backoff.attempt == 0
    assert _delays(backoff, 2) == [1.0, 2.0]


def test_the_default_random_source_keeps_delays_in_range() -> None:
    backoff = Backoff(base_s=1.0, cap_s=8.0)
    for raw in [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]:
        assert raw / 2 <= backoff.next_delay() <= raw


async def test_until_done_retries_agent_errors_and_stops_after_its_attempts() -> None:
    calls: list[int] = []

    async def flaky() -> None:
        calls.append(1)
        if len(calls) < 3:
            raise Unavailable("not yet")

    assert await until_done(flaky, "flaky", base_s=0.001, cap_s=0.001) is True
    assert len(calls) == 3
    calls.clear()

    async def never() -> None:
        calls.append(1)
        raise Unavailable("never")

    assert await until_done(never, "never", base_s=0.001, cap_s=0.001, attempts=2) is False
    assert len(calls) == 2
