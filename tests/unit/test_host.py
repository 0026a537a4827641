"""Host figures: /proc and /sys parsers on captured samples, the fingerprint, the real probe."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
from pathlib import Path

import psutil
import pytest

from qudata_agent.adapters.host import (
    HostProbe,
    default_route_address,
    default_route_interface,
    host_shape,
    machine_fingerprint,
    parse_cpuinfo_mhz,
    parse_cpuinfo_model,
    read_cpu_freq_ghz,
    read_cpus,
    read_link_speed_gbps,
)
from qudata_agent.adapters.nvml import Nvml
from qudata_agent.domain.inventory import GpuReport, init_host_payload
from qudata_agent.domain.topology import Cpu, GpuTopology, parse_cpu_list

SAMPLES = Path(__file__).parent / "samples"


def sample(name: str) -> str:
    return (SAMPLES / name).read_text()


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# /proc/cpuinfo


def test_cpuinfo_model_x86() -> None:
    assert parse_cpuinfo_model(sample("cpuinfo_x86_amd_epyc.txt")) == "AMD EPYC"


def test_cpuinfo_model_absent_on_arm64() -> None:
    assert parse_cpuinfo_model(sample("cpuinfo_arm64_neoverse.txt")) is None


def test_cpuinfo_mhz() -> None:
    assert parse_cpuinfo_mhz(sample("cpuinfo_x86_amd_epyc.txt")) == pytest.approx(2596.134)
    assert parse_cpuinfo_mhz(sample("cpuinfo_arm64_neoverse.txt")) is None
    assert parse_cpuinfo_mhz("cpu MHz\t\t: 0.000\n") is None
    assert parse_cpuinfo_mhz("cpu MHz\t\t: fast\n") is None


def test_cpu_freq_prefers_sysfs_max(tmp_path: Path) -> None:
    cpufreq = tmp_path / "sys/devices/system/cpu/cpu0/cpufreq"
    cpufreq.mkdir(parents=True)
    (cpufreq / "cpuinfo_max_freq").write_text("3700000\n")
    freq = read_cpu_freq_ghz(proc_root=str(tmp_path / "proc"), sys_root=str(tmp_path / "sys"))
    assert freq == pytest.approx(3.7)


def test_cpu_freq_on_this_machine_is_positive_or_unknown() -> None:
    freq = read_cpu_freq_ghz()
    assert freq is None or 0.1 < freq < 10


# /proc/net/route


def test_default_route_this_machine_sample() -> None:
    assert default_route_interface(sample("proc_net_route_single.txt")) == "eth0"


def test_default_route_lowest_metric_wins() -> None:
    assert default_route_interface(sample("proc_net_route_two_defaults.txt")) == "enp3s0"


def test_no_default_route() -> None:
    header = sample("proc_net_route_two_defaults.txt").splitlines()[0]
    assert default_route_interface(header + "\n") is None
    assert default_route_interface("") is None


def test_default_route_address_reads_the_interface(tmp_path: Path) -> None:
    (tmp_path / "net").mkdir()
    route = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n"
    route += "lo\t00000000\t00000000\t0001\t0\t0\t0\t00000000\t0\t0\t0\n"
    (tmp_path / "net/route").write_text(route)
    assert default_route_address(proc_root=str(tmp_path)) == "127.0.0.1"


def test_default_route_address_without_route_file(tmp_path: Path) -> None:
    assert default_route_address(proc_root=str(tmp_path)) is None


# /sys/class/net/IFACE/speed


def _sys_with_speed(tmp_path: Path, iface: str, speed: str | None) -> str:
    node = tmp_path / "class/net" / iface
    node.mkdir(parents=True)
    if speed is not None:
        (node / "speed").write_text(speed + "\n")
    return str(tmp_path)


@pytest.mark.parametrize(
    ("speed", "gbps"),
    [("10000", 10.0), ("25000", 25.0), ("1000", 1.0), ("-1", None), ("0", None), (None, None)],
)
def test_link_speed(tmp_path: Path, speed: str | None, gbps: float | None) -> None:
    sys_root = _sys_with_speed(tmp_path, "eth0", speed)
    assert read_link_speed_gbps("eth0", sys_root=sys_root) == gbps


def test_link_speed_refuses_odd_names(tmp_path: Path) -> None:
    assert read_link_speed_gbps("../../etc", sys_root=str(tmp_path)) is None
    assert read_link_speed_gbps("", sys_root=str(tmp_path)) is None


# machine fingerprint


def test_fingerprint_stable_and_from_first_machine_id(tmp_path: Path) -> None:
    etc_id, dbus_id = tmp_path / "machine-id", tmp_path / "dbus-machine-id"
    etc_id.write_text("3d1219c7c4c5404aaa1f6d2a48adfda4\n")
    dbus_id.write_text("ffffffffffffffffffffffffffffffff\n")
    paths = (str(etc_id), str(dbus_id))
    first = machine_fingerprint(paths, dmi_uuid_path=str(tmp_path / "none"))
    assert first == machine_fingerprint(paths, dmi_uuid_path=str(tmp_path / "none"))
    assert first == sha256("3d1219c7c4c5404aaa1f6d2a48adfda4")


def test_fingerprint_skips_empty_machine_id(tmp_path: Path) -> None:
    (tmp_path / "machine-id").write_text("\n")
    (tmp_path / "dbus-machine-id").write_text("abc123\n")
    paths = (str(tmp_path / "machine-id"), str(tmp_path / "dbus-machine-id"))
    assert machine_fingerprint(paths, dmi_uuid_path=str(tmp_path / "none")) == sha256("abc123")


def test_fingerprint_falls_back_to_dmi_uuid(tmp_path: Path) -> None:
    (tmp_path / "product_uuid").write_text("4C4C4544-0042-3510-8052-B4C04F384D32\n")
    fingerprint = machine_fingerprint(
        (str(tmp_path / "missing"),), dmi_uuid_path=str(tmp_path / "product_uuid")
    )
    assert fingerprint == sha256("4C4C4544-0042-3510-8052-B4C04F384D32")


def test_fingerprint_falls_back_to_hostname(tmp_path: Path) -> None:
    fingerprint = machine_fingerprint((str(tmp_path / "a"),), dmi_uuid_path=str(tmp_path / "b"))
    assert fingerprint == sha256(socket.gethostname())


def test_fingerprint_of_this_machine_is_stable() -> None:
    assert machine_fingerprint() == machine_fingerprint()


# the probe


class FakeGpus:
    def report(self) -> GpuReport:
        return GpuReport(error="fake")


def test_probe_reads_the_given_roots(tmp_path: Path) -> None:
    (tmp_path / "proc/net").mkdir(parents=True)
    (tmp_path / "proc/cpuinfo").write_text(sample("cpuinfo_x86_amd_epyc.txt"))
    (tmp_path / "proc/net/route").write_text(sample("proc_net_route_two_defaults.txt"))
    sys_root = _sys_with_speed(tmp_path / "sys", "enp3s0", "25000")

    inv = HostProbe(FakeGpus(), proc_root=str(tmp_path / "proc"), sys_root=sys_root).inventory(
        str(tmp_path / "no-docker-here")
    )

    assert inv.cpu_name == "AMD EPYC"
    assert inv.ethernet_gbps == 25.0
    assert inv.disk_bytes is None  # Docker's data root does not exist
    assert inv.memory_speed_mts is None
    assert inv.gpu == GpuReport(error="fake")


@pytest.mark.skipif(
    Path("/proc/driver/nvidia/version").exists(), reason="this host has an NVIDIA driver"
)
def test_probe_on_this_machine() -> None:
    nvml = Nvml()
    try:
        inv = HostProbe(nvml).inventory("/")
    finally:
        nvml.close()

    assert inv.ram_bytes == psutil.virtual_memory().total
    assert inv.vcpu == os.cpu_count()
    assert inv.cpu_cores == psutil.cpu_count(logical=False)
    assert inv.disk_bytes == shutil.disk_usage("/").total

    # Degrades cleanly without a GPU: no GPU is reported, none is invented, and
    # the wire payload says so.
    assert inv.gpu.gpus == ()
    assert inv.gpu.error
    payload = init_host_payload(inv)
    assert payload["gpu_amount"] == 0
    assert payload["gpu_name"] is None
    assert payload["vram"] == 0


# -- CPU topology from sysfs ----------------------------------------------------


def _cpu_tree(
    root: Path, online: str, topo: dict[int, tuple[int, int]], nodes: dict[int, str]
) -> None:
    base = root / "devices" / "system" / "cpu"
    base.mkdir(parents=True)
    (base / "online").write_text(online + "\n")
    for cpu, (core, package) in topo.items():
        d = base / f"cpu{cpu}" / "topology"
        d.mkdir(parents=True)
        (d / "core_id").write_text(f"{core}\n")
        (d / "physical_package_id").write_text(f"{package}\n")
    for node, cpulist in nodes.items():
        d = root / "devices" / "system" / "node" / f"node{node}"
        d.mkdir(parents=True)
        (d / "cpulist").write_text(cpulist + "\n")


def test_cpu_topology_two_sockets_with_smt(tmp_path: Path) -> None:
    # 2 sockets x 2 cores x 2 threads; CPUs 4 and 5 are offline; core ids repeat per socket.
    topo = {0: (0, 0), 1: (1, 0), 2: (0, 1), 3: (1, 1), 6: (0, 1), 7: (1, 1)}
    _cpu_tree(tmp_path, "0-3,6-7", topo, {0: "0-1,4-5", 1: "2-3,6-7"})
    cpus = read_cpus(str(tmp_path))
    assert cpus == (
        Cpu(0, 0, 0, 0),
        Cpu(1, 1, 0, 0),
        Cpu(2, 0, 1, 1),
        Cpu(3, 1, 1, 1),
        Cpu(6, 0, 1, 1),
        Cpu(7, 1, 1, 1),
    )
    assert cpus[2].physical_core == cpus[4].physical_core  # SMT siblings


def test_cpu_topology_without_numa_or_topology_files(tmp_path: Path) -> None:
    _cpu_tree(tmp_path, "0-2", {0: (0, 0)}, {})
    assert read_cpus(str(tmp_path)) == (Cpu(0, 0, 0, None), Cpu(1, 1, 0, None), Cpu(2, 2, 0, None))


def test_cpu_topology_without_sysfs_takes_the_affinity(tmp_path: Path) -> None:
    cpus = read_cpus(str(tmp_path / "none"))
    assert [c.cpu for c in cpus] == sorted(os.sched_getaffinity(0))
    assert all(c.node is None for c in cpus)


def test_this_hosts_shape_has_no_gpu_and_its_cpus() -> None:
    shape = host_shape(GpuTopology())
    assert shape.gpus.gpus == ()
    assert len(shape.cpus) == len(
        parse_cpu_list(Path("/sys/devices/system/cpu/online").read_text())
    )
    assert shape.memory_bytes > 0
