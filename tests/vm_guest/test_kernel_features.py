"""Inside the VM: what the trixie kernel has and the container host's kernel lacks.

- The kernel's WireGuard under the agent's tunnel adapter (`adapters/wireguard.py`):
  the interface made as `type wireguard` (no wireguard-go: the VM has none), a
  handshake with a relay peer in a network namespace of its own, a ping both
  ways through the tunnel, the routing rule and mangle chains in place (iptables
  over nftables), and `down()` removing them all.
- An XFS project quota for volumes (`adapters/volume_fs.XfsProjectVolumes`): a
  loop-file XFS mounted with `prjquota`, a 32 MiB volume that stops a write with
  ENOSPC at its size (the checks of `tests/hosts/check_xfs_volumes.py`, which the
  container host's kernel cannot mount).

Nothing here touches the guest's own disk or network beyond a namespace, a
veth pair and a loop file, all removed at the end.
"""

from __future__ import annotations

import ipaddress
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hosts.check_xfs_volumes import run as check_xfs_volumes
from qudata_agent.adapters.wireguard import WireGuard, ensure_key
from qudata_agent.domain.tunnel import Routing, TunnelConfig

pytestmark = pytest.mark.timeout(600)

NS = "qd-relay"
RELAY_IF, RELAY_PORT = "wgrelay", 51820
RELAY_UNDERLAY, HOST_UNDERLAY = "10.77.0.2", "10.77.0.1"
RELAY_TUNNEL, HOST_TUNNEL = "10.78.0.1", "10.78.0.2"


def _sh(*argv: str, stdin: str | None = None) -> str:
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{' '.join(argv)}: {done.stderr.strip()}"
    return done.stdout


def _in_ns(*argv: str, stdin: str | None = None) -> str:
    return _sh("ip", "netns", "exec", NS, *argv, stdin=stdin)


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[str]:
    """A kernel WireGuard peer in its own namespace, reached over a veth pair; its public key."""
    _sh("ip", "netns", "add", NS)
    try:
        _sh("ip", "link", "add", "qd-veth0", "type", "veth", "peer", "name", "qd-veth1")
        _sh("ip", "link", "set", "qd-veth1", "netns", NS)
        _sh("ip", "address", "add", f"{HOST_UNDERLAY}/30", "dev", "qd-veth0")
        _sh("ip", "link", "set", "qd-veth0", "up")
        _in_ns("ip", "address", "add", f"{RELAY_UNDERLAY}/30", "dev", "qd-veth1")
        _in_ns("ip", "link", "set", "qd-veth1", "up")
        key = tmp_path / "relay.key"
        key.write_text(_sh("wg", "genkey"))
        _in_ns("ip", "link", "add", RELAY_IF, "type", "wireguard")
        _in_ns("wg", "set", RELAY_IF, "private-key", str(key), "listen-port", str(RELAY_PORT))
        _in_ns("ip", "address", "add", f"{RELAY_TUNNEL}/24", "dev", RELAY_IF)
        _in_ns("ip", "link", "set", RELAY_IF, "up")
        yield _sh("wg", "pubkey", stdin=key.read_text()).strip()
    finally:
        subprocess.run(["ip", "link", "del", "qd-veth0"], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", NS], capture_output=True, check=False)


def test_the_tunnel_runs_on_the_kernels_wireguard(tmp_path: Path, relay: str) -> None:
    public = ensure_key(tmp_path / "tunnel.key")
    _in_ns("wg", "set", RELAY_IF, "peer", public, "allowed-ips", f"{HOST_TUNNEL}/32")
    wg = WireGuard(Routing("qdtun-vm", 5222, 0x2000000), tmp_path / "tunnel.key")
    config = TunnelConfig(
        RELAY_UNDERLAY, RELAY_PORT, relay, ipaddress.IPv4Interface(f"{HOST_TUNNEL}/24"),
        RELAY_UNDERLAY,
    )  # fmt: skip
    try:
        wg.create()
        assert wg.userspace is False, "made by wireguard-go, not the kernel"
        assert Path("/sys/module/wireguard").exists()
        wg.configure(config)
        deadline = time.monotonic() + 120
        while wg.latest_handshake() is None:
            assert time.monotonic() < deadline, _sh("wg", "show", wg.interface)
            wg.probe(RELAY_TUNNEL)
            time.sleep(1)
        assert wg.rule_present() and wg.route_present() and wg.mangle_present()
        _in_ns("busybox", "ping", "-c", "1", "-W", "10", HOST_TUNNEL)
        _sh("busybox", "ping", "-c", "1", "-W", "10", RELAY_TUNNEL)
    finally:
        wg.down()
    assert not wg.exists() and not wg.rule_present() and not wg.mangle_present()


def test_an_xfs_project_quota_stops_a_volume_at_its_size(tmp_path: Path) -> None:
    # A failed check raises SystemExit(1) after printing which one.
    check_xfs_volumes(tmp_path)
