"""A fake QuData control plane: a real HTTP server on loopback that records calls.

Each request is kept (method, path, headers, parsed JSON body); answers per
path can be set by a test, and the server can be stopped and started again on
the same port to play an outage.

Run as a program (stdlib only, so any python3 runs it, e.g. inside a test
host container) it serves on 127.0.0.1:PORT and appends each call to FILE as
one JSON line: `python3 fake_cp.py PORT FILE`.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    at: float
    agent_port_answered: bool | None = None  # /init only: did agent_port answer /ping then?


DEFAULT_INIT = {
    "agent_created": True,
    "emergency_reinit": False,
    "host_exists": False,
    "secret_key": "cp-issued-secret-0001",
}


def _answers_ping(port: object) -> bool:
    if not isinstance(port, int):
        return False
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


class FakeControlPlane:
    def __init__(self, port: int = 0, record_to: str | None = None) -> None:
        self.port = port
        self.record_to = record_to  # also append each call here, one JSON line
        self.calls: list[Recorded] = []
        self.answers: dict[str, tuple[int, Any]] = {
            "/v0/init": (200, {"ok": True, "data": dict(DEFAULT_INIT)}),
            "/v0/init/host": (200, {"ok": True, "data": None}),
            "/v0/stats": (200, {"ok": True, "data": None}),
        }
        self.delays: dict[str, float] = {}  # path -> seconds to wait before answering
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v0"

    def start(self) -> FakeControlPlane:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw
                record = Recorded("POST", self.path, dict(self.headers.items()), body, time.time())
                if self.path.endswith("/init") and isinstance(body, dict):
                    record.agent_port_answered = _answers_ping(body.get("agent_port"))
                with fake._lock:
                    fake.calls.append(record)
                    if fake.record_to:
                        with open(fake.record_to, "a", encoding="utf-8") as out:
                            line = {"method": "POST", "path": self.path, "body": body}
                            line["at"] = record.at
                            line["headers"] = dict(self.headers.items())
                            out.write(json.dumps(line) + "\n")
                    status, answer = fake.answers.get(self.path, (404, {"ok": False, "error": "?"}))
                delay = fake.delays.get(self.path, 0.0)
                if delay:
                    time.sleep(delay)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def requests(self, path: str) -> list[Recorded]:
        with self._lock:
            return [c for c in self.calls if c.path == "/v0" + path]

    def wait_for(self, path: str, count: int = 1, timeout: float = 15.0) -> list[Recorded]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.requests(path)
            if len(found) >= count:
                return found
            time.sleep(0.05)
        raise AssertionError(f"fake control plane: under {count} calls to {path} in {timeout}s")


if __name__ == "__main__":
    server = FakeControlPlane(int(sys.argv[1]), sys.argv[2]).start()
    threading.Event().wait()
