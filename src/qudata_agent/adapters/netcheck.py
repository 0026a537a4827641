"""Is a host port free right now? (the bind test behind the port allocator)

What stays true: the check binds on all addresses, as Docker's published
ports do, and releases the socket at once; a port Docker (or anything else)
already holds reads as taken.
"""

from __future__ import annotations

import socket


def port_is_free(port: int, protocol: str = "tcp") -> bool:
    kind = socket.SOCK_DGRAM if protocol == "udp" else socket.SOCK_STREAM
    for family, address in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            sock = socket.socket(family, kind)
        except OSError:
            continue  # no IPv6 on this host
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((address, port))
        except OSError:
            return False
        finally:
            sock.close()
    return True
