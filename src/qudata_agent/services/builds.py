"""The build pipeline: an accepted instance's image pulled, its container made and started.

Owns the background build of each instance (one asyncio task per instance,
cancelled and awaited on close) and what happens when one fails.

What stays true:
- a build moves its instance only forward through `pending` (pulling,
  creating, starting) and ends it `running`/`paused`, or `error` with the
  first reason; a build cancelled by a delete leaves the record to the delete;
- the container is made under its deterministic name, so a build resumed
  after a crash adopts the container it had already made instead of making
  a second one;
- a failure is handled even when Docker or the disk is down too: the
  container removal is retried a few times (then left to the reconcile, which
  removes the leftover of a failed build), and the record of the failure,
  which frees the ports and GPUs in the same transaction, is retried until
  the store takes it; an instance never stays `pending` holding resources;
- registry credentials live in the build's memory only;
- the container is made with every `NVIDIA_*` variable of its image set
  empty unless the agent set it (`neutral_hook_env`): the NVIDIA toolkit's
  hook sees the agent's GPU decisions only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from typing import Any, Protocol

from qudata_agent.background import both
from qudata_agent.domain.container_spec import ContainerSpec, neutral_hook_env
from qudata_agent.domain.instance import Instance, Status
from qudata_agent.domain.registry_credentials import RegistryCredentials
from qudata_agent.domain.ssh_init import ImageConfig
from qudata_agent.errors import AgentError, Conflict
from qudata_agent.retry import until_done
from qudata_agent.services.engine import Containers, Engine
from qudata_agent.services.images import ImageService
from qudata_agent.services.records import Records

log = logging.getLogger(__name__)

# Registry credentials live only in memory for the pull (the contract: never
# stored in clear), so a pull resumed after an agent restart goes without them.
RESUMED_PULL_HINT = (
    " (the agent restarted during this pull and does not keep registry credentials:"
    " for a private image, delete the instance and create it again)"
)


class InstanceNetwork(Protocol):
    """The instances' network and its wall (`services.network.NetworkGuard`)."""

    async def prepare(self, asked: float | None = None) -> None:
        """In place, and the wall verified by a check begun at or after `asked`."""
        ...


class SpecPreparer(Protocol):
    """Who has the last word on the spec before the create (`services.ssh.SshService`:
    the agent's init, the SSH bundle and the instance's SSH files), and readies the
    host for each start (the SSH port gate): the build's first while Docker creates,
    and every later start or restart around Docker's call (`InstanceService.act`)."""

    async def prepare(
        self, instance: Instance, spec: ContainerSpec, image: ImageConfig
    ) -> ContainerSpec: ...

    async def before_start(self, instance: Instance) -> None: ...

    def starting(self, instance: Instance) -> AbstractAsyncContextManager[None]: ...


class _BuildCancelled(Exception):
    pass


@dataclass
class _Build:
    task: asyncio.Task[None]
    cancel: asyncio.Event


class BuildPipeline:
    def __init__(
        self,
        *,
        records: Records,
        engine: Engine,  # its containers and image configs
        images: ImageService,
        network: InstanceNetwork | None = None,  # None: Docker's default bridge, no wall
        spec_preparer: SpecPreparer | None = None,  # None: no SSH on this host
        cleanup_retry_s: float = 0.5,
    ) -> None:
        self._records = records
        self._engine = engine
        self._images = images
        self._network = network
        self._spec_preparer = spec_preparer
        self._cleanup_retry_s = cleanup_retry_s
        self._builds: dict[str, _Build] = {}

    def building(self) -> frozenset[str]:
        """The instances whose build is in flight."""
        return frozenset(self._builds)

    def start(
        self,
        instance: Instance,
        credentials: RegistryCredentials | None,
        resumed: bool = False,
        wall_asked: float | None = None,
    ) -> None:
        """Builds in the background; `resumed`: a build cut short by a restart of the agent;
        `wall_asked`: when the create asked for the wall check that admitted it."""
        cancel = asyncio.Event()
        task = asyncio.create_task(
            self._build(instance, credentials, cancel, resumed, wall_asked),
            name=f"build {instance.id}",
        )
        self._builds[instance.id] = _Build(task, cancel)
        task.add_done_callback(lambda _t: self._builds.pop(instance.id, None))

    async def cancel(self, instance_id: str) -> None:
        """Stops the instance's build (if any) at its next step and waits for it to end."""
        build = self._builds.get(instance_id)
        if build is not None:
            build.cancel.set()
            await asyncio.wait({build.task})

    async def close(self) -> None:
        builds = list(self._builds.values())
        for build in builds:
            build.task.cancel()
        if builds:
            await asyncio.wait({b.task for b in builds}, timeout=5)

    # -- the pipeline -----------------------------------------------------------

    @staticmethod
    def _checkpoint(cancel: asyncio.Event) -> None:
        if cancel.is_set():
            raise _BuildCancelled

    async def _unless_cancelled(self, work: Awaitable[Any], cancel: asyncio.Event) -> None:
        pull = asyncio.ensure_future(work)
        stop = asyncio.ensure_future(cancel.wait())
        try:
            await asyncio.wait({pull, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not pull.done():
                pull.cancel()  # the shared pull itself goes on (shielded)
        self._checkpoint(cancel)
        pull.result()

    async def _step(self, instance: Instance, phase: str, **changes: object) -> Instance:
        now = self._records.clock()
        return await self._records.save(
            instance.move(Status.PENDING, now=now, phase=phase, **changes)
        )

    async def _build(
        self,
        instance: Instance,
        auth: RegistryCredentials | None,
        cancel: asyncio.Event,
        resumed: bool,
        wall_asked: float | None = None,
    ) -> None:
        spec = instance.require_spec()
        done = _StepClock(instance.id)
        try:

            async def pulling() -> None:  # the image service pulls: the answer shows it
                nonlocal instance
                instance = await self._step(instance, "pulling")
                self._records.changed()

            image = self._images.ensure(spec.image, auth, instance.id, pulling)
            await self._unless_cancelled(image, cancel)
            done("image")
            self._checkpoint(cancel)
            # Each step's record is written while Docker works (an answer shows the
            # phase; a crash resumes from the record and adopts the container by name).
            instance, image_config = await both(
                self._step(instance, "creating"), self._engine.image_config(spec.image)
            )
            spec = replace(spec, env=neutral_hook_env(image_config.env, spec.env))
            done("record 'creating' + image config")
            if self._network is not None:
                await self._network.prepare(wall_asked)
                done("network check")
            if self._spec_preparer is not None:
                spec = await self._spec_preparer.prepare(instance, spec, image_config)
                done("SSH files")
                container_id, _ = await both(  # the gate is shut before the start publishes
                    self._create_or_adopt(spec), self._spec_preparer.before_start(instance)
                )
            else:
                container_id = await self._create_or_adopt(spec)
            done("docker create + SSH port gate")
            self._checkpoint(cancel)
            instance, _ = await both(
                self._step(instance, "starting", container_id=container_id),
                self._engine.start(container_id),
            )
            done("docker start + record 'starting'")
            state = await self._engine.inspect(container_id)
            async with self._records.lock(instance.id):
                instance = await self._records.save_observed(instance, state)
            done("inspect + record 'running'")
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
        self._records.changed()

    async def _create_or_adopt(self, spec: ContainerSpec) -> str:
        """Creates the container, or adopts the one a crashed build already made."""
        try:
            return await self._engine.create(spec)
        except Conflict:
            state = await self._engine.inspect(spec.name)
            if state.instance_id != spec.instance_id or state.agent_id != spec.agent_id:
                raise
            log.info(
                "adopted the container of an interrupted build", extra={"container": spec.name}
            )
            return state.container_id

    # -- failure ------------------------------------------------------------------

    async def _fail(self, instance: Instance, reason: str) -> None:
        """A build failed: free everything and keep the reason, whatever else is down."""
        log.warning("instance build failed", extra={"instance_id": instance.id, "reason": reason})
        now = self._records.clock()
        failed = instance.move(Status.ERROR, now=now, reason=reason, container_id=None)
        failed = replace(failed, ports={}, gpus=())
        base, cap = self._cleanup_retry_s, max(self._cleanup_retry_s, 10.0)
        await until_done(
            lambda: remove_container(self._engine, instance),
            "remove a failed build",
            base_s=base,
            cap_s=cap,
            attempts=3,
        )
        await until_done(
            lambda: self._records.fail(failed),
            "record a failed build",
            base_s=base,
            cap_s=cap,
        )


class _StepClock:
    """Logs (DEBUG) how long each step of a build took: bench/instance_create.py prints
    the medians, the agent's own part of a create next to Docker's."""

    def __init__(self, instance_id: str) -> None:
        self._instance_id = instance_id
        self._since = time.perf_counter()

    def __call__(self, step: str) -> None:
        now = time.perf_counter()
        ms = round((now - self._since) * 1000, 1)
        log.debug("build step", extra={"instance_id": self._instance_id, "step": step, "ms": ms})
        self._since = now


async def remove_container(engine: Containers, instance: Instance) -> None:
    """Removes the instance's container, by id and by name (a create may have left only that)."""
    for ref in dict.fromkeys(r for r in (instance.container_id, instance.container_name) if r):
        await engine.remove(ref)
