"""The tenant's writable disk: can this host cap it, and what to do with a request for it.

Owns three pure decisions:
- `quota_support`: whether Docker's storage driver can cap a container's
  writable layer (`--storage-opt size=`), from the driver's name, its backing
  filesystem and the mount options of the filesystem under Docker's data root;
  with a one-line fix for a host that cannot;
- `admit`: what a create that asks for `storage_gb` gets: the size limit to put
  on the container, no limit (the policy is `monitor`: the layer is watched
  instead), or a refusal (409) that says why and how to fix the host;
- `usage`: the storage part of an instance's answer (asked, enforced, used,
  over the limit).

What stays true: a limit is only ever put on a container where the driver
enforces it (anywhere else Docker refuses the create outright); a request is
never silently dropped: it is enforced, watched, or refused; every refusal
names its cause and the fix. Sizes are bytes inside, and `storage_gb` is
GiB (1024**3 bytes), as everywhere in the agent.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from qudata_agent.errors import Conflict

GIB = 1024**3

# Mount options of an xfs filesystem whose project quotas are enforced (the
# kernel shows `prjquota`; `pquota` is what fstab usually says).
_XFS_PROJECT_QUOTA = frozenset({"prjquota", "pquota"})
_XFS_NO_ENFORCE = "pqnoenforce"  # project quotas counted, not enforced


class StoragePolicy(StrEnum):
    """What a create that asks for storage gets on a host that cannot cap it."""

    REFUSE = "refuse"  # 409, with how to fix the host
    MONITOR = "monitor"  # accepted; the writable layer is watched and reported


@dataclass(frozen=True)
class QuotaSupport:
    """Whether this host's Docker can cap a container's writable layer, and how.

    `how` says what enforces the cap, or why nothing can; `fix` is empty when
    `enforceable`, else what the provider does to make it so. The last three
    fields say what the decision was made from (for `doctor` and the log).
    """

    enforceable: bool
    how: str
    fix: str = ""
    driver: str = ""
    backing_filesystem: str | None = None
    data_root: str | None = None

    def summary(self) -> str:
        """One line for a person: the verdict, and the fix when there is one."""
        verdict = "enforced" if self.enforceable else "NOT enforced"
        line = f"container disk size (storage_gb) {verdict}: {self.how}"
        return f"{line}. Fix: {self.fix}" if self.fix else line

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class StorageInfo:
    """What Docker says about its storage (`docker info`)."""

    driver: str  # "overlay2", "btrfs", "zfs", ...
    backing_filesystem: str | None  # overlay2's "Backing Filesystem": "xfs", "extfs", ...
    data_root: str  # DockerRootDir


def _data_root_text(data_root: str | None) -> str:
    return data_root or "Docker's data root"


def _move_fix(data_root: str | None) -> str:
    return (
        f"put {_data_root_text(data_root)} on an xfs filesystem mounted with the pquota option"
        " (storage driver overlay2), or on btrfs or zfs (storage driver btrfs or zfs),"
        " then restart Docker"
    )


def quota_support(
    driver: str,
    backing_filesystem: str | None,
    mount_options: Collection[str] | None,
    data_root: str | None = None,
) -> QuotaSupport:
    """Whether `--storage-opt size=` works with this storage driver and filesystem.

    `mount_options`: those of the filesystem that holds `data_root` (None:
    unknown). btrfs and zfs cap a subvolume or dataset by themselves;
    overlay2 needs xfs with enforced project quotas. Anything else cannot.
    """
    name = driver.strip().lower()
    backing = (backing_filesystem or "").strip().lower() or None
    enforceable, how, fix = _verdict(name, backing, mount_options, data_root)
    return QuotaSupport(enforceable, how, fix, name, backing, data_root)


def _verdict(
    driver: str, backing: str | None, mount_options: Collection[str] | None, data_root: str | None
) -> tuple[bool, str, str]:
    if driver == "btrfs":
        return True, "btrfs qgroup limit on each container's subvolume", ""
    if driver == "zfs":
        return True, "zfs quota on each container's dataset", ""
    if driver != "overlay2":
        how = f"the storage driver {driver or '(unknown)'} cannot limit a container's size"
        return False, how, _move_fix(data_root)
    if backing != "xfs":
        how = (
            f"overlay2 on {backing or 'an unknown filesystem'} cannot limit a container's"
            " writable layer (that needs xfs with project quotas)"
        )
        return False, how, _move_fix(data_root)
    options = frozenset(o.strip().lower() for o in mount_options or ())
    if options & _XFS_PROJECT_QUOTA:
        return True, "xfs project quota on each container's writable layer (overlay2)", ""
    root = _data_root_text(data_root)
    fix = (
        f"mount the xfs filesystem that holds {root} with the pquota option (in /etc/fstab;"
        " for the root filesystem add rootflags=pquota to the kernel command line),"
        " reboot or remount, then restart Docker"
    )
    if _XFS_NO_ENFORCE in options:
        how = "overlay2 on xfs whose project quotas are counted but not enforced (pqnoenforce)"
    elif mount_options is None:
        how = f"overlay2 on xfs, but the mount options of {root} could not be read"
    else:
        how = "overlay2 on xfs mounted without project quotas (pquota)"
    return False, how, fix


def admit(
    storage_gb: float,
    support: QuotaSupport,
    policy: StoragePolicy,
    free_bytes: int | None,
    asked: bool = True,
) -> int | None:
    """The size limit (bytes) to put on the container; None: accepted, not enforced.

    Raises Conflict when the disk that holds Docker's data has less free space
    than asked (`free_bytes` None: unknown, not checked), or when the host
    cannot enforce the size and the policy is `refuse`. A size the order did
    not ask for (`asked` False: the host's default) is never refused: it is
    enforced where the host can, else watched.
    """
    requested = int(storage_gb * GIB)
    if not asked:
        return requested if support.enforceable else None
    if free_bytes is not None and requested > free_bytes:
        raise Conflict(
            f"storage_gb {storage_gb:.12g} is more than the {free_bytes / GIB:.1f} GB free on the"
            f" disk that holds Docker's data ({_data_root_text(support.data_root)})"
        )
    if support.enforceable:
        return requested
    if policy is StoragePolicy.REFUSE:
        raise Conflict(
            f"storage_gb cannot be enforced on this host: {support.how}. To fix the host:"
            f" {support.fix} (or set QUDATA_STORAGE_POLICY=monitor to accept and only watch it)"
        )
    return None


@dataclass(frozen=True)
class StorageRequest:
    """What an instance asked for, as recorded at create."""

    requested_bytes: int
    enforced: bool
    default: bool = False  # the order named no storage_gb: the host's default share


@dataclass(frozen=True)
class StorageUsage:
    """The storage part of an instance's answer."""

    requested_gb: float
    enforced: bool
    used_gb: float | None  # the writable layer and its VOLUME paths, when measured
    over_limit: bool
    default: bool = False


def usage(request: StorageRequest, used_bytes: int | None) -> StorageUsage:
    return StorageUsage(
        requested_gb=round(request.requested_bytes / GIB, 3),
        enforced=request.enforced,
        used_gb=None if used_bytes is None else round(used_bytes / GIB, 3),
        over_limit=used_bytes is not None and used_bytes > request.requested_bytes,
        default=request.default,
    )
