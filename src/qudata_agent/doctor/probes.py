"""What doctor observes, and the one class that observes it on this host.

`Probes` names each observation; `HostProbes` makes them (Docker, NVML,
sysfs, sockets, files, timedatectl, the control plane, the firewall); tests
pass fakes. What stays true: a probe only looks: it creates, migrates,
tightens and starts nothing, and opens the store read-only.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import shutil
import stat
import subprocess
import time
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
from qudata_agent.doctor.checks_gpu import count_nvidia_devices
from qudata_agent.doctor.model import CpAnswer, ProbeError, VolumeSummary
from qudata_agent.domain.inventory import GpuCondition, GpuReport
from qudata_agent.domain.isolation import SandboxGpus
from qudata_agent.domain.nvidia_toolkit import Version
from qudata_agent.domain.versions import Installed
from qudata_agent.domain.volumes import Mechanism, choose_mechanism
from qudata_agent.errors import AgentError
from qudata_agent.state_dir import Meta, StateDir

_CP_TIMEOUT_S = 5.0


EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")


RESERVED = Path("/proc/sys/net/ipv4/ip_local_reserved_ports")


DAEMON_JSON = Path("/etc/docker/daemon.json")


CDI_DIRS = (Path("/etc/cdi"), Path("/var/run/cdi"))


VOLUME_TOOLS: dict[Mechanism, tuple[str, tuple[str, ...]]] = {
    Mechanism.LOOP: ("e2fsprogs", ("/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4")),
    Mechanism.XFS_PROJECT: ("xfsprogs", ("/usr/sbin/xfs_quota", "/sbin/xfs_quota")),
}


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
        db = StateDir(state_dir).db
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
        layout = StateDir(state_dir)
        root = layout.volumes_dir
        found = fs_facts(root)
        facts = None if found is None else found[0]
        package, paths = VOLUME_TOOLS[choose_mechanism(facts)[0]]
        missing = None if any(Path(p).exists() for p in paths) else package
        summary = VolumeSummary(facts, missing_tool=missing)
        db = layout.db
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
            if (db := StateDir(state_dir).db).is_file():
                store = Store.open_readonly(db)
                try:
                    recorded = store.get(Meta.AGENT_PORT)
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
