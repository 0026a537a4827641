"""`qudata-agent doctor`: is this host ready to rent out, and if not, what to do.

Owns the readiness checks, their verdicts and the table they print. Each check
is a pure function from what was observed (Docker's `info`, NVML's report, how
many ports bind, file modes, `timedatectl`'s answer, the control plane's HTTP
status) to a `Check`; `run_checks` asks a `Probes` object for those
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

import contextlib
import json
import os
import ssl
import stat
import urllib.error
import urllib.request
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

import certifi  # httpx's trust roots: the agent's own client trusts exactly these

from qudata_agent import __version__
from qudata_agent.adapters.docker_engine import DockerEngine
from qudata_agent.adapters.host import mount_options, run_tool
from qudata_agent.adapters.netcheck import port_is_free
from qudata_agent.adapters.nvml import Nvml
from qudata_agent.adapters.store import Store
from qudata_agent.config import Settings
from qudata_agent.domain.inventory import GpuReport
from qudata_agent.domain.storage import quota_support
from qudata_agent.errors import AgentError

DB_FILE = "agent.db"
SECRET_FILES = ("agent_secret", "api_key")  # in the state dir; see services/credentials.py
NVIDIA_PCI_VENDOR = "0x10de"
PORTS_FREE_ENOUGH = 0.9  # below this share of the range free: a warning
_CP_TIMEOUT_S = 5.0


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


def control_plane_check(url: str, has_key: bool, answer: int | str | None) -> Check:
    """`answer`: the HTTP status of `GET url`, or why there was none."""
    if not has_key:
        return Check(
            "control plane",
            Level.WARN,
            "no API key: standalone mode, the host is not offered for rent",
            "set QUDATA_API_KEY in the config file (install.sh API_KEY does)",
        )
    if isinstance(answer, int):
        return Check("control plane", Level.PASS, f"{url} answers (HTTP {answer})")
    return Check(
        "control plane",
        Level.FAIL,
        f"{url} unreachable: {answer or 'no answer'}",
        "allow outbound HTTPS to it (DNS, firewall, proxy), or fix QUDATA_API_URL",
    )


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

    def http_status(self, url: str, timeout_s: float) -> int: ...  # raises ProbeError


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
    has_key = bool(settings.api_key or (kept or "").strip())
    answer: int | str | None = None
    if has_key:
        try:
            answer = probes.http_status(settings.api_url, _CP_TIMEOUT_S)
        except ProbeError as e:
            answer = str(e)
    return control_plane_check(settings.api_url, has_key, answer)


def _data_root_options(info: Mapping[str, Any] | None, probes: Probes) -> frozenset[str] | None:
    root = (info or {}).get("DockerRootDir")
    return probes.mount_options(str(root)) if root else None


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
    return [
        docker_check(info, error, docker_host),
        storage_check(info, _data_root_options(info, probes)),
        gpu_check(report, pci),
        runtime_check(info, bool(report.gpus) or pci > 0),
        _ports(settings, probes),
        *_file_checks(settings, probes, config_file),
        clock_check(probes.timedatectl()),
        _ssh_tools(probes),
        _control_plane(settings, probes),
    ]


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
            store = Store.open(db)
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

    def http_status(self, url: str, timeout_s: float) -> int:
        """Any HTTP answer counts (a redirect too: it is not followed)."""
        opener = urllib.request.build_opener(
            _NoRedirect(),
            urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=certifi.where())),
        )
        request = urllib.request.Request(  # noqa: S310 (config allows http(s) URLs only)
            url, headers={"User-Agent": f"qudata-agent/{__version__} doctor"}
        )
        try:
            with opener.open(request, timeout=timeout_s) as answer:
                return int(answer.status)
        except urllib.error.HTTPError as e:
            return int(e.code)
        except urllib.error.URLError as e:
            raise ProbeError(str(e.reason)) from e
        except OSError as e:  # a timeout while reading, a reset
            raise ProbeError(str(e) or type(e).__name__) from e


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # the 3xx itself is the answer
