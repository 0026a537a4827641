"""POST /stats with QUDATA_MAX_INSTANCES above 1: the host's figures and every instance's."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

from support.agent_proc import AgentProcess
from support.docker_api import Api, agent_id, remove_containers_of
from support.fake_cp import FakeControlPlane

AgentFactory = Callable[..., AgentProcess]
FIELDS = {"gpu_util", "cpu_util", "ram_util", "mem_util", "inet_in", "inet_out", "status",
          "gpu_temp"}  # fmt: skip
# Each instance entry also carries its metered bytes (CONTRACT.md section 8).
NETWORK = {"rx_bytes", "tx_bytes", "rx_public_bytes", "tx_public_bytes"}


def test_stats_carry_every_instance_on_the_three_second_grid(
    fake_cp: FakeControlPlane, agent_factory: AgentFactory
) -> None:
    agent = agent_factory(
        {
            "QUDATA_API_KEY": "stats-key-0123",
            "QUDATA_API_URL": fake_cp.url,
            "QUDATA_MAX_INSTANCES": "4",
        }
    ).start()
    first = fake_cp.wait_for("/stats")[0].body
    assert set(first) == FIELDS | {"instances"}
    assert first["instances"] == [] and first["status"] == "destroyed"
    api = Api(agent)
    owner = agent_id(agent.state_dir)
    try:
        created = api.create(
            image="qudata-test/busybox",
            image_tag="1",
            env_variables={"QUDATA_CPU_CORES": "0.5", "QUDATA_MEMORY_GB": "0.25"},
            command="while :; do :; done",
        )
        assert created.status_code == 202
        instance_id = created.json()["data"]["instance_id"]
        api.wait("running")
        deadline = time.monotonic() + 20
        busy: list[dict[str, object]] = []
        while time.monotonic() < deadline and len(busy) < 3:
            time.sleep(0.5)
            busy = [e for c in fake_cp.requests("/stats") for e in c.body["instances"]
                    if e["status"] == "running" and e["cpu_util"] > 0]  # fmt: skip
        assert len(busy) >= 3, busy
        entry = busy[-1]
        assert set(entry) == FIELDS | {"instance_id"} | NETWORK, entry
        assert entry["instance_id"] == instance_id
        assert 70 <= float(entry["cpu_util"]) <= 100, entry  # of its half core
        latest = fake_cp.requests("/stats")[-1].body
        assert latest["status"] == "running"
        assert latest["cpu_util"] < 100 and latest["ram_util"] > 0  # the host's own
        count = len(fake_cp.requests("/stats"))
        calls = fake_cp.wait_for("/stats", count=count + 4, timeout=20)[count:]
        intervals = [b.at - a.at for a, b in itertools.pairwise(calls)]
        assert all(2.5 < i < 3.5 for i in intervals), intervals
        assert all(len(c.body["instances"]) == 1 for c in calls)  # one call carries them all
    finally:
        remove_containers_of(owner)
