"""The tenant network wall: the iptables rules, as data.

Instances run on the agent's own bridge. Two chains of the agent's own hold
the policy, reached by one jump each from Docker's DOCKER-USER chain (traffic
the host forwards) and from INPUT (traffic to the host itself):

    QUDATA-EGRESS  (from DOCKER-USER, -i <bridge>): replies pass; DNS to the
                   host's own resolvers passes (Docker's embedded DNS asks them
                   from inside the container, and they often sit in a private
                   range); the allow-list passes; private, link-local and
                   carrier-grade NAT ranges are dropped; the rest (the internet)
                   returns to Docker's rules.
    QUDATA-HOST    (from INPUT, -i <bridge>): replies pass; everything else an
                   instance sends to the host itself (the agent's API, sshd,
                   anything listening on any host address) is dropped.

Published ports keep working: they enter through DNAT and leave the bridge as
replies. Pure: `plan()` says what should exist; the adapter makes it so.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

EGRESS_CHAIN = "QUDATA-EGRESS"
HOST_CHAIN = "QUDATA-HOST"
BLOCKED_RANGES: tuple[str, ...] = (
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "169.254.0.0/16",
    "100.64.0.0/10",
)
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


def plan(
    bridge: str,
    allow: tuple[str, ...] = (),
    dns_servers: tuple[str, ...] = (),
    always_blocked: tuple[str, ...] = (),
) -> FirewallPlan:
    """`always_blocked`: networks dropped before the allow-list (tunnel mode's tunnel network)."""
    egress = [[*_REPLIES, "-j", "RETURN"]]
    for server in dns_servers:
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
