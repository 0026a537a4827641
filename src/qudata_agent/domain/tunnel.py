"""Tunnel mode (hosts behind NAT): the pure decisions about the WireGuard tunnel.

A host with outbound UDP only keeps a WireGuard tunnel to a relay; the relay's
public address and a block of its ports (the host's `QUDATA_PORT_RANGE`) stand
for the host. This module decides, without any I/O:
- the tunnel's configuration, from the settings and the `/init` answer's
  `data.tunnel` (settings win, field by field), with every field checked;
- the policy-routing plan: connections that come in through the tunnel are
  marked (conntrack), and only packets of marked connections are routed by the
  tunnel's table, whose default route is the tunnel; nothing else changes
  route, so the host's own traffic and the instances' own connections keep the
  host's default route;
- the tunnel's health from the age of the last handshake.

What stays true: every value that reaches a command line was parsed here
(a key is 32 bytes of base64, an address an IPv4 interface, an endpoint a
host and a port), so no renter- or control-plane-given text is ever a flag.
"""

from __future__ import annotations

import base64
import binascii
import enum
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

KEEPALIVE_S = 25  # persistent keepalive: keeps a NAT mapping open
# WireGuard redoes a handshake at least every 2 minutes while packets flow (and the
# keepalive keeps them flowing): a handshake older than this means the relay is gone.
STALE_AFTER_S = 180.0
RULE_PRIORITY = 5200  # the `ip rule` that sends marked packets to the tunnel's table
IN_CHAIN = "QUDATA-TUNNEL-IN"  # mangle PREROUTING: mark, and restore the mark on replies
OUT_CHAIN = "QUDATA-TUNNEL-OUT"  # mangle OUTPUT: the agent's own replies
FIELDS = ("endpoint", "relay_key", "address", "public_address")
_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")


class TunnelConfigError(ValueError):
    """A tunnel field is missing or malformed; the message names it."""


class Health(enum.StrEnum):
    UP = "up"  # a recent handshake
    STALE = "stale"  # the last handshake is too old: the relay or the path is gone
    DOWN = "down"  # no handshake yet, or no interface


@dataclass(frozen=True)
class TunnelConfig:
    endpoint_host: str  # the relay, as the host reaches it (name or IPv4)
    endpoint_port: int
    relay_key: str  # the relay's WireGuard public key (base64)
    address: ipaddress.IPv4Interface  # this host's tunnel address and the tunnel network
    public_address: str  # the relay's public IPv4: what renters connect to

    @property
    def endpoint(self) -> str:
        return f"{self.endpoint_host}:{self.endpoint_port}"

    @property
    def network(self) -> str:
        return str(self.address.network)


@dataclass(frozen=True)
class Routing:
    """Names and numbers of the policy routing, one set per interface."""

    interface: str
    table: int
    mark: int  # one or more bits; matched and set under this mask only

    @property
    def mark_arg(self) -> str:
        return f"{self.mark:#x}/{self.mark:#x}"


def parse_key(name: str, raw: str) -> str:
    """A WireGuard key: 32 bytes in base64 (44 characters)."""
    text = raw.strip()
    try:
        decoded = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        decoded = b""
    if len(decoded) != 32 or len(text) != 44:
        raise TunnelConfigError(f"{name}: expected a WireGuard key (44 characters of base64)")
    return text


def parse_endpoint(name: str, raw: str) -> tuple[str, int]:
    host, sep, port = raw.strip().rpartition(":")
    if not sep or not _HOSTNAME.fullmatch(host) or not port.isdigit():
        raise TunnelConfigError(f"{name}: expected RELAY:PORT (e.g. relay.example.com:51820)")
    if not 1 <= int(port) <= 65535:
        raise TunnelConfigError(f"{name}: port {port} is not 1-65535")
    return host, int(port)


def parse_address(name: str, raw: str) -> ipaddress.IPv4Interface:
    try:
        address = ipaddress.IPv4Interface(raw.strip())
    except ValueError:
        raise TunnelConfigError(f"{name}: expected an IPv4 address with its prefix") from None
    if "/" not in raw or address.network.prefixlen > 30:
        raise TunnelConfigError(f"{name}: expected the tunnel network's prefix (e.g. /24)")
    if address.ip in (address.network.network_address, address.network.broadcast_address):
        raise TunnelConfigError(f"{name}: {address.ip} is not a host address of its network")
    return address


def parse_public_address(name: str, raw: str) -> str:
    try:
        address = ipaddress.IPv4Address(raw.strip())
    except ValueError:
        raise TunnelConfigError(f"{name}: expected an IPv4 address") from None
    return str(address)


def from_answer(tunnel: object) -> dict[str, str]:
    """The string fields of the `/init` answer's `data.tunnel` (unknown ones ignored)."""
    if not isinstance(tunnel, Mapping):
        return {}
    return {k: str(tunnel[k]) for k in (*FIELDS, "ports") if isinstance(tunnel.get(k), str | int)}


def build(settings: Mapping[str, str | None], answer: Mapping[str, str]) -> TunnelConfig:
    """The configuration from the settings' fields, else the answer's; names what is missing."""
    merged = {k: settings.get(k) or answer.get(k) for k in FIELDS}
    missing = [k for k, v in merged.items() if not v]
    if missing:
        names = ", ".join("QUDATA_TUNNEL_" + k.upper() for k in missing)
        raise TunnelConfigError(f"tunnel mode needs {names} (or the same in /init data.tunnel)")

    def value(field: str) -> str:
        return str(merged[field])

    host, port = parse_endpoint("QUDATA_TUNNEL_ENDPOINT", value("endpoint"))
    return TunnelConfig(
        endpoint_host=host,
        endpoint_port=port,
        relay_key=parse_key("QUDATA_TUNNEL_RELAY_KEY", value("relay_key")),
        address=parse_address("QUDATA_TUNNEL_ADDRESS", value("address")),
        public_address=parse_public_address(
            "QUDATA_TUNNEL_PUBLIC_ADDRESS", value("public_address")
        ),
    )


def block_problem(ports: str | None, port_range: tuple[int, int]) -> str | None:
    """Why the answer's port block does not fit QUDATA_PORT_RANGE, or None."""
    if not ports:
        return None
    lo, sep, hi = ports.partition("-")
    if not (sep and lo.strip().isdigit() and hi.strip().isdigit()):
        return f"the relay's port block {ports!r} is not FIRST-LAST"
    block = (int(lo), int(hi))
    if not (block[0] <= port_range[0] and port_range[1] <= block[1]):
        low, high = port_range
        return (
            f"QUDATA_PORT_RANGE {low}-{high} lies outside the relay's block {ports}:"
            f" set QUDATA_PORT_RANGE={ports}"
        )
    return None


def health(handshake_age_s: float | None) -> Health:
    if handshake_age_s is None:
        return Health.DOWN
    return Health.UP if handshake_age_s <= STALE_AFTER_S else Health.STALE


def probe_target(address: ipaddress.IPv4Interface) -> str:
    """An address in the tunnel network, not ours: a datagram to it crosses the tunnel.

    WireGuard starts a new handshake when data it sent got no answer within
    about 15 s; the relay answers any data with a keepalive. So one small
    datagram every few seconds makes a restarted relay (which forgot the
    session) known within seconds instead of at the next 2-minute rekey.
    """
    first = address.network.network_address + 1
    return str(first if first != address.ip else first + 1)


def mangle_rules(routing: Routing) -> dict[str, list[list[str]]]:
    """The mangle chains: mark connections from the tunnel, put the mark on their replies.

    A connection's first packet from the tunnel sets the connection's mark;
    packets of marked connections that arrive from elsewhere (replies from
    instances, forwarded) and that the host itself sends (the agent's replies)
    get the mark as packet mark, which `ip rule` routes by. Packets arriving
    from the tunnel never get a packet mark: they are routed as usual (to the
    agent, or by Docker's DNAT to an instance).
    """
    wg, mark = routing.interface, routing.mark_arg
    return {
        IN_CHAIN: [
            ["-i", wg, "-j", "CONNMARK", "--set-xmark", mark],
            ["-i", wg, "-j", "RETURN"],
            ["-m", "connmark", "--mark", mark, "-j", "MARK", "--set-xmark", mark],
        ],
        OUT_CHAIN: [["-m", "connmark", "--mark", mark, "-j", "MARK", "--set-xmark", mark]],
    }


MANGLE_JUMPS = (("PREROUTING", IN_CHAIN), ("OUTPUT", OUT_CHAIN))


def view(
    config: TunnelConfig | None,
    routing: Routing,
    handshake_age_s: float | None,
    last_handshake_at: float | None,
    problem: str | None,
) -> dict[str, Any]:
    """What `/v1/host` and `status` show of the tunnel."""
    return {
        "state": health(handshake_age_s).value if config else Health.DOWN.value,
        "interface": routing.interface,
        "endpoint": config.endpoint if config else None,
        "address": str(config.address) if config else None,
        "public_address": config.public_address if config else None,
        "last_handshake_at": last_handshake_at,
        "handshake_age_s": None if handshake_age_s is None else round(handshake_age_s, 1),
        "problem": problem,
    }
