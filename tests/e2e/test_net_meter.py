"""Network use: metered public and private, capped, and the egress policy (CONTRACT.md §8).

An instance on the agent's own bridge talks to a namespace standing for the
internet (`support.netns_internet`): the agent's counters must match what was
moved, never go back over the agent's kill -9 and a container restart, the
cap must hold the rate, and port 25 and a connection burst must be refused
and counted.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from support.agent_proc import AgentProcess
from support.docker_api import Api, agent_id, docker, remove_containers_of
from support.netns_internet import PRIVATE, PUBLIC, Internet

AgentFactory = Callable[..., AgentProcess]
DEBIAN = {"image": "qudata-test/debian", "image_tag": "12"}
MB = 1_000_000
# The agent's own network, bridge and ports: other agents under test leave them alone.
ENV = {
    "QUDATA_NETWORK": "t24net",
    "QUDATA_BRIDGE": "t24br0",
    "QUDATA_FIREWALL": "off",
    "QUDATA_PORT_RANGE": "20240-20259",
}


@pytest.fixture(scope="module")
def internet() -> Iterator[Internet]:
    net = Internet().open()
    yield net
    net.close()


@pytest.fixture
def tenant(
    agent_factory: AgentFactory, request: pytest.FixtureRequest
) -> Iterator[tuple[Api, str]]:
    """A running instance; `request.param` may add agent settings and the order's env."""
    extra: dict[str, Any] = getattr(request, "param", {})
    agent = agent_factory({**ENV, **extra.get("agent", {})}).start()
    api = Api(agent)
    owner = agent_id(agent.state_dir)
    resp = api.create(**DEBIAN, env_variables=extra.get("order", {}))
    assert resp.status_code == 202, resp.text
    state = api.wait("running", timeout=60)
    yield api, state["container_id"]
    api.client.close()
    remove_containers_of(owner)


def bash(container: str, script: str) -> str:
    return docker("exec", container, "bash", "-c", script)


def download(container: str, n: int, address: str = PUBLIC) -> tuple[int, float]:
    """Bytes received and seconds taken, measured in the container."""
    out = bash(
        container,
        f"s=$(date +%s.%N); exec 3<>/dev/tcp/{address}/8001; echo {n} >&3;"
        " got=$(cat <&3 | wc -c); e=$(date +%s.%N); echo $got $s $e",
    )
    got, start, end = out.split()
    return int(got), float(end) - float(start)


def upload(container: str, internet: Internet, n: int, address: str = PUBLIC) -> tuple[int, float]:
    """Bytes the namespace received and the seconds between its first and last byte."""
    bash(container, f"head -c {n} /dev/zero > /dev/tcp/{address}/8002")
    event = internet.next("upload")
    return int(event["bytes"]), float(event["seconds"])


def network(api: Api) -> dict[str, int]:
    found = api.get().get("network")
    return dict(found) if found else {}


def settled(api: Api, key: str, at_least: int, timeout: float = 20) -> dict[str, int]:
    """The view's counters once `key` reached `at_least` and stopped moving."""
    deadline = time.monotonic() + timeout
    last: dict[str, int] = {}
    while time.monotonic() < deadline:
        now = network(api)
        if now and now.get(key, 0) >= at_least and now == last:
            return now
        last = now
        time.sleep(3.2)
    raise AssertionError(f"{key} below {at_least} after {timeout}s: {last}")


def metrics(api: Api) -> str:
    resp = api.client.get("/metrics")
    assert resp.status_code == 200
    return resp.text


def series(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} {labels} in /metrics")


def within(value: float, expected: float, share: float) -> bool:
    return abs(value - expected) <= expected * share


def test_public_and_private_bytes_are_metered(tenant: tuple[Api, str], internet: Internet) -> None:
    api, container = tenant
    before = settled(api, "rx_bytes", 0)
    assert download(container, 50 * MB)[0] == 50 * MB
    middle = settled(api, "rx_public_bytes", before["rx_public_bytes"] + 50 * MB)
    assert upload(container, internet, 20 * MB)[0] == 20 * MB
    after = settled(api, "tx_public_bytes", middle["tx_public_bytes"] + 20 * MB)
    rx = middle["rx_public_bytes"] - before["rx_public_bytes"]
    tx = after["tx_public_bytes"] - middle["tx_public_bytes"]
    assert within(rx, 50 * MB, 0.02), rx  # IP bytes: the headers are in the 2%
    assert within(tx, 20 * MB, 0.02), tx
    # To a private address: counted, but not as public.
    assert download(container, 5 * MB, PRIVATE)[0] == 5 * MB
    private = settled(api, "rx_bytes", after["rx_bytes"] + 5 * MB)
    assert within(private["rx_bytes"] - after["rx_bytes"], 5 * MB, 0.02)
    assert private["rx_public_bytes"] - after["rx_public_bytes"] < 0.01 * MB
    text = metrics(api)
    instance_id = api.get()["instance_id"]
    assert series(
        text, "qudata_instance_network_bytes_total", instance_id=instance_id,
        direction="rx", scope="public",
    ) == private["rx_public_bytes"]  # fmt: skip
