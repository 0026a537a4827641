"""The tenant firewall plan (pure) and its idempotent application on the real iptables."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from qudata_agent.adapters.firewall import Firewall
from qudata_agent.domain.firewall import (
    BLOCKED_RANGES,
    EGRESS_CHAIN,
    HOST_CHAIN,
    FirewallPlan,
    Jump,
    expected_listing,
    parse_allow_list,
    parse_nameservers,
    plan,
)


def test_plan_orders_replies_dns_allow_then_drops() -> None:
    p = plan("qd0", allow=("10.1.0.0/16",), dns_servers=("10.255.255.53",))
    egress = p.chains[EGRESS_CHAIN]
    assert egress[0][-2:] == ["-j", "RETURN"] and "RELATED,ESTABLISHED" in egress[0]
    assert egress[1][:2] == ["-d", "10.255.255.53/32"] and "53" in egress[1]
    assert ["-d", "10.1.0.0/16", "-j", "RETURN"] in egress
    drops = [rule[1] for rule in egress if rule[-1] == "DROP"]
    assert drops == list(BLOCKED_RANGES)
    assert egress.index(["-d", "10.1.0.0/16", "-j", "RETURN"]) < len(egress) - len(drops) - 1
    assert p.chains[HOST_CHAIN][-1] == ["-j", "DROP"]
    assert {j.chain for j in p.jumps} == {"DOCKER-USER", "INPUT"}
    assert all(j.args[:2] == ("-i", "qd0") for j in p.jumps)


def test_allow_list_and_nameservers_parse() -> None:
    assert parse_allow_list(" 10.1.2.3 , 192.168.0.0/24,") == ("10.1.2.3/32", "192.168.0.0/24")
    with pytest.raises(ValueError):
        parse_allow_list("10.1.2.300")
    text = "# c\nnameserver 127.0.0.53\nnameserver 10.0.0.2\nnameserver ::1\nnameserver 10.0.0.2\n"
    assert parse_nameservers(text) == ("10.0.0.2",)


@pytest.fixture
def scratch() -> Iterator[FirewallPlan]:
    """A plan on chains of the test's own, jumped to from a chain of its own."""
    subprocess.run(["iptables", "-N", "QDTEST-FROM"], check=False, capture_output=True)
    test_plan = FirewallPlan(
        chains={"QDTEST-A": [["-d", "10.0.0.0/8", "-j", "DROP"], ["-j", "RETURN"]]},
        jumps=(Jump("QDTEST-FROM", ("-i", "qdtest0", "-j", "QDTEST-A")),),
    )
    yield test_plan
    Firewall().remove(test_plan)
    subprocess.run(["iptables", "-X", "QDTEST-FROM"], check=False, capture_output=True)


def _listing(chain: str) -> list[str]:
    out = subprocess.run(["iptables", "-S", chain], capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def test_apply_is_idempotent_repairs_drift_and_removes_cleanly(scratch: FirewallPlan) -> None:
    wall = Firewall()
    assert wall.apply(scratch) is True
    assert wall.apply(scratch) is False  # already right: nothing touched
    assert _listing("QDTEST-A") == expected_listing("QDTEST-A", scratch.chains["QDTEST-A"])
    assert _listing("QDTEST-FROM") == ["-N QDTEST-FROM", "-A QDTEST-FROM -i qdtest0 -j QDTEST-A"]
    subprocess.run(["iptables", "-A", "QDTEST-A", "-j", "ACCEPT"], check=True)  # drift
    assert wall.apply(scratch) is True
    assert _listing("QDTEST-A") == expected_listing("QDTEST-A", scratch.chains["QDTEST-A"])
    wall.remove(scratch)
    assert _listing("QDTEST-FROM") == ["-N QDTEST-FROM"]
    done = subprocess.run(["iptables", "-S", "QDTEST-A"], capture_output=True, check=False)
    assert done.returncode != 0


def test_problems_reads_without_changing(scratch: FirewallPlan) -> None:
    wall = Firewall()
    assert wall.problems(scratch) == [
        "chain QDTEST-A is missing",
        "no jump -i qdtest0 -j QDTEST-A in QDTEST-FROM",
    ]
    assert subprocess.run(["iptables", "-S", "QDTEST-A"], capture_output=True).returncode != 0
    wall.apply(scratch)
    assert wall.problems(scratch) == []
    subprocess.run(["iptables", "-A", "QDTEST-A", "-j", "ACCEPT"], check=True)  # drift
    assert wall.problems(scratch) == ["chain QDTEST-A differs from the plan"]
    assert _listing("QDTEST-A")[-1] == "-A QDTEST-A -j ACCEPT"  # left as found


def test_a_wall_that_stands_is_checked_with_one_listing(
    scratch: FirewallPlan, tmp_path: Path
) -> None:
    """Every create checks the wall: when nothing differs, one iptables call (the whole
    table listed once), not one per chain and per jump; any drift is still repaired."""
    calls = tmp_path / "calls"
    counting = tmp_path / "iptables"
    counting.write_text(f'#!/bin/sh\necho "$*" >> {calls}\nexec iptables "$@"\n')
    counting.chmod(0o755)
    wall = Firewall(str(counting))
    assert wall.apply(scratch) is True
    calls.write_text("")
    assert wall.apply(scratch) is False
    assert calls.read_text().splitlines() == ["-w 5 -S"]
    subprocess.run(["iptables", "-D", "QDTEST-FROM", "-i", "qdtest0", "-j", "QDTEST-A"], check=True)
    assert wall.apply(scratch) is True  # the jump was gone: put back
    assert _listing("QDTEST-FROM") == ["-N QDTEST-FROM", "-A QDTEST-FROM -i qdtest0 -j QDTEST-A"]


def test_a_failing_whole_table_listing_falls_back_to_the_chain_by_chain_check(
    scratch: FirewallPlan, tmp_path: Path
) -> None:
    """The one-listing check answers only when it read the table; a listing that fails
    is never taken for a wall that stands: the chains are looked at and repaired."""
    failing = tmp_path / "iptables"
    failing.write_text('#!/bin/sh\n[ "$*" = "-w 5 -S" ] && exit 4\nexec iptables "$@"\n')
    failing.chmod(0o755)
    wall = Firewall(str(failing))
    assert wall.apply(scratch) is True  # nothing there yet: made
    assert wall.apply(scratch) is False  # stands: seen chain by chain
    subprocess.run(["iptables", "-A", "QDTEST-A", "-j", "ACCEPT"], check=True)  # drift
    assert wall.apply(scratch) is True
    assert _listing("QDTEST-A") == expected_listing("QDTEST-A", scratch.chains["QDTEST-A"])
