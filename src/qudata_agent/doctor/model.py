"""What doctor's checks say and what its probes observe: the verdict types and thresholds.

What stays true: a `Check` is a name, a level, a detail and (for what can be
fixed) a fix; nothing here looks at the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from qudata_agent.domain.volumes import FsFacts

PORTS_FREE_ENOUGH = 0.9  # below this share of the range free: a warning


GIB = 1024**3


DISK_FAIL_BYTES = 20 * GIB  # free on Docker's data root: below this, no image fits


DISK_WARN_BYTES = 100 * GIB  # below this, a few large images fill it


CLOCK_WARN_S = 5.0  # skew against the control plane's Date header


CLOCK_FAIL_S = 60.0


DOCKER_DEFAULT_DOWNLOADS = 3  # dockerd's max-concurrent-downloads when unset


class Level(StrEnum):
    PASS = "pass"  # noqa: S105 (a verdict, not a password)
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class Check:
    name: str
    level: Level
    detail: str
    fix: str | None = None


class ProbeError(Exception):
    """An observation could not be made; the message says why (no secret in it)."""


@dataclass(frozen=True)
class CpAnswer:
    """The control plane's answer to an authenticated call: status, Date header, local time."""

    status: int
    date: str | None
    at: float  # time.time() when it came


@dataclass(frozen=True)
class VolumeSummary:
    """The volume root's filesystem and the volumes the agent's database holds."""

    facts: FsFacts | None
    count: int = 0
    size_bytes: int = 0
    disk_bytes: int = 0  # what their backings take on the disk now
    missing_tool: str | None = None  # the package the chosen mechanism needs and lacks
