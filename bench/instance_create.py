"""Instance-creation latency: the QuData agent against a bare `docker run -d`.

What it measures, per run (default 10 runs, at least 10):

(a) agent: the real `qudata-agent run` process (standalone, its own temporary
    state directory, listening on 127.0.0.1 and a free port, instance ports
    from QUDATA_PORT_RANGE=21000-21999). The time from sending
    `POST /instances` (busybox, 1 CPU, 1 GiB, port 8080 published on an
    "auto" host port) until `GET /instances`, polled every 10 ms, first
    reports `running`. The instance is then deleted (not timed) and the
    script waits until the agent reports it `destroyed`.
(b) baseline: `docker run -d` of the same image with the same limits and a
    published port (`--cpus 1 --memory 1g --memory-swap 1g --shm-size 512m
    --pids-limit 4096 --init --cap-drop ALL --security-opt
    no-new-privileges:true -p <free port>:8080`), timed from the start of the
    `docker` process until it returns (the container is started by then);
    then `docker rm -f` (not timed).

(a) and (b) run in the same iteration and alternate their order (a-b, b-a,
...), so that drift (page cache, dockerd state, CPU frequency) hits both.
One untimed warm-up pair runs first (`--warmup 0` to skip it): the agent's
first Docker call also negotiates the API version and opens its connections.

It prints the median and p90 (nearest rank) of both, the ratio
median(a)/median(b) against the target of at most 1.2x with PASS or FAIL,
the raw samples in ms, and a breakdown of the agent's time taken from its
DEBUG log. Exit status: 0 PASS, 1 FAIL, 2 error, 130 interrupted.

Everything it makes is removed on the way out, also on Ctrl-C, SIGTERM or an
error: the agent's instance (DELETE, then `docker rm -f` of every container
labelled with this agent's id), the baseline containers (labelled
`qudata.bench=1` and `qudata.bench.run=<this run's token>`, so that a
concurrent run is left alone), the agent process and the temporary directory.
All HTTP traffic goes to 127.0.0.1 (proxy variables are ignored).

Needs a running Docker engine and the local image `qudata-test/busybox:1`
(`scripts/build-test-images.sh` builds it). Run from the repository root:

    .venv/bin/python bench/instance_create.py [--runs N] [--warmup N] [--agent-log FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

IMAGE = "qudata-test/busybox"
TAG = "1"
PORT_RANGE = (21000, 21999)
POLL_S = 0.010
TARGET_RATIO = 1.2
MIN_RUNS = 10
STEP_TIMEOUT_S = 60.0
CREATE_BODY: dict[str, Any] = {
    "image": IMAGE,
    "image_tag": TAG,
    "env_variables": {"QUDATA_CPU_CORES": "1", "QUDATA_MEMORY_GB": "1"},
    "ports": {"8080": "auto"},
}
BENCH_LABEL = "qudata.bench=1"
RUN_LABEL_KEY = "qudata.bench.run"
AGENT_LABEL_KEY = "qudata.agent_id"


class BenchError(Exception):
    """Something the benchmark could not do; the message says what."""


def free_port() -> int:
    """A free TCP port outside the agent's instance port range."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if not PORT_RANGE[0] <= port <= PORT_RANGE[1]:
            return port


def docker(*args: str, timeout: float = STEP_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """Runs the docker CLI (in its own session, so Ctrl-C does not reach it)."""
    return subprocess.run(
        ["docker", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,
        check=False,
    )


def agent_command() -> list[str]:
    exe = shutil.which("qudata-agent", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "qudata_agent"]


class Agent:
    """The real agent process, standalone, in a session of its own."""

    def __init__(self, workdir: Path) -> None:
        self.state_dir = workdir / "state"
        self.log_path = workdir / "agent.log"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.agent_id: str | None = None
        self._log_file: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("QUDATA_")}
        env.update(
            {
                "QUDATA_STATE_DIR": str(self.state_dir),
                "QUDATA_AGENT_HOST": "127.0.0.1",
                "QUDATA_AGENT_PORT": str(self.port),
                "QUDATA_PORT_RANGE": f"{PORT_RANGE[0]}-{PORT_RANGE[1]}",
                "QUDATA_LOG_LEVEL": "DEBUG",
                "QUDATA_LOG_FORMAT": "json",
            }
        )
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [*agent_command(), "run"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C is ours to handle; the agent is stopped in order
        )

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(trust_env=False, timeout=1.0) as client:
            while time.monotonic() < deadline:
                self.check_alive()
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(self.url + "/ping").status_code == 200:
                        self.agent_id = self._read_agent_id()
                        return
                time.sleep(0.05)
        raise BenchError(f"the agent did not answer /ping within {timeout:g} s\n{self.tail()}")

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(f"the agent exited with {self.proc.returncode}\n{self.tail()}")

    def _read_agent_id(self) -> str | None:
        """The agent's id (the label on its containers), read-only from its database."""
        uri = f"file:{self.state_dir / 'agent.db'}?mode=ro"
        try:
            with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=5)) as db:
                row = db.execute("SELECT value FROM meta WHERE key = 'agent_id'").fetchone()
        except sqlite3.Error:
            return None
        return str(row[0]) if row else None

    def secret(self) -> str:
        return (self.state_dir / "agent_secret").read_text().strip()

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def records(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if not self.log_path.exists():
            return out
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    out.append(record)
        return out

    def tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return "(no agent log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class AgentSample:
    total_ms: float
    post_ms: float  # the POST round trip, client side
    sent_at: float  # wall clock when the POST was sent (to line up with the log)
    running_at: float  # wall clock when a GET first said running
    instance_id: str
    get_ms: list[float]  # round trip of each GET /instances while waiting


@dataclass
class Bench:
    agent: Agent
    token: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    client: httpx.Client | None = None
    agent_samples: list[AgentSample] = field(default_factory=list)
    docker_samples: list[float] = field(default_factory=list)
    container_ids: set[str] = field(default_factory=set)
    inflight: subprocess.Popen[str] | None = None

    def connect(self) -> None:
        self.client = httpx.Client(
            base_url=self.agent.url,
            headers={"X-Agent-Secret": self.agent.secret()},
            timeout=STEP_TIMEOUT_S,
            trust_env=False,
        )

    def _api(self) -> httpx.Client:
        assert self.client is not None
        return self.client

    def _state(self, timings: list[float] | None = None) -> dict[str, Any]:
        t0 = time.perf_counter()
        resp = self._api().get("/instances")
        if timings is not None:
            timings.append((time.perf_counter() - t0) * 1000)
        if resp.status_code != 200:
            raise BenchError(f"GET /instances answered {resp.status_code}: {resp.text}")
        data: dict[str, Any] = resp.json()["data"]
        return data

    def _poll(self, until: str, timings: list[float] | None = None) -> dict[str, Any]:
        """Polls GET /instances every POLL_S until `until`; the state that said so."""
        deadline = time.monotonic() + STEP_TIMEOUT_S
        next_poll = time.perf_counter()
        while True:
            state = self._state(timings)
            if state["status"] == until:
                return state
            if state["status"] == "error":
                raise BenchError(f"the instance failed: {state.get('reason')}")
            if time.monotonic() > deadline:
                raise BenchError(f"no {until!r} within {STEP_TIMEOUT_S:g} s: {state}")
            next_poll += POLL_S
            delay = next_poll - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            else:
                next_poll = time.perf_counter()

    def run_agent(self) -> AgentSample:
        api = self._api()
        sent_at = time.time()
        t0 = time.perf_counter()
        resp = api.post("/instances", json=CREATE_BODY)
        post_ms = (time.perf_counter() - t0) * 1000
        if resp.status_code != 202:
            raise BenchError(f"POST /instances answered {resp.status_code}: {resp.text}")
        get_ms: list[float] = []
        state = self._poll("running", get_ms)
        total_ms = (time.perf_counter() - t0) * 1000
        running_at = time.time()
        if state.get("container_id"):
            self.container_ids.add(str(state["container_id"]))
        deleted = api.delete("/instances")
        if deleted.status_code != 200:
            raise BenchError(f"DELETE /instances answered {deleted.status_code}: {deleted.text}")
        self._poll("destroyed")
        return AgentSample(
            total_ms, post_ms, sent_at, running_at, str(state["instance_id"]), get_ms
        )

    def run_docker(self) -> float:
        cmd = [
            "docker", "run", "-d",
            "--cpus", "1", "--memory", "1g", "--memory-swap", "1g", "--shm-size", "512m",
            "--pids-limit", "4096", "--init", "--cap-drop", "ALL",
            "--security-opt", "no-new-privileges:true",
            "-p", f"{free_port()}:8080",
            "--label", BENCH_LABEL, "--label", f"{RUN_LABEL_KEY}={self.token}",
            f"{IMAGE}:{TAG}", "tail", "-f", "/dev/null",
        ]  # fmt: skip
        t0 = time.perf_counter()
        self.inflight = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # on Ctrl-C it finishes, then cleanup removes its container
        )
        out, err = self.inflight.communicate(timeout=STEP_TIMEOUT_S)
        elapsed_ms = (time.perf_counter() - t0) * 1000
        code = self.inflight.returncode
        self.inflight = None
        if code != 0:
            raise BenchError(f"docker run failed ({code}): {err.strip()}")
        cid = out.strip()
        self.container_ids.add(cid)
        removed = docker("rm", "-f", cid)
        if removed.returncode != 0:
            raise BenchError(f"docker rm -f {cid} failed: {removed.stderr.strip()}")
        self.container_ids.discard(cid)
        return elapsed_ms

    def iteration(self, index: int, record: bool) -> None:
        order = ("a", "b") if index % 2 == 0 else ("b", "a")
        for which in order:
            self.agent.check_alive()
            if which == "a":
                sample = self.run_agent()
                if record:
                    self.agent_samples.append(sample)
            else:
                elapsed = self.run_docker()
                if record:
                    self.docker_samples.append(elapsed)

    def cleanup(self) -> list[str]:
        """Removes everything this run made; the problems met on the way."""
        problems: list[str] = []
        if self.inflight is not None:  # a docker run cut short: let it finish first
            try:
                self.inflight.communicate(timeout=STEP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.inflight.kill()
                self.inflight.communicate()
            self.inflight = None
        if self.client is not None and self.agent.proc is not None:
            if self.agent.proc.poll() is None:
                try:
                    self.client.delete("/instances", timeout=30)
                except httpx.HTTPError as e:
                    problems.append(f"DELETE /instances: {e}")
            self.client.close()
        try:
            self.agent.stop()
        except Exception as e:
            problems.append(f"stopping the agent: {e}")
        ids = set(self.container_ids)
        filters = [f"label={RUN_LABEL_KEY}={self.token}"]
        if self.agent.agent_id:
            filters.append(f"label={AGENT_LABEL_KEY}={self.agent.agent_id}")
        for flt in filters:
            listed = docker("ps", "-aq", "--no-trunc", "--filter", flt)
            if listed.returncode == 0:
                ids.update(listed.stdout.split())
            else:
                problems.append(f"docker ps --filter {flt}: {listed.stderr.strip()}")
        if ids:
            removed = docker("rm", "-f", "-v", *sorted(ids))
            gone = "No such container"
            if removed.returncode != 0 and gone not in removed.stderr:
                problems.append(f"docker rm -f: {removed.stderr.strip()}")
        return problems


def p90(samples: list[float]) -> float:
    """The 90th percentile, nearest rank (for 10 samples: the 9th smallest)."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]


def _log_time(record: dict[str, Any]) -> float | None:
    ts = record.get("ts")
    if not isinstance(ts, str):
        return None
    try:
        return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def breakdown(agent: Agent, samples: list[AgentSample]) -> list[str]:
    """Where the agent's time went, from its log (timestamps have 1 ms resolution)."""
    accepted: dict[str, float] = {}
    up: dict[str, float] = {}
    for record in agent.records():
        when = _log_time(record)
        iid = record.get("instance_id")
        if when is None or not isinstance(iid, str):
            continue
        if record.get("msg") == "instance accepted":
            accepted[iid] = when
        elif record.get("msg") == "instance up":
            up[iid] = when
    rows: dict[str, list[float]] = {
        "POST round trip (client)": [s.post_ms for s in samples],
        "send -> 'instance accepted' logged": [],
        "'accepted' -> 'instance up' (build)": [],
        "'instance up' -> GET saw running": [],
    }
    for s in samples:
        if s.instance_id in accepted and s.instance_id in up:
            rows["send -> 'instance accepted' logged"].append(
                (accepted[s.instance_id] - s.sent_at) * 1000
            )
            rows["'accepted' -> 'instance up' (build)"].append(
                (up[s.instance_id] - accepted[s.instance_id]) * 1000
            )
            rows["'instance up' -> GET saw running"].append(
                (s.running_at - up[s.instance_id]) * 1000
            )
    lines = []
    for name, values in rows.items():
        if values:
            lines.append(f"  {name:<38} median {statistics.median(values):7.1f} ms")
    gets = [ms for s in samples for ms in s.get_ms]
    if gets:
        lines.append(
            f"  {'GET /instances round trip (client)':<38} median {statistics.median(gets):7.1f} ms"
            f"  ({len(gets)} polls; a GET slower than the {POLL_S * 1000:g} ms poll interval"
            " sets the real resolution)"
        )
    return lines


def report(bench: Bench, runs: int, warmup: int, docker_version: str) -> bool:
    a = [s.total_ms for s in bench.agent_samples]
    b = bench.docker_samples
    ratio = statistics.median(a) / statistics.median(b)
    passed = ratio <= TARGET_RATIO

    def fmt(values: list[float]) -> str:
        return "[" + ", ".join(f"{v:.1f}" for v in values) + "]"

    print()
    print(f"instance create: {runs} runs (+{warmup} warm-up), Docker {docker_version}")
    print(f"{'':22}{'median':>10}{'p90':>10}{'min':>10}{'max':>10}")
    for name, values in (("(a) agent", a), ("(b) docker run -d", b)):
        print(
            f"{name:22}{statistics.median(values):8.1f}ms{p90(values):8.1f}ms"
            f"{min(values):8.1f}ms{max(values):8.1f}ms"
        )
    verdict = "PASS" if passed else "FAIL"
    print(f"ratio median(a)/median(b) = {ratio:.3f}x   target: at most {TARGET_RATIO}x   {verdict}")
    print("raw samples (ms, in run order):")
    print(f"  (a) agent:        {fmt(a)}")
    print(f"  (b) docker run:   {fmt(b)}")
    lines = breakdown(bench.agent, bench.agent_samples)
    if lines:
        print("agent breakdown (medians; from its DEBUG log):")
        print("\n".join(lines))
    return passed


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def preflight() -> str:
    version = docker("version", "--format", "{{.Server.Version}}")
    if version.returncode != 0:
        raise BenchError(f"Docker is not reachable: {version.stderr.strip()}")
    if docker("image", "inspect", f"{IMAGE}:{TAG}").returncode != 0:
        raise BenchError(
            f"the image {IMAGE}:{TAG} is missing; build it with scripts/build-test-images.sh"
        )
    return version.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=MIN_RUNS, help="timed runs (at least 10)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    parser.add_argument("--agent-log", type=Path, help="keep a copy of the agent's log here")
    args = parser.parse_args(argv)
    if args.runs < MIN_RUNS:
        parser.error(f"--runs must be at least {MIN_RUNS}")
    if args.warmup < 0:
        parser.error("--warmup must not be negative")

    signal.signal(signal.SIGTERM, _interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="qudata-bench-"))
    agent = Agent(workdir)
    bench = Bench(agent)
    code = 2
    try:
        docker_version = preflight()
        agent.start()
        agent.wait_ready()
        bench.connect()
        print(
            f"agent pid {agent.proc.pid if agent.proc else '?'} on {agent.url},"
            f" agent id {agent.agent_id}; baseline label {RUN_LABEL_KEY}={bench.token}",
            flush=True,
        )
        for i in range(args.warmup + args.runs):
            record = i >= args.warmup
            bench.iteration(i - args.warmup if record else i, record)
            print("." if record else "w", end="", flush=True)
        code = 0 if report(bench, args.runs, args.warmup, docker_version) else 1
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", file=sys.stderr)
        code = 130
    except (BenchError, OSError, httpx.HTTPError, subprocess.SubprocessError) as e:
        proc = agent.proc
        gone = (
            f" (the agent exited with {proc.returncode})"
            if proc and proc.poll() is not None
            else ""
        )
        print(f"\nbenchmark failed: {e}{gone}", file=sys.stderr)
        code = 2
    finally:
        with _signals_ignored():
            problems = bench.cleanup()
            if args.agent_log is not None and agent.log_path.exists():
                with contextlib.suppress(OSError):
                    shutil.copyfile(agent.log_path, args.agent_log)
            shutil.rmtree(workdir, ignore_errors=True)
        for problem in problems:
            print(f"cleanup: {problem}", file=sys.stderr)
        if problems and code in (0, 1):
            code = 2
    return code


if __name__ == "__main__":
    sys.exit(main())
