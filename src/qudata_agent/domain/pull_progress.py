"""What an image pull has done so far: the figures an instance's answer shows while it pulls.

Owns `PullProgress`. The Docker adapter makes it from Docker's progress
messages (`adapters.docker.progress.PullTally`), the pull coordinator keeps
the latest one per reference, and the instance's view carries it.
What stays true: the figures are Docker's own (compressed bytes, layers), and
a later report of the same pull never shows less done than an earlier one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PullProgress:
    bytes_done: int
    bytes_total: int
    layers_done: int
    layers_total: int
