"""Retry delays: exponential growth, a cap, and jitter.

Pure: the random source is injected. What stays true: delays never exceed the
cap, never fall below half of the un-jittered delay ("equal jitter"), so a
fleet of agents that lost the control plane together do not come back in
lockstep, and none of them hammers it with near-zero waits.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Backoff:
    base_s: float = 1.0
    cap_s: float = 60.0
    factor: float = 2.0
    rand: Callable[[], float] = field(default=random.random, repr=False)
    attempt: int = 0

    def next_delay(self) -> float:
        """The wait before the next try; each call moves one step up."""
        raw = min(self.cap_s, self.base_s * self.factor ** min(self.attempt, 64))
        self.attempt += 1
        return raw / 2 + raw / 2 * self.rand()

    def reset(self) -> None:
        self.attempt = 0
