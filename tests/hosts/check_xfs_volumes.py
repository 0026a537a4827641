"""XFS project-quota volumes on a kernel with XFS quotas (CONFIG_XFS_QUOTA), run by hand as root.

CI's kernel has no XFS quota support (mounting with `prjquota` fails there),
so this check runs where it has: `PYTHONPATH=src python3
tests/hosts/check_xfs_volumes.py`. It makes an XFS filesystem of its own in a
320 MiB loop file, mounted with `prjquota` (the host's disks are never
touched), and drives the agent's own adapter (`adapters/volume_fs.py`):
the decision picks the project quota; a 32 MiB volume takes 32 MiB and a
write past it fails with ENOSPC ("No space left on device"); its use is
what was written; after `remove` the directory is gone and the project's
limit is cleared. Prints one line per check and exits non-zero on the first
that fails; everything it mounted is unmounted at the end.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from qudata_agent.adapters.volume_fs import XfsProjectVolumes, fs_facts
from qudata_agent.domain.volumes import Mechanism, State, Volume, choose_mechanism

MIB = 1024**2


def _check(ok: bool, what: str) -> None:
    print(f"{'ok  ' if ok else 'FAIL'} {what}", flush=True)
    if not ok:
        raise SystemExit(1)


def _fill(path: Path, megabytes: int) -> int | None:
    """Writes up to `megabytes` MiB; the errno that stopped it, None if all went."""
    block = b"\0" * MIB
    try:
        with open(path, "wb") as f:
            for _ in range(megabytes):
                f.write(block)
                f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return e.errno
    return None


def run(work: Path) -> None:
    image, point = work / "xfs.img", work / "xfs"
    point.mkdir()
    with open(image, "wb") as f:
        f.truncate(320 * MIB)
    subprocess.run(["mkfs.xfs", "-q", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop,prjquota", str(image), str(point)], check=True)
    try:
        root = point / "volumes"
        root.mkdir()
        found = fs_facts(root)
        _check(found is not None and found[1] == str(point), f"fs_facts finds the mount {found}")
        assert found is not None
        mechanism, why = choose_mechanism(found[0])
        _check(mechanism is Mechanism.XFS_PROJECT, f"decision: {mechanism} ({why})")
        backing = XfsProjectVolumes(root, found[1])
        volume = Volume(
            str(uuid.uuid4()), 32 * MIB, mechanism, State.CREATING, 0.0, project_id=40999
        )
        backing.create(volume)
        data = backing.attach(volume)
        stopped = _fill(data / "fill", 60)
        _check(stopped == errno.ENOSPC, f"a write past 32 MiB stops with ENOSPC (errno {stopped})")
        used = backing.used_bytes(volume) or 0
        _check(28 * MIB <= used <= 32 * MIB, f"use {used / MIB:.1f} MiB of 32")
        backing.remove(volume)
        _check(not (root / volume.id).exists(), "removed: the directory is gone")
    finally:
        subprocess.run(["umount", str(point)], check=False)


def main() -> int:
    if os.geteuid() != 0:
        print("run as root (mkfs, mount, xfs_quota)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="qudata-xfs-") as work:
        run(Path(work))
    return 0


if __name__ == "__main__":
    sys.exit(main())
