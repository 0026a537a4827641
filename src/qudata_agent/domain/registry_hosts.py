"""Registry hosts an order may make the host's Docker daemon call: the pure decision.

dockerd runs on the host, outside the wall that keeps instances off the
host's own services and private networks, and it connects to whatever
registry host an image reference names. So an order's registry host is
judged by the addresses it stands for before the daemon is asked anything.

Owns `parse_allow_list` (the provider's `QUDATA_REGISTRY_ALLOW`: `host:port`
entries, for a local mirror), `allowed` and `forbidden_reason` (why an
address is off limits, or None).

What stays true:
- loopback, link-local, private (RFC 1918, shared 100.64/10, unique-local
  IPv6, the documentation and benchmark ranges), unspecified, multicast and
  reserved addresses, and every address of the host itself, are refused;
  an IPv4-mapped IPv6 address is judged as the IPv4 address it carries;
- an allow entry matches the reference's host and port exactly as written
  (case aside): `127.0.0.1:5000` allows that registry, not `localhost:5000`
  and not `127.0.0.1:5001`;
- Docker Hub (a reference with no registry host) is never refused here.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection, Iterable

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

_ENTRY_RE = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]):[0-9]{1,5}")
_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT: not is_private in Python


def parse_allow_list(raw: str) -> frozenset[str]:
    """Comma-separated `host:port` entries; ValueError naming a bad one."""
    entries = set()
    for item in raw.split(","):
        entry = item.strip().lower()
        if not entry:
            continue
        if not _ENTRY_RE.fullmatch(entry) or not 1 <= int(entry.rpartition(":")[2]) <= 65535:
            raise ValueError(f"{item.strip()!r} is not host:port")
        entries.add(entry)
    return frozenset(entries)


def allowed(registry: str, allow: Collection[str]) -> bool:
    """Whether the provider listed this registry (`host[:port]` as the reference names it)."""
    return registry.lower() in allow


def host_of(registry: str) -> str:
    """The host part of `host[:port]` (brackets of an IPv6 literal removed)."""
    if registry.startswith("["):
        return registry[1:].partition("]")[0]
    return registry.rpartition(":")[0] if ":" in registry else registry


def _addresses(texts: Iterable[str]) -> set[Address]:
    found: set[Address] = set()
    for text in texts:
        try:
            ip: Address = ipaddress.ip_address(text.partition("%")[0])
        except ValueError:
            continue
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        found.add(ip)
    return found


def forbidden_reason(address: str, own: Iterable[str] = ()) -> str | None:
    """Why the daemon must not be sent to `address`, or None when it may."""
    try:
        ip: Address = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return "not an address"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip in _addresses(own):
        return "an address of this host"
    checks = (
        (ip.is_loopback, "loopback"),
        (ip.is_link_local, "link-local"),
        (ip.is_unspecified, "unspecified"),
        (ip.is_multicast, "multicast"),
        (ip.is_reserved, "reserved"),
        (ip.is_private or (ip.version == 4 and ip in _SHARED), "private"),
    )
    return next((word for hit, word in checks if hit), None)
