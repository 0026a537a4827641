"""The shared CPU pool: instances without cores of their own are kept off pinned ones.

Placement gives an instance that asked for whole cores a cpuset of its own
(`domain.placement`). Every other instance runs on what is left
(`placement.shared_cpus`): this service moves their containers there
(`docker update --cpuset-cpus`, which Docker keeps across restarts) each time
a container starts a new run (a pinned one may have just come up) and after
a delete (pinned cores may be free again).

What stays true: a pinned core carries only its own instance (after the few
milliseconds between a pinned container's start and this pass); with one
instance per host nothing is changed; passes never overlap (a request during
a pass makes one more pass after it), and the pass is a task owned here,
cancelled and awaited on close. A container that went away meanwhile is
skipped; any other failure is logged, and the next trigger tries again.
"""

from __future__ import annotations

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


class CpuPool:
    def __init__(
        self,
        *,
        records: Records,
        capacity: HostCapacity,
        engine: Containers,
    ) -> None:
        self._records = records
        self._capacity = capacity
        self._engine = engine
        self._passes = Rerun(self._guarded_pass, "cpu pool")
        self.applied: str | None = None  # the pool last applied (for the logs and tests)
        records.events.on_new_run(self.poke)  # a pinned instance may have just come up
        records.events.on_removed(self.poke)  # its cores may be free again

    def poke(self, _instance: Instance | None = None) -> None:
        """Asks for a pass (a new run's listener, or after a delete); never waits."""
        if self._capacity.max_instances == 1:
            return  # no neighbours to keep off anything
        self._passes.poke()  # during a pass: one more once it ends

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
        floating = [i for i in records if i.container_id and not specs[i.id].cpuset_cpus]
        for instance in floating:
            assert instance.container_id is not None
            try:
                await self._engine.set_cpuset(instance.container_id, pool)
            except NotFound:
                continue  # removed meanwhile
        if pool != self.applied:
            log.info("shared CPU pool", extra={"cpus": pool, "instances": len(floating)})
            self.applied = pool

    async def settled(self) -> None:
        """Returns once no pass runs (the one asked for during a pass included)."""
        await self._passes.settled()

    async def close(self) -> None:
        await self._passes.close()
