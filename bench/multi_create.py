"""Eight instances at once: concurrent `POST /v1/instances` against concurrent `docker run -d`.

What it measures, per round (default 5 rounds, at least 5):

(a) agent: a fresh `qudata-agent run` (standalone, its own temporary state
    directory, 127.0.0.1 and a free port, QUDATA_MAX_INSTANCES=COUNT,
    QUDATA_RESERVED_CPU_CORES=0 so that COUNT x 0.2 cores fit a small host,
    instance ports from 27000-27999), warmed with one untimed create and
    delete. Then COUNT (default 8) `POST /v1/instances` sent at once
    (busybox, `QUDATA_CPU_CORES=0.2`, no command: the agent's idle command),
    timed from sending them until a `GET /v1/instances`, polled every 20 ms,
    first reports all COUNT `running`. Then (not timed) every instance is
    deleted, the agent stopped and every container labelled with its id
    removed.
(b) baseline: COUNT `docker run -d` started at once, with the limits and
    options the agent gave its own container, read from `docker inspect` of
    the warm-up instance: the same network (the agent's, `qudata` unless
    QUDATA_NETWORK says otherwise), `--cpus`, memory and swap limit, shm
    size, pids limit, `--init`, capabilities, security options, sysctls,
    log driver and restart policy, and the same command. Timed from starting
    the first `docker` process until the last one returns (each returns once
    its container is started); then `docker rm -f` (not timed).

The order alternates (a-b, b-a, ...), so drift hits both. It prints the
median, min and max of each, the ratio median(a)/median(b) against the target
of at most 1.2x with PASS or FAIL, the raw samples, and details: each
instance's time to `running` within a round, the POST and GET round trips,
each `docker run -d` within a round. Exit status: 0 PASS, 1 FAIL, 2 error,
130 interrupted.

Everything it makes is removed after each round and on the way out, also on
Ctrl-C, SIGTERM or an error: the agent's containers (DELETE, then `docker rm
-f` of every container labelled with the id of any agent this run started),
the baseline containers (labelled `qudata.bench=1` and
`qudata.bench.run=<this run's token>`, so that a concurrent run is left
alone), the agent process and the temporary directory. The agent's network
is left as it is (other agents on the host may use it). All HTTP traffic goes
to 127.0.0.1 (proxy variables are ignored).

Needs a running Docker engine and the local image `qudata-test/busybox:1`
(`scripts/build-test-images.sh` builds it). Run from the repository root:

    .venv/bin/python bench/multi_create.py [--rounds N] [--count N] [--agent-log FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from _common import (
    AGENT_LABEL_KEY,
    BENCH_LABEL,
    RUN_LABEL_KEY,
    STEP_TIMEOUT_S,
    AgentProc,
    BenchError,
    docker,
    docker_version,
    exit_code,
    interrupt_on_signals,
    keep_log,
    need_images,
    remove_containers,
    run_cmd,
    signals_ignored,
)

IMAGE = "qudata-test/busybox"
TAG = "1"
PORT_RANGE = (27000, 27999)
POLL_S = 0.020
TARGET_RATIO = 1.2
MIN_ROUNDS = 5
CPU_CORES = "0.2"
CREATE_BODY: dict[str, Any] = {
    "image": IMAGE,
    "image_tag": TAG,
    "env_variables": {"QUDATA_CPU_CORES": CPU_CORES},
}


@dataclass
class AgentRound:
    total_ms: float  # sending the POSTs -> a GET saw every instance running
    post_ms: list[float]  # each POST's round trip
    to_running_ms: list[float]  # each instance: sending -> the first GET that saw it running
    get_ms: list[float]  # each GET /v1/instances while waiting


@dataclass
class DockerRound:
    total_ms: float  # starting the first `docker run -d` -> the last one returned
    each_ms: list[float]  # each `docker run -d`: the common start -> it returned


def baseline_options(attrs: dict[str, Any]) -> list[str]:
    """`docker run` options that give a container what the agent gave the one in `attrs`."""
    host = attrs.get("HostConfig") or {}
    opts: list[str] = []
    if host.get("NetworkMode"):
        opts += ["--network", str(host["NetworkMode"])]
    if host.get("NanoCpus"):
        opts += ["--cpus", f"{host['NanoCpus'] / 1e9:g}"]
    if host.get("CpusetCpus"):
        opts += ["--cpuset-cpus", str(host["CpusetCpus"])]
    for key, flag in (("Memory", "--memory"), ("MemorySwap", "--memory-swap")):
        if host.get(key):
            opts += [flag, f"{host[key]}b"]
    if host.get("ShmSize"):
        opts += ["--shm-size", f"{host['ShmSize']}b"]
    if host.get("PidsLimit"):
        opts += ["--pids-limit", str(host["PidsLimit"])]
    if host.get("Init"):
        opts.append("--init")
    for cap in host.get("CapDrop") or ():
        opts += ["--cap-drop", str(cap)]
    for cap in host.get("CapAdd") or ():
        opts += ["--cap-add", str(cap)]
    for opt in host.get("SecurityOpt") or ():
        opts += ["--security-opt", str(opt)]
    for key, value in (host.get("Sysctls") or {}).items():
        opts += ["--sysctl", f"{key}={value}"]
    log = host.get("LogConfig") or {}
    if log.get("Type"):
        opts += ["--log-driver", str(log["Type"])]
        for key, value in (log.get("Config") or {}).items():
            opts += ["--log-opt", f"{key}={value}"]
    policy = host.get("RestartPolicy") or {}
    if policy.get("Name"):
        name = str(policy["Name"])
        retries = policy.get("MaximumRetryCount")
        opts += ["--restart", f"{name}:{retries}" if name == "on-failure" and retries else name]
    if host.get("Runtime"):
        opts += ["--runtime", str(host["Runtime"])]
    return opts


def baseline_command(attrs: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The entrypoint option and the command of the container in `attrs`."""
    config = attrs.get("Config") or {}
    entrypoint = list(config.get("Entrypoint") or ())
    cmd = [str(c) for c in config.get("Cmd") or ()]
    if entrypoint:
        return ["--entrypoint", str(entrypoint[0])], [*map(str, entrypoint[1:]), *cmd]
    return [], cmd


@dataclass
class Bench:
    workdir: Path
    count: int
    token: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    agent: AgentProc | None = None
    agents: list[AgentProc] = field(default_factory=list)  # every one started, for cleanup
    baseline: list[str] | None = None  # `docker run -d ...` up to the image
    command: list[str] = field(default_factory=list)
    container_ids: set[str] = field(default_factory=set)
    agent_rounds: list[AgentRound] = field(default_factory=list)
    docker_rounds: list[DockerRound] = field(default_factory=list)

    # -- the agent --------------------------------------------------------------

    def start_agent(self, index: int) -> AgentProc:
        env = {
            "QUDATA_MAX_INSTANCES": str(max(self.count, 8)),
            "QUDATA_RESERVED_CPU_CORES": "0",
        }
        agent = AgentProc(self.workdir / f"agent-{index}", PORT_RANGE, log_level="INFO", env=env)
        agent.state_dir.parent.mkdir(parents=True, exist_ok=True)
        self.agents.append(agent)
        self.agent = agent
        agent.start()
        agent.wait_ready()
        self._warm_up(agent)
        return agent

    def _warm_up(self, agent: AgentProc) -> None:
        """One untimed create and delete: the network, the wall and Docker's connections
        are ready before the clock runs; the first one also tells the baseline's options."""
        with agent.client() as client:
            created = client.post("/v1/instances", json=CREATE_BODY)
            if created.status_code != 202:
                raise BenchError(
                    f"POST /v1/instances answered {created.status_code}: {created.text}"
                )
            instance_id = created.json()["data"]["instance_id"]
            state = self._wait_running(client, instance_id)
            if self.baseline is None:
                self._learn_baseline(str(state["container_id"]))
            deleted = client.delete(f"/v1/instances/{instance_id}")
            if deleted.status_code != 200:
                raise BenchError(f"DELETE answered {deleted.status_code}: {deleted.text}")

    @staticmethod
    def _wait_running(client: httpx.Client, instance_id: str) -> dict[str, Any]:
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while True:
            resp = client.get(f"/v1/instances/{instance_id}")
            if resp.status_code != 200:
                raise BenchError(f"GET /v1/instances/{instance_id}: {resp.status_code} {resp.text}")
            state: dict[str, Any] = resp.json()["data"]
            if state["status"] == "running":
                return state
            if state["status"] == "error" or time.monotonic() > deadline:
                raise BenchError(f"the warm-up instance did not run: {state}")
            time.sleep(POLL_S)

    def _learn_baseline(self, container_id: str) -> None:
        inspected = docker("inspect", container_id, "--format", "{{json .}}")
        if inspected.returncode != 0:
            raise BenchError(f"docker inspect {container_id}: {inspected.stderr.strip()}")
        attrs = json.loads(inspected.stdout)
        entrypoint, self.command = baseline_command(attrs)
        self.baseline = [
            "docker", "run", "-d",
            *baseline_options(attrs), *entrypoint,
            "--label", BENCH_LABEL, "--label", f"{RUN_LABEL_KEY}={self.token}",
        ]  # fmt: skip

    def run_agent(self) -> AgentRound:
        assert self.agent is not None
        return asyncio.run(self._agent_round(self.agent))

    async def _agent_round(self, agent: AgentProc) -> AgentRound:
        limits = httpx.Limits(max_connections=self.count + 2, max_keepalive_connections=self.count)
        async with httpx.AsyncClient(
            base_url=agent.url,
            headers={"X-Agent-Secret": agent.secret()},
            timeout=STEP_TIMEOUT_S,
            trust_env=False,
            limits=limits,
        ) as client:
            t0 = time.perf_counter()

            async def post() -> tuple[str, float]:
                resp = await client.post("/v1/instances", json=CREATE_BODY)
                took = (time.perf_counter() - t0) * 1000
                if resp.status_code != 202:
                    raise BenchError(f"POST /v1/instances answered {resp.status_code}: {resp.text}")
                return str(resp.json()["data"]["instance_id"]), took

            posted = await asyncio.gather(*(post() for _ in range(self.count)))
            wanted = {instance_id for instance_id, _ in posted}
            seen: dict[str, float] = {}
            gets: list[float] = []
            deadline = time.monotonic() + STEP_TIMEOUT_S
            while True:
                g0 = time.perf_counter()
                resp = await client.get("/v1/instances")
                now = time.perf_counter()
                gets.append((now - g0) * 1000)
                if resp.status_code != 200:
                    raise BenchError(f"GET /v1/instances answered {resp.status_code}: {resp.text}")
                for state in resp.json()["data"]["instances"]:
                    iid = state["instance_id"]
                    if iid in wanted and state["status"] == "running":
                        seen.setdefault(iid, (now - t0) * 1000)
                    elif iid in wanted and state["status"] == "error":
                        raise BenchError(f"instance {iid} failed: {state.get('reason')}")
                if len(seen) == len(wanted):
                    break
                if time.monotonic() > deadline:
                    raise BenchError(f"not all running within {STEP_TIMEOUT_S:g} s: {len(seen)}")
                await asyncio.sleep(max(0.0, POLL_S - (time.perf_counter() - g0)))
            return AgentRound(
                total_ms=(now - t0) * 1000,
                post_ms=[took for _, took in posted],
                to_running_ms=sorted(seen.values()),
                get_ms=gets,
            )

    def stop_agent(self) -> list[str]:
        """Deletes every instance, stops the agent and removes what it left (not timed)."""
        agent, self.agent = self.agent, None
        if agent is None:
            return []
        problems: list[str] = []
        if agent.running():
            try:
                with agent.client(timeout=30) as client:
                    listed = client.get("/v1/instances").json()["data"]["instances"]
                    for state in listed:
                        deleted = client.delete(f"/v1/instances/{state['instance_id']}")
                        if deleted.status_code not in (200, 404):
                            problems.append(f"DELETE {state['instance_id']}: {deleted.text}")
            except (httpx.HTTPError, OSError, ValueError, KeyError) as e:
                problems.append(f"deleting the instances: {e}")
        try:
            agent.stop()
        except (OSError, subprocess.SubprocessError) as e:
            problems.append(f"stopping the agent: {e}")
        if agent.agent_id:
            problems += remove_containers(set(), [f"label={AGENT_LABEL_KEY}={agent.agent_id}"])
        return problems

    # -- the baseline -----------------------------------------------------------

    def run_docker(self) -> DockerRound:
        assert self.baseline is not None
        argv = [*self.baseline, f"{IMAGE}:{TAG}", *self.command]
        t0 = time.perf_counter()

        def one(_: int) -> tuple[subprocess.CompletedProcess[str], float]:
            done = run_cmd(argv)
            return done, (time.perf_counter() - t0) * 1000

        with ThreadPoolExecutor(self.count) as pool:
            results = list(pool.map(one, range(self.count)))
        total_ms = (time.perf_counter() - t0) * 1000
        for done, _ in results:
            if done.returncode == 0:
                self.container_ids.add(done.stdout.strip())
        failed = [d.stderr.strip() for d, _ in results if d.returncode != 0]
        if failed:
            raise BenchError(f"docker run failed: {failed[0]}")
        problems = self.remove_baseline()
        if problems:
            raise BenchError("; ".join(problems))
        return DockerRound(total_ms, sorted(ms for _, ms in results))

    def remove_baseline(self) -> list[str]:
        problems = remove_containers(self.container_ids, [f"label={RUN_LABEL_KEY}={self.token}"])
        self.container_ids.clear()
        return problems

    # -- a round and the end ------------------------------------------------------

    def round(self, index: int) -> None:
        arms = ("a", "b") if index % 2 == 0 else ("b", "a")
        for which in arms:
            if which == "a":
                self.start_agent(index)
                try:
                    self.agent_rounds.append(self.run_agent())
                finally:
                    problems = self.stop_agent()
                if problems:
                    raise BenchError("; ".join(problems))
            else:
                if self.baseline is None:
                    raise BenchError("the baseline's options are not known yet")
                self.docker_rounds.append(self.run_docker())

    def cleanup(self) -> list[str]:
        problems = self.stop_agent()
        filters = [f"label={RUN_LABEL_KEY}={self.token}"]
        filters += [f"label={AGENT_LABEL_KEY}={a.agent_id}" for a in self.agents if a.agent_id]
        for agent in self.agents:
            if agent.running():
                agent.stop()
        problems += remove_containers(self.container_ids, filters)
        return problems


def _fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.0f}" for v in values) + "]"


def report(bench: Bench, rounds: int, engine: str) -> bool:
    a = [r.total_ms for r in bench.agent_rounds]
    b = [r.total_ms for r in bench.docker_rounds]
    ratio = statistics.median(a) / statistics.median(b)
    passed = ratio <= TARGET_RATIO
    n = bench.count
    print()
    print(f"{n} instances at once, {CPU_CORES} cores each: {rounds} rounds, Docker {engine}")
    print(f"{'':44}{'median':>10}{'min':>10}{'max':>10}")
    for name, values in (
        (f"(a) agent: {n} POST /v1/instances to all running", a),
        (f"(b) {n} concurrent docker run -d", b),
    ):
        print(
            f"{name:44}{statistics.median(values):8.0f}ms{min(values):8.0f}ms{max(values):8.0f}ms"
        )
    verdict = "PASS" if passed else "FAIL"
    print(f"ratio median(a)/median(b) = {ratio:.3f}x   target: at most {TARGET_RATIO}x   {verdict}")
    print("raw samples (ms, in round order):")
    print(f"  (a) agent:  {_fmt(a)}")
    print(f"  (b) docker: {_fmt(b)}")
    print("within a round (medians over the rounds):")
    firsts = [r.to_running_ms[0] for r in bench.agent_rounds]
    each = _median_rows([r.to_running_ms for r in bench.agent_rounds])
    print(
        f"  (a) first instance seen running        {statistics.median(firsts):7.0f} ms;"
        f" each instance, sorted: {_fmt(each)}"
    )
    posts = [max(r.post_ms) for r in bench.agent_rounds]
    gets = [ms for r in bench.agent_rounds for ms in r.get_ms]
    print(f"  (a) slowest of the {n} POST round trips   {statistics.median(posts):7.0f} ms")
    print(
        f"  (a) GET /v1/instances round trip       {statistics.median(gets):7.1f} ms"
        f" ({len(gets)} polls every {POLL_S * 1000:g} ms)"
    )
    rows = _median_rows([r.each_ms for r in bench.docker_rounds])
    print(f"  (b) each docker run -d returned, sorted: {_fmt(rows)}")
    assert bench.baseline is not None
    print("baseline command: " + " ".join([*bench.baseline[:-4], "IMAGE", *bench.command]))
    return passed


def _median_rows(rows: list[list[float]]) -> list[float]:
    """The median of each position over the rounds (the k-th fastest, etc.)."""
    return [statistics.median(column) for column in zip(*rows, strict=True)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=MIN_ROUNDS, help="timed rounds (at least 5)")
    parser.add_argument("--count", type=int, default=8, help="instances per round (default 8)")
    parser.add_argument("--agent-log", type=Path, help="keep a copy of the last agent's log here")
    args = parser.parse_args(argv)
    if args.rounds < MIN_ROUNDS:
        parser.error(f"--rounds must be at least {MIN_ROUNDS}")
    if not 2 <= args.count <= 64:
        parser.error("--count must be 2-64")

    interrupt_on_signals()
    workdir = Path(tempfile.mkdtemp(prefix="qudata-bench-multi-"))
    bench = Bench(workdir, args.count)
    code = 2
    try:
        engine = docker_version()
        need_images(f"{IMAGE}:{TAG}")
        print(f"baseline label {RUN_LABEL_KEY}={bench.token}; rounds: ", end="", flush=True)
        for i in range(args.rounds):
            bench.round(i)
            print(".", end="", flush=True)
        code = 0 if report(bench, args.rounds, engine) else 1
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", file=sys.stderr)
        code = 130
    except (BenchError, OSError, httpx.HTTPError, subprocess.SubprocessError) as e:
        tail = bench.agents[-1].tail() if bench.agents else ""
        print(f"\nbenchmark failed: {e}\n{tail}", file=sys.stderr)
        code = 2
    finally:
        with signals_ignored():
            problems = bench.cleanup()
            if bench.agents:
                keep_log(bench.agents[-1], args.agent_log)
            shutil.rmtree(workdir, ignore_errors=True)
    return exit_code(code, problems)


if __name__ == "__main__":
    sys.exit(main())
