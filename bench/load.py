"""API latency under load while an instance is being built: p50/p99 of GET /ping and GET /instances.

What it does (everything on 127.0.0.1):

1. starts the real `qudata-agent run` (standalone, a temporary state
   directory, a free port, instance ports from 25000-25499);
2. phase (a): sends `POST /instances` for `qudata-test/debian:12` with
   `ssh_enabled`, an image without sshd, so the agent pulls nothing but
   installs OpenSSH with apt inside the container (the heaviest thing it does
   while serving), and at once, for `--duration` seconds (default 20), sends
   `GET /ping` and `GET /instances` at `--rate` requests per second each
   (default 200, so 400 in all), open loop: request i of a route is due at
   start + i/rate whatever the earlier ones did, over a pool of kept-alive
   connections (a new one opens when all are busy, at most 64). Latency runs
   from the due time to the last byte of the answer, so a stall also counts
   against every request that should have gone out during it (no coordinated
   omission). Then DELETE;
3. phase (b), the baseline (`--no-baseline` skips it): the agent holds a
   settled instance (busybox with `ssh_enabled`: running, SSH failed at once,
   so GET /instances answers as much as in (a)), and a plain `docker run` of
   the same Debian image does the same apt install while the same load runs.
   What the install's CPU does to every process on the host shows in (b);
   what the agent's own create and SSH work adds is (a) minus (b);
4. prints p50, p90, p99 and max per route and phase, the same over only the
   requests due while the install ran ("inst"), the errors, the agent's CPU
   time, how late the generator itself was and what the instance did (the SSH
   status seen in the GET /instances answers). PASS when in (a) both p99,
   over the window and while installing, are at most `--target-ms` (20), no
   request failed and the install ran at least 1 s of the window.

Bounded: at most rate x duration requests per route and phase, a hard stop at
duration + 10 s, each request times out after 5 s. Cleanup on any exit
(Ctrl-C and SIGTERM included): DELETE /instances, `docker rm -f` of every
container labelled with this agent's id and of the baseline container
(`qudata.bench.load=<token>`), the agent process and the temporary
directory. Exit status: 0 PASS, 1 FAIL, 2 error, 130 interrupted.
`--json FILE` also writes the figures (bench/reliability_report.py reads it).

Needs a running Docker engine, the local images `qudata-test/debian:12` and
`qudata-test/busybox:1` (`scripts/build-test-images.sh`) and the Debian
mirror from inside containers. About 50 s with the defaults. Run from the
repository root:

    .venv/bin/python bench/load.py [--rate 200] [--duration 20] [--no-baseline] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from _common import (
    AgentProc,
    BenchError,
    exit_code,
    interrupt_on_signals,
    need_images,
    remove_containers,
    signals_ignored,
    teardown,
)

IMAGE = {"image": "qudata-test/debian", "image_tag": "12"}
IDLE_IMAGE = {"image": "qudata-test/busybox", "image_tag": "1"}
PORT_RANGE = (25000, 25499)
ROUTES = ("/ping", "/instances")
MAX_CONNECTIONS = 64
LOAD_LABEL = "qudata.bench.load"
REQUEST_TIMEOUT_S = 5.0


# -- the load generator ----------------------------------------------------------


@dataclass
class RouteResult:
    latencies_ms: list[float] = field(default_factory=list)
    due_s: list[float] = field(default_factory=list)  # when each answered one was due
    lateness_ms: list[float] = field(default_factory=list)  # actual send - due time
    errors: list[str] = field(default_factory=list)


@dataclass
class Window:
    started: float = 0.0
    ended: float = 0.0
    ssh_seen: list[tuple[float, str, str]] = field(default_factory=list)  # (s, status, ssh)


class Pool:
    """Kept-alive HTTP/1.1 connections to the agent, one request at a time on each."""

    def __init__(self, port: int, secret: str) -> None:
        self._port = port
        self._secret = secret
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.opened = 0

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
        """An idle connection (reused: True) or a new one."""
        if self._idle:
            return (*self._idle.pop(), True)
        if self.opened >= MAX_CONNECTIONS:
            raise BenchError(f"more than {MAX_CONNECTIONS} requests in flight")
        self.opened += 1
        reader, writer = await asyncio.open_connection("127.0.0.1", self._port)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return reader, writer, False

    async def get(self, path: str) -> tuple[int, bytes]:
        """One GET; a kept-alive connection the server closed meanwhile is retried once
        on a new one, as HTTP clients do (uvicorn drops connections idle for 5 s)."""
        reader, writer, reused = await self._connection()
        try:
            return await self._exchange(reader, writer, path)
        except (asyncio.IncompleteReadError, ConnectionResetError) as e:
            stale = not isinstance(e, asyncio.IncompleteReadError) or not e.partial
            if not (reused and stale):
                raise
        reader, writer, _ = await self._connection_new()
        return await self._exchange(reader, writer, path)

    async def _connection_new(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
        idle, self._idle = self._idle, []
        try:
            return await self._connection()
        finally:
            self._idle = idle

    async def _exchange(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str
    ) -> tuple[int, bytes]:
        request = (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Agent-Secret: {self._secret}\r\n\r\n"
        )
        try:
            writer.write(request.encode())
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            body = await reader.readexactly(length)
        except BaseException:
            writer.close()
            raise
        self._idle.append((reader, writer))
        return status, body

    def close(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


async def _one(
    pool: Pool, path: str, due: float, result: RouteResult, window: Window, record: bool
) -> None:
    result.lateness_ms.append((time.perf_counter() - due) * 1000)
    try:
        status, body = await asyncio.wait_for(pool.get(path), REQUEST_TIMEOUT_S)
    except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as e:
        result.errors.append(f"{type(e).__name__}: {e}")
        return
    result.latencies_ms.append((time.perf_counter() - due) * 1000)
    result.due_s.append(due - window.started)
    if status != 200:
        result.errors.append(f"HTTP {status}")
    elif record:
        data = json.loads(body)["data"]
        ssh = (data.get("ssh") or {}).get("status") or "-"
        window.ssh_seen.append((due - window.started, data["status"], ssh))


async def _route(
    pool: Pool, path: str, rate: float, start: float, duration: float, window: Window
) -> RouteResult:
    result = RouteResult()
    tasks: set[asyncio.Task[None]] = set()
    for i in range(int(rate * duration)):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        record = path == "/instances"
        task = asyncio.create_task(_one(pool, path, due, result, window, record))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=REQUEST_TIMEOUT_S + 1)
    return result


async def run_load(
    port: int, secret: str, rate: float, duration: float
) -> tuple[dict[str, RouteResult], Window, int]:
    pools = {path: Pool(port, secret) for path in ROUTES}
    window = Window()
    try:
        # Warm-up: open a few connections per route (not counted).
        for pool in pools.values():
            await asyncio.gather(*(pool.get("/ping") for _ in range(4)))
        start = time.perf_counter() + 0.05
        window.started = start
        results = await asyncio.wait_for(
            asyncio.gather(*(_route(pools[p], p, rate, start, duration, window) for p in ROUTES)),
            duration + 10,
        )
        window.ended = time.perf_counter()
    finally:
        for pool in pools.values():
            pool.close()
    return dict(zip(ROUTES, results, strict=True)), window, sum(p.opened for p in pools.values())


# -- report ----------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


@dataclass
class Phase:
    title: str
    results: dict[str, RouteResult]
    connections: int
    agent_cpu_s: float
    busy_s: float  # the install ran from the start of the window until this offset
    busy_text: str


def _agent_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _ssh_summary(window: Window) -> tuple[float, str]:
    """How long the agent's create was still installing during the window, and the timeline."""
    spans: list[tuple[str, float, float]] = []
    for at, status, ssh in sorted(window.ssh_seen):
        label = f"{status}/ssh {ssh}"
        if spans and spans[-1][0] == label:
            spans[-1] = (label, spans[-1][1], at)
        else:
            spans.append((label, at, at))
    busy = max(
        (last for label, _, last in spans if label.startswith("pending") or "installing" in label),
        default=0.0,
    )
    text = ", ".join(f"{label} {first:.1f}-{last:.1f} s" for label, first, last in spans)
    return busy, text or "no GET /instances answer seen"


def _measure(agent: AgentProc, secret: str, args: argparse.Namespace) -> tuple[Any, ...]:
    assert agent.proc is not None
    cpu = _agent_cpu_s(agent.proc.pid)
    results, window, connections = asyncio.run(
        run_load(agent.port, secret, args.rate, args.duration)
    )
    if agent.proc.poll() is not None:
        raise BenchError(f"the agent exited with {agent.proc.returncode} under load")
    return results, window, connections, _agent_cpu_s(agent.proc.pid) - cpu


def phase_agent(agent: AgentProc, secret: str, args: argparse.Namespace) -> Phase:
    """(a) The load while the agent creates an instance and installs OpenSSH in it."""
    with httpx.Client(
        base_url=agent.url, headers={"X-Agent-Secret": secret}, timeout=30, trust_env=False
    ) as client:
        created = client.post("/instances", json={**IMAGE, "ssh_enabled": True})
        if created.status_code != 202:
            raise BenchError(f"create refused: {created.status_code} {created.text}")
        results, window, connections, cpu = _measure(agent, secret, args)
        deleted = client.delete("/instances")
        if deleted.status_code != 200:
            raise BenchError(f"delete refused: {deleted.status_code} {deleted.text}")
    busy, text = _ssh_summary(window)
    return Phase("(a) agent creating + SSH install", results, connections, cpu, busy, text)


def _settled_instance(client: httpx.Client) -> None:
    """An instance that is up and done with SSH (on busybox the agent's own sshd is
    ready at once), so GET /instances answers as much as during (a)."""
    created = client.post("/instances", json={**IDLE_IMAGE, "ssh_enabled": True})
    if created.status_code != 202:
        raise BenchError(f"create refused: {created.status_code} {created.text}")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        data = client.get("/instances").json()["data"]
        if data["status"] == "running" and (data.get("ssh") or {}).get("status") in (
            "ready",
            "failed",
        ):
            return
        if data["status"] == "error":
            raise BenchError(f"the baseline instance failed: {data.get('reason')}")
        time.sleep(0.1)
    raise BenchError("the baseline instance did not settle within 60 s")


def phase_baseline(agent: AgentProc, secret: str, args: argparse.Namespace, token: str) -> Phase:
    """(b) The same load on the agent holding a settled instance, while a plain
    `docker run` does the same apt install."""
    with httpx.Client(
        base_url=agent.url, headers={"X-Agent-Secret": secret}, timeout=30, trust_env=False
    ) as client:
        _settled_instance(client)
        try:
            return _baseline_load(agent, secret, args, token)
        finally:
            client.delete("/instances")


def _baseline_load(agent: AgentProc, secret: str, args: argparse.Namespace, token: str) -> Phase:
    script = (
        "apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive"
        " apt-get install -y -q --no-install-recommends openssh-server >/dev/null"
    )
    install = subprocess.Popen(
        ["docker", "run", "--rm", "--label", f"{LOAD_LABEL}={token}",
         f"{IMAGE['image']}:{IMAGE['image_tag']}", "sh", "-c", script],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    exited: list[float] = []

    def watch() -> None:
        install.wait()
        exited.append(time.perf_counter())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        results, window, connections, cpu = _measure(agent, secret, args)
    finally:
        _remove_baseline(token)
        install.wait(30)
    if exited and exited[0] < window.ended:
        busy = max(0.0, min(exited[0] - window.started, args.duration))
        text = f"ended at {busy:.1f} s, exit {install.returncode}"
    else:
        busy, text = args.duration, "still running at the end"
    return Phase("(b) settled agent, docker apt install", results, connections, cpu, busy, text)


def _remove_baseline(token: str) -> None:
    problems = remove_containers(set(), [f"label={LOAD_LABEL}={token}"])
    if problems:
        raise BenchError("; ".join(problems))


def _row(result: RouteResult, busy_s: float) -> dict[str, Any]:
    lat = result.latencies_ms
    during = [ms for ms, due in zip(lat, result.due_s, strict=True) if due < busy_s]
    return {
        "sent": len(lat) + len(result.errors),
        "p50_ms": percentile(lat, 50),
        "p90_ms": percentile(lat, 90),
        "p99_ms": percentile(lat, 99),
        "max_ms": max(lat) if lat else math.nan,
        "install_requests": len(during),
        "install_p50_ms": percentile(during, 50),
        "install_p99_ms": percentile(during, 99),
        "errors": len(result.errors),
        "generator_late_p99_ms": percentile(result.lateness_ms, 99),
    }


def report(phases: list[Phase], args: argparse.Namespace) -> tuple[bool, dict[str, Any]]:
    print()
    print(
        f"load: GET {' and GET '.join(ROUTES)} at {args.rate:g} req/s each, {args.duration:g} s"
        " per phase, open loop; latency from the due time to the answer (ms);"
        " 'inst' columns: only the requests due while the install ran"
    )
    columns = ("p50_ms", "p90_ms", "p99_ms", "max_ms", "install_p50_ms", "install_p99_ms")
    print(
        f"  {'phase':<40}{'route':<12}{'sent':>6}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>8}"
        f"{'inst p50':>10}{'inst p99':>10}{'errors':>8}"
    )
    figures: dict[str, Any] = {
        "rate_per_route": args.rate,
        "duration_s": args.duration,
        "target_p99_ms": args.target_ms,
        "phases": {},
    }
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    for phase in phases:
        key = phase.title[1]  # "a", "b"
        rows[key] = {path: _row(result, phase.busy_s) for path, result in phase.results.items()}
        for n, (path, row) in enumerate(rows[key].items()):
            widths = (8, 8, 8, 8, 10, 10)
            print(
                f"  {phase.title if n == 0 else '':<40}{path:<12}{row['sent']:>6}"
                + "".join(f"{row[k]:>{w}.2f}" for k, w in zip(columns, widths, strict=True))
                + f"{row['errors']:>8}"
            )
            for error in sorted(set(phase.results[path].errors))[:3]:
                print(f"      error: {error}")
        figures["phases"][key] = {
            "agent_cpu_s": round(phase.agent_cpu_s, 2),
            "install_busy_s": round(phase.busy_s, 1),
            "install": phase.busy_text,
            "connections": phase.connections,
            "routes": {
                path: {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}
                for path, row in rows[key].items()
            },
        }
    for phase in phases:
        late = percentile([x for r in phase.results.values() for x in r.lateness_ms], 99)
        print(
            f"  {phase.title[:3]} install ran 0-{phase.busy_s:.1f} s of {args.duration:g} s"
            f" ({phase.busy_text}); agent CPU {phase.agent_cpu_s:.2f} s;"
            f" generator lateness p99 {late:.2f} ms"
        )
    a = rows["a"]
    complete = all(
        not r.errors and len(r.latencies_ms) == int(args.rate * args.duration)
        for r in phases[0].results.values()
    )
    overlapped = phases[0].busy_s >= 1.0
    worst = {p: max(row["p99_ms"], row["install_p99_ms"]) for p, row in a.items()}
    ok = complete and overlapped and all(v <= args.target_ms for v in worst.values())
    if not overlapped:
        print("  (a) the SSH install did not overlap the window: nothing was measured under it")
    if "b" in rows:
        print(
            "  p99 while installing, (a) over (b): "
            + ", ".join(
                f"GET {p} {a[p]['install_p99_ms'] - rows['b'][p]['install_p99_ms']:+.2f} ms"
                for p in ROUTES
            )
        )
    verdict = "PASS" if ok else "FAIL"
    print(
        "p99 (a), whole window / while installing: "
        + ", ".join(
            f"GET {p} {a[p]['p99_ms']:.2f} / {a[p]['install_p99_ms']:.2f} ms" for p in ROUTES
        )
        + f"; target: at most {args.target_ms:g} ms, no errors   {verdict}"
    )
    figures["pass"] = ok
    return ok, figures


# -- main ------------------------------------------------------------------------


def _cleanup(agent: AgentProc, token: str) -> list[str]:
    client = None
    with contextlib.suppress(OSError):  # no secret yet: the agent never got that far
        client = agent.client(timeout=30)
    return teardown(agent, client, set(), f"label={LOAD_LABEL}={token}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rate", type=float, default=200.0, help="requests/s per route")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load per phase")
    parser.add_argument("--target-ms", type=float, default=20.0, help="p99 target (ms)")
    parser.add_argument("--no-baseline", action="store_true", help="skip phase (b)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if not (0 < args.rate <= 2000 and 1 <= args.duration <= 300):
        parser.error("--rate must be in (0, 2000] and --duration in [1, 300]")

    interrupt_on_signals()
    workdir = Path(tempfile.mkdtemp(prefix="qudata-load-"))
    token = uuid.uuid4().hex
    agent = AgentProc(workdir, PORT_RANGE, log_level="INFO")
    code = 2
    try:
        need_images(*(f"{image['image']}:{image['image_tag']}" for image in (IMAGE, IDLE_IMAGE)))
        agent.start()
        agent.wait_ready()
        secret = agent.secret()
        print(f"agent {agent.url}, id {agent.agent_id}; {os.cpu_count()} CPUs", flush=True)
        phases = [phase_agent(agent, secret, args)]
        print("(a) done", flush=True)
        if not args.no_baseline:
            phases.append(phase_baseline(agent, secret, args, token))
            print("(b) done", flush=True)
        ok, figures = report(phases, args)
        if args.json is not None:
            args.json.write_text(json.dumps(figures, indent=2) + "\n")
        code = 0 if ok else 1
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", file=sys.stderr)
        code = 130
    except (BenchError, OSError, httpx.HTTPError, subprocess.SubprocessError, TimeoutError) as e:
        print(f"\nbenchmark failed: {e}", file=sys.stderr)
        code = 2
    finally:
        with signals_ignored():
            problems = _cleanup(agent, token)
            shutil.rmtree(workdir, ignore_errors=True)
    return exit_code(code, problems)


if __name__ == "__main__":
    sys.exit(main())
