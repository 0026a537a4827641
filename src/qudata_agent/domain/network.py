"""What the instances' network must be, and what is wrong with one found on the host.

The agent creates its bridge network itself, but on adoption (a network of
that name already exists: made by an earlier agent, or by someone else) it
checks it rather than trusting the name. Pure: the adapter reads Docker's
answer into `NetworkInfo`.

What stays true: a network is adopted only when it is a bridge on the
configured Linux bridge, with inter-container traffic off (tenants never
reach each other) and without IPv6 (the wall is IPv4 iptables: an IPv6 path
would go around it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

OPT_BRIDGE = "com.docker.network.bridge.name"
OPT_ICC = "com.docker.network.bridge.enable_icc"


@dataclass(frozen=True)
class NetworkInfo:
    name: str
    network_id: str
    driver: str
    options: dict[str, str] = field(default_factory=dict)
    ipv6: bool = False
    internal: bool = False
    containers: int = 0  # endpoints attached now


def network_options(bridge: str) -> dict[str, str]:
    """The driver options the agent creates its network with."""
    return {OPT_BRIDGE: bridge, OPT_ICC: "false"}


def problems(found: NetworkInfo, bridge: str) -> list[str]:
    """Why `found` cannot serve as the instances' network (empty: it can)."""
    wrong = []
    if found.driver != "bridge":
        wrong.append(f"driver is {found.driver!r}, not 'bridge'")
    if found.options.get(OPT_BRIDGE) != bridge:
        wrong.append(f"its Linux bridge is {found.options.get(OPT_BRIDGE)!r}, not {bridge!r}")
    if found.options.get(OPT_ICC, "true").lower() != "false":
        wrong.append("traffic between containers is on (instances could reach each other)")
    if found.ipv6:
        wrong.append("IPv6 is on (the firewall covers IPv4 only)")
    return wrong
