"""`qudata-agent doctor`: is this host ready to rent out, and if not, what to do.

Owns the readiness checks, their verdicts and the table they print. Each check
is a pure function from what was observed (Docker's `info`, NVML's report, how
many ports bind, file modes, `timedatectl`'s answer, the control plane's HTTP
status, the container stack's versions) to a `Check`; `run_checks` asks a `Probes` object for those
observations, so the checks are tested with fakes and `HostProbes` is the only
part that touches the host.

What stays true:
- every `fail` carries a fix (a command or a setting to change); so does every
  `warn` that has one;
- the host is ready (exit code 0) exactly when no check fails; warnings (no
  GPU, no disk quota, an unknown clock) never make it "not ready";
- doctor only looks: it creates, tightens and starts nothing, and never prints
  a secret;
- a host with no NVIDIA GPU is a CPU host, never a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import http.client
import json
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from email.utils import parsedate_to_datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from qudata_agent import __version__
from qudata_agent.adapters.control_plane import ControlPlane, ControlPlaneError
from qudata_agent.adapters.docker import DockerEngine
from qudata_agent.adapters.firewall import Firewall
from qudata_agent.adapters.host import disk_free_bytes, mount_options, run_tool
from qudata_agent.adapters.host_versions import container_stack
from qudata_agent.adapters.netcheck import port_is_free
from qudata_agent.adapters.nvml import Nvml
from qudata_agent.adapters.runtimes import sandbox_gpus, toolkit_config, toolkit_version
from qudata_agent.adapters.store import Store
from qudata_agent.adapters.tls import TlsError, TlsIdentity, served_identity
from qudata_agent.adapters.volume_fs import LoopVolumes, XfsProjectVolumes, fs_facts
from qudata_agent.config import Settings
from qudata_agent.domain.inventory import GpuCondition, GpuReport
from qudata_agent.domain.isolation import SandboxGpus, parse_runtimes, sandbox_gpu_refusal
from qudata_agent.domain.nvidia_toolkit import Version, toolkit_refusal, unconfirmed
from qudata_agent.domain.storage import quota_support
from qudata_agent.domain.tls import RENEW_BEFORE, TlsMode
from qudata_agent.domain.versions import Installed, Verdict, judge
from qudata_agent.domain.volumes import FsFacts, Mechanism, choose_mechanism
from qudata_agent.errors import AgentError

DB_FILE = "agent.db"
AGENT_PORT_KEY = "agent_port"  # the store's key of the port last listened on (app.py)
SECRET_FILES = ("agent_secret", "api_key")  # in the state dir; see services/credentials.py
NVIDIA_PCI_VENDOR = "0x10de"
PORTS_FREE_ENOUGH = 0.9  # below this share of the range free: a warning
_CP_TIMEOUT_S = 5.0
GIB = 1024**3
DISK_FAIL_BYTES = 20 * GIB  # free on Docker's data root: below this, no image fits
DISK_WARN_BYTES = 100 * GIB  # below this, a few large images fill it
CLOCK_WARN_S = 5.0  # skew against the control plane's Date header
CLOCK_FAIL_S = 60.0
DOCKER_DEFAULT_DOWNLOADS = 3  # dockerd's max-concurrent-downloads when unset
EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")
RESERVED = Path("/proc/sys/net/ipv4/ip_local_reserved_ports")
DAEMON_JSON = Path("/etc/docker/daemon.json")
CDI_DIRS = (Path("/etc/cdi"), Path("/var/run/cdi"))


class Level(StrEnum):
    PASS = "pass"  # noqa: S105 (a verdict, not a password)
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True)
class Check:
    name: str
    level: Level
    detail: str
    fix: str | None = None


class ProbeError(Exception):
    """An observation could not be made; the message says why (no secret in it)."""


# -- the checks (pure) ------------------------------------------------------------


def docker_check(info: Mapping[str, Any] | None, error: str | None, docker_host: str) -> Check:
    if info is None:
        return Check(
            "docker",
            Level.FAIL,
            error or f"Docker at {docker_host} does not answer",
            "start it (systemctl start docker), or install it (install.sh does); "
            "run doctor as root; check DOCKER_HOST",
        )
    version = info.get("ServerVersion") or "unknown version"
    root = info.get("DockerRootDir") or "?"
    return Check("docker", Level.PASS, f"Docker {version} at {docker_host}, data root {root}")


def _driver_status(info: Mapping[str, Any], key: str) -> str | None:
    for pair in info.get("DriverStatus") or ():
        if isinstance(pair, Sequence) and len(pair) == 2 and pair[0] == key:
            return str(pair[1])
    return None


def storage_check(
    info: Mapping[str, Any] | None, mount_options: Collection[str] | None = None
) -> Check:
    """Whether Docker can cap an instance's disk (`storage_gb`): the agent's own verdict.

    From `docker info` (the driver and its "Backing Filesystem") and, for
    overlay2 on xfs, the mount options of the data root (`None`: unknown).
    """
    if info is None:
        return Check("storage quota", Level.WARN, "not checked: Docker does not answer")
    driver = str(info.get("Driver") or "unknown")
    backing = _driver_status(info, "Backing Filesystem")
    root = info.get("DockerRootDir")
    support = quota_support(driver, backing, mount_options, str(root) if root else None)
    where = f"storage driver {driver}" + (f" on {backing}" if backing else "")
    if support.enforceable:
        return Check("storage quota", Level.PASS, f"{where}: {support.how}")
    if driver == "overlay2" and (backing or "").lower() != "xfs":
        detail = f"{where}: quota not enforceable unless the data root is xfs with pquota"
    else:
        detail = f"{where}: {support.how}"
    return Check("storage quota", Level.WARN, detail, support.fix or None)


def gpu_check(report: GpuReport, pci_gpus: int) -> Check:
    """GPUs as NVML sees them, against the NVIDIA devices on the PCI bus."""
    if report.gpus and len(report.gpus) < pci_gpus:
        return Check(
            "nvidia gpus",
            Level.FAIL,
            f"NVML sees {len(report.gpus)} of the {pci_gpus} NVIDIA GPU(s) on the PCI bus",
            "a GPU fell off the bus or the driver lost it: look for Xid 79 or 'fallen off "
            "the bus' in dmesg, then reboot (or reseat the GPU); nvidia-smi must list all",
        )
    if report.gpus:
        names = ", ".join(sorted({gpu.name for gpu in report.gpus}))
        return Check(
            "nvidia gpus",
            Level.PASS,
            f"{len(report.gpus)} GPU(s) through NVML ({names}), driver {report.driver_version}",
        )
    if pci_gpus:
        return Check(
            "nvidia gpus",
            Level.FAIL,
            f"{pci_gpus} NVIDIA device(s) on the PCI bus but NVML sees none"
            + (f" ({report.error})" if report.error else ""),
            "install the NVIDIA driver (install.sh --install-driver) and reboot; "
            "nvidia-smi must list the GPUs",
        )
    return Check("nvidia gpus", Level.WARN, "no NVIDIA GPU: the host can only rent CPU instances")


def runtime_check(info: Mapping[str, Any] | None, gpus_present: bool) -> Check:
    """Docker's `nvidia` runtime (the NVIDIA Container Toolkit), needed for GPU instances."""
    if info is None:
        return Check("nvidia runtime", Level.WARN, "not checked: Docker does not answer")
    runtimes = sorted(info.get("Runtimes") or {})
    if "nvidia" in runtimes:
        return Check("nvidia runtime", Level.PASS, "registered in Docker")
    if not gpus_present:
        return Check("nvidia runtime", Level.PASS, "not needed: no NVIDIA GPU")
    return Check(
        "nvidia runtime",
        Level.FAIL,
        f"Docker has no nvidia runtime (it has: {', '.join(runtimes) or 'none'})",
        "install the NVIDIA Container Toolkit, then: nvidia-ctk runtime configure "
        "--runtime=docker && systemctl restart docker (install.sh does both)",
    )


def ports_check(lo: int, hi: int, busy: Sequence[int]) -> Check:
    """`busy`: ports of the range that do not bind now and are not the agent's own instances'."""
    total = hi - lo + 1
    free = total - len(busy)
    detail = f"{free} of {total} ports of {lo}-{hi} free"
    if not busy:
        return Check("port range", Level.PASS, detail)
    shown = ", ".join(str(p) for p in list(busy)[:10]) + (", ..." if len(busy) > 10 else "")
    fix = (
        f"see what holds them: ss -tulpn '( sport >= :{lo} and sport <= :{hi} )'; "
        "stop it, or set QUDATA_PORT_RANGE to a free range"
    )
    level = Level.FAIL if free == 0 else Level.WARN if free < PORTS_FREE_ENOUGH * total else None
    if level is None:
        return Check("port range", Level.PASS, f"{detail} (busy: {shown})")
    return Check("port range", level, f"{detail}; busy: {shown}", fix)


def state_dir_check(path: Path, mode: int | None) -> Check:
    if mode is None:
        return Check("state dir", Level.PASS, f"{path} does not exist yet; the agent makes it 0700")
    if mode != 0o700:
        return Check(
            "state dir", Level.FAIL, f"{path} has mode {mode:04o}, not 0700", f"chmod 700 {path}"
        )
    return Check("state dir", Level.PASS, f"{path} is 0700")


def secret_files_check(modes: Mapping[Path, int]) -> Check:
    """`modes`: the secret files that exist, with their permission bits."""
    loose = sorted(path for path, mode in modes.items() if mode & 0o077)
    if loose:
        shown = ", ".join(f"{path} ({modes[path]:04o})" for path in loose)
        return Check(
            "secret files",
            Level.FAIL,
            f"readable by others: {shown}",
            "chmod 600 " + " ".join(str(path) for path in loose),
        )
    if not modes:
        return Check("secret files", Level.PASS, "none yet")
    return Check("secret files", Level.PASS, f"{len(modes)} file(s), none readable by others")


def clock_check(timedatectl: str | None) -> Check:
    """From `timedatectl show -p NTPSynchronized` (None: the tool did not answer)."""
    value = None
    for line in (timedatectl or "").splitlines():
        key, _, raw = line.partition("=")
        if key.strip() == "NTPSynchronized":
            value = raw.strip().lower()
    if value == "yes":
        return Check("clock sync", Level.PASS, "synchronised (NTP)")
    if value == "no":
        return Check(
            "clock sync",
            Level.WARN,
            "the clock is not synchronised",
            "timedatectl set-ntp true (or run chrony/ntpd)",
        )
    return Check(
        "clock sync",
        Level.WARN,
        "unknown: timedatectl did not answer (no systemd?)",
        "make sure an NTP client (systemd-timesyncd, chrony) keeps the clock right",
    )


# What the agent's SSH bundle is made from, and the package that brings each.
SSH_TOOLS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("openssh-server", ("/usr/sbin/sshd",)),
    ("util-linux", ("/usr/bin/setpriv",)),
    ("patchelf", ("/usr/bin/patchelf", "/usr/local/bin/patchelf")),
    ("busybox-static", ("/bin/busybox", "/usr/bin/busybox")),
)


def ssh_check(missing: Sequence[str]) -> Check:
    """Whether the host has what the agent builds instances' SSH from (`missing`: packages)."""
    if not missing:
        return Check("instance ssh", Level.PASS, "sshd, setpriv, patchelf and busybox present")
    return Check(
        "instance ssh",
        Level.WARN,
        f"missing {', '.join(missing)}: SSH-enabled instances run without SSH",
        f"apt-get install {' '.join(missing)}",
    )


# What the network meter, the caps and the egress policy run (CONTRACT.md section 8).
NET_TOOLS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("nftables", ("/usr/sbin/nft", "/sbin/nft")),
    ("iproute2", ("/usr/sbin/tc", "/sbin/tc")),
)


def net_tools_check(missing: Sequence[str]) -> Check:
    """Whether the host has nft and tc (`missing`: the packages that bring them)."""
    if not missing:
        return Check("network meter", Level.PASS, "nft and tc present")
    return Check(
        "network meter",
        Level.WARN,
        f"missing {', '.join(missing)}: instances' traffic is not metered or capped, and"
        " port 25 is not blocked",
        f"apt-get install {' '.join(missing)}",
    )


def control_plane_check(url: str, has_key: bool, answer: CpAnswer | str | None) -> Check:
    """`answer`: the answer to an authenticated call through the agent's client, or why none."""
    if not has_key:
        return Check(
            "control plane",
            Level.WARN,
            "no API key: standalone mode, the host is not offered for rent",
            "install.sh --api-key-file FILE (the key goes to the state dir's api_key)",
        )
    if not isinstance(answer, CpAnswer):
        return Check(
            "control plane",
            Level.FAIL,
            f"{url} unreachable: {answer or 'no answer'}",
            "allow outbound HTTPS to it (DNS, firewall, HTTPS_PROXY), or fix QUDATA_API_URL",
        )
    if answer.status in (401, 403):
        return Check(
            "control plane",
            Level.FAIL,
            f"{url} refuses the API key (HTTP {answer.status})",
            "give the right key: install.sh --api-key-file FILE",
        )
    detail = f"{url} answers an authenticated call (HTTP {answer.status})"
    skew = clock_skew_s(answer)
    if skew is None:
        return Check("control plane", Level.PASS, detail + "; no Date header: clock not compared")
    detail += f"; clock skew {skew:+.0f} s"
    if abs(skew) > CLOCK_FAIL_S:
        level = Level.FAIL
    elif abs(skew) > CLOCK_WARN_S:
        level = Level.WARN
    else:
        return Check("control plane", Level.PASS, detail)
    return Check("control plane", level, detail, "synchronise the clock: timedatectl set-ntp true")


def gpu_health_check(conditions: Sequence[GpuCondition]) -> Check | None:
    """Persistence mode, pending row remaps and ECC of each GPU (None: no GPU to check)."""
    if not conditions:
        return None
    broken = [c.uuid for c in conditions if c.remap_failed]
    pending = [c.uuid for c in conditions if c.remap_pending]
    ecc = [c.uuid for c in conditions if c.ecc_uncorrected]
    if broken or pending or ecc:
        parts = []
        if broken:
            parts.append(f"row remapping failed on {', '.join(broken)} (needs service)")
        if pending:
            parts.append(f"row remaps pending on {', '.join(pending)}")
        if ecc:
            parts.append(f"uncorrected ECC errors on {', '.join(ecc)}")
        return Check(
            "gpu health",
            Level.FAIL,
            "; ".join(parts),
            "drain the host, then reset the GPU (nvidia-smi -r) or reboot so pending "
            "remaps take effect; a failed remap or recurring ECC errors: RMA the GPU",
        )
    off = [c.uuid for c in conditions if c.persistence_mode is False]
    no_ecc = [c.uuid for c in conditions if c.ecc_enabled is False]
    detail = f"{len(conditions)} GPU(s): no pending row remap, no uncorrected ECC error"
    if off:
        return Check(
            "gpu health",
            Level.WARN,
            f"{detail}; persistence mode off on {', '.join(off)}",
            "systemctl enable --now nvidia-persistenced (or nvidia-smi -pm 1): without it "
            "the driver unloads between jobs and each instance start is slower",
        )
    if no_ecc:
        detail += f"; ECC off on {', '.join(no_ecc)}"
    return Check("gpu health", Level.PASS, detail + "; persistence mode on")


def toolkit_check(gpus_present: bool, cli: tuple[int, str] | None) -> Check:
    """`nvidia-container-cli info`: the toolkit's view of the driver (`cli`: exit, output)."""
    if not gpus_present:
        return Check("nvidia toolkit", Level.PASS, "not needed: no NVIDIA GPU")
    if cli is None:
        return Check(
            "nvidia toolkit",
            Level.FAIL,
            "nvidia-container-cli is not installed",
            "install the NVIDIA Container Toolkit (install.sh does)",
        )
    code, output = cli
    first = next((line.strip() for line in output.splitlines() if line.strip()), "")
    if code != 0:
        return Check(
            "nvidia toolkit",
            Level.FAIL,
            f"nvidia-container-cli info fails (exit {code}): {first}",
            "the toolkit does not match the driver: reinstall nvidia-container-toolkit, "
            "and reboot if the driver was upgraded without one",
        )
    return Check("nvidia toolkit", Level.PASS, f"nvidia-container-cli info: {first}")


def cdi_check(gpus_present: bool, specs: Sequence[str]) -> Check:
    if not gpus_present:
        return Check("cdi", Level.PASS, "not needed: no NVIDIA GPU")
    if specs:
        return Check("cdi", Level.PASS, f"CDI specs: {', '.join(specs)}")
    return Check(
        "cdi",
        Level.WARN,
        "no CDI spec for the GPUs (/etc/cdi, /var/run/cdi)",
        "nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml",
    )


def isolation_check(info: Mapping[str, Any] | None, sandbox_runtime: str) -> Check:
    """The sandbox tier: gVisor's runtime registered with Docker (the agent probes it at start)."""
    runtimes = parse_runtimes((info or {}).get("Runtimes"))
    if sandbox_runtime in runtimes:
        found = runtimes[sandbox_runtime]
        args = " ".join(found.args) or "no arguments"
        return Check(
            "isolation",
            Level.PASS,
            f"container and sandbox ({sandbox_runtime}: {found.path}, {args});"
            " the agent offers the sandbox once a probe container starts under it",
        )
    return Check(
        "isolation",
        Level.WARN,
        f"container only: Docker has no {sandbox_runtime!r} runtime, so orders for"
        " isolation 'sandbox' are refused (409)",
        "install.sh --sandbox (gVisor's runsc registered in daemon.json)",
    )


def sandbox_gpu_check(
    info: Mapping[str, Any] | None,
    sandbox_runtime: str,
    report: GpuReport,
    gpus: SandboxGpus | None,
) -> Check | None:
    """GPUs in the sandbox (runsc's nvproxy and the driver); None without GPUs or sandbox."""
    runtime = parse_runtimes((info or {}).get("Runtimes")).get(sandbox_runtime)
    if not report.gpus or runtime is None or gpus is None:
        return None
    why = sandbox_gpu_refusal(runtime, gpus, report.driver_version)
    if why is None:
        return Check("sandbox gpus", Level.PASS, f"nvproxy supports driver {report.driver_version}")
    return Check(
        "sandbox gpus", Level.WARN, f"GPU orders with isolation 'sandbox' are refused: {why}"
    )


def toolkit_version_check(
    gpus_present: bool, version: Version | None, raised: Version | None
) -> Check:
    """The NVIDIA Container Toolkit against its known escapes (domain.nvidia_toolkit)."""
    if not gpus_present:
        return Check("toolkit escapes", Level.PASS, "not needed: no NVIDIA GPU")
    why = toolkit_refusal(version, raised)
    unknown = ", ".join(unconfirmed())
    if why is not None:
        return Check("toolkit escapes", Level.FAIL, f"GPU orders are refused: {why}",
                     "apt-get install --only-upgrade nvidia-container-toolkit"
                     " nvidia-container-toolkit-base libnvidia-container-tools"
                     " libnvidia-container1")  # fmt: skip
    shown = ".".join(map(str, version or ()))
    return Check(
        "toolkit escapes",
        Level.PASS,
        f"NVIDIA Container Toolkit {shown}: past every confirmed fix"
        f" (not checkable: {unknown}; raise QUDATA_NVIDIA_TOOLKIT_MIN once its fix is known)",
    )


def forward_compat_check(
    gpus_present: bool, found: bool, hook_off: bool, mode: str | None
) -> Check:
    """The CUDA forward-compat hook (the path of CVE-2025-23266): off unless wanted."""
    if not gpus_present:
        return Check("cuda compat hook", Level.PASS, "not needed: no NVIDIA GPU")
    if found and hook_off and mode in ("disabled", "ldconfig", "mount"):
        return Check("cuda compat hook", Level.PASS, f"off (cuda-compat-mode {mode})")
    return Check(
        "cuda compat hook",
        Level.WARN,
        "the toolkit may run the enable-cuda-compat hook for a container"
        + ("" if found else " (no /etc/nvidia-container-toolkit/config.toml)"),
        "nvidia-ctk config --in-place --set features.disable-cuda-compat-lib-hook=true"
        " --set nvidia-container-runtime.modes.legacy.cuda-compat-mode=disabled"
        " (install.sh does)",
    )


def disk_check(root: str | None, free: int | None) -> Check:
    """Free space on Docker's data root, where images and writable layers live."""
    if root is None or free is None:
        return Check("docker disk", Level.WARN, "not checked: Docker's data root is unknown")
    detail = f"{free / GIB:.0f} GiB free on {root}"
    fix = "free space (docker image prune -a removes unused images) or grow the filesystem"
    if free < DISK_FAIL_BYTES:
        return Check("docker disk", Level.FAIL, detail, fix)
    if free < DISK_WARN_BYTES:
        return Check("docker disk", Level.WARN, detail, fix)
    return Check("docker disk", Level.PASS, detail)


@dataclass(frozen=True)
class VolumeSummary:
    """The volume root's filesystem and the volumes the agent's database holds."""

    facts: FsFacts | None
    count: int = 0
    size_bytes: int = 0
    disk_bytes: int = 0  # what their backings take on the disk now
    missing_tool: str | None = None  # the package the chosen mechanism needs and lacks


VOLUME_TOOLS: dict[Mechanism, tuple[str, tuple[str, ...]]] = {
    Mechanism.LOOP: ("e2fsprogs", ("/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4")),
    Mechanism.XFS_PROJECT: ("xfsprogs", ("/usr/sbin/xfs_quota", "/sbin/xfs_quota")),
}


def volumes_check(summary: VolumeSummary) -> Check:
    """The mechanism volumes get on this host, why, and the space they hold."""
    mechanism, why = choose_mechanism(summary.facts)
    held = (
        f"; {summary.count} volume(s): {summary.size_bytes / GIB:.1f} GiB given,"
        f" {summary.disk_bytes / GIB:.1f} GiB on the disk"
    )
    detail = f"{mechanism.value} ({why}){held}"
    if summary.missing_tool is not None:
        return Check("volumes", Level.FAIL, detail, f"apt-get install {summary.missing_tool}")
    return Check("volumes", Level.PASS, detail)


def live_restore_check(info: Mapping[str, Any] | None) -> Check:
    if info is None:
        return Check("live restore", Level.WARN, "not checked: Docker does not answer")
    if info.get("LiveRestoreEnabled"):
        return Check("live restore", Level.PASS, "on: a Docker restart keeps tenants running")
    return Check(
        "live restore",
        Level.FAIL,
        "off: a Docker restart or upgrade stops every tenant's container",
        'set "live-restore": true in /etc/docker/daemon.json, then systemctl reload docker '
        "(install.sh does)",
    )


def wall_check(enabled: bool, problems: Sequence[str] | None, error: str | None = None) -> Check:
    """The tenant firewall as the settings plan it (`problems` None: not looked at)."""
    if not enabled:
        return Check(
            "tenant firewall",
            Level.WARN,
            "off (QUDATA_FIREWALL=off): instances can reach the host, the LAN and metadata",
            "unset QUDATA_FIREWALL (on by default)",
        )
    if error is not None or problems is None:
        return Check("tenant firewall", Level.WARN, f"cannot inspect: {error}", "run as root")
    fix = (
        "qudata-agent firewall apply (the agent repairs it at its next sync; at boot the unit"
        " qudata-agent-firewall.service puts it in before Docker: systemctl enable"
        " qudata-agent-firewall)"
    )
    if problems:
        return Check("tenant firewall", Level.FAIL, "; ".join(problems), fix)
    return Check("tenant firewall", Level.PASS, "in place as planned (chains and jumps)")


def pulls_check(info: Mapping[str, Any] | None, daemon_json: str | None) -> Check:
    """Reports Docker's pull settings: parallel downloads and registry mirrors."""
    config: Any = {}
    with contextlib.suppress(ValueError):
        config = json.loads(daemon_json or "{}")
    if not isinstance(config, dict):
        config = {}
    downloads = config.get("max-concurrent-downloads")
    mirrors = list(((info or {}).get("RegistryConfig") or {}).get("Mirrors") or [])
    mirrors = mirrors or list(config.get("registry-mirrors") or [])
    shown = (
        f"max-concurrent-downloads {downloads}"
        if downloads
        else f"max-concurrent-downloads {DOCKER_DEFAULT_DOWNLOADS} (Docker's default)"
    )
    shown += f"; registry mirrors: {', '.join(str(m) for m in mirrors) or 'none'}"
    return Check("pulls", Level.PASS, shown)


def _port_set(text: str) -> set[int]:
    """`ip_local_reserved_ports` syntax: comma-separated ports and FIRST-LAST ranges."""
    ports: set[int] = set()
    for item in text.replace("\n", "").split(","):
        lo, sep, hi = item.strip().partition("-")
        if lo.isdigit() and (not sep or hi.isdigit()):
            ports.update(range(int(lo), int(hi if sep else lo) + 1))
    return ports


def ephemeral_check(
    port_range: tuple[int, int], ephemeral: str | None, reserved: str | None
) -> Check:
    """The tenant range against the kernel's ephemeral range (source ports of connections)."""
    lo, hi = port_range
    bounds = (ephemeral or "").split()
    if len(bounds) != 2 or not all(b.isdigit() for b in bounds):
        return Check("ephemeral ports", Level.WARN, "not checked: ip_local_port_range unreadable")
    elo, ehi = int(bounds[0]), int(bounds[1])
    overlap = set(range(max(lo, elo), min(hi, ehi) + 1))
    if not overlap:
        return Check(
            "ephemeral ports", Level.PASS, f"{lo}-{hi} lies outside the ephemeral {elo}-{ehi}"
        )
    unreserved = overlap - _port_set(reserved or "")
    if not unreserved:
        return Check(
            "ephemeral ports",
            Level.PASS,
            f"{lo}-{hi} is reserved (ip_local_reserved_ports) within the ephemeral {elo}-{ehi}",
        )
    return Check(
        "ephemeral ports",
        Level.FAIL,
        f"{len(unreserved)} port(s) of {lo}-{hi} lie in the ephemeral range {elo}-{ehi} "
        "unreserved: an outgoing connection can take a port handed to a tenant",
        f"sysctl -w net.ipv4.ip_local_reserved_ports={lo}-{hi} and keep it in /etc/sysctl.d "
        "(install.sh does), or move QUDATA_PORT_RANGE below the ephemeral range",
    )


@dataclass(frozen=True)
class CpAnswer:
    """The control plane's answer to an authenticated call: status, Date header, local time."""

    status: int
    date: str | None
    at: float  # time.time() when it came


def clock_skew_s(answer: CpAnswer) -> float | None:
    """Local clock minus the control plane's (whole seconds: what Date carries)."""
    if not answer.date:
        return None
    try:
        return answer.at - parsedate_to_datetime(answer.date).timestamp()
    except (TypeError, ValueError):
        return None


def tls_check(
    mode: TlsMode,
    identity: TlsIdentity | None,
    error: str | None,
    plain: int | None,
    now: dt.datetime,
) -> Check:
    """The agent's port: TLS on?, the pin, the certificate's expiry, does plain HTTP answer.

    `plain`: the HTTP status a plain `GET /ping` on the agent's port got (None: no
    answer, the agent is not running).
    """
    name = "api tls"
    if mode is TlsMode.OFF:
        return Check(
            name,
            Level.WARN,
            "TLS off (QUDATA_TLS=off): the secret crosses the network in clear",
            "unset QUDATA_TLS (on: TLS beside plain HTTP), then move the control plane to "
            "https:// with the pin, then QUDATA_TLS=required (install.sh --tls required)",
        )
    if error is not None:
        return Check(
            name,
            Level.FAIL,
            error,
            "fix QUDATA_TLS_CERT_FILE/QUDATA_TLS_KEY_FILE, or unset them (the agent makes its own)",
        )
    if identity is None:
        return Check(name, Level.PASS, f"{mode}; the key and certificate are made at first start")
    detail = f"{mode}, pin sha256//{identity.pin}, certificate until {identity.not_after:%Y-%m-%d}"
    detail += " (agent-made)" if identity.agent_made else " (the provider's)"
    if plain is None:
        detail += "; port not probed: the agent does not answer"
    elif plain == 400:
        detail += "; plain HTTP refused"
    else:
        detail += "; plain HTTP answers too"
    left = identity.not_after - now
    if not identity.agent_made and left <= RENEW_BEFORE:
        expired = left.total_seconds() <= 0
        return Check(
            name,
            Level.FAIL if expired else Level.WARN,
            detail + ("; EXPIRED" if expired else f"; expires in {left.days} days"),
            "put a renewed certificate in QUDATA_TLS_CERT_FILE (same key keeps the pin) and "
            "restart the agent",
        )
    if mode is TlsMode.ON and plain is not None and plain != 400:
        return Check(
            name,
            Level.PASS,
            detail,
            "once the control plane calls https:// with the pin: QUDATA_TLS=required",
        )
    return Check(name, Level.PASS, detail)


_VERDICT_LEVEL = {Verdict.FIXED: Level.PASS, Verdict.NOT_FIXED: Level.FAIL,
                  Verdict.CANNOT_TELL: Level.WARN}  # fmt: skip


def version_checks(stack: Sequence[Installed]) -> list[Check]:
    """One check per component of the container stack: the escapes its version still
    carries (`domain.versions`: how distributions' backports are judged)."""
    checks = []
    for installed in stack:
        found = judge(installed)
        level = _VERDICT_LEVEL[found.verdict]
        checks.append(Check(f"{found.component} version", level, found.detail, found.fix))
    return checks


def ready(checks: Iterable[Check]) -> bool:
    return all(check.level is not Level.FAIL for check in checks)


def exit_code(checks: Iterable[Check]) -> int:
    return 0 if ready(checks) else 1


def render(checks: Sequence[Check]) -> str:
    """The table: one row per check, its fix under it; a verdict at the end."""
    width = max((len(check.name) for check in checks), default=5) + 2
    lines = [f"{'CHECK':<{width}}{'RESULT':<8}DETAIL"]
    for check in checks:
        lines.append(f"{check.name:<{width}}{check.level.value.upper():<8}{check.detail}")
        if check.fix and check.level is not Level.PASS:
            lines.append(f"{'':<{width + 8}}fix: {check.fix}")
    fails = sum(check.level is Level.FAIL for check in checks)
    warns = sum(check.level is Level.WARN for check in checks)
    verdict = "ready" if not fails else "NOT ready"
    lines.append(f"\nhost {verdict}: {fails} failure(s), {warns} warning(s)")
    return "\n".join(lines)


def to_json(checks: Sequence[Check]) -> str:
    return json.dumps(
        {"ready": ready(checks), "checks": [asdict(check) for check in checks]}, indent=2
    )


# -- gathering the observations --------------------------------------------------


class Probes(Protocol):
    """What the checks observe; `HostProbes` looks at this host, tests pass fakes."""

    def docker_info(self) -> dict[str, Any]: ...  # raises ProbeError

    def gpu_report(self) -> GpuReport: ...

    def nvidia_pci_devices(self) -> int: ...

    def port_is_free(self, port: int) -> bool: ...

    def agent_ports(self, state_dir: Path) -> frozenset[int]: ...  # held by its instances

    def mount_options(self, path: str) -> frozenset[str] | None: ...  # None: unknown

    def mode_of(self, path: Path) -> int | None: ...  # None: no such file; raises OSError

    def read_text(self, path: Path) -> str | None: ...

    def timedatectl(self) -> str | None: ...

    def control_plane(self, url: str, api_key: str, timeout_s: float) -> CpAnswer: ...  # ProbeError

    def gpu_conditions(self) -> tuple[GpuCondition, ...]: ...

    def container_cli_info(self) -> tuple[int, str] | None: ...  # None: not installed

    def cdi_specs(self) -> tuple[str, ...]: ...

    def disk_free(self, path: str) -> int | None: ...

    def volumes(self, state_dir: Path) -> VolumeSummary: ...
    def served_tls(self, settings: Settings) -> TlsIdentity | None: ...  # raises ProbeError

    def plain_http(self, state_dir: Path, port: int | None) -> int | None: ...  # None: no answer

    def toolkit_version(self) -> Version | None: ...  # None: not installed or unreadable

    def toolkit_config(self) -> tuple[bool, bool, str | None]: ...  # found, hook off, compat mode

    def sandbox_gpus(self, runsc: str) -> SandboxGpus: ...

    def container_stack(self) -> list[Installed]: ...  # runc, containerd, Docker, the kernel

    def wall_problems(self) -> list[str]: ...  # what differs from the planned wall; ProbeError


def _permission_check(name: str, error: OSError) -> Check:
    return Check(
        name,
        Level.WARN,
        f"cannot inspect: {error.strerror or error}",
        "run doctor as root (sudo qudata-agent doctor)",
    )


def _file_checks(settings: Settings, probes: Probes, config_file: Path | None) -> list[Check]:
    state = settings.state_dir
    try:
        dir_check = state_dir_check(state, probes.mode_of(state))
    except OSError as e:
        return [_permission_check("state dir", e)]
    candidates = [state / name for name in SECRET_FILES]
    if config_file is not None and "QUDATA_API_KEY" in (probes.read_text(config_file) or ""):
        candidates.append(config_file)  # the config file holds the key: it is a secret too
    modes: dict[Path, int] = {}
    try:
        for path in candidates:
            mode = probes.mode_of(path)
            if mode is not None:
                modes[path] = mode
    except OSError as e:
        return [dir_check, _permission_check("secret files", e)]
    return [dir_check, secret_files_check(modes)]


def _ports(settings: Settings, probes: Probes) -> Check:
    lo, hi = settings.port_range
    own = probes.agent_ports(settings.state_dir)
    busy = [p for p in range(lo, hi + 1) if p not in own and not probes.port_is_free(p)]
    return ports_check(lo, hi, busy)


def _control_plane(settings: Settings, probes: Probes) -> Check:
    kept = None
    with contextlib.suppress(OSError):
        kept = probes.read_text(settings.state_dir / "api_key")
    key = settings.api_key or (kept or "").strip()
    answer: CpAnswer | str | None = None
    if key:
        try:
            answer = probes.control_plane(settings.api_url, key, _CP_TIMEOUT_S)
        except ProbeError as e:
            answer = str(e)
    return control_plane_check(settings.api_url, bool(key), answer)


def _text_or_none(probes: Probes, path: Path) -> str | None:
    try:
        return probes.read_text(path)
    except OSError:
        return None


def _data_root_options(info: Mapping[str, Any] | None, probes: Probes) -> frozenset[str] | None:
    root = (info or {}).get("DockerRootDir")
    return probes.mount_options(str(root)) if root else None


def _wall(settings: Settings, probes: Probes) -> Check:
    if not settings.firewall:
        return wall_check(False, None)
    try:
        return wall_check(True, probes.wall_problems())
    except ProbeError as e:
        return wall_check(True, None, str(e))


def _ssh_tools(probes: Probes) -> Check:
    try:
        missing = [
            package
            for package, paths in SSH_TOOLS
            if all(probes.mode_of(Path(p)) is None for p in paths)
        ]
    except OSError as e:
        return _permission_check("instance ssh", e)
    return ssh_check(missing)


def _net_tools(probes: Probes) -> Check:
    try:
        missing = [
            package
            for package, paths in NET_TOOLS
            if all(probes.mode_of(Path(p)) is None for p in paths)
        ]
    except OSError as e:
        return _permission_check("network meter", e)
    return net_tools_check(missing)


def _isolation_checks(
    settings: Settings,
    probes: Probes,
    info: Mapping[str, Any] | None,
    report: GpuReport,
    gpus_present: bool,
) -> list[Check]:
    """The tiers, GPUs in the sandbox, the toolkit's escapes and its forward-compat hook."""
    name = settings.sandbox_runtime
    runtime = parse_runtimes((info or {}).get("Runtimes")).get(name)
    gpus = probes.sandbox_gpus(runtime.path) if runtime is not None and report.gpus else None
    sandbox = sandbox_gpu_check(info, name, report, gpus)
    checks = [isolation_check(info, name), *([sandbox] if sandbox is not None else [])]
    version = probes.toolkit_version() if gpus_present else None
    checks.append(toolkit_version_check(gpus_present, version, settings.nvidia_toolkit_min))
    found, hook_off, mode = probes.toolkit_config() if gpus_present else (False, False, None)
    checks.append(forward_compat_check(gpus_present, found, hook_off, mode))
    return checks


def run_checks(settings: Settings, probes: Probes, config_file: Path | None = None) -> list[Check]:
    docker_host = settings.docker_host or "unix:///var/run/docker.sock"
    info: dict[str, Any] | None = None
    error = None
    try:
        info = probes.docker_info()
    except ProbeError as e:
        error = str(e)
    report = probes.gpu_report()
    pci = probes.nvidia_pci_devices()
    gpus_present = bool(report.gpus) or pci > 0
    root = (info or {}).get("DockerRootDir")
    health = gpu_health_check(probes.gpu_conditions() if report.gpus else ())
    return [
        docker_check(info, error, docker_host),
        live_restore_check(info),
        pulls_check(info, _text_or_none(probes, DAEMON_JSON)),
        storage_check(info, _data_root_options(info, probes)),
        disk_check(str(root) if root else None, probes.disk_free(str(root)) if root else None),
        volumes_check(probes.volumes(settings.state_dir)),
        gpu_check(report, pci),
        *([health] if health is not None else []),
        runtime_check(info, gpus_present),
        toolkit_check(gpus_present, probes.container_cli_info() if gpus_present else None),
        cdi_check(gpus_present, probes.cdi_specs() if gpus_present else ()),
        *_isolation_checks(settings, probes, info, report, gpus_present),
        _ports(settings, probes),
        ephemeral_check(
            settings.port_range,
            _text_or_none(probes, EPHEMERAL),
            _text_or_none(probes, RESERVED),
        ),
        *_file_checks(settings, probes, config_file),
        clock_check(probes.timedatectl()),
        _ssh_tools(probes),
        _net_tools(probes),
        _control_plane(settings, probes),
        _tls(settings, probes),
        _wall(settings, probes),
        *version_checks(probes.container_stack()),
    ]


def _tls(settings: Settings, probes: Probes) -> Check:
    identity, error = None, None
    if settings.tls is not TlsMode.OFF:
        try:
            identity = probes.served_tls(settings)
        except ProbeError as e:
            error = str(e)
    plain = probes.plain_http(settings.state_dir, settings.agent_port)
    return tls_check(settings.tls, identity, error, plain, dt.datetime.now(dt.UTC))


# -- the real host ----------------------------------------------------------------


def count_nvidia_devices(devices: Iterable[tuple[str, str]]) -> int:
    """NVIDIA display/3D controllers among (vendor, class) pairs as sysfs gives them."""
    return sum(
        1
        for vendor, klass in devices
        if vendor.strip().lower() == NVIDIA_PCI_VENDOR and klass.strip().startswith("0x03")
    )


class HostProbes:
    """Looks at this host: Docker, NVML, sysfs, sockets, files, timedatectl, the network."""

    def __init__(self, settings: Settings, pci_root: Path = Path("/sys/bus/pci/devices")) -> None:
        self._settings = settings
        self._pci_root = pci_root

    def docker_info(self) -> dict[str, Any]:
        engine = DockerEngine(self._settings.docker_host, timeout_s=10)
        try:
            return engine.info()
        except AgentError as e:
            raise ProbeError(e.message) from e
        finally:
            engine.close()

    def gpu_report(self) -> GpuReport:
        nvml = Nvml()
        try:
            return nvml.report()
        finally:
            nvml.close()

    def nvidia_pci_devices(self) -> int:
        pairs = []
        with contextlib.suppress(OSError):
            for device in self._pci_root.iterdir():
                with contextlib.suppress(OSError):
                    pairs.append(((device / "vendor").read_text(), (device / "class").read_text()))
        return count_nvidia_devices(pairs)

    def port_is_free(self, port: int) -> bool:
        return port_is_free(port)

    def agent_ports(self, state_dir: Path) -> frozenset[int]:
        db = state_dir / DB_FILE
        try:
            if not db.is_file():
                return frozenset()
            store = Store.open_readonly(db)  # never migrated or written by doctor
        except (OSError, AgentError):
            return frozenset()
        try:
            return store.allocated_ports()
        finally:
            store.close()

    def mount_options(self, path: str) -> frozenset[str] | None:
        return mount_options(path)

    def mode_of(self, path: Path) -> int | None:
        try:
            return stat.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            return None

    def read_text(self, path: Path) -> str | None:
        try:
            return path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None

    def timedatectl(self) -> str | None:
        return run_tool(["timedatectl", "show", "-p", "NTPSynchronized"])

    def control_plane(self, url: str, api_key: str, timeout_s: float) -> CpAnswer:
        """One authenticated call through the agent's own client (its TLS roots, proxies)."""

        async def ask() -> tuple[int, str | None]:
            client = ControlPlane(
                url, api_key, timeout_s=timeout_s, user_agent=f"qudata-agent/{__version__} doctor"
            )
            try:
                return await client.check()
            finally:
                await client.aclose()

        try:
            status, date = asyncio.run(ask())
        except ControlPlaneError as e:
            raise ProbeError(str(e)) from e
        return CpAnswer(status, date, time.time())

    def gpu_conditions(self) -> tuple[GpuCondition, ...]:
        nvml = Nvml()
        try:
            return nvml.conditions()
        finally:
            nvml.close()

    def container_cli_info(self) -> tuple[int, str] | None:
        exe = shutil.which("nvidia-container-cli")
        if exe is None:
            return None
        try:
            done = subprocess.run(  # absolute path, argument list, no shell
                [exe, "info"], capture_output=True, text=True, timeout=20, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            return 1, str(e)
        return done.returncode, (done.stdout or "") + (done.stderr or "")

    def container_stack(self) -> list[Installed]:
        return container_stack()

    def wall_problems(self) -> list[str]:
        from qudata_agent.wall import wall_plan  # the agent's own plan, from these settings

        try:
            return Firewall().problems(wall_plan(self._settings))
        except AgentError as e:
            raise ProbeError(e.message) from e

    def cdi_specs(self) -> tuple[str, ...]:
        found: list[str] = []
        for folder in CDI_DIRS:
            with contextlib.suppress(OSError):
                found.extend(
                    str(spec)
                    for spec in sorted(folder.iterdir())
                    if spec.suffix in (".yaml", ".yml", ".json") and "nvidia" in spec.name
                )
        return tuple(found)

    def disk_free(self, path: str) -> int | None:
        return disk_free_bytes(path)

    def toolkit_version(self) -> Version | None:
        return toolkit_version()

    def toolkit_config(self) -> tuple[bool, bool, str | None]:
        found = toolkit_config()
        return found.found, found.compat_hook_disabled, found.cuda_compat_mode

    def sandbox_gpus(self, runsc: str) -> SandboxGpus:
        return sandbox_gpus(runsc)

    def volumes(self, state_dir: Path) -> VolumeSummary:
        root = state_dir / "volumes"
        found = fs_facts(root)
        facts = None if found is None else found[0]
        package, paths = VOLUME_TOOLS[choose_mechanism(facts)[0]]
        missing = None if any(Path(p).exists() for p in paths) else package
        summary = VolumeSummary(facts, missing_tool=missing)
        db = state_dir / DB_FILE
        try:
            if not db.is_file():
                return summary
            store = Store.open_readonly(db)  # never migrated or written by doctor
        except (OSError, AgentError):
            return summary
        try:
            volumes = store.list_volumes()
        finally:
            store.close()
        loop, xfs = LoopVolumes(root), XfsProjectVolumes(root, found[1] if found else "/")
        return VolumeSummary(
            facts,
            missing_tool=missing,
            count=len(volumes),
            size_bytes=sum(v.size_bytes for v in volumes),
            disk_bytes=sum(
                (loop if v.mechanism is Mechanism.LOOP else xfs).disk_bytes(v) for v in volumes
            ),
        )

    def served_tls(self, settings: Settings) -> TlsIdentity | None:
        try:
            return served_identity(
                settings.state_dir, settings.tls_cert_file, settings.tls_key_file
            )
        except TlsError as e:
            raise ProbeError(str(e)) from e

    def plain_http(self, state_dir: Path, port: int | None) -> int | None:
        """The status of a plain `GET /ping` on the agent's port (the store's, else `port`)."""
        recorded = None
        with contextlib.suppress(OSError, AgentError, ValueError):
            if (state_dir / DB_FILE).is_file():
                store = Store.open_readonly(state_dir / DB_FILE)
                try:
                    recorded = store.get(AGENT_PORT_KEY)
                finally:
                    store.close()
        port = int(recorded) if recorded else port
        if port is None:
            return None
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=_CP_TIMEOUT_S)
        try:
            conn.request("GET", "/ping")
            return conn.getresponse().status
        except (OSError, http.client.HTTPException):
            return None
        finally:
            conn.close()
