"""The cost of TLS on the agent's port: requests per second and p99, TLS against plain HTTP.

What it does (everything on 127.0.0.1): starts the real `qudata-agent run`
(standalone, a temporary state directory, a free port, the firewall off, TLS
`on`, so the one port serves both), then sends `GET /instances` with the
secret (the authenticated path: auth middleware, the envelope, one read of the
store) in four ways, on the same agent build in the same run:

- plain HTTP, one kept-alive connection for every request;
- TLS, one kept-alive connection (the handshake once);
- plain HTTP, a new connection per request (`Connection: close`);
- TLS, a new connection per request (a full handshake each time: ECDHE with
  the agent's P-256 key, TLS 1.3).

Each way sends `--requests` requests (default 2000) from `--clients` threads
(default 4), in rounds of 100 per way rotated so that a noisy neighbour hits
every way alike, after 100 untimed warm-up requests each. Latency is the
client's, from sending a request to its answer's last byte; requests per
second are over the wall time of each way's requests. It prints, per way,
requests per second, p50 and p99, and the ratios TLS/plain (requests per
second: below 1 means TLS serves fewer; p99: above 1 means TLS answers more
slowly), with and without keep-alive. There is no pass or fail: the figures
are what a control plane that moves to https:// pays. The client is Python's
`http.client` and `ssl` in threads, so the figures include the client's own
CPU; on a 2-CPU machine the client and the agent share the CPUs.

Cleanup on any exit: the agent process and the temporary directory. About 20 s
with the defaults. Run from the repository root:

    .venv/bin/python bench/tls_port.py [--requests 2000] [--clients 4]
"""

from __future__ import annotations

import argparse
import http.client
import shutil
import ssl
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from _common import AgentProc, BenchError

PORT_RANGE = (25500, 25599)
ROUND = 100
WARMUP = 100
PATH = "/instances"


@dataclass
class Way:
    name: str
    tls: bool
    keep_alive: bool
    latencies: list[float] = field(default_factory=list)
    wall_s: float = 0.0

    def rps(self) -> float:
        return len(self.latencies) / self.wall_s if self.wall_s else 0.0

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def _client_tls() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the agent's certificate is self-signed; no pin needed here
    return ctx


class Caller:
    """One client thread's connection to the agent, per way."""

    def __init__(self, port: int, secret: str, tls: ssl.SSLContext) -> None:
        self._port, self._secret, self._tls = port, secret, tls
        self._kept: dict[bool, http.client.HTTPConnection] = {}

    def _connection(self, tls: bool) -> http.client.HTTPConnection:
        if tls:
            return http.client.HTTPSConnection(
                "127.0.0.1", self._port, timeout=10, context=self._tls
            )
        return http.client.HTTPConnection("127.0.0.1", self._port, timeout=10)

    def call(self, way: Way) -> float:
        started = time.perf_counter()
        if way.keep_alive:
            conn = self._kept.get(way.tls) or self._connection(way.tls)
            self._kept[way.tls] = conn
            headers = {"X-Agent-Secret": self._secret}
        else:
            conn = self._connection(way.tls)
            headers = {"X-Agent-Secret": self._secret, "Connection": "close"}
        conn.request("GET", PATH, headers=headers)
        answer = conn.getresponse()
        answer.read()
        if answer.status != 200:
            raise BenchError(f"GET {PATH} answered {answer.status}")
        if not way.keep_alive:
            conn.close()
        return time.perf_counter() - started

    def close(self) -> None:
        for conn in self._kept.values():
            conn.close()


def _in_threads(callers: list[Caller], count: int, work: Callable[[Caller], float]) -> list[float]:
    """`count` calls spread over the callers' threads; their latencies."""
    out: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run(caller: Caller, share: int) -> None:
        try:
            mine = [work(caller) for _ in range(share)]
        except (OSError, http.client.HTTPException, BenchError) as e:
            errors.append(e)
            return
        with lock:
            out.extend(mine)

    shares = [count // len(callers) + (i < count % len(callers)) for i in range(len(callers))]
    threads = [
        threading.Thread(target=run, args=(c, n)) for c, n in zip(callers, shares, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise BenchError(f"a request failed: {errors[0]!r}")
    return out


def way_of(way: Way) -> Callable[[Caller], float]:
    return lambda caller: caller.call(way)


def measure(agent: AgentProc, requests: int, clients: int) -> list[Way]:
    ways = [
        Way("plain, keep-alive", tls=False, keep_alive=True),
        Way("TLS,   keep-alive", tls=True, keep_alive=True),
        Way("plain, new conn", tls=False, keep_alive=False),
        Way("TLS,   new conn", tls=True, keep_alive=False),
    ]
    tls = _client_tls()
    callers = [Caller(agent.port, agent.secret(), tls) for _ in range(clients)]
    try:
        for way in ways:
            _in_threads(callers, WARMUP, way_of(way))
        done = 0
        while done < requests:
            batch = min(ROUND, requests - done)
            for way in ways:
                started = time.perf_counter()
                way.latencies += _in_threads(callers, batch, way_of(way))
                way.wall_s += time.perf_counter() - started
            done += batch
    finally:
        for caller in callers:
            caller.close()
    return ways


def report(ways: list[Way]) -> None:
    print(f"{'way':<18} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for way in ways:
        print(f"{way.name:<18} {way.rps():>8.0f} {way.pct(0.50):>8.2f} {way.pct(0.99):>8.2f}")
    by = {(w.tls, w.keep_alive): w for w in ways}
    for keep, label in ((True, "keep-alive"), (False, "new connection per request")):
        plain, tls = by[(False, keep)], by[(True, keep)]
        print(
            f"TLS/plain, {label}: req/s x{tls.rps() / plain.rps():.2f},"
            f" p99 x{tls.pct(0.99) / plain.pct(0.99):.2f},"
            f" mean x{statistics.fmean(tls.latencies) / statistics.fmean(plain.latencies):.2f}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=4)
    args = parser.parse_args()
    if args.requests < ROUND or args.clients < 1:
        parser.error(f"--requests at least {ROUND}, --clients at least 1")
    workdir = Path(tempfile.mkdtemp(prefix="qudata-bench-tls-"))
    agent = AgentProc(
        workdir, PORT_RANGE, log_level="WARNING", env={"QUDATA_FIREWALL": "off", "QUDATA_TLS": "on"}
    )
    try:
        agent.start()
        agent.wait_ready()
        print(f"{args.requests} x GET {PATH} per way, {args.clients} client threads, one agent")
        report(measure(agent, args.requests, args.clients))
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        agent.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
