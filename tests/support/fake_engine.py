"""A fake Docker engine for unit tests of the instance service: containers in a dict.

Stands in for the blocking `adapters.docker.DockerEngine`; services get it
behind the adapter's async ports (`DockerPorts`), as they get the real one.
The real engine is covered by tests/integration and tests/e2e.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

from qudata_agent.adapters.docker.ports import DockerPorts
from qudata_agent.adapters.store import Store
from qudata_agent.blocking import Blocking
from qudata_agent.config import Settings
from qudata_agent.domain.container_spec import ContainerSpec, ContainerState
from qudata_agent.domain.image_access import LocalImage, RegistryUnreachable
from qudata_agent.domain.instance import Action, Instance, Status
from qudata_agent.domain.log_tail import LogTail
from qudata_agent.domain.order import CreateOrder
from qudata_agent.domain.ssh_init import ImageConfig
from qudata_agent.domain.storage import StoragePolicy
from qudata_agent.domain.topology import Cpu, GpuTopology, HostShape
from qudata_agent.errors import AgentError, Conflict, NotFound
from qudata_agent.services.capacity import Disk
from qudata_agent.services.views import InstanceView
from qudata_agent.wiring import HostReads, Outside, StorageReads, Tuning, instance_side


class PullFailed(AgentError):
    pass


class FakeEngine:
    """Containers in a dict; pulls that block until the test lets them go."""

    def __init__(self) -> None:
        self.images = {"present:1"}
        self.image_env: tuple[str, ...] = ()  # every image's ENV ("NAME=value")
        self.image_volumes: tuple[str, ...] = ()  # and its VOLUME paths
        self.containers: dict[str, ContainerState] = {}
        self.specs: dict[str, ContainerSpec] = {}
        self.pull_gate = threading.Event()
        self.pull_error: str | None = None
        self.pulls = 0
        self._ids = 0

    def image_present(self, ref: str) -> bool:
        return ref in self.images

    def local_image(self, ref: str) -> LocalImage | None:
        return LocalImage(f"id-{ref}") if ref in self.images else None  # built here: not checked

    def registry_digest(self, ref: str, auth: Any) -> str:
        raise RegistryUnreachable("no registry here")

    def image_config(self, ref: str) -> ImageConfig:
        return ImageConfig(env=self.image_env, volumes=self.image_volumes)

    def pull(
        self, ref: str, auth: Any, on_progress: Callable[[Any], None], inactivity_s: float
    ) -> None:
        self.pulls += 1
        self.pull_gate.wait(10)
        if self.pull_error:
            raise PullFailed(self.pull_error)
        self.images.add(ref)

    def create(self, spec: ContainerSpec) -> str:
        if any(c.name == spec.name for c in self.containers.values()):
            raise Conflict("name in use")
        self._ids += 1
        cid = f"c{self._ids}"
        self.specs[cid] = spec
        self.containers[cid] = ContainerState(
            cid, spec.name, spec.instance_id, spec.agent_id, "created", created_ts=time.time()
        )
        return cid

    def _set(self, cid: str, status: str, exit_code: int | None = None) -> None:
        old = self._get(cid)
        started = time.time() if status == "running" else old.started_ts
        self.containers[old.container_id] = replace(
            old,
            status=status,
            exit_code=exit_code,
            started_ts=started,
            started_at=str(started) if started else None,
        )

    def _get(self, ref: str) -> ContainerState:
        for c in self.containers.values():
            if ref in (c.container_id, c.name):
                return c
        raise NotFound(f"no container {ref}")

    def start(self, container_id: str) -> None:
        self._set(container_id, "running")

    def stop(self, container_id: str, timeout_s: int = 10) -> None:
        self._set(container_id, "exited", 143)

    def restart(self, container_id: str, timeout_s: int = 10) -> None:
        self._set(container_id, "running")

    def remove(self, container_id: str) -> bool:
        try:
            c = self._get(container_id)
        except NotFound:
            return False
        del self.containers[c.container_id]
        return True

    def inspect(self, container_id: str) -> ContainerState:
        return self._get(container_id)

    def list_managed(self, agent_id: str) -> list[ContainerState]:
        return [c for c in self.containers.values() if c.agent_id == agent_id]

    def logs(self, container_id: str, tail: int, max_bytes: int, timeout_s: float) -> LogTail:
        return LogTail("log line\n")


class PrepareWith:
    """A test's function in the SSH service's place (`SpecPreparer`)."""

    def __init__(self, prepare: Any, before_start: Any = None) -> None:
        self._prepare = prepare
        self._before_start = before_start
        self.starts: list[tuple[str, str]] = []  # (instance id, how the start's block ended)

    async def prepare(
        self, instance: Instance, spec: ContainerSpec, image: ImageConfig
    ) -> ContainerSpec:
        return spec if self._prepare is None else await self._prepare(instance, spec)  # type: ignore[no-any-return]

    async def before_start(self, instance: Instance) -> None:
        if self._before_start is not None:
            await self._before_start(instance)

    @asynccontextmanager
    async def starting(self, instance: Instance) -> AsyncIterator[None]:
        try:
            yield
        except BaseException as e:
            self.starts.append((instance.id, type(e).__name__))
            raise
        self.starts.append((instance.id, "ok"))


class Stack:
    """The instance side as app.py wires it (`wiring.instance_side`), over a fake engine,
    driven like the single-instance routes drive it (`act`, `delete` and `current` on the
    one instance). Parts whose adapters a test does not give are off, as on a host whose
    settings turn them off."""

    def __init__(
        self,
        engine: FakeEngine,
        store: Store,
        blocking: Blocking,
        *,
        cleanup_retry_s: float = 0.5,
        max_instances: int = 1,
        topology: GpuTopology | None = None,
        gpu_health: Callable[[Instance], Any] | None = None,
        storage: StorageReads | None = None,
        storage_policy: StoragePolicy | None = None,
        free_bytes: Callable[[str], int | None] = lambda path: 500 * 1024**3,
        prepare_spec: Any = None,
    ) -> None:
        gpus = topology or GpuTopology()

        async def read_topology(strict: bool) -> GpuTopology:
            return gpus

        host = HostReads(
            topology=read_topology,
            shape=lambda g: HostShape(
                gpus=g, cpus=tuple(Cpu(i, i) for i in range(8)), memory_bytes=32 * 1024**3
            ),
            disk=lambda: Disk(100 * 1024**3, 50 * 1024**3),
            docker_free_bytes=lambda: None,
            free_bytes=free_bytes,
            port_free=lambda port, proto: True,
            gpu_health=gpu_health,
        )
        outside = Outside(
            engine=DockerPorts(engine, blocking), store=store, blocking=blocking,  # type: ignore[arg-type]
            agent_id="agent-1", host=host,
            storage=storage,
        )  # fmt: skip
        settings = Settings(
            max_instances=max_instances,
            port_range=(30000, 30009),
            **({"storage_policy": storage_policy} if storage_policy else {}),
        )
        self.preparer = PrepareWith(prepare_spec)
        self.side = instance_side(
            outside,
            settings,
            Tuning(cleanup_retry_s=cleanup_retry_s, spec_preparer=self.preparer),
        )
        self.records = self.side.records
        self.builds = self.side.builds
        self.service = self.side.instances
        self.reconciler = self.side.reconciler
        self.storage = self.side.storage

    async def create(self, order: CreateOrder) -> Instance:
        return await self.service.create(order)

    async def current(self) -> Instance | None:
        return await self.service.latest()

    async def _sole(self) -> Instance:
        instance = await self.service.latest()
        assert instance is not None, "there is no instance"
        return instance

    async def act(self, action: Action) -> Instance:
        return await self.service.act((await self._sole()).id, action)

    async def delete(self) -> Instance | None:
        instance = await self.service.latest()
        return None if instance is None else await self.service.delete(instance.id)

    async def describe(self, instance: Instance | None = None) -> InstanceView:
        return await self.service.describe(instance or await self.service.latest())

    async def sync(self) -> None:
        await self.reconciler.sync()

    async def restore(self) -> None:
        await self.reconciler.restore()

    async def close(self) -> None:
        await self.side.close()


def make_service(engine: FakeEngine, store: Store, blocking: Blocking, **options: Any) -> Stack:
    return Stack(engine, store, blocking, **options)


async def wait_for(service: Stack, *statuses: Status) -> Any:
    for _ in range(500):
        instance = await service.current()
        if instance is not None and instance.status in statuses:
            return instance
        await asyncio.sleep(0.01)
    raise AssertionError(f"never reached {statuses}: {await service.current()}")
