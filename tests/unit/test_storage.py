"""storage_gb: the host's quota support, admission, the watch, and the instance service's use.

The decisions (domain.storage) are pure tables; the mountinfo parser runs on
lines captured from real hosts (ext4 with Docker's bind mount, a btrfs loop
mount under a second daemon) and, for xfs, on lines in the kernel's format
(`xfs_showargs` prints `prjquota` when project quotas are enforced,
`pqnoenforce` when only counted, `noquota` when off). The guard and the
instance service run against a real store and small fakes of the engine.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from qudata_agent.adapters.docker import DockerError
from qudata_agent.adapters.docker.ports import DockerPorts
from qudata_agent.adapters.host import mount_options, parse_mount_options
from qudata_agent.adapters.store import Store
from qudata_agent.blocking import Blocking
from qudata_agent.config import ConfigError, load_settings
from qudata_agent.domain.instance import Instance, Status, Wanted
from qudata_agent.domain.order import CreateOrder
from qudata_agent.domain.storage import (
    GIB,
    QuotaSupport,
    StorageInfo,
    StoragePolicy,
    StorageRequest,
    StorageUsage,
    admit,
    quota_support,
    usage,
)
from qudata_agent.errors import Conflict, NotFound, Unavailable
from qudata_agent.services.storage import StorageGuard, detect_quota_support
from qudata_agent.wiring import StorageReads
from support.fake_engine import FakeEngine, Stack

SAMPLES = Path(__file__).parent / "samples"
XFS_ROOT = "/var/lib/docker"

# -- which hosts can cap a container's size --------------------------------------


@pytest.mark.parametrize(
    ("driver", "backing", "options", "enforceable", "words"),
    [
        ("btrfs", None, None, True, "btrfs qgroup"),
        ("zfs", None, None, True, "zfs quota"),
        ("overlay2", "xfs", {"rw", "prjquota"}, True, "xfs project quota"),
        ("overlay2", "xfs", {"rw", "pquota"}, True, "xfs project quota"),
        ("overlay2", "XFS", {"rw", "PRJQUOTA"}, True, "xfs project quota"),
        ("overlay2", "xfs", {"rw", "noquota"}, False, "without project quotas"),
        ("overlay2", "xfs", {"rw", "usrquota"}, False, "without project quotas"),
        ("overlay2", "xfs", {"rw", "pqnoenforce"}, False, "not enforced"),
        ("overlay2", "xfs", None, False, "could not be read"),
        ("overlay2", "extfs", {"rw", "prjquota"}, False, "overlay2 on extfs"),
        ("overlay2", None, None, False, "unknown filesystem"),
        ("overlay", "xfs", {"prjquota"}, False, "overlay cannot"),
        ("devicemapper", None, None, False, "devicemapper cannot"),
        ("vfs", None, None, False, "vfs cannot"),
        ("fuse-overlayfs", None, None, False, "fuse-overlayfs cannot"),
        ("", None, None, False, "(unknown) cannot"),
    ],
)
def test_quota_support_by_driver_and_filesystem(
    driver: str, backing: str | None, options: set[str] | None, enforceable: bool, words: str
) -> None:
    support = quota_support(driver, backing, options, "/srv/docker")
    assert support.enforceable is enforceable
    assert words in support.how
    assert bool(support.fix) is not enforceable  # a fix exactly where one is needed
    assert support.driver == driver.lower() and support.data_root == "/srv/docker"


def test_the_fix_names_the_data_root_and_what_to_do() -> None:
    xfs = quota_support("overlay2", "xfs", {"rw", "noquota"}, "/srv/docker")
    assert "/srv/docker" in xfs.fix and "pquota" in xfs.fix and "restart Docker" in xfs.fix
    ext4 = quota_support("overlay2", "extfs", {"rw"}, "/srv/docker")
    assert "xfs" in ext4.fix and "btrfs" in ext4.fix and "/srv/docker" in ext4.fix
    assert "Docker's data root" in quota_support("overlay2", "extfs", None).fix


def test_quota_support_reads_as_one_line_and_as_a_dict() -> None:
    good = quota_support("btrfs", None, None, "/var/lib/docker")
    assert good.summary() == (
        "container disk size (storage_gb) enforced: btrfs qgroup limit on each container's"
        " subvolume"
    )
    bad = quota_support("overlay2", "extfs", {"rw"}, "/var/lib/docker")
    assert bad.summary().startswith("container disk size (storage_gb) NOT enforced: overlay2")
    assert "Fix: put /var/lib/docker on an xfs filesystem" in bad.summary()
    assert bad.as_dict() == {
        "enforceable": False,
        "how": bad.how,
        "fix": bad.fix,
        "driver": "overlay2",
        "backing_filesystem": "extfs",
        "data_root": "/var/lib/docker",
    }


# -- mount options of the data root ------------------------------------------------


def test_mount_options_of_a_bind_mounted_data_root_on_ext4() -> None:
    text = (SAMPLES / "mountinfo_ext4_docker_bind.txt").read_text()
    options = parse_mount_options(text, "/var/lib/docker")
    assert options is not None and {"rw", "discard", "resv_strict"} <= options
    assert "shared:1" not in options  # optional fields are not options
    # An overlay mount deeper down does not hold the data root itself.
    assert parse_mount_options(text, "/var/lib/docker/volumes") == options
    assert "noexec" not in (parse_mount_options(text, "/var/lib/dockerx") or set())
    assert parse_mount_options(text, "/") == parse_mount_options(text, "/home")


def test_mount_options_of_a_data_root_on_a_btrfs_loop_mount() -> None:
    text = (SAMPLES / "mountinfo_btrfs_data_root.txt").read_text()
    root = "/var/tmp/qudata-btrfs-3ajazhdj/mnt/data"
    options = parse_mount_options(text, root)
    assert options is not None and "space_cache=v2" in options and "subvolid=5" in options


def test_mount_options_with_xfs_project_quotas_stacked_mounts_and_escapes() -> None:
    text = "\n".join(
        [
            "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw",
            # shadowed by the mount on the same point below it (the last wins)
            "60 27 8:17 / /var/lib/docker rw,relatime - xfs /dev/sdb1 rw,noquota",
            "61 27 8:17 / /var/lib/docker rw,relatime shared:60 - xfs /dev/sdb1"
            " rw,attr2,inode64,logbufs=8,logbsize=32k,prjquota",
            r"62 27 8:33 / /srv/my\040docker rw,noatime - xfs /dev/sdc1 rw,pqnoenforce",
            "garbage line",
            "",
        ]
    )
    assert "prjquota" in (parse_mount_options(text, "/var/lib/docker") or ())
    assert "pqnoenforce" in (parse_mount_options(text, "/srv/my docker/data") or ())
    assert "noatime" in (parse_mount_options(text, "/srv/my docker") or ())
    assert parse_mount_options(text, "/srv/my") == frozenset({"rw", "relatime"})
    assert parse_mount_options("", "/var/lib/docker") is None


def test_mount_options_reads_the_file_and_resolves_links(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "27 1 254:0 / / rw - ext4 /dev/vda rw\n"
        f"90 27 8:1 / {tmp_path}/real rw - xfs /dev/sdb rw,prjquota\n"
    )
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert "prjquota" in (mount_options(str(tmp_path / "link"), str(info)) or ())
    assert mount_options("/x", str(tmp_path / "missing")) is None


# -- admission ------------------------------------------------------------------------

ENFORCING = quota_support("btrfs", None, None, "/var/lib/docker")
NOT_ENFORCING = quota_support("overlay2", "extfs", {"rw"}, "/var/lib/docker")


def test_an_enforcing_host_gets_the_size_as_a_limit() -> None:
    assert admit(10, ENFORCING, StoragePolicy.REFUSE, 100 * GIB) == 10 * GIB
    assert admit(0.5, ENFORCING, StoragePolicy.MONITOR, None) == GIB // 2


def test_a_host_that_cannot_enforce_refuses_or_watches_by_policy() -> None:
    with pytest.raises(Conflict) as refused:
        admit(10, NOT_ENFORCING, StoragePolicy.REFUSE, 100 * GIB)
    message = refused.value.message
    assert "cannot be enforced" in message and "overlay2 on extfs" in message
    assert "pquota" in message and "QUDATA_STORAGE_POLICY=monitor" in message
    assert admit(10, NOT_ENFORCING, StoragePolicy.MONITOR, 100 * GIB) is None


@pytest.mark.parametrize("support", [ENFORCING, NOT_ENFORCING])
@pytest.mark.parametrize("policy", list(StoragePolicy))
def test_more_than_the_free_space_is_refused_whatever_the_host(
    support: QuotaSupport, policy: StoragePolicy
) -> None:
    with pytest.raises(Conflict, match=r"storage_gb 50 is more than the 49\.5 GB free"):
        admit(50, support, policy, int(49.5 * GIB))
    with pytest.raises(Conflict, match="/var/lib/docker"):
        admit(9.9, support, policy, 0)


def test_unknown_free_space_is_not_checked() -> None:
    assert admit(1_000_000, ENFORCING, StoragePolicy.REFUSE, None) == 1_000_000 * GIB


def test_usage_is_over_the_limit_only_when_measured_above_it() -> None:
    request = StorageRequest(requested_bytes=2 * GIB, enforced=False)
    assert usage(request, None) == StorageUsage(2.0, False, None, False)
    assert usage(request, 2 * GIB) == StorageUsage(2.0, False, 2.0, False)
    assert usage(request, 3 * GIB + GIB // 2) == StorageUsage(2.0, False, 3.5, True)
    assert usage(StorageRequest(GIB // 3, True), None).requested_gb == 0.333


def test_the_policy_setting() -> None:
    assert load_settings({}).storage_policy is StoragePolicy.MONITOR
    assert load_settings({"QUDATA_STORAGE_POLICY": "Refuse"}).storage_policy is StoragePolicy.REFUSE
    with pytest.raises(ConfigError, match="QUDATA_STORAGE_POLICY: expected one of refuse, monitor"):
        load_settings({"QUDATA_STORAGE_POLICY": "ignore"})
    assert load_settings({"QUDATA_STORAGE_CHECK_INTERVAL": "5"}).storage_check_interval_s == 5
    with pytest.raises(ConfigError, match="QUDATA_STORAGE_CHECK_INTERVAL"):
        load_settings({"QUDATA_STORAGE_CHECK_INTERVAL": "0"})


# -- the guard ---------------------------------------------------------------------------


class StorageEngine(FakeEngine):
    """The shared fake engine, with `docker info`'s storage part and layer sizes set by the test."""

    def __init__(self, info: StorageInfo) -> None:
        super().__init__()
        self.info = info
        self.info_error: Exception | None = None
        self.sizes: dict[str, int] = {}
        self.measured: list[str] = []

    def storage_info(self) -> StorageInfo:
        if self.info_error is not None:
            raise self.info_error
        return self.info

    def writable_layer_bytes(self, container_id: str) -> int:
        self.measured.append(container_id)
        if container_id not in self.sizes:
            raise NotFound(f"no container {container_id}")
        return self.sizes[container_id]


EXT4 = StorageInfo("overlay2", "extfs", "/var/lib/docker")
BTRFS = StorageInfo("btrfs", None, "/srv/docker")


class Parts:
    def __init__(self, tmp_path: Path, info: StorageInfo, policy: StoragePolicy) -> None:
        self.engine = StorageEngine(info)
        self.store = Store.open(tmp_path / "agent.db")
        self.blocking = Blocking()
        self.free: dict[str, int | None] = {}
        self.policy = policy
        self.guard = self.make_guard(policy)

    def make_guard(self, policy: StoragePolicy) -> StorageGuard:
        return StorageGuard(
            DockerPorts(self.engine, self.blocking),
            self.store,
            self.blocking,
            storage_info=self.engine.storage_info,
            policy=policy,
            mount_options=lambda path: frozenset({"rw"}),
            free_bytes=lambda path: self.free.get(path, 500 * GIB),
        )

    def service(self) -> Stack:
        """The instance side as the agent wires it, with a guard of the same policy."""
        return Stack(
            self.engine,
            self.store,
            self.blocking,
            storage=StorageReads(
                mount_options=lambda path: frozenset({"rw"}), storage_info=self.engine.storage_info
            ),
            storage_policy=self.policy,
            free_bytes=lambda path: self.free.get(path, 500 * GIB),
        )

    def close(self) -> None:
        self.blocking.close()
        self.store.close()


@pytest.fixture
async def monitor(tmp_path: Path) -> AsyncIterator[Parts]:
    parts = Parts(tmp_path, EXT4, StoragePolicy.MONITOR)
    yield parts
    parts.close()


def _instance(instance_id: str, container_id: str | None = "c1") -> Instance:
    return Instance(
        id=instance_id,
        status=Status.RUNNING,
        wanted=Wanted.RUNNING,
        image="present:1",
        container_name=f"qudata-{instance_id}",
        container_id=container_id,
    )


def test_detect_quota_support_asks_docker_and_the_mount_table() -> None:
    asked: list[str] = []

    def options(path: str) -> frozenset[str]:
        asked.append(path)
        return frozenset({"rw", "prjquota"})

    support = detect_quota_support(
        StorageEngine(StorageInfo("overlay2", "xfs", "/data/docker")).storage_info, options
    )
    assert support.enforceable and support.data_root == "/data/docker"
    assert asked == ["/data/docker"]


async def test_detection_is_logged_once_and_again_when_it_changes(
    monitor: Parts, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="qudata_agent.services.storage")
    await monitor.guard.detect()
    await monitor.guard.detect()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "cannot be enforced" in warnings[0].getMessage()
    assert "accepted; the layer is watched" in warnings[0].getMessage()
    assert warnings[0].policy == "monitor" and "pquota" in warnings[0].fix  # type: ignore[attr-defined]
    monitor.engine.info = BTRFS
    await monitor.guard.detect()
    assert caplog.records[-1].levelno == logging.INFO
    assert caplog.records[-1].driver == "btrfs"  # type: ignore[attr-defined]
    assert monitor.guard.support().enforceable


async def test_docker_down_leaves_the_support_unknown_until_it_answers(monitor: Parts) -> None:
    monitor.engine.info_error = Unavailable("Docker is not reachable")
    with pytest.raises(Unavailable):
        await monitor.guard.detect()
    with pytest.raises(Unavailable):
        monitor.guard.admit("i-1", 1)
    monitor.engine.info_error = None
    assert monitor.guard.admit("i-1", 1) is None


async def test_admit_records_the_request_and_prunes_gone_instances(monitor: Parts) -> None:
    assert monitor.guard.admit("gone", 1) is None
    monitor.store.insert_instance(_instance("kept"))
    assert monitor.guard.admit("kept", 2.5) is None
    assert monitor.store.storage_requests() == {
        "kept": StorageRequest(requested_bytes=int(2.5 * GIB), enforced=False, default=False)
    }
    view = await _view(monitor.guard, _instance("kept"))
    assert view == StorageUsage(requested_gb=2.5, enforced=False, used_gb=None, over_limit=False)
    assert await _view(monitor.guard, _instance("other")) is None


async def test_the_record_survives_a_new_guard_and_goes_with_the_instance(monitor: Parts) -> None:
    monitor.store.insert_instance(_instance("i-1"))
    monitor.guard.admit("i-1", 3)
    again = monitor.make_guard(StoragePolicy.MONITOR)
    assert (await _view(again, _instance("i-1"))) == StorageUsage(3.0, False, None, False)
    monitor.store.delete_instance("i-1")
    assert await _view(again, _instance("i-1")) is None


async def test_the_watch_measures_uncapped_layers_and_logs_crossings(
    monitor: Parts, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="qudata_agent.services.storage")
    instance = _instance("i-1", "c1")
    monitor.store.insert_instance(instance)
    monitor.guard.admit("i-1", 1)
    monitor.engine.sizes["c1"] = GIB // 2
    await monitor.guard.check([instance])
    assert await _view(monitor.guard, instance) == StorageUsage(1.0, False, 0.5, False)
    over = [r for r in caplog.records if "over its storage_gb" in r.getMessage()]
    assert over == []

    monitor.engine.sizes["c1"] = 2 * GIB
    await monitor.guard.check([instance])
    await monitor.guard.check([instance])
    assert await _view(monitor.guard, instance) == StorageUsage(1.0, False, 2.0, True)
    over = [r for r in caplog.records if "over its storage_gb" in r.getMessage()]
    assert len(over) == 1 and over[0].levelno == logging.WARNING
    assert over[0].instance_id == "i-1" and over[0].used_gb == 2.0  # type: ignore[attr-defined]

    monitor.engine.sizes["c1"] = GIB // 4
    await monitor.guard.check([instance])
    assert "back within its storage_gb" in caplog.records[-1].getMessage()
    assert (await _view(monitor.guard, instance)).over_limit is False  # type: ignore[union-attr]


async def test_the_watch_leaves_capped_unasked_and_vanished_containers_alone(
    tmp_path: Path,
) -> None:
    parts = Parts(tmp_path, BTRFS, StoragePolicy.MONITOR)
    try:
        capped = _instance("capped", "c1")
        parts.store.insert_instance(capped)
        assert parts.guard.admit("capped", 1) == GIB
        await parts.guard.check([capped])
        await parts.guard.check([_instance("unasked", "c2")])
        await parts.guard.check([])
        await parts.guard.check([_instance("no-container", None)])
        assert parts.engine.measured == []
        assert await _view(parts.guard, capped) == StorageUsage(1.0, True, None, False)

        parts.engine.info = EXT4
        parts.guard.admit("capped", 1)  # the support known so far: still capped
        await parts.guard.check([capped])
        assert parts.engine.measured == []
        parts.guard.admit("capped", 1)  # the check found the change: now watched
        await parts.guard.check([capped])  # c1 has no size: removed meanwhile
        assert parts.engine.measured == ["c1"]
    finally:
        parts.close()


# -- through the instance service ------------------------------------------------------------


async def _running(service: Stack) -> Instance:
    for _ in range(500):
        instance = await service.current()
        if instance is not None and instance.status is Status.RUNNING:
            return instance
        await asyncio.sleep(0.01)
    raise AssertionError(f"never running: {await service.current()}")


async def test_refuse_policy_on_a_host_that_cannot_enforce(tmp_path: Path) -> None:
    parts = Parts(tmp_path, EXT4, StoragePolicy.REFUSE)
    service = parts.service()
    try:
        with pytest.raises(Conflict, match="pquota"):
            await service.create(
                CreateOrder(image="present", image_tag="1", storage_gb=10, ports={"80": "auto"})
            )
        assert await service.current() is None
        assert parts.store.allocated_ports() == frozenset() and parts.engine.specs == {}
        # Without storage_gb the same host takes the order: its default share is watched.
        await service.create(CreateOrder(image="present", image_tag="1"))
        running = await _running(service)
        assert parts.engine.specs[running.container_id or ""].storage_bytes is None
        storage = (await service.describe()).storage
        assert storage is not None and storage.default and not storage.enforced
    finally:
        await service.close()
        parts.close()


async def test_monitor_policy_accepts_and_says_it_is_not_enforced(monitor: Parts) -> None:
    service = monitor.service()
    try:
        await service.create(CreateOrder(image="present", image_tag="1", storage_gb=10))
        running = await _running(service)
        assert monitor.engine.specs[running.container_id or ""].storage_bytes is None
        view = await service.describe()
        assert view.storage == StorageUsage(10.0, False, None, False)
    finally:
        await service.close()


async def test_an_enforcing_host_puts_the_limit_on_the_container(tmp_path: Path) -> None:
    parts = Parts(tmp_path, BTRFS, StoragePolicy.REFUSE)
    service = parts.service()
    try:
        await service.create(CreateOrder(image="present", image_tag="1", storage_gb=1.5))
        running = await _running(service)
        assert parts.engine.specs[running.container_id or ""].storage_bytes == int(1.5 * GIB)
        assert (await service.describe()).storage == StorageUsage(1.5, True, None, False)
    finally:
        await service.close()
        parts.close()


async def test_more_than_the_free_space_is_refused_by_the_service(tmp_path: Path) -> None:
    parts = Parts(tmp_path, BTRFS, StoragePolicy.MONITOR)
    parts.free["/srv/docker"] = 20 * GIB
    service = parts.service()
    try:
        with pytest.raises(Conflict, match=r"more than the 20\.0 GB free"):
            await service.create(CreateOrder(image="present", image_tag="1", storage_gb=21))
        assert await service.current() is None
    finally:
        await service.close()
        parts.close()


async def test_a_layer_that_cannot_be_measured_does_not_stop_the_others(
    monitor: Parts, caplog: pytest.LogCaptureFixture
) -> None:
    """A tenant's layer whose walk times out costs its own figure, not everyone's watch."""
    caplog.set_level(logging.INFO, logger="qudata_agent.services.storage")
    slow, other = _instance("slow", "c1"), _instance("other", "c2")
    for instance in (slow, other):
        monitor.store.insert_instance(instance)
        monitor.guard.admit(instance.id, 1)
    monitor.engine.sizes.update({"c1": GIB // 2, "c2": GIB // 4})
    await monitor.guard.check([slow, other])

    def timed_out(container_id: str) -> int:
        if container_id == "c1":
            raise DockerError("measuring container c1 timed out")
        return 2 * GIB

    monitor.engine.writable_layer_bytes = timed_out  # type: ignore[method-assign]
    await monitor.guard.check([slow, other])
    await monitor.guard.check([slow, other])
    assert await _view(monitor.guard, slow) == StorageUsage(
        1.0, False, 0.5, False
    )  # the last figure
    assert await _view(monitor.guard, other) == StorageUsage(1.0, False, 2.0, True)
    missed = [r for r in caplog.records if r.getMessage() == "instance disk use not measured"]
    assert len(missed) == 1 and missed[0].instance_id == "slow"  # type: ignore[attr-defined]


async def test_an_order_without_storage_gb_gets_the_default_capped_where_the_host_can(
    tmp_path: Path,
) -> None:
    parts = Parts(tmp_path, BTRFS, StoragePolicy.REFUSE)
    service = parts.service()
    try:
        await service.create(CreateOrder(image="present", image_tag="1"))
        running = await _running(service)
        capped = parts.engine.specs[running.container_id or ""].storage_bytes
        storage = (await service.describe()).storage
        assert storage is not None and storage.default and storage.enforced
        assert capped is not None and capped == int(storage.requested_gb * GIB)
    finally:
        await service.close()
        parts.close()


async def test_volume_paths_are_counted_with_the_layer_even_where_the_layer_is_capped(
    tmp_path: Path,
) -> None:
    from qudata_agent.domain.container_spec import ContainerState

    parts = Parts(tmp_path, BTRFS, StoragePolicy.MONITOR)
    walked: list[str] = []

    def tree(path: str) -> int:
        walked.append(path)
        return {"/v/a": GIB, "/v/b": GIB // 2}[path]

    guard = StorageGuard(
        DockerPorts(parts.engine, parts.blocking),
        parts.store,
        parts.blocking,
        storage_info=parts.engine.storage_info,
        policy=StoragePolicy.MONITOR,
        mount_options=lambda path: frozenset({"rw"}),
        free_bytes=lambda path: 500 * GIB,
        tree_bytes=tree,
    )
    try:
        plain, with_volumes = _instance("plain", "c1"), _instance("vols", "c2")
        for instance in (plain, with_volumes):
            parts.store.insert_instance(instance)
            assert guard.admit(instance.id, 1) == GIB  # the layer is capped
        parts.engine.containers["c1"] = ContainerState(
            "c1", "qudata-plain", "plain", "a", "running"
        )
        parts.engine.containers["c2"] = ContainerState(
            "c2", "qudata-vols", "vols", "a", "running", anonymous_volumes=("/v/a", "/v/b")
        )
        parts.engine.sizes.update({"c1": GIB // 4, "c2": GIB // 4})
        await guard.check([plain, with_volumes])
        assert parts.engine.measured == ["c2"]  # a capped layer alone is not walked
        assert sorted(walked) == ["/v/a", "/v/b"]
        assert await _view(guard, plain) == StorageUsage(1.0, True, None, False)
        assert await _view(guard, with_volumes) == StorageUsage(1.0, True, 1.75, True)
    finally:
        parts.close()


async def _view(guard: StorageGuard, instance: Instance) -> StorageUsage | None:
    return (await guard.views([instance])).get(instance.id)
