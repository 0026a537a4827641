"""Doctor's judgments of Docker: the engine, live restore, pulls, disk quota, disk, volumes.

Pure functions from what was observed (`docker info`, daemon.json's text, the
data root's free space and mount options, the volume root's filesystem) to a
`Check`; tested without a host.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from qudata_agent.doctor.model import (
    DISK_FAIL_BYTES,
    DISK_WARN_BYTES,
    DOCKER_DEFAULT_DOWNLOADS,
    GIB,
    Check,
    Level,
    VolumeSummary,
)
from qudata_agent.domain.storage import quota_support
from qudata_agent.domain.volumes import choose_mechanism


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
