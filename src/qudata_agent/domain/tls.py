"""TLS on the agent's port: the decisions, without the cryptography.

Owns the modes of `QUDATA_TLS`, how a new connection is routed from its first
byte, the names an agent-made certificate carries, when that certificate is
made again, and the pin's format (CONTRACT.md section 5).

What stays true:
- a TLS client's first byte is a handshake record (0x16); any other first
  byte is plain HTTP, served only in mode `on` without a client CA;
- a certificate is made again only with the same key (the adapter's job), so
  the pin, a digest of the public key, outlives every renewal;
- the pin is what `curl --pinnedpubkey sha256//<pin>` takes: the base64 of the
  SHA-256 of the DER SubjectPublicKeyInfo.
Pure: no I/O, no clock of its own.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
from collections.abc import Iterable
from datetime import datetime, timedelta
from enum import Enum, StrEnum

TLS_HANDSHAKE_RECORD = 0x16
VALIDITY = timedelta(days=397)  # what browsers accept for a leaf; pins do not care
RENEW_BEFORE = timedelta(days=30)  # renewed this long before it expires
TLS_REQUIRED_ERROR = "TLS required: use https://"


class TlsMode(StrEnum):
    ON = "on"  # TLS and plain HTTP on the one port
    REQUIRED = "required"  # TLS only; plain HTTP gets the contract's 400
    OFF = "off"  # plain HTTP only


class Route(Enum):
    TLS = "tls"
    PLAIN = "plain"
    REFUSE_PLAIN = "refuse-plain"  # answered with TLS_REQUIRED_ERROR and closed


def peeks(mode: TlsMode) -> bool:
    """Whether a new connection's first byte must be read before it is served."""
    return mode is not TlsMode.OFF


def route(mode: TlsMode, client_ca: bool, first_byte: int) -> Route:
    if mode is TlsMode.OFF:
        return Route.PLAIN
    if first_byte == TLS_HANDSHAKE_RECORD:
        return Route.TLS
    if mode is TlsMode.REQUIRED or client_ca:
        return Route.REFUSE_PLAIN
    return Route.PLAIN


def pin(spki_der: bytes) -> str:
    """The `--pinnedpubkey sha256//` value of a DER SubjectPublicKeyInfo."""
    return base64.b64encode(hashlib.sha256(spki_der).digest()).decode("ascii")


def certificate_names(*candidates: str | None) -> tuple[str, ...]:
    """The names an agent-made certificate carries: each given once, in order, blanks dropped."""
    names: list[str] = []
    for name in candidates:
        value = (name or "").strip().strip("[]").lower()
        if value and value not in names:
            names.append(value)
    return tuple(names)


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def renewal_reason(
    not_after: datetime | None,
    names_held: Iterable[str],
    names_wanted: Iterable[str],
    now: datetime,
) -> str | None:
    """Why the agent-made certificate must be made again (None: it is good as it is)."""
    if not_after is None:
        return "no certificate yet"
    if not_after - now <= RENEW_BEFORE:
        return "expires soon" if not_after > now else "expired"
    missing = set(names_wanted) - set(names_held)
    if missing:
        return "new names: " + ", ".join(sorted(missing))
    return None
