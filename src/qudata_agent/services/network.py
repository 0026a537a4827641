"""The instances' network: the agent's own Docker bridge and the wall around it.

What stays true: before any instance container is created the network exists,
checked when it was already there (`domain.network.problems`: a wrong one with
no container on it is made again, one in use is refused with the fix), and,
unless the provider turned the firewall off, the rules that keep
instances away from the host and from private ranges are in place; the rules
are checked again on every sync and repaired if something (a firewall reload,
a Docker restart) changed them.

The wall fails closed: every create verifies it (`verify`: a check begun after
the create asked, shared by the creates that wait together), and while it
cannot be verified creates are refused (503) with the reason; one good check
never lets a later create through unchecked. The agent never removes the wall:
it stands while the agent is stopped, and at boot it goes in before Docker
(`qudata-agent firewall apply`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from qudata_agent.blocking import Blocking
from qudata_agent.domain.container_spec import LABEL_AGENT
from qudata_agent.domain.firewall import FirewallPlan
from qudata_agent.domain.network import problems
from qudata_agent.errors import AgentError, Unavailable
from qudata_agent.services.engine import Networks

log = logging.getLogger(__name__)


class Wall(Protocol):
    def apply(self, plan: FirewallPlan) -> bool: ...


class NetworkGuard:
    def __init__(
        self,
        engine: Networks,
        wall: Wall | None,
        blocking: Blocking,
        *,
        name: str,
        bridge: str,
        agent_id: str,
        wall_plan: FirewallPlan | None = None,
    ) -> None:
        self._engine = engine
        self._wall = wall
        self._blocking = blocking
        self._name = name
        self._bridge = bridge
        self._agent_id = agent_id
        self._plan = wall_plan or FirewallPlan(chains={}, jumps=())
        self._lock = asyncio.Lock()
        self._ready = False
        self._wall_lock = asyncio.Lock()
        self._verified_from = -1.0  # when the last good check began (monotonic)
        self._wall_error: str | None = None  # why the last check failed
        if wall is None:
            log.warning(
                "tenant firewall is off (QUDATA_FIREWALL=off): instances can reach "
                "the host and private networks"
            )

    @property
    def network(self) -> str:
        return self._name

    async def prepare(self, asked: float | None = None) -> None:
        """Network in place (made once) and the wall verified by a check begun at or after
        `asked` (a `time.monotonic()`; None: now); raises if either is not. A build passes
        the moment its create asked: the create's own check covers it, and a build does
        not pay a second one (tens of milliseconds of iptables) on its way to `running`."""
        if not self._ready:
            async with self._lock:
                if not self._ready:
                    await self._ensure_network()
                    self._ready = True
        await self.verify(asked)

    async def _ensure_network(self) -> None:
        found = await self._engine.find_network(self._name)
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
            await self._engine.remove_network(found.network_id)
        await self._engine.create_network(self._name, self._bridge, {LABEL_AGENT: self._agent_id})

    async def check(self) -> None:
        """Installs or repairs the wall; raises `Unavailable` with the reason if it cannot."""
        if self._wall is None:
            return
        async with self._wall_lock:
            await self._check_locked()

    async def verify(self, asked: float | None = None) -> None:
        """The wall stands now, or stood by a check begun at or after `asked` (503 if it
        cannot be verified); waiting creates share a check."""
        if self._wall is None:
            return
        asked = time.monotonic() if asked is None else asked
        async with self._wall_lock:
            if self._verified_from >= asked:
                return  # a check that began after we asked succeeded
            await self._check_locked()

    async def _check_locked(self) -> None:
        assert self._wall is not None
        began = time.monotonic()
        try:
            await self._blocking.quick(self._wall.apply, self._plan)
        except AgentError as e:
            if self._wall_error is None:
                log.error("the tenant firewall cannot be verified", extra={"error": e.message})
            self._wall_error = e.message
            self._verified_from = -1.0
            raise Unavailable(
                f"the tenant firewall cannot be verified ({e.message}): no instance is"
                " created until it can be; see `qudata-agent doctor` and the agent's log"
            ) from e
        if self._wall_error is not None:
            log.info("the tenant firewall is verified again")
        self._wall_error = None
        self._verified_from = began
