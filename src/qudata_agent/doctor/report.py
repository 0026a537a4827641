"""Doctor's run: the probes asked in order, the checks judged, the table and the JSON.

What stays true: the host is ready (exit code 0) exactly when no check fails;
a probe that cannot look (no permission) gives a warning that says so, never
a failure.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from qudata_agent.config import Settings
from qudata_agent.doctor.checks_api import control_plane_check, tls_check
from qudata_agent.doctor.checks_docker import (
    disk_check,
    docker_check,
    live_restore_check,
    pulls_check,
    storage_check,
    volumes_check,
)
from qudata_agent.doctor.checks_gpu import (
    cdi_check,
    forward_compat_check,
    gpu_check,
    gpu_health_check,
    isolation_check,
    runtime_check,
    sandbox_gpu_check,
    toolkit_check,
    toolkit_version_check,
)
from qudata_agent.doctor.checks_host import (
    NET_TOOLS,
    SSH_TOOLS,
    clock_check,
    ephemeral_check,
    net_tools_check,
    ports_check,
    secret_files_check,
    ssh_check,
    state_dir_check,
    version_checks,
    wall_check,
)
from qudata_agent.doctor.model import Check, CpAnswer, Level, ProbeError
from qudata_agent.doctor.probes import _CP_TIMEOUT_S, DAEMON_JSON, EPHEMERAL, RESERVED, Probes
from qudata_agent.domain.inventory import GpuReport
from qudata_agent.domain.isolation import parse_runtimes
from qudata_agent.domain.tls import TlsMode
from qudata_agent.state_dir import StateDir


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
    candidates = list(StateDir(state).secret_files)
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
        kept = probes.read_text(StateDir(settings.state_dir).api_key)
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
            settings.port_range, _text_or_none(probes, EPHEMERAL), _text_or_none(probes, RESERVED)
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
