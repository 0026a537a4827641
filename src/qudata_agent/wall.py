"""The tenant wall of a host's settings, without the agent: its plan and its boot-time apply.

Owns the step from settings to the wall: the firewall plan (bridge, allowed
private networks, the host's resolvers, the tunnel network always blocked) and
the egress policy (blocked ports, denied networks, the connection rate). The
agent builds its guards from these same two functions, `qudata-agent firewall
apply` (the boot unit, before Docker starts containers) applies them, and
`doctor` compares the host with the plan, so the three never disagree.

What stays true: nothing here needs the agent, the store or the control plane;
applying is idempotent (a wall in place is left as it is).
"""

from __future__ import annotations

import ipaddress
import sys

from qudata_agent.adapters.firewall import Firewall
from qudata_agent.adapters.host import resolv_conf_texts
from qudata_agent.adapters.nftables import Nftables
from qudata_agent.config import Settings
from qudata_agent.domain.firewall import FirewallPlan, parse_nameservers
from qudata_agent.domain.firewall import plan as firewall_plan
from qudata_agent.domain.netpolicy import EgressPolicy, ruleset
from qudata_agent.errors import AgentError


def _tunnel_network(s: Settings) -> tuple[str, ...]:
    """The tunnel network, walled off from instances like a private range."""
    if not (s.tunnel and s.tunnel_address):
        return ()
    return (str(ipaddress.IPv4Interface(s.tunnel_address).network),)


def wall_plan(settings: Settings) -> FirewallPlan:
    """The tenant firewall of these settings: the agent's and the boot unit's, the same."""
    resolvers = parse_nameservers(resolv_conf_texts())
    return firewall_plan(
        settings.bridge, settings.egress_allow, resolvers, always_blocked=_tunnel_network(settings)
    )


def apply_wall(settings: Settings) -> int:
    """`qudata-agent firewall apply`: the wall in place without the agent (at boot,
    before Docker starts tenants); 0 when it stands (or the firewall is off), 1 if not."""
    egress = _apply_egress_policy(settings)
    if not settings.firewall:
        print("qudata-agent: the tenant firewall is off (QUDATA_FIREWALL=off): nothing to apply")
        return 0 if egress else 1
    try:
        changed = Firewall().apply(wall_plan(settings))
    except AgentError as e:
        print(
            f"qudata-agent: the tenant firewall could not be applied: {e.message}", file=sys.stderr
        )
        return 1
    print(f"qudata-agent: tenant firewall on {settings.bridge} "
          + ("installed" if changed else "already in place"))  # fmt: skip
    return 0 if egress else 1


def egress_policy(settings: Settings) -> EgressPolicy:
    s = settings
    return EgressPolicy(s.egress_block_ports, s.egress_deny, s.egress_conn_rate)


def _apply_egress_policy(settings: Settings) -> bool:
    """The egress policy (port 25, denied networks, connection rate) without the agent."""
    try:
        Nftables(settings.bridge).apply(ruleset(settings.bridge, egress_policy(settings)))
    except AgentError as e:
        print(f"qudata-agent: the egress policy could not be applied: {e.message}", file=sys.stderr)
        return False
    print(f"qudata-agent: egress policy on {settings.bridge} in place")
    return True
