"""POST /stats: cadence, fields and figures, through the real agent and a fake control plane."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

import httpx

from support.agent_proc import AgentProcess
from support.docker_api import Api, agent_id, remove_containers_of
from support.fake_cp import DEFAULT_INIT, FakeControlPlane

AgentFactory = Callable[..., AgentProcess]
FIELDS = {"gpu_util", "cpu_util", "ram_util", "mem_util", "inet_in", "inet_out", "status",
          "gpu_temp"}  # fmt: skip
CP_SECRET = DEFAULT_INIT["secret_key"]


def _agent(agent_factory: AgentFactory, cp: FakeControlPlane) -> AgentProcess:
    return agent_factory({"QUDATA_API_KEY": "stats-key-0123", "QUDATA_API_URL": cp.url}).start()


def test_stats_every_three_seconds_on_a_fixed_grid(
    fake_cp: FakeControlPlane, agent_factory: AgentFactory
) -> None:
    _agent(agent_factory, fake_cp)
    calls = fake_cp.wait_for("/stats", count=6, timeout=25)
    times = [c.at for c in calls[:6]]
    intervals = [b - a for a, b in itertools.pairwise(times)]
    mean = sum(intervals) / len(intervals)
    assert 2.9 <= mean <= 3.1, intervals
    assert all(2.5 < i < 3.5 for i in intervals), intervals
    body = calls[0].body
    assert set(body) == FIELDS
    # No instance: the host's figures, status destroyed; no GPU here, none invented.
    assert body["status"] == "destroyed"
    assert body["gpu_util"] == 0 and body["mem_util"] == 0 and body["gpu_temp"] is None
    assert 0 <= body["cpu_util"] <= 100 and 0 < body["ram_util"] <= 100
    assert calls[0].headers["X-Agent-Secret"] == CP_SECRET


def test_stats_follow_the_instance_and_come_at_once_after_actions(
    fake_cp: FakeControlPlane, agent_factory: AgentFactory
) -> None:
    agent = _agent(agent_factory, fake_cp)
    fake_cp.wait_for("/stats")
    api = Api(agent)
    owner = agent_id(agent.state_dir)
    try:
        before = len(fake_cp.requests("/stats"))
        sent = time.time()
        created = api.create(
            image="qudata-test/busybox",
            image_tag="1",
            env_variables={"QUDATA_CPU_CORES": "0.5", "QUDATA_MEMORY_GB": "0.5"},
            command="while :; do :; done",
        )
        assert created.status_code == 202
        first = fake_cp.wait_for("/stats", count=before + 1, timeout=5)[before]
        assert first.at - sent < 1.0, "no report at once after the create"
        api.wait("running")
        # The busy loop uses all of its half core: about 100% of what it was given.
        deadline = time.monotonic() + 20
        busy: list[float] = []
        while time.monotonic() < deadline and len(busy) < 3:
            time.sleep(0.5)
            busy = [c.body["cpu_util"] for c in fake_cp.requests("/stats")
                    if c.body["status"] == "running" and c.body["cpu_util"] > 0]  # fmt: skip
        assert len(busy) >= 3 and 70 <= busy[-1] <= 100, busy
        latest = fake_cp.requests("/stats")[-1].body
        assert 0 < latest["ram_util"] < 50

        count = len(fake_cp.requests("/stats"))
        stopped_at = time.time()
        assert api.act("stop").status_code == 200
        after = fake_cp.wait_for("/stats", count=count + 1, timeout=5)
        paused = [c for c in after[count:] if c.body["status"] == "paused"]
        assert paused and paused[0].at - stopped_at < 1.5
    finally:
        remove_containers_of(owner)


def test_a_slow_control_plane_delays_neither_the_api_nor_later_stats(
    fake_cp: FakeControlPlane, agent_factory: AgentFactory
) -> None:
    agent = _agent(agent_factory, fake_cp)
    fake_cp.wait_for("/stats")
    fake_cp.delays["/v0/stats"] = 6.0
    worst = 0.0
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        started = time.monotonic()
        assert httpx.get(agent.url + "/ping").status_code == 200
        worst = max(worst, time.monotonic() - started)
        time.sleep(0.1)
    assert worst < 0.25
    fake_cp.delays.clear()
    count = len(fake_cp.requests("/stats"))
    # Reports sampled during the stall are delivered, then the grid goes on.
    fake_cp.wait_for("/stats", count=count + 3, timeout=15)
    warnings = [r for r in agent.log_records() if r.get("msg", "").startswith("stats not")]
    assert len(warnings) <= 1
