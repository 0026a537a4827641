"""nftables, through the `nft` command: the agent's own table of network meters and policy.

The only module that runs `nft`. What stays true:
- it touches only the tables named by `domain.netpolicy.table_name` (one per
  bridge); Docker's and the wall's rules are never read or changed;
- each change is one `nft -f -` transaction: all of it or none;
- a failing `nft` raises `NftError` with its stderr.
"""

from __future__ import annotations

import json
from typing import Any

from qudata_agent.adapters import commands
from qudata_agent.domain.netpolicy import table_name
from qudata_agent.errors import AgentError


class NftError(AgentError):
    pass


class Nftables:
    def __init__(self, bridge: str, nft: str = "nft") -> None:
        self._nft = nft
        self._table = table_name(bridge)

    def _run(self, args: list[str], script: str | None = None) -> str:
        return commands.run([self._nft, *args], NftError, stdin=script).stdout

    def apply(self, script: str) -> None:
        """Runs `script` as one transaction."""
        if script.strip():
            self._run(["-f", "-"], script)

    def exists(self) -> bool:
        try:
            self._run(["list", "table", "ip", self._table])
        except NftError:
            return False
        return True

    def counters(self) -> dict[str, tuple[int, int]]:
        """Every named counter of the table: name -> (packets, bytes); {} with no table."""
        try:
            out = self._run(["-j", "list", "counters", "table", "ip", self._table])
        except NftError:
            if not self.exists():
                return {}
            raise
        found: dict[str, tuple[int, int]] = {}
        for item in _items(out):
            counter = item.get("counter")
            if isinstance(counter, dict) and isinstance(counter.get("name"), str):
                packets, size = int(counter.get("packets", 0)), int(counter.get("bytes", 0))
                found[counter["name"]] = (packets, size)
        return found

    def map_keys(self, name: str) -> dict[str, str]:
        """The elements of one of the table's maps: address -> counter name."""
        out = self._run(["-j", "list", "map", "ip", self._table, name])
        keys: dict[str, str] = {}
        for item in _items(out):
            found = item.get("map")
            if not isinstance(found, dict):
                continue
            for element in found.get("elem", []):
                if isinstance(element, list) and len(element) == 2:
                    keys[str(element[0])] = str(element[1])
        return keys

    def remove(self) -> None:
        """The whole table goes (uninstall, tests)."""
        if self.exists():
            self._run(["delete", "table", "ip", self._table])


def _items(out: str) -> list[dict[str, Any]]:
    try:
        parsed = json.loads(out)
    except json.JSONDecodeError as e:
        raise NftError(f"nft printed no JSON: {out[:200]!r}") from e
    items = parsed.get("nftables", []) if isinstance(parsed, dict) else []
    return [i for i in items if isinstance(i, dict)]
