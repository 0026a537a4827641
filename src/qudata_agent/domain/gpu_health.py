"""GPU health: which NVML events say a GPU is unwell, and the record of them.

Owns the list of XIDs an application causes (ignored), the decision whether
an event is a health problem, and the bounded record of the ones that are.
Pure: the NVML adapter turns NVML's event data into `GpuEvent`s; this module
decides and remembers; the loop logs.

What stays true:
- an XID in `APPLICATION_XIDS` is never a health problem, never kept, never
  counted: the renter's own code caused it and the GPU is fine;
- an XID outside that list and an uncorrectable (double-bit) ECC error are
  health problems: kept (the newest `per_gpu` of each GPU) and counted;
- a corrected (single-bit) ECC error is counted, not kept: the hardware fixed it;
- counts only grow for the life of the process (they are Prometheus counters).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

# XIDs caused by the application running on the GPU, not by the GPU, its
# memory or the driver (NVIDIA's XID catalogue; the same list NVIDIA's
# Kubernetes device plugin skips when it marks GPUs unhealthy):
#   13  graphics engine exception (e.g. an out-of-bounds access in a kernel)
#   31  GPU memory page fault (an illegal address used by the application)
#   43  GPU stopped processing (the application's context was torn down after its own fault)
#   45  preemptive cleanup after earlier errors (the process was killed, often by its user)
#   68  video processor exception (NVDEC/NVENC fed bad data)
#  109  context switch timeout (the application's work did not yield)
APPLICATION_XIDS: frozenset[int] = frozenset({13, 31, 43, 45, 68, 109})

EventKind = Literal["xid", "ecc_corrected", "ecc_uncorrected"]


@dataclass(frozen=True)
class GpuEvent:
    """One NVML event of one GPU."""

    uuid: str
    kind: EventKind
    xid: int | None  # the XID number, for kind "xid" only
    at: float  # wall-clock seconds since the epoch


def is_application_xid(event: GpuEvent) -> bool:
    return event.kind == "xid" and event.xid in APPLICATION_XIDS


def is_health_problem(event: GpuEvent) -> bool:
    """An XID the application did not cause, or an uncorrectable ECC error."""
    if event.kind == "xid":
        return not is_application_xid(event)
    return event.kind == "ecc_uncorrected"


CountKey = tuple[str, str, int | None]  # (uuid, kind, xid)


class HealthRecord:
    """Health problems per GPU (bounded) and counts of every non-application event."""

    def __init__(self, per_gpu: int = 32) -> None:
        self._per_gpu = per_gpu
        self._kept: dict[str, deque[GpuEvent]] = {}
        self._counts: dict[CountKey, int] = {}

    def add(self, event: GpuEvent) -> int:
        """Records `event`; returns how many of its kind this GPU has had (0: ignored)."""
        if is_application_xid(event):
            return 0
        key = (event.uuid, event.kind, event.xid)
        self._counts[key] = self._counts.get(key, 0) + 1
        if is_health_problem(event):
            kept = self._kept.setdefault(event.uuid, deque(maxlen=self._per_gpu))
            kept.append(event)
        return self._counts[key]

    def problems(self, uuids: Iterable[str], since: float = 0.0) -> list[GpuEvent]:
        """The kept problems of these GPUs at or after `since`, oldest first."""
        found = [
            event for uuid in set(uuids) for event in self._kept.get(uuid, ()) if event.at >= since
        ]
        return sorted(found, key=lambda event: event.at)

    def counts(self) -> Mapping[CountKey, int]:
        return dict(self._counts)
