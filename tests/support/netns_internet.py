"""A network namespace standing for the internet (and a private LAN), with test servers.

The namespace holds a public-looking address (198.51.100.226, TEST-NET-2) and
a private one (10.224.24.2), each reached from the host over its own veth; the
host forwards and Docker masquerades instances' traffic to them, as it would
to the real internet. In it runs one Python server (stdout: JSON lines):
- port 8001: sends `N` bytes, N read from the first line the client sends;
- port 8002: reads until EOF, then reports the bytes and the seconds between
  the first and the last byte;
- ports 25 and 2525: accept, say hello, close; each accept is reported with
  its time (the connection-rate test counts them).
Everything is removed by `close()`, also when a test failed.
"""

from __future__ import annotations

import json
import queue
import re
import subprocess
import sys
import threading
import time
from typing import Any

from support.docker_api import Api, docker

NS = "t24inet"
PUBLIC = "198.51.100.226"
PRIVATE = "10.224.24.2"
_LINKS = (("t24h0", "t24n0", "198.51.100.225", PUBLIC), ("t24h1", "t24n1", "10.224.24.1", PRIVATE))

_SERVER = r"""
import json, socket, sys, threading, time
def out(**kw):
    sys.stdout.write(json.dumps(kw) + "\n"); sys.stdout.flush()
def serve(port, handle):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(4096)
    while True:
        c, _ = s.accept()
        threading.Thread(target=handle, args=(port, c), daemon=True).start()
def send(port, c):
    with c:
        n = int(c.makefile("rb").readline() or 0)
        chunk = b"x" * 65536
        while n > 0:
            c.sendall(chunk[:n]); n -= len(chunk[:n])
def receive(port, c):
    with c:
        total, first = 0, None
        while True:
            b = c.recv(262144)
            if not b: break
            first = first or time.monotonic(); total += len(b)
        out(kind="upload", bytes=total, seconds=time.monotonic() - (first or time.monotonic()))
        try: c.sendall(b"ok\n")
        except OSError: pass
def hello(port, c):
    out(kind="accept", port=port, at=time.monotonic())
    with c:
        try: c.sendall(b"hello\n")
        except OSError: pass
for port, h in ((8001, send), (8002, receive), (25, hello), (2525, hello)):
    threading.Thread(target=serve, args=(port, h), daemon=True).start()
out(kind="ready")
threading.Event().wait()
"""


def _sh(*argv: str, check: bool = True) -> None:
    subprocess.run(argv, check=check, capture_output=True)


class Internet:
    def __init__(self) -> None:
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.proc: subprocess.Popen[str] | None = None

    def open(self) -> Internet:
        self.close()
        _sh("ip", "netns", "add", NS)
        _sh("ip", "-n", NS, "link", "set", "lo", "up")
        for host_end, ns_end, host_ip, ns_ip in _LINKS:
            _sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", ns_end)
            _sh("ip", "link", "set", ns_end, "netns", NS)
            _sh("ip", "addr", "add", f"{host_ip}/30", "dev", host_end)
            _sh("ip", "link", "set", host_end, "up")
            _sh("ip", "-n", NS, "addr", "add", f"{ns_ip}/30", "dev", ns_end)
            _sh("ip", "-n", NS, "link", "set", ns_end, "up")
        _sh("ip", "-n", NS, "route", "add", "default", "via", _LINKS[0][2])
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", NS, sys.executable, "-u", "-c", _SERVER],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        threading.Thread(target=self._read, daemon=True).start()
        assert self.next("ready", 10)["kind"] == "ready"
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.put(json.loads(line))

    def next(self, kind: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            event = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            if event["kind"] == kind:
                return event

    def drain(self) -> list[dict[str, Any]]:
        found = []
        while not self.events.empty():
            found.append(self.events.get_nowait())
        return found

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
        for host_end, *_ in _LINKS:
            _sh("ip", "link", "del", host_end, check=False)
        _sh("ip", "netns", "del", NS, check=False)


# -- what an instance does with it -------------------------------------------------


def bash(container: str, script: str) -> str:
    return docker("exec", container, "bash", "-c", script)


def download(container: str, n: int, address: str = PUBLIC) -> tuple[int, float]:
    """Bytes received and seconds taken, as the container's `dd` measured them (its
    clock runs while it copies: no process start-up in the figure)."""
    out = docker(
        "exec", container, "bash", "-c",
        f"exec 3<>/dev/tcp/{address}/8001; echo {n} >&3;"
        " dd of=/dev/null bs=64k iflag=fullblock <&3 2>&1 | tail -1",
    )  # fmt: skip
    found = re.match(r"(\d+) bytes .* copied, ([0-9.e+-]+) s", out.strip())
    assert found, out
    return int(found.group(1)), float(found.group(2))


def upload(container: str, internet: Internet, n: int, address: str = PUBLIC) -> tuple[int, float]:
    """Bytes the namespace received and the seconds between its first and last byte."""
    bash(container, f"head -c {n} /dev/zero > /dev/tcp/{address}/8002")
    event = internet.next("upload")
    return int(event["bytes"]), float(event["seconds"])


def network(api: Api) -> dict[str, int]:
    found = api.get().get("network")
    return dict(found) if found else {}


def settled(api: Api, key: str, at_least: int, timeout: float = 20) -> dict[str, int]:
    """The view's counters once `key` reached `at_least` and held through a meter pass.

    With `at_least` 0: as soon as the instance is metered at all.
    """
    deadline = time.monotonic() + timeout
    now: dict[str, int] = {}
    while time.monotonic() < deadline:
        now = network(api)
        if now and now.get(key, 0) >= at_least:
            if at_least == 0:
                return now
            time.sleep(3.2)  # the meter reads every 3 s: one more pass, nothing moved
            if network(api) == now:
                return now
            continue
        time.sleep(0.3)
    raise AssertionError(f"{key} below {at_least} after {timeout}s: {now}")


def until_counted(api: Api, container: str, timeout: float = 20) -> None:
    """Small downloads until the instance's public bytes move: the meter has its run."""
    deadline = time.monotonic() + timeout
    while not network(api) and time.monotonic() < deadline:
        time.sleep(0.3)
    start = network(api)["rx_public_bytes"]
    while time.monotonic() < deadline:
        download(container, 100_000)
        for _ in range(12):
            if network(api)["rx_public_bytes"] > start:
                return
            time.sleep(0.3)
    raise AssertionError("the new run's traffic was never counted")


def forget_meter(instance_id: str, table: str = "qudata_net_t24br0") -> None:
    """What an agent killed with its instance left: the meter's table and the IFB device."""
    _sh("nft", "delete", "table", "ip", table, check=False)
    _sh("ip", "link", "del", "qdifb" + instance_id.replace("-", "")[:10], check=False)


def metered(api: Api, container: str) -> dict[str, int]:
    """The counters once the meter counts this run (and its cap, if any, is on)."""
    until_counted(api, container)
    return settled(api, "rx_public_bytes", 1)
