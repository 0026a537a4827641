"""Name resolution for registry hosts, and the host's own addresses.

Owns the two lookups the registry guard needs: what addresses a host name
stands for now (`resolve`, the system resolver through the event loop,
bounded in time) and every address this host's interfaces hold
(`own_addresses`, from psutil).

What stays true: `resolve` answers within `timeout_s` or raises
`ResolveFailed`; it never returns an empty tuple. A literal address is
returned as it is (the resolver reads numeric forms such as `127.1` too).
"""

from __future__ import annotations

import asyncio
import socket

import psutil


class ResolveFailed(Exception):
    """The name gave no address in time."""


async def resolve(host: str, timeout_s: float) -> tuple[str, ...]:
    """Every address `host` stands for (IPv4 and IPv6), within `timeout_s`."""
    loop = asyncio.get_running_loop()
    try:
        found = await asyncio.wait_for(
            loop.getaddrinfo(host, None, type=socket.SOCK_STREAM), timeout_s
        )
    except (TimeoutError, OSError, UnicodeError) as e:
        raise ResolveFailed(f"{host} could not be resolved within {timeout_s:g} s") from e
    addresses = tuple(dict.fromkeys(str(info[4][0]) for info in found))
    if not addresses:
        raise ResolveFailed(f"{host} has no address")
    return addresses


def own_addresses() -> frozenset[str]:
    """Every IPv4 and IPv6 address on this host's interfaces."""
    found = set()
    for addresses in psutil.net_if_addrs().values():
        for addr in addresses:
            if addr.family in (socket.AF_INET, socket.AF_INET6):
                found.add(addr.address.partition("%")[0])
    return frozenset(found)
