"""Linux traffic control (`tc`, `ip`): an instance's host-side interface and its rate caps.

The only module that runs `tc` and changes links for the meter. What stays true:
- a container's address and host-side veth are learned from the kernel: the
  container's network namespace is entered only to run the host's own `ip`
  (nothing of the tenant's runs), and the veth is found in /sys by index;
- a cap is applied with `replace`, so applying it again is harmless; the
  veth's qdiscs go with the veth when the container stops; the IFB device of
  an instance is removed with the instance (`remove_ifb`);
- a failing command raises `ShapingError` with its stderr.
"""

from __future__ import annotations

import json
import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path

from qudata_agent.adapters import commands
from qudata_agent.domain.netpolicy import shaping_commands
from qudata_agent.errors import AgentError

log = logging.getLogger(__name__)


class ShapingError(AgentError):
    pass


@dataclass(frozen=True)
class Attachment:
    """Where a running container meets the host: its IPv4 address and host-side veth."""

    address: str
    veth: str


def _run(argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    return commands.run(argv, ShapingError, check=check)


class TrafficControl:
    def __init__(self, sys_net: Path = Path("/sys/class/net")) -> None:
        self._sys_net = sys_net
        self._ifb_ok: bool | None = None  # unknown until the first IFB is made

    def attachment(self, pid: int) -> Attachment:
        """The container's address and the host end of its veth (its init's `pid`)."""
        done = _run(["nsenter", f"--net=/proc/{pid}/ns/net", "ip", "-j", "-4", "addr", "show"])
        try:
            links = json.loads(done.stdout or "[]")
        except json.JSONDecodeError as e:
            raise ShapingError(f"ip printed no JSON for pid {pid}") from e
        for link in links if isinstance(links, list) else []:
            index = link.get("link_index") if isinstance(link, dict) else None
            addresses = [a.get("local") for a in link.get("addr_info", [])] if index else []
            if isinstance(index, int) and addresses and isinstance(addresses[0], str):
                return Attachment(addresses[0], self._host_link(index))
        raise ShapingError(f"no veth with an IPv4 address in the namespace of pid {pid}")

    def _host_link(self, index: int) -> str:
        for entry in self._sys_net.iterdir():
            try:
                if int((entry / "ifindex").read_text()) == index:
                    return entry.name
            except (OSError, ValueError):
                continue
        raise ShapingError(f"no host interface with index {index}")

    def shape(self, veth: str, ifb: str, mbps: float) -> str:
        """Caps both directions of `veth` at `mbps`; "ifb" or "police": how uploads are capped."""
        use_ifb = self._ensure_ifb(ifb)
        for argv in shaping_commands(veth, ifb if use_ifb else None, mbps):
            # Deleting filters that are not there is fine; everything else must work.
            _run(argv, check=argv[:3] != ["tc", "filter", "del"])
        return "ifb" if use_ifb else "police"

    def _ensure_ifb(self, name: str) -> bool:
        if self._ifb_ok is False:
            return False
        if (self._sys_net / name).exists():
            return True
        done = _run(["ip", "link", "add", name, "type", "ifb"], check=False)
        if done.returncode != 0 and not (self._sys_net / name).exists():
            log.warning(
                "no IFB devices on this host: uploads are policed, not shaped",
                extra={"error": done.stderr.strip()},
            )
            self._ifb_ok = False
            return False
        self._ifb_ok = True
        return True

    def unshape(self, veth: str) -> None:
        """Takes the caps off a veth (gone already is fine)."""
        for argv in (["tc", "qdisc", "del", "dev", veth, "root"],
                     ["tc", "qdisc", "del", "dev", veth, "ingress"]):  # fmt: skip
            _run(argv, check=False)

    def remove_ifb(self, name: str) -> None:
        if (self._sys_net / name).exists():
            _run(["ip", "link", "del", name], check=False)
