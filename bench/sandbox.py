"""What the sandbox costs: start-up and first SSH login, and the slowdown of work inside it.

Three start-up arms, each timed from the order to (a) the container running
and (b) the first successful SSH login (a blind client retrying every 50 ms):

- agent, container: the real `qudata-agent run` (standalone),
  `POST /instances` with `qudata-test/debian:12`, `"ssh_enabled": true`,
  `"isolation": "container"` (runc); running = `GET /instances` says
  `running`; the key is given with `POST /ssh` as soon as the POST answers;
- agent, sandbox: the same with `"isolation": "sandbox"` (runsc);
- docker run --runtime=runsc (the baseline): `docker run -d --runtime=runsc
  -p PORT:22` of `qudata-test/debian-ssh:12` with its own sshd (the agent's
  sshd_config, a host key made beforehand); running = `docker run -d`
  returned (Docker has started it).

Then the work, each run in a throwaway `docker run --rm` of
`qudata-test/debian:12` under runc and under runsc, timed inside the
container (`date +%s%N` around it, so start-up does not count):
CPU-bound (an awk loop of arithmetic), syscall-heavy (`dd bs=1` of 100 000
bytes: 200 000 read and write calls) and process churn (300 fork+exec of
`/bin/true`). It prints each figure in ms and the ratios sandbox/container
(and agent sandbox / plain runsc for start-up). No target: the figures say
what a renter pays for the sandbox. One untimed warm-up of each start-up
arm (the agent's first create also makes its network), then one timed
round by default (`--runs N` for more; the median is printed). Figures on
a shared or small machine are noisy.

Everything it makes is removed on the way out, also on Ctrl-C: the agent's
instance and containers (by its label), the baseline's containers (labelled
`qudata.bench=1` and this run's token), the agent and the temporary folder.
Needs Docker with the runsc runtime registered (scripts/test.sh does it), the
test images and the OpenSSH client. Run from the repository root:

    .venv/bin/python bench/sandbox.py [--runs N] [--agent-log FILE]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
from _common import (
    BENCH_LABEL,
    RUN_LABEL_KEY,
    STEP_TIMEOUT_S,
    AgentProc,
    BenchError,
    docker,
    docker_version,
    exit_code,
    finish,
    free_port,
    interrupt_on_signals,
    need_images,
)
from ssh_login import MOUNT, keygen, login, prepare_floor_mount

IMAGE = "qudata-test/debian:12"
SSHD_IMAGE = "qudata-test/debian-ssh:12"
PORT_RANGE = (22000, 22999)
WORKLOADS = {
    "cpu-bound (awk arithmetic)": "awk 'BEGIN { for (i = 0; i < 2000000; i++) s += i * i }'",
    "syscall-heavy (dd bs=1, 200k calls)": "dd if=/dev/zero of=/dev/null bs=1 count=100000"
    " 2>/dev/null",
    "process churn (300 fork+exec)": "i=0; while [ $i -lt 300 ]; do /bin/true; i=$((i+1)); done",
}


def ms(seconds: float) -> float:
    return seconds * 1000.0


class Bench:
    def __init__(self, agent: AgentProc, key: Path, floor_dir: Path) -> None:
        self.agent = agent
        self.key = key
        self.floor_dir = floor_dir
        self.token = uuid.uuid4().hex[:12]
        self.client: httpx.Client | None = None
        self.ids: set[str] = set()
        self.public_key = key.with_suffix(".pub").read_text().strip()

    def agent_arm(self, isolation: str) -> tuple[float, float]:
        """(ms to running, ms to the first login) of one agent instance."""
        assert self.client is not None
        name, _, tag = IMAGE.partition(":")
        body = {"image": name, "image_tag": tag, "ssh_enabled": True, "isolation": isolation}
        t0 = time.perf_counter()
        answer = self.client.post("/instances", json=body)
        if answer.status_code != 202:
            raise BenchError(f"POST /instances ({isolation}): {answer.status_code} {answer.text}")
        port = int(answer.json()["data"]["ports"]["22"])
        if self.client.post("/ssh", json={"ssh_pubkey": self.public_key}).status_code != 200:
            raise BenchError("POST /ssh failed")
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while (state := self.client.get("/instances").json()["data"])["status"] != "running":
            if state["status"] == "error" or time.monotonic() > deadline:
                raise BenchError(f"the {isolation} instance did not run: {state}")
            time.sleep(0.01)
        running = time.perf_counter()
        done, _ = login(self.key, port)
        if self.client.delete("/instances", timeout=STEP_TIMEOUT_S).status_code != 200:
            raise BenchError("DELETE /instances failed")
        return ms(running - t0), ms(done - t0)

    def runsc_arm(self) -> tuple[float, float]:
        """(ms to `docker run -d` returning, ms to the first login) of plain runsc."""
        port = free_port(PORT_RANGE)
        t0 = time.perf_counter()
        started = docker(
            "run", "-d", "--runtime=runsc", "--label", BENCH_LABEL,
            "--label", f"{RUN_LABEL_KEY}={self.token}", "-p", f"127.0.0.1:{port}:22",
            "-v", f"{self.floor_dir}:{MOUNT}:ro", SSHD_IMAGE,
            "sh", "-c", f"mkdir -p /run/sshd && exec /usr/sbin/sshd -D -e -f {MOUNT}/sshd_config",
        )  # fmt: skip
        running = time.perf_counter()
        if started.returncode != 0:
            raise BenchError(f"docker run --runtime=runsc: {started.stderr.strip()}")
        self.ids.add(started.stdout.strip())
        done, _ = login(self.key, port)
        docker("rm", "-f", "-v", started.stdout.strip())
        self.ids.discard(started.stdout.strip())
        return ms(running - t0), ms(done - t0)


def work_ms(runtime: str, script: str, token: str) -> float:
    """Milliseconds `script` takes inside a fresh container under `runtime`."""
    timed = f"s=$(date +%s%N); {script}; e=$(date +%s%N); echo $(( (e - s) / 1000000 ))"
    done = docker(
        "run", "--rm", f"--runtime={runtime}", "--network=none", "--label", BENCH_LABEL,
        "--label", f"{RUN_LABEL_KEY}={token}", IMAGE, "sh", "-c", timed,
        timeout=300,
    )  # fmt: skip
    if done.returncode != 0:
        raise BenchError(f"{script!r} under {runtime}: {done.stderr.strip()}")
    return float(done.stdout.strip().splitlines()[-1])


def line(label: str, values: list[float]) -> str:
    return f"{label:<40} {statistics.median(values):8.0f} ms"


def report(
    starts: dict[str, list[tuple[float, float]]], work: dict[str, dict[str, list[float]]]
) -> None:
    for i, what in enumerate(("create -> running", "create -> first SSH login")):
        print(what)
        medians = {arm: statistics.median(s[i] for s in samples) for arm, samples in starts.items()}
        for arm, value in medians.items():
            print(f"  {arm:<38} {value:8.0f} ms")
        print(
            f"  ratio agent sandbox / agent container = "
            f"{medians['agent sandbox'] / medians['agent container']:.2f}x;"
            f" agent sandbox / docker run --runtime=runsc = "
            f"{medians['agent sandbox'] / medians['docker run --runtime=runsc']:.2f}x"
        )
    print("work inside (timed in the container)")
    for name, by_runtime in work.items():
        runc, runsc = (statistics.median(by_runtime[r]) for r in ("runc", "runsc"))
        print(
            f"  {name:<38} runc {runc:7.0f} ms   runsc {runsc:7.0f} ms"
            f"   slowdown sandbox/container = {runsc / max(runc, 1.0):.2f}x"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1, help="rounds (the median is printed)")
    parser.add_argument("--agent-log", type=Path, help="keep a copy of the agent's log here")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    interrupt_on_signals()
    workdir = Path(tempfile.mkdtemp(prefix="qudata-bench-sandbox-"))
    agent = AgentProc(workdir, PORT_RANGE)
    bench: Bench | None = None
    code = 2
    try:
        engine = docker_version()
        need_images(IMAGE, SSHD_IMAGE)
        if "runsc" not in docker("info", "--format", "{{json .Runtimes}}").stdout:
            raise BenchError("Docker has no runsc runtime (scripts/test.sh registers it)")
        keygen(workdir / "id_ed25519")
        prepare_floor_mount(workdir / "floor", (workdir / "id_ed25519.pub").read_text().strip())
        bench = Bench(agent, workdir / "id_ed25519", workdir / "floor")
        agent.start()
        agent.wait_ready()
        bench.client = agent.client()
        print(f"Docker {engine}; agent on {agent.url}; {args.runs} round(s)")
        starts: dict[str, list[tuple[float, float]]] = {
            "agent container": [],
            "agent sandbox": [],
            "docker run --runtime=runsc": [],
        }
        work: dict[str, dict[str, list[float]]] = {n: {"runc": [], "runsc": []} for n in WORKLOADS}
        bench.agent_arm("container"), bench.agent_arm("sandbox"), bench.runsc_arm()  # warm-up
        for i in range(args.runs):
            starts["agent container"].append(bench.agent_arm("container"))
            starts["agent sandbox"].append(bench.agent_arm("sandbox"))
            starts["docker run --runtime=runsc"].append(bench.runsc_arm())
            for name, script in WORKLOADS.items():
                for runtime in ("runc", "runsc")[:: 1 if i % 2 == 0 else -1]:
                    work[name][runtime].append(work_ms(runtime, script, bench.token))
        report(starts, work)
        code = 0
    except BenchError as e:
        print(f"\nerror: {e}", file=sys.stderr)
    except (subprocess.TimeoutExpired, httpx.HTTPError) as e:
        print(f"\nerror: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        code = 130
    finally:
        problems = finish(
            agent,
            bench.client if bench is not None else None,
            bench.ids if bench is not None else set(),
            bench.token if bench is not None else None,
            args.agent_log,
            workdir,
        )
    return exit_code(code, problems)


if __name__ == "__main__":
    sys.exit(main())
