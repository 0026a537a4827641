"""The agent's port as a resource: which connections hold it, and who makes room.

Owns the table of open connections on the API port and the one decision about
a newcomer: let it in (and which connection leaves to make room), or refuse it.

What stays true:
- at most `cap` connections are open at once;
- a connection is a stranger until a request on it proved the secret; the
  control plane is a stranger too until its first request's headers arrive;
- when the table is full, the oldest stranger that is not in the middle of a
  request leaves to make room for the newcomer, so strangers holding every
  slot cannot lock the control plane out: each new connection takes the slot
  of the one that has waited longest; when no stranger can leave (every slot
  is serving a request or proved the secret), the newcomer is refused;
- a connection that proved the secret is never evicted (its idle timeout
  alone closes it).
Pure: no I/O, no clock of its own (times come in).
"""

from __future__ import annotations

from dataclasses import dataclass

# The ASGI scope extension through which the API says a request proved the secret.
TRUST_EXTENSION = "qudata.connection"


@dataclass(eq=False)
class Conn:
    id: int
    opened_at: float
    trusted: bool = False
    in_request: bool = False  # between a request's headers and the end of its response

    @property
    def evictable(self) -> bool:
        return not self.trusted and not self.in_request


@dataclass(frozen=True)
class Admission:
    conn: Conn | None  # None: refused
    evicted: Conn | None = None  # to be closed now, to make room


class ConnectionTable:
    def __init__(self, cap: int) -> None:
        if cap < 1:
            raise ValueError("the connection cap must be at least 1")
        self.cap = cap
        self._open: dict[int, Conn] = {}  # in order of arrival
        self._next_id = 0

    def __len__(self) -> int:
        return len(self._open)

    def admit(self, now: float) -> Admission:
        evicted = None
        if len(self._open) >= self.cap:
            evicted = next((c for c in self._open.values() if c.evictable), None)
            if evicted is None:
                return Admission(None)
            del self._open[evicted.id]
        self._next_id += 1
        conn = Conn(self._next_id, now)
        self._open[conn.id] = conn
        return Admission(conn, evicted)

    def close(self, conn: Conn) -> None:
        """The connection is gone (safe to repeat)."""
        self._open.pop(conn.id, None)

    def holds(self, conn: Conn) -> bool:
        return conn.id in self._open

    def counts(self) -> tuple[int, int]:
        """(strangers, trusted) open now."""
        trusted = sum(1 for c in self._open.values() if c.trusted)
        return len(self._open) - trusted, trusted
