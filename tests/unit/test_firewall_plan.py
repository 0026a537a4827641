"""The tenant wall as data (the ranges, DNS to the host's resolvers) and the guard failing closed.

The guard is driven by a fake of the agent's own `Wall` interface; the real
iptables is exercised in tests/integration/test_firewall.py and
tests/e2e/test_wall_without_agent.py.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Iterator

import pytest

from qudata_agent.adapters.docker.ports import DockerPorts
from qudata_agent.adapters.firewall import FirewallError
from qudata_agent.blocking import Blocking
from qudata_agent.domain.firewall import (
    BLOCKED_RANGES,
    EGRESS_CHAIN,
    FirewallPlan,
    blocked,
    dns_exceptions,
    plan,
)
from qudata_agent.domain.network import NetworkInfo
from qudata_agent.errors import Unavailable
from qudata_agent.services.network import NetworkGuard

DOCUMENTATION = ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")


def _drops(p: FirewallPlan) -> list[str]:
    return [rule[1] for rule in p.chains[EGRESS_CHAIN] if rule[-1] == "DROP"]


@pytest.mark.parametrize(
    "address",
    ["168.63.129.16", "198.18.0.1", "198.19.255.254", "192.0.0.8", "224.0.0.251",
     "239.255.255.250", "240.0.0.1", "255.255.255.255", "169.254.169.254",
     "100.100.100.200", "10.1.2.3", "172.31.0.1", "192.168.1.1"],
)  # fmt: skip
def test_the_ranges_a_tenant_must_never_reach_are_dropped(address: str) -> None:
    assert blocked(address)
    ip = ipaddress.ip_address(address)
    assert any(ip in ipaddress.ip_network(n) for n in _drops(plan("qd0")))


@pytest.mark.parametrize("network", DOCUMENTATION)
def test_the_documentation_ranges_stay_reachable(network: str) -> None:
    net = ipaddress.ip_network(network)
    assert not any(net.overlaps(ipaddress.ip_network(n)) for n in BLOCKED_RANGES)
    assert not blocked(str(net[1])) and not blocked("1.1.1.1") and not blocked("8.8.8.8")


def test_the_drops_are_exactly_the_blocked_ranges_and_each_is_valid() -> None:
    assert _drops(plan("qd0")) == list(BLOCKED_RANGES)
    for network in BLOCKED_RANGES:
        assert str(ipaddress.ip_network(network)) == network  # iptables prints it back so


def test_dns_to_a_lan_resolver_opens_only_when_the_host_has_no_other() -> None:
    assert dns_exceptions(("10.255.255.53",)) == ("10.255.255.53",)
    assert dns_exceptions(("168.63.129.16",)) == ("168.63.129.16",)  # Azure's only resolver
    assert dns_exceptions(("10.0.0.2", "192.168.1.1")) == ("10.0.0.2", "192.168.1.1")
    assert dns_exceptions(("192.168.1.1", "1.1.1.1")) == ()  # the public one is enough
    assert dns_exceptions(()) == ()


def test_the_plan_opens_port_53_only_to_the_excepted_resolvers() -> None:
    def dns_targets(p: FirewallPlan) -> set[str]:
        return {rule[1] for rule in p.chains[EGRESS_CHAIN] if "53" in rule}

    assert dns_targets(plan("qd0", dns_servers=("10.0.0.2",))) == {"10.0.0.2/32"}
    assert dns_targets(plan("qd0", dns_servers=("10.0.0.2", "9.9.9.9"))) == set()


# -- the guard fails closed ------------------------------------------------------


class FakeWall:
    """The agent's `Wall` interface: counts checks, fails while `broken`."""

    def __init__(self) -> None:
        self.broken = False
        self.checks = 0

    def apply(self, plan: FirewallPlan) -> bool:
        self.checks += 1
        if self.broken:
            raise FirewallError("iptables -S QUDATA-EGRESS: broken")
        return False


class FakeNetworks:
    def __init__(self) -> None:
        self.created: list[str] = []

    def find_network(self, name: str) -> NetworkInfo | None:
        return None

    def create_network(self, name: str, bridge: str, labels: dict[str, str]) -> str:
        self.created.append(name)
        return "net-id"

    def remove_network(self, network_id: str) -> None:
        raise AssertionError("nothing to remove")


@pytest.fixture
def blocking() -> Iterator[Blocking]:
    pool = Blocking(2, 2)
    yield pool
    pool.close()


def _guard(wall: FakeWall, networks: FakeNetworks, blocking: Blocking) -> NetworkGuard:
    return NetworkGuard(
        DockerPorts(networks, blocking),  # type: ignore[arg-type]
        wall,
        blocking,
        name="qudata",
        bridge="qd0",
        agent_id="a",
        wall_plan=plan("qd0"),
    )


async def test_after_a_good_check_a_broken_wall_refuses_with_the_reason(
    blocking: Blocking,
) -> None:
    wall, networks = FakeWall(), FakeNetworks()
    guard = _guard(wall, networks, blocking)
    await guard.prepare()
    await guard.prepare()
    assert networks.created == ["qudata"] and wall.checks == 2  # the network once, the wall each
    wall.broken = True
    with pytest.raises(Unavailable, match=r"firewall cannot be verified.*broken"):
        await guard.prepare()
    with pytest.raises(Unavailable):
        await guard.verify()
    wall.broken = False
    await guard.verify()


async def test_creates_waiting_together_share_one_check(blocking: Blocking) -> None:
    wall = FakeWall()
    guard = _guard(wall, FakeNetworks(), blocking)
    await asyncio.gather(*(guard.verify() for _ in range(10)))
    assert 1 <= wall.checks < 10


async def test_the_firewall_off_verifies_nothing(blocking: Blocking) -> None:
    guard = NetworkGuard(
        DockerPorts(FakeNetworks(), blocking), None, blocking, name="q", bridge="qd0", agent_id="a"
    )
    await guard.verify()
    await guard.check()


async def test_a_build_relies_on_its_creates_check_and_no_older_one(blocking: Blocking) -> None:
    wall = FakeWall()
    guard = _guard(wall, FakeNetworks(), blocking)
    asked = time.monotonic()
    await guard.verify()  # the create's check
    await guard.prepare(asked)  # its build: no second check
    assert wall.checks == 1
    await guard.prepare()  # anything else: a check of its own
    assert wall.checks == 2
    wall.broken = True
    with pytest.raises(Unavailable):
        await guard.verify()
    with pytest.raises(Unavailable):  # a failed check since: the build checks again, and fails
        await guard.prepare(asked)
