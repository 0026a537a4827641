"""The instance service: every use case of the renter's container, and its status path.

Owns creation (validate, allocate ports and GPUs, record, then build in the
background), lifecycle actions, deletion, and convergence with what Docker
reports (restore at start, events, the periodic sync).

What stays true:
- every status change goes through `_save`, which the transition table guards;
  the intent (a new record, `wanted`) is written before the Docker call and the
  outcome after it, so a crash in between is found and finished on restart;
- ports and GPUs are allocated in the same transaction that records the
  instance and freed in the same one that removes it (or when a build fails);
- one lock per instance: two lifecycle actions never interleave; while an
  instance is being built, actions get 409 and only delete may cut in;
- a build is an asyncio task owned here, cancelled and awaited on close.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from qudata_agent.blocking import Blocking
from qudata_agent.domain.container_spec import ContainerSpec, ContainerState
from qudata_agent.domain.gpus import Resources, choose_gpus, parse_resources
from qudata_agent.domain.image_ref import ImageRef, resolve_image
from qudata_agent.domain.instance import (
    Action,
    IllegalTransition,
    Instance,
    Status,
    Wanted,
    observe,
)
from qudata_agent.domain.order import CreateOrder, build_spec
from qudata_agent.domain.ports import PortAllocator, parse_port_requests
from qudata_agent.errors import AgentError, Conflict, NotFound
from qudata_agent.services.pulls import PullCoordinator

log = logging.getLogger(__name__)

LAST_LOG_LINES = 20
# Registry credentials live only in memory for the pull (the contract: never
# stored in clear), so a pull resumed after an agent restart goes without them.
RESUMED_PULL_HINT = (
    " (the agent restarted during this pull and does not keep registry credentials:"
    " for a private image, delete the instance and create it again)"
)


class Engine(Protocol):
    def create(self, spec: ContainerSpec) -> str: ...

    def start(self, container_id: str) -> None: ...

    def stop(self, container_id: str, timeout_s: int = 10) -> None: ...

    def restart(self, container_id: str, timeout_s: int = 10) -> None: ...

    def remove(self, container_id: str) -> bool: ...

    def inspect(self, container_id: str) -> ContainerState: ...

    def list_managed(self, agent_id: str) -> list[ContainerState]: ...

    def logs(self, container_id: str, tail: int) -> str: ...


class Storage(Protocol):
    """The storage guard (`services.storage.StorageGuard`): what a create's storage_gb gets."""

    def admit(self, instance_id: str, storage_gb: float) -> int | None: ...

    async def view(self, instance: Instance) -> Any: ...


class InstanceStore(Protocol):
    def insert_instance(self, instance: Instance) -> None: ...

    def update_instance(self, instance: Instance) -> None: ...

    def release_resources(self, instance_id: str) -> None: ...

    def delete_instance(self, instance_id: str) -> None: ...

    def get_instance(self, instance_id: str) -> Instance | None: ...

    def list_instances(self) -> list[Instance]: ...

    def allocated_ports(self) -> frozenset[int]: ...

    def allocated_gpus(self) -> frozenset[str]: ...


@dataclass(frozen=True)
class InstanceView:
    """What GET /instances shows: the record plus live extras."""

    instance: Instance | None
    pull: Any | None = None  # the engine's pull progress while pulling
    logs: str | None = None
    last_logs: str | None = None  # after the container exited on its own
    ssh: Any | None = None  # the SSH service's view (status, port, reason)
    gpu_health: tuple[Any, ...] = ()  # health problems of its GPUs (domain.gpu_health.GpuEvent)
    storage: Any | None = None  # what storage_gb gets (domain.storage.StorageUsage)


class _BuildCancelled(Exception):
    pass


@dataclass
class _Build:
    task: asyncio.Task[None]
    cancel: asyncio.Event


class InstanceService:
    def __init__(
        self,
        *,
        engine: Engine,
        store: InstanceStore,
        blocking: Blocking,
        pulls: PullCoordinator,
        ports: PortAllocator,
        gpu_uuids: Callable[[], Awaitable[tuple[str, ...]]],
        agent_id: str,
        storage: Storage | None = None,  # None: storage_gb is accepted and ignored
        network: str | None = None,
        prepare_network: Callable[[], Awaitable[None]] | None = None,
        # The container's final spec for an instance (the SSH service: its init and mounts).
        prepare_spec: Callable[[Instance, ContainerSpec], Awaitable[ContainerSpec]] | None = None,
        stop_timeout_s: int = 10,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._engine = engine
        self._store = store
        self._blocking = blocking
        self._pulls = pulls
        self._ports = ports
        self._gpu_uuids = gpu_uuids
        self._agent_id = agent_id
        self._storage = storage
        self._network = network
        self._prepare_network = prepare_network
        self._prepare_spec = prepare_spec
        self._stop_timeout_s = stop_timeout_s
        self._clock = clock
        self._create_lock = asyncio.Lock()
        self._locks: dict[str, asyncio.Lock] = {}
        self._builds: dict[str, _Build] = {}
        self._listeners: list[Callable[[], None]] = []
        self._run_listeners: list[Callable[[Instance], None]] = []
        self._ssh_view: Callable[[Instance], Awaitable[Any]] | None = None
        self._gpu_health: Callable[[Instance], Sequence[Any]] | None = None

    def show_ssh_with(self, view: Callable[[Instance], Awaitable[Any]]) -> None:
        """Where `describe` gets the SSH part of the answer."""
        self._ssh_view = view

    def show_gpu_health_with(self, health: Callable[[Instance], Sequence[Any]]) -> None:
        """Where `describe` gets the health problems of the instance's GPUs."""
        self._gpu_health = health

    def on_change(self, listener: Callable[[], None]) -> None:
        """`listener` is called after every lifecycle change (e.g. to send stats now)."""
        self._listeners.append(listener)

    def on_new_run(self, listener: Callable[[Instance], None]) -> None:
        """`listener` is called each time the container starts a new run (SSH comes back)."""
        self._run_listeners.append(listener)

    async def _save_observed(self, before: Instance, state: ContainerState) -> Instance:
        after = await self._save(observe(before, state, self._clock()))
        if after.new_run_of(before):
            for listener in self._run_listeners:
                listener(after)
        return after

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()

    def _lock(self, instance_id: str) -> asyncio.Lock:
        return self._locks.setdefault(instance_id, asyncio.Lock())

    async def _save(self, instance: Instance) -> Instance:
        await self._blocking.quick(self._store.update_instance, instance)
        return instance

    async def current(self) -> Instance | None:
        instances = await self._blocking.quick(self._store.list_instances)
        return instances[0] if instances else None

    # -- create ---------------------------------------------------------------

    async def create(self, order: CreateOrder) -> Instance:
        ref = resolve_image(order.image, order.image_tag)
        resources = parse_resources(order.env)
        requests = parse_port_requests(order.ports, order.ssh_enabled)
        async with self._create_lock:
            existing = await self.current()
            if existing is not None:
                raise Conflict(
                    f"an instance already exists ({existing.id}, {existing.status});"
                    " delete it first"
                )
            all_gpus = await self._gpu_uuids() if resources.gpu_count else ()
            instance = await self._blocking.quick(
                self._place, order, ref, resources, requests, all_gpus
            )
        log.info(
            "instance accepted",
            extra={"instance_id": instance.id, "image": instance.image, "ports": instance.ports},
        )
        self._start_build(instance, order)
        self._changed()
        return instance

    def _place(
        self,
        order: CreateOrder,
        ref: ImageRef,
        resources: Resources,
        requests: dict[str, int | None],
        all_gpus: tuple[str, ...],
    ) -> Instance:
        """Allocates and records the instance (runs in a thread, under the create lock)."""
        ports = self._ports.allocate(requests, self._store.allocated_ports())
        gpus = choose_gpus(resources.gpu_count, all_gpus, self._store.allocated_gpus())
        instance_id = str(uuid.uuid4())
        storage = None
        if order.storage_gb is not None and self._storage is not None:
            storage = self._storage.admit(instance_id, order.storage_gb)  # may refuse: 409
        spec = build_spec(
            order,
            instance_id=instance_id,
            agent_id=self._agent_id,
            image=str(ref),
            resources=resources,
            ports=ports,
            gpus=gpus,
            storage_bytes=storage,
            network=self._network,
        )
        now = self._clock()
        instance = Instance(
            id=instance_id,
            status=Status.PENDING,
            wanted=Wanted.RUNNING,
            image=str(ref),
            container_name=spec.name,
            ports=ports,
            gpus=gpus,
            phase="queued",
            ssh_enabled=order.ssh_enabled,
            created_at=now,
            updated_at=now,
            spec_json=spec.to_json(),
        )
        self._store.insert_instance(instance)
        return instance

    def _start_build(self, instance: Instance, order: CreateOrder | None) -> None:
        """Builds in the background; without `order`, a build resumed after a restart."""
        auth = order.credentials if order is not None else None
        cancel = asyncio.Event()
        build = self._build(instance, auth, cancel, resumed=order is None)
        task = asyncio.create_task(build, name=f"build {instance.id}")
        self._builds[instance.id] = _Build(task, cancel)
        task.add_done_callback(lambda _t: self._builds.pop(instance.id, None))

    async def _checkpoint(self, cancel: asyncio.Event) -> None:
        if cancel.is_set():
            raise _BuildCancelled

    async def _pull_unless_cancelled(self, ref: str, auth: Any, cancel: asyncio.Event) -> None:
        pull = asyncio.ensure_future(self._pulls.ensure(ref, auth))
        stop = asyncio.ensure_future(cancel.wait())
        try:
            await asyncio.wait({pull, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not pull.done():
                pull.cancel()  # the shared pull itself goes on (shielded)
        await self._checkpoint(cancel)
        pull.result()

    async def _build(
        self, instance: Instance, auth: Any, cancel: asyncio.Event, resumed: bool = False
    ) -> None:
        spec = ContainerSpec.from_json(instance.spec_json)
        now = self._clock
        try:
            if not await self._pulls.present(spec.image):
                instance = await self._save(
                    instance.move(Status.PENDING, now=now(), phase="pulling")
                )
                self._changed()
                await self._pull_unless_cancelled(spec.image, auth, cancel)
            await self._checkpoint(cancel)
            instance = await self._save(instance.move(Status.PENDING, now=now(), phase="creating"))
            if self._prepare_network is not None:
                await self._prepare_network()
            if self._prepare_spec is not None:
                spec = await self._prepare_spec(instance, spec)
            container_id = await self._create_or_adopt(spec)
            instance = await self._save(
                instance.move(
                    Status.PENDING, now=now(), phase="starting", container_id=container_id
                )
            )
            await self._checkpoint(cancel)
            await self._blocking.quick(self._engine.start, container_id)
            state = await self._blocking.quick(self._engine.inspect, container_id)
            async with self._lock(instance.id):
                instance = await self._save_observed(instance, state)
            log.info("instance up", extra={"instance_id": instance.id, "status": instance.status})
        except _BuildCancelled:
            log.info("instance build cancelled", extra={"instance_id": instance.id})
            return
        except AgentError as e:
            if cancel.is_set():
                return
            reason = e.message
            if resumed and instance.phase == "pulling":
                reason += RESUMED_PULL_HINT
            await self._fail(instance, reason)
        except Exception:
            if cancel.is_set():
                return
            log.exception("instance build failed", extra={"instance_id": instance.id})
            await self._fail(instance, "internal error while creating the instance")
        self._changed()

    async def _create_or_adopt(self, spec: ContainerSpec) -> str:
        """Creates the container, or adopts the one a crashed build already made."""
        try:
            return await self._blocking.quick(self._engine.create, spec)
        except Conflict:
            state = await self._blocking.quick(self._engine.inspect, spec.name)
            if state.instance_id != spec.instance_id or state.agent_id != spec.agent_id:
                raise
            log.info(
                "adopted the container of an interrupted build", extra={"container": spec.name}
            )
            return state.container_id

    async def _fail(self, instance: Instance, reason: str) -> None:
        """A build failed: remove what was made, free everything, keep the reason."""
        log.warning("instance build failed", extra={"instance_id": instance.id, "reason": reason})
        await self._remove_container(instance)
        await self._blocking.quick(self._store.release_resources, instance.id)
        failed = instance.move(Status.ERROR, now=self._clock(), reason=reason, container_id=None)
        await self._save(replace(failed, ports={}, gpus=()))

    async def _remove_container(self, instance: Instance) -> None:
        for ref in dict.fromkeys(r for r in (instance.container_id, instance.container_name) if r):
            await self._blocking.slow(self._engine.remove, ref)

    # -- read -----------------------------------------------------------------

    async def describe(
        self, logs: bool = False, tail: int = 100, instance: Instance | None = None
    ) -> InstanceView:
        """The current instance, or `instance` as an action left it, for an answer."""
        if instance is None:
            instance = await self.current()
        if instance is None:
            return InstanceView(None)
        pull = self._pulls.progress(instance.image) if instance.phase == "pulling" else None
        text = last = None
        if instance.container_id and (logs or self._exited_on_its_own(instance)):
            try:
                if logs:
                    text = await self._blocking.quick(
                        self._engine.logs, instance.container_id, tail
                    )
                if self._exited_on_its_own(instance):
                    last = await self._blocking.quick(
                        self._engine.logs, instance.container_id, LAST_LOG_LINES
                    )
            except NotFound:
                pass  # removed a moment ago; the event will say so
        ssh = await self._ssh_view(instance) if self._ssh_view is not None else None
        health = tuple(self._gpu_health(instance)) if self._gpu_health is not None else ()
        storage = await self._storage.view(instance) if self._storage is not None else None
        return InstanceView(
            instance,
            pull=pull,
            logs=text,
            last_logs=last,
            ssh=ssh,
            gpu_health=health,
            storage=storage,
        )

    @staticmethod
    def _exited_on_its_own(instance: Instance) -> bool:
        return instance.status is Status.PAUSED and instance.wanted is Wanted.RUNNING

    # -- lifecycle ------------------------------------------------------------

    async def act(self, action: Action) -> Instance:
        instance = await self.current()
        if instance is None:
            raise NotFound("there is no instance")
        async with self._lock(instance.id):
            instance = await self._reload(instance)
            try:
                instance.check_action(action)
            except IllegalTransition as e:
                raise Conflict(str(e)) from None
            wanted = Wanted.STOPPED if action is Action.STOP else Wanted.RUNNING
            # A real write even when `wanted` is unchanged (SQLite skips identical
            # rows): a store that cannot take it refuses before Docker is touched.
            instance = await self._save(replace(instance, wanted=wanted, updated_at=self._clock()))
            assert instance.container_id is not None
            try:
                await self._docker_action(action, instance.container_id)
                state = await self._blocking.quick(self._engine.inspect, instance.container_id)
            except NotFound:
                await self._vanished(instance)
                raise NotFound("the instance's container was removed outside the agent") from None
            instance = await self._save_observed(instance, state)
        log.info(
            "instance action",
            extra={"instance_id": instance.id, "action": action.value, "status": instance.status},
        )
        self._changed()
        return instance

    async def _docker_action(self, action: Action, container_id: str) -> None:
        if action is Action.STOP:
            await self._blocking.slow(self._engine.stop, container_id, self._stop_timeout_s)
        elif action is Action.START:
            await self._blocking.quick(self._engine.start, container_id)
        else:
            await self._blocking.slow(self._engine.restart, container_id, self._stop_timeout_s)

    async def _reload(self, instance: Instance) -> Instance:
        fresh = await self._blocking.quick(self._store.get_instance, instance.id)
        if fresh is None:
            raise NotFound("there is no instance")
        return fresh

    async def delete(self) -> Instance | None:
        instance = await self.current()
        if instance is None:
            return None
        build = self._builds.get(instance.id)
        if build is not None:
            build.cancel.set()
            await asyncio.wait({build.task})
        async with self._lock(instance.id):
            instance = await self._reload(instance)
            await self._remove_container(instance)
            await self._blocking.quick(self._store.delete_instance, instance.id)
        self._locks.pop(instance.id, None)
        log.info("instance deleted", extra={"instance_id": instance.id})
        self._changed()
        return instance

    # -- convergence with Docker ----------------------------------------------

    async def _vanished(self, instance: Instance) -> None:
        log.warning(
            "instance container removed outside the agent; instance destroyed",
            extra={"instance_id": instance.id},
        )
        await self._blocking.quick(self._store.delete_instance, instance.id)
        self._changed()

    async def refresh(self, instance: Instance) -> None:
        """Brings one (built) instance in line with its container."""
        if instance.id in self._builds or instance.status in (Status.PENDING, Status.ERROR):
            return
        async with self._lock(instance.id):
            instance = await self._reload(instance)
            ref = instance.container_id or instance.container_name
            try:
                state = await self._blocking.quick(self._engine.inspect, ref)
            except NotFound:
                await self._vanished(instance)
                return
            updated = observe(instance, state, self._clock())
            seen = ("status", "reason", "exit_code", "started_at", "container_id")
            if any(getattr(updated, f) != getattr(instance, f) for f in seen):
                updated = await self._save_observed(instance, state)
                log.info(
                    "instance status changed",
                    extra={
                        "instance_id": instance.id,
                        "status": updated.status,
                        "reason": updated.reason,
                    },
                )
                self._changed()

    async def on_container_event(self, container_id: str) -> None:
        for instance in await self._blocking.quick(self._store.list_instances):
            if container_id in (instance.container_id, instance.container_name):
                await self.refresh(instance)

    async def sync(self) -> None:
        """The full pass: orphans removed, every built instance refreshed."""
        instances = await self._blocking.quick(self._store.list_instances)
        known = {i.id for i in instances}
        containers = await self._blocking.quick(self._engine.list_managed, self._agent_id)
        for state in containers:
            if state.instance_id not in known:
                log.warning(
                    "removing a container with no instance record", extra={"container": state.name}
                )
                await self._blocking.slow(self._engine.remove, state.container_id)
        for instance in instances:
            await self.refresh(instance)

    async def restore(self) -> None:
        """At start: resume interrupted builds, adopt containers, drop the vanished."""
        for instance in await self._blocking.quick(self._store.list_instances):
            if instance.status is Status.PENDING and instance.id not in self._builds:
                log.info("resuming an interrupted build", extra={"instance_id": instance.id})
                self._start_build(instance, None)
        await self.sync()
        for instance in await self._blocking.quick(self._store.list_instances):
            if instance.status is Status.RUNNING:
                for listener in self._run_listeners:
                    listener(instance)  # the agent was away: make sure SSH is up

    async def close(self) -> None:
        builds = list(self._builds.values())
        for build in builds:
            build.task.cancel()
        if builds:
            await asyncio.wait({b.task for b in builds}, timeout=5)
