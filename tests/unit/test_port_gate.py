"""The SSH port gate's rules, as data."""

from __future__ import annotations

import pytest

from qudata_agent.domain.port_gate import CHAIN, comment, gate_rule, left_behind, own_ports


def test_the_rule_refuses_new_connections_to_one_port_with_a_reset() -> None:
    rule = gate_rule(22005, "agent-a")
    assert rule[-4:] == ("-j", "REJECT", "--reject-with", "tcp-reset")
    assert rule[rule.index("--ctorigdstport") + 1] == "22005"
    assert "NEW" in rule and comment("agent-a") in rule


@pytest.mark.parametrize("port", [0, -1, 65536])
def test_a_port_out_of_range_is_refused(port: int) -> None:
    with pytest.raises(ValueError):
        gate_rule(port, "agent-a")


def test_own_ports_reads_this_agents_rules_only() -> None:
    listing = [
        f"-N {CHAIN}",
        f"-A {CHAIN} -p tcp -m conntrack --ctstate NEW --ctorigdstport 22001 -m comment"
        f' --comment "{comment("agent-a")}" -j REJECT --reject-with tcp-reset',
        f"-A {CHAIN} -p tcp -m conntrack --ctstate NEW --ctorigdstport 22002 -m comment"
        f' --comment "{comment("agent-b")}" -j REJECT --reject-with tcp-reset',
        f"-A {CHAIN} -p tcp -m conntrack --ctstate NEW --ctorigdstport 22003 -m comment"
        f' --comment "{comment("agent-ab")}" -j REJECT --reject-with tcp-reset',
    ]
    assert own_ports(listing, "agent-a") == [22001]
    assert own_ports(listing, "agent-b") == [22002]
    assert own_ports([], "agent-a") == []


def _rule(port: int, agent_id: str) -> str:
    return (
        f"-A {CHAIN} -p tcp -m conntrack --ctstate NEW --ctorigdstport {port} -m comment"
        f' --comment "{comment(agent_id)}" -j REJECT --reject-with tcp-reset'
    )


def test_a_starting_agent_takes_its_own_rules_and_any_on_its_ports() -> None:
    """Another id's rule on a port of this agent's range was left by an agent that is no
    more (a reinstall gives a new id); outside the range it may be a live neighbour's."""
    listing = [
        f"-N {CHAIN}",
        _rule(22001, "agent-a"),  # its own, outside its range now: still its own
        _rule(40001, "agent-old"),  # on its range
        _rule(50000, "agent-b"),  # elsewhere
        "-A OTHER -p tcp --dport 40002 -j REJECT",  # not a gate
        _rule(40003, ""),  # a gate comment naming no agent: not ours to judge
        _rule(40004, "agent-c").replace("40004", "4x004"),  # no port to read
    ]
    assert left_behind(listing, "agent-a", (40000, 49999)) == [
        (22001, "agent-a"),
        (40001, "agent-old"),
    ]
    assert left_behind(listing, "agent-a", None) == [(22001, "agent-a")]
