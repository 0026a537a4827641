"""The network meter's pure parts: settings, the accounting, the nftables text, the tc plan."""

from __future__ import annotations

import pytest

from qudata_agent.domain.netpolicy import (
    EgressPolicy,
    NetworkUse,
    Tally,
    burst_bytes,
    counter_names,
    elements_script,
    ifb_name,
    is_public,
    parse_mbps,
    parse_ports,
    ruleset,
    shaping_commands,
)
from qudata_agent.errors import InvalidRequest


def test_a_tally_never_goes_back() -> None:
    t = Tally().advance(100).advance(250)
    assert t == Tally(250, 250)
    # The kernel's counter began anew (a reboot): all it holds is new.
    t = t.advance(40)
    assert t == Tally(40, 290)
    # A counter about to be made again starts at 0; the total stays.
    assert t.restarted().advance(10) == Tally(10, 300)


def test_the_same_reading_twice_counts_once() -> None:
    assert Tally(500, 900).advance(500) == Tally(500, 900)


def test_network_use_adds_public_and_private() -> None:
    use = NetworkUse.of(
        {"rx_public": Tally(0, 10), "rx_private": Tally(0, 5), "tx_public": Tally(0, 7),
         "refused_port": Tally(0, 3)}
    )  # fmt: skip
    assert use.wire() == {
        "rx_bytes": 15, "tx_bytes": 7, "rx_public_bytes": 10, "tx_public_bytes": 7
    }  # fmt: skip
    assert dict(use.refused) == {"port": 3, "deny": 0, "rate": 0}


@pytest.mark.parametrize("raw", ["0", "-1", "abc", "1e9", "nan", "", "0.01"])
def test_a_bad_net_mbps_is_refused_naming_it(raw: str) -> None:
    with pytest.raises(InvalidRequest, match="QUDATA_NET_MBPS"):
        parse_mbps({"QUDATA_NET_MBPS": raw})


def test_net_mbps() -> None:
    assert parse_mbps({}) is None
    assert parse_mbps({"QUDATA_NET_MBPS": " 20 "}) == 20.0
    assert parse_mbps({"QUDATA_NET_MBPS": "0.5"}) == 0.5


def test_ports() -> None:
    assert parse_ports("25, 465,25") == (25, 465)
    assert parse_ports("none") == ()
    with pytest.raises(ValueError):
        parse_ports("70000")
    with pytest.raises(ValueError):
        parse_ports("smtp")


def test_public_is_outside_private_and_link_local() -> None:
    assert is_public("198.51.100.7")
    assert not is_public("10.1.2.3")
    assert not is_public("169.254.169.254")
    assert not is_public("172.20.0.2")


def test_the_ruleset_keeps_counts_and_rewrites_the_policy() -> None:
    text = ruleset("qudata0", EgressPolicy((25, 587), ("203.0.113.0/24",), 50))
    assert "add table ip qudata_net_qudata0" in text
    assert "flush set ip qudata_net_qudata0 block_ports" in text
    assert "add element ip qudata_net_qudata0 block_ports { 25, 587 }" in text
    assert "add element ip qudata_net_qudata0 deny { 203.0.113.0/24 }" in text
    assert "limit rate over 50/second burst 50 packets" in text
    assert "flush map" not in text and "delete" not in text  # the counts stay
    assert "limit rate" not in ruleset("qudata0", EgressPolicy(conn_rate=0))


def test_elements_point_an_address_at_every_counter_of_its_instance() -> None:
    text = elements_script("qudata0", {"172.18.0.2": "ab-cd"}, ["172.18.0.9"])
    names = counter_names("ab-cd")
    assert len(names) == 7
    for name in names.values():
        assert f'172.18.0.2 : "{name}"' in text
    assert text.count("delete element") == 7


def test_shaping_both_directions() -> None:
    with_ifb = shaping_commands("veth1", "qdifb1", 20)
    assert ["tc", "qdisc", "replace", "dev", "veth1", "root", "tbf", "rate", "20mbit",
            "burst", str(burst_bytes(20)), "latency", "50ms"] in with_ifb  # fmt: skip
    assert any("redirect" in cmd and "qdifb1" in cmd for cmd in with_ifb)
    policed = shaping_commands("veth1", None, 20)
    assert any("police" in cmd for cmd in policed)
    assert len(ifb_name("0123456789abcdef-ffff")) <= 15
