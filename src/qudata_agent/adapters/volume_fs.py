"""The filesystem side of volumes: each volume's backing under the volume root.

Owns the files, mounts and quotas behind volumes (`domain.volumes`), one
class per mechanism, with the same methods: `create`, `attach` (mounted and
whole, else `BackingError`), `remove`, `used_bytes`, `disk_bytes`,
`data_dir`; `copy_tree` copies one volume's files into another.

Layout under the volume root (in the agent's state directory, never under
Docker's data root, so no image GC or `docker system prune` reaches it):
- loop: `<id>/image.ext4` (a sparse file holding an ext4 filesystem of the
  volume's size), mounted at `<id>/mnt`; the renter's directory is
  `<id>/mnt/data`;
- XFS project quota: `<id>/data`, a directory with its own project and a
  hard block limit of the volume's size.

What stays true:
- the directory an instance mounts exists only inside the backing: a loop
  volume that is not mounted has no `mnt/data`, so Docker refuses to start
  its container instead of starting it on an empty directory (the same after
  a reboot, when Docker starts containers before the agent is back);
- mounts are made in the host's mount namespace (where dockerd looks), even
  when the agent runs in a namespace of its own (systemd's sandboxing);
- every command has a timeout and its failure is a `BackingError` carrying
  what the tool said (never a silent empty volume).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path

from qudata_agent.adapters.host import parse_mount
from qudata_agent.domain.volumes import BackingError, FsFacts, Volume

log = logging.getLogger(__name__)

TOOL_TIMEOUT_S = 120
COPY_TIMEOUT_S = 6 * 3600
IMAGE = "image.ext4"
DATA = "data"
DATA_MODE = 0o777  # the renter's directory: any user of the image may write to it


def sandboxed(mountinfo: str = "/proc/self/mountinfo", pid1_ns: str = "/proc/1/ns/mnt") -> bool:
    """Does the agent run in a mount namespace of its own, whose mounts the host never sees?

    PID 1's namespace tells, where it can be read; where it cannot, the root's
    mount does: a namespace that only receives the host's mounts (what systemd
    makes for a sandboxed unit) marks it `master:N`.
    """
    try:
        return os.readlink("/proc/self/ns/mnt") != os.readlink(pid1_ns)
    except OSError:
        pass
    try:
        lines = Path(mountinfo).read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        fields = line.split()
        if len(fields) > 6 and fields[4] == "/" and "-" in fields[6:]:
            tags = fields[6 : fields.index("-", 6)]
            return any(tag.startswith("master:") for tag in tags)
    return False


def _host_namespace() -> list[str]:
    """The prefix that runs a command in the host's mount namespace, when the agent is not.

    Under its systemd unit the agent has a mount namespace of its own (the
    sandboxing), from which mounts do not reach dockerd: the mount then runs
    as a transient unit of the service manager (`systemd-run`), in the host's.
    """
    if not sandboxed():
        return []
    if shutil.which("systemd-run"):
        return ["systemd-run", "--quiet", "--wait", "--collect", "--pipe", "--"]
    return ["nsenter", "--mount=/proc/1/ns/mnt", "--"]


def run(argv: list[str], timeout_s: float = TOOL_TIMEOUT_S, host_ns: bool = False) -> str:
    """Runs a tool; its output, or `BackingError` with what it said."""
    command = (_host_namespace() if host_ns else []) + argv
    try:
        done = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BackingError(f"{argv[0]} failed: {e}") from e
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()
        raise BackingError(f"{argv[0]} failed: {said[-1] if said else done.returncode}")
    return done.stdout


def _used_bytes(path: Path) -> int | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def copy_tree(source: Path, target: Path) -> None:
    """Copies a volume's files into another, keeping owners, modes and times (reflinks where
    the filesystem shares blocks)."""
    run(["cp", "-a", "--reflink=auto", f"{source}/.", f"{target}/"], timeout_s=COPY_TIMEOUT_S)


class LoopVolumes:
    """Volumes as ext4 filesystems in sparse files, loop-mounted: works on any filesystem."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _dir(self, volume: Volume) -> Path:
        return self.root / volume.id

    def _image(self, volume: Volume) -> Path:
        return self._dir(volume) / IMAGE

    def _mnt(self, volume: Volume) -> Path:
        return self._dir(volume) / "mnt"

    def data_dir(self, volume: Volume) -> Path:
        return self._mnt(volume) / DATA

    def create(self, volume: Volume) -> None:
        """The image made (sparse), formatted, mounted, and its data directory made."""
        self._dir(volume).mkdir(mode=0o700, parents=True, exist_ok=True)
        self._mnt(volume).mkdir(mode=0o700, exist_ok=True)
        image = self._image(volume)
        with open(image, "wb") as f:
            f.truncate(volume.size_bytes)
        # -m 0: no blocks kept for root, the renter gets the whole size.
        run(["mkfs.ext4", "-q", "-F", "-m", "0", "-L", "qudata-volume", str(image)])
        self.attach(volume, fresh=True)

    def attach(self, volume: Volume, fresh: bool = False) -> Path:
        """Mounted (again, after a reboot) and whole: its data directory, or BackingError."""
        mnt, image = self._mnt(volume), self._image(volume)
        if not os.path.ismount(mnt):
            if not image.is_file():
                raise BackingError(f"its image file {image.name} is missing")
            run(["mount", "-o", "loop,nodev,nosuid", str(image), str(mnt)], host_ns=True)
            if not os.path.ismount(mnt):  # made in the host's namespace, unseen in ours
                raise BackingError(
                    "its mount does not reach the agent's namespace (make / shared:"
                    " mount --make-rshared /)"
                )
            log.info("volume mounted", extra={"volume_id": volume.id, "path": str(mnt)})
        data = self.data_dir(volume)
        if fresh:
            data.mkdir(exist_ok=True)
            data.chmod(DATA_MODE)
        elif not data.is_dir():
            raise BackingError("its filesystem has no data directory (damaged)")
        return data

    def remove(self, volume: Volume) -> None:
        mnt = self._mnt(volume)
        if os.path.ismount(mnt):
            run(["umount", str(mnt)], host_ns=True)
        shutil.rmtree(self._dir(volume), ignore_errors=True)
        if self._dir(volume).exists():
            raise BackingError(f"{self._dir(volume)} could not be removed")

    def used_bytes(self, volume: Volume) -> int | None:
        mnt = self._mnt(volume)
        return _used_bytes(mnt) if os.path.ismount(mnt) else None

    def disk_bytes(self, volume: Volume) -> int:
        """What the volume takes on the host's disk now (its image is sparse)."""
        try:
            return self._image(volume).stat().st_blocks * 512
        except OSError:
            return 0


class XfsProjectVolumes:
    """Volumes as directories with an XFS project quota (the root is on XFS with prjquota)."""

    def __init__(self, root: Path, mount_point: str) -> None:
        self.root = root
        self._mount_point = mount_point  # of the XFS filesystem that holds the root

    def data_dir(self, volume: Volume) -> Path:
        return self.root / volume.id / DATA

    def _quota(self, command: str) -> None:
        run(["xfs_quota", "-x", "-c", command, self._mount_point], host_ns=True)

    def create(self, volume: Volume) -> None:
        if volume.project_id is None:
            raise BackingError("an XFS volume needs a project id")
        data = self.data_dir(volume)
        data.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        data.mkdir(exist_ok=True)
        data.chmod(DATA_MODE)
        self._quota(f"project -s -p {data} {volume.project_id}")
        self._quota(f"limit -p bsoft=0 bhard={volume.size_bytes} {volume.project_id}")

    def attach(self, volume: Volume, fresh: bool = False) -> Path:
        data = self.data_dir(volume)
        if not data.is_dir():
            raise BackingError(f"its directory {data} is missing")
        return data

    def remove(self, volume: Volume) -> None:
        shutil.rmtree(self.root / volume.id, ignore_errors=True)
        if volume.project_id is not None:
            self._quota(f"limit -p bsoft=0 bhard=0 {volume.project_id}")
        if (self.root / volume.id).exists():
            raise BackingError(f"{self.root / volume.id} could not be removed")

    def used_bytes(self, volume: Volume) -> int | None:
        # statfs on a directory with a project quota reports the project's usage.
        data = self.data_dir(volume)
        return _used_bytes(data) if data.is_dir() else None

    def disk_bytes(self, volume: Volume) -> int:
        return self.used_bytes(volume) or 0


def fs_facts(path: Path, mountinfo: str = "/proc/self/mountinfo") -> tuple[FsFacts, str] | None:
    """The filesystem that holds `path` (type and options) and its mount point; None if unknown."""
    try:
        text = Path(mountinfo).read_text()
    except OSError:
        return None
    found = parse_mount(text, os.path.realpath(path))
    return None if found is None else (FsFacts(found.fstype, found.options), found.point)
