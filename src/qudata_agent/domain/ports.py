"""Host ports for the instance: the request's port map, checked, and the allocator.

Owns `parse_port_requests` (the wire's `ports` object -> container port key ->
fixed host port or None for "auto") and `PortAllocator` (turns those requests
into host ports). Deciding is pure; whether a port can be bound right now is
asked through the injected `bindable(port, protocol)`, and the store keeps
what was handed out (it passes that back as `taken`).

What stays true:
- keys are "8080" for TCP (a "/tcp" suffix is dropped) or "53/udp";
- one request never holds the same container port twice, nor the same fixed
  host port twice (host ports are kept distinct across TCP and UDP alike);
- `allocate` returns a host port for every request or raises, and every
  port it returns is distinct, outside `taken`, not reserved and bindable;
- a fixed host port lies in the provider's fixed-port range (default
  1024-65535: a renter never takes a privileged port such as a web server's,
  DNS or an SSH that restarts after Docker), is never one of the agent's own
  ports, and is bindable now (so no port a host service listens on);
- auto ports come from the configured range, scanning round-robin from just
  after the last port handed out, so a port freed a moment ago is not reused
  at once; the cursor is the only state the allocator changes.

Not thread-safe on its own: the caller serialises `allocate` with the write
that records its result (the instance service's create lock).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping

from qudata_agent.errors import Conflict, InvalidRequest

MAX_PORTS = 64
DEFAULT_FIXED_RANGE = (1024, 65535)
SSH_PORT_KEY = "22"
AUTO = "auto"
_KEY_RE = re.compile(r"([1-9][0-9]{0,4})(?:/(tcp|udp))?", re.IGNORECASE)
_HOST_PORT_RE = re.compile(r"[1-9][0-9]{0,4}")


def _shown(value: object) -> str:
    """A short, safe rendering of a bad value for a message."""
    text = repr(value)
    return text if len(text) <= 24 else text[:21] + "..."


def _key_name(key: object) -> str:
    """A bad key as it can appear inside `field 'ports.<key>'`."""
    if not isinstance(key, str):
        return _shown(key)
    text = "".join(ch if ch.isprintable() and ch != "'" else "?" for ch in key)
    return text if len(text) <= 24 else text[:21] + "..."


def protocol_of(key: str) -> str:
    """ "53/udp" -> "udp"; "8080" -> "tcp"."""
    return "udp" if key.endswith("/udp") else "tcp"


def _normal_key(key: object) -> str:
    match = _KEY_RE.fullmatch(key) if isinstance(key, str) else None
    if match is None or int(match.group(1)) > 65535:
        raise InvalidRequest(
            f"field 'ports.{_key_name(key)}': a container port is 1-65535,"
            " optionally followed by /tcp or /udp"
        )
    number, protocol = match.group(1), (match.group(2) or "tcp").lower()
    return number if protocol == "tcp" else f"{number}/udp"


def _host_port(key: str, value: object) -> int | None:
    if isinstance(value, str):
        if value.lower() == AUTO:
            return None
        if _HOST_PORT_RE.fullmatch(value):
            value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535:
        return value
    raise InvalidRequest(
        f"field 'ports.{key}': expected \"auto\" or a host port 1-65535, got {_shown(value)}"
    )


def parse_port_requests(
    ports: Mapping[str, object] | None, ssh_enabled: bool
) -> dict[str, int | None]:
    """The request's `ports` as container port key -> fixed host port, or None for auto.

    With `ssh_enabled`, "22" is added as auto unless the request already names it.
    """
    requests: dict[str, int | None] = {}
    fixed: dict[int, str] = {}
    for raw_key, value in (ports or {}).items():
        key = _normal_key(raw_key)
        if key in requests:
            raise InvalidRequest(f"field 'ports.{raw_key}': container port {key} is given twice")
        host_port = _host_port(raw_key, value)
        if host_port is not None:
            if host_port in fixed:
                raise InvalidRequest(
                    f"field 'ports.{raw_key}': host port {host_port} is also asked for"
                    f" by ports.{fixed[host_port]}"
                )
            fixed[host_port] = raw_key
        requests[key] = host_port
    if ssh_enabled and SSH_PORT_KEY not in requests:
        requests[SSH_PORT_KEY] = None
    if len(requests) > MAX_PORTS:
        raise InvalidRequest(
            f"field 'ports': at most {MAX_PORTS} ports per instance"
            f" (counting 22 for SSH), got {len(requests)}"
        )
    return requests


class PortAllocator:
    """Hands out host ports: fixed ones checked, auto ones picked round-robin from a range."""

    def __init__(
        self,
        port_range: tuple[int, int],
        reserved: frozenset[int],
        bindable: Callable[[int, str], bool],
        start: int | None = None,
        fixed_range: tuple[int, int] = DEFAULT_FIXED_RANGE,
    ) -> None:
        low, high = port_range
        self._fixed_range = fixed_range
        if not 1 <= low <= high <= 65535:
            raise ValueError(f"port range {low}-{high} is not within 1-65535")
        self._low = low
        self._high = high
        self._reserved = reserved
        self._bindable = bindable
        self._next = start if start is not None and low <= start <= high else low

    @property
    def port_range(self) -> tuple[int, int]:
        return self._low, self._high

    @property
    def cursor(self) -> int:
        """The port the next auto scan tries first."""
        return self._next

    def allocate(
        self, requests: Mapping[str, int | None], taken: Collection[int]
    ) -> dict[str, int]:
        """A host port for every request, or Conflict and nothing handed out.

        Fixed ports are checked first (in request order), then each auto port
        takes the next free port of the range after the cursor.
        """
        taken_set = frozenset(taken)
        chosen: dict[str, int] = {}
        for key, port in requests.items():
            if port is not None:
                self._check_fixed(key, port, taken_set, chosen)
                chosen[key] = port
        cursor = self._next
        used = set(chosen.values())
        for key, port in requests.items():
            if port is None:
                found = self._scan(cursor, protocol_of(key), taken_set, used)
                chosen[key] = found
                used.add(found)
                cursor = self._after(found)
        self._next = cursor
        return {key: chosen[key] for key in requests}

    def _check_fixed(
        self, key: str, port: int, taken: frozenset[int], chosen: Mapping[str, int]
    ) -> None:
        if not 1 <= port <= 65535:
            raise InvalidRequest(f"field 'ports.{key}': host port {port} is not in 1-65535")
        first, last = self._fixed_range
        if not first <= port <= last:
            raise InvalidRequest(
                f"field 'ports.{key}': fixed host port {port} is outside {first}-{last},"
                ' the fixed ports this host hands out (ask for "auto")'
            )
        if port in chosen.values():
            raise InvalidRequest(f"field 'ports.{key}': host port {port} is asked for twice")
        if port in self._reserved:
            raise Conflict(f"field 'ports.{key}': port {port} is the agent's own port")
        if port in taken:
            raise Conflict(f"field 'ports.{key}': host port {port} is already allocated")
        if not self._bindable(port, protocol_of(key)):
            raise Conflict(f"field 'ports.{key}': host port {port} is in use on this host")

    def _after(self, port: int) -> int:
        return self._low if port >= self._high else port + 1

    def _scan(self, first: int, protocol: str, taken: frozenset[int], used: set[int]) -> int:
        """The first port from `first` on (wrapping) that is free and bindable."""
        size = self._high - self._low + 1
        for step in range(size):
            port = self._low + (first - self._low + step) % size
            if port in taken or port in used or port in self._reserved:
                continue
            if self._bindable(port, protocol):
                return port
        raise Conflict(f"no free host port in range {self._low}-{self._high}")
