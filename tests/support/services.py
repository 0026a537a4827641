"""The instance-side services built one at a time, for their own unit tests.

Each service's tests build it here and nowhere else, so a change of a
constructor (or of where listeners sign up) is one edit in this module. The
store is always a real `Store` on a sqlite file; Docker is `FakeEngine` (or a
smaller fake) behind the adapter's own async ports (`DockerPorts`), so each
call runs in the pool the real one would; nothing here starts a thread of its
own or touches Docker.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qudata_agent.adapters.docker.ports import DockerPorts
from qudata_agent.adapters.store import Store
from qudata_agent.blocking import Blocking
from qudata_agent.domain.container_spec import ContainerSpec
from qudata_agent.domain.image_gc import Thresholds
from qudata_agent.domain.instance import Instance, Status, Wanted
from qudata_agent.domain.topology import Cpu, GpuTopology, HostShape
from qudata_agent.services.builds import BuildPipeline
from qudata_agent.services.capacity import Disk, HostCapacity
from qudata_agent.services.cpu_pool import WIDEN_AFTER_S, CpuPool
from qudata_agent.services.image_cache import ImageCache
from qudata_agent.services.images import ImageService
from qudata_agent.services.instance_events import InstanceEvents
from qudata_agent.services.pulls import PullCoordinator
from qudata_agent.services.reconciler import Reconciler
from qudata_agent.services.records import Records
from qudata_agent.services.views import InstanceViews
from support.fake_engine import FakeEngine

AGENT_ID = "agent-1"
GIB = 1024**3


@dataclass
class Base:
    """What every service stands on: a real store, the thread bridge, a fake Docker."""

    store: Store
    blocking: Blocking
    engine: FakeEngine = field(default_factory=FakeEngine)

    def ports(self, engine: Any = None) -> DockerPorts:
        """`engine` (the base's by default) behind the adapter's async ports."""
        return DockerPorts(self.engine if engine is None else engine, self.blocking)


@contextmanager
def base_on(tmp_path: Path, store_type: type[Store] = Store) -> Iterator[Base]:
    """`store_type`: a real store that may be made to refuse a write (a full disk)."""
    base = Base(store_type.open(tmp_path / "agent.db"), Blocking())
    try:
        yield base
    finally:
        base.engine.pull_gate.set()  # a pull still waiting ends
        base.blocking.close()
        base.store.close()


# -- records ------------------------------------------------------------------------


def spec_of(instance_id: str, **changes: Any) -> ContainerSpec:
    values: dict[str, Any] = {
        "instance_id": instance_id,
        "agent_id": AGENT_ID,
        "image": "present:1",
        "command": (),
    }
    values.update(changes)
    return ContainerSpec(**values)


def record(
    base: Base,
    instance_id: str,
    *,
    status: Status = Status.RUNNING,
    wanted: Wanted = Wanted.RUNNING,
    spec: ContainerSpec | None = None,
    ports: dict[str, int] | None = None,
    **changes: Any,
) -> Instance:
    """An instance record as a create leaves it, inserted in the store (with its ports)."""
    spec = spec or spec_of(instance_id)
    instance = Instance(
        id=instance_id,
        status=status,
        wanted=wanted,
        image=spec.image,
        container_name=spec.name,
        ports=ports or {},
        phase="queued" if status is Status.PENDING else None,
        created_at=1.0,
        updated_at=1.0,
        spec=spec,
        **changes,
    )
    base.store.insert_instance(instance)
    return instance


def make_records(base: Base, clock: Callable[[], float] = time.time) -> Records:
    return Records(base.store, base.blocking, clock=clock)


def listen(
    records: Records,
    *,
    new_run: Callable[[Instance], None] | None = None,
    removed: Callable[[Instance], None] | None = None,
    changed: Callable[[], None] | None = None,
) -> None:
    """Signs the listeners up for what `records` tells."""
    if new_run is not None:
        records.events.on_new_run(new_run)
    if removed is not None:
        records.events.on_removed(removed)
    if changed is not None:
        records.events.on_change(changed)


# -- the services ---------------------------------------------------------------------


def make_images(base: Base) -> ImageService:
    pulls = PullCoordinator(base.ports(), base.blocking, 5)
    return ImageService(base.ports(), base.store, base.blocking, pulls)


def make_builds(
    base: Base, records: Records, images: ImageService | None = None, **options: Any
) -> BuildPipeline:
    options.setdefault("cleanup_retry_s", 0.01)
    return BuildPipeline(
        records=records,
        engine=base.ports(),
        images=images or make_images(base),
        **options,
    )


def make_reconciler(
    base: Base, records: Records, builds: BuildPipeline, **options: Any
) -> Reconciler:
    return Reconciler(
        records=records,
        builds=builds,
        engine=base.ports(),
        agent_id=AGENT_ID,
        **options,
    )


def make_views(base: Base, images: ImageService | None = None, **options: Any) -> InstanceViews:
    options["engine"] = base.ports(options.get("engine"))
    return InstanceViews(images=images or make_images(base), **options)


def eight_cpus(gpus: GpuTopology) -> HostShape:
    """A host of 8 logical CPUs (4 cores with 2 threads each) and 32 GiB."""
    cpus = tuple(Cpu(i, i % 4) for i in range(8))
    return HostShape(gpus=gpus, cpus=cpus, memory_bytes=32 * GIB)


async def no_gpus(_need: bool) -> GpuTopology:
    return GpuTopology()


def make_capacity(base: Base, **options: Any) -> HostCapacity:
    options.setdefault("topology", no_gpus)
    options.setdefault("shape", eight_cpus)
    options.setdefault("disk", lambda: Disk(100 * GIB, 50 * GIB))
    return HostCapacity(blocking=base.blocking, **options)


def make_cpu_pool(
    base: Base,
    records: Records,
    capacity: HostCapacity,
    engine: Any,
    widen_after_s: float = WIDEN_AFTER_S,
) -> CpuPool:
    return CpuPool(
        records=records, capacity=capacity, engine=base.ports(engine), widen_after_s=widen_after_s
    )


def make_image_cache(
    base: Base,
    engine: Any,
    *,
    thresholds: Thresholds,
    free_bytes: int | None,
    busy: frozenset[str] = frozenset(),
    keep: tuple[str, ...] = (),
    on_removed: Callable[[str], None] = lambda _reason: None,
    events: InstanceEvents | None = None,
) -> ImageCache:
    return ImageCache(
        base.ports(engine),
        base.store,
        base.blocking,
        busy=lambda: busy,
        keep=keep,
        thresholds=thresholds,
        free_bytes=lambda _root: free_bytes,
        on_removed=on_removed,
        events=events,
    )
