"""Volumes: a renter's data that outlives an instance (CONTRACT.md section 7).

Owns the pure decisions about volumes:
- `choose_mechanism`: how this host enforces a volume's size, from the facts
  of the filesystem that holds the volume root (its type and mount options):
  an XFS project quota where the filesystem is XFS mounted with project
  quotas, else a loop-mounted ext4 image (a sparse file), which works on any
  filesystem. btrfs gets the loop image too: its qgroups answer a full volume
  with "Disk quota exceeded" rather than "no space left", and turning quotas
  on changes the whole filesystem's performance.
- `mount_path`: a create order's mount path checked and normalised;
- `parse_mounts`: the order's `volumes` map checked as a whole;
- `Volume` and its wire status, `admit_size` (does a new volume fit the disk).

What stays true: a mount path is absolute, normalised, has no `..`, is not
`/` and lies under none of `FORBIDDEN_ROOTS`; two volumes of one order never
share a mount path; a volume's status on the wire is `error` whenever its
backing is damaged, `in_use` while an instance holds it, else `ready`.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from qudata_agent.errors import Conflict, InvalidRequest

GIB = 1024**3
MIN_SIZE_BYTES = 32 * 1024**2  # an ext4 filesystem smaller than this is mostly its own metadata
MAX_VOLUMES_PER_INSTANCE = 16
MAX_PATH_LENGTH = 1024
# Where no renter's volume may go: the kernel's own trees, and the agent's (the SSH bundle).
FORBIDDEN_ROOTS: tuple[str, ...] = ("/proc", "/sys", "/dev", "/.qudata")
VOLUME_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")

# Mount options of an XFS filesystem whose project quotas are enforced.
_XFS_PROJECT_QUOTA = frozenset({"prjquota", "pquota"})
_XFS_NO_ENFORCE = "pqnoenforce"


class BackingError(Exception):
    """A volume's backing cannot be made, mounted or removed (the message says why)."""


class Mechanism(StrEnum):
    """How a volume's size is enforced."""

    XFS_PROJECT = "xfs-project-quota"  # a directory with a project quota
    LOOP = "loop-ext4"  # an ext4 filesystem in a sparse file, loop-mounted


class State(StrEnum):
    """What the store keeps; the wire adds `in_use` (an instance holds it)."""

    CREATING = "creating"  # the record is made, the backing not yet (not shown)
    READY = "ready"
    ERROR = "error"  # the backing is damaged: `reason` says how
    DELETING = "deleting"  # a delete began; an agent that died meanwhile finishes it


@dataclass(frozen=True)
class FsFacts:
    """The filesystem that holds the volume root."""

    fs_type: str  # as /proc/self/mountinfo names it: ext4, xfs, btrfs, ...
    options: frozenset[str] = frozenset()


def choose_mechanism(facts: FsFacts | None) -> tuple[Mechanism, str]:
    """The mechanism for volumes under a root on this filesystem, and why, in words."""
    if facts is None:
        return Mechanism.LOOP, "the volume root's filesystem is unknown: loop-mounted ext4 images"
    if facts.fs_type == "xfs" and facts.options & _XFS_PROJECT_QUOTA:
        if _XFS_NO_ENFORCE in facts.options:
            return Mechanism.LOOP, (
                "xfs counts project quotas without enforcing them (pqnoenforce):"
                " loop-mounted ext4 images"
            )
        return Mechanism.XFS_PROJECT, "xfs with project quotas (prjquota): a project quota each"
    if facts.fs_type == "xfs":
        return Mechanism.LOOP, (
            "xfs without project quotas (mount it with prjquota for quotas):"
            " loop-mounted ext4 images"
        )
    return Mechanism.LOOP, f"{facts.fs_type} has no per-directory size limit the agent uses:" + (
        " loop-mounted ext4 images"
    )


def mount_path(path: str) -> str:
    """The container path a volume is mounted at, normalised; InvalidRequest when refused."""
    if not path or len(path) > MAX_PATH_LENGTH or "\x00" in path:
        raise InvalidRequest(f"volume mount path {path[:64]!r}: empty, too long or holds NUL")
    if not path.startswith("/"):
        raise InvalidRequest(f"volume mount path {path!r}: must be absolute")
    if ".." in path.split("/"):
        raise InvalidRequest(f"volume mount path {path!r}: must not hold '..'")
    normal = posixpath.normpath(path)
    if normal.startswith("//"):
        normal = "/" + normal.lstrip("/")
    if normal == "/":
        raise InvalidRequest("volume mount path '/': a volume cannot replace the root")
    for root in FORBIDDEN_ROOTS:
        if normal == root or normal.startswith(root + "/"):
            raise InvalidRequest(f"volume mount path {path!r}: nothing may be mounted under {root}")
    return normal


def parse_mounts(volumes: Mapping[str, str]) -> dict[str, str]:
    """The order's `{volume_id: path}` checked: known id shapes, valid, distinct paths."""
    if len(volumes) > MAX_VOLUMES_PER_INSTANCE:
        raise InvalidRequest(f"at most {MAX_VOLUMES_PER_INSTANCE} volumes per instance")
    mounts: dict[str, str] = {}
    for volume_id, path in volumes.items():
        normal = mount_path(path)
        if normal in mounts.values():
            raise InvalidRequest(f"volume mount path {normal!r} is given twice")
        mounts[volume_id] = normal
    for path in mounts.values():
        for other in mounts.values():
            if other != path and other.startswith(path + "/"):
                raise InvalidRequest(f"volume mount path {other!r} lies inside {path!r}")
    return mounts


@dataclass(frozen=True)
class Volume:
    id: str
    size_bytes: int
    mechanism: Mechanism
    state: State
    created_at: float
    instance_id: str | None = None  # the instance that holds it
    reason: str | None = None  # why it is `error`
    project_id: int | None = None  # the XFS project of an XFS_PROJECT volume

    @property
    def status(self) -> str:
        """The wire status: ready, in_use or error."""
        if self.state is State.ERROR:
            return "error"
        return "in_use" if self.instance_id else "ready"

    def check_attachable(self) -> None:
        """Conflict unless an instance may take this volume now."""
        if self.state is State.ERROR:
            raise Conflict(f"volume {self.id} is damaged: {self.reason}")
        if self.state is State.CREATING:
            raise Conflict(f"volume {self.id} is being created")
        if self.state is State.DELETING:
            raise Conflict(f"volume {self.id} is being deleted")
        if self.instance_id is not None:
            raise Conflict(f"volume {self.id} is in use by instance {self.instance_id}")


def promised_bytes(volumes: list[Volume], used: Mapping[str, int]) -> int:
    """Disk promised to volumes and not yet written (a loop image is sparse)."""
    return sum(max(0, v.size_bytes - used.get(v.id, 0)) for v in volumes if v.state is State.READY)


def admit_size(size_bytes: int, free_bytes: int | None, promised: int) -> None:
    """Conflict (naming what is short) when a volume of `size_bytes` does not fit the disk;
    InvalidRequest when it is too small to be a filesystem."""
    if size_bytes < MIN_SIZE_BYTES:
        raise InvalidRequest("field 'size_gb': at least 0.032 (32 MiB)")
    if free_bytes is None:
        return
    left = max(0, free_bytes - promised)
    if size_bytes > left:
        raise Conflict(
            f"needs {size_bytes / GIB:.2f} GiB of disk for the volume, {left / GIB:.2f} GiB free"
        )
