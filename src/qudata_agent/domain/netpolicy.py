"""Network use per instance: the meter, the caps and the egress policy, as data.

Pure: no I/O. Owns
- the policy read from settings and orders (`EgressPolicy`, `parse_ports`,
  `parse_mbps`), and which addresses are "private" (`PRIVATE_RANGES`);
- the nftables table of one bridge, as the text of one atomic `nft -f`
  transaction (`ruleset`): made again on every start without losing a count
  (counters and the maps' elements are kept; only chains and policy sets are
  rewritten);
- the names of an instance's counters (`counter_names`) and the map updates
  that point a container's address at them (`elements_script`);
- the accounting (`Tally.advance`): kernel counters become totals that never
  go back, whether the kernel's counter kept counting, was reset (a reboot, a
  table made again) or is new.

The table (family ip, one per bridge, `qudata_net_<bridge>`):

    egress  (forward, priority filter - 5): new connections leaving the bridge
            to a blocked TCP port get a reset, to a denied network a reset (TCP)
            or an ICMP "administratively prohibited", and beyond the per-address rate are
            dropped (the sender's TCP retries: it is slowed); each refusal
            first passes a counting rule keyed on the source address.
    traffic (forward, priority filter + 10: only what every firewall let
            through) and the same rules on input and output (the host's own
            traffic with an instance): bytes to an instance's address are
            received, from it sent; public when the other end is outside
            `PRIVATE_RANGES`.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from qudata_agent.errors import InvalidRequest

NET_MBPS_KEY = "QUDATA_NET_MBPS"
MAX_MBPS = 400_000.0  # 400 Gbit/s: above any NIC a GPU host has
MIN_MBPS = 0.1
PRIVATE_RANGES: tuple[str, ...] = (
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "169.254.0.0/16",
    "100.64.0.0/10",
    "127.0.0.0/8",
)
# Traffic counters (direction, scope) and refusal counters (reason), one each per instance.
TRAFFIC = (("rx", "public"), ("rx", "private"), ("tx", "public"), ("tx", "private"))
REASONS = ("port", "deny", "rate")
_DECIMAL_RE = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")


@dataclass(frozen=True)
class EgressPolicy:
    block_ports: tuple[int, ...] = (25,)  # outbound TCP ports refused
    deny: tuple[str, ...] = ()  # networks refused (CIDR)
    conn_rate: int = 200  # new outbound connections per second per instance (0: no limit)


def parse_ports(text: str) -> tuple[int, ...]:
    """Comma-separated TCP ports (`25, 465`); "none" or empty: none. ValueError if bad."""
    if text.strip().lower() in ("", "none"):
        return ()
    ports = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if not item.isdigit() or not 1 <= int(item) <= 65535:
            raise ValueError(f"{item!r} is not a port 1-65535")
        ports.append(int(item))
    return tuple(sorted(set(ports)))


def parse_mbps(env: Mapping[str, str]) -> float | None:
    """The order's `QUDATA_NET_MBPS` (None when absent); InvalidRequest when malformed."""
    raw = env.get(NET_MBPS_KEY)
    if raw is None:
        return None
    text = str(raw).strip()
    value = float(text) if _DECIMAL_RE.fullmatch(text) else math.nan
    if not (math.isfinite(value) and MIN_MBPS <= value <= MAX_MBPS):
        shown = repr(raw) if len(repr(raw)) <= 24 else repr(raw)[:21] + "..."
        raise InvalidRequest(
            f"field 'env_variables.{NET_MBPS_KEY}': expected megabits per second,"
            f" {MIN_MBPS:g}-{MAX_MBPS:g}, got {shown}"
        )
    return value


def is_public(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return not any(ip in ipaddress.ip_network(n) for n in PRIVATE_RANGES)


def table_name(bridge: str) -> str:
    return "qudata_net_" + re.sub(r"[^A-Za-z0-9_]", "_", bridge)


def counter_names(instance_id: str) -> dict[str, str]:
    """Counter kind ("rx_public", ..., "refused_port", ...) -> its nftables object name."""
    key = "i" + re.sub(r"[^A-Za-z0-9]", "", instance_id)
    kinds = [f"{d}_{s}" for d, s in TRAFFIC] + [f"refused_{r}" for r in REASONS]
    return {kind: f"{key}_{kind}" for kind in kinds}


def _map_of(kind: str) -> str:
    return "m_" + kind


def _set_elements(items: Iterable[object]) -> str:
    listed = ", ".join(str(i) for i in items)
    return f"{{ {listed} }}"


def ruleset(bridge: str, policy: EgressPolicy) -> str:
    """The whole table as one `nft -f` transaction that keeps counts and map elements."""
    t = f"ip {table_name(bridge)}"
    kinds = list(counter_names("x"))
    lines = [f"add table {t}"]
    for kind in kinds:
        lines.append(f"add map {t} {_map_of(kind)} {{ type ipv4_addr : counter; }}")
    for name, elements in (
        ("private", PRIVATE_RANGES),
        ("deny", policy.deny),
    ):
        lines.append(f"add set {t} {name} {{ type ipv4_addr; flags interval; }}")
        lines.append(f"flush set {t} {name}")
        if elements:
            lines.append(f"add element {t} {name} {_set_elements(elements)}")
    lines.append(f"add set {t} block_ports {{ type inet_service; }}")
    lines.append(f"flush set {t} block_ports")
    if policy.block_ports:
        lines.append(f"add element {t} block_ports {_set_elements(policy.block_ports)}")
    lines.append(f"add set {t} conn_rate {{ type ipv4_addr; flags dynamic, timeout; timeout 1m; }}")
    lines.append(f"flush set {t} conn_rate")  # its elements carry the old rate's limit
    chains = {
        "egress": "type filter hook forward priority filter - 5; policy accept;",
        "traffic": "type filter hook forward priority filter + 10; policy accept;",
        "traffic_in": "type filter hook input priority filter + 10; policy accept;",
        "traffic_out": "type filter hook output priority filter + 10; policy accept;",
        "refuse_port": "",
        "refuse_deny": "",
        "refuse_rate": "",
    }
    for chain, head in chains.items():
        lines.append(f"add chain {t} {chain} {{ {head} }}")
        lines.append(f"flush chain {t} {chain}")
    lines += _policy_rules(t, bridge, policy)
    for chain in ("traffic", "traffic_in", "traffic_out"):
        lines += [
            f"add rule {t} {chain} ip saddr @private counter name ip daddr map @m_rx_private",
            f"add rule {t} {chain} ip saddr != @private counter name ip daddr map @m_rx_public",
            f"add rule {t} {chain} ip daddr @private counter name ip saddr map @m_tx_private",
            f"add rule {t} {chain} ip daddr != @private counter name ip saddr map @m_tx_public",
        ]
    return "\n".join(lines) + "\n"


def _policy_rules(t: str, bridge: str, policy: EgressPolicy) -> list[str]:
    out = f'iifname "{bridge}" oifname != "{bridge}" ct state new'
    rules = [
        f"add rule {t} refuse_port counter name ip saddr map @m_refused_port",
        f"add rule {t} refuse_port reject with tcp reset",
        f"add rule {t} refuse_deny counter name ip saddr map @m_refused_deny",
        f"add rule {t} refuse_deny meta l4proto tcp reject with tcp reset",
        f"add rule {t} refuse_deny reject with icmp type admin-prohibited",
        f"add rule {t} refuse_rate counter name ip saddr map @m_refused_rate",
        f"add rule {t} refuse_rate drop",
        f"add rule {t} egress {out} ip daddr @deny jump refuse_deny",
        f"add rule {t} egress {out} tcp dport @block_ports jump refuse_port",
    ]
    if policy.conn_rate > 0:
        rate = policy.conn_rate
        # A second's worth may come at once (the bucket), then `rate` a second.
        rules.append(
            f"add rule {t} egress {out} update @conn_rate"
            f" {{ ip saddr limit rate over {rate}/second burst {rate} packets }}"
            " jump refuse_rate"
        )
    return rules


def counters_script(bridge: str, names: Iterable[str]) -> str:
    """Adds named counters (a counter that exists keeps its count)."""
    t = f"ip {table_name(bridge)}"
    return "".join(f"add counter {t} {name}\n" for name in names)


def delete_counters_script(bridge: str, names: Iterable[str]) -> str:
    t = f"ip {table_name(bridge)}"
    return "".join(f"delete counter {t} {name}\n" for name in names)


def elements_script(
    bridge: str,
    add: Mapping[str, str],
    remove: Iterable[str] = (),
) -> str:
    """Points addresses at instances: `add` address -> instance id; `remove` addresses.

    Every map gets the same keys. `remove` must list only addresses in the maps.
    """
    t = f"ip {table_name(bridge)}"
    lines = []
    kinds = list(counter_names("x"))
    for address in remove:
        for kind in kinds:
            lines.append(f"delete element {t} {_map_of(kind)} {{ {address} }}")
    for address, instance_id in add.items():
        names = counter_names(instance_id)
        for kind in kinds:
            lines.append(f'add element {t} {_map_of(kind)} {{ {address} : "{names[kind]}" }}')
    return "\n".join(lines) + ("\n" if lines else "")


# -- accounting -------------------------------------------------------------------


@dataclass(frozen=True)
class Tally:
    """One counter's account: the kernel's count last read, and the total so far."""

    raw: int = 0
    total: int = 0

    def advance(self, raw: int) -> Tally:
        """The account after reading `raw`; a smaller count means the counter began anew."""
        if raw >= self.raw:
            return Tally(raw, self.total + raw - self.raw)
        return Tally(raw, self.total + raw)

    def restarted(self) -> Tally:
        """The account of a counter about to be made again (it starts at 0)."""
        return Tally(0, self.total)


@dataclass(frozen=True)
class NetworkUse:
    """An instance's bytes so far (never lower than before) and its refused connections."""

    rx_bytes: int = 0
    tx_bytes: int = 0
    rx_public_bytes: int = 0
    tx_public_bytes: int = 0
    refused: tuple[tuple[str, int], ...] = ()  # (reason, count)

    @staticmethod
    def of(tallies: Mapping[str, Tally]) -> NetworkUse:
        def total(kind: str) -> int:
            found = tallies.get(kind)
            return found.total if found is not None else 0

        return NetworkUse(
            rx_bytes=total("rx_public") + total("rx_private"),
            tx_bytes=total("tx_public") + total("tx_private"),
            rx_public_bytes=total("rx_public"),
            tx_public_bytes=total("tx_public"),
            refused=tuple((r, total(f"refused_{r}")) for r in REASONS),
        )

    def wire(self) -> dict[str, int]:
        """The four figures of the instance view and each `/stats` entry."""
        return {
            "rx_bytes": self.rx_bytes,
            "tx_bytes": self.tx_bytes,
            "rx_public_bytes": self.rx_public_bytes,
            "tx_public_bytes": self.tx_public_bytes,
        }


# -- shaping ----------------------------------------------------------------------


def ifb_name(instance_id: str) -> str:
    """The IFB device that shapes what an instance sends (15 characters at most)."""
    return "qdifb" + re.sub(r"[^0-9a-f]", "", instance_id.lower())[:10]


def burst_bytes(mbps: float) -> int:
    """The token bucket's depth: 10 ms at the rate, at least 32 KiB (a few full packets)."""
    return max(32 * 1024, int(mbps * 1e6 / 8 * 0.01))


def _any_packet(veth: str) -> list[str]:
    # u32 matching everything: the one classifier every kernel build has (matchall,
    # basic and flower are modules that a minimal kernel lacks).
    return ["tc", "filter", "add", "dev", veth, "parent", "ffff:", "protocol", "all",
            "u32", "match", "u32", "0", "0"]  # fmt: skip


def shaping_commands(veth: str, ifb: str | None, mbps: float) -> list[list[str]]:
    """`tc`/`ip` argv lists capping both directions of one host-side veth at `mbps`.

    What leaves the veth towards the container (its download) is shaped there;
    what the container sends arrives as the veth's ingress: redirected to an
    IFB device and shaped on its way out of it, or, with no IFB (`ifb` None),
    policed (dropped above the rate).
    """
    rate = f"{mbps:g}mbit"
    bucket = ["burst", str(burst_bytes(mbps)), "latency", "50ms"]
    cmds = [
        ["tc", "qdisc", "replace", "dev", veth, "root", "tbf", "rate", rate, *bucket],
        ["tc", "qdisc", "replace", "dev", veth, "handle", "ffff:", "ingress"],
        ["tc", "filter", "del", "dev", veth, "parent", "ffff:"],
    ]
    if ifb is None:
        police = ["action", "police", "rate", rate, "burst", str(burst_bytes(mbps)), "drop"]
        cmds.append([*_any_packet(veth), *police])
        return cmds
    cmds[2:2] = [
        ["ip", "link", "set", ifb, "up"],
        ["tc", "qdisc", "replace", "dev", ifb, "root", "tbf", "rate", rate, *bucket],
    ]
    redirect = ["action", "mirred", "egress", "redirect", "dev", ifb]
    cmds.append([*_any_packet(veth), *redirect])
    return cmds
