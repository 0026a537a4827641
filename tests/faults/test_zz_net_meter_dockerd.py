"""The network meter across a restart of the machine's dockerd (sorts last, like the others).

An instance's counters are read, dockerd is stopped (SIGTERM) and started
again; after it, the counters are not lower and keep counting what the
instance moves. A `finally` starts dockerd again whatever happened.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator

import pytest

from faults.test_zz_dockerd_restart import _main_dockerd, _restore_dockerd, _wait
from support.agent_proc import AgentProcess
from support.docker_api import Api, agent_id, remove_containers_of
from support.netns_internet import (
    Internet,
    download,
    forget_meter,
    metered,
    settled,
    until_counted,
)

AgentFactory = Callable[..., AgentProcess]
MB = 1_000_000
ENV = {"QUDATA_NETWORK": "t24net", "QUDATA_BRIDGE": "t24br0", "QUDATA_FIREWALL": "off",
       "QUDATA_PORT_RANGE": "20240-20259"}  # fmt: skip


@pytest.fixture
def internet() -> Iterator[Internet]:
    net = Internet().open()
    yield net
    net.close()


def test_counts_survive_a_dockerd_restart(agent_factory: AgentFactory, internet: Internet) -> None:
    agent = agent_factory(ENV).start()
    api = Api(agent)
    owner = agent_id(agent.state_dir)
    instance_id = ""
    try:
        assert api.create(image="qudata-test/debian", image_tag="12").status_code == 202
        running = api.wait("running", timeout=60)
        container, instance_id = running["container_id"], running["instance_id"]
        start = metered(api, container)
        assert download(container, 5 * MB)[0] == 5 * MB
        before = settled(api, "rx_public_bytes", start["rx_public_bytes"] + 5 * MB)
        pid = _main_dockerd()
        try:
            os.kill(pid, signal.SIGTERM)
            _wait(lambda: not os.path.exists(f"/proc/{pid}"), 60, "dockerd stopped")
        finally:
            _restore_dockerd()
        api.wait("running", timeout=60)
        until_counted(api, container)  # counting again (a new run, if Docker restarted it)
        during = settled(api, "rx_public_bytes", before["rx_public_bytes"] + 1)
        assert all(during[k] >= before[k] for k in before)
        assert download(container, 5 * MB)[0] == 5 * MB
        after = settled(api, "rx_public_bytes", during["rx_public_bytes"] + 5 * MB)
        assert after["rx_public_bytes"] - during["rx_public_bytes"] < 5.2 * MB
    finally:
        api.client.close()
        remove_containers_of(owner)
        forget_meter(instance_id)
