"""Doctor's judgments of the host itself: ports, files, clock, tools, the wall, versions.

Pure functions from what was observed (ports that bind, file modes, the
kernel's port ranges, `timedatectl`, the packages present, the wall's
differences from its plan, the container stack's versions) to a `Check`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from qudata_agent.doctor.model import PORTS_FREE_ENOUGH, Check, Level
from qudata_agent.domain.versions import Installed, Verdict, judge


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
