"""Instance-creation latency: the QuData agent against a bare `docker run -d`.

What it measures, per run (default 10 runs, at least 10):

(a) agent: the real `qudata-agent run` process (standalone, its own temporary
    state directory, listening on 127.0.0.1 and a free port, instance ports
    from QUDATA_PORT_RANGE=21000-21999). The time from sending
    `POST /v1/instances` (busybox, 1 CPU, 1 GiB, port 8080 published on an
    "auto" host port) until `GET /v1/instances/ID`, polled every 10 ms, first
    reports `running`. The instance is then deleted (not timed) and the
    script waits until it is gone.
(b) baseline, the floor: `docker run -d` of the same image with the same limits and a
    published port (`--cpus 1 --memory 1g --memory-swap 1g --shm-size 512m
    --pids-limit 4096 --init --cap-drop ALL --security-opt
    no-new-privileges:true -p <free port>:8080`) on a network like the one
    the agent puts its instances on (a bridge network of its own with
    inter-container traffic off, made by this script for the run), timed from
    the start of the `docker` process until it returns (the container is
    started by then); then `docker rm -f` (not timed).
(c) the same `docker run -d` on Docker's default bridge. Not the target's
    baseline: the agent walls its instances off on a network of their own,
    and Docker starts a container on any user-defined network more slowly
    than on the default bridge (it sets up its embedded DNS in the container;
    ~50 ms here). Printed so that cost stays in sight.

(a), (b) and (c) run in the same iteration in a rotating order (a-b-c, b-c-a,
...), so that drift (page cache, dockerd state, CPU frequency) hits both.
One untimed warm-up iteration runs first (`--warmup 0` to skip it): the agent's
first Docker call also negotiates the API version and opens its connections.

It prints the median and p90 (nearest rank) of each, the ratio
median(a)/median(b) against the target of at most 1.1x with PASS or FAIL,
the ratio median(a)/median(c) for information,
the raw samples in ms, and a breakdown of the agent's time taken from its
DEBUG log: the POST round trip, the build from "instance accepted" to
"instance up" with each of its steps as the agent timed them (its "build
step" lines: the image check, the records it writes, the network check, the
SSH files, Docker's create and start, the inspect after start), and the
delay until a GET saw `running`. `--loaded` first starts 8 idle busybox instances in the same
agent (0.1 CPU, 256 MiB each) and keeps them running, and registers the agent
with the recording fake control plane (tests/support/fake_cp.py), so the same
ratios are measured with the agent and Docker holding eight more and the
agent's stats reports ticking every 3 s (it prints how many came meanwhile).
Exit status: 0 PASS, 1 FAIL, 2 error, 130 interrupted.

Everything it makes is removed on the way out, also on Ctrl-C, SIGTERM or an
error: the agent's instance (DELETE, then `docker rm -f` of every container
labelled with this agent's id), the baseline containers and network (labelled
`qudata.bench=1` and `qudata.bench.run=<this run's token>`, so that a
concurrent run is left alone), the agent process and the temporary directory.
All HTTP traffic goes to 127.0.0.1 (proxy variables are ignored).

Needs a running Docker engine and the local image `qudata-test/busybox:1`
(`scripts/build-test-images.sh` builds it). Run from the repository root:

    .venv/bin/python bench/instance_create.py [--runs N] [--warmup N] [--loaded] [--agent-log FILE]
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from _common import (
    BENCH_LABEL,
    RUN_LABEL_KEY,
    STEP_TIMEOUT_S,
    AgentProc,
    BenchError,
    ControlPlane,
    docker,
    docker_version,
    exit_code,
    free_port,
    interrupt_on_signals,
    keep_log,
    need_images,
    parse_log_time,
    signals_ignored,
    teardown,
)

IMAGE = "qudata-test/busybox"
TAG = "1"
PORT_RANGE = (21000, 21999)
POLL_S = 0.010
TARGET_RATIO = 1.1
MIN_RUNS = 10
LOADED = 8  # idle instances kept running by --loaded
LOADED_AGENT_ENV = {"QUDATA_MAX_INSTANCES": "16", "QUDATA_RESERVED_CPU_CORES": "0"}
LOAD_ENV = {"QUDATA_CPU_CORES": "0.1", "QUDATA_MEMORY_GB": "0.25"}
CREATE_BODY: dict[str, Any] = {
    "image": IMAGE,
    "image_tag": TAG,
    "env_variables": {"QUDATA_CPU_CORES": "1", "QUDATA_MEMORY_GB": "1"},
    "ports": {"8080": "auto"},
}


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
    agent: AgentProc
    token: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    client: httpx.Client | None = None
    agent_samples: list[AgentSample] = field(default_factory=list)
    docker_samples: list[float] = field(default_factory=list)  # (b), on a network like the agent's
    bridge_samples: list[float] = field(default_factory=list)  # (c), the default bridge
    network: str | None = None
    container_ids: set[str] = field(default_factory=set)
    inflight: subprocess.Popen[str] | None = None
    # What (a) creates and (b)/(c) run: another script may point both at another image.
    create_body: dict[str, Any] = field(default_factory=lambda: dict(CREATE_BODY))
    image: str = f"{IMAGE}:{TAG}"

    def connect(self) -> None:
        self.client = self.agent.client()

    def make_network(self) -> None:
        """A bridge network like the agent's (inter-container traffic off) for (b)."""
        name = f"qudata-bench-{self.token}"
        made = docker(
            "network", "create", "--driver", "bridge",
            "--opt", "com.docker.network.bridge.enable_icc=false",
            "--label", BENCH_LABEL, "--label", f"{RUN_LABEL_KEY}={self.token}", name,
        )  # fmt: skip
        if made.returncode != 0:
            raise BenchError(f"docker network create failed: {made.stderr.strip()}")
        self.network = name

    def _api(self) -> httpx.Client:
        assert self.client is not None
        return self.client

    def _state(self, instance_id: str, timings: list[float] | None = None) -> dict[str, Any]:
        t0 = time.perf_counter()
        resp = self._api().get(f"/v1/instances/{instance_id}")
        if timings is not None:
            timings.append((time.perf_counter() - t0) * 1000)
        if resp.status_code == 404:
            return {"status": "destroyed"}
        if resp.status_code != 200:
            raise BenchError(f"GET /v1/instances/ID answered {resp.status_code}: {resp.text}")
        data: dict[str, Any] = resp.json()["data"]
        return data

    def _poll(
        self, instance_id: str, until: str, timings: list[float] | None = None
    ) -> dict[str, Any]:
        """Polls GET /v1/instances/ID every POLL_S until `until`; the state that said so."""
        deadline = time.monotonic() + STEP_TIMEOUT_S
        next_poll = time.perf_counter()
        while True:
            state = self._state(instance_id, timings)
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
        resp = api.post("/v1/instances", json=self.create_body)
        post_ms = (time.perf_counter() - t0) * 1000
        if resp.status_code != 202:
            raise BenchError(f"POST /v1/instances answered {resp.status_code}: {resp.text}")
        instance_id = str(resp.json()["data"]["instance_id"])
        get_ms: list[float] = []
        state = self._poll(instance_id, "running", get_ms)
        total_ms = (time.perf_counter() - t0) * 1000
        running_at = time.time()
        if state.get("container_id"):
            self.container_ids.add(str(state["container_id"]))
        deleted = api.delete(f"/v1/instances/{instance_id}")
        if deleted.status_code != 200:
            raise BenchError(f"DELETE /v1/instances/ID answered {deleted.status_code}")
        self._poll(instance_id, "destroyed")
        return AgentSample(total_ms, post_ms, sent_at, running_at, instance_id, get_ms)

    def load(self, count: int) -> None:
        """`count` idle busybox instances (0.1 CPU each), running until the agent goes."""
        ids = []
        for _ in range(count):
            body = {"image": IMAGE, "image_tag": TAG, "env_variables": LOAD_ENV}
            resp = self._api().post("/v1/instances", json=body)
            if resp.status_code != 202:
                raise BenchError(f"POST /v1/instances answered {resp.status_code}: {resp.text}")
            ids.append(str(resp.json()["data"]["instance_id"]))
        for instance_id in ids:
            state = self._poll(instance_id, "running")
            if state.get("container_id"):
                self.container_ids.add(str(state["container_id"]))

    def run_docker(self, network: str | None) -> float:
        cmd = [
            "docker", "run", "-d",
            "--cpus", "1", "--memory", "1g", "--memory-swap", "1g", "--shm-size", "512m",
            "--pids-limit", "4096", "--init", "--cap-drop", "ALL",
            "--security-opt", "no-new-privileges:true",
            "-p", f"{free_port(PORT_RANGE)}:8080",
            "--label", BENCH_LABEL, "--label", f"{RUN_LABEL_KEY}={self.token}",
            *(["--network", network] if network else []),
            self.image, "tail", "-f", "/dev/null",
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
        arms = ("a", "b", "c")
        for which in arms[index % 3 :] + arms[: index % 3]:
            self.agent.check_alive()
            if which == "a":
                sample = self.run_agent()
                if record:
                    self.agent_samples.append(sample)
            elif which == "b":
                assert self.network is not None
                elapsed = self.run_docker(self.network)
                if record:
                    self.docker_samples.append(elapsed)
            else:
                elapsed = self.run_docker(None)
                if record:
                    self.bridge_samples.append(elapsed)

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
        run_filter = f"label={RUN_LABEL_KEY}={self.token}"
        problems += teardown(self.agent, self.client, self.container_ids, run_filter)
        if self.network is not None:
            removed = docker("network", "rm", self.network)
            if removed.returncode != 0:
                problems.append(f"docker network rm {self.network}: {removed.stderr.strip()}")
        return problems


def p90(samples: list[float]) -> float:
    """The 90th percentile, nearest rank (for 10 samples: the 9th smallest)."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]


def breakdown(agent: AgentProc, samples: list[AgentSample]) -> list[str]:
    """Where the agent's time went, from its log (timestamps have 1 ms resolution)."""
    accepted: dict[str, float] = {}
    up: dict[str, float] = {}
    measured = {s.instance_id for s in samples}
    steps: dict[str, list[float]] = {}  # the build's own steps, as the agent timed them
    for record in agent.records():
        when = parse_log_time(record.get("ts"))
        iid = record.get("instance_id")
        if when is None or not isinstance(iid, str):
            continue
        if record.get("msg") == "instance accepted":
            accepted[iid] = when
        elif record.get("msg") == "instance up":
            up[iid] = when
        elif record.get("msg") == "build step" and iid in measured:
            step, ms = record.get("step"), record.get("ms")
            if isinstance(step, str) and isinstance(ms, int | float):
                steps.setdefault(step, []).append(float(ms))
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
        if name.endswith("(build)"):
            for step, took in steps.items():
                lines.append(f"    {step:<36} median {statistics.median(took):7.1f} ms")
    gets = [ms for s in samples for ms in s.get_ms]
    if gets:
        lines.append(
            f"  {'GET /instances round trip (client)':<38} median {statistics.median(gets):7.1f} ms"
            f"  ({len(gets)} polls; a GET slower than the {POLL_S * 1000:g} ms poll interval"
            " sets the real resolution)"
        )
    return lines


def report(bench: Bench, runs: int, warmup: int, engine: str) -> bool:
    a = [s.total_ms for s in bench.agent_samples]
    b = bench.docker_samples
    c = bench.bridge_samples
    ratio = statistics.median(a) / statistics.median(b)
    passed = ratio <= TARGET_RATIO

    def fmt(values: list[float]) -> str:
        return "[" + ", ".join(f"{v:.1f}" for v in values) + "]"

    print()
    print(f"instance create: {runs} runs (+{warmup} warm-up), Docker {engine}")
    print(f"{'':36}{'median':>10}{'p90':>10}{'min':>10}{'max':>10}")
    rows = (
        ("(a) agent", a),
        ("(b) docker run -d, own network", b),
        ("(c) docker run -d, default bridge", c),
    )
    for name, values in rows:
        print(
            f"{name:36}{statistics.median(values):8.1f}ms{p90(values):8.1f}ms"
            f"{min(values):8.1f}ms{max(values):8.1f}ms"
        )
    verdict = "PASS" if passed else "FAIL"
    print(f"ratio median(a)/median(b) = {ratio:.3f}x   target: at most {TARGET_RATIO}x   {verdict}")
    med_a, med_b, med_c = (statistics.median(v) for v in (a, b, c))
    print(
        f"for information: median(a)/median(c) = {med_a / med_c:.3f}x,"
        f" median(b)/median(c) = {med_b / med_c:.3f}x"
        " (what Docker's user-defined network costs a start)"
    )
    print("raw samples (ms, in run order):")
    print(f"  (a) agent:                   {fmt(a)}")
    print(f"  (b) docker run, own network: {fmt(b)}")
    print(f"  (c) docker run, bridge:      {fmt(c)}")
    lines = breakdown(bench.agent, bench.agent_samples)
    if lines:
        print("agent breakdown (medians; from its DEBUG log):")
        print("\n".join(lines))
    return passed


def preflight() -> str:
    version = docker_version()
    need_images(f"{IMAGE}:{TAG}")
    return version


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=MIN_RUNS, help="timed runs (at least 10)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    parser.add_argument("--agent-log", type=Path, help="keep a copy of the agent's log here")
    parser.add_argument(
        "--loaded", action="store_true", help=f"{LOADED} idle instances running meanwhile"
    )
    args = parser.parse_args(argv)
    if args.runs < MIN_RUNS:
        parser.error(f"--runs must be at least {MIN_RUNS}")
    if args.warmup < 0:
        parser.error("--warmup must not be negative")

    interrupt_on_signals()
    workdir = Path(tempfile.mkdtemp(prefix="qudata-bench-"))
    cp = ControlPlane(workdir, PORT_RANGE) if args.loaded else None
    env = {**LOADED_AGENT_ENV, **cp.env} if cp is not None else None
    agent = AgentProc(workdir, PORT_RANGE, env=env)
    bench = Bench(agent)
    code = 2
    try:
        engine = preflight()
        if cp is not None:
            cp.start()
        agent.start()
        agent.wait_ready()
        bench.connect()
        bench.make_network()
        if args.loaded:
            bench.load(LOADED)
            print(f"loaded: {LOADED} idle busybox instances running in the agent")
        print(
            f"agent pid {agent.pid} on {agent.url},"
            f" agent id {agent.agent_id}; baseline label {RUN_LABEL_KEY}={bench.token}",
            flush=True,
        )
        began = time.time()
        for i in range(args.warmup + args.runs):
            record = i >= args.warmup
            bench.iteration(i - args.warmup if record else i, record)
            print("." if record else "w", end="", flush=True)
        code = 0 if report(bench, args.runs, args.warmup, engine) else 1
        if cp is not None:
            print(f"meanwhile: {cp.cadence(began, time.time())} to the control plane")
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
        with signals_ignored():
            problems = bench.cleanup()
            if cp is not None:
                cp.stop()
            keep_log(agent, args.agent_log)
            shutil.rmtree(workdir, ignore_errors=True)
    return exit_code(code, problems)


if __name__ == "__main__":
    sys.exit(main())
