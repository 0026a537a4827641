"""What the network meter and a cap cost in CPU, per Gbit/s, against traffic with neither.

An "instance" (a network namespace on a bridge of its own, like a container
on the agent's bridge) sends to and receives from an "internet" namespace
(TEST-NET-2) through the host's forwarding, with iperf3, in three setups:

- (a) baseline: no nftables table, no traffic control;
- (b) metered: the agent's table for that bridge (`domain.netpolicy.ruleset`,
  the egress policy included) with the instance's counters and map elements;
- (c) metered and capped: (b) plus the agent's shaping on the host-side veth
  (a token bucket each way, uploads through an IFB device) at a rate far
  above what the link reaches, so the cap costs its work without limiting.

Per setup and direction: throughput and the machine's CPU time (all CPUs,
from /proc/stat) during the transfer, as CPU-seconds per Gbit moved; then the
ratios (b)/(a) and (c)/(a). One run each. The figures are noisy on a shared
machine: the CPU time is the whole machine's.

Run (root): .venv/bin/python bench/net_meter.py [--seconds 4]
Needs iperf3, nft, tc and an IFB-capable kernel. Removes everything it made.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from qudata_agent.adapters.nftables import Nftables
from qudata_agent.adapters.traffic_control import TrafficControl
from qudata_agent.domain.netpolicy import (
    EgressPolicy,
    counter_names,
    counters_script,
    elements_script,
    ifb_name,
    ruleset,
)

BRIDGE = "t24bbr"
INSTANCE_NS, INTERNET_NS = "t24bi", "t24bx"
INSTANCE_IP, GATEWAY = "10.250.24.2", "10.250.24.1"
SERVER_IP, SERVER_GW = "198.51.100.242", "198.51.100.241"
INSTANCE_ID = "0b0e7c4a-bench-net-meter"


def sh(*argv: str, check: bool = True) -> str:
    return subprocess.run(argv, check=check, capture_output=True, text=True).stdout


def setup() -> None:
    teardown()
    sh("ip", "link", "add", BRIDGE, "type", "bridge")
    sh("ip", "addr", "add", f"{GATEWAY}/24", "dev", BRIDGE)
    sh("ip", "link", "set", BRIDGE, "up")
    for ns in (INSTANCE_NS, INTERNET_NS):
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh("ip", "link", "add", "t24bv0", "type", "veth", "peer", "name", "t24bv1")
    sh("ip", "link", "set", "t24bv0", "master", BRIDGE, "up")
    sh("ip", "link", "set", "t24bv1", "netns", INSTANCE_NS)
    sh("ip", "-n", INSTANCE_NS, "addr", "add", f"{INSTANCE_IP}/24", "dev", "t24bv1")
    sh("ip", "-n", INSTANCE_NS, "link", "set", "t24bv1", "up")
    sh("ip", "-n", INSTANCE_NS, "route", "add", "default", "via", GATEWAY)
    sh("ip", "link", "add", "t24bx0", "type", "veth", "peer", "name", "t24bx1")
    sh("ip", "addr", "add", f"{SERVER_GW}/30", "dev", "t24bx0")
    sh("ip", "link", "set", "t24bx0", "up")
    sh("ip", "link", "set", "t24bx1", "netns", INTERNET_NS)
    sh("ip", "-n", INTERNET_NS, "addr", "add", f"{SERVER_IP}/30", "dev", "t24bx1")
    sh("ip", "-n", INTERNET_NS, "link", "set", "t24bx1", "up")
    sh("ip", "-n", INTERNET_NS, "route", "add", "default", "via", SERVER_GW)
    # Docker's FORWARD policy is drop: let the bench's own traffic through.
    for args in (["-i", BRIDGE, "-o", "t24bx0"], ["-i", "t24bx0", "-o", BRIDGE]):
        sh("iptables", "-I", "FORWARD", *args, "-j", "ACCEPT")
    sh("ip", "netns", "exec", INTERNET_NS, "iperf3", "-s", "-D")


def teardown() -> None:
    for args in (["-i", BRIDGE, "-o", "t24bx0"], ["-i", "t24bx0", "-o", BRIDGE]):
        sh("iptables", "-D", "FORWARD", *args, "-j", "ACCEPT", check=False)
    Nftables(BRIDGE).remove()
    for ns in (INSTANCE_NS, INTERNET_NS):
        for pid in sh("ip", "netns", "pids", ns, check=False).split():
            sh("kill", pid, check=False)
        sh("ip", "netns", "del", ns, check=False)
    for link in (BRIDGE, "t24bv0", "t24bx0", ifb_name(INSTANCE_ID)):
        sh("ip", "link", "del", link, check=False)


def busy_jiffies() -> tuple[int, int]:
    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def transfer(seconds: int, download: bool) -> tuple[float, float]:
    """(Gbit moved, CPU-seconds of the whole machine) over one iperf3 run."""
    before, _ = busy_jiffies()
    argv = ["ip", "netns", "exec", INSTANCE_NS, "iperf3", "-c", SERVER_IP, "-t", str(seconds), "-J"]
    out = json.loads(sh(*argv, *(["-R"] if download else [])))
    after, _ = busy_jiffies()
    bits = float(out["end"]["sum_received"]["bytes"]) * 8
    return bits / 1e9, (after - before) / os.sysconf("SC_CLK_TCK")


def meter_on() -> None:
    nft = Nftables(BRIDGE)
    nft.apply(ruleset(BRIDGE, EgressPolicy()))
    nft.apply(counters_script(BRIDGE, counter_names(INSTANCE_ID).values()))
    nft.apply(elements_script(BRIDGE, {INSTANCE_IP: INSTANCE_ID}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=4)
    args = parser.parse_args()
    results: dict[str, dict[str, tuple[float, float]]] = {}
    try:
        setup()
        time.sleep(0.5)
        for name, prepare in (
            ("a baseline", lambda: None),
            ("b metered", meter_on),
            (
                "c metered+capped",
                lambda: TrafficControl().shape("t24bv0", ifb_name(INSTANCE_ID), 40000),
            ),
        ):
            prepare()
            results[name] = {
                "download": transfer(args.seconds, True),
                "upload": transfer(args.seconds, False),
            }
        counted = Nftables(BRIDGE).counters()
    finally:
        teardown()
    print(f"{'setup':18} {'dir':9} {'Gbit/s':>7} {'CPU-s/Gbit':>11} {'vs (a)':>7}")
    for name, dirs in results.items():
        for direction, (gbit, cpu) in dirs.items():
            base_gbit, base_cpu = results["a baseline"][direction]
            per = cpu / gbit
            ratio = per / (base_cpu / base_gbit)
            print(f"{name:18} {direction:9} {gbit / args.seconds:7.2f} {per:11.4f} {ratio:7.2f}x")
    names = counter_names(INSTANCE_ID)
    moved = sum(counted.get(names[k], (0, 0))[1] for k in ("rx_public", "tx_public"))
    print(f"metered public bytes (b and c): {moved / 1e9:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
