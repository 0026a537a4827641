"""domain.volumes: the mechanism chosen per filesystem, mount paths, statuses, admission."""

from __future__ import annotations

from pathlib import Path

import pytest

from qudata_agent.adapters.volume_fs import fs_facts, sandboxed
from qudata_agent.domain.volumes import (
    GIB,
    FsFacts,
    Mechanism,
    State,
    Volume,
    admit_size,
    choose_mechanism,
    mount_path,
    parse_mounts,
    promised_bytes,
)
from qudata_agent.errors import Conflict, InvalidRequest

VID = "11111111-2222-4333-8444-555555555555"


@pytest.mark.parametrize(
    ("facts", "mechanism", "words"),
    [
        (FsFacts("xfs", frozenset({"rw", "prjquota"})), Mechanism.XFS_PROJECT, "prjquota"),
        (FsFacts("xfs", frozenset({"rw", "pquota"})), Mechanism.XFS_PROJECT, "project quota"),
        (FsFacts("xfs", frozenset({"prjquota", "pqnoenforce"})), Mechanism.LOOP, "pqnoenforce"),
        (FsFacts("xfs", frozenset({"rw", "noquota"})), Mechanism.LOOP, "mount it with prjquota"),
        (FsFacts("ext4", frozenset({"rw", "relatime"})), Mechanism.LOOP, "ext4"),
        (FsFacts("btrfs", frozenset({"rw"})), Mechanism.LOOP, "btrfs"),
        (FsFacts("zfs"), Mechanism.LOOP, "loop-mounted"),
        (None, Mechanism.LOOP, "unknown"),
    ],
)
def test_the_mechanism_follows_the_filesystem(
    facts: FsFacts | None, mechanism: Mechanism, words: str
) -> None:
    chosen, why = choose_mechanism(facts)
    assert chosen is mechanism
    assert words in why


@pytest.mark.parametrize(
    ("path", "normal"),
    [
        ("/workspace", "/workspace"),
        ("/workspace/", "/workspace"),
        ("//data//x/./y", "/data/x/y"),
        ("/home/user data", "/home/user data"),
        ("/procfs", "/procfs"),  # not under /proc
        ("/devices", "/devices"),
    ],
)
def test_good_mount_paths_are_normalised(path: str, normal: str) -> None:
    assert mount_path(path) == normal


@pytest.mark.parametrize(
    ("path", "words"),
    [
        ("", "empty"),
        ("workspace", "absolute"),
        ("./w", "absolute"),
        ("/", "root"),
        ("//", "root"),
        ("/.", "root"),
        ("/a/..", "'..'"),
        ("/a/../proc", "'..'"),
        ("/proc", "/proc"),
        ("/proc/sys/kernel", "/proc"),
        ("/sys/fs", "/sys"),
        ("/dev", "/dev"),
        ("/dev/shm", "/dev"),
        ("/.qudata", "/.qudata"),
        ("/.qudata/ssh/x", "/.qudata"),
        ("//proc//x", "/proc"),
        ("/x\x00y", "NUL"),
        ("/" + "a" * 2000, "too long"),
    ],
)
def test_bad_mount_paths_are_refused(path: str, words: str) -> None:
    with pytest.raises(InvalidRequest) as e:
        mount_path(path)
    assert words in e.value.message


def test_an_orders_mounts_are_distinct_and_not_nested() -> None:
    assert parse_mounts({"a": "/x/", "b": "/y"}) == {"a": "/x", "b": "/y"}
    with pytest.raises(InvalidRequest, match="given twice"):
        parse_mounts({"a": "/x", "b": "/x/"})
    with pytest.raises(InvalidRequest, match="inside"):
        parse_mounts({"a": "/x", "b": "/x/y"})
    with pytest.raises(InvalidRequest, match="at most"):
        parse_mounts({f"v{i}": f"/v{i}" for i in range(17)})


def _volume(state: State = State.READY, instance_id: str | None = None) -> Volume:
    return Volume(VID, GIB, Mechanism.LOOP, state, 1.0, instance_id=instance_id, reason="why")


def test_wire_status_and_who_may_attach() -> None:
    assert _volume().status == "ready"
    _volume().check_attachable()
    assert _volume(instance_id="i-1").status == "in_use"
    with pytest.raises(Conflict, match="in use by instance i-1"):
        _volume(instance_id="i-1").check_attachable()
    assert _volume(State.ERROR, instance_id="i-1").status == "error"
    with pytest.raises(Conflict, match="damaged: why"):
        _volume(State.ERROR).check_attachable()
    with pytest.raises(Conflict, match="being deleted"):
        _volume(State.DELETING).check_attachable()
    with pytest.raises(Conflict, match="being created"):
        _volume(State.CREATING).check_attachable()


def test_admission_counts_what_volumes_promised_and_have_not_written() -> None:
    volumes = [_volume(), Volume("b", 2 * GIB, Mechanism.LOOP, State.READY, 1.0)]
    promised = promised_bytes(volumes, {VID: GIB // 2})
    assert promised == GIB // 2 + 2 * GIB
    admit_size(GIB, 4 * GIB, promised)  # 1.5 GiB left
    with pytest.raises(Conflict, match=r"needs 2.00 GiB of disk for the volume, 1.50 GiB free"):
        admit_size(2 * GIB, 4 * GIB, promised)
    admit_size(10 * GIB, None, promised)  # an unmeasured disk never refuses
    with pytest.raises(InvalidRequest, match=r"at least 0\.032"):
        admit_size(1024**2, None, 0)
    assert promised_bytes([_volume(State.ERROR)], {}) == 0


MOUNTINFO = """\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
40 22 259:1 / /var/lib/qa rw,noatime shared:20 - xfs /dev/nvme1n1 rw,attr2,inode64,prjquota
41 40 7:0 / /var/lib/qa/volumes/v1/mnt rw,nodev,nosuid shared:21 - ext4 /dev/loop0 rw
42 22 0:50 / /srv/with\\040space rw shared:22 - btrfs /dev/sdb rw,space_cache=v2
"""


@pytest.mark.parametrize(
    ("path", "fs_type", "point", "mechanism"),
    [
        ("/var/lib/qa/volumes", "xfs", "/var/lib/qa", Mechanism.XFS_PROJECT),
        (
            "/var/lib/qa/volumes/v1/mnt/data",
            "ext4",
            "/var/lib/qa/volumes/v1/mnt",
            Mechanism.LOOP,
        ),
        ("/var/lib/q", "ext4", "/", Mechanism.LOOP),
        ("/srv/with space/volumes", "btrfs", "/srv/with space", Mechanism.LOOP),
    ],
)
def test_the_facts_of_the_filesystem_that_holds_a_path(
    tmp_path: Path, path: str, fs_type: str, point: str, mechanism: Mechanism
) -> None:
    sample = tmp_path / "mountinfo"
    sample.write_text(MOUNTINFO)
    found = fs_facts(Path(path), str(sample))
    assert found is not None
    facts, mount_point = found
    assert (facts.fs_type, mount_point) == (fs_type, point)
    assert choose_mechanism(facts)[0] is mechanism


def test_no_mountinfo_means_unknown_facts(tmp_path: Path) -> None:
    assert fs_facts(tmp_path, str(tmp_path / "missing")) is None


@pytest.mark.parametrize(
    ("root_line", "expected"),
    [
        ("22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw", False),  # the host's
        ("22 1 254:0 / / rw,relatime - ext4 /dev/vda rw", False),  # private, no systemd
        ("301 280 254:0 / / ro,relatime master:1 - ext4 /dev/vda rw", True),  # a unit's
        ("301 280 254:0 / / ro shared:155 master:1 - ext4 /dev/vda rw", True),
    ],
)
def test_a_sandboxed_namespace_is_told_by_its_roots_propagation(
    tmp_path: Path, root_line: str, expected: bool
) -> None:
    sample = tmp_path / "mountinfo"
    sample.write_text(root_line + "\n40 22 0:5 / /proc rw - proc proc rw\n")
    assert sandboxed(str(sample), pid1_ns=str(tmp_path / "unreadable")) is expected
