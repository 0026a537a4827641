"""API latency while the agent is busy: p50/p99 of GET /ping and GET /instances.

What it does (everything on 127.0.0.1):

1. starts the real `qudata-agent run` (standalone, a temporary state
   directory, a free port, instance ports from 25000-25499,
   QUDATA_MAX_INSTANCES=8 and QUDATA_RESERVED_CPU_CORES=0 so that eight
   instances of 0.2 cores fit a small host);
2. phase (a): the heaviest thing the agent does while serving, over and over
   for the whole window: a burst of `--burst` (default 8) `POST
   /v1/instances` sent at once, half `qudata-test/busybox:1` and half
   `qudata-test/debian:12`, `ssh_enabled` on every other one (the agent puts
   its own sshd into the container), 0.2 cores each, polled through `GET
   /v1/instances` every 50 ms until every one is running and done with SSH,
   then their `DELETE /v1/instances/{id}` sent at once; then the next burst,
   until the window has ended. Meanwhile, for `--duration` seconds (default
   20), it sends `GET /ping` and `GET /instances` at `--rate` requests per
   second each (default 200, so 400 in all), open loop: request i of a route
   is due at start + i/rate whatever the earlier ones did, over a pool of
   kept-alive connections (a new one opens when all are busy, at most 256;
   a request that would need more counts as an error).
   Latency runs from the due time to the last byte of the answer, so a stall
   also counts against every request that should have gone out during it (no
   coordinated omission). The bursts are driven from a thread of their own
   with its own event loop, so the generator's loop carries only the load;
3. phase (b), the baseline (`--no-baseline` skips it): the agent holds a
   settled instance (busybox with `ssh_enabled`, so `GET /instances` answers
   an instance view as in (a)), while plain `docker run -d` does the same
   bursts of the same images (`--cpus 0.2`, a sleep as the command) and
   `docker rm -f` removes them, under the same load. What Docker's own work
   (dockerd, containerd, runc) does to every process on the host shows in
   (b); what the agent's create and delete work adds is (a) minus (b);
4. prints p50, p90, p99 and max per route and phase, the same over only the
   requests due while a burst was in flight ("busy"), the errors, the agent's
   CPU time, how late the generator itself was and what the bursts did (how
   many, instances created, the SSH states they settled in). PASS when in (a)
   both p99, over the window and while busy, are at most `--target-ms` (20),
   no request failed and the bursts covered at least 90% of the window (a run
   where they did not measured nothing under load, and is not a pass).

Bounded: at most rate x duration requests per route and phase, a hard stop at
duration + 10 s, each request times out after 5 s, a burst that has not
settled within 60 s ends the run with an error. Cleanup on any exit (Ctrl-C
and SIGTERM included): DELETE of the agent's instances, `docker rm -f` of
every container labelled with this agent's id and of the baseline's
(`qudata.bench.load=<token>`), the agent process and the temporary
directory. Exit status: 0 PASS, 1 FAIL, 2 error, 130 interrupted.
`--json FILE` also writes the figures (bench/reliability_report.py reads it).

Needs a running Docker engine, the local images `qudata-test/debian:12` and
`qudata-test/busybox:1` (`scripts/build-test-images.sh`) and what the agent's
SSH bundle is made from (`openssh-server`, `patchelf`, `busybox-static`).
About 50 s with the defaults. Run from the repository root:

    .venv/bin/python bench/load.py [--rate 200] [--duration 20] [--burst 8]
        [--no-baseline] [--json FILE]
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
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from _common import (
    AgentProc,
    BenchError,
    docker,
    exit_code,
    interrupt_on_signals,
    need_images,
    remove_containers,
    run_cmd,
    signals_ignored,
    teardown,
)

IMAGES = (
    {"image": "qudata-test/busybox", "image_tag": "1"},
    {"image": "qudata-test/debian", "image_tag": "12"},
)
IDLE_IMAGE = IMAGES[0]
CPU_CORES = "0.2"
MAX_INSTANCES = 8
PORT_RANGE = (25000, 25499)
ROUTES = ("/ping", "/instances")
MAX_CONNECTIONS = 256
LOAD_LABEL = "qudata.bench.load"
REQUEST_TIMEOUT_S = 5.0
POLL_S = 0.05
SETTLE_TIMEOUT_S = 60.0
MIN_BUSY_SHARE = 0.9  # of the window, covered by bursts in flight


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


async def _one(pool: Pool, path: str, due: float, result: RouteResult, window: Window) -> None:
    result.lateness_ms.append((time.perf_counter() - due) * 1000)
    try:
        status, body = await asyncio.wait_for(pool.get(path), REQUEST_TIMEOUT_S)
    except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError, BenchError) as e:
        result.errors.append(f"{type(e).__name__}: {e}")
        return
    result.latencies_ms.append((time.perf_counter() - due) * 1000)
    result.due_s.append(due - window.started)
    if status != 200:
        result.errors.append(f"HTTP {status}")
    elif not json.loads(body).get("ok"):
        result.errors.append(f"not ok: {body[:80]!r}")


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
        task = asyncio.create_task(_one(pool, path, due, result, window))
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


# -- the busy work ---------------------------------------------------------------


def burst_orders(count: int) -> list[dict[str, Any]]:
    """The creates of one burst: busybox and Debian in turn, SSH on every other pair,
    so that each image comes with and without it."""
    return [
        {
            **IMAGES[i % 2],
            "ssh_enabled": (i // 2) % 2 == 0,
            "env_variables": {"QUDATA_CPU_CORES": CPU_CORES},
        }
        for i in range(count)
    ]


def _kind(order: dict[str, Any]) -> str:
    return str(order["image"]).rsplit("/", 1)[-1]


class Churn:
    """Bursts of creates and deletes, back to back in a thread of their own, from
    start() until stop(); the span of each finished burst, in perf_counter time."""

    what = "bursts"

    def __init__(self, count: int) -> None:
        self.count = count
        self.spans: list[tuple[float, float]] = []
        self.created = 0
        self.settled: Counter[str] = Counter()
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="churn", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Lets the burst in flight finish (its instances deleted) and waits for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2 * SETTLE_TIMEOUT_S + 30)
            if self._thread.is_alive():
                self.error = self.error or "the last burst did not finish"

    def stopping(self) -> bool:
        return self._stop.is_set()

    def _run(self) -> None:
        try:
            self.run()
        except (
            BenchError,
            OSError,
            ValueError,
            KeyError,
            httpx.HTTPError,
            subprocess.SubprocessError,
        ) as e:
            self.error = f"{type(e).__name__}: {e}"

    def run(self) -> None:
        raise NotImplementedError

    def summary(self) -> str:
        lengths = [end - begin for begin, end in self.spans]
        median = f", {statistics.median(lengths):.2f} s each (median)" if lengths else ""
        text = f"{len(self.spans)} bursts of {self.count}, {self.created} {self.what}{median}"
        if self.settled:
            text += "; settled as " + ", ".join(
                f"{k} x{n}" for k, n in sorted(self.settled.items())
            )
        return text


class AgentChurn(Churn):
    """(a) Bursts of `POST /v1/instances`, until all run and are done with SSH, then
    their `DELETE /v1/instances/{id}`, all sent at once."""

    what = "instances created and deleted"

    def __init__(self, count: int, url: str, secret: str) -> None:
        super().__init__(count)
        self._url = url
        self._secret = secret

    def run(self) -> None:
        asyncio.run(self._bursts())

    async def _bursts(self) -> None:
        limits = httpx.Limits(max_connections=self.count + 2, max_keepalive_connections=self.count)
        async with httpx.AsyncClient(
            base_url=self._url,
            headers={"X-Agent-Secret": self._secret},
            timeout=SETTLE_TIMEOUT_S,
            trust_env=False,
            limits=limits,
        ) as client:
            while not self.stopping():
                began = time.perf_counter()
                await self._burst(client)
                self.spans.append((began, time.perf_counter()))

    async def _burst(self, client: httpx.AsyncClient) -> None:
        orders = burst_orders(self.count)

        async def post(order: dict[str, Any]) -> str:
            resp = await client.post("/v1/instances", json=order)
            if resp.status_code != 202:
                raise BenchError(f"POST /v1/instances answered {resp.status_code}: {resp.text}")
            return str(resp.json()["data"]["instance_id"])

        ids = await asyncio.gather(*(post(order) for order in orders))
        self.created += len(ids)
        kinds = dict(zip(ids, map(_kind, orders), strict=True))
        try:
            await self._settle(client, kinds)
        finally:
            await asyncio.gather(*(self._delete(client, iid) for iid in ids))

    async def _settle(self, client: httpx.AsyncClient, kinds: dict[str, str]) -> None:
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while True:
            resp = await client.get("/v1/instances")
            if resp.status_code != 200:
                raise BenchError(f"GET /v1/instances answered {resp.status_code}: {resp.text}")
            views = {
                v["instance_id"]: v
                for v in resp.json()["data"]["instances"]
                if v["instance_id"] in kinds
            }
            for iid, view in views.items():
                if view["status"] == "error":
                    raise BenchError(f"instance {iid} ({kinds[iid]}) failed: {view.get('reason')}")
            ssh = {
                iid: (v.get("ssh") or {}).get("status") or "disabled" for iid, v in views.items()
            }
            if len(views) == len(kinds) and all(
                v["status"] == "running" and ssh[iid] != "installing" for iid, v in views.items()
            ):
                self.settled.update(f"{kinds[iid]} ssh {ssh[iid]}" for iid in views)
                return
            if time.monotonic() > deadline:
                states = sorted(f"{kinds[i]} {v['status']}/{ssh[i]}" for i, v in views.items())
                raise BenchError(f"a burst did not settle within {SETTLE_TIMEOUT_S:g} s: {states}")
            await asyncio.sleep(POLL_S)

    @staticmethod
    async def _delete(client: httpx.AsyncClient, instance_id: str) -> None:
        resp = await client.delete(f"/v1/instances/{instance_id}")
        if resp.status_code != 200:
            raise BenchError(f"DELETE {instance_id} answered {resp.status_code}: {resp.text}")


class DockerChurn(Churn):
    """(b) The same bursts by hand: `docker run -d` of the same images at once, then
    one `docker rm -f` of them."""

    what = "containers run and removed"

    def __init__(self, count: int, token: str, network: str) -> None:
        super().__init__(count)
        self._token = token
        self._network = network

    def run(self) -> None:
        with ThreadPoolExecutor(self.count) as pool:
            while not self.stopping():
                began = time.perf_counter()
                self._burst(pool)
                self.spans.append((began, time.perf_counter()))

    def _burst(self, pool: ThreadPoolExecutor) -> None:
        argvs = [
            ["docker", "run", "-d", "--label", f"{LOAD_LABEL}={self._token}",
             "--network", self._network, "--cpus", CPU_CORES,
             f"{order['image']}:{order['image_tag']}", "sleep", "3600"]
            for order in burst_orders(self.count)
        ]  # fmt: skip
        done = list(pool.map(run_cmd, argvs))
        ids = {d.stdout.strip() for d in done if d.returncode == 0 and d.stdout.strip()}
        self.created += len(ids)
        problems = remove_containers(ids, [])
        failed = [d.stderr.strip() for d in done if d.returncode != 0]
        if failed or problems:
            raise BenchError("; ".join([*failed[:1], *problems]))


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
    spans: list[tuple[float, float]]  # the bursts, in seconds from the start of the window
    busy_s: float  # how much of the window a burst was in flight
    busy_text: str


def _agent_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _measure(
    agent: AgentProc, secret: str, args: argparse.Namespace, churn: Churn, title: str
) -> Phase:
    """The load for one window while `churn` runs its bursts, from before the window
    opens until after it has closed."""
    assert agent.proc is not None
    cpu = _agent_cpu_s(agent.proc.pid)
    churn.start()
    try:
        results, window, connections = asyncio.run(
            run_load(agent.port, secret, args.rate, args.duration)
        )
    finally:
        churn.stop()
    if agent.proc.poll() is not None:
        raise BenchError(f"the agent exited with {agent.proc.returncode} under load")
    if churn.error:
        raise BenchError(f"the bursts of {title} failed: {churn.error}")
    cpu = _agent_cpu_s(agent.proc.pid) - cpu
    spans = [(begin - window.started, end - window.started) for begin, end in churn.spans]
    busy = sum(max(0.0, min(end, args.duration) - max(begin, 0.0)) for begin, end in spans)
    return Phase(title, results, connections, cpu, spans, busy, churn.summary())


def phase_agent(agent: AgentProc, secret: str, args: argparse.Namespace) -> Phase:
    """(a) The load while the agent creates and deletes bursts of instances."""
    churn = AgentChurn(args.burst, agent.url, secret)
    return _measure(agent, secret, args, churn, "(a) agent creating + deleting")


def _settled_instance(client: httpx.Client) -> str:
    """An instance that is up and done with SSH (on busybox the agent's own sshd is
    ready at once), so GET /instances answers an instance as during (a); its network."""
    created = client.post("/instances", json={**IDLE_IMAGE, "ssh_enabled": True})
    if created.status_code != 202:
        raise BenchError(f"create refused: {created.status_code} {created.text}")
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while time.monotonic() < deadline:
        data = client.get("/instances").json()["data"]
        if data["status"] == "running" and (data.get("ssh") or {}).get("status") in (
            "ready",
            "failed",
        ):
            return _network_of(str(data["container_id"]))
        if data["status"] == "error":
            raise BenchError(f"the baseline instance failed: {data.get('reason')}")
        time.sleep(0.1)
    raise BenchError(f"the baseline instance did not settle within {SETTLE_TIMEOUT_S:g} s")


def _network_of(container_id: str) -> str:
    inspected = docker("inspect", "--format", "{{.HostConfig.NetworkMode}}", container_id)
    if inspected.returncode != 0 or not inspected.stdout.strip():
        raise BenchError(f"docker inspect {container_id}: {inspected.stderr.strip()}")
    return inspected.stdout.strip()


def phase_baseline(agent: AgentProc, secret: str, args: argparse.Namespace, token: str) -> Phase:
    """(b) The same load on the agent holding a settled instance, while plain
    `docker run -d` and `docker rm -f` do the same bursts on the agent's network."""
    with httpx.Client(
        base_url=agent.url, headers={"X-Agent-Secret": secret}, timeout=30, trust_env=False
    ) as client:
        network = _settled_instance(client)
        try:
            churn = DockerChurn(args.burst, token, network)
            return _measure(agent, secret, args, churn, "(b) settled agent, docker bursts")
        finally:
            client.delete("/instances")
            _remove_baseline(token)


def _remove_baseline(token: str) -> None:
    problems = remove_containers(set(), [f"label={LOAD_LABEL}={token}"])
    if problems:
        raise BenchError("; ".join(problems))


def _row(result: RouteResult, spans: list[tuple[float, float]]) -> dict[str, Any]:
    lat = result.latencies_ms
    during = [
        ms
        for ms, due in zip(lat, result.due_s, strict=True)
        if any(begin <= due < end for begin, end in spans)
    ]
    return {
        "sent": len(lat) + len(result.errors),
        "p50_ms": percentile(lat, 50),
        "p90_ms": percentile(lat, 90),
        "p99_ms": percentile(lat, 99),
        "max_ms": max(lat) if lat else math.nan,
        "busy_requests": len(during),
        "busy_p50_ms": percentile(during, 50),
        "busy_p99_ms": percentile(during, 99),
        "errors": len(result.errors),
        "generator_late_p99_ms": percentile(result.lateness_ms, 99),
    }


def report(phases: list[Phase], args: argparse.Namespace) -> tuple[bool, dict[str, Any]]:
    print()
    print(
        f"load: GET {' and GET '.join(ROUTES)} at {args.rate:g} req/s each, {args.duration:g} s"
        f" per phase, open loop, while bursts of {args.burst} creates and deletes run; latency"
        " from the due time to the answer (ms); 'busy' columns: only the requests due while a"
        " burst was in flight"
    )
    columns = ("p50_ms", "p90_ms", "p99_ms", "max_ms", "busy_p50_ms", "busy_p99_ms")
    print(
        f"  {'phase':<36}{'route':<12}{'sent':>6}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>8}"
        f"{'busy p50':>10}{'busy p99':>10}{'errors':>8}"
    )
    figures: dict[str, Any] = {
        "rate_per_route": args.rate,
        "duration_s": args.duration,
        "burst": args.burst,
        "target_p99_ms": args.target_ms,
        "phases": {},
    }
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    for phase in phases:
        key = phase.title[1]  # "a", "b"
        rows[key] = {path: _row(result, phase.spans) for path, result in phase.results.items()}
        for n, (path, row) in enumerate(rows[key].items()):
            widths = (8, 8, 8, 8, 10, 10)
            print(
                f"  {phase.title if n == 0 else '':<36}{path:<12}{row['sent']:>6}"
                + "".join(f"{row[k]:>{w}.2f}" for k, w in zip(columns, widths, strict=True))
                + f"{row['errors']:>8}"
            )
            for error in sorted(set(phase.results[path].errors))[:3]:
                print(f"      error: {error}")
        figures["phases"][key] = {
            "agent_cpu_s": round(phase.agent_cpu_s, 2),
            "busy_s": round(phase.busy_s, 1),
            "bursts": phase.busy_text,
            "connections": phase.connections,
            "routes": {
                path: {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}
                for path, row in rows[key].items()
            },
        }
    for phase in phases:
        late = percentile([x for r in phase.results.values() for x in r.lateness_ms], 99)
        print(
            f"  {phase.title[:3]} busy {phase.busy_s:.1f} of {args.duration:g} s"
            f" ({phase.busy_text}); agent CPU {phase.agent_cpu_s:.2f} s;"
            f" generator lateness p99 {late:.2f} ms"
        )
    a = rows["a"]
    complete = all(
        not r.errors and len(r.latencies_ms) == int(args.rate * args.duration)
        for r in phases[0].results.values()
    )
    overlapped = phases[0].busy_s >= MIN_BUSY_SHARE * args.duration
    worst = {p: max(row["p99_ms"], row["busy_p99_ms"]) for p, row in a.items()}
    ok = complete and overlapped and all(v <= args.target_ms for v in worst.values())
    if not overlapped:
        print(
            f"  (a) the bursts covered {phases[0].busy_s:.1f} s of the {args.duration:g} s window,"
            f" less than {MIN_BUSY_SHARE:.0%}: the window was not measured under load"
        )
    if "b" in rows:
        print(
            "  p99 while busy, (a) over (b): "
            + ", ".join(
                f"GET {p} {a[p]['busy_p99_ms'] - rows['b'][p]['busy_p99_ms']:+.2f} ms"
                for p in ROUTES
            )
        )
    verdict = "PASS" if ok else "FAIL"
    print(
        "p99 (a), whole window / while busy: "
        + ", ".join(f"GET {p} {a[p]['p99_ms']:.2f} / {a[p]['busy_p99_ms']:.2f} ms" for p in ROUTES)
        + f"; target: at most {args.target_ms:g} ms, no errors,"
        f" busy at least {MIN_BUSY_SHARE:.0%} of the window   {verdict}"
    )
    figures["pass"] = ok
    return ok, figures


# -- main ------------------------------------------------------------------------


def _cleanup(agent: AgentProc, token: str) -> list[str]:
    client = None
    with contextlib.suppress(OSError):  # no secret yet: the agent never got that far
        client = agent.client(timeout=30)
    problems: list[str] = []
    if client is not None and agent.running():
        try:
            for view in client.get("/v1/instances").json()["data"]["instances"]:
                client.delete(f"/v1/instances/{view['instance_id']}")
        except (httpx.HTTPError, ValueError, KeyError) as e:
            problems.append(f"deleting the instances: {e}")
    return problems + teardown(agent, client, set(), f"label={LOAD_LABEL}={token}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rate", type=float, default=200.0, help="requests/s per route")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load per phase")
    parser.add_argument("--burst", type=int, default=MAX_INSTANCES, help="creates per burst")
    parser.add_argument("--target-ms", type=float, default=20.0, help="p99 target (ms)")
    parser.add_argument("--no-baseline", action="store_true", help="skip phase (b)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if not (0 < args.rate <= 2000 and 1 <= args.duration <= 300):
        parser.error("--rate must be in (0, 2000] and --duration in [1, 300]")
    if not 1 <= args.burst <= MAX_INSTANCES:
        parser.error(f"--burst must be 1-{MAX_INSTANCES}")

    interrupt_on_signals()
    workdir = Path(tempfile.mkdtemp(prefix="qudata-load-"))
    token = uuid.uuid4().hex
    env = {"QUDATA_MAX_INSTANCES": str(MAX_INSTANCES), "QUDATA_RESERVED_CPU_CORES": "0"}
    agent = AgentProc(workdir, PORT_RANGE, log_level="INFO", env=env)
    code = 2
    try:
        need_images(*(f"{image['image']}:{image['image_tag']}" for image in IMAGES))
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
        print(f"\nbenchmark failed: {e}\n{agent.tail()}", file=sys.stderr)
        code = 2
    finally:
        with signals_ignored():
            problems = _cleanup(agent, token)
            shutil.rmtree(workdir, ignore_errors=True)
    return exit_code(code, problems)


if __name__ == "__main__":
    sys.exit(main())
