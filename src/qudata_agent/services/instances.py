"""The instance service: the renters' instances on this host, and every use case on them.

Owns admission (an order checked against what the host has free, then placed:
GPUs, cpuset, limits, ports), the record made in the same transaction that
takes its ports and GPUs, lifecycle actions, deletion, and the collection
(`get`, `all`, `latest`) the API's routes choose from. The build runs in
`services.builds`, the convergence with Docker in `services.reconciler`, the
read view in `services.views`; statuses move through `services.records`.

What stays true:
- one create at a time decides (the create lock): concurrent orders never
  over-commit a GPU, a CPU, memory, disk, a port or the instance limit; with
  `max_instances` 1 a second create while any instance exists is refused,
  as the single-instance contract says;
- an order that does not fit is refused (409, naming what is short) before
  anything is recorded or created, and so is every order while the tenant
  firewall cannot be verified (503);
- the intent (`wanted`) is written before the Docker call and the outcome
  after it, under the instance's lock: two actions on one instance never
  interleave; while it is being built actions get 409 and only delete cuts in;
- one instance's action or delete never touches another's container, ports
  or GPUs.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

from qudata_agent.blocking import Blocking
from qudata_agent.domain.container_spec import Mount
from qudata_agent.domain.gpus import Resources, parse_resources
from qudata_agent.domain.image_ref import ImageRef, resolve_image
from qudata_agent.domain.instance import Action, IllegalTransition, Instance, Status, Wanted
from qudata_agent.domain.isolation import Offer, Tier
from qudata_agent.domain.netpolicy import parse_mbps
from qudata_agent.domain.order import (
    NO_DEFAULTS,
    CreateOrder,
    HostDefaults,
    build_spec,
    dropped_env,
)
from qudata_agent.domain.placement import Free, Holding, Placement, Request, free, place
from qudata_agent.domain.ports import PortAllocator, parse_port_requests
from qudata_agent.domain.volumes import parse_mounts
from qudata_agent.errors import Conflict, InvalidRequest, NotFound
from qudata_agent.services.builds import BuildPipeline, remove_container
from qudata_agent.services.capacity import Disk, HostCapacity
from qudata_agent.services.engine import Containers
from qudata_agent.services.records import Records
from qudata_agent.services.views import InstanceView, InstanceViews

log = logging.getLogger(__name__)
GIB = 1024**3


class Volumes(Protocol):
    """The volume service (`services.volumes.VolumeService`): an order's volumes bound."""

    async def bind(self, mounts: Mapping[str, str]) -> tuple[Mount, ...]: ...

    async def totals(self) -> Any: ...


class IsolationCheck(Protocol):
    """The isolation service (`services.isolation.Isolation`): the tiers the host offers."""

    async def check(self, tier: Tier, gpu_count: int) -> None: ...

    async def offer(self) -> Offer: ...

    def current(self) -> Offer | None: ...


class ImageAdmission(Protocol):
    """The image service's part of admission (`services.images.ImageService.admit`)."""

    async def admit(self, ref: ImageRef) -> None: ...


class Storage(Protocol):
    """The storage guard (`services.storage.StorageGuard`): what a create's storage_gb gets."""

    def admit(self, instance_id: str, storage_gb: float, asked: bool = True) -> int | None: ...


class Wall(Protocol):
    """The network guard (`services.network.NetworkGuard`): raises 503 while the wall is not up."""

    async def verify(self) -> None: ...


@dataclass(frozen=True)
class HostView:
    """`GET /v1/host`: what the host has and what is free."""

    max_instances: int
    instances: int
    gpus: tuple[str, ...]
    free: Free
    cpu_cores: float
    memory_bytes: int
    disk: Disk
    port_range: tuple[int, int]
    ports_free: int
    volumes: Any = None  # services.volumes.VolumeTotals; None: no volumes on this agent
    isolation: tuple[str, ...] = (Tier.CONTAINER.value,)  # the tiers offered


def holding_of(instance: Instance) -> Holding | None:
    """What an instance holds; a failed build holds nothing (its resources are freed)."""
    if instance.status is Status.ERROR and instance.container_id is None:
        return None
    return Holding.of_spec(instance.require_spec())


class InstanceService:
    def __init__(
        self,
        *,
        records: Records,
        builds: BuildPipeline,
        views: InstanceViews,
        engine: Containers,
        blocking: Blocking,
        ports: PortAllocator,
        capacity: HostCapacity,
        agent_id: str,
        storage: Storage | None = None,  # None: storage_gb is accepted and ignored
        volumes: Volumes | None = None,  # None: an order with volumes is refused
        images: ImageAdmission | None = None,  # None: every registry host (tests only)
        host: HostDefaults = NO_DEFAULTS,
        stop_timeout_s: int = 10,
        wall: Wall | None = None,  # None: no firewall to verify (tests, QUDATA_FIREWALL=off)
        isolation: IsolationCheck | None = None,  # None: only the container tier
        # The SSH gate around a start or restart (`SshService.starting`).
        starting: Callable[[Instance], AbstractAsyncContextManager[None]] | None = None,
    ) -> None:
        self._wall = wall
        self._records = records
        self._builds = builds
        self._views = views
        self._engine = engine
        self._blocking = blocking
        self._ports = ports
        self._capacity = capacity
        self._agent_id = agent_id
        self._storage = storage
        self._volumes = volumes
        self._images = images
        self._host = host
        self._stop_timeout_s = stop_timeout_s
        self._isolation = isolation
        self._starting = starting
        self._create_lock = asyncio.Lock()

    # -- the collection -------------------------------------------------------

    async def all(self) -> list[Instance]:
        """Every instance, oldest first."""
        return await self._records.all()

    async def get(self, instance_id: str) -> Instance:
        found = await self._records.get(instance_id)
        if found is None:
            raise NotFound(f"no instance {instance_id}")
        return found

    async def latest(self) -> Instance | None:
        """The most recently created instance (what the single-instance GET shows)."""
        instances = await self._records.all()
        return max(instances, key=lambda i: i.created_at) if instances else None

    async def describe(
        self, instance: Instance | None, logs: bool = False, tail: int = 100
    ) -> InstanceView:
        return await self._views.describe(instance, logs=logs, tail=tail)

    async def describe_all(self) -> list[InstanceView]:
        """Every instance's view, oldest first (GET /v1/instances)."""
        return await self._views.describe_all(await self._records.all())

    # -- create -----------------------------------------------------------------

    async def create(self, order: CreateOrder) -> Instance:
        ref = resolve_image(order.image, order.image_tag)
        resources = parse_resources(order.env)
        parse_mbps(order.env)  # a malformed QUDATA_NET_MBPS is refused here (400)
        requests = parse_port_requests(order.ports, order.ssh_enabled)
        mounts = parse_mounts(order.volumes)
        if mounts and self._volumes is None:
            raise InvalidRequest("field 'volumes': this agent has no volumes")
        asked = time.monotonic()
        if self._wall is not None:
            await self._wall.verify()  # fail closed: nothing is recorded without the wall
        await self._check_isolation(order.isolation, resources.gpu_count)
        if self._images is not None:
            await self._images.admit(ref)  # a registry host dockerd must not call: 400
        # Read before the lock: a slow GPU driver never holds up another create.
        capacity, _disk = await self._capacity.read(need_gpus=resources.gpu_count > 0)
        async with self._create_lock:
            existing = await self._records.all()
            if self._capacity.max_instances == 1 and existing:
                raise Conflict(
                    f"an instance already exists ({existing[0].id}, {existing[0].status});"
                    " delete it first"
                )
            holdings = [h for h in map(holding_of, existing) if h is not None]
            storage_bytes = None if order.storage_gb is None else int(order.storage_gb * GIB)
            placement = place(capacity, holdings, Request.of(resources, storage_bytes))
            binds = () if self._volumes is None else await self._volumes.bind(mounts)
            instance = await self._blocking.quick(
                self._record, order, ref, placement, requests, binds, tuple(mounts)
            )
        log.info(
            "instance accepted",
            extra={
                "instance_id": instance.id,
                "image": instance.image,
                "ports": instance.ports,
                "gpus": instance.gpus,
                "cpuset": placement.cpuset_cpus,
            },
        )
        for name in dropped_env(order):
            log.warning(
                "the order's NVIDIA_ variable is the agent's to set; it was dropped",
                extra={"instance_id": instance.id, "variable": name},
            )
        self._builds.start(instance, order.credentials, wall_asked=asked)
        self._records.changed()
        return instance

    async def _check_isolation(self, tier: Tier, gpu_count: int) -> None:
        """409 naming why, when the host does not offer the tier (or its GPUs)."""
        if self._isolation is not None:
            await self._isolation.check(tier, gpu_count)
        elif tier is not Tier.CONTAINER:
            raise Conflict(f"isolation {tier.value!r} is not offered by this host")

    def _record(
        self,
        order: CreateOrder,
        ref: ImageRef,
        placement: Placement,
        requests: dict[str, int | None],
        binds: tuple[Mount, ...] = (),
        volume_ids: tuple[str, ...] = (),
    ) -> Instance:
        """Takes ports and records the instance (in a thread, under the create lock)."""
        ports = self._ports.allocate(requests, self._records.store.allocated_ports())
        instance_id = str(uuid.uuid4())
        storage = None
        if placement.storage_bytes is not None and self._storage is not None:
            # An order without storage_gb gets the host's default (placement), never refused.
            asked = order.storage_gb is not None
            gb = placement.storage_bytes / GIB if order.storage_gb is None else order.storage_gb
            storage = self._storage.admit(instance_id, gb, asked)  # may refuse: 409
        spec = build_spec(
            order,
            instance_id=instance_id,
            agent_id=self._agent_id,
            image=str(ref),
            resources=Resources(placement.cpu_cores, placement.memory_bytes, len(placement.gpus)),
            ports=ports,
            gpus=placement.gpus,
            cpuset=placement.cpuset_cpus,
            storage_bytes=storage,
            host=self._host,
            mounts=binds,
        )
        now = self._records.clock()
        instance = Instance(
            id=instance_id,
            status=Status.PENDING,
            wanted=Wanted.RUNNING,
            image=str(ref),
            container_name=spec.name,
            ports=ports,
            gpus=placement.gpus,
            phase="queued",
            ssh_enabled=order.ssh_enabled,
            created_at=now,
            updated_at=now,
            wanted_at=now,
            spec=spec,
        )
        self._records.insert(instance, volume_ids)  # takes the volumes, or refuses (409)
        return instance

    async def host(self) -> HostView:
        capacity, disk = await self._capacity.read()
        records = await self._records.all()
        holdings = [h for h in map(holding_of, records) if h is not None]
        taken = await self._blocking.quick(self._records.store.allocated_ports)
        volumes = None if self._volumes is None else await self._volumes.totals()
        low, high = self._ports.port_range
        # A read never waits for the runtimes' probes: before the first pass ends, none.
        offer = self._isolation.current() if self._isolation else Offer()
        offered = offer.names() if offer is not None else []
        return HostView(
            max_instances=capacity.max_instances,
            instances=len(records),
            gpus=capacity.shape.gpus.uuids,
            free=free(capacity, holdings),
            cpu_cores=capacity.cpu_cores,
            memory_bytes=capacity.memory_bytes,
            disk=disk,
            port_range=(low, high),
            ports_free=(high - low + 1) - sum(low <= p <= high for p in taken),
            volumes=volumes,
            isolation=tuple(offered),
        )

    # -- lifecycle ------------------------------------------------------------

    async def act(self, instance_id: str, action: Action) -> Instance:
        async with self._records.lock(instance_id):
            instance = await self.get(instance_id)
            try:
                instance.check_action(action)
            except IllegalTransition as e:
                raise Conflict(str(e)) from None
            wanted = Wanted.STOPPED if action is Action.STOP else Wanted.RUNNING
            # The intent first (with its time, so the reconcile can tell an action
            # cut short by a crash): a store that cannot take it refuses before
            # Docker is touched.
            instance = await self._records.save(instance.want(wanted, self._records.clock()))
            assert instance.container_id is not None
            guard: AbstractAsyncContextManager[None] = nullcontext()
            if action is not Action.STOP and self._starting is not None:
                guard = self._starting(instance)
            async with guard:
                try:
                    await self._docker_action(action, instance.container_id)
                    state = await self._engine.inspect(instance.container_id)
                except NotFound:
                    await self._records.vanished(instance)
                    raise NotFound(
                        "the instance's container was removed outside the agent"
                    ) from None
                instance = await self._records.save_observed(instance, state)
        log.info(
            "instance action",
            extra={"instance_id": instance.id, "action": action.value, "status": instance.status},
        )
        self._records.changed()
        return instance

    async def _docker_action(self, action: Action, container_id: str) -> None:
        if action is Action.STOP:
            await self._engine.stop(container_id, self._stop_timeout_s)
        elif action is Action.START:
            await self._engine.start(container_id)
        else:
            await self._engine.restart(container_id, self._stop_timeout_s)

    async def delete(self, instance_id: str) -> Instance:
        """Removes the instance's container and record; a delete racing another answers alike."""
        instance = await self.get(instance_id)
        await self._builds.cancel(instance.id)
        async with self._records.lock(instance.id):
            fresh = await self._records.get(instance.id)
            if fresh is None:
                return instance  # a delete that ran meanwhile did it: the same answer
            await remove_container(self._engine, fresh)
            await self._records.delete(fresh.id)
        self._records.forget_lock(instance.id)
        log.info("instance deleted", extra={"instance_id": instance.id})
        self._records.removed(instance)
        return instance

    async def close(self) -> None:
        await self._builds.close()
