"""The tenant network wall: the iptables rules, as data.

Instances run on the agent's own bridge. Two chains of the agent's own hold
the policy, reached by one jump each from Docker's DOCKER-USER chain (traffic
the host forwards) and from INPUT (traffic to the host itself):

    QUDATA-EGRESS  (from DOCKER-USER, -i <bridge>): replies pass; DNS to the
                   host's own resolvers passes when they all sit in a blocked
                   range (Docker's embedded DNS asks them from inside the
                   container: a host whose only resolver is on the LAN or the
                   cloud's own needs it; a host with any other resolver does
                   not get the LAN one opened); the allow-list passes; the
                   `BLOCKED_RANGES` are dropped; the rest (the internet)
                   returns to Docker's rules.
    QUDATA-HOST    (from INPUT, -i <bridge>): replies pass; everything else an
                   instance sends to the host itself (the agent's API, sshd,
                   anything listening on any host address) is dropped.

Published ports keep working: they enter through DNAT and leave the bridge as
replies. Pure: `plan()` says what should exist; the adapter makes it so, and
the same plan is installed before Docker starts at boot (`qudata-agent
firewall apply`, from the saved settings) and on every check of the running
agent. A new policy adds a chain of its own to `FirewallPlan.chains` and a
jump to `FirewallPlan.jumps`; the adapter and the uninstaller need no change.

What stays true: the documentation ranges (192.0.2.0/24, 198.51.100.0/24,
203.0.113.0/24) are never blocked (they stand for the internet in tests).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

EGRESS_CHAIN = "QUDATA-EGRESS"
HOST_CHAIN = "QUDATA-HOST"
# What a tenant must never reach, and why (RFC 6890's special-purpose registry).
BLOCKED: tuple[tuple[str, str], ...] = (
    ("10.0.0.0/8", "private (the provider's LAN)"),
    ("172.16.0.0/12", "private"),
    ("192.168.0.0/16", "private"),
    ("169.254.0.0/16", "link-local: cloud metadata at 169.254.169.254"),
    ("100.64.0.0/10", "carrier-grade NAT: some clouds' metadata (100.100.100.200)"),
    ("168.63.129.16/32", "Azure's wireserver: the VM's agent channel, metadata, DNS"),
    ("198.18.0.0/15", "benchmarking: used inside some providers' networks"),
    ("192.0.0.0/24", "IETF protocol assignments (e.g. DS-Lite's B4/AFTR)"),
    ("224.0.0.0/4", "multicast: the LAN's discovery protocols (mDNS, SSDP)"),
    ("240.0.0.0/4", "reserved, and the broadcast address"),
)
BLOCKED_RANGES: tuple[str, ...] = tuple(network for network, _why in BLOCKED)
_REPLIES = ["-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED"]


@dataclass(frozen=True)
class Jump:
    chain: str  # the built-in or Docker chain that jumps
    args: tuple[str, ...]


@dataclass(frozen=True)
class FirewallPlan:
    chains: dict[str, list[list[str]]]  # our chain -> its rules (without "-A CHAIN")
    jumps: tuple[Jump, ...]


def parse_allow_list(text: str) -> tuple[str, ...]:
    """Comma-separated networks (`10.1.0.0/16, 192.168.5.7`), normalised; ValueError if bad."""
    networks = []
    for item in text.split(","):
        item = item.strip()
        if item:
            networks.append(str(ipaddress.ip_network(item, strict=False)))
    return tuple(networks)


def parse_nameservers(resolv_conf: str) -> tuple[str, ...]:
    """The IPv4 nameservers of a resolv.conf, loopback ones left out (they are the host's)."""
    found = []
    for line in resolv_conf.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                address = ipaddress.ip_address(fields[1])
            except ValueError:
                continue
            if address.version == 4 and not address.is_loopback and str(address) not in found:
                found.append(str(address))
    return tuple(found)


def blocked(address: str) -> bool:
    """Whether the wall drops traffic to `address` (before any allow-list)."""
    ip = ipaddress.ip_address(address)
    return any(ip in ipaddress.ip_network(network) for network in BLOCKED_RANGES)


def dns_exceptions(resolvers: tuple[str, ...]) -> tuple[str, ...]:
    """The host's resolvers the wall opens port 53 to: the blocked ones, and only
    when the host has no other (then Docker's embedded DNS has nowhere else to ask)."""
    inside = tuple(r for r in resolvers if blocked(r))
    return inside if len(inside) == len(resolvers) else ()


def plan(
    bridge: str,
    allow: tuple[str, ...] = (),
    dns_servers: tuple[str, ...] = (),
    always_blocked: tuple[str, ...] = (),
) -> FirewallPlan:
    """The wall for `bridge`. `dns_servers`: the host's resolvers (`parse_nameservers`);
    `always_blocked`: networks dropped before the allow-list (tunnel mode's tunnel network)."""
    egress = [[*_REPLIES, "-j", "RETURN"]]
    for server in dns_exceptions(dns_servers):
        for proto in ("udp", "tcp"):
            egress.append(
                ["-d", f"{server}/32", "-p", proto, "-m", proto, "--dport", "53", "-j", "RETURN"]
            )
    egress += [["-d", network, "-j", "DROP"] for network in always_blocked]
    egress += [["-d", network, "-j", "RETURN"] for network in allow]
    egress += [["-d", network, "-j", "DROP"] for network in BLOCKED_RANGES]
    egress.append(["-j", "RETURN"])
    host = [[*_REPLIES, "-j", "RETURN"], ["-j", "DROP"]]
    return FirewallPlan(
        chains={EGRESS_CHAIN: egress, HOST_CHAIN: host},
        jumps=(
            Jump("DOCKER-USER", ("-i", bridge, "-j", EGRESS_CHAIN)),
            Jump("INPUT", ("-i", bridge, "-j", HOST_CHAIN)),
        ),
    )


def expected_listing(chain: str, rules: list[list[str]]) -> list[str]:
    """What `iptables -S CHAIN` prints when the chain holds exactly `rules`."""
    return [f"-N {chain}"] + [f"-A {chain} " + " ".join(rule) for rule in rules]
