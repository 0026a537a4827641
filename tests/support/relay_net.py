"""A relay, a renter and a second host in network namespaces, for the tunnel-mode tests.

    renter ns (198.51.100.2) --- relay ns (198.51.100.1 "public"; 10.222.22.2 to host A;
                                  10.222.23.2 to host B; WireGuard, tunnel 10.99.22.1/24)
    host A = the root namespace (the agent, dockerd): 10.222.22.1, tunnel 10.99.22.2
    host B = its own namespace: 10.222.23.1, tunnel 10.99.22.3, a listener on 41000

The renter has a route to the relay's public network only; the relay has no
route to either host's tunnel address except through WireGuard; each host
reaches the relay outbound only. Host A's main table reaches the relay's public
address (as the internet would); a packet to the renter's address that would
leave host A by any other interface than the tunnel is dropped (mangle
POSTROUTING, where the interface is the one the packet really leaves by), so
a reply that missed the tunnel goes nowhere. The relay is configured by the real
`deploy/relay/relay.sh`, run inside its namespace. Everything is removed on
exit, also on failure: namespaces (and with them their interfaces and rules),
host A's veth, the wireguard-go processes started here (by pid).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

RELAY_SH = Path(__file__).resolve().parents[2] / "deploy" / "relay" / "relay.sh"
PREFIX = "t22"
RELAY_NS, RENTER_NS, HOST_B_NS = f"{PREFIX}-relay", f"{PREFIX}-renter", f"{PREFIX}-hostb"
HOST_VETH = f"{PREFIX}-ha"  # host A's end, in the root namespace
PUBLIC = "198.51.100.1"
RENTER = "198.51.100.2"
RELAY_TUNNEL = "10.99.22.1/24"
HOST_A_TUNNEL = "10.99.22.2/24"
HOST_B_TUNNEL = "10.99.22.3/24"
HOST_A_BLOCK = (22200, 22299)
HOST_B_BLOCK = (41000, 41099)
RELAY_PORT = 51822
RELAY_IF = f"{PREFIX}-relaywg"
HOST_A_IF = f"{PREFIX}-wg"  # the agent's tunnel interface in the tests
_NOT_TUNNEL = ("-d", f"{RENTER}/32", "!", "-o", HOST_A_IF, "-j", "DROP")
HOST_B_IF = f"{PREFIX}-hostbwg"


def sh(*args: str, ns: str | None = None, check: bool = True, timeout: float = 30) -> str:
    cmd = ["ip", "netns", "exec", ns, *args] if ns else list(args)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed: {done.stderr.strip()}")
    return done.stdout


def _wg_key() -> tuple[str, str]:
    private = sh("wg", "genkey").strip()
    public = subprocess.run(
        ["wg", "pubkey"], input=private, capture_output=True, text=True, check=True
    ).stdout.strip()
    return private, public


@dataclass
class RelayNet:
    work: Path
    host_a_key: str  # host A's (the agent's) WireGuard public key
    relay_key: str = ""
    host_b_key: str = ""
    _pids: list[int] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return f"10.222.22.2:{RELAY_PORT}"

    def hosts_file(self) -> Path:
        path = self.work / "hosts"
        a, b = HOST_A_BLOCK, HOST_B_BLOCK
        path.write_text(
            "# key  tunnel address  port block\n"
            f"{self.host_a_key} {HOST_A_TUNNEL.split('/')[0]} {a[0]}-{a[1]}\n"
            f"{self.host_b_key} {HOST_B_TUNNEL.split('/')[0]} {b[0]}-{b[1]}\n"
        )
        return path

    def relay_up(self) -> None:
        """Runs the real relay script in the relay namespace (again: a restart)."""
        before = set(_wireguard_go_pids())
        sh(
            "bash", str(RELAY_SH), "--hosts", str(self.hosts_file()),
            "--public-address", PUBLIC, "--address", RELAY_TUNNEL,
            "--interface", RELAY_IF, "--port", str(RELAY_PORT),
            "--key-dir", str(self.work / "relay-keys"),
            ns=RELAY_NS,
        )  # fmt: skip
        self._pids += sorted(set(_wireguard_go_pids()) - before)
        self.relay_key = (self.work / "relay-keys" / "relay.pub").read_text().strip()

    def relay_down(self) -> None:
        """Stops the relay's WireGuard (the interface goes, wireguard-go exits)."""
        sh("ip", "link", "del", "dev", RELAY_IF, ns=RELAY_NS, check=False)

    def _host_b_up(self) -> None:
        private, self.host_b_key = _wg_key()
        key = self.work / "hostb.key"
        key.write_text(private + "\n")
        key.chmod(0o600)
        before = set(_wireguard_go_pids())
        sh("wireguard-go", HOST_B_IF, ns=HOST_B_NS)
        self._pids += sorted(set(_wireguard_go_pids()) - before)
        sh("wg", "set", HOST_B_IF, "private-key", str(key), ns=HOST_B_NS)
        sh("ip", "address", "add", HOST_B_TUNNEL, "dev", HOST_B_IF, ns=HOST_B_NS)
        sh("ip", "link", "set", HOST_B_IF, "up", ns=HOST_B_NS)

    def _host_b_peer(self) -> None:
        sh(
            "wg", "set", HOST_B_IF, "peer", self.relay_key,
            "endpoint", f"10.222.23.2:{RELAY_PORT}", "persistent-keepalive", "5",
            "allowed-ips", "0.0.0.0/0", ns=HOST_B_NS,
        )  # fmt: skip
        sh("ip", "route", "add", "default", "dev", HOST_B_IF, ns=HOST_B_NS)

    def host_b_listener(self) -> subprocess.Popen[bytes]:
        """A TCP service of host B on its block, reached only through the relay."""
        code = (
            "import socket\n"
            "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            f"s.bind(('0.0.0.0', {HOST_B_BLOCK[0]})); s.listen(8)\n"
            "while True:\n"
            "    c, _ = s.accept(); c.sendall(b'host-b-service\\n'); c.close()\n"
        )
        return subprocess.Popen(["ip", "netns", "exec", HOST_B_NS, sys.executable, "-c", code])

    def renter(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", RENTER_NS, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def remove_agent_tunnel(interface: str, table: str, mark: str) -> None:
    """What an agent in tunnel mode leaves in the root namespace (it keeps the tunnel up
    across its own restarts): the rule, the table's route, the mangle chains, the link."""
    for _ in range(5):
        sh("ip", "rule", "del", "fwmark", f"{mark}/{mark}", "lookup", table, check=False)
    sh("ip", "route", "flush", "table", table, check=False)
    for builtin, chain in (("PREROUTING", "QUDATA-TUNNEL-IN"), ("OUTPUT", "QUDATA-TUNNEL-OUT")):
        for _ in range(5):
            sh("iptables", "-w", "5", "-t", "mangle", "-D", builtin, "-j", chain, check=False)
        sh("iptables", "-w", "5", "-t", "mangle", "-F", chain, check=False)
        sh("iptables", "-w", "5", "-t", "mangle", "-X", chain, check=False)
    sh("ip", "link", "del", "dev", interface, check=False)


def _wireguard_go_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == "wireguard-go":
                    pids.append(int(entry.name))
    return pids


def _link(a: str, b: str, a_ns: str | None, b_ns: str, a_addr: str, b_addr: str) -> None:
    sh("ip", "link", "add", a, "type", "veth", "peer", "name", b)
    if a_ns:
        sh("ip", "link", "set", a, "netns", a_ns)
    sh("ip", "link", "set", b, "netns", b_ns)
    sh("ip", "address", "add", a_addr, "dev", a, ns=a_ns)
    sh("ip", "link", "set", a, "up", ns=a_ns)
    sh("ip", "address", "add", b_addr, "dev", b, ns=b_ns)
    sh("ip", "link", "set", b, "up", ns=b_ns)


def _cleanup(net: RelayNet | None) -> None:
    for ns in (RELAY_NS, RENTER_NS, HOST_B_NS):
        sh("ip", "netns", "del", ns, check=False)
    sh("ip", "link", "del", HOST_VETH, check=False)
    for _ in range(5):  # each copy an earlier, killed run may have left
        delete = ["iptables", "-w", "5", "-t", "mangle", "-D", "POSTROUTING", *_NOT_TUNNEL]
        if subprocess.run(delete, capture_output=True, check=False).returncode != 0:
            break
    for pid in net._pids if net else []:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)


@contextlib.contextmanager
def relay_net(work: Path, host_a_key: str) -> Iterator[RelayNet]:
    _cleanup(None)  # what an earlier, killed run left behind
    net = RelayNet(work=work, host_a_key=host_a_key)
    try:
        for ns in (RELAY_NS, RENTER_NS, HOST_B_NS):
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "set", "lo", "up", ns=ns)
        _link(f"{PREFIX}-rr", f"{PREFIX}-rn", RELAY_NS, RENTER_NS, f"{PUBLIC}/24", f"{RENTER}/24")
        _link(HOST_VETH, f"{PREFIX}-rha", None, RELAY_NS, "10.222.22.1/30", "10.222.22.2/30")
        sh("ip", "route", "add", f"{PUBLIC}/32", "via", "10.222.22.2", "dev", HOST_VETH)
        sh("iptables", "-w", "5", "-t", "mangle", "-I", "POSTROUTING", "1", *_NOT_TUNNEL)
        _link(
            f"{PREFIX}-hb", f"{PREFIX}-rhb", HOST_B_NS, RELAY_NS, "10.222.23.1/30", "10.222.23.2/30"
        )
        net._host_b_up()
        net.relay_up()
        net._host_b_peer()
        yield net
    finally:
        _cleanup(net)


def wait_for(check: object, timeout: float, what: str) -> float:
    """Calls `check()` until it is truthy; returns the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():  # type: ignore[operator]
            return time.monotonic() - start
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout} s")
