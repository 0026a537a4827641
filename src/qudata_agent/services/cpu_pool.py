"""The shared CPU pool: instances without cores of their own are kept off pinned ones.

Placement gives an instance that asked for whole cores a cpuset of its own
(`domain.placement`). Every other instance runs on what is left
(`placement.shared_cpus`): this service moves their containers there
(`docker update --cpuset-cpus`, which Docker keeps across restarts) each time
a container starts a new run (a pinned one may have just come up) and a few
seconds after a delete (pinned cores may be free again).

What stays true: a pinned core carries only its own instance (after the few
milliseconds between a pinned container's start and this pass); a container
already on the pool is not updated again; with one instance per host nothing
is changed; passes never overlap (a request during a pass makes one more pass
after it), and the pass is a task owned here, cancelled and awaited on close.
A container that went away meanwhile is skipped; any other failure is logged,
and the next trigger tries again.

Why a freed core waits `WIDEN_AFTER_S`: a renter who deletes often creates
again at once, and the new pinned instance takes the same core. Widening at
once and narrowing again moved every floating container twice (a Docker
update each, beside the new instance's start); after the wait there is often
nothing to move.
"""

from __future__ import annotations

import asyncio
import logging

from qudata_agent.background import Rerun
from qudata_agent.domain.instance import Instance
from qudata_agent.domain.placement import Holding, shared_cpus
from qudata_agent.domain.topology import format_cpu_list
from qudata_agent.errors import AgentError, NotFound
from qudata_agent.services.capacity import HostCapacity
from qudata_agent.services.engine import Containers
from qudata_agent.services.records import Records

log = logging.getLogger(__name__)

WIDEN_AFTER_S = 3.0


class CpuPool:
    def __init__(
        self,
        *,
        records: Records,
        capacity: HostCapacity,
        engine: Containers,
        widen_after_s: float = WIDEN_AFTER_S,
    ) -> None:
        self._records = records
        self._capacity = capacity
        self._engine = engine
        self._widen_after_s = widen_after_s
        self._passes = Rerun(self._guarded_pass, "cpu pool")
        self._later: asyncio.TimerHandle | None = None
        self._on: dict[str, str] = {}  # container -> the pool it was put on
        self.applied: str | None = None  # the pool last applied (for the logs and tests)
        records.events.on_new_run(self.poke)  # a pinned instance may have just come up
        records.events.on_removed(self.poke_later)  # its cores may be free again

    def poke(self, _instance: Instance | None = None) -> None:
        """Asks for a pass (a new run's listener, or after a delete); never waits."""
        if self._capacity.max_instances == 1:
            return  # no neighbours to keep off anything
        self._passes.poke()  # during a pass: one more once it ends

    def poke_later(self, _instance: Instance | None = None) -> None:
        """A pass in `widen_after_s` (after a delete): the next new run's pass may have
        found nothing left to move by then."""
        if self._later is None or self._later.cancelled():
            loop = asyncio.get_running_loop()
            self._later = loop.call_later(self._widen_after_s, self._poke_now)

    def _poke_now(self) -> None:
        self._later = None
        self.poke()

    async def _guarded_pass(self) -> None:
        try:
            await self._pass()
        except AgentError as e:
            log.warning("shared CPU pool not applied", extra={"error": e.message})

    async def _pass(self) -> None:
        capacity, _ = await self._capacity.read()
        records = await self._records.all()
        specs = {i.id: i.require_spec() for i in records}
        holdings = [Holding.of_spec(spec) for spec in specs.values()]
        everything = format_cpu_list(c.cpu for c in capacity.shape.cpus)
        pool = format_cpu_list(shared_cpus(capacity, holdings))
        if pool == everything and self.applied in (None, everything):
            return  # nothing pinned, and nothing kept off a core before: all float already
        floating = [
            i.container_id for i in records if i.container_id and not specs[i.id].cpuset_cpus
        ]
        self._on = {c: cpus for c, cpus in self._on.items() if c in floating}
        for container_id in floating:
            if self._on.get(container_id, everything) == pool:
                continue  # on it already (a new container is on every CPU)
            try:
                await self._engine.set_cpuset(container_id, pool)
            except NotFound:
                continue  # removed meanwhile
            self._on[container_id] = pool
        if pool != self.applied:
            log.info("shared CPU pool", extra={"cpus": pool, "instances": len(floating)})
            self.applied = pool

    async def settled(self) -> None:
        """Returns once no pass runs (the one asked for during a pass included)."""
        await self._passes.settled()

    async def close(self) -> None:
        if self._later is not None:
            self._later.cancel()
        await self._passes.close()
