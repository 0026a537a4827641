"""The instances' records and the one path every status change takes.

Owns every write of an instance's row (its insert at create, its updates,
a failed build's record, its delete), the per-instance locks, and the
telling of changes (to `InstanceEvents`, where listeners sign up). The
instance service, the build pipeline and the reconciler all move statuses
through here.

What stays true:
- no other module calls the store's instance-row writers (a test in
  tests/unit/test_architecture.py walks the source for them);
- every status change is a transition the table in `domain.instance` allows
  (`Instance.move`, `observe`), written to the store before anyone is told;
- one lock per instance: the holder is the only one acting on that instance
  (its lifecycle action, its build's last step, its reconcile step);
- a listener of new runs hears of each fresh start of a container once
  (SSH comes back on it, the shared CPU pool is applied); a listener of
  removals hears of each record that went; a listener of changes hears of
  every change (the stats are sent at once).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from qudata_agent.background import KeyedLocks
from qudata_agent.blocking import Blocking
from qudata_agent.domain.container_spec import ContainerState
from qudata_agent.domain.instance import Instance, observe
from qudata_agent.services.instance_events import InstanceEvents

log = logging.getLogger(__name__)


class InstanceStore(Protocol):
    def insert_instance(self, instance: Instance, volumes: Iterable[str] = ()) -> None: ...

    def update_instance(self, instance: Instance) -> None: ...

    def release_resources(self, instance_id: str) -> None: ...

    def fail_instance(self, instance: Instance) -> None: ...

    def delete_instance(self, instance_id: str) -> None: ...

    def get_instance(self, instance_id: str) -> Instance | None: ...

    def list_instances(self) -> list[Instance]: ...

    def allocated_ports(self) -> frozenset[int]: ...

    def allocated_gpus(self) -> frozenset[str]: ...


class Records:
    def __init__(
        self,
        store: InstanceStore,
        blocking: Blocking,
        events: InstanceEvents | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self._blocking = blocking
        self.events = events or InstanceEvents()
        self.clock = clock
        self._locks: KeyedLocks[str] = KeyedLocks()

    def removed(self, instance: Instance) -> None:
        self.events.removed(instance)

    def lock(self, instance_id: str) -> asyncio.Lock:
        return self._locks(instance_id)

    def forget_lock(self, instance_id: str) -> None:
        self._locks.forget(instance_id)

    async def get(self, instance_id: str) -> Instance | None:
        return await self._blocking.quick(self.store.get_instance, instance_id)

    async def all(self) -> list[Instance]:
        """Every record, oldest first."""
        return await self._blocking.quick(self.store.list_instances)

    def insert(self, instance: Instance, volumes: Iterable[str] = ()) -> None:
        """Records a new instance with its ports, GPUs and volumes, all or nothing.

        Blocking: the create calls it from its thread, under the create lock,
        right after it chose the ports. Refuses (409) a volume that is taken.
        """
        self.store.insert_instance(instance, volumes)

    async def save(self, instance: Instance) -> Instance:
        await self._blocking.quick(self.store.update_instance, instance)
        return instance

    async def fail(self, failed: Instance) -> None:
        """Records a failed build and frees its ports and GPUs, in one transaction."""
        await self._blocking.quick(self.store.fail_instance, failed)

    async def delete(self, instance_id: str) -> None:
        """Removes the row; its ports, GPUs and storage request go with it."""
        await self._blocking.quick(self.store.delete_instance, instance_id)

    async def save_observed(self, before: Instance, state: ContainerState) -> Instance:
        """The record after Docker reported `state`; new-run listeners told of a fresh start."""
        after = await self.save(observe(before, state, self.clock()))
        if after.new_run_of(before):
            self.new_run(after)
        return after

    def new_run(self, instance: Instance) -> None:
        self.events.new_run(instance)

    def changed(self) -> None:
        self.events.changed()

    async def vanished(self, instance: Instance) -> None:
        """Its container was removed behind the agent's back: the record goes, with its ports."""
        log.warning(
            "instance container removed outside the agent; instance destroyed",
            extra={"instance_id": instance.id},
        )
        await self.delete(instance.id)
        self.removed(instance)
