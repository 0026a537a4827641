"""The NVML adapter: the real library on this GPU-less host, and small fakes of pynvml."""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from qudata_agent.adapters.nvml import Nvml, nvidia_on_pci_bus, read_numa_node, sysfs_bus_id
from qudata_agent.domain.inventory import GpuInfo, GpuReport
from qudata_agent.domain.topology import GpuPlace, Link
from qudata_agent.errors import Unavailable

HAS_DRIVER = Path("/proc/driver/nvidia/version").exists()


class FakeNVMLError(Exception):
    def __str__(self) -> str:
        return "Driver Not Loaded"


@dataclass
class FakeMemory:
    total: int


class FakeNvml:
    """Two GPUs; `names` may be bytes, as older pynvml releases return."""

    NVMLError = FakeNVMLError

    def __init__(self, names: tuple[str | bytes, ...] = ("NVIDIA H100 80GB HBM3",) * 2) -> None:
        self.names = names
        self.inits = 0
        self.shutdowns = 0
        self.threads: set[str] = set()

    def _seen(self) -> None:
        self.threads.add(threading.current_thread().name)

    def nvmlInit(self) -> None:
        self._seen()
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self._seen()
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        self._seen()
        return len(self.names)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> str | bytes:
        uuid = f"GPU-{handle:04d}"
        return uuid.encode() if isinstance(self.names[handle], bytes) else uuid

    def nvmlDeviceGetName(self, handle: int) -> str | bytes:
        return self.names[handle]

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> FakeMemory:
        return FakeMemory(total=(handle + 1) * 1024**3)

    def nvmlSystemGetDriverVersion(self) -> str:
        return "550.54.15"

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return 12040

    def nvmlSystemGetCudaDriverVersion_v2(self) -> int:
        return 12100


class BrokenNvml(FakeNvml):
    def nvmlInit(self) -> None:
        raise FakeNVMLError()


@pytest.mark.skipif(HAS_DRIVER, reason="this host has an NVIDIA driver")
def test_real_nvml_without_gpu_degrades() -> None:
    nvml = Nvml()
    try:
        report = nvml.report()
        again = nvml.report()
    finally:
        nvml.close()
    assert report.gpus == ()
    assert report.error  # the library or the driver is missing here
    assert report.driver_version is None
    assert report.cuda_version is None
    assert again == report


@pytest.mark.skipif(HAS_DRIVER, reason="this host has an NVIDIA driver")
async def test_real_nvml_report_async_without_gpu() -> None:
    nvml = Nvml()
    try:
        report = await nvml.report_async()
    finally:
        nvml.close()
    assert report.gpus == ()
    assert report.error


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_DRIVER, reason="needs an NVIDIA GPU and driver")
def test_real_nvml_with_gpu() -> None:
    nvml = Nvml()
    try:
        report = nvml.report()
    finally:
        nvml.close()
    assert report.error is None
    assert report.gpus
    assert all(gpu.uuid.startswith(("GPU-", "MIG-")) for gpu in report.gpus)
    assert all(gpu.memory_total_bytes > 0 for gpu in report.gpus)
    assert report.driver_version
    assert report.cuda_version is not None
    assert "." in report.cuda_version


def test_two_gpus_from_a_fake() -> None:
    fake = FakeNvml()
    nvml = Nvml(fake)
    try:
        report = nvml.report()
        nvml.report()
    finally:
        nvml.close()
    assert report == GpuReport(
        gpus=(
            GpuInfo(0, "GPU-0000", "NVIDIA H100 80GB HBM3", 1024**3),
            GpuInfo(1, "GPU-0001", "NVIDIA H100 80GB HBM3", 2 * 1024**3),
        ),
        driver_version="550.54.15",
        cuda_version="12.10",  # the _v2 call is preferred when present
        error=None,
    )
    assert fake.inits == 1  # initialised once, kept between reports
    assert fake.shutdowns == 1  # by close()
    assert len(fake.threads) == 1
    assert next(iter(fake.threads)).startswith("nvml")


def test_bytes_names_are_decoded() -> None:
    nvml = Nvml(FakeNvml(names=(b"Tesla T4", b"NVIDIA GeForce RTX 4090")))
    try:
        report = nvml.report()
    finally:
        nvml.close()
    assert [gpu.name for gpu in report.gpus] == ["Tesla T4", "NVIDIA GeForce RTX 4090"]
    assert [gpu.uuid for gpu in report.gpus] == ["GPU-0000", "GPU-0001"]


def test_failing_init_degrades_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    nvml = Nvml(BrokenNvml())
    with caplog.at_level(logging.INFO, logger="qudata_agent.adapters.nvml"):
        try:
            reports = [nvml.report() for _ in range(3)]
        finally:
            nvml.close()
    assert reports == [GpuReport(error="Driver Not Loaded")] * 3
    assert len(caplog.records) == 1


def test_no_cuda_version_keeps_the_gpus() -> None:
    class NoCuda(FakeNvml):
        def nvmlSystemGetCudaDriverVersion_v2(self) -> int:
            raise FakeNVMLError()

    nvml = Nvml(NoCuda())
    try:
        report = nvml.report()
    finally:
        nvml.close()
    assert len(report.gpus) == 2
    assert report.cuda_version is None
    assert report.error is None


async def test_report_async_with_a_fake() -> None:
    fake = FakeNvml()
    nvml = Nvml(fake)
    try:
        reports = await asyncio.gather(*(nvml.report_async() for _ in range(5)))
    finally:
        nvml.close()
    assert all(len(report.gpus) == 2 for report in reports)
    assert fake.inits == 1
    assert len(fake.threads) == 1


def test_close_is_safe_to_repeat_and_report_after_close_degrades() -> None:
    fake = FakeNvml()
    nvml = Nvml(fake)
    nvml.close()
    nvml.close()
    assert fake.shutdowns == 0  # never initialised, nothing to shut down
    assert nvml.report().gpus == ()
    assert nvml.report().error


class HangingNvml(FakeNvml):
    """A driver call that hangs until the test lets it go."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.hang = True

    def nvmlDeviceGetCount(self) -> int:
        if self.hang:
            self.release.wait(10)
        return super().nvmlDeviceGetCount()


async def test_a_hung_driver_never_holds_a_caller_past_the_timeout() -> None:
    fake = HangingNvml()
    nvml = Nvml(fake, call_timeout_s=0.2, gpu_list_max_age_s=0)
    try:
        loop = asyncio.get_running_loop()
        began = loop.time()
        report = await nvml.report_async()
        assert report.gpus == () and "did not answer" in (report.error or "")
        assert loop.time() - began < 1.0
        with pytest.raises(Unavailable):  # a create must not read "no answer" as "no GPU"
            await nvml.uuids_async(strict=True)
        began = loop.time()
        assert await nvml.uuids_async() == ()  # the stats tick gets nothing, at once
        assert await nvml.samples_async(("GPU-0000",)) == ()
        assert loop.time() - began < 0.1  # while it is stuck, nothing queues behind it
        fake.hang = False
        fake.release.set()
        await asyncio.sleep(0.05)
        assert await nvml.uuids_async(strict=True) == ("GPU-0000", "GPU-0001")
    finally:
        fake.release.set()
        nvml.close()


async def test_the_gpu_list_is_read_again_once_it_is_old() -> None:
    fake = FakeNvml()
    now = [0.0]
    nvml = Nvml(fake, gpu_list_max_age_s=30, clock=lambda: now[0])
    try:
        assert len(await nvml.uuids_async()) == 2
        fake.names = fake.names[:1]  # a GPU fell off the bus
        assert len(await nvml.uuids_async()) == 2  # still the recent read
        now[0] = 31
        assert await nvml.uuids_async() == ("GPU-0000",)
    finally:
        nvml.close()


# -- topology ------------------------------------------------------------------


@dataclass
class FakePci:
    busId: bytes


class FakeTopologyNvml(FakeNvml):
    """Four GPUs: 0-1 over NVLink, 2-3 behind one PCIe switch, across the pairs SYS;
    GPU 3's NVLink query fails and the 1-2 level is unreadable."""

    def __init__(self) -> None:
        super().__init__(names=("NVIDIA A100-SXM4-40GB",) * 4)
        self.calls_from: set[str] = set()

    def nvmlDeviceGetPciInfo(self, handle: int) -> FakePci:
        self.calls_from.add(threading.current_thread().name)
        return FakePci(busId=f"00000000:{0x18 + handle * 0x20:02X}:00.0".encode())

    def nvmlDeviceGetP2PStatus(self, a: int, b: int, index: int) -> int:
        assert index == 2  # NVML_P2P_CAPS_INDEX_NVLINK
        if 3 in (a, b):
            raise FakeNVMLError()
        return 0 if {a, b} == {0, 1} else 4  # OK, else NVML_P2P_STATUS_NOT_SUPPORTED

    def nvmlDeviceGetTopologyCommonAncestor(self, a: int, b: int) -> int:
        if {a, b} == {1, 2}:
            raise FakeNVMLError()
        return 10 if {a, b} == {2, 3} else 50


def _numa_tree(root: Path, nodes: dict[str, str]) -> None:
    for bus, node in nodes.items():
        device = root / "bus" / "pci" / "devices" / bus
        device.mkdir(parents=True)
        (device / "numa_node").write_text(node + "\n")


async def test_topology_from_a_fake_and_sysfs(tmp_path: Path) -> None:
    _numa_tree(tmp_path, {"0000:18:00.0": "0", "0000:38:00.0": "0", "0000:58:00.0": "1",
                          "0000:78:00.0": "-1"})  # fmt: skip
    fake = FakeTopologyNvml()
    nvml = Nvml(fake, sys_root=str(tmp_path))
    try:
        topology = await nvml.topology_async()
    finally:
        nvml.close()
    assert topology.gpus == (
        GpuPlace("GPU-0000", "0000:18:00.0", 0),
        GpuPlace("GPU-0001", "0000:38:00.0", 0),
        GpuPlace("GPU-0002", "0000:58:00.0", 1),
        GpuPlace("GPU-0003", "0000:78:00.0", None),  # -1: the kernel does not know
    )
    assert topology.link("GPU-0000", "GPU-0001") is Link.NVLINK
    assert topology.link("GPU-0002", "GPU-0003") is Link.PIX  # NVLink query failed: PCIe level
    assert topology.link("GPU-0000", "GPU-0002") is Link.SYSTEM
    assert frozenset(("GPU-0001", "GPU-0002")) not in topology.links  # unreadable: left out
    assert topology.link("GPU-0001", "GPU-0002") is Link.SYSTEM  # and taken as the farthest
    assert len(fake.calls_from) == 1 and next(iter(fake.calls_from)).startswith("nvml")


async def test_topology_without_nvml_is_empty() -> None:
    nvml = Nvml(BrokenNvml())
    try:
        topology = await nvml.topology_async()
    finally:
        nvml.close()
    assert topology.gpus == () and not topology.links
    nvml.close()
    assert (await nvml.topology_async()).gpus == ()


def test_bus_ids_and_numa_nodes(tmp_path: Path) -> None:
    assert sysfs_bus_id("00000000:1B:00.0") == "0000:1b:00.0"
    assert sysfs_bus_id("0001:C3:1F.7") == "0001:c3:1f.7"
    with pytest.raises(ValueError):
        sysfs_bus_id("1B:00")
    _numa_tree(tmp_path, {"0000:1b:00.0": "1", "0000:43:00.0": "junk"})
    assert read_numa_node("0000:1b:00.0", str(tmp_path)) == 1
    assert read_numa_node("0000:43:00.0", str(tmp_path)) is None
    assert read_numa_node("0000:99:00.0", str(tmp_path)) is None
    assert read_numa_node("../../etc", str(tmp_path)) is None


@pytest.mark.skipif(HAS_DRIVER, reason="this host has an NVIDIA driver")
async def test_real_nvml_without_gpu_has_no_topology() -> None:
    nvml = Nvml()
    try:
        assert (await nvml.topology_async()).gpus == ()
    finally:
        nvml.close()


class HealthNvml(FakeNvml):
    """GPU 0: healthy; GPU 1: a pending row remap, 2 uncorrected ECC errors, persistence off."""

    def nvmlDeviceGetPersistenceMode(self, handle: int) -> int:
        return 1 if handle == 0 else 0

    def nvmlDeviceGetRemappedRows(self, handle: int) -> tuple[int, int, int, int]:
        return (0, 0, 0, 0) if handle == 0 else (1, 1, 1, 0)

    def nvmlDeviceGetEccMode(self, handle: int) -> tuple[int, int]:
        return (1, 1)

    def nvmlDeviceGetTotalEccErrors(self, handle: int, error_type: int, counter: int) -> int:
        assert (error_type, counter) == (1, 0)  # uncorrected, volatile
        return 0 if handle == 0 else 2


class OldNvml(FakeNvml):
    """A GPU without row remapping or ECC (pre-Ampere consumer cards): NVML says not supported."""

    def nvmlDeviceGetPersistenceMode(self, handle: int) -> int:
        return 1

    def nvmlDeviceGetRemappedRows(self, handle: int) -> tuple[int, int, int, int]:
        raise FakeNVMLError()

    def nvmlDeviceGetEccMode(self, handle: int) -> tuple[int, int]:
        raise FakeNVMLError()

    def nvmlDeviceGetTotalEccErrors(self, handle: int, error_type: int, counter: int) -> int:
        raise AssertionError("not asked when ECC is unknown")


def test_conditions_report_remaps_ecc_and_persistence() -> None:
    nvml = Nvml(HealthNvml())  # type: ignore[arg-type]
    try:
        good, bad = nvml.conditions()
    finally:
        nvml.close()
    assert (good.uuid, good.persistence_mode, good.remap_pending, good.ecc_uncorrected) == (
        "GPU-0000", True, False, 0
    )  # fmt: skip
    assert (bad.persistence_mode, bad.remap_pending, bad.remap_failed) == (False, True, False)
    assert bad.ecc_enabled is True and bad.ecc_uncorrected == 2


def test_conditions_leave_what_a_gpu_cannot_tell_unknown() -> None:
    nvml = Nvml(OldNvml())  # type: ignore[arg-type]
    try:
        (first, _) = nvml.conditions()
    finally:
        nvml.close()
    assert first.persistence_mode is True
    assert (
        first.remap_pending is None and first.ecc_enabled is None and first.ecc_uncorrected is None
    )


def test_nvidia_on_the_pci_bus_reads_each_devices_vendor(tmp_path: Path) -> None:
    for name, vendor in (("0000:00:01.0", "0x8086\n"), ("0000:3b:00.0", "0x10de\n")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "vendor").write_text(vendor)
    assert nvidia_on_pci_bus(tmp_path)
    (tmp_path / "0000:3b:00.0" / "vendor").write_text("0x1af4\n")
    assert not nvidia_on_pci_bus(tmp_path)
    assert not nvidia_on_pci_bus(tmp_path / "missing")


class NoDriverNvml(FakeNvml):
    def nvmlInit(self) -> None:
        raise FakeNVMLError()


@pytest.mark.parametrize(
    ("vendor", "level"), [("0x8086", logging.INFO), ("0x10de", logging.WARNING)]
)
def test_no_driver_is_a_warning_only_where_the_bus_has_an_nvidia_device(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, vendor: str, level: int
) -> None:
    device = tmp_path / "bus" / "pci" / "devices" / "0000:3b:00.0"
    device.mkdir(parents=True)
    (device / "vendor").write_text(vendor + "\n")
    nvml = Nvml(NoDriverNvml(), sys_root=str(tmp_path))
    try:
        with caplog.at_level(logging.INFO, logger="qudata_agent.adapters.nvml"):
            assert nvml.report().gpus == ()
    finally:
        nvml.close()
    levels = {r.levelno for r in caplog.records if "NVML not usable" in r.getMessage()}
    assert levels == {level}
