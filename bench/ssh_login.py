"""Time to first SSH login: the QuData agent against sshd started by hand in Docker.

What it measures (all traffic on 127.0.0.1; the ssh client runs
`ssh -o BatchMode=yes -o ConnectTimeout=2 ... root@127.0.0.1 -p PORT true`
with a fresh ed25519 key, retried every 50 ms until it exits 0):

1. and 2. sshd image (`qudata-test/debian-ssh:12`, default 7 rounds after 1
   untimed warm-up round), four arms per round, their order rotated each round:
   - agent: the real `qudata-agent run` (standalone, a temporary state
     directory, 127.0.0.1 and a free port, instance ports from
     QUDATA_PORT_RANGE=22000-22999). Timed from sending `POST /instances`
     (`"ssh_enabled": true`; the key is sent with `POST /ssh` as soon as the
     POST is answered) to the first successful login on the port the POST
     answered for 22. Then `DELETE /instances` (not timed).
   - floor (the baseline): `docker run -d -p PORT:22 -v DIR:/etc/bench:ro` of
     the same image running `sshd -D -e -f /etc/bench/sshd_config`, where DIR
     holds the agent's own sshd_config with only the paths changed, host keys
     generated beforehand on the host, and authorized_keys. Timed from the
     start of the `docker` process to the first successful login; then
     `docker rm -f` (not timed). The agent has to do more (lay out its files,
     generate a host key, install the key, start sshd, in one `docker exec`).
   Each of the two runs with two clients:
   - case 1, signalled: the client waits for its side's word that it is worth
     trying: the agent's `GET /instances` saying `ssh.status` ready (polled
     every 10 ms, as the control plane would before showing the renter the
     address), the floor's `docker run -d` returning (the container started).
   - case 2, blind: the client tries from the first moment. While Docker starts
     a container, docker-proxy already accepts on the published port and its
     dial into the not yet wired container is lost and retried by TCP after
     1 s, so a login tried in that window waits about a second, the agent's
     and the floor's alike.
   Target for both: at most 1.5x the floor (median/median).
3. image without sshd (`qudata-test/debian:12`, default 3 runs), interleaved
   the same way:
   - agent: `POST /instances` to the first successful login; the agent
     installs OpenSSH with apt inside the container (needs the Debian mirror).
     The client waits for `ssh.status` ready as in case 1: a login tried
     every 50 ms through a minute of install would start a hundred ssh
     processes, whose CPU the install on a small host then lacks.
   - install floor: in a fresh `docker run -d qudata-test/debian:12 tail -f
     /dev/null` container, the time of `docker exec C sh -c
     "<the agent's provision_script()>"` alone (apt-get update and install,
     host keys, config, `sshd -t`). Target: agent at most install + 1 s
     (median - median); the apt mirror's speed moves both.

It prints medians, min, max and the samples in ms, the three verdicts (PASS or
FAIL), and where the agent's time went: the Docker events of its container
(create, start, each exec from create to die, the authorized_keys copy) taken
with `docker events` during the run, the agent's DEBUG log lines ("instance
accepted", "ssh ready"), and the client's login attempts. Exit status: 0 all
PASS, 1 a FAIL, 2 error, 130 interrupted.

Everything it makes is removed on the way out, also on Ctrl-C, SIGTERM or an
error: the agent's instance (DELETE, then `docker rm -f` of every container
labelled with the agent's id, read from `meta.agent_id` in its state
database), the floor containers (labelled `qudata.bench=1` and
`qudata.bench.run=<this run's token>`), the `docker events` reader, the agent
process and the temporary directory (keys, state, log).

Needs a running Docker engine, the local images `qudata-test/debian-ssh:12`
and `qudata-test/debian:12` (`scripts/build-test-images.sh` builds them) and
the OpenSSH client (`ssh`, `ssh-keygen`). Takes about a minute plus the apt
installs (6 of them by default). Run from the repository root:

    .venv/bin/python bench/ssh_login.py [--runs N] [--install-runs N] [--warmup N]
                                        [--cases sshd|install|both] [--agent-log FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
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
    free_port,
    interrupt_on_signals,
    keep_log,
    need_images,
    parse_log_time,
    run_cmd,
    signals_ignored,
    teardown,
)

from qudata_agent.domain.ssh_setup import (
    AUTHORIZED_KEYS,
    SSH_DIR,
    SSHD_CONFIG_TEXT,
    provision_script,
)

SSHD_IMAGE = "qudata-test/debian-ssh:12"
BARE_IMAGE = "qudata-test/debian:12"
PORT_RANGE = (22000, 22999)
RETRY_S = 0.050
# GET /instances costs ~1 ms: polled this often, the agent's ready signal is
# seen about as soon as the floor's (docker run -d returning) is.
READY_POLL_S = 0.010
CONNECT_TIMEOUT_S = 2
ATTEMPT_TIMEOUT_S = 20.0  # one ssh run, should ConnectTimeout not cover a hang
SSHD_LOGIN_TIMEOUT_S = 60.0
INSTALL_LOGIN_TIMEOUT_S = 900.0  # the agent's own limit for a package install
TARGET_RATIO = 1.5
TARGET_EXTRA_MS = 1000.0
MOUNT = "/etc/bench"


def ms(seconds: float) -> float:
    return seconds * 1000.0


# -- keys and the floor's files ------------------------------------------------


def keygen(path: Path, kind: str, bits: int | None = None) -> None:
    argv = ["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", "qudata-bench", "-f", str(path)]
    if bits is not None:
        argv[4:4] = ["-b", str(bits)]
    done = run_cmd(argv)
    if done.returncode != 0:
        raise BenchError(f"ssh-keygen -t {kind} failed: {done.stderr.strip()}")


def floor_sshd_config() -> str:
    """The agent's sshd_config with its paths moved to the read-only mount."""
    replacements = {
        f"HostKey {SSH_DIR}/": f"HostKey {MOUNT}/",
        f"AuthorizedKeysFile {AUTHORIZED_KEYS} .ssh/authorized_keys": (
            f"AuthorizedKeysFile {MOUNT}/authorized_keys"
        ),
        "PidFile /run/qudata-sshd.pid": "PidFile /run/bench-sshd.pid",
    }
    text = SSHD_CONFIG_TEXT
    for old, new in replacements.items():
        if old not in text:
            raise BenchError(f"the agent's sshd_config changed: no {old!r} in it")
        text = text.replace(old, new)
    return text


def prepare_floor_mount(directory: Path, public_key: str) -> None:
    """authorized_keys, host keys and sshd_config for the floor's sshd."""
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)  # sshd's StrictModes: no group/world write up the path
    keygen(directory / "ssh_host_ed25519_key", "ed25519")
    keygen(directory / "ssh_host_rsa_key", "rsa", 3072)
    (directory / "authorized_keys").write_text(public_key + "\n")
    (directory / "authorized_keys").chmod(0o644)
    (directory / "sshd_config").write_text(floor_sshd_config())
    (directory / "sshd_config").chmod(0o644)


# -- logging in ------------------------------------------------------------------


@dataclass
class Login:
    done: float  # perf_counter when the successful ssh exited
    done_wall: float  # the same moment, wall clock (to line up with logs and events)
    attempts: int
    first_denied_wall: float | None  # first "Permission denied": sshd up, the key not yet
    last_error: str


class SshClient:
    def __init__(self, key: Path) -> None:
        self.key = key

    def attempt(self, port: int) -> tuple[bool, str]:
        argv = [
            "ssh", "-F", "/dev/null", "-i", str(self.key), "-p", str(port),
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

    def wait(self, port: int, timeout: float, alive: Callable[[], None]) -> Login:
        """Tries to log in every RETRY_S until it works."""
        deadline = time.monotonic() + timeout
        attempts = 0
        denied: float | None = None
        error = ""
        while True:
            alive()
            attempts += 1
            ok, message = self.attempt(port)
            if ok:
                return Login(time.perf_counter(), time.time(), attempts, denied, error)
            error = message
            if denied is None and "Permission denied" in message:
                denied = time.time()
            if time.monotonic() > deadline:
                raise BenchError(
                    f"no login on port {port} within {timeout:g} s ({attempts} tries): {error}"
                )
            time.sleep(RETRY_S)


# -- the agent -------------------------------------------------------------------


class EventReader:
    """`docker events` for the agent's containers, written to a file while the bench runs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.proc: subprocess.Popen[bytes] | None = None
        self._out: Any = None

    def start(self, agent_id: str) -> None:
        self._out = open(self.path, "ab")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            ["docker", "events", "--format", "{{json .}}",
             "--filter", "type=container", "--filter", f"label={AGENT_LABEL_KEY}={agent_id}"],
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._out is not None:
            self._out.close()
            self._out = None

    def events(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if self.path.exists():
            for line in self.path.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if isinstance(event, dict):
                        out.append(event)
        return out


# -- samples and the timeline ------------------------------------------------------


@dataclass
class AgentSample:
    total_ms: float
    post_ms: float  # POST /instances round trip
    key_ms: float  # POST /ssh round trip
    sent_wall: float
    login: Login
    instance_id: str
    ready_ms: float | None = None  # GET /instances first said ssh ready (signalled client)


@dataclass
class Step:
    at_ms: float  # from the POST being sent
    what: str
    until_ms: float | None = None  # for an exec: when it died


def exec_label(command: str) -> str:
    if "apt-get" in command:
        return "exec provision (install check, host keys, config, sshd -t)"
    if "authorized_keys.new" in command:
        return "exec install authorized_keys"
    if "kill -0" in command:
        return "exec start sshd"
    return f"exec {command[:40]!r}"


def timeline(
    sample: AgentSample, events: list[dict[str, Any]], log: list[dict[str, Any]]
) -> list[Step]:
    """What happened between the POST and the login, from Docker's events and the agent's log."""
    start, end = sample.sent_wall - 0.005, sample.login.done_wall + 0.005

    def rel(when: float) -> float:
        return ms(when - sample.sent_wall)

    steps: list[Step] = []
    execs: dict[str, Step] = {}
    for event in events:
        nano = event.get("timeNano")
        if not isinstance(nano, int):
            continue
        when = nano / 1e9
        if not start <= when <= end:
            continue
        action = str(event.get("Action") or event.get("status") or "")
        attrs = (event.get("Actor") or {}).get("Attributes") or {}
        exec_id = attrs.get("execID")
        verb, _, command = action.partition(": ")
        if verb.startswith("exec_") and isinstance(exec_id, str):
            step = execs.get(exec_id)
            if step is None:
                step = Step(rel(when), exec_label(command))
                execs[exec_id] = step
                steps.append(step)
            if verb == "exec_die":
                step.until_ms = rel(when)
                code = attrs.get("exitCode")
                if code not in (None, "0"):
                    step.what += f" (exit {code})"
            elif command:
                step.what = exec_label(command)
        elif verb == "extract-to-dir":
            steps.append(Step(rel(when), "copy authorized_keys.new in (put_archive)"))
        elif verb in ("create", "start", "die", "destroy"):
            steps.append(Step(rel(when), f"container {verb}"))
    for record in log:
        logged = parse_log_time(record.get("ts"))
        if logged is None or record.get("instance_id") != sample.instance_id:
            continue
        msg = str(record.get("msg"))
        if msg in ("instance accepted", "instance up", "ssh key added", "ssh ready"):
            steps.append(Step(rel(logged), f"agent log: {msg!r}"))
    if sample.login.first_denied_wall is not None:
        steps.append(Step(rel(sample.login.first_denied_wall), "ssh: first 'Permission denied'"))
    steps.append(Step(sample.post_ms, "client: POST /instances answered"))
    steps.append(Step(sample.post_ms + sample.key_ms, "client: POST /ssh answered"))
    if sample.ready_ms is not None:
        steps.append(Step(sample.ready_ms, "client: GET /instances says ssh ready"))
    steps.append(Step(sample.total_ms, f"client: first login ok (attempt {sample.login.attempts})"))
    steps.sort(key=lambda s: s.at_ms)
    return steps


def _first(steps: list[Step], prefix: str) -> Step | None:
    return next((s for s in steps if s.what.startswith(prefix)), None)


def phases(steps: list[Step], total_ms: float) -> dict[str, float]:
    """The phases the breakdown table reports, where the steps allow."""
    out: dict[str, float] = {}
    started = _first(steps, "container start")
    provision = _first(steps, "exec provision")
    sshd = _first(steps, "exec start sshd")
    quick = [s for s in steps if s.what.startswith(("exec install", "exec start")) and s.until_ms]
    if started:
        out["POST sent -> container started"] = started.at_ms
    if started and provision:
        out["container started -> provision exec created"] = provision.at_ms - started.at_ms
    if provision and provision.until_ms is not None:
        out["provision exec, create -> die"] = provision.until_ms - provision.at_ms
    if provision and provision.until_ms is not None and sshd and sshd.until_ms is not None:
        out["provision died -> sshd-start exec died"] = sshd.until_ms - provision.until_ms
    for s in quick:
        assert s.until_ms is not None
        out.setdefault(f"  of which {s.what[5:]}, create -> die", s.until_ms - s.at_ms)
    if sshd and sshd.until_ms is not None:
        out["sshd running -> first login ok (client)"] = total_ms - sshd.until_ms
    return out


# -- the benchmark -------------------------------------------------------------------


@dataclass
class Bench:
    workdir: Path
    agent: AgentProc
    ssh: SshClient
    public_key: str
    floor_dir: Path
    token: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    client: httpx.Client | None = None
    inflight: subprocess.Popen[str] | None = None
    inflight_verb: str = ""
    floor_ids: set[str] = field(default_factory=set)

    def connect(self) -> None:
        self.client = self.agent.client()

    def _api(self) -> httpx.Client:
        assert self.client is not None
        return self.client

    def _docker_tracked(self, *args: str) -> str:
        """`docker ARGS` that makes a container; on Ctrl-C cleanup waits for it first."""
        self._docker_start(*args)
        return self._docker_finish()

    def _docker_start(self, *args: str) -> None:
        self.inflight_verb = args[0]
        self.inflight = subprocess.Popen(
            ["docker", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    def _docker_finish(self) -> str:
        """Waits for the docker command `_docker_start` ran; the container's id."""
        assert self.inflight is not None
        out, err = self.inflight.communicate(timeout=STEP_TIMEOUT_S)
        code = self.inflight.returncode
        self.inflight = None
        if code != 0:
            raise BenchError(f"docker {self.inflight_verb} failed ({code}): {err.strip()}")
        cid = out.strip()
        self.floor_ids.add(cid)
        return cid

    def _remove_floor(self, cid: str) -> None:
        removed = docker("rm", "-f", "-v", cid)
        if removed.returncode != 0:
            raise BenchError(f"docker rm -f {cid} failed: {removed.stderr.strip()}")
        self.floor_ids.discard(cid)

    def _labels(self) -> list[str]:
        return ["--label", BENCH_LABEL, "--label", f"{RUN_LABEL_KEY}={self.token}"]

    # The agent cases differ in the image, the patience and whether the client
    # waits for the agent's word that SSH is ready before trying to log in.
    def run_agent(self, image: str, login_timeout: float, signalled: bool = False) -> AgentSample:
        api = self._api()
        name, _, tag = image.partition(":")
        body = {"image": name, "image_tag": tag, "ssh_enabled": True}
        sent_wall = time.time()
        t0 = time.perf_counter()
        resp = api.post("/instances", json=body)
        post_s = time.perf_counter() - t0
        if resp.status_code != 202:
            raise BenchError(f"POST /instances answered {resp.status_code}: {resp.text}")
        data = resp.json()["data"]
        t1 = time.perf_counter()
        keyed = api.post("/ssh", json={"ssh_pubkey": self.public_key})
        key_s = time.perf_counter() - t1
        if keyed.status_code != 200:
            raise BenchError(f"POST /ssh answered {keyed.status_code}: {keyed.text}")
        port = int(data["ports"]["22"])
        ready_ms = ms(self._wait_ssh_ready(login_timeout) - t0) if signalled else None
        login = self.ssh.wait(port, login_timeout, self.agent.check_alive)
        sample = AgentSample(
            ms(login.done - t0),
            ms(post_s),
            ms(key_s),
            sent_wall,
            login,
            str(data["instance_id"]),
            ready_ms,
        )
        self._delete_instance()
        return sample

    def _wait_ssh_ready(self, timeout: float) -> float:
        """Polls GET /instances every READY_POLL_S until ssh is ready; perf_counter then."""
        api = self._api()
        deadline = time.monotonic() + timeout
        while True:
            self.agent.check_alive()
            ssh = (api.get("/instances").json()["data"] or {}).get("ssh") or {}
            if ssh.get("status") == "ready":
                return time.perf_counter()
            if ssh.get("status") == "failed":
                raise BenchError(f"the agent reports SSH failed: {ssh.get('reason')}")
            if time.monotonic() > deadline:
                raise BenchError(f"SSH was not ready within {timeout:g} s: {ssh}")
            time.sleep(READY_POLL_S)

    def _delete_instance(self) -> None:
        api = self._api()
        resp = api.delete("/instances")
        if resp.status_code != 200:
            raise BenchError(f"DELETE /instances answered {resp.status_code}: {resp.text}")
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while True:
            state = api.get("/instances").json()["data"]
            if state["status"] == "destroyed":
                return
            if time.monotonic() > deadline:
                raise BenchError(f"the instance was not destroyed: {state}")
            time.sleep(0.05)

    def run_sshd_floor(self, signalled: bool = True) -> tuple[float, float]:
        """(docker run -> login ms, docker run alone ms).

        Signalled: the client tries only once `docker run -d` has returned (the
        container is started). Blind: it tries from the start, while docker runs.
        """
        port = free_port(PORT_RANGE)
        t0 = time.perf_counter()
        self._docker_start(
            "run", "-d", *self._labels(), "-p", f"127.0.0.1:{port}:22",
            "-v", f"{self.floor_dir}:{MOUNT}:ro", SSHD_IMAGE,
            "sh", "-c", f"mkdir -p /run/sshd && exec /usr/sbin/sshd -D -e -f {MOUNT}/sshd_config",
        )  # fmt: skip
        if signalled:
            cid = self._docker_finish()
            run_s = time.perf_counter() - t0
        try:
            login = self.ssh.wait(port, SSHD_LOGIN_TIMEOUT_S, lambda: None)
        except BenchError as e:
            if not signalled:
                cid = self._docker_finish()
            logs = docker("logs", "--tail", "20", cid)
            raise BenchError(f"floor sshd: {e}\n{logs.stdout}{logs.stderr}") from None
        total = ms(login.done - t0)
        if not signalled:
            cid = self._docker_finish()
            run_s = time.perf_counter() - t0  # not a figure of its own: docker ran alongside
        self._remove_floor(cid)
        return total, ms(run_s)

    def run_install_floor(self) -> float:
        """The agent's provision script by `docker exec` in a fresh container, in ms."""
        cid = self._docker_tracked(
            "run", "-d", *self._labels(), BARE_IMAGE, "tail", "-f", "/dev/null"
        )
        t0 = time.perf_counter()
        done = docker("exec", cid, "sh", "-c", provision_script(), timeout=INSTALL_LOGIN_TIMEOUT_S)
        elapsed = ms(time.perf_counter() - t0)
        if done.returncode != 0:
            tail = (done.stdout + done.stderr).strip()[-500:]
            raise BenchError(f"provision script failed in the floor ({done.returncode}): {tail}")
        self._remove_floor(cid)
        return elapsed

    def cleanup(self) -> list[str]:
        problems: list[str] = []
        if self.inflight is not None:
            try:
                self.inflight.communicate(timeout=STEP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.inflight.kill()
                self.inflight.communicate()
            self.inflight = None
        run_filter = f"label={RUN_LABEL_KEY}={self.token}"
        return problems + teardown(self.agent, self.client, self.floor_ids, run_filter)


# -- reporting -------------------------------------------------------------------------


def fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.0f}" for v in values) + "]"


def stats_line(name: str, values: list[float]) -> str:
    return (
        f"  {name:<34}{statistics.median(values):9.0f}{min(values):9.0f}{max(values):9.0f}"
        f"   {fmt(values)}"
    )


def median_sample(samples: list[AgentSample]) -> AgentSample:
    ordered = sorted(samples, key=lambda s: s.total_ms)
    return ordered[(len(ordered) - 1) // 2]


def explain(
    samples: list[AgentSample], events: list[dict[str, Any]], log: list[dict[str, Any]]
) -> None:
    steps = {id(s): timeline(s, events, log) for s in samples}
    table: dict[str, list[float]] = {}
    for s in samples:
        for name, value in phases(steps[id(s)], s.total_ms).items():
            table.setdefault(name, []).append(value)
    table["POST /instances round trip (client)"] = [s.post_ms for s in samples]
    table["POST /ssh round trip (client)"] = [s.key_ms for s in samples]
    table["login attempts"] = [float(s.login.attempts) for s in samples]
    print("  agent breakdown (median over runs, ms; Docker events and the agent's DEBUG log):")
    for name, values in table.items():
        print(f"    {name:<52}{statistics.median(values):8.0f}")
    pick = median_sample(samples)
    print(f"  timeline of the median agent run ({pick.total_ms:.0f} ms), ms from sending the POST:")
    for step in steps[id(pick)]:
        span = "" if step.until_ms is None else f" -> {step.until_ms:7.0f}"
        took = "" if step.until_ms is None else f"  ({step.until_ms - step.at_ms:.0f} ms)"
        print(f"    {step.at_ms:7.0f}{span:>11}  {step.what}{took}")


def header(title: str) -> None:
    print()
    print(title)
    print(f"  {'':<34}{'median':>9}{'min':>9}{'max':>9}   samples (ms, run order)")


# -- main ------------------------------------------------------------------------------


def preflight(cases: str) -> str:
    version = docker_version()
    images = ([SSHD_IMAGE] if cases != "install" else []) + (
        [BARE_IMAGE] if cases != "sshd" else []
    )
    need_images(*images)
    for tool in ("ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} is not installed (the OpenSSH client)")
    return version


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--runs", type=int, help="timed runs of each case (default 7 sshd rounds, 3 install)"
    )
    parser.add_argument("--install-runs", type=int, help="timed runs of the install case only")
    parser.add_argument("--warmup", type=int, default=1, help="untimed sshd-image rounds first")
    parser.add_argument("--cases", choices=("sshd", "install", "both"), default="both")
    parser.add_argument("--agent-log", type=Path, help="keep a copy of the agent's log here")
    args = parser.parse_args(argv)
    sshd_runs = args.runs if args.runs is not None else 7
    install_runs = args.install_runs if args.install_runs is not None else (args.runs or 3)
    if sshd_runs < 1 or install_runs < 1 or args.warmup < 0:
        parser.error("runs must be at least 1 and --warmup not negative")

    interrupt_on_signals()
    workdir = Path(tempfile.mkdtemp(prefix="qudata-bench-ssh-"))
    agent = AgentProc(workdir, PORT_RANGE)
    reader = EventReader(workdir / "events.jsonl")
    bench: Bench | None = None
    verdicts: list[bool] = []
    code = 2
    try:
        engine = preflight(args.cases)
        keygen(workdir / "id_ed25519", "ed25519")
        public_key = (workdir / "id_ed25519.pub").read_text().strip()
        floor_dir = workdir / "floor"
        prepare_floor_mount(floor_dir, public_key)
        bench = Bench(workdir, agent, SshClient(workdir / "id_ed25519"), public_key, floor_dir)
        agent.start()
        agent.wait_ready()
        assert agent.agent_id is not None
        reader.start(agent.agent_id)
        bench.connect()
        print(
            f"Docker {engine}; agent pid {agent.pid}"
            f" on {agent.url}, id {agent.agent_id}; floor label {RUN_LABEL_KEY}={bench.token}",
            flush=True,
        )

        # Four arms per round, their order rotated each round: the agent and the
        # floor, each with a client that waits for its ready signal and with one
        # that tries to log in from the very start.
        arms = ("agent-signalled", "floor-signalled", "agent-blind", "floor-blind")
        sshd_agent: dict[bool, list[AgentSample]] = {True: [], False: []}
        sshd_floor: dict[bool, list[float]] = {True: [], False: []}
        sshd_run: list[float] = []
        if args.cases in ("sshd", "both"):
            print(f"cases 1-2 ({SSHD_IMAGE}): {args.warmup} warm-up + {sshd_runs} timed ", end="")
            for i in range(args.warmup + sshd_runs):
                timed = i >= args.warmup
                for arm in arms[i % 4 :] + arms[: i % 4]:
                    who, _, how = arm.partition("-")
                    signalled = how == "signalled"
                    if who == "agent":
                        sample = bench.run_agent(SSHD_IMAGE, SSHD_LOGIN_TIMEOUT_S, signalled)
                        if timed:
                            sshd_agent[signalled].append(sample)
                    else:
                        total, run_ms = bench.run_sshd_floor(signalled)
                        if timed:
                            sshd_floor[signalled].append(total)
                            if signalled:
                                sshd_run.append(run_ms)
                print("." if timed else "w", end="", flush=True)
            print()

        inst_agent: list[AgentSample] = []
        inst_floor: list[float] = []
        if args.cases in ("install", "both"):
            print(f"case 3 ({BARE_IMAGE}, apt install): {install_runs} timed ", end="")
            for i in range(install_runs):
                for which in ("agent", "floor") if i % 2 == 0 else ("floor", "agent"):
                    if which == "agent":
                        sample = bench.run_agent(BARE_IMAGE, INSTALL_LOGIN_TIMEOUT_S, True)
                        inst_agent.append(sample)
                    else:
                        inst_floor.append(bench.run_install_floor())
                print(".", end="", flush=True)
            print()

        time.sleep(0.3)  # the last Docker events reach the file
        events, log = reader.events(), agent.records()
        for signalled, number, how in (
            (True, 1, "each client waits for its ready signal"),
            (False, 2, "login tried from the start"),
        ):
            if not sshd_agent[signalled]:
                continue
            a = [s.total_ms for s in sshd_agent[signalled]]
            floor = sshd_floor[signalled]
            ratio = statistics.median(a) / statistics.median(floor)
            passed = ratio <= TARGET_RATIO
            verdicts.append(passed)
            header(f"case {number}: image with sshd ({SSHD_IMAGE}), {how}")
            if signalled:
                print(stats_line("agent (POST -> ssh ready -> login)", a))
                print(
                    stats_line(
                        "  of which POST -> ssh ready",
                        [s.ready_ms or 0.0 for s in sshd_agent[True]],
                    )
                )
                print(stats_line("floor (run -d returned -> login)", floor))
                print(stats_line("  of which docker run -d returned", sshd_run))
            else:
                print(stats_line("agent (POST -> login)", a))
                print(stats_line("floor (docker run -> login)", floor))
            print(
                f"  ratio agent/floor = {ratio:.2f}x   target: at most {TARGET_RATIO}x"
                f"   {'PASS' if passed else 'FAIL'}"
            )
            explain(sshd_agent[signalled], events, log)
        if inst_agent:
            a = [s.total_ms for s in inst_agent]
            extra = statistics.median(a) - statistics.median(inst_floor)
            passed = extra <= TARGET_EXTRA_MS
            verdicts.append(passed)
            header(f"case 3: image without sshd ({BARE_IMAGE}), install with apt")
            print(stats_line("agent (POST -> login)", a))
            print(stats_line("install floor (docker exec)", inst_floor))
            print(
                f"  agent - install = {extra:+.0f} ms   target: at most +{TARGET_EXTRA_MS:.0f} ms"
                f"   {'PASS' if passed else 'FAIL'}"
            )
            explain(inst_agent, events, log)
        code = 0 if all(verdicts) else 1
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", file=sys.stderr)
        code = 130
    except (BenchError, OSError, httpx.HTTPError, subprocess.SubprocessError) as e:
        print(f"\nbenchmark failed: {e}", file=sys.stderr)
        code = 2
    finally:
        with signals_ignored():
            problems = bench.cleanup() if bench is not None else []
            if bench is None:
                agent.stop()
            reader.stop()
            keep_log(agent, args.agent_log)
            shutil.rmtree(workdir, ignore_errors=True)
    return exit_code(code, problems)


if __name__ == "__main__":
    sys.exit(main())
