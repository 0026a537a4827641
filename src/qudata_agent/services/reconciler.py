"""The reconciler: Docker brought in line with the records, and the records with Docker.

Applies `domain.reconcile.plan` (restore at start, the periodic sync) and
follows Docker's events one container at a time (`refresh`). Every instance
of the host is treated alike.

What stays true:
- the store is read before Docker is listed, and a removal is checked
  against the store again right before it is made (see `domain.reconcile`);
- each step runs under its instance's lock and re-reads the record first, so
  a step never undoes what an action or a build did meanwhile;
- a step that fails does not stop the others: the pass raises at its end,
  is counted, and the next pass tries again; one instance's trouble never
  touches another's container.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from qudata_agent.domain.instance import Instance, Status, Wanted, observe
from qudata_agent.domain.reconcile import (
    DEFAULT_GRACE_S,
    Forget,
    Observe,
    RemoveLeftover,
    RemoveOrphan,
    Start,
    Step,
    Stop,
    plan,
    start_was_missed,
)
from qudata_agent.errors import AgentError, NotFound, Unavailable
from qudata_agent.services.builds import BuildPipeline
from qudata_agent.services.engine import Containers
from qudata_agent.services.records import Records

log = logging.getLogger(__name__)


def built(instance: Instance) -> bool:
    """Has a container of its own to follow (not pending, not a failed build)."""
    return instance.status is not Status.PENDING and instance.container_id is not None


class Reconciler:
    def __init__(
        self,
        *,
        records: Records,
        builds: BuildPipeline,
        engine: Containers,
        agent_id: str,
        stop_timeout_s: int = 10,
        grace_s: float = DEFAULT_GRACE_S,
        on_pass: Callable[[bool], None] = lambda _ok: None,
        clock: Callable[[], float] = time.time,
        restore_first: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._records = records
        self._builds = builds
        self._engine = engine
        self._agent_id = agent_id
        self._stop_timeout_s = stop_timeout_s
        self._grace_s = grace_s
        self._on_pass = on_pass
        self._clock = clock
        self._restore_first = restore_first  # the volumes mounted again
        self._first_pass_done = False  # the first pass also brings idle instances back

    async def restore(self) -> None:
        """At start: resume interrupted builds, converge, make sure SSH is up on what runs.

        What instances mount comes first (`restore_first`: the volumes mounted
        again), so no container is started on a volume that is not there.
        """
        if self._restore_first is not None:
            await self._restore_first()
        building = self._builds.building()
        for instance in await self._records.all():
            if instance.status is Status.PENDING and instance.id not in building:
                log.info("resuming an interrupted build", extra={"instance_id": instance.id})
                self._builds.start(instance, None, resumed=True)
        await self.sync()
        for instance in await self._records.all():
            if instance.status is Status.RUNNING:
                self._records.new_run(instance)  # the agent was away: make sure SSH is up

    async def sync(self) -> None:
        """The full pass: the store read first, then Docker's list, then the plan applied.

        Each pass's outcome goes to `on_pass` (the metrics' reconcile count).
        """
        try:
            await self._sync()
        except Exception:
            self._on_pass(False)
            raise
        self._on_pass(True)

    async def _sync(self) -> None:
        wanted = await self._records.all()
        observed = await self._engine.list_managed(self._agent_id)
        steps = plan(
            wanted,
            observed,
            building=self._builds.building(),
            now=self._clock(),
            grace_s=self._grace_s,
            at_start=not self._first_pass_done,
        )
        failed = 0
        for step in steps:
            try:
                await self._apply(step)
            except AgentError as e:
                failed += 1
                log.warning(
                    "reconcile step failed",
                    extra={"step": type(step).__name__, "error": e.message},
                )
        if failed:
            raise Unavailable(f"{failed} of {len(steps)} reconcile steps failed")
        self._first_pass_done = True

    async def on_container_event(self, container_id: str) -> None:
        for instance in await self._records.all():
            if container_id in (instance.container_id, instance.container_name):
                await self.refresh(instance)

    async def refresh(self, instance: Instance) -> None:
        """Brings one built instance's record in line with its container."""
        if instance.id in self._builds.building() or not built(instance):
            return
        async with self._records.lock(instance.id):
            fresh = await self._records.get(instance.id)
            if fresh is None or not built(fresh):
                return  # deleted, or failed, meanwhile
            try:
                state = await self._engine.inspect(fresh.container_id or fresh.container_name)
            except NotFound:
                await self._records.vanished(fresh)
                return
            updated = observe(fresh, state, self._clock())
            seen = ("status", "reason", "exit_code", "started_at", "container_id")
            if all(getattr(updated, f) == getattr(fresh, f) for f in seen):
                return
            updated = await self._records.save_observed(fresh, state)
        log.info(
            "instance status changed",
            extra={"instance_id": updated.id, "status": updated.status, "reason": updated.reason},
        )
        self._records.changed()

    # -- the steps ------------------------------------------------------------------

    async def _apply(self, step: Step) -> None:
        if isinstance(step, RemoveOrphan):
            await self._remove_orphan(step)
        elif isinstance(step, RemoveLeftover):
            await self._remove_leftover(step)
        elif isinstance(step, Forget | Observe):
            fresh = await self._records.get(step.instance_id)
            if fresh is not None:
                await self.refresh(fresh)
        else:
            await self._converge(step)

    async def _remove_orphan(self, step: RemoveOrphan) -> None:
        # Checked again now: a create that raced the listing has its record by now.
        if step.instance_id is not None:
            if step.instance_id in self._builds.building():
                return
            if await self._records.get(step.instance_id) is not None:
                return
        log.warning(
            "removing a container with no instance record", extra={"container": step.container_id}
        )
        await self._engine.remove(step.container_id)

    async def _remove_leftover(self, step: RemoveLeftover) -> None:
        async with self._records.lock(step.instance_id):
            fresh = await self._records.get(step.instance_id)
            if fresh is None or fresh.container_id is not None or fresh.status is not Status.ERROR:
                return
            log.info("removing the container of a failed build", extra={"instance_id": fresh.id})
            await self._engine.remove(step.container_id)

    async def _converge(self, step: Start | Stop) -> None:
        """Carries out what the renter wanted and nothing else will (see domain.reconcile)."""
        async with self._records.lock(step.instance_id):
            instance = await self._records.get(step.instance_id)
            if instance is None or not built(instance):
                return
            state = await self._engine.inspect(step.container_id)
            if isinstance(step, Stop):
                if instance.wanted is not Wanted.STOPPED or not state.running:
                    return
                await self._engine.stop(step.container_id, self._stop_timeout_s)
            else:
                if instance.wanted is not Wanted.RUNNING or not start_was_missed(
                    instance, state, step.at_start
                ):
                    return
                await self._engine.start(step.container_id)
            log.info(
                "converged an instance towards what the renter wanted",
                extra={
                    "instance_id": instance.id,
                    "wanted": instance.wanted,
                    "why": step.why if isinstance(step, Start) else "wanted stopped",
                },
            )
            state = await self._engine.inspect(step.container_id)
            await self._records.save_observed(instance, state)
        self._records.changed()
