"""A TCP service of the test's own on the host: what a wall must keep tenants from,
or what must never be contacted. It counts the connections it accepted and
greets each with `greeting` (nothing: it just hangs up)."""

from __future__ import annotations

import socket
import threading


class Listener:
    def __init__(self, host: str = "0.0.0.0", greeting: bytes = b"host-service\n") -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.connections = 0
        self._greeting = greeting
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            with conn:
                if self._greeting:
                    conn.sendall(self._greeting)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()
