"""`qudata-agent doctor` in tunnel mode: the tools, the way out to the relay, the
handshake, the routes; each failure with its fix.

The verdicts are pure (`checks` from a `TunnelSeen`); `look` is the only part
that touches the host, read-only: it resolves the relay, asks the kernel for a
route to it (a UDP socket's connect sends nothing), and reads `wg show`,
`ip rule`, `ip route` and the mangle table. Outside tunnel mode: no checks.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from qudata_agent.config import Settings
from qudata_agent.doctor import Check, Level
from qudata_agent.domain.tunnel import (
    IN_CHAIN,
    OUT_CHAIN,
    STALE_AFTER_S,
    Routing,
    TunnelConfigError,
    parse_endpoint,
)
from qudata_agent.state_dir import StateDir

RESTART = "systemctl restart qudata-agent (the agent puts the tunnel back at start)"


@dataclass(frozen=True)
class TunnelSeen:
    endpoint: str | None  # None: it comes from /init
    tools: tuple[str, ...]  # missing packages
    route_error: str | None = None  # resolving or routing to the endpoint failed
    interface: bool = False
    handshake_age_s: float | None = None
    missing_routing: tuple[str, ...] = field(default_factory=tuple)  # rule, route, chains
    public_key: str | None = None


def checks(seen: TunnelSeen) -> list[Check]:
    found = [_tools(seen), _way_out(seen)]
    if not seen.interface:
        found.append(
            Check(
                "tunnel",
                Level.FAIL,
                "no tunnel interface: the agent is not running or could not bring it up",
                f"{RESTART}; then journalctl -u qudata-agent names the reason",
            )
        )
        return found
    found.append(_handshake(seen))
    if seen.missing_routing:
        found.append(
            Check(
                "tunnel routes",
                Level.FAIL,
                "missing: " + ", ".join(seen.missing_routing),
                RESTART + " (or wait: it checks every 5 s)",
            )
        )
    else:
        found.append(Check("tunnel routes", Level.PASS, "fwmark rule, table and mangle chains"))
    return found


def _tools(seen: TunnelSeen) -> Check:
    if not seen.tools:
        return Check("tunnel tools", Level.PASS, "wg and a WireGuard (kernel or wireguard-go)")
    missing = " ".join(seen.tools)
    return Check("tunnel tools", Level.FAIL, f"missing: {missing}", f"apt-get install {missing}")


def _way_out(seen: TunnelSeen) -> Check:
    if seen.endpoint is None:
        return Check("tunnel relay", Level.PASS, "the relay comes from the control plane (/init)")
    if seen.route_error:
        return Check(
            "tunnel relay",
            Level.FAIL,
            f"{seen.endpoint}: {seen.route_error}",
            "check DNS and the default route, and QUDATA_TUNNEL_ENDPOINT",
        )
    return Check("tunnel relay", Level.PASS, f"{seen.endpoint} resolves and has a route")


def _handshake(seen: TunnelSeen) -> Check:
    age = seen.handshake_age_s
    if age is not None and age <= STALE_AFTER_S:
        return Check("tunnel handshake", Level.PASS, f"last handshake {age:.0f} s ago")
    what = "no handshake with the relay" if age is None else f"last handshake {age:.0f} s ago"
    return Check(
        "tunnel handshake",
        Level.FAIL,
        what,
        f"allow outbound UDP to {seen.endpoint or 'the relay'}, and make sure the relay's"
        f" hosts list has this host's key {seen.public_key or '(see /v1/host)'}",
    )


# -- the host (read-only) ----------------------------------------------------------


def _out(*args: str) -> tuple[int, str]:
    try:
        done = subprocess.run(list(args), capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return 1, str(e)
    return done.returncode, done.stdout


def _route_error(endpoint: str) -> str | None:
    try:
        host, port = parse_endpoint("QUDATA_TUNNEL_ENDPOINT", endpoint)
    except TunnelConfigError as e:
        return str(e)
    try:
        address = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_DGRAM)[0][4]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(address)  # a route lookup: nothing is sent
    except OSError as e:
        return str(e.strerror or e)
    return None


def _kernel_wireguard() -> bool:
    return Path("/sys/module/wireguard").exists()


def look(settings: Settings) -> TunnelSeen:
    routing = Routing(settings.tunnel_interface, settings.tunnel_table, settings.tunnel_mark)
    tools = [] if shutil.which("wg") else ["wireguard-tools"]
    if not _kernel_wireguard() and not shutil.which("wireguard-go"):
        tools.append("wireguard-go")
    endpoint = settings.tunnel_endpoint
    interface = _out("ip", "link", "show", "dev", routing.interface)[0] == 0
    age = None
    if interface and "wireguard-tools" not in tools:
        for line in _out("wg", "show", routing.interface, "latest-handshakes")[1].splitlines():
            fields = line.split()
            if len(fields) == 2 and fields[1].isdigit() and int(fields[1]) > 0:
                age = max(0.0, time.time() - int(fields[1]))
    missing = []
    if f"lookup {routing.table}" not in _out("ip", "rule", "show", "fwmark", routing.mark_arg)[1]:
        missing.append(f"ip rule fwmark {routing.mark_arg}")
    if (
        f"dev {routing.interface}"
        not in _out("ip", "route", "show", "table", str(routing.table))[1]
    ):
        missing.append(f"default route of table {routing.table}")
    for chain in (IN_CHAIN, OUT_CHAIN):
        if _out("iptables", "-w", "5", "-t", "mangle", "-S", chain)[0] != 0:
            missing.append(f"mangle chain {chain}")
    public_key = None
    with contextlib.suppress(OSError):
        key = StateDir(settings.state_dir).tunnel_key.read_text().strip()
        code, out = _pubkey(key)
        public_key = out.strip() if code == 0 else None
    return TunnelSeen(
        endpoint=endpoint,
        tools=tuple(tools),
        route_error=_route_error(endpoint) if endpoint else None,
        interface=interface,
        handshake_age_s=age,
        missing_routing=tuple(missing),
        public_key=public_key,
    )


def _pubkey(private: str) -> tuple[int, str]:
    try:
        done = subprocess.run(
            ["wg", "pubkey"], input=private + "\n", capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return 1, str(e)
    return done.returncode, done.stdout


def tunnel_checks(settings: Settings) -> list[Check]:
    return checks(look(settings)) if settings.tunnel else []
