"""dockerd restarted (SIGTERM, then started as scripts/lib.sh does) under a running agent.

This restarts the machine's main dockerd, so it sits in its own file named to
sort last, and a `finally` starts dockerd again whatever happened. What is
decided and asserted: `GET /instances` answers every poll within 2 s, with
200 and the last known state, or, while Docker is away, 503 naming Docker;
never a 500, never a hang. Afterwards the instance runs again (restart policy
unless-stopped) and the agent knows that new run within 8 s of Docker
answering again, and the event stream is back: a `docker stop` is reported
within 5 s with the periodic sync far off.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from faults.registry import Image, StallingRegistry
from faults.rig import BUSYBOX, RigFactory
from support.docker_api import docker, inspect

PID_FILE = Path("/var/run/docker.pid")
START_DOCKERD = "setsid nohup dockerd >>/var/log/qudata-dockerd.log 2>&1 </dev/null &"
ENV = {"QUDATA_SYNC_INTERVAL": "300"}  # only events (and their resync) move the status


def _docker_answers() -> bool:
    out = subprocess.run(
        ["docker", "version", "--format", "{{.Server.Version}}"],
        capture_output=True,
        timeout=10,
        check=False,
    )
    return out.returncode == 0


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not within {timeout}s"
        time.sleep(0.2)


def _main_dockerd() -> int:
    """The pid of the dockerd behind /var/run/docker.sock (`pidof` may list others)."""
    pid = int(PID_FILE.read_text().strip())
    running = subprocess.run(["pidof", "dockerd"], capture_output=True, text=True).stdout.split()
    assert str(pid) in running, (pid, running)
    return pid


def _dockerd_alive() -> bool:
    try:
        return Path(f"/proc/{int(PID_FILE.read_text().strip())}").exists()
    except (OSError, ValueError):
        return False


def _restore_dockerd() -> None:
    """Starts dockerd the way scripts/lib.sh does unless it answers; waits for it."""
    _wait(lambda: _docker_answers() or not _dockerd_alive(), 90, "dockerd up or gone")
    if not _docker_answers():
        subprocess.run(["bash", "-c", START_DOCKERD], check=True)
        _wait(_docker_answers, 60, "dockerd answering")


@dataclass
class Poller:
    """GET /instances every 100 ms in a thread; what each answer was."""

    url: str
    secret: str
    answers: list[tuple[float, int, str, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(headers={"X-Agent-Secret": self.secret}, timeout=2) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    resp = client.get(self.url + "/instances")
                    body = resp.json()
                    what = body["data"]["status"] if body["ok"] else body["error"]
                    took = time.monotonic() - started
                    self.answers.append((started, resp.status_code, what, took))
                except (httpx.HTTPError, ValueError, KeyError) as e:
                    self.errors.append(f"{type(e).__name__}: {e}")
                time.sleep(0.1)

    def start(self) -> Poller:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.mark.timeout(180)
def test_dockerd_restart_under_a_running_agent(rigs: RigFactory, record_property: Any) -> None:
    assert _docker_answers(), "dockerd must be up before the test"
    rig = rigs(ENV)
    assert rig.api.create(**BUSYBOX, ports={"8080": "auto"}).status_code == 202
    state = rig.wait(lambda s: s["status"] == "running", 30, "running")
    container_id = state["container_id"]
    first_run = inspect(container_id)["State"]["StartedAt"]

    poller = Poller(rig.agent.url, rig.agent.secret()).start()
    try:
        try:
            pid = _main_dockerd()
            os.kill(pid, signal.SIGTERM)
            down_at = time.monotonic()
            _wait(lambda: not Path(f"/proc/{pid}").exists(), 90, "dockerd exit")
            down_polls = len(poller.answers)
            subprocess.run(["bash", "-c", START_DOCKERD], check=True)
            _wait(_docker_answers, 60, "dockerd answering again")
            back_at = time.monotonic()
        finally:
            _restore_dockerd()

        # Docker brings the instance back; the agent learns of the new run.
        _wait(
            lambda: inspect(container_id)["State"].get("StartedAt") != first_run,
            30,
            "the container restarted by its policy",
        )
        new_run = inspect(container_id)["State"]["StartedAt"]

        def agent_knows() -> bool:
            (seen,) = rig.query("SELECT json_extract(record, '$.started_at') FROM instances")[0]
            return bool(seen == new_run and rig.api.get()["status"] == "running")

        _wait(agent_knows, 30, "the agent reporting the new run")
        caught_up_s = time.monotonic() - back_at
        rig.assert_consistent(state["allocated_ports"])
    finally:
        poller.stop()

    refused = sum(code == 503 for _, code, _, _ in poller.answers)
    record_property("docker_away_s", round(back_at - down_at, 1))
    record_property("agent_caught_up_s", round(caught_up_s, 1))
    record_property("polls_503_of", f"{refused}/{len(poller.answers)}")
    assert caught_up_s < 8, f"the agent saw the new run {caught_up_s:.1f}s after Docker was back"
    assert not poller.errors, poller.errors[:5]
    assert len(poller.answers) > down_polls > 0
    for _, code, what, took in poller.answers:
        assert took < 2, f"GET /instances took {took:.1f}s"
        assert code == 200 or (code == 503 and "Docker" in what), (code, what)
    assert {what for _, code, what, _ in poller.answers if code == 200} <= {"running", "paused"}

    # The event stream is back: a stop outside the agent shows within 5 s.
    docker("stop", "-t", "1", container_id)
    stopped_at = time.monotonic()
    rig.wait(lambda s: s["status"] == "paused", 5, "paused after docker stop")
    assert time.monotonic() - stopped_at < 5


@pytest.mark.timeout(240)
def test_a_build_failing_while_docker_is_down_ends_in_error_with_all_freed(
    rigs: RigFactory, record_property: Any
) -> None:
    """dockerd stops in the middle of a pull: the build fails and its cleanup meets Docker
    down too. The instance must not stay `pending` holding its ports: it shows `error`,
    ports freed, while Docker is still away; and nothing of it is left once Docker is back."""
    assert _docker_answers(), "dockerd must be up before the test"
    registry = StallingRegistry(Image.export("qudata-test/busybox:1")).start()
    rig = rigs({"QUDATA_SYNC_INTERVAL": "2", "QUDATA_REGISTRY_ALLOW": registry.host})
    try:
        ref = f"{registry.host}/fault/busybox"
        resp = rig.api.create(image=ref, image_tag="latest", ports={"8080": "auto"})
        assert resp.status_code == 202, resp.text
        registry.wait_stalled()
        try:
            pid = _main_dockerd()
            os.kill(pid, signal.SIGTERM)
            _wait(lambda: not Path(f"/proc/{pid}").exists(), 90, "dockerd exit")
            down_at = time.monotonic()
            failed = rig.wait(lambda s: s["status"] == "error", 60, "error while Docker is down")
            record_property("error_after_s", round(time.monotonic() - down_at, 1))
            assert not _docker_answers()  # still away: the failure did not wait for Docker
            assert failed["allocated_ports"] == {} and failed["container_id"] is None
            (held,) = rig.query("SELECT count(*) FROM port_allocations")[0]
            assert held == 0
        finally:
            registry.gate.set()
            _restore_dockerd()
        time.sleep(5)  # a sync or two with Docker back
        assert rig.containers() == []
        assert rig.api.get()["status"] == "error"
        assert rig.api.delete().status_code == 200
    finally:
        registry.gate.set()
        registry.stop()


@pytest.mark.timeout(240)
def test_dockerd_restart_under_several_instances(rigs: RigFactory) -> None:
    """Two instances of one host (section 4): after dockerd restarts, both run again and
    the agent knows each one's new run; a third instance stopped through the API stays
    stopped."""
    assert _docker_answers(), "dockerd must be up before the test"
    rig = rigs({**ENV, "QUDATA_MAX_INSTANCES": "3", "QUDATA_RESERVED_CPU_CORES": "0"})
    v1 = rig.api.client
    ids = []
    for _ in range(3):
        body = {**BUSYBOX, "env_variables": {"QUDATA_CPU_CORES": "0.2"}}
        resp = v1.post("/v1/instances", json=body)
        assert resp.status_code == 202, resp.text
        ids.append(resp.json()["data"]["instance_id"])

    def state(instance_id: str) -> dict[str, Any]:
        data: dict[str, Any] = v1.get(f"/v1/instances/{instance_id}").json()["data"]
        return data

    _wait(lambda: all(state(i)["status"] == "running" for i in ids), 60, "all running")
    stopped = ids[2]
    assert v1.put(f"/v1/instances/{stopped}", json={"action": "stop"}).status_code == 200
    runs = {i: inspect(state(i)["container_id"])["State"]["StartedAt"] for i in ids[:2]}
    try:
        pid = _main_dockerd()
        os.kill(pid, signal.SIGTERM)
        _wait(lambda: not Path(f"/proc/{pid}").exists(), 90, "dockerd exit")
        subprocess.run(["bash", "-c", START_DOCKERD], check=True)
        _wait(_docker_answers, 60, "dockerd answering again")
    finally:
        _restore_dockerd()

    def both_back() -> bool:
        for i in ids[:2]:
            now = state(i)
            started = inspect(now["container_id"])["State"].get("StartedAt")
            if now["status"] != "running" or started == runs[i]:
                return False
        return True

    _wait(both_back, 60, "both instances running again, their new runs known")
    assert state(stopped)["status"] == "paused"
    assert inspect(state(stopped)["container_id"])["State"]["Running"] is False
    assert len(rig.containers()) == 3
