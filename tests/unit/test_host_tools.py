"""Host tools in the inventory: dmidecode, ethtool and lscpu parsers on samples, the tool runner."""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

import pytest

from qudata_agent.adapters.host import (
    HostProbe,
    LscpuFacts,
    link_speed_gbps,
    parse_dmidecode_memory_speed,
    parse_ethtool_speed_gbps,
    parse_lscpu,
    run_tool,
)
from qudata_agent.domain.inventory import GpuReport, init_host_payload

SAMPLES = Path(__file__).parent / "samples"


def sample(name: str) -> str:
    return (SAMPLES / name).read_text()


class FakeTools:
    """Answers host tools from a table; records what was run."""

    def __init__(self, outputs: dict[str, str | None]) -> None:
        self.outputs = outputs
        self.calls: list[tuple[str, ...]] = []

    def __call__(self, argv: Sequence[str]) -> str | None:
        self.calls.append(tuple(argv))
        return self.outputs.get(argv[0])


class NoGpus:
    def report(self) -> GpuReport:
        return GpuReport(error="no driver")


# dmidecode -t memory


@pytest.mark.parametrize(
    ("name", "mts"),
    [
        # DDR5 rated 5600, configured 4800; empty slots skipped even when they print a speed.
        ("dmidecode_memory_ddr5_mts.txt", 4800),
        # dmidecode 2.12: "MHz" and "Configured Clock Speed"; the highest configured wins.
        ("dmidecode_memory_ddr4_mhz.txt", 2666),
        # dmidecode 2.11 prints no configured speed: the module's own speed is all there is.
        ("dmidecode_memory_no_configured_line.txt", 1600),
        # A VM: every module says Unknown, so the answer is unknown, not a guess.
        ("dmidecode_memory_vm_unknown.txt", None),
    ],
)
def test_memory_speed_from_dmidecode(name: str, mts: int | None) -> None:
    assert parse_dmidecode_memory_speed(sample(name)) == mts


def test_memory_speed_of_nothing_useful_is_unknown() -> None:
    assert parse_dmidecode_memory_speed("") is None
    no_dmi = "# dmidecode 3.5\n# No SMBIOS nor DMI entry point found, sorry.\n"
    assert parse_dmidecode_memory_speed(no_dmi) is None
    assert parse_dmidecode_memory_speed("Memory Device\n\tSize: 16 GB\n\tSpeed: fast\n") is None


def test_an_unknown_configured_speed_does_not_fall_back_to_the_rated_one() -> None:
    text = "Memory Device\n\tSize: 16 GB\n\tSpeed: 3200 MT/s\n\tConfigured Memory Speed: Unknown\n"
    assert parse_dmidecode_memory_speed(text) is None


def test_empty_slots_in_their_various_spellings_are_skipped() -> None:
    for size in ("No Module Installed", "Not Installed", "0 MB", "Unknown"):
        text = f"Memory Device\n\tSize: {size}\n\tConfigured Memory Speed: 3200 MT/s\n"
        assert parse_dmidecode_memory_speed(text) is None, size


# ethtool IFACE


def test_ethtool_speed() -> None:
    assert parse_ethtool_speed_gbps(sample("ethtool_eth0_10g.txt")) == 10.0
    assert parse_ethtool_speed_gbps(sample("ethtool_virtio_unknown.txt")) is None
    assert parse_ethtool_speed_gbps("\tSpeed: 100000Mb/s\n") == 100.0
    assert parse_ethtool_speed_gbps("") is None


def test_link_speed_prefers_sysfs(tmp_path: Path) -> None:
    (tmp_path / "class/net/eth0").mkdir(parents=True)
    (tmp_path / "class/net/eth0/speed").write_text("25000\n")
    tools = FakeTools({"ethtool": sample("ethtool_eth0_10g.txt")})
    assert link_speed_gbps("eth0", str(tmp_path), tools) == 25.0
    assert tools.calls == []


def test_link_speed_falls_back_to_ethtool(tmp_path: Path) -> None:
    (tmp_path / "class/net/eth0").mkdir(parents=True)
    (tmp_path / "class/net/eth0/speed").write_text("-1\n")
    tools = FakeTools({"ethtool": sample("ethtool_eth0_10g.txt")})
    assert link_speed_gbps("eth0", str(tmp_path), tools) == 10.0
    assert tools.calls == [("ethtool", "eth0")]


def test_link_speed_unknown_to_both_is_unknown(tmp_path: Path) -> None:
    tools = FakeTools({"ethtool": sample("ethtool_virtio_unknown.txt")})
    assert link_speed_gbps("ens3", str(tmp_path), tools) is None
    assert link_speed_gbps("ens3", str(tmp_path), FakeTools({})) is None


@pytest.mark.parametrize("name", ["-s", "--help", "../x", "", "."])
def test_odd_interface_names_never_reach_ethtool(tmp_path: Path, name: str) -> None:
    tools = FakeTools({"ethtool": sample("ethtool_eth0_10g.txt")})
    assert link_speed_gbps(name, str(tmp_path), tools) is None
    assert tools.calls == []


# lscpu


@pytest.mark.parametrize(
    ("name", "facts"),
    [
        ("lscpu_arm64_neoverse_n1.txt", LscpuFacts("ARM Neoverse-N1", 3000.0)),
        ("lscpu_arm64_grace_nested.txt", LscpuFacts("ARM Neoverse-V2", 3456.0)),
        (
            "lscpu_arm64_unknown_model.txt",
            LscpuFacts("Cavium ThunderX2 CN9980 v2.2 @ 2.20GHz", None),
        ),
    ],
)
def test_lscpu(name: str, facts: LscpuFacts) -> None:
    assert parse_lscpu(sample(name)) == facts


def test_lscpu_on_x86_keeps_the_model_as_is() -> None:
    text = "Vendor ID:  AuthenticAMD\nModel name:  AMD EPYC 9654 96-Core Processor\n"
    assert parse_lscpu(text).model == "AMD EPYC 9654 96-Core Processor"
    assert parse_lscpu("") == LscpuFacts(None, None)


# the probe with its tools


def _roots(tmp_path: Path, cpuinfo: str) -> tuple[str, str]:
    (tmp_path / "proc/net").mkdir(parents=True)
    (tmp_path / "proc/cpuinfo").write_text(cpuinfo)
    (tmp_path / "proc/net/route").write_text(sample("proc_net_route_single.txt"))
    (tmp_path / "sys/class/net/eth0").mkdir(parents=True)
    return str(tmp_path / "proc"), str(tmp_path / "sys")


def test_probe_on_arm64_names_the_cpu_from_lscpu(tmp_path: Path) -> None:
    proc, sys_root = _roots(tmp_path, sample("cpuinfo_arm64_neoverse.txt"))
    tools = FakeTools(
        {
            "lscpu": sample("lscpu_arm64_grace_nested.txt"),
            "dmidecode": sample("dmidecode_memory_ddr5_mts.txt"),
            "ethtool": sample("ethtool_eth0_10g.txt"),
        }
    )
    inv = HostProbe(NoGpus(), proc_root=proc, sys_root=sys_root, run=tools).inventory("/")
    assert inv.cpu_name == "ARM Neoverse-V2"
    assert inv.memory_speed_mts == 4800
    assert inv.ethernet_gbps == 10.0
    conf = init_host_payload(inv)["configuration"]
    assert isinstance(conf, dict)
    assert conf["memory_speed"] == 4800
    assert conf["ethernet_in"] == conf["ethernet_out"] == 10.0
    assert ("dmidecode", "-t", "memory") in tools.calls


def test_probe_without_any_tool_reports_unknowns(tmp_path: Path) -> None:
    proc, sys_root = _roots(tmp_path, sample("cpuinfo_arm64_neoverse.txt"))
    inv = HostProbe(NoGpus(), proc_root=proc, sys_root=sys_root, run=FakeTools({})).inventory("/")
    assert inv.cpu_name is None
    assert inv.memory_speed_mts is None
    assert inv.ethernet_gbps is None


def test_probe_on_x86_does_not_need_lscpu_for_the_name(tmp_path: Path) -> None:
    proc, sys_root = _roots(tmp_path, sample("cpuinfo_x86_amd_epyc.txt"))
    tools = FakeTools({"lscpu": "Model name: something else\n"})
    inv = HostProbe(NoGpus(), proc_root=proc, sys_root=sys_root, run=tools).inventory("/")
    assert inv.cpu_name == "AMD EPYC"


# the runner


def _script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_run_tool_returns_stdout_in_the_c_locale(tmp_path: Path) -> None:
    tool = _script(tmp_path, "qudata-test-tool", 'echo "LC_ALL=$LC_ALL args=$*"\n')
    assert run_tool([str(tool), "-t", "memory"]) == "LC_ALL=C args=-t memory\n"


def test_run_tool_gives_none_on_failure(tmp_path: Path) -> None:
    assert run_tool(["qudata-no-such-tool-here"]) is None
    assert run_tool([]) is None
    assert run_tool([str(_script(tmp_path, "fails", "echo out; exit 3\n"))]) is None
    slow = _script(tmp_path, "slow", "sleep 5\n")
    assert run_tool([str(slow)], timeout_s=0.2) is None


def test_dmidecode_on_this_machine_gives_a_speed_or_unknown() -> None:
    # Absent here, or not root, or a VM: all give None; a real answer is a plausible speed.
    speed = parse_dmidecode_memory_speed(run_tool(["dmidecode", "-t", "memory"]) or "")
    assert speed is None or 100 <= speed <= 20000
    assert os.path.exists("/proc/cpuinfo")
