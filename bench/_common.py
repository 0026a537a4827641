"""What the benchmarks share: the real agent as a child process, docker CLI calls,
free ports, the agent's log, signals and the removal of what a run made.

Not a benchmark itself (the leading underscore). The scripts are run as
`python bench/NAME.py`, which puts this folder first on sys.path, so they
`import _common`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

STEP_TIMEOUT_S = 60.0
BENCH_LABEL = "qudata.bench=1"
RUN_LABEL_KEY = "qudata.bench.run"
AGENT_LABEL_KEY = "qudata.agent_id"


class BenchError(Exception):
    """Something the benchmark could not do; the message says what."""


def free_port(avoid: tuple[int, int]) -> int:
    """A free loopback TCP port outside `avoid` (the agent's instance port range)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if not avoid[0] <= port <= avoid[1]:
            return port


def run_cmd(argv: list[str], timeout: float = STEP_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """Runs a command in its own session (Ctrl-C is ours to handle, not its)."""
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        check=False,
    )


def docker(*args: str, timeout: float = STEP_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return run_cmd(["docker", *args], timeout)


def docker_version() -> str:
    """The engine's version; BenchError when Docker does not answer."""
    version = docker("version", "--format", "{{.Server.Version}}")
    if version.returncode != 0:
        raise BenchError(f"Docker is not reachable: {version.stderr.strip()}")
    return version.stdout.strip()


def need_images(*images: str) -> None:
    for image in images:
        if docker("image", "inspect", image).returncode != 0:
            raise BenchError(f"the image {image} is missing; run scripts/build-test-images.sh")


def parse_log_time(value: Any) -> float | None:
    """The agent's `ts` ("2024-01-01T00:00:00.123Z") as Unix seconds."""
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def agent_command() -> list[str]:
    exe = shutil.which("qudata-agent", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "qudata_agent"]


class AgentProc:
    """The real agent, standalone (no control plane), in a session of its own.

    A temporary state directory, 127.0.0.1 and a free port, instance ports
    from `port_range`, JSON log lines at `log_level` into `workdir/agent.log`;
    `env` adds settings of the run's own (`QUDATA_MAX_INSTANCES`, ...).
    """

    def __init__(
        self,
        workdir: Path,
        port_range: tuple[int, int],
        log_level: str = "DEBUG",
        env: dict[str, str] | None = None,
    ) -> None:
        self.state_dir = workdir / "state"
        self.log_path = workdir / "agent.log"
        self.port_range = port_range
        self.log_level = log_level
        self.extra_env = dict(env or {})
        self.port = free_port(port_range)
        self.proc: subprocess.Popen[bytes] | None = None
        self.agent_id: str | None = None
        self._log: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("QUDATA_")}
        env.update(
            QUDATA_STATE_DIR=str(self.state_dir),
            QUDATA_AGENT_HOST="127.0.0.1",
            QUDATA_AGENT_PORT=str(self.port),
            QUDATA_PORT_RANGE=f"{self.port_range[0]}-{self.port_range[1]}",
            QUDATA_ADDRESS_LOOKUP_URLS="none",
            QUDATA_LOG_LEVEL=self.log_level,
            QUDATA_LOG_FORMAT="json",
        )
        env.update(self.extra_env)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [*agent_command(), "run"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C is ours; the agent is stopped in order
        )

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until /ping answers, the agent's id can be read from its database and its
        secret is on disk (with a control plane, once the registration gave it)."""
        deadline = time.monotonic() + timeout
        with httpx.Client(trust_env=False, timeout=1.0) as client:
            while time.monotonic() < deadline:
                self.check_alive()
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(self.url + "/ping").status_code == 200:
                        self.agent_id = self._read_agent_id()
                        if self.agent_id and (self.state_dir / "agent_secret").exists():
                            return
                time.sleep(0.05)
        raise BenchError(f"the agent was not ready within {timeout:g} s\n{self.tail()}")

    def _read_agent_id(self) -> str | None:
        """The agent's id (the label on its containers), read-only from its database."""
        uri = f"file:{self.state_dir / 'agent.db'}?mode=ro"
        try:
            with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=5)) as db:
                row = db.execute("SELECT value FROM meta WHERE key = 'agent_id'").fetchone()
        except sqlite3.Error:
            return None
        return str(row[0]) if row else None

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(f"the agent exited with {self.proc.returncode}\n{self.tail()}")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def secret(self) -> str:
        return (self.state_dir / "agent_secret").read_text().strip()

    def client(self, timeout: float = STEP_TIMEOUT_S) -> httpx.Client:
        """An authenticated client; loopback only, whatever the proxy variables say."""
        return httpx.Client(
            base_url=self.url,
            headers={"X-Agent-Secret": self.secret()},
            timeout=timeout,
            trust_env=False,
        )

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None

    def records(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if self.log_path.exists():
            for line in self.log_path.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if isinstance(record, dict):
                        out.append(record)
        return out

    def tail(self, lines: int = 25) -> str:
        if not self.log_path.exists():
            return "(no agent log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


class ControlPlane:
    """The recording fake control plane (tests/support/fake_cp.py, a real HTTP server)
    as a process of its own: an agent given `env` registers with it and reports
    `/stats` every 3 s, as on a rented host; each call is one JSON line in `log_path`."""

    def __init__(self, workdir: Path, avoid: tuple[int, int]) -> None:
        self.port = free_port(avoid)
        self.log_path = workdir / "control-plane.jsonl"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        return {"QUDATA_API_KEY": "bench-key-0123", "QUDATA_API_URL": self.url}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v0"

    def start(self, timeout: float = 10.0) -> None:
        program = Path(__file__).resolve().parent.parent / "tests" / "support" / "fake_cp.py"
        self.proc = subprocess.Popen(
            [sys.executable, str(program), str(self.port), str(self.log_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 1),
            ):
                return
            time.sleep(0.05)
        raise BenchError(f"the fake control plane did not listen on {self.port} in {timeout:g} s")

    def stats_times(self) -> list[float]:
        """When each `/stats` report came (epoch seconds)."""
        out: list[float] = []
        if self.log_path.exists():
            for line in self.log_path.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    call = json.loads(line)
                    if isinstance(call, dict) and str(call.get("path", "")).endswith("/stats"):
                        out.append(float(call["at"]))
        return out

    def cadence(self, since: float, until: float) -> str:
        """The `/stats` reports between two epoch times (the 3 s tick, and one more
        after each change of an instance) and the longest wait between two."""
        times = [t for t in self.stats_times() if since <= t <= until]
        gaps = [b - a for a, b in itertools.pairwise([since, *times, until])]
        return (
            f"{len(times)} /stats reports in {until - since:.1f} s,"
            f" the longest wait for one {max(gaps):.2f} s"
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def remove_containers(ids: set[str], filters: list[str]) -> list[str]:
    """`docker rm -f -v` of these ids and of every container matching a filter
    (`label=K=V`); the problems met on the way."""
    problems: list[str] = []
    found = set(ids)
    for flt in filters:
        listed = docker("ps", "-aq", "--no-trunc", "--filter", flt)
        if listed.returncode == 0:
            found.update(listed.stdout.split())
        else:
            problems.append(f"docker ps --filter {flt}: {listed.stderr.strip()}")
    if found:
        removed = docker("rm", "-f", "-v", *sorted(found))
        if removed.returncode != 0 and "No such container" not in removed.stderr:
            problems.append(f"docker rm -f: {removed.stderr.strip()}")
    return problems


def teardown(
    agent: AgentProc, client: httpx.Client | None, ids: set[str], run_filter: str | None
) -> list[str]:
    """The end of every run: DELETE the instance, stop the agent, remove the containers
    labelled with its id and, with `run_filter`, those of this run's baseline."""
    problems: list[str] = []
    if client is not None:
        if agent.running():
            try:
                client.delete("/instances", timeout=30)
            except httpx.HTTPError as e:
                problems.append(f"DELETE /instances: {e}")
        client.close()
    try:
        agent.stop()
    except (OSError, subprocess.SubprocessError) as e:
        problems.append(f"stopping the agent: {e}")
    filters = [run_filter] if run_filter else []
    if agent.agent_id:
        filters.append(f"label={AGENT_LABEL_KEY}={agent.agent_id}")
    return problems + remove_containers(ids, filters)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def interrupt_on_signals() -> None:
    """SIGINT and SIGTERM raise KeyboardInterrupt (SIGINT too: `&` in a script ignores it)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """Cleanup is not cut short by a second Ctrl-C."""
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def keep_log(agent: AgentProc, dest: Path | None) -> None:
    """A copy of the agent's log at `dest` (--agent-log), before the workdir goes."""
    if dest is not None and agent.log_path.exists():
        with contextlib.suppress(OSError):
            shutil.copyfile(agent.log_path, dest)


def finish(
    agent: AgentProc,
    client: httpx.Client | None,
    ids: set[str],
    token: str | None,
    agent_log: Path | None,
    workdir: Path,
) -> list[str]:
    """A run's end, signals held off: `teardown` (this run's baseline found by its
    `token` label), the agent's log kept (`keep_log`), the workdir removed."""
    with signals_ignored():
        problems = teardown(agent, client, ids, f"label={RUN_LABEL_KEY}={token}" if token else None)
        keep_log(agent, agent_log)
        shutil.rmtree(workdir, ignore_errors=True)
    return problems


def exit_code(code: int, problems: list[str]) -> int:
    """The run's exit status once cleanup reported `problems`: a cleanup that left
    something behind turns a verdict (0 PASS, 1 FAIL) into 2."""
    for problem in problems:
        print(f"cleanup: {problem}", file=sys.stderr)
    return 2 if problems and code in (0, 1) else code
