"""systemd's service notification protocol (sd_notify), spoken over its datagram socket.

Owns the NOTIFY_SOCKET socket. What stays true: without a socket (not run by
systemd, or not Type=notify) every call is a no-op that returns False; a
failed send is never an error of the agent (systemd then decides from its
own timeouts); only the variables systemd documents are sent (READY=1,
STOPPING=1, WATCHDOG=1, STATUS=...).
"""

from __future__ import annotations

import logging
import socket

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, socket_path: str | None) -> None:
        # "@name" is an abstract socket: its first byte is NUL on the wire.
        if socket_path and socket_path.startswith("@"):
            socket_path = "\0" + socket_path[1:]
        self._path = socket_path or None

    @property
    def enabled(self) -> bool:
        return self._path is not None

    def notify(self, state: str) -> bool:
        """Sends `state` (newline-separated VAR=value lines); True when systemd got it."""
        if self._path is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self._path)
                sock.sendall(state.encode())
        except OSError as e:
            log.debug("sd_notify failed", extra={"error": str(e)})
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")
