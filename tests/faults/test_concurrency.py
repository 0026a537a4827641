"""Concurrent requests: creates race for the one instance, lifecycle actions queue up.

50 creates at once (each asking for its own fixed port too): one 202, 49 409s,
and only the winner's ports and container exist. Then 20 stop/start/restart
at once: every answer is 200 or 409, no action runs inside another (the
status each action logged, decided under the instance's lock, is the one
that action leads to), and Docker ends where the agent says it is.
"""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from faults.rig import BUSYBOX, Rig, RigFactory
from support.agent_proc import free_port
from support.docker_api import inspect

# A long sync interval: what the agent reports comes from its own actions and
# Docker's events, not from a periodic repair.
ENV = {"QUDATA_SYNC_INTERVAL": "300"}


def _all_at_once(count: int, call: Any) -> list[httpx.Response]:
    """Runs call(i) for i in range(count) in threads released together."""
    start = threading.Barrier(count)

    def run(i: int) -> httpx.Response:
        start.wait()
        return call(i)  # type: ignore[no-any-return]

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(run, range(count)))


def _client(rig: Rig) -> httpx.Client:
    limits = httpx.Limits(max_connections=60, max_keepalive_connections=60)
    return httpx.Client(
        base_url=rig.agent.url,
        headers={"X-Agent-Secret": rig.agent.secret()},
        timeout=60,
        limits=limits,
    )


@pytest.mark.timeout(90)
def test_50_concurrent_creates_make_one_instance_and_leak_nothing(rigs: RigFactory) -> None:
    rig = rigs(ENV)
    fixed = sorted({free_port() for _ in range(60)} - {rig.agent.port})[:50]
    assert len(fixed) == 50
    with _client(rig) as client:
        answers = _all_at_once(
            50,
            lambda i: client.post(
                "/instances",
                json={**BUSYBOX, "ports": {"8080": "auto", "3000": str(fixed[i])}},
            ),
        )
    codes = sorted(a.status_code for a in answers)
    assert codes == [202] + [409] * 49, codes
    for answer in answers:
        assert answer.json()["ok"] is (answer.status_code == 202), answer.text
    (won,) = [a.json()["data"] for a in answers if a.status_code == 202]
    assert all("already exists" in a.json()["error"] for a in answers if a.status_code == 409)

    rig.wait(lambda s: s["status"] == "running", 30, "running")
    state = rig.assert_consistent(won["ports"])
    assert state["instance_id"] == won["instance_id"]
    assert rig.query("SELECT count(*) FROM port_allocations") == [(2,)]


@pytest.mark.timeout(120)
def test_concurrent_lifecycle_actions_never_interleave(rigs: RigFactory) -> None:
    rig = rigs(ENV)
    assert rig.api.create(**BUSYBOX).status_code == 202
    container_id = rig.wait(lambda s: s["status"] == "running", 30, "running")["container_id"]
    actions = [random.choice(("stop", "start", "restart")) for _ in range(20)]
    with _client(rig) as client:
        answers = _all_at_once(20, lambda i: client.put("/instances", json={"action": actions[i]}))
    assert {a.status_code for a in answers} <= {200, 409}, [a.text for a in answers]
    for answer in answers:
        body = answer.json()
        assert body["ok"] is (answer.status_code == 200), body
        if answer.status_code == 200:
            assert body["data"]["status"] in ("running", "paused"), body

    # The agent logs each action with the status it led to, decided under the
    # instance's lock: were two actions ever inside each other, a stop would
    # end "running" or a start "paused".
    done = [r for r in rig.agent.log_records() if r.get("msg") == "instance action"]
    assert len(done) == sum(a.status_code == 200 for a in answers)
    outcome = {"stop": "paused", "start": "running", "restart": "running"}
    assert [(r["action"], r["status"]) for r in done] == [
        (r["action"], outcome[r["action"]]) for r in done
    ]

    final = rig.api.get()
    last = done[-1]["action"]
    assert final["status"] == outcome[last], (last, final)
    running = inspect(container_id)["State"]["Running"]
    assert running is (final["status"] == "running"), (final["status"], running)
    assert len(rig.containers()) == 1
