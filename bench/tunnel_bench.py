"""Tunnel mode: scp throughput and SSH command latency through the relay, against the
same without it, in one run.

The topology is the tunnel tests' (`tests/support/relay_net.py`): a relay
namespace configured by the real `deploy/relay/relay.sh`, a renter namespace
that reaches only the relay's public address, and this machine's root
namespace as the host, running the real `qudata-agent run` in tunnel mode
(standalone) with one `qudata-test/debian-ssh:12` instance with SSH. A second
client namespace is wired straight to the host (a veth, 203.0.113.20/30: a
host with a public address of its own) and reaches the instance's published
port directly. Both clients run the same OpenSSH commands on the same
instance, alternately:

- throughput: `scp` of a file of `--size-mb` MiB (default 1024) into the
  instance's /dev/null; MB/s per run;
- latency: `ssh ... true` (a new connection, key exchange, authentication
  and one command each); milliseconds per run.

It prints the medians of each path and the ratios tunnel/direct. What the
figures mean: here both WireGuard ends are `wireguard-go` in namespaces on
one machine, sharing its CPUs with sshd, scp and Docker, so the tunnel's cost
is its CPU cost (userspace crypto, copies through /dev/net/tun, twice) with
no network latency at all; across a real WAN with the kernel's WireGuard the
per-packet CPU cost is several times lower and the latency is dominated by
the path's RTT (the relay adds the detour host-relay-renter instead of
host-renter). Read the ratio as an upper bound of the CPU overhead, not as a
WAN prediction.

Needs root, Docker, the test images, wireguard-tools, wireguard-go, nftables,
openssh-client and what the agent's SSH needs. Removes everything it made,
also on failure. Run from the repository root:

    .venv/bin/python bench/tunnel_bench.py [--size-mb N] [--runs N]
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from qudata_agent.adapters.wireguard import ensure_key
from support.agent_proc import AgentProcess  # type: ignore[import-not-found]
from support.docker_api import agent_id, remove_containers_of  # type: ignore[import-not-found]
from support.relay_net import (  # type: ignore[import-not-found]
    HOST_A_BLOCK,
    HOST_A_IF,
    HOST_A_TUNNEL,
    PUBLIC,
    relay_net,
    remove_agent_tunnel,
    sh,
    wait_for,
)

TABLE, MARK = "5223", "0x4000000"
DIRECT_NS, DIRECT_VETH = "t22-direct", "t22-hd"
HOST_DIRECT, CLIENT_DIRECT = "203.0.113.21", "203.0.113.22"
IMAGE = {"image": "qudata-test/debian-ssh", "image_tag": "12"}


@contextlib.contextmanager
def direct_client() -> Iterator[None]:
    """A client namespace on a veth straight to the host: no relay, no tunnel."""
    sh("ip", "netns", "del", DIRECT_NS, check=False)
    sh("ip", "link", "del", DIRECT_VETH, check=False)
    try:
        sh("ip", "netns", "add", DIRECT_NS)
        sh("ip", "link", "add", DIRECT_VETH, "type", "veth", "peer", "name", "t22-dc")
        sh("ip", "link", "set", "t22-dc", "netns", DIRECT_NS)
        sh("ip", "address", "add", f"{HOST_DIRECT}/30", "dev", DIRECT_VETH)
        sh("ip", "link", "set", DIRECT_VETH, "up")
        sh("ip", "address", "add", f"{CLIENT_DIRECT}/30", "dev", "t22-dc", ns=DIRECT_NS)
        sh("ip", "link", "set", "t22-dc", "up", ns=DIRECT_NS)
        sh("ip", "link", "set", "lo", "up", ns=DIRECT_NS)
        yield
    finally:
        sh("ip", "netns", "del", DIRECT_NS, check=False)
        sh("ip", "link", "del", DIRECT_VETH, check=False)


def _ssh_options(key: Path) -> list[str]:
    return [
        "-i", str(key), "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
        "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10",
    ]  # fmt: skip


def _in_ns(ns: str, *argv: str, timeout: float = 600) -> float:
    start = time.monotonic()
    done = subprocess.run(
        ["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=timeout
    )
    took = time.monotonic() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:2])} in {ns} failed: {done.stderr.strip()}")
    return took


def _instance(agent: AgentProcess, key: Path) -> str:
    client = httpx.Client(
        base_url=agent.url, headers={"X-Agent-Secret": agent.secret()}, timeout=30
    )
    resp = client.post("/instances", json={**IMAGE, "ssh_enabled": True})
    if resp.status_code != 202:
        raise RuntimeError(f"create: {resp.status_code} {resp.text}")
    public_key = key.with_suffix(".pub").read_text().strip()
    client.post("/ssh", json={"ssh_pubkey": public_key}).raise_for_status()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state = client.get("/instances").json()["data"]
        if (state.get("ssh") or {}).get("status") == "ready":
            return str(state["ssh"]["port"])
        time.sleep(0.2)
    raise RuntimeError("the instance's SSH did not become ready")


def measure(args: argparse.Namespace, work: Path) -> None:
    key = work / "renter"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    payload = work / "payload"
    with payload.open("wb") as f:
        f.truncate(args.size_mb * 1024 * 1024)  # sparse on disk; scp reads and sends it all
    state = work / "state"
    state.mkdir(mode=0o700)
    remove_agent_tunnel(HOST_A_IF, TABLE, MARK)
    agent = None
    try:
        with relay_net(work, ensure_key(state / "tunnel.key")) as net, direct_client():
            env = {
                "QUDATA_AGENT_HOST": "0.0.0.0",
                "QUDATA_PORT_RANGE": f"{HOST_A_BLOCK[0]}-{HOST_A_BLOCK[1]}",
                "QUDATA_TUNNEL": "wireguard",
                "QUDATA_TUNNEL_ENDPOINT": net.endpoint,
                "QUDATA_TUNNEL_RELAY_KEY": net.relay_key,
                "QUDATA_TUNNEL_ADDRESS": HOST_A_TUNNEL,
                "QUDATA_TUNNEL_PUBLIC_ADDRESS": PUBLIC,
                "QUDATA_TUNNEL_INTERFACE": HOST_A_IF,
                "QUDATA_TUNNEL_TABLE": TABLE,
                "QUDATA_TUNNEL_MARK": MARK,
                "QUDATA_LOG_LEVEL": "INFO",
            }
            agent = AgentProcess(state, env, port=HOST_A_BLOCK[0]).start()
            port = _instance(agent, key)
            paths = {
                "tunnel": ("t22-renter", PUBLIC),
                "direct": (DIRECT_NS, HOST_DIRECT),
            }
            for ns, address in paths.values():
                wait_for(
                    lambda ns=ns, address=address: _try_ssh(ns, address, port, key), 30, address
                )
            _run(args, paths, port, key, payload)
    finally:
        if agent is not None and agent.proc is not None and agent.proc.poll() is None:
            agent.stop(signal.SIGKILL)
            remove_containers_of(agent_id(state))
        remove_agent_tunnel(HOST_A_IF, TABLE, MARK)


def _try_ssh(ns: str, address: str, port: str, key: Path) -> bool:
    try:
        _in_ns(ns, "ssh", *_ssh_options(key), "-p", port, f"root@{address}", "true", timeout=15)
    except (RuntimeError, subprocess.TimeoutExpired):
        return False
    return True


def _run(
    args: argparse.Namespace,
    paths: dict[str, tuple[str, str]],
    port: str,
    key: Path,
    payload: Path,
) -> None:
    mbps: dict[str, list[float]] = {name: [] for name in paths}
    latency: dict[str, list[float]] = {name: [] for name in paths}
    opts = _ssh_options(key)
    for i in range(args.runs):
        order = list(paths.items()) if i % 2 == 0 else list(reversed(paths.items()))
        for name, (ns, address) in order:
            took = _in_ns(ns, "scp", *opts, "-P", port, str(payload), f"root@{address}:/dev/null")
            mbps[name].append(args.size_mb * 1.048576 / took)
        for _ in range(args.ssh_runs):
            for name, (ns, address) in order:
                took = _in_ns(ns, "ssh", *opts, "-p", port, f"root@{address}", "true")
                latency[name].append(took * 1000)
    print(f"scp of {args.size_mb} MiB, {args.runs} run(s) per path; ssh 'true', "
          f"{args.runs * args.ssh_runs} run(s) per path")  # fmt: skip
    for name in paths:
        print(
            f"{name:7} scp median {statistics.median(mbps[name]):8.1f} MB/s"
            f"  (runs {', '.join(f'{v:.1f}' for v in mbps[name])});"
            f" ssh median {statistics.median(latency[name]):7.1f} ms"
            f" (min {min(latency[name]):.1f}, max {max(latency[name]):.1f})"
        )
    throughput = statistics.median(mbps["tunnel"]) / statistics.median(mbps["direct"])
    slower = statistics.median(latency["tunnel"]) / statistics.median(latency["direct"])
    print(f"ratio tunnel/direct: throughput {throughput:.2f}x, ssh latency {slower:.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="scp file size, MiB")
    parser.add_argument("--runs", type=int, default=1, help="scp runs per path")
    parser.add_argument("--ssh-runs", type=int, default=10, help="ssh runs per path and scp run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qudata-tunnel-bench-") as tmp:
        try:
            measure(args, Path(tmp))
        except (RuntimeError, AssertionError, subprocess.TimeoutExpired) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
