"""The loop volume backing for real: an ext4 image made, filled, mounted again, damaged.

Writes go through a real container of the main dockerd that bind-mounts the
volume's directory, as an instance does; the test unmounts what it mounted,
also when it fails. (XFS project quotas need a kernel with CONFIG_XFS_QUOTA,
which CI's lacks: `tests/hosts/check_xfs_volumes.py` checks that backing by
hand; its decision and mount facts are unit-tested.)
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from qudata_agent.adapters.volume_fs import LoopVolumes
from qudata_agent.domain.volumes import BackingError, Mechanism, State, Volume
from support.docker_api import docker
from support.volumes import mounts_under, unmount_under

pytestmark = pytest.mark.docker

MIB = 1024**2
BUSYBOX = "qudata-test/busybox:1"


def _volume(size: int, mechanism: Mechanism) -> Volume:
    return Volume(str(uuid.uuid4()), size, mechanism, State.CREATING, 1.0)


def _write_in_container(data: Path, megabytes: int) -> str:
    """dd of `megabytes` MiB into the directory, bound as a volume is; what dd said."""
    return docker(
        "run",
        "--rm",
        "--mount",
        f"type=bind,source={data},target=/v",
        BUSYBOX,
        "sh",
        "-c",
        f"dd if=/dev/zero of=/v/fill bs=1M count={megabytes} conv=fsync 2>&1; echo rc=$?",
    )


def test_a_loop_volume_is_mounted_again_and_refuses_a_missing_image(tmp_path: Path) -> None:
    root = tmp_path / "volumes"
    backing = LoopVolumes(root)
    volume = _volume(24 * MIB, Mechanism.LOOP)
    try:
        backing.create(volume)
        data = backing.attach(volume)
        (data / "kept").write_text("yes")
        out = _write_in_container(data, 40)
        assert "No space left on device" in out and "rc=0" not in out, out
        # What a reboot does: the mount is gone. attach mounts it again, data intact.
        unmount_under(root)
        assert not (data / "kept").exists()  # the bare mount point holds nothing
        assert backing.used_bytes(volume) is None
        assert (backing.attach(volume) / "kept").read_text() == "yes"
        assert backing.disk_bytes(volume) <= 24 * MIB
        # The image gone: an error naming it, never an empty directory.
        unmount_under(root)
        (root / volume.id / "image.ext4").unlink()
        with pytest.raises(BackingError, match="image file"):
            backing.attach(volume)
        assert not data.exists()
        backing.remove(volume)
        assert not (root / volume.id).exists() and mounts_under(root) == []
    finally:
        unmount_under(root)
