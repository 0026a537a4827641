"""iptables for the SSH port gate (`domain.port_gate`): close and open one port.

What stays true: only the gate's own chain gets rules, each named by this
agent's id; the jumps into it are added once and left (uninstall.sh removes
every QUDATA-* chain); closing a port twice leaves one rule, opening a port
that is not closed does nothing; a failing iptables call raises
`FirewallError` with its stderr.
"""

from __future__ import annotations

import logging
import subprocess

from qudata_agent.adapters import commands
from qudata_agent.adapters.firewall import FirewallError
from qudata_agent.domain.port_gate import (
    CHAIN,
    JUMPS,
    gate_rule,
    jump_args,
    left_behind,
    own_ports,
)

log = logging.getLogger(__name__)


class IptablesPortGate:
    def __init__(
        self,
        agent_id: str,
        port_range: tuple[int, int] | None = None,
        iptables: str = "iptables",
    ) -> None:
        self._agent_id = agent_id
        self._port_range = port_range  # the instances' ports: no other agent's gates there
        self._iptables = iptables

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return commands.run([self._iptables, "-w", "5", *args], FirewallError, check=check)

    def setup(self) -> list[int]:
        """The chain and its jumps in place, and the rules left behind removed: this
        agent's (a crash) and any on a port of its range (`domain.port_gate`); the
        ports opened."""
        for chain in (CHAIN, *JUMPS):
            if chain in ("INPUT", "OUTPUT"):
                continue
            if self._run("-S", chain, check=False).returncode != 0:
                self._run("-N", chain)  # DOCKER-USER too, before Docker made it
        for chain in JUMPS:
            if self._run("-C", chain, *jump_args(), check=False).returncode != 0:
                self._run("-I", chain, "1", *jump_args())
        listing = self._run("-S", CHAIN).stdout.splitlines()
        stale = left_behind(listing, self._agent_id, self._port_range)
        for port, owner in stale:
            self._remove(port, owner)
        return sorted({port for port, _ in stale})

    def close(self, port: int) -> None:
        """New connections to `port` are refused with a TCP reset from now on."""
        rule = gate_rule(port, self._agent_id)
        if self._run("-C", CHAIN, *rule, check=False).returncode != 0:
            self._run("-A", CHAIN, *rule)

    def open(self, port: int) -> None:
        """`port` is no longer gated (every copy of the rule goes)."""
        self._remove(port, self._agent_id)

    def _remove(self, port: int, owner: str) -> None:
        rule = gate_rule(port, owner)
        while self._run("-D", CHAIN, *rule, check=False).returncode == 0:
            pass

    def closed(self) -> list[int]:
        """The ports this agent gates now."""
        return own_ports(self._run("-S", CHAIN).stdout.splitlines(), self._agent_id)
