"""`doctor`: each check's verdict and fix from observations, the table, the exit code.

No host is touched: `run_checks` is driven by a fake `Probes`.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from qudata_agent import doctor
from qudata_agent.adapters.tls import TlsIdentity
from qudata_agent.config import Settings, load_settings
from qudata_agent.doctor import Check, Level, ProbeError
from qudata_agent.domain.inventory import GpuCondition, GpuInfo, GpuReport
from qudata_agent.domain.isolation import SandboxGpus
from qudata_agent.domain.tls import TlsMode
from qudata_agent.domain.versions import CONTAINERD, DOCKER, KERNEL, RUNC, Installed
from qudata_agent.domain.volumes import FsFacts

INFO_OVERLAY: dict[str, Any] = {
    "ServerVersion": "27.3.1",
    "DockerRootDir": "/var/lib/docker",
    "Driver": "overlay2",
    "DriverStatus": [
        ["Backing Filesystem", "extfs"],
        ["Supports d_type", "true"],
        ["Using metacopy", "false"],
    ],
    "Runtimes": {"io.containerd.runc.v2": {}, "runc": {}},
    "LiveRestoreEnabled": True,
}
H100 = GpuInfo(index=0, uuid="GPU-1", name="NVIDIA H100 80GB HBM3", memory_total_bytes=80 << 30)


# -- docker and storage ---------------------------------------------------------


def test_docker_answering_passes_with_its_version() -> None:
    check = doctor.docker_check(INFO_OVERLAY, None, "unix:///var/run/docker.sock")
    assert check.level is Level.PASS
    assert "27.3.1" in check.detail and "/var/lib/docker" in check.detail


def test_docker_silent_fails_with_a_fix() -> None:
    check = doctor.docker_check(None, "Docker at unix:///x is not reachable", "unix:///x")
    assert check.level is Level.FAIL
    assert "not reachable" in check.detail
    assert check.fix and "systemctl start docker" in check.fix


@pytest.mark.parametrize("driver", ["btrfs", "zfs"])
def test_btrfs_and_zfs_enforce_quotas(driver: str) -> None:
    check = doctor.storage_check({**INFO_OVERLAY, "Driver": driver, "DriverStatus": []})
    assert check.level is Level.PASS
    assert driver in check.detail


def test_overlay2_warns_and_names_its_backing_filesystem() -> None:
    check = doctor.storage_check(INFO_OVERLAY, frozenset({"rw", "relatime"}))
    assert check.level is Level.WARN
    assert check.detail == (
        "storage driver overlay2 on extfs: quota not enforceable unless the data root is xfs"
        " with pquota"
    )
    assert check.fix and "pquota" in check.fix and "/var/lib/docker" in check.fix


def test_overlay2_on_xfs_depends_on_the_data_roots_mount_options() -> None:
    """The same verdict the agent reaches at start (domain/storage.py)."""
    info = {**INFO_OVERLAY, "DriverStatus": [["Backing Filesystem", "xfs"]]}
    enforced = doctor.storage_check(info, frozenset({"rw", "prjquota"}))
    assert enforced.level is Level.PASS and "xfs project quota" in enforced.detail
    without = doctor.storage_check(info, frozenset({"rw", "noatime"}))
    assert without.level is Level.WARN and "without project quotas" in without.detail
    assert without.fix and "pquota" in without.fix
    unknown = doctor.storage_check(info, None)
    assert unknown.level is Level.WARN and "could not be read" in unknown.detail


def test_other_drivers_warn_and_docker_down_is_not_checked() -> None:
    vfs = doctor.storage_check({"Driver": "vfs"})
    assert vfs.level is Level.WARN and "vfs" in vfs.detail and vfs.fix
    down = doctor.storage_check(None)
    assert down.level is Level.WARN and "not checked" in down.detail


# -- NVIDIA -------------------------------------------------------------------------


def test_gpus_seen_through_nvml_pass() -> None:
    report = GpuReport(gpus=(H100, H100), driver_version="560.35.03")
    check = doctor.gpu_check(report, pci_gpus=2)
    assert check.level is Level.PASS
    assert "2 GPU(s)" in check.detail and "H100" in check.detail and "560.35.03" in check.detail


def test_no_gpu_anywhere_is_a_cpu_host_warning_never_a_failure() -> None:
    check = doctor.gpu_check(GpuReport(error="NVML Shared Library Not Found"), pci_gpus=0)
    assert check.level is Level.WARN
    assert check.detail == "no NVIDIA GPU: the host can only rent CPU instances"


def test_gpu_on_the_bus_but_not_in_nvml_is_a_missing_driver() -> None:
    check = doctor.gpu_check(GpuReport(error="Driver Not Loaded"), pci_gpus=1)
    assert check.level is Level.FAIL
    assert "Driver Not Loaded" in check.detail
    assert check.fix and "--install-driver" in check.fix and "reboot" in check.fix


def test_nvidia_runtime() -> None:
    with_runtime = {**INFO_OVERLAY, "Runtimes": {"runc": {}, "nvidia": {}}}
    assert doctor.runtime_check(with_runtime, gpus_present=True).level is Level.PASS
    missing = doctor.runtime_check(INFO_OVERLAY, gpus_present=True)
    assert missing.level is Level.FAIL
    assert missing.fix and "nvidia-ctk runtime configure --runtime=docker" in missing.fix
    no_gpu = doctor.runtime_check(INFO_OVERLAY, gpus_present=False)
    assert no_gpu.level is Level.PASS and "not needed" in no_gpu.detail
    assert doctor.runtime_check(None, gpus_present=True).level is Level.WARN


def test_nvidia_display_and_3d_controllers_are_counted_from_sysfs_pairs() -> None:
    devices = [
        ("0x10de\n", "0x030200\n"),  # 3D controller (H100, A100)
        ("0x10de", "0x030000"),  # VGA controller (RTX)
        ("0x10de", "0x040300"),  # the GPU's HD audio function: not a GPU
        ("0x8086", "0x030000"),  # Intel graphics
        ("0x10DE", "0x030200"),
    ]
    assert doctor.count_nvidia_devices(devices) == 3
    assert doctor.count_nvidia_devices([]) == 0


# -- ports, files, clock, control plane ------------------------------------------------


def test_a_free_range_passes() -> None:
    check = doctor.ports_check(23000, 23004, [])
    assert check.level is Level.PASS and check.detail == "5 of 5 ports of 23000-23004 free"


def test_a_range_less_than_90_percent_free_warns_with_the_busy_ports_and_a_fix() -> None:
    check = doctor.ports_check(23000, 23004, [23000, 23002, 23004])
    assert check.level is Level.WARN
    assert "2 of 5 ports of 23000-23004 free" in check.detail
    assert "23000, 23002, 23004" in check.detail
    assert check.fix and "QUDATA_PORT_RANGE" in check.fix and "sport >= :23000" in check.fix


def test_a_few_busy_ports_of_a_big_range_pass() -> None:
    check = doctor.ports_check(40000, 49999, [40001, 44085])
    assert check.level is Level.PASS and "9998 of 10000" in check.detail


def test_a_range_with_no_free_port_fails() -> None:
    check = doctor.ports_check(23000, 23001, [23000, 23001])
    assert check.level is Level.FAIL and check.fix


def test_the_busy_list_is_shortened() -> None:
    check = doctor.ports_check(1000, 1099, list(range(1000, 1050)))
    assert check.detail.endswith("1009, ...")


def test_state_dir_modes() -> None:
    path = Path("/var/lib/qudata-agent")
    assert doctor.state_dir_check(path, 0o700).level is Level.PASS
    missing = doctor.state_dir_check(path, None)
    assert missing.level is Level.PASS and "does not exist yet" in missing.detail
    loose = doctor.state_dir_check(path, 0o755)
    assert loose.level is Level.FAIL
    assert "0755" in loose.detail
    assert loose.fix == "chmod 700 /var/lib/qudata-agent"


def test_secret_files_readable_by_others_fail_with_one_chmod_for_all() -> None:
    a, b, c = Path("/s/agent_secret"), Path("/s/api_key"), Path("/etc/q/agent.env")
    check = doctor.secret_files_check({a: 0o644, b: 0o600, c: 0o640})
    assert check.level is Level.FAIL
    assert "/s/agent_secret (0644)" in check.detail and "/etc/q/agent.env (0640)" in check.detail
    assert "api_key" not in check.detail
    assert check.fix == "chmod 600 /etc/q/agent.env /s/agent_secret"
    ok = doctor.secret_files_check({a: 0o600, b: 0o400})
    assert ok.level is Level.PASS and "2 file(s)" in ok.detail
    assert doctor.secret_files_check({}).level is Level.PASS


@pytest.mark.parametrize(
    ("output", "level"),
    [
        ("NTPSynchronized=yes\n", Level.PASS),
        ("NTPSynchronized=no\n", Level.WARN),
        (None, Level.WARN),
        ("", Level.WARN),
    ],
)
def test_clock(output: str | None, level: Level) -> None:
    check = doctor.clock_check(output)
    assert check.level is level
    if output is None:
        assert "unknown" in check.detail
    if level is Level.WARN:
        assert check.fix


def test_control_plane() -> None:
    url = "https://cp.example/v0"
    answer = doctor.CpAnswer(404, None, 0.0)
    assert doctor.control_plane_check(url, True, answer).level is Level.PASS
    assert "HTTP 404" in doctor.control_plane_check(url, True, answer).detail
    down = doctor.control_plane_check(url, True, "Connection refused")
    assert down.level is Level.FAIL and "Connection refused" in down.detail and down.fix
    standalone = doctor.control_plane_check(url, False, None)
    assert standalone.level is Level.WARN and "standalone" in standalone.detail


# -- the report ------------------------------------------------------------------------


def test_ready_and_exit_code_follow_failures_only() -> None:
    warn = Check("a", Level.WARN, "w", "fix w")
    good = Check("b", Level.PASS, "p")
    bad = Check("c", Level.FAIL, "f", "fix f")
    assert doctor.exit_code([good, warn]) == 0 and doctor.ready([good, warn])
    assert doctor.exit_code([good, warn, bad]) == 1 and not doctor.ready([bad])


def test_the_table_shows_each_fix_under_its_row_and_a_verdict() -> None:
    checks = [
        Check("docker", Level.PASS, "Docker 27", "never shown for a pass"),
        Check("state dir", Level.FAIL, "/s has mode 0755, not 0700", "chmod 700 /s"),
        Check("clock sync", Level.WARN, "unknown", "run chrony"),
    ]
    lines = doctor.render(checks).splitlines()
    assert lines[0].split() == ["CHECK", "RESULT", "DETAIL"]
    assert lines[1].split()[:2] == ["docker", "PASS"]
    state = lines.index(next(line for line in lines if line.startswith("state dir")))
    assert "FAIL" in lines[state]
    assert lines[state + 1].strip() == "fix: chmod 700 /s"
    assert "never shown" not in "\n".join(lines)
    assert lines[-1] == "host NOT ready: 1 failure(s), 1 warning(s)"


def test_json_output() -> None:
    data = json.loads(doctor.to_json([Check("x", Level.FAIL, "d", "f")]))
    assert data == {
        "ready": False,
        "checks": [{"name": "x", "level": "fail", "detail": "d", "fix": "f"}],
    }


# -- run_checks with fake probes ----------------------------------------------------------


@dataclass
class FakeProbes:
    info: dict[str, Any] | None = field(default_factory=lambda: dict(INFO_OVERLAY))
    report: GpuReport = field(default_factory=GpuReport)
    pci: int = 0
    busy: frozenset[int] = frozenset()
    own: frozenset[int] = frozenset()
    modes: dict[Path, int] = field(default_factory=dict)
    texts: dict[Path, str] = field(default_factory=dict)
    clock: str | None = "NTPSynchronized=yes"
    http: int | str = 404
    urls: list[str] = field(default_factory=list)
    denied: frozenset[Path] = frozenset()
    mounts: dict[str, frozenset[str]] = field(default_factory=dict)
    keys: list[str] = field(default_factory=list)
    date: str | None = None
    now: float = 0.0
    conditions: tuple[GpuCondition, ...] = ()
    cli: tuple[int, str] | None = None
    cdi: tuple[str, ...] = ()
    free: int | None = 500 * doctor.GIB
    disk_paths: list[str] = field(default_factory=list)
    volume_summary: doctor.VolumeSummary = field(
        default_factory=lambda: doctor.VolumeSummary(FsFacts("ext4", frozenset({"rw"})))
    )
    tls: TlsIdentity | None = None
    plain: int | None = None
    toolkit: tuple[int, int, int] | None = (1, 17, 8)
    toolkit_conf: tuple[bool, bool, str | None] = (True, True, "disabled")
    sandbox: SandboxGpus = field(default_factory=lambda: SandboxGpus(False))
    stack: list[Installed] = field(default_factory=list)
    wall: list[str] | str = field(default_factory=list)  # str: iptables cannot be read

    def docker_info(self) -> dict[str, Any]:
        if self.info is None:
            raise ProbeError("Docker at unix:///var/run/docker.sock is not reachable")
        return self.info

    def gpu_report(self) -> GpuReport:
        return self.report

    def nvidia_pci_devices(self) -> int:
        return self.pci

    def port_is_free(self, port: int) -> bool:
        return port not in self.busy

    def agent_ports(self, state_dir: Path) -> frozenset[int]:
        return self.own

    def mount_options(self, path: str) -> frozenset[str] | None:
        return self.mounts.get(path)

    def mode_of(self, path: Path) -> int | None:
        if path in self.denied:
            raise PermissionError(13, "Permission denied")
        return self.modes.get(path)

    def read_text(self, path: Path) -> str | None:
        return self.texts.get(path)

    def timedatectl(self) -> str | None:
        return self.clock

    def control_plane(self, url: str, api_key: str, timeout_s: float) -> doctor.CpAnswer:
        self.urls.append(url)
        self.keys.append(api_key)
        if isinstance(self.http, str):
            raise ProbeError(self.http)
        return doctor.CpAnswer(self.http, self.date, self.now)

    def gpu_conditions(self) -> tuple[GpuCondition, ...]:
        return self.conditions

    def container_cli_info(self) -> tuple[int, str] | None:
        return self.cli

    def cdi_specs(self) -> tuple[str, ...]:
        return self.cdi

    def toolkit_version(self) -> tuple[int, int, int] | None:
        return self.toolkit

    def toolkit_config(self) -> tuple[bool, bool, str | None]:
        return self.toolkit_conf

    def sandbox_gpus(self, runsc: str) -> SandboxGpus:
        return self.sandbox

    def disk_free(self, path: str) -> int | None:
        self.disk_paths.append(path)
        return self.free

    def volumes(self, state_dir: Path) -> doctor.VolumeSummary:
        return self.volume_summary

    def served_tls(self, settings: Settings) -> TlsIdentity | None:
        return self.tls

    def plain_http(self, state_dir: Path, port: int | None) -> int | None:
        return self.plain

    def container_stack(self) -> list[Installed]:
        return self.stack

    def wall_problems(self) -> list[str]:
        if isinstance(self.wall, str):
            raise ProbeError(self.wall)
        return self.wall


def _settings(**env: str) -> Settings:
    base = {"QUDATA_STATE_DIR": "/st", "QUDATA_PORT_RANGE": "23000-23004"}
    return load_settings(environ={**base, **env})


def _by_name(checks: list[Check]) -> dict[str, Check]:
    return {check.name: check for check in checks}


def test_a_ready_cpu_host() -> None:
    probes = FakeProbes(
        modes={Path("/st"): 0o700, Path("/st/agent_secret"): 0o600},
    )
    checks = doctor.run_checks(_settings(QUDATA_API_KEY="key-1234"), probes)
    names = [check.name for check in checks]
    assert names == [
        "docker",
        "live restore",
        "pulls",
        "storage quota",
        "docker disk",
        "volumes",
        "nvidia gpus",
        "nvidia runtime",
        "nvidia toolkit",
        "cdi",
        "isolation",
        "toolkit escapes",
        "cuda compat hook",
        "port range",
        "ephemeral ports",
        "state dir",
        "secret files",
        "clock sync",
        "instance ssh",
        "network meter",
        "control plane",
        "api tls",
        "tenant firewall",
    ]
    assert doctor.exit_code(checks) == 0
    found = _by_name(checks)
    assert found["nvidia gpus"].level is Level.WARN
    assert found["control plane"].level is Level.PASS
    assert probes.urls == ["https://internal.qudata.ai/v0"]


def test_wrong_modes_and_busy_ports_are_each_reported() -> None:
    probes = FakeProbes(
        busy=frozenset({23000, 23001, 23002}),
        modes={Path("/st"): 0o755, Path("/st/agent_secret"): 0o644},
    )
    checks = doctor.run_checks(_settings(), probes)
    found = _by_name(checks)
    assert found["state dir"].level is Level.FAIL and found["state dir"].fix == "chmod 700 /st"
    assert found["secret files"].fix == "chmod 600 /st/agent_secret"
    assert found["port range"].level is Level.WARN and "2 of 5" in found["port range"].detail
    assert doctor.exit_code(checks) == 1


def test_ports_held_by_the_agents_own_instances_count_as_fine() -> None:
    probes = FakeProbes(busy=frozenset({23000, 23001}), own=frozenset({23000, 23001}))
    found = _by_name(doctor.run_checks(_settings(), probes))
    assert found["port range"].level is Level.PASS


def test_a_config_file_holding_the_key_must_be_private_too() -> None:
    config = Path("/etc/qudata-agent/agent.env")
    probes = FakeProbes(
        modes={config: 0o644},
        texts={config: "QUDATA_API_KEY=key-1234\n"},
    )
    found = _by_name(doctor.run_checks(_settings(), probes, config_file=config))
    assert found["secret files"].fix == f"chmod 600 {config}"
    # Without the key in it, the file is just configuration.
    probes.texts = {config: "QUDATA_PORT_RANGE=23000-23004\n"}
    found = _by_name(doctor.run_checks(_settings(), probes, config_file=config))
    assert found["secret files"].level is Level.PASS


def test_the_kept_api_key_file_counts_as_configured() -> None:
    probes = FakeProbes(texts={Path("/st/api_key"): "key-1234\n"}, http="timed out")
    found = _by_name(doctor.run_checks(_settings(), probes))
    assert found["control plane"].level is Level.FAIL
    assert "timed out" in found["control plane"].detail
    no_key = _by_name(doctor.run_checks(_settings(), FakeProbes()))
    assert no_key["control plane"].level is Level.WARN


def test_the_data_roots_mount_options_are_asked_for() -> None:
    info = {**INFO_OVERLAY, "DriverStatus": [["Backing Filesystem", "xfs"]]}
    probes = FakeProbes(info=info, mounts={"/var/lib/docker": frozenset({"rw", "pquota"})})
    assert _by_name(doctor.run_checks(_settings(), probes))["storage quota"].level is Level.PASS


def test_docker_down_fails_once_and_its_dependents_are_not_checked() -> None:
    checks = doctor.run_checks(_settings(), FakeProbes(info=None))
    found = _by_name(checks)
    assert found["docker"].level is Level.FAIL
    assert found["storage quota"].level is Level.WARN
    assert found["nvidia runtime"].level is Level.WARN
    assert sum(check.level is Level.FAIL for check in checks) == 1


def test_a_gpu_host_without_runtime_or_driver() -> None:
    found = _by_name(doctor.run_checks(_settings(), FakeProbes(pci=2)))
    assert found["nvidia gpus"].level is Level.FAIL
    assert found["nvidia runtime"].level is Level.FAIL


def test_unreadable_files_say_run_as_root() -> None:
    probes = FakeProbes(denied=frozenset({Path("/st/agent_secret")}), modes={Path("/st"): 0o700})
    found = _by_name(doctor.run_checks(_settings(), probes))
    assert found["state dir"].level is Level.PASS
    assert found["secret files"].level is Level.WARN
    assert found["secret files"].fix and "root" in found["secret files"].fix


def test_the_instance_ssh_check_names_the_packages_to_install() -> None:
    present = {Path("/usr/sbin/sshd"): 0o755, Path("/usr/bin/setpriv"): 0o755}
    checks = _by_name(doctor.run_checks(_settings(), FakeProbes(modes=present)))
    check = checks["instance ssh"]
    assert check.level is Level.WARN
    assert check.fix == "apt-get install patchelf busybox-static"
    everything = {**present, Path("/usr/bin/patchelf"): 0o755, Path("/bin/busybox"): 0o755}
    checks = _by_name(doctor.run_checks(_settings(), FakeProbes(modes=everything)))
    assert checks["instance ssh"].level is Level.PASS


def test_the_network_meter_check_names_the_packages_to_install() -> None:
    checks = _by_name(doctor.run_checks(_settings(), FakeProbes()))
    assert checks["network meter"].level is Level.WARN
    assert checks["network meter"].fix == "apt-get install nftables iproute2"
    both = {Path("/usr/sbin/nft"): 0o755, Path("/usr/sbin/tc"): 0o755}
    checks = _by_name(doctor.run_checks(_settings(), FakeProbes(modes=both)))
    assert checks["network meter"].level is Level.PASS


# -- fleet checks: lost GPUs, GPU health, toolkit, CDI, disk, live-restore, pulls, ports -------


def test_a_host_that_lost_a_gpu_fails() -> None:
    report = GpuReport(gpus=(H100,), driver_version="550.54.15")
    check = doctor.gpu_check(report, pci_gpus=2)
    assert check.level is Level.FAIL and "1 of the 2" in check.detail and check.fix
    assert doctor.gpu_check(report, pci_gpus=1).level is Level.PASS


def test_gpu_health_pending_remaps_ecc_and_persistence() -> None:
    assert doctor.gpu_health_check(()) is None
    good = GpuCondition("GPU-1", persistence_mode=True, remap_pending=False, ecc_enabled=True)
    assert doctor.gpu_health_check([good]).level is Level.PASS  # type: ignore[union-attr]
    pending = GpuCondition("GPU-2", remap_pending=True)
    check = doctor.gpu_health_check([good, pending])
    assert check is not None and check.level is Level.FAIL and "GPU-2" in check.detail
    ecc = GpuCondition("GPU-3", ecc_enabled=True, ecc_uncorrected=4)
    check = doctor.gpu_health_check([ecc])
    assert check is not None and check.level is Level.FAIL and "ECC" in check.detail
    off = GpuCondition("GPU-4", persistence_mode=False)
    check = doctor.gpu_health_check([off])
    assert check is not None and check.level is Level.WARN and "persistenced" in (check.fix or "")


def test_the_toolkit_and_cdi_matter_on_a_gpu_host_only() -> None:
    assert doctor.toolkit_check(False, None).level is Level.PASS
    assert doctor.toolkit_check(True, None).level is Level.FAIL
    broken = doctor.toolkit_check(True, (1, "nvidia-container-cli: initialization error: nvml"))
    assert broken.level is Level.FAIL and "initialization error" in broken.detail
    assert doctor.toolkit_check(True, (0, "NVRM version:   550.54.15\n")).level is Level.PASS
    assert doctor.cdi_check(True, ()).level is Level.WARN
    assert doctor.cdi_check(True, ("/etc/cdi/nvidia.yaml",)).level is Level.PASS
    assert doctor.cdi_check(False, ()).level is Level.PASS


def test_free_space_on_dockers_data_root() -> None:
    assert doctor.disk_check("/var/lib/docker", 5 * doctor.GIB).level is Level.FAIL
    assert doctor.disk_check("/var/lib/docker", 50 * doctor.GIB).level is Level.WARN
    assert doctor.disk_check("/var/lib/docker", 500 * doctor.GIB).level is Level.PASS
    assert doctor.disk_check(None, None).level is Level.WARN
    probes = FakeProbes(free=1 * doctor.GIB)
    found = _by_name(doctor.run_checks(_settings(), probes))
    assert found["docker disk"].level is Level.FAIL and probes.disk_paths == ["/var/lib/docker"]


def test_live_restore_off_fails_with_the_fix() -> None:
    check = doctor.live_restore_check({**INFO_OVERLAY, "LiveRestoreEnabled": False})
    assert check.level is Level.FAIL and "live-restore" in (check.fix or "")
    assert doctor.live_restore_check(INFO_OVERLAY).level is Level.PASS
    assert doctor.live_restore_check(None).level is Level.WARN


def test_pull_settings_are_reported() -> None:
    info = {**INFO_OVERLAY, "RegistryConfig": {"Mirrors": ["https://mirror.example/"]}}
    check = doctor.pulls_check(info, '{"max-concurrent-downloads": 8}')
    assert check.level is Level.PASS
    assert (
        "max-concurrent-downloads 8" in check.detail and "https://mirror.example/" in check.detail
    )
    check = doctor.pulls_check(INFO_OVERLAY, None)
    assert "3 (Docker's default)" in check.detail and "mirrors: none" in check.detail
    assert doctor.pulls_check(None, "not json").level is Level.PASS


def test_the_port_range_against_the_ephemeral_range() -> None:
    ephemeral = "32768\t60999\n"
    check = doctor.ephemeral_check((40000, 49999), ephemeral, "\n")
    assert check.level is Level.FAIL and "10000 port(s)" in check.detail
    assert "ip_local_reserved_ports=40000-49999" in (check.fix or "")
    assert doctor.ephemeral_check((40000, 49999), ephemeral, "40000-49999\n").level is Level.PASS
    partly = doctor.ephemeral_check((40000, 49999), ephemeral, "40000-44999,45000\n")
    assert partly.level is Level.FAIL and "4999 port(s)" in partly.detail
    assert doctor.ephemeral_check((20000, 29999), ephemeral, "").level is Level.PASS
    assert doctor.ephemeral_check((40000, 49999), None, None).level is Level.WARN
    probes = FakeProbes(texts={doctor.EPHEMERAL: "23002 60999", doctor.RESERVED: ""})
    assert _by_name(doctor.run_checks(_settings(), probes))["ephemeral ports"].level is Level.FAIL


def test_the_control_plane_call_is_authenticated_and_measures_the_clock() -> None:
    date = "Tue, 01 Dec 2026 12:00:00 GMT"
    at = 1796126400.0  # that moment
    probes = FakeProbes(texts={Path("/st/api_key"): "key-1234\n"}, http=200, date=date, now=at)
    found = _by_name(doctor.run_checks(_settings(), probes))
    assert probes.keys == ["key-1234"]
    assert found["control plane"].level is Level.PASS
    assert "clock skew +0 s" in found["control plane"].detail
    skewed = doctor.CpAnswer(200, date, at + 30)
    assert doctor.control_plane_check("u", True, skewed).level is Level.WARN
    far = doctor.CpAnswer(200, date, at - 600)
    check = doctor.control_plane_check("u", True, far)
    assert check.level is Level.FAIL and "-600 s" in check.detail
    refused = doctor.control_plane_check("u", True, doctor.CpAnswer(401, date, at))
    assert refused.level is Level.FAIL and "refuses the API key" in refused.detail
    no_date = doctor.control_plane_check("u", True, doctor.CpAnswer(404, None, at))
    assert no_date.level is Level.PASS and "not compared" in no_date.detail


def test_the_volumes_check_names_the_mechanism_and_the_space_held() -> None:
    held = doctor.VolumeSummary(
        FsFacts("xfs", frozenset({"rw", "prjquota"})), 2, 3 * doctor.GIB, doctor.GIB // 2
    )
    check = _by_name(doctor.run_checks(_settings(), FakeProbes(volume_summary=held)))["volumes"]
    assert check.level is Level.PASS
    assert check.detail.startswith("xfs-project-quota (xfs with project quotas")
    assert "2 volume(s): 3.0 GiB given, 0.5 GiB on the disk" in check.detail
    lacking = doctor.VolumeSummary(FsFacts("ext4"), missing_tool="e2fsprogs")
    loop = _by_name(doctor.run_checks(_settings(), FakeProbes(volume_summary=lacking)))["volumes"]
    assert loop.level is Level.FAIL and loop.fix == "apt-get install e2fsprogs"
    assert loop.detail.startswith("loop-ext4 (ext4 has no per-directory size limit")


# -- the agent's port: TLS ------------------------------------------------------------

TLS_NOW = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)


def _identity(days_left: float, agent_made: bool = True) -> TlsIdentity:
    return TlsIdentity(
        Path("/s/tls/cert.pem"),
        Path("/s/tls/key.pem"),
        "PIN=",
        TLS_NOW + dt.timedelta(days=days_left),
        ("host-1",),
        agent_made,
    )


def test_tls_on_shows_the_pin_the_expiry_and_that_plain_http_answers() -> None:
    check = doctor.tls_check(TlsMode.ON, _identity(300), None, 200, TLS_NOW)
    assert check.level is Level.PASS
    assert "pin sha256//PIN=" in check.detail and "certificate until 2027-03-28" in check.detail
    assert "plain HTTP answers too" in check.detail
    assert check.fix is not None and "QUDATA_TLS=required" in check.fix


def test_tls_required_says_plain_http_is_refused() -> None:
    check = doctor.tls_check(TlsMode.REQUIRED, _identity(300), None, 400, TLS_NOW)
    assert check.level is Level.PASS and "plain HTTP refused" in check.detail
    assert check.fix is None
    down = doctor.tls_check(TlsMode.REQUIRED, _identity(300), None, None, TLS_NOW)
    assert "the agent does not answer" in down.detail


def test_tls_off_is_a_warning_with_the_way_on() -> None:
    check = doctor.tls_check(TlsMode.OFF, None, None, 200, TLS_NOW)
    assert check.level is Level.WARN and "in clear" in check.detail
    assert check.fix is not None and "--tls required" in check.fix


def test_a_providers_certificate_near_or_past_expiry_is_flagged() -> None:
    soon = doctor.tls_check(TlsMode.ON, _identity(10, agent_made=False), None, 200, TLS_NOW)
    assert soon.level is Level.WARN and "expires in 10 days" in soon.detail
    gone = doctor.tls_check(TlsMode.ON, _identity(-1, agent_made=False), None, 200, TLS_NOW)
    assert gone.level is Level.FAIL and "EXPIRED" in gone.detail and gone.fix
    # The agent's own is renewed by the agent itself: no warning for it.
    assert doctor.tls_check(TlsMode.ON, _identity(10), None, 200, TLS_NOW).level is Level.PASS


def test_an_unreadable_certificate_fails_and_no_certificate_yet_passes() -> None:
    bad = doctor.tls_check(TlsMode.ON, None, "/c.pem: not a readable PEM", None, TLS_NOW)
    assert bad.level is Level.FAIL and bad.fix
    fresh = doctor.tls_check(TlsMode.ON, None, None, None, TLS_NOW)
    assert fresh.level is Level.PASS and "first start" in fresh.detail


def test_run_checks_reports_the_port_tls() -> None:
    probes = FakeProbes(tls=_identity(300), plain=400)
    checks = doctor.run_checks(load_settings(environ={"QUDATA_TLS": "required"}), probes)
    (tls,) = [c for c in checks if c.name == "api tls"]
    assert "plain HTTP refused" in tls.detail


def test_each_component_of_the_container_stack_gets_its_verdict() -> None:
    probes = FakeProbes(
        modes={Path("/st"): 0o700, Path("/st/agent_secret"): 0o600},
        stack=[
            Installed(RUNC, "1.1.12", "containerd.io", "1.6.28-1"),
            Installed(CONTAINERD, "1.7.27", "containerd.io", "1.7.27-1"),
            Installed(DOCKER, "19.03.0", "docker-ce", "5:19.03.0~3-0~debian-buster"),
            Installed(KERNEL, "5.14.0-427.el9.x86_64", distro="distribution", exact=False),
        ],
    )
    checks = doctor.run_checks(_settings(QUDATA_API_KEY="key-1234"), probes)
    found = _by_name(checks)
    assert found["runc version"].level is Level.FAIL
    assert "CVE-2025-52881" in found["runc version"].detail
    assert found["runc version"].fix and "runc" in found["runc version"].fix
    assert found["containerd version"].level is Level.PASS
    assert found["docker version"].level is Level.FAIL  # a vendor build older than the fix
    assert found["kernel version"].level is Level.WARN  # a distribution kernel: cannot tell
    assert doctor.exit_code(checks) == 1


def test_the_tenant_firewall_is_looked_at_without_changing_it() -> None:
    good = FakeProbes(modes={Path("/st"): 0o700})
    assert _by_name(doctor.run_checks(_settings(), good))["tenant firewall"].level is Level.PASS
    gone = FakeProbes(wall=["chain QUDATA-EGRESS is missing", "no jump -i qudata0 -j X in INPUT"])
    check = _by_name(doctor.run_checks(_settings(), gone))["tenant firewall"]
    assert check.level is Level.FAIL and "QUDATA-EGRESS is missing" in check.detail
    assert check.fix and "qudata-agent firewall apply" in check.fix
    blind = FakeProbes(wall="iptables cannot list the rules (run as root)")
    assert _by_name(doctor.run_checks(_settings(), blind))["tenant firewall"].level is Level.WARN
    off = _by_name(doctor.run_checks(_settings(QUDATA_FIREWALL="off"), FakeProbes()))
    assert off["tenant firewall"].level is Level.WARN and "off" in off["tenant firewall"].detail
