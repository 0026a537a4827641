"""What the host's container stack is: versions, packages, changelogs, for `domain.versions`.

Reads `runc`, `containerd` and `dockerd` `--version`, the package each came
from (`dpkg-query -S`, then its version), that package's Debian changelog
when the distribution built it, and the kernel's `uname` and Ubuntu's
/proc/version_signature. What stays true: it only reads; every tool is
bounded in time (`adapters.host.run_tool`) and a changelog in bytes;
anything unreadable comes back as None (the verdict says "cannot tell"),
never as an error.
"""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

from qudata_agent.adapters.host import run_tool
from qudata_agent.domain.versions import (
    CONTAINERD,
    DOCKER,
    KERNEL,
    RUNC,
    Installed,
    kernel_version,
    program_version,
)

_SBIN = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_CHANGELOG_BYTES = 2 * 1024 * 1024
# Packages their vendor builds from the upstream release: judged by the upstream version.
VENDOR_PACKAGES = frozenset(
    {"docker-ce", "containerd.io", "nvidia-container-toolkit", "libnvidia-container-tools",
     "nvidia-container-toolkit-base", "moby-engine", "moby-runc", "moby-containerd"}
)  # fmt: skip
_PROGRAMS = {
    RUNC: ("runc", "--version"),
    CONTAINERD: ("containerd", "--version"),
    DOCKER: ("dockerd", "--version"),
}


def _os_id(os_release: Path = Path("/etc/os-release")) -> str | None:
    try:
        text = os_release.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("ID="):
            return line[3:].strip().strip('"') or None
    return None


def _package_of(path: str) -> tuple[str, str] | None:
    """(package, version) that installed `path`, from dpkg; None off Debian/Ubuntu."""
    for candidate in dict.fromkeys((path, os.path.realpath(path))):
        owner = run_tool(["dpkg-query", "-S", candidate])
        if owner:
            package = owner.split(":", 1)[0].strip()
            version = run_tool(["dpkg-query", "-W", "-f=${Version}", package])
            if version:
                return package, version.strip()
    return None


def _changelog(package: str) -> str | None:
    path = Path("/usr/share/doc") / package / "changelog.Debian.gz"
    try:
        with gzip.open(path, "rb") as f:
            return f.read(_CHANGELOG_BYTES).decode("utf-8", errors="replace")
    except (OSError, EOFError):
        return None


def installed(component: str) -> Installed | None:
    """The component as installed here; None when its program is not on this host."""
    program, flag = _PROGRAMS[component]
    path = shutil.which(program, path=_SBIN)
    if path is None:
        return None
    output = run_tool([path, flag])
    version = program_version(output) if output else None
    owner = _package_of(path)
    if owner is None:
        return Installed(component, version)
    package, package_version = owner
    distro = None if package in VENDOR_PACKAGES else _os_id()
    changelog = _changelog(package) if distro else None
    return Installed(component, version, package, package_version, distro, changelog)


def kernel() -> Installed:
    uname = os.uname()
    try:
        signature: str | None = Path("/proc/version_signature").read_text().strip()
    except OSError:
        signature = None
    return kernel_version(uname.release, uname.version, signature)


def container_stack() -> list[Installed]:
    """runc, containerd, Docker and the kernel (the toolkit: domain/nvidia_toolkit.py)."""
    found = [installed(c) for c in (RUNC, CONTAINERD, DOCKER)]
    missing = [Installed(c, None) for c, i in zip((RUNC, CONTAINERD, DOCKER), found, strict=True)
               if i is None]  # fmt: skip
    return [i for i in found if i is not None] + missing + [kernel()]


__all__ = ["KERNEL", "container_stack", "installed", "kernel"]
