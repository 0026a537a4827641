"""The host's own figures: CPU, memory, disk, network link and machine identity.

Owns: reading /proc, /sys and psutil for the inventory, the default-route
interface and its address, and the machine fingerprint; running the host tools
that fill the gaps (`dmidecode -t memory` for the memory speed, `ethtool` when
sysfs has no link speed, `lscpu` when /proc/cpuinfo names no CPU model). GPUs
come from the NVML adapter, handed in through the constructor.

What stays true:
- Parsers are pure functions over text, tested against captured samples; only
  the thin readers around them touch files.
- A figure that cannot be read is None (unknown), never a guess; reading the
  inventory does not raise because one figure is missing.
- A host tool that is missing, fails, or runs past its timeout gives None;
  tools run by absolute path, with arguments as a list (no shell) and LC_ALL=C.
- The CPU topology (`read_cpus`) comes from sysfs: the online CPUs, each
  one's `core_id` and `physical_package_id`, and the NUMA node whose
  `cpulist` holds it; a CPU whose topology files are missing is a core of
  its own on package 0, and without /sys/devices/system/node its node is None.
- The fingerprint is stable across restarts: the same machine gives the same
  hash as long as its machine id (or, failing that, its DMI uuid or hostname)
  does not change.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import psutil

from qudata_agent.domain.inventory import GpuReport, HostInventory
from qudata_agent.domain.topology import Cpu, GpuTopology, HostShape, parse_cpu_list

logger = logging.getLogger(__name__)

_DEFAULT_DESTINATION = "00000000"
_RTF_UP = 0x1
_MACHINE_ID_PATHS = ("/etc/machine-id", "/var/lib/dbus/machine-id")
_DMI_UUID_PATH = "/sys/class/dmi/id/product_uuid"
_TOOL_TIMEOUT_S = 5.0
_SBIN_PATH = "/usr/local/sbin:/usr/sbin:/sbin:/usr/local/bin:/usr/bin:/bin"
_SPEED = re.compile(r"^(\d+)\s*(?:MT/s|MHz)$", re.IGNORECASE)
_ETHTOOL_SPEED = re.compile(r"^\s*Speed:\s*(\d+)\s*Mb/s\s*$", re.MULTILINE)
_EMPTY_SLOT = ("no module installed", "not installed", "unknown", "0 ")
# Vendor ids lscpu prints on x86, already named by the model ("Intel(R) ...", "AMD ...").
_X86_VENDOR_IDS = frozenset({"GenuineIntel", "AuthenticAMD", "HygonGenuine", "CentaurHauls"})

# Runs a host tool: argv in, its stdout out, None when it could not give one.
ToolRunner = Callable[[Sequence[str]], str | None]


class GpuSource(Protocol):
    """Where the GPU part of the inventory comes from (the NVML adapter)."""

    def report(self) -> GpuReport: ...


def _read_text(path: str | Path) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _cpuinfo_field(text: str, key: str) -> str | None:
    """The value of the first `key : value` line of /proc/cpuinfo text."""
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() == key:
            return value.strip() or None
    return None


def parse_cpuinfo_model(text: str) -> str | None:
    """The CPU model from /proc/cpuinfo ("model name"); None where absent (arm64)."""
    return _cpuinfo_field(text, "model name")


def parse_cpuinfo_mhz(text: str) -> float | None:
    """The first "cpu MHz" of /proc/cpuinfo (the current clock); None when absent or 0."""
    value = _cpuinfo_field(text, "cpu MHz")
    try:
        mhz = float(value) if value is not None else 0.0
    except ValueError:
        return None
    return mhz if mhz > 0 else None


def _psutil_freq_mhz() -> float | None:
    try:
        freq = psutil.cpu_freq()
    except (OSError, NotImplementedError):
        return None
    if freq is None:
        return None
    for mhz in (freq.max, freq.current):
        if mhz and mhz > 0:
            return float(mhz)
    return None


def read_cpu_freq_ghz(proc_root: str = "/proc", sys_root: str = "/sys") -> float | None:
    """The CPU's maximum clock in GHz, from the best source available.

    Order: sysfs `cpuinfo_max_freq` (kHz), psutil's max then current clock,
    /proc/cpuinfo's "cpu MHz". A zero anywhere counts as unknown.
    """
    khz_text = _read_text(f"{sys_root}/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    if khz_text is not None:
        try:
            khz = int(khz_text.strip())
        except ValueError:
            khz = 0
        if khz > 0:
            return khz / 1_000_000
    mhz = _psutil_freq_mhz()
    if mhz is None:
        cpuinfo = _read_text(f"{proc_root}/cpuinfo")
        mhz = parse_cpuinfo_mhz(cpuinfo) if cpuinfo is not None else None
    return None if mhz is None else mhz / 1000


def default_route_interface(proc_net_route_text: str) -> str | None:
    """The interface of the IPv4 default route with the lowest metric, from /proc/net/route.

    Routes that are not up are ignored; on a tie the first listed wins.
    """
    best: tuple[int, str] | None = None
    for line in proc_net_route_text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8 or fields[1] != _DEFAULT_DESTINATION:
            continue
        try:
            flags, metric = int(fields[3], 16), int(fields[6])
        except ValueError:
            continue
        if fields[7] != _DEFAULT_DESTINATION or not flags & _RTF_UP:
            continue
        if best is None or metric < best[0]:
            best = (metric, fields[0])
    return None if best is None else best[1]


def read_link_speed_gbps(iface: str, sys_root: str = "/sys") -> float | None:
    """The link speed of `iface` in Gbit/s; None when unknown (-1, down, virtual, unreadable)."""
    if not iface or "/" in iface or iface in (".", ".."):
        return None
    text = _read_text(f"{sys_root}/class/net/{iface}/speed")
    try:
        mbits = int(text.strip()) if text is not None else -1
    except ValueError:
        return None
    return mbits / 1000 if mbits > 0 else None


def ipv6_available(proc_root: str = "/proc") -> bool:
    """Whether the kernel has IPv6 (off with `ipv6.disable=1`: its sysctls are absent then)."""
    return Path(proc_root, "sys/net/ipv6/conf/all/disable_ipv6").exists()


def default_route_address(proc_root: str = "/proc") -> str | None:
    """The first IPv4 address of the default-route interface; None without one."""
    route = _read_text(f"{proc_root}/net/route")
    iface = default_route_interface(route) if route is not None else None
    if iface is None:
        return None
    for addr in psutil.net_if_addrs().get(iface, []):
        if addr.family == socket.AF_INET:
            return addr.address
    return None


def run_tool(argv: Sequence[str], timeout_s: float = _TOOL_TIMEOUT_S) -> str | None:
    """stdout of a host tool (found on PATH, else in the sbin directories); None on any failure."""
    if not argv:
        return None
    exe = shutil.which(argv[0]) or shutil.which(argv[0], path=_SBIN_PATH)
    if exe is None:
        logger.debug("host tool not installed", extra={"tool": argv[0]})
        return None
    try:
        done = subprocess.run(  # absolute path, argument list, no shell
            [exe, *argv[1:]],
            capture_output=True,
            timeout=timeout_s,
            env={"LC_ALL": "C", "PATH": _SBIN_PATH},
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as e:
        logger.debug("host tool failed", extra={"tool": argv[0], "error": str(e)})
        return None
    if done.returncode != 0:
        logger.debug("host tool failed", extra={"tool": argv[0], "code": done.returncode})
        return None
    return done.stdout.decode("utf-8", errors="replace")


def _key_values(block: str) -> dict[str, str]:
    """`Key: value` lines of one block (dmidecode, lscpu); the first of a repeated key wins."""
    fields: dict[str, str] = {}
    for line in block.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    return fields


def _speed_mts(value: str | None) -> int | None:
    """ "3200 MT/s" or "3200 MHz" -> 3200; "Unknown", "0 MT/s" and anything else -> None."""
    match = _SPEED.match(value.strip()) if value is not None else None
    speed = int(match.group(1)) if match else 0
    return speed if speed > 0 else None


def _populated(fields: dict[str, str]) -> bool:
    size = fields.get("Size", "").lower()
    return bool(size) and not size.startswith(_EMPTY_SLOT)


def parse_dmidecode_memory_speed(text: str) -> int | None:
    """The highest configured speed, in MT/s, over the populated modules of `dmidecode -t memory`.

    dmidecode prints "MT/s" since 3.0 and "MHz" before, both meaning transfers
    per second for DDR, so the number is taken as is. The configured speed
    ("Configured Memory Speed", "Configured Clock Speed" before dmidecode 3.0)
    is what the modules run at; the rated "Speed" is used only for a module
    whose dmidecode prints no configured line at all (dmidecode 2.11 and
    older). A module that says "Unknown" counts as unknown: with no known
    module the answer is None, never a guess.
    """
    best: int | None = None
    for block in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in block.strip().splitlines()]
        if "Memory Device" not in lines:
            continue
        fields = _key_values(block)
        if not _populated(fields):
            continue
        configured_keys = ("Configured Memory Speed", "Configured Clock Speed")
        configured = [fields[k] for k in configured_keys if k in fields]
        speed = _speed_mts(configured[0] if configured else fields.get("Speed"))
        if speed is not None and (best is None or speed > best):
            best = speed
    return best


def parse_ethtool_speed_gbps(text: str) -> float | None:
    """ "Speed: 10000Mb/s" of `ethtool IFACE` in Gbit/s; "Speed: Unknown!" -> None."""
    match = _ETHTOOL_SPEED.search(text)
    mbits = int(match.group(1)) if match else 0
    return mbits / 1000 if mbits > 0 else None


@dataclass(frozen=True)
class LscpuFacts:
    model: str | None
    max_mhz: float | None


def parse_lscpu(text: str) -> LscpuFacts:
    """The CPU model and maximum clock from `lscpu` (the flat and the nested layouts).

    On arm64 the model is prefixed by the vendor ("ARM Neoverse-N1"); lscpu's
    "-" (unknown) falls back to its "BIOS Model name".
    """
    fields = _key_values(text)
    model = next(
        (
            fields[key]
            for key in ("Model name", "BIOS Model name")
            if fields.get(key, "-") not in ("", "-")
        ),
        None,
    )
    vendor = fields.get("Vendor ID", "")
    if (
        model is not None
        and vendor
        and vendor not in _X86_VENDOR_IDS
        and vendor.lower() not in model.lower()
    ):
        model = f"{vendor} {model}"
    try:
        mhz = float(fields.get("CPU max MHz", "0").replace(",", "."))
    except ValueError:
        mhz = 0.0
    return LscpuFacts(model=model, max_mhz=mhz if mhz > 0 else None)


def link_speed_gbps(iface: str, sys_root: str = "/sys", run: ToolRunner = run_tool) -> float | None:
    """The link speed of `iface` in Gbit/s: sysfs first, then `ethtool IFACE`."""
    speed = read_link_speed_gbps(iface, sys_root)
    if speed is not None or not _plain_iface_name(iface):
        return speed
    out = run(["ethtool", iface])
    return parse_ethtool_speed_gbps(out) if out is not None else None


def _plain_iface_name(iface: str) -> bool:
    # Never handed to a tool as an option or a path.
    return (
        bool(iface) and not iface.startswith("-") and "/" not in iface and iface not in (".", "..")
    )


def machine_fingerprint(
    paths: Iterable[str] = _MACHINE_ID_PATHS,
    dmi_uuid_path: str = _DMI_UUID_PATH,
) -> str:
    """sha256 hex of the first identity found, in this order:

    1. the first non-empty machine id among `paths` (systemd, then D-Bus);
    2. the DMI product uuid (`dmi_uuid_path`, often readable by root only);
    3. the hostname, the last resort (stable only as long as the name is).
    """
    for path in (*paths, dmi_uuid_path):
        text = _read_text(path)
        if text is not None and text.strip():
            return hashlib.sha256(text.strip().encode("utf-8")).hexdigest()
    logger.warning("no machine id or DMI uuid readable; fingerprinting the hostname")
    return hashlib.sha256(socket.gethostname().encode("utf-8")).hexdigest()


def _disk_total(path: str) -> int | None:
    try:
        return shutil.disk_usage(path).total
    except OSError:
        return None


def disk_usage_bytes(path: str) -> tuple[int, int] | None:
    """(total, free) bytes of the filesystem that holds `path`; None if unknown."""
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return None
    return usage.total, usage.free


def disk_free_bytes(path: str) -> int | None:
    """Free bytes (for unprivileged use) on the filesystem that holds `path`; None if unknown."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _unescape_mount_field(text: str) -> str:
    # mountinfo writes space, tab, newline and backslash as octal escapes ("\040").
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def _holds(point: str, path: str) -> bool:
    return point == "/" or path == point or path.startswith(point.rstrip("/") + "/")


@dataclass(frozen=True)
class Mount:
    """One line of /proc/self/mountinfo: where, which filesystem, with which options."""

    point: str
    fstype: str
    options: frozenset[str]  # per mount and of the superblock


def parse_mount(mountinfo_text: str, path: str) -> Mount | None:
    """The mount that holds `path`, from /proc/self/mountinfo text.

    The mount point that is the longest prefix of `path` wins (of mounts
    stacked on one point, the last one). `path` should be resolved (no
    symlinks). None when no line matches.
    """
    best: Mount | None = None
    for line in mountinfo_text.splitlines():
        fields = line.split()
        if "-" not in fields[6:]:
            continue
        sep = fields.index("-", 6)
        if len(fields) < sep + 4:
            continue
        point = _unescape_mount_field(fields[4])
        if not _holds(point, path):
            continue
        options = frozenset(fields[5].split(",")) | frozenset(fields[sep + 3].split(","))
        if best is None or len(point) >= len(best.point):
            best = Mount(point, fields[sep + 1], options)
    return best


def parse_mount_options(mountinfo_text: str, path: str) -> frozenset[str] | None:
    """The options (per mount and of the superblock) of the filesystem that holds `path`."""
    found = parse_mount(mountinfo_text, path)
    return None if found is None else found.options


def mount_options(path: str, mountinfo_path: str = "/proc/self/mountinfo") -> frozenset[str] | None:
    """The mount options of the filesystem that holds `path` (e.g. Docker's data root)."""
    text = _read_text(mountinfo_path)
    return None if text is None else parse_mount_options(text, os.path.realpath(path))


class HostProbe:
    """Collects the host inventory; blocking, so callers run it off the event loop."""

    def __init__(
        self,
        nvml: GpuSource,
        proc_root: str = "/proc",
        sys_root: str = "/sys",
        run: ToolRunner = run_tool,
    ) -> None:
        self._nvml = nvml
        self._proc_root = proc_root
        self._sys_root = sys_root
        self._run = run

    def inventory(self, docker_root: str) -> HostInventory:
        """Everything `/init/host` reports; `docker_root` is Docker's data root."""
        cpuinfo = _read_text(f"{self._proc_root}/cpuinfo")
        route = _read_text(f"{self._proc_root}/net/route")
        iface = default_route_interface(route) if route is not None else None
        cpu_name = parse_cpuinfo_model(cpuinfo) if cpuinfo is not None else None
        freq = read_cpu_freq_ghz(self._proc_root, self._sys_root)
        if cpu_name is None or freq is None:  # arm64: /proc/cpuinfo names no model
            lscpu = self._run(["lscpu"])
            facts = parse_lscpu(lscpu) if lscpu is not None else LscpuFacts(None, None)
            cpu_name = cpu_name or facts.model
            if freq is None and facts.max_mhz is not None:
                freq = facts.max_mhz / 1000
        dmi = self._run(["dmidecode", "-t", "memory"])
        return HostInventory(
            cpu_name=cpu_name,
            cpu_cores=psutil.cpu_count(logical=False),
            vcpu=psutil.cpu_count() or os.cpu_count(),
            cpu_freq_ghz=freq,
            ram_bytes=psutil.virtual_memory().total,
            disk_bytes=_disk_total(docker_root),
            memory_speed_mts=parse_dmidecode_memory_speed(dmi) if dmi is not None else None,
            ethernet_gbps=(
                link_speed_gbps(iface, self._sys_root, self._run) if iface is not None else None
            ),
            gpu=self._nvml.report(),
        )


@dataclass(frozen=True)
class HostSample:
    """The host's own figures at one moment (for stats when there is no instance)."""

    at: float  # monotonic seconds
    cpu_percent: float  # all CPUs, since the previous sample
    ram_percent: float
    net_rx_bytes: int
    net_tx_bytes: int


class HostCounters:
    """Host-wide CPU, memory and network counters through psutil (cheap: /proc reads)."""

    def __init__(self) -> None:
        psutil.cpu_percent(interval=None)  # primes the CPU baseline

    def sample(self) -> HostSample:
        net = psutil.net_io_counters()
        return HostSample(
            at=time.monotonic(),
            cpu_percent=float(psutil.cpu_percent(interval=None)),
            ram_percent=float(psutil.virtual_memory().percent),
            net_rx_bytes=int(net.bytes_recv) if net else 0,
            net_tx_bytes=int(net.bytes_sent) if net else 0,
        )


def host_memory_bytes() -> int:
    return int(psutil.virtual_memory().total)


def _int_file(path: str) -> int | None:
    text = _read_text(path)
    try:
        return int(text.strip()) if text is not None else None
    except ValueError:
        return None


def _cpu_nodes(sys_root: str) -> dict[int, int]:
    """CPU -> NUMA node, from /sys/devices/system/node/node*/cpulist."""
    nodes: dict[int, int] = {}
    base = Path(sys_root) / "devices" / "system" / "node"
    try:
        entries = sorted(base.iterdir())
    except OSError:
        return nodes
    for entry in entries:
        name = entry.name
        if not (name.startswith("node") and name[4:].isdigit()):
            continue
        text = _read_text(entry / "cpulist")
        try:
            cpus = parse_cpu_list(text) if text is not None else ()
        except ValueError:
            continue
        for cpu in cpus:
            nodes.setdefault(cpu, int(name[4:]))
    return nodes


def read_cpus(sys_root: str = "/sys") -> tuple[Cpu, ...]:
    """The online logical CPUs with their core, package and NUMA node, from sysfs.

    Where sysfs lists no online CPUs, the CPUs this process may run on
    (`sched_getaffinity`) are taken, each a core of its own.
    """
    base = f"{sys_root}/devices/system/cpu"
    text = _read_text(f"{base}/online")
    try:
        online = parse_cpu_list(text) if text is not None else ()
    except ValueError:
        online = ()
    if not online:
        online = tuple(sorted(os.sched_getaffinity(0)))
    nodes = _cpu_nodes(sys_root)
    cpus = []
    for cpu in online:
        core = _int_file(f"{base}/cpu{cpu}/topology/core_id")
        package = _int_file(f"{base}/cpu{cpu}/topology/physical_package_id")
        cpus.append(
            Cpu(
                cpu=cpu,
                core=cpu if core is None else core,
                package=0 if package is None or package < 0 else package,
                node=nodes.get(cpu),
            )
        )
    return tuple(cpus)


def host_shape(gpus: GpuTopology, sys_root: str = "/sys") -> HostShape:
    """The host as placement sees it: `gpus` (from the NVML adapter), its CPUs and memory."""
    return HostShape(gpus=gpus, cpus=read_cpus(sys_root), memory_bytes=host_memory_bytes())


def resolv_conf_texts(
    paths: tuple[str, ...] = ("/etc/resolv.conf", "/run/systemd/resolve/resolv.conf"),
) -> str:
    """The host's resolver files, joined (systemd-resolved's upstream list included)."""
    texts = [_read_text(path) for path in paths]
    return "\n".join(text for text in texts if text)
