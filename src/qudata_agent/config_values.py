"""How a setting's text becomes its value: one small parser per kind of value.

Each parser is called as `parse(variable, text)` with text that is not blank and
returns the typed value or raises `ConfigError`. The declarations in config.py
pick one parser per setting; nothing here reads the environment.

What stays true: an error message starts with the variable's name and says what
was expected; the API key's text is never part of a message.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from qudata_agent.domain.firewall import parse_allow_list
from qudata_agent.domain.image_ref import resolve_image
from qudata_agent.domain.netpolicy import MAX_MBPS, MIN_MBPS, parse_ports
from qudata_agent.domain.nvidia_toolkit import parse_floor
from qudata_agent.domain.registry_hosts import parse_allow_list as parse_registry_allow
from qudata_agent.domain.tunnel import TunnelConfigError
from qudata_agent.errors import InvalidRequest

T = TypeVar("T")
E = TypeVar("E", bound=StrEnum)
Parse = Callable[[str, str], T]


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


def integer(lo: int, hi: int) -> Parse[int]:
    def parse(name: str, raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ConfigError(f"{name}: expected an integer {lo}-{hi}, got {raw!r}") from None
        if not lo <= value <= hi:
            raise ConfigError(f"{name}: expected an integer {lo}-{hi}, got {value}")
        return value

    return parse


def number(lo: float, hi: float) -> Parse[float]:
    def parse(name: str, raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise ConfigError(f"{name}: expected a number {lo}-{hi}, got {raw!r}") from None
        if not lo <= value <= hi:  # also refuses nan
            raise ConfigError(f"{name}: expected a number {lo}-{hi}, got {value}")
        return value

    return parse


def choice(*choices: str) -> Parse[str]:
    """One of `choices`, in any case; the value as spelled in `choices`."""

    def parse(name: str, raw: str) -> str:
        for one in choices:
            if raw.strip().lower() == one.lower():
                return one
        raise ConfigError(f"{name}: expected one of {', '.join(choices)}, got {raw!r}")

    return parse


def member(kind: type[E]) -> Parse[E]:
    """A member of a string enum, by its value in any case."""
    pick = choice(*(m.value for m in kind))
    return lambda name, raw: kind(pick(name, raw))


def text(name: str, raw: str) -> str:
    return raw.strip()


def absolute_path(name: str, raw: str) -> Path:
    path = Path(raw.strip())
    if not raw.strip() or not path.is_absolute():
        raise ConfigError(f"{name}: expected an absolute path, got {raw!r}")
    return path


def any_path(name: str, raw: str) -> Path:
    return Path(raw.strip())


def port_range(name: str, raw: str) -> tuple[int, int]:
    lo_s, sep, hi_s = raw.strip().partition("-")
    if not sep:
        raise ConfigError(f"{name}: expected FIRST-LAST (e.g. 40000-49999), got {raw!r}")
    port = integer(1, 65535)
    lo, hi = port(name, lo_s), port(name, hi_s)
    if lo > hi:
        raise ConfigError(f"{name}: first port {lo} is above last port {hi}")
    return lo, hi


def url(name: str, raw: str) -> str:
    parts = urlsplit(raw.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{name}: expected an http(s) URL, got {raw!r}")
    return raw.strip().rstrip("/")


def url_list(name: str, raw: str) -> tuple[str, ...]:
    """Comma-separated http(s) URLs; "none" turns the lookups off."""
    if raw.strip().lower() == "none":
        return ()
    return tuple(url(name, item) for item in raw.split(",") if item.strip())


def api_key(name: str, raw: str) -> str | None:
    value = raw.strip()
    if not value:
        return None
    if any(c.isspace() or not c.isprintable() for c in value):
        raise ConfigError(f"{name}: the API key holds whitespace or control characters")
    return value


def docker_name(name: str, raw: str) -> str:
    if not re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}", raw):
        raise ConfigError(f"{name}: expected a Docker network name, got {raw!r}")
    return raw


def interface(name: str, raw: str) -> str:
    if not re.fullmatch(r"[a-zA-Z0-9_.-]{1,15}", raw):
        raise ConfigError(f"{name}: expected an interface name of at most 15 chars, got {raw!r}")
    return raw


def runtime(name: str, raw: str) -> str:
    value = raw.strip()
    if not re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}", value) or value == "runc":
        raise ConfigError(f"{name}: expected a Docker runtime name other than runc, got {raw!r}")
    return value


def version(name: str, raw: str) -> tuple[int, int, int]:
    try:
        return parse_floor(raw)
    except ValueError as e:
        raise ConfigError(f"{name}: {e}") from None


def switch(name: str, raw: str) -> bool:
    value = raw.lower()
    if value in ("1", "on", "true", "yes"):
        return True
    if value in ("0", "off", "false", "no"):
        return False
    raise ConfigError(f"{name}: expected on or off, got {raw!r}")


def networks(name: str, raw: str) -> tuple[str, ...]:
    try:
        return parse_allow_list(raw)
    except ValueError as e:
        raise ConfigError(f"{name}: expected comma-separated networks (CIDR): {e}") from None


def tcp_ports(name: str, raw: str) -> tuple[int, ...]:
    try:
        return parse_ports(raw)
    except ValueError as e:
        raise ConfigError(f"{name}: expected comma-separated TCP ports or none: {e}") from None


def mbps(name: str, raw: str) -> float | None:
    if raw.strip().lower() in ("none", "off"):
        return None
    return number(MIN_MBPS, MAX_MBPS)(name, raw)


def images(name: str, raw: str) -> tuple[str, ...]:
    """Comma-separated image references, each as the agent will pull it ("busybox:latest")."""
    refs = []
    for item in raw.split(","):
        if item.strip():
            try:
                refs.append(str(resolve_image(item.strip(), None)))
            except InvalidRequest as e:
                problem = e.message.removeprefix("field 'image': ")
                raise ConfigError(f"{name}: {item.strip()!r}: {problem}") from None
    return tuple(dict.fromkeys(refs))


def registries(name: str, raw: str) -> frozenset[str]:
    try:
        return parse_registry_allow(raw)
    except ValueError as e:
        raise ConfigError(f"{name}: expected comma-separated host:port entries: {e}") from None


def loopback_listen(name: str, raw: str) -> tuple[str, int] | None:
    value = raw.strip()
    if value.lower() in ("", "off", "none"):
        return None
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host:
        raise ConfigError(f"{name}: expected HOST:PORT (e.g. 127.0.0.1:9101), got {raw!r}")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:  # it needs no secret: it must not be reachable from elsewhere
        raise ConfigError(f"{name}: expected a loopback address (127.0.0.1 or ::1), got {host!r}")
    return host, integer(1, 65535)(name, port)


def tunnel_mode(name: str, raw: str) -> str | None:
    """ "wireguard", or None for "off"."""
    mode = choice("wireguard", "off")(name, raw)
    return None if mode == "off" else mode


def checked_by(check: Callable[[str, str], object]) -> Parse[str]:
    """The text (stripped) once a tunnel parser of the domain accepts it."""

    def parse(name: str, raw: str) -> str:
        try:
            check(name, raw)
        except TunnelConfigError as e:
            raise ConfigError(str(e)) from None
        return raw.strip()

    return parse


def mark(name: str, raw: str) -> int:
    try:
        value = int(raw.strip(), 0)
    except ValueError:
        raise ConfigError(f"{name}: expected a number (e.g. 0x80000), got {raw!r}") from None
    if not 0 < value < 2**32:
        raise ConfigError(f"{name}: expected a nonzero 32-bit mark, got {raw!r}")
    return value
