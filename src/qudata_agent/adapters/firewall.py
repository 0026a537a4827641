"""iptables, through its command line: the only module that changes the host's firewall.

Applies a `domain.firewall.FirewallPlan` idempotently. What stays true:
- only the agent's own chains are flushed or deleted; Docker's chains and
  INPUT get exactly one jump rule each, added once and removed by `remove()`;
- a chain already holding the planned rules is left alone (no window without
  rules on every check), one that drifted is rebuilt;
- a chain a jump starts from that does not exist yet is made: at boot the wall
  goes in before Docker, which then keeps the DOCKER-USER chain it finds (it
  appends its RETURN and jumps to it from FORWARD);
- nothing here removes the wall but `remove()`, which only tests call: the
  agent's stop leaves it standing (uninstall.sh takes it away);
- a failing iptables call raises `FirewallError` with its stderr.
"""

from __future__ import annotations

import logging
import subprocess

from qudata_agent.adapters import commands
from qudata_agent.domain.firewall import FirewallPlan, expected_listing
from qudata_agent.errors import AgentError

log = logging.getLogger(__name__)
_BUILT_IN = frozenset({"INPUT", "FORWARD", "OUTPUT", "PREROUTING", "POSTROUTING"})


class FirewallError(AgentError):
    pass


class Firewall:
    def __init__(self, iptables: str = "iptables") -> None:
        self._iptables = iptables

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return commands.run([self._iptables, "-w", "5", *args], FirewallError, check=check)

    def _listing(self, chain: str) -> list[str] | None:
        done = self._run("-S", chain, check=False)
        return done.stdout.splitlines() if done.returncode == 0 else None

    def apply(self, plan: FirewallPlan) -> bool:
        """Makes the plan true; True when something had to change."""
        if self._stands(plan):
            return False
        changed = False
        for chain, rules in plan.chains.items():
            if self._listing(chain) == expected_listing(chain, rules):
                continue
            if self._listing(chain) is None:
                self._run("-N", chain)
            self._run("-F", chain)
            for rule in rules:
                self._run("-A", chain, *rule)
            changed = True
        for jump in plan.jumps:
            if jump.chain not in _BUILT_IN and self._listing(jump.chain) is None:
                self._run("-N", jump.chain)  # DOCKER-USER, before Docker made it
                changed = True
            if self._run("-C", jump.chain, *jump.args, check=False).returncode != 0:
                self._run("-I", jump.chain, "1", *jump.args)
                changed = True
        if changed:
            log.info("tenant firewall rules installed", extra={"chains": list(plan.chains)})
        return changed

    def _stands(self, plan: FirewallPlan) -> bool:
        """The plan is true already, seen in one listing of the whole table (every create
        checks the wall: one iptables call instead of one per chain and per jump). False
        also when the listing fails or reads differently: `apply` then looks chain by
        chain as before."""
        done = self._run("-S", check=False)
        if done.returncode != 0:
            return False
        lines = done.stdout.splitlines()
        for chain, rules in plan.chains.items():
            mine = [
                line for line in lines if line == f"-N {chain}" or line.startswith(f"-A {chain} ")
            ]
            if mine != expected_listing(chain, rules):
                return False
        present = set(lines)
        return all(f"-A {j.chain} {' '.join(j.args)}" in present for j in plan.jumps)

    def problems(self, plan: FirewallPlan) -> list[str]:
        """What differs from the plan, changing nothing; raises if iptables fails."""
        found = []
        for chain, rules in plan.chains.items():
            listing = self._listing(chain)
            if listing is None:
                found.append(f"chain {chain} is missing")
            elif listing != expected_listing(chain, rules):
                found.append(f"chain {chain} differs from the plan")
        for jump in plan.jumps:
            if self._run("-C", jump.chain, *jump.args, check=False).returncode != 0:
                found.append(f"no jump {' '.join(jump.args)} in {jump.chain}")
        if found and self._run("-S", "INPUT", check=False).returncode != 0:
            raise FirewallError("iptables cannot list the rules (run as root)")
        return found

    def remove(self, plan: FirewallPlan) -> None:
        for jump in plan.jumps:
            while self._run("-C", jump.chain, *jump.args, check=False).returncode == 0:
                self._run("-D", jump.chain, *jump.args)
        for chain in plan.chains:
            if self._listing(chain) is not None:
                self._run("-F", chain)
                self._run("-X", chain)
        log.info("tenant firewall rules removed")
