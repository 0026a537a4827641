"""The instances' network: the agent's own Docker bridge and the wall around it.

What stays true: before any instance container is created the network exists,
checked when it was already there (`domain.network.problems`: a wrong one with
no container on it is made again, one in use is refused with the fix), and,
unless the provider turned the firewall off, the rules that keep
instances away from the host and from private ranges are in place; the rules
are checked again on every sync and repaired if something (a firewall reload,
a Docker restart) changed them.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from qudata_agent.blocking import Blocking
from qudata_agent.domain.container_spec import LABEL_AGENT
from qudata_agent.domain.firewall import FirewallPlan, plan
from qudata_agent.domain.network import NetworkInfo, problems
from qudata_agent.errors import Unavailable

log = logging.getLogger(__name__)


class NetworkEngine(Protocol):
    def find_network(self, name: str) -> NetworkInfo | None: ...

    def create_network(self, name: str, bridge: str, labels: dict[str, str]) -> str: ...

    def remove_network(self, network_id: str) -> None: ...


class Wall(Protocol):
    def apply(self, plan: FirewallPlan) -> bool: ...


class NetworkGuard:
    def __init__(
        self,
        engine: NetworkEngine,
        wall: Wall | None,
        blocking: Blocking,
        *,
        name: str,
        bridge: str,
        agent_id: str,
        allow: tuple[str, ...] = (),
        dns_servers: tuple[str, ...] = (),
        always_blocked: tuple[str, ...] = (),
    ) -> None:
        self._engine = engine
        self._wall = wall
        self._blocking = blocking
        self._name = name
        self._bridge = bridge
        self._agent_id = agent_id
        self._plan = plan(bridge, allow, dns_servers, always_blocked)
        self._lock = asyncio.Lock()
        self._ready = False
        if wall is None:
            log.warning(
                "tenant firewall is off (QUDATA_FIREWALL=off): instances can reach "
                "the host and private networks"
            )

    @property
    def network(self) -> str:
        return self._name

    async def prepare(self) -> None:
        """Network and wall in place (quick once done); raises if they cannot be made."""
        if self._ready:
            return
        async with self._lock:
            if self._ready:
                return
            await self._blocking.quick(self._ensure_network)
            await self.check()
            self._ready = True

    def _ensure_network(self) -> None:
        found = self._engine.find_network(self._name)
        if found is not None:
            wrong = problems(found, self._bridge)
            if not wrong:
                return
            if found.containers:
                raise Unavailable(
                    f"the Docker network {self._name!r} cannot hold instances: "
                    + "; ".join(wrong)
                    + f". It has {found.containers} container(s) attached: move them off and"
                    f" remove it (docker network rm {self._name}), or set QUDATA_NETWORK to"
                    " another name"
                )
            log.warning(
                "recreating the instance network: it was not as the agent makes it",
                extra={"network": self._name, "problems": wrong},
            )
            self._engine.remove_network(found.network_id)
        self._engine.create_network(self._name, self._bridge, {LABEL_AGENT: self._agent_id})

    async def check(self) -> None:
        if self._wall is not None:
            await self._blocking.quick(self._wall.apply, self._plan)
