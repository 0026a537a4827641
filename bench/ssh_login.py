"""Time to first SSH login: the QuData agent on three images against sshd run by hand.

What it measures (all traffic on 127.0.0.1; the client runs
`ssh -o BatchMode=yes -o ConnectTimeout=1 ... root@127.0.0.1 -p PORT true`
with a fresh ed25519 key, blind: from the first moment, again every 50 ms
until it exits 0, never waiting for anyone's word that sshd is up):

- agent, once per image (`qudata-test/debian-ssh:12`, Debian with sshd;
  `qudata-test/debian:12`, Debian minbase without sshd;
  `qudata-test/busybox:1`, static busybox, no libc): the real
  `qudata-agent run` (standalone, a temporary state directory, 127.0.0.1 and
  a free port, instance ports from 22000-22999). Timed from sending
  `POST /instances` (1 CPU, 1 GiB, `"ssh_enabled": true`, `command: null`; the key follows
  with `POST /ssh` as soon as the POST is answered) to the first successful
  login on the port the answer gave for 22. Then `DELETE /instances` (not timed).
- floor (the baseline): `docker run -d --cpus 1 --memory 1g --memory-swap 1g
  -p 127.0.0.1:PORT:22 -v DIR:/etc/bench:ro qudata-test/debian-ssh:12` (the
  agent's instance has the same limits) with the image's sshd as its command
  (`sshd -D -e -f /etc/bench/sshd_config`; DIR holds the agent's own
  sshd_config with only the paths changed, a host key made beforehand and
  authorized_keys: the key bind-mounted). Timed from the start of the
  `docker` process to the first successful login of the same blind client,
  which starts once `docker run -d` has returned: by then the container's
  network is wired, so the floor does not pay Docker's stall (below) and is
  what a renter could have from a host with no agent at all. The limits
  matter: a login costs sshd tens of ms of CPU (the key exchange), so an
  instance with a small share of a CPU (an order that names none gets the
  host's CPUs split by QUDATA_MAX_INSTANCES) logs in later than an
  unlimited container, agent or not; the sandbox's first login more so.
- floor, blind from the start (for information): the same, the client
  trying from the first moment. While a container starts, Docker's userland
  proxy already accepts on the published port and its dial into the not yet
  wired container is lost and resent by TCP a second later: the client's
  1 s connect timeout runs out on an accepted connection. The agent gates
  its SSH port (`domain.port_gate`: refused with a reset until sshd answers),
  so its blind client never meets that.
- sandbox, when Docker has `runsc` registered (`docker info` Runtimes): the
  floor again with `--runtime=runsc`, and the agent on the sshd image with
  `"isolation": "sandbox"`.

Rounds (default 1 untimed warm-up round and 7 timed ones), the arms' order
rotated each round. Target: on every image the agent's median at most 1.3x
the floor's median (the sandbox case against the sandbox floor). It prints,
per arm, the median, min, max and samples in ms, each ratio against its
in-run floor, and the verdicts. `--loaded` first starts 8 idle busybox
instances in the same agent and keeps them running, and registers the agent
with the recording fake control plane (tests/support/fake_cp.py), to see the
same ratios with the agent and Docker busy with eight more and the agent's
stats reports ticking every 3 s (it prints how many came meanwhile). Exit status:
0 all PASS, 1 a FAIL, 2 error, 130 interrupted.

Everything it makes is removed on the way out, also on Ctrl-C, SIGTERM or an
error: the agent's instance (DELETE, then `docker rm -f` of every container
labelled with the agent's id), the floor containers (labelled
`qudata.bench=1` and `qudata.bench.run=<this run's token>`), the agent
process and the temporary directory.

Needs a running Docker engine, the three local images
(`scripts/build-test-images.sh` builds them), what the agent's SSH needs on
the host (openssh-server, patchelf, busybox-static) and the OpenSSH client.
Takes about a minute. Run from the repository root:

    .venv/bin/python bench/ssh_login.py [--runs N] [--warmup N] [--loaded] [--agent-log FILE]
"""

from __future__ import annotations

import argparse
import shutil
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
    ControlPlane,
    docker,
    docker_version,
    exit_code,
    finish,
    free_port,
    interrupt_on_signals,
    need_images,
    run_cmd,
)

from qudata_agent.domain.ssh_setup import INSTANCE_MOUNT, PID_FILE, SSHD_CONFIG_TEXT

SSHD_IMAGE = "qudata-test/debian-ssh:12"
IMAGES = (SSHD_IMAGE, "qudata-test/debian:12", "qudata-test/busybox:1")
PORT_RANGE = (22000, 22999)
LIMITS = ("--cpus", "1", "--memory", "1g", "--memory-swap", "1g")  # the floor's ...
ORDER_LIMITS = {"QUDATA_CPU_CORES": "1", "QUDATA_MEMORY_GB": "1"}  # ... and the agent's
RETRY_S = 0.050
CONNECT_TIMEOUT_S = 1
ATTEMPT_TIMEOUT_S = 20.0  # one ssh run, should ConnectTimeout not cover a hang
LOGIN_TIMEOUT_S = 60.0
TARGET_RATIO = 1.3
LOADED = 8  # idle instances kept running by --loaded
SANDBOX = "runsc"
MOUNT = "/etc/bench"


def ms(seconds: float) -> float:
    return seconds * 1000.0


def keygen(path: Path) -> None:
    argv = ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "qudata-bench", "-f", str(path)]
    done = run_cmd(argv)
    if done.returncode != 0:
        raise BenchError(f"ssh-keygen failed: {done.stderr.strip()}")


def floor_sshd_config() -> str:
    """The agent's own sshd_config, its paths moved to the floor's mount."""
    text = SSHD_CONFIG_TEXT.replace(INSTANCE_MOUNT, MOUNT)
    return text.replace(PID_FILE, "/run/bench-sshd.pid")


def prepare_floor_mount(directory: Path, public_key: str) -> None:
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)  # sshd's StrictModes: no group/world write up the path
    keygen(directory / "ssh_host_ed25519_key")
    (directory / "authorized_keys").write_text(public_key + "\n")
    (directory / "authorized_keys").chmod(0o644)
    (directory / "sshd_config").write_text(floor_sshd_config())


def attempt(key: Path, port: int) -> tuple[bool, str]:
    argv = [
        "ssh", "-F", "/dev/null", "-i", str(key), "-p", str(port),
        "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
        "-o", f"ConnectTimeout={CONNECT_TIMEOUT_S}",
        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
        "-o", "LogLevel=ERROR",
        "root@127.0.0.1", "true",
    ]  # fmt: skip
    try:
        done = run_cmd(argv, ATTEMPT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return False, f"ssh hung for {ATTEMPT_TIMEOUT_S:g} s"
    lines = done.stderr.strip().splitlines()
    return done.returncode == 0, (lines[-1] if lines else f"exit {done.returncode}")


def login(key: Path, port: int) -> tuple[float, int]:
    """Tries every RETRY_S until a login works: (perf_counter then, attempts)."""
    deadline = time.monotonic() + LOGIN_TIMEOUT_S
    tries = 0
    while True:
        tries += 1
        ok, error = attempt(key, port)
        if ok:
            return time.perf_counter(), tries
        if time.monotonic() > deadline:
            raise BenchError(f"no login on port {port} in {LOGIN_TIMEOUT_S:g} s: {error}")
        time.sleep(RETRY_S)


class Bench:
    def __init__(self, workdir: Path, agent: AgentProc, key: Path, floor_dir: Path) -> None:
        self.agent = agent
        self.key = key
        self.floor_dir = floor_dir
        self.token = uuid.uuid4().hex[:12]
        self.client: httpx.Client | None = None
        self.floor_ids: set[str] = set()
        self.public_key = key.with_suffix(".pub").read_text().strip()

    def run_floor(self, *, blind: bool = False, runtime: str | None = None) -> float:
        port = free_port(PORT_RANGE)
        extra = ["--runtime", runtime] if runtime else []
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            ["docker", "run", "-d", *extra, *LIMITS, "--label", BENCH_LABEL,
             "--label", f"{RUN_LABEL_KEY}={self.token}", "-p", f"127.0.0.1:{port}:22",
             "-v", f"{self.floor_dir}:{MOUNT}:ro", SSHD_IMAGE,
             "sh", "-c", f"mkdir -p /run/sshd && exec /usr/sbin/sshd -D -e -f {MOUNT}/sshd_config"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )  # fmt: skip
        try:
            if not blind:  # the client starts once the container's network is wired
                proc.wait(STEP_TIMEOUT_S)
            done, _ = login(self.key, port)
        finally:
            out, err = proc.communicate(timeout=STEP_TIMEOUT_S)
            if proc.returncode == 0:
                self.floor_ids.add(out.strip())
        if proc.returncode != 0:
            raise BenchError(f"docker run of the floor failed: {err.strip()}")
        docker("rm", "-f", "-v", out.strip())
        self.floor_ids.discard(out.strip())
        return ms(done - t0)

    def run_agent(self, image: str, *, sandbox: bool = False) -> float:
        assert self.client is not None
        name, _, tag = image.partition(":")
        order: dict[str, object] = {
            "image": name,
            "image_tag": tag,
            "ssh_enabled": True,
            "env_variables": ORDER_LIMITS,
        }
        if sandbox:
            order["isolation"] = "sandbox"
        t0 = time.perf_counter()
        answer = self.client.post("/v1/instances", json=order)
        if answer.status_code != 202:
            raise BenchError(f"POST /v1/instances: {answer.status_code} {answer.text}")
        data = answer.json()["data"]
        port, instance_id = int(data["ports"]["22"]), data["instance_id"]
        added = self.client.post(
            f"/v1/instances/{instance_id}/ssh", json={"ssh_pubkey": self.public_key}
        )
        if added.status_code != 200:
            raise BenchError(f"POST /ssh: {added.status_code} {added.text}")
        try:
            done, _ = login(self.key, port)
        except BenchError as e:
            view = self.client.get(f"/v1/instances/{instance_id}").json().get("data")
            raise BenchError(f"agent on {image}: {e}; the instance: {view}") from None
        elapsed = ms(done - t0)
        gone = self.client.delete(f"/v1/instances/{instance_id}", timeout=STEP_TIMEOUT_S)
        if gone.status_code != 200:
            raise BenchError(f"DELETE /v1/instances: {gone.status_code} {gone.text}")
        return elapsed

    def load(self, count: int) -> None:
        """`count` idle busybox instances, running, kept until the agent goes."""
        assert self.client is not None
        ids = []
        for _ in range(count):
            order = {"image": "qudata-test/busybox", "image_tag": "1"}
            answer = self.client.post("/v1/instances", json=order)
            if answer.status_code != 202:
                raise BenchError(f"POST /v1/instances: {answer.status_code} {answer.text}")
            ids.append(answer.json()["data"]["instance_id"])
        deadline = time.monotonic() + LOGIN_TIMEOUT_S
        while time.monotonic() < deadline:
            views = [self.client.get(f"/v1/instances/{i}").json()["data"] for i in ids]
            if all(v["status"] == "running" for v in views):
                return
            time.sleep(0.2)
        raise BenchError(f"the {count} load instances did not all run")

    def run(self, arm: str) -> float:
        if arm == FLOOR:
            return self.run_floor()
        if arm == FLOOR_BLIND:
            return self.run_floor(blind=True)
        if arm == FLOOR_SANDBOX:
            return self.run_floor(runtime=SANDBOX)
        if arm == AGENT_SANDBOX:
            return self.run_agent(SSHD_IMAGE, sandbox=True)
        return self.run_agent(arm)


FLOOR = "floor"
FLOOR_BLIND = "floor, blind from the start"
FLOOR_SANDBOX = f"floor --runtime={SANDBOX}"
AGENT_SANDBOX = f"agent {SSHD_IMAGE} sandbox"


def sandbox_registered() -> bool:
    done = run_cmd(["docker", "info", "--format", "{{json .Runtimes}}"])
    return done.returncode == 0 and f'"{SANDBOX}"' in done.stdout


def summary(label: str, samples: list[float]) -> str:
    shown = " ".join(f"{s:.0f}" for s in samples)
    return (
        f"  {label:<28} median {statistics.median(samples):7.0f} ms"
        f"  min {min(samples):6.0f}  max {max(samples):6.0f}  [{shown}]"
    )


def report(times: dict[str, list[float]]) -> bool:
    for arm, samples in times.items():
        print(summary(arm if arm.startswith(("floor", "agent")) else f"agent {arm}", samples))
    ok = True
    print("case ratios: POST -> first login, blind client, against the in-run floor")
    cases = [(image, FLOOR) for image in IMAGES]
    cases.append((FLOOR_BLIND, FLOOR))
    if AGENT_SANDBOX in times:
        cases.append((AGENT_SANDBOX, FLOOR_SANDBOX))
    for arm, base in cases:
        ratio = statistics.median(times[arm]) / statistics.median(times[base])
        if arm == FLOOR_BLIND:
            print(f"  {arm + ':':<36} {ratio:.2f}x the floor (Docker's own stall, information)")
            continue
        passed = ratio <= TARGET_RATIO
        ok &= passed
        verdict = "PASS" if passed else "FAIL"
        print(
            f"  {arm + ':':<36} ratio agent/{base} = {ratio:.2f}x"
            f"   target: at most {TARGET_RATIO}x   {verdict}"
        )
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="timed rounds (at least 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--agent-log", type=Path, help="keep a copy of the agent's log here")
    parser.add_argument("--no-sandbox", action="store_true", help="skip the sandbox case")
    parser.add_argument(
        "--loaded", action="store_true", help=f"{LOADED} more instances running meanwhile"
    )
    args = parser.parse_args(argv)
    if args.runs < 5 or args.warmup < 0:
        parser.error("--runs must be at least 5 (a median of 5) and --warmup not negative")

    interrupt_on_signals()
    workdir = Path(tempfile.mkdtemp(prefix="qudata-bench-ssh-"))
    cp = ControlPlane(workdir, PORT_RANGE) if args.loaded else None
    agent = AgentProc(
        workdir,
        PORT_RANGE,
        env={
            "QUDATA_MAX_INSTANCES": "16",
            "QUDATA_RESERVED_CPU_CORES": "0",
            "QUDATA_CPU_CORES": "0.1",
            **(cp.env if cp is not None else {}),
        },
    )
    bench: Bench | None = None
    code = 2
    try:
        if cp is not None:
            cp.start()
        engine = docker_version()
        need_images(*IMAGES)
        for tool in ("ssh", "ssh-keygen"):
            if shutil.which(tool) is None:
                raise BenchError(f"{tool} is missing (install openssh-client)")
        keygen(workdir / "id_ed25519")
        prepare_floor_mount(workdir / "floor", (workdir / "id_ed25519.pub").read_text().strip())
        bench = Bench(workdir, agent, workdir / "id_ed25519", workdir / "floor")
        agent.start()
        agent.wait_ready()
        bench.client = agent.client()
        print(f"Docker {engine}; agent on {agent.url}; floor label {RUN_LABEL_KEY}={bench.token}")
        arms = [FLOOR, FLOOR_BLIND, *IMAGES]
        if not args.no_sandbox and sandbox_registered():
            arms += [FLOOR_SANDBOX, AGENT_SANDBOX]
        if args.loaded:
            bench.load(LOADED)
            print(f"loaded: {LOADED} idle busybox instances running in the agent")
        times: dict[str, list[float]] = {arm: [] for arm in arms}
        print(f"{args.warmup} warm-up + {args.runs} timed rounds ", end="", flush=True)
        began = time.time()
        for i in range(args.warmup + args.runs):
            shift = i % len(arms)
            for arm in arms[shift:] + arms[:shift]:
                sample = bench.run(arm)
                if i >= args.warmup:
                    times[arm].append(sample)
            print(".", end="", flush=True)
        print()
        code = 0 if report(times) else 1
        if cp is not None:
            print(f"meanwhile: {cp.cadence(began, time.time())} to the control plane")
    except BenchError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        code = 130
    finally:
        problems = finish(
            agent,
            bench.client if bench is not None else None,
            bench.floor_ids if bench is not None else set(),
            bench.token if bench is not None else None,
            args.agent_log,
            workdir,
        )
        if cp is not None:
            cp.stop()
    return exit_code(code, problems)


if __name__ == "__main__":
    sys.exit(main())
