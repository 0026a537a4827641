"""WireGuard, `ip` and the mangle table: the only module that touches the tunnel.

Owns the tunnel interface, its key file, the policy-routing rule and table, and
the two mangle chains of `domain.tunnel`. What stays true:
- the private key is made once by `wg genkey`, written to a 0600 file of the
  state directory from its first byte, and never leaves it (`wg set` reads the
  file; `wg pubkey` gets it on stdin, never on a command line);
- the interface is the kernel's WireGuard where `ip link add ... type
  wireguard` works, else a `wireguard-go` process (it daemonises; its
  interface disappears when it dies, which `exists()` sees);
- only packets carrying the tunnel's mark are routed by the tunnel's table:
  the main table and the host's default route are never changed;
- every step is idempotent, so a check may run it again at any time, and
  `down()` removes exactly what `up()` added;
- a failing command raises `TunnelError` with its stderr.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import socket
import subprocess
import time
from pathlib import Path

from qudata_agent.adapters import commands
from qudata_agent.adapters.secrets import SecretFile
from qudata_agent.domain.tunnel import (
    KEEPALIVE_S,
    MANGLE_JUMPS,
    RULE_PRIORITY,
    Routing,
    TunnelConfig,
    mangle_rules,
)
from qudata_agent.errors import AgentError

log = logging.getLogger(__name__)

MTU = 1420  # WireGuard's default: fits a 1500-byte path with the IPv4/UDP overhead
PROBE_PORT = 9  # discard: the relay drops it, its WireGuard answers with a keepalive


class TunnelError(AgentError):
    pass


def ensure_key(path: Path) -> str:
    """The public key of the private key in `path`, made (0600) when there is none."""
    secret = SecretFile(path)
    private = secret.read()
    if private is None:
        private = _run("wg", "genkey").stdout.strip()
        secret.write(private)
        log.info("tunnel key made", extra={"path": str(path)})
    return _run("wg", "pubkey", stdin=private + "\n").stdout.strip()


def _run(
    *args: str, check: bool = True, timeout: float = 20, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return commands.run(list(args), TunnelError, check=check, timeout=timeout, stdin=stdin)


class WireGuard:
    def __init__(self, routing: Routing, key_path: Path) -> None:
        self.routing = routing
        self._key_path = key_path
        self.userspace: bool | None = None  # how the interface was made (None: not by us)

    @property
    def interface(self) -> str:
        return self.routing.interface

    def exists(self) -> bool:
        return _run("ip", "link", "show", "dev", self.interface, check=False).returncode == 0

    def create(self) -> None:
        """The interface: the kernel's WireGuard, else wireguard-go."""
        if self.exists():
            return
        if _run("ip", "link", "add", "dev", self.interface, "type", "wireguard", check=False)\
                .returncode == 0:  # fmt: skip
            self.userspace = False
            log.info("tunnel interface made (kernel WireGuard)", extra={"if": self.interface})
            return
        if shutil.which("wireguard-go") is None:
            raise TunnelError(
                "the kernel has no WireGuard and wireguard-go is not installed"
                " (apt-get install wireguard-go)"
            )
        _run("wireguard-go", self.interface)
        deadline = time.monotonic() + 5
        while not self.exists():
            if time.monotonic() > deadline:
                raise TunnelError(f"wireguard-go did not make {self.interface}")
            time.sleep(0.05)
        self.userspace = True
        log.info("tunnel interface made (wireguard-go)", extra={"if": self.interface})

    def configure(self, config: TunnelConfig) -> None:
        """Key, relay peer, address, link up, rp_filter, the routing table and rule."""
        wg = self.interface
        _run("wg", "set", wg, "private-key", str(self._key_path))
        self.set_peer(config)
        _run("ip", "address", "replace", str(config.address), "dev", wg)
        _run("ip", "link", "set", "dev", wg, "mtu", str(MTU), "up")
        # Renters' packets arrive with addresses the main table routes elsewhere: loose.
        Path(f"/proc/sys/net/ipv4/conf/{wg}/rp_filter").write_text("2\n")
        table = str(self.routing.table)
        _run("ip", "route", "replace", "default", "dev", wg, "table", table)
        if not self.rule_present():
            added = _run("ip", "rule", "add", *self._rule_args(), check=False)
            if added.returncode != 0 and not self.rule_present():
                raise TunnelError(f"ip rule add: {added.stderr.strip()}")
        self._apply_mangle()

    def set_peer(self, config: TunnelConfig) -> None:
        """The relay as the only peer; setting the endpoint again re-resolves its name."""
        _run(
            "wg", "set", self.interface, "peer", config.relay_key,
            "endpoint", config.endpoint,
            "persistent-keepalive", str(KEEPALIVE_S),
            "allowed-ips", "0.0.0.0/0",
        )  # fmt: skip

    def _rule_args(self) -> tuple[str, ...]:
        r = self.routing
        return ("fwmark", r.mark_arg, "lookup", str(r.table), "priority", str(RULE_PRIORITY))

    def rule_present(self) -> bool:
        done = _run("ip", "rule", "show", "fwmark", self.routing.mark_arg, check=False)
        return f"lookup {self.routing.table}" in done.stdout

    def route_present(self) -> bool:
        done = _run("ip", "route", "show", "table", str(self.routing.table), check=False)
        return f"default dev {self.interface}" in done.stdout

    def _iptables(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run("iptables", "-w", "5", "-t", "mangle", *args, check=check)

    def _apply_mangle(self) -> None:
        for chain, rules in mangle_rules(self.routing).items():
            if self._iptables("-S", chain, check=False).returncode != 0:
                self._iptables("-N", chain)
            self._iptables("-F", chain)
            for rule in rules:
                self._iptables("-A", chain, *rule)
        for builtin, chain in MANGLE_JUMPS:
            if self._iptables("-C", builtin, "-j", chain, check=False).returncode != 0:
                self._iptables("-I", builtin, "1", "-j", chain)

    def mangle_present(self) -> bool:
        return all(
            self._iptables("-C", builtin, "-j", chain, check=False).returncode == 0
            for builtin, chain in MANGLE_JUMPS
        )

    def latest_handshake(self) -> float | None:
        """The Unix time of the relay's last handshake; None when never (or no interface)."""
        done = _run("wg", "show", self.interface, "latest-handshakes", check=False)
        for line in done.stdout.splitlines():
            fields = line.split()
            if len(fields) == 2 and fields[1].isdigit() and int(fields[1]) > 0:
                return float(fields[1])
        return None

    def probe(self, target: str) -> None:
        """One datagram into the tunnel (see `domain.tunnel.probe_target`)."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, contextlib.suppress(OSError):
            s.sendto(b"qudata-probe", (target, PROBE_PORT))

    def down(self) -> None:
        """Removes the rule, the table's route, the mangle chains and the interface."""
        for _ in range(10):  # one per copy left behind, never another mark's rule
            if _run("ip", "rule", "del", *self._rule_args(), check=False).returncode != 0:
                break
        _run("ip", "route", "flush", "table", str(self.routing.table), check=False)
        for builtin, chain in MANGLE_JUMPS:
            while self._iptables("-D", builtin, "-j", chain, check=False).returncode == 0:
                pass
            self._iptables("-F", chain, check=False)
            self._iptables("-X", chain, check=False)
        _run("ip", "link", "del", "dev", self.interface, check=False)
        log.info("tunnel removed", extra={"if": self.interface})
