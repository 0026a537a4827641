"""SSH into the instance: setting up sshd in the container and keeping the renter's keys.

Owns the SSH state of an instance (disabled, installing, ready, failed) and
its keys. What stays true:
- keys live in the store first; the container's authorized_keys is rewritten
  from the store in one atomic rename, so keys survive restarts and keys given
  while sshd is still being set up are applied once it is ready;
- adding or removing a key never restarts sshd: open sessions stay;
- every new run of the container (start, restart, Docker's own restart, an
  agent restart) brings the agent's sshd back; setup is idempotent;
- a failed setup is reported with its reason and never stops the instance.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Protocol

from qudata_agent.blocking import Blocking
from qudata_agent.domain.container_spec import ContainerState
from qudata_agent.domain.instance import Instance, Status
from qudata_agent.domain.ssh_keys import PublicKey, parse_key, render_authorized_keys
from qudata_agent.domain.ssh_setup import (
    EXIT_INSTALL_FAILED,
    EXIT_KEYS_FAILED,
    EXIT_NO_PACKAGE_MANAGER,
    EXIT_SSHD_FAILED,
    bring_up_script,
    session_env,
    write_keys_script,
)
from qudata_agent.errors import AgentError, Conflict, NotFound

log = logging.getLogger(__name__)

DISABLED, INSTALLING, READY, FAILED = "disabled", "installing", "ready", "failed"
PROVISION_TIMEOUT_S = 900.0  # a package install over a slow mirror
QUICK_TIMEOUT_S = 30.0
# authorized_keys travels inline in one exec argument (the kernel caps one at 128 KiB).
MAX_KEYS_BYTES = 64 * 1024


class SshEngine(Protocol):
    def inspect(self, container_id: str) -> ContainerState: ...

    def exec_run(
        self, container_id: str, argv: list[str], timeout_s: float = 30
    ) -> tuple[int, str]: ...


class SshStore(Protocol):
    def ssh_keys(self, instance_id: str) -> list[PublicKey]: ...

    def add_ssh_key(self, instance_id: str, key: PublicKey) -> bool: ...

    def remove_ssh_key(self, instance_id: str, key: PublicKey) -> bool: ...

    def ssh_state(self, instance_id: str) -> tuple[str, str | None, str | None] | None: ...

    def set_ssh_state(
        self, instance_id: str, status: str, reason: str | None, run: str | None = None
    ) -> None: ...

    def get_instance(self, instance_id: str) -> Instance | None: ...

    def list_instances(self) -> list[Instance]: ...


@dataclass(frozen=True)
class SshView:
    status: str
    port: int | None
    reason: str | None


class _SetupFailed(Exception):
    pass


class SshService:
    def __init__(self, engine: SshEngine, store: SshStore, blocking: Blocking) -> None:
        self._engine = engine
        self._store = store
        self._blocking = blocking
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._again: set[str] = set()

    def _lock(self, instance_id: str) -> asyncio.Lock:
        return self._locks.setdefault(instance_id, asyncio.Lock())

    async def _instance(self, instance_id: str) -> Instance:
        instance = await self._blocking.quick(self._store.get_instance, instance_id)
        if instance is None:
            raise NotFound(f"no instance {instance_id}")
        if not instance.ssh_enabled:
            raise Conflict("SSH is not enabled on this instance (create it with ssh_enabled)")
        return instance

    # -- state ------------------------------------------------------------------

    async def view(self, instance: Instance) -> SshView:
        if not instance.ssh_enabled:
            return SshView(DISABLED, None, None)
        state = await self._blocking.quick(self._store.ssh_state, instance.id)
        status, reason, run = state if state is not None else (INSTALLING, None, None)
        if status == READY and instance.status is Status.RUNNING and run != instance.started_at:
            status = INSTALLING  # set up, but sshd is not yet back in this run
        return SshView(status, instance.ports.get("22"), reason)

    async def _set(
        self, instance_id: str, status: str, reason: str | None = None, run: str | None = None
    ) -> None:
        await self._blocking.quick(self._store.set_ssh_state, instance_id, status, reason, run)

    # -- keys -------------------------------------------------------------------

    async def keys(self, instance_id: str) -> list[str]:
        instance = await self._instance(instance_id)
        keys = await self._blocking.quick(self._store.ssh_keys, instance.id)
        return [key.line() for key in keys]

    async def add_key(self, instance_id: str, text: str) -> bool:
        """Adds a key to this instance only (False: it was there already); applied if sshd is up."""
        key = parse_key(text)
        instance = await self._instance(instance_id)
        async with self._lock(instance.id):
            keys = await self._blocking.quick(self._store.ssh_keys, instance.id)
            if len(render_authorized_keys([*keys, key])) > MAX_KEYS_BYTES:
                raise Conflict(f"the keys of an instance are limited to {MAX_KEYS_BYTES} bytes")
            added = await self._blocking.quick(self._store.add_ssh_key, instance.id, key)
            if added:
                await self._apply_keys_if_ready(instance)
        log.info(
            "ssh key added" if added else "ssh key already present",
            extra={"instance_id": instance.id, "key_type": key.kind},
        )
        return added

    async def remove_key(self, instance_id: str, text: str) -> None:
        key = parse_key(text)
        instance = await self._instance(instance_id)
        async with self._lock(instance.id):
            removed = await self._blocking.quick(self._store.remove_ssh_key, instance.id, key)
            if not removed:
                raise NotFound("that key is not on this instance")
            await self._apply_keys_if_ready(instance)
        log.info("ssh key removed", extra={"instance_id": instance.id, "key_type": key.kind})

    async def _apply_keys_if_ready(self, instance: Instance) -> None:
        state = await self._blocking.quick(self._store.ssh_state, instance.id)
        fresh = await self._blocking.quick(self._store.get_instance, instance.id)
        if state is None or state[0] != READY or fresh is None or not fresh.container_id:
            return  # applied when setup finishes or the container runs again
        if fresh.status is not Status.RUNNING:
            return
        await self._write_keys(fresh.container_id, fresh.id)

    async def _authorized_keys(self, instance_id: str) -> str:
        keys = await self._blocking.quick(self._store.ssh_keys, instance_id)
        return render_authorized_keys(keys)

    async def _write_keys(self, container_id: str, instance_id: str) -> None:
        script = write_keys_script(await self._authorized_keys(instance_id))
        await self._exec(container_id, script, QUICK_TIMEOUT_S, "could not write authorized_keys")

    async def _exec(self, container_id: str, script: str, timeout_s: float, failed: str) -> None:
        code, out = await self._blocking.quick(
            self._engine.exec_run, container_id, ["sh", "-c", script], timeout_s
        )
        if code != 0:
            raise _SetupFailed(f"{failed} (exit {code}): {out.strip()[-300:]}")

    # -- setup ------------------------------------------------------------------

    def on_new_run(self, instance: Instance) -> None:
        """Called on every new run of the container: (re)starts sshd in the background."""
        if not instance.ssh_enabled or not instance.container_id:
            return
        running = self._tasks.get(instance.id)
        if running is not None and not running.done():
            self._again.add(instance.id)  # one more pass once this one ends
            return
        task = asyncio.create_task(self._ensure_loop(instance.id), name=f"ssh {instance.id}")
        self._tasks[instance.id] = task

    async def _ensure_loop(self, instance_id: str) -> None:
        while True:
            self._again.discard(instance_id)
            await self._ensure(instance_id)
            if instance_id not in self._again:
                return

    async def _ensure(self, instance_id: str) -> None:
        instance = await self._blocking.quick(self._store.get_instance, instance_id)
        if instance is None or instance.status is not Status.RUNNING or not instance.container_id:
            return
        cid = instance.container_id
        try:
            state = await self._blocking.quick(self._store.ssh_state, instance_id)
            provision = state is None or state[0] != READY
            if provision:
                await self._set(instance_id, INSTALLING)
            keys = await self._authorized_keys(instance_id)
            # The container's environment, for SSH sessions; written with the setup.
            env = await self._session_env(cid) if provision else []
            # One exec: set up (maybe minutes of install), keys, sshd. Not under
            # the lock, so key changes never wait on an install; the check below
            # catches a key that changed meanwhile.
            await self._bring_up(cid, bring_up_script(keys, provision, env), provision)
            async with self._lock(instance_id):
                await self._set(instance_id, READY, run=instance.started_at)
                if await self._authorized_keys(instance_id) != keys:
                    await self._write_keys(cid, instance_id)
            log.info("ssh ready", extra={"instance_id": instance_id})
        except (_SetupFailed, AgentError) as e:
            reason = e.message if isinstance(e, AgentError) else str(e)
            log.warning("ssh setup failed", extra={"instance_id": instance_id, "reason": reason})
            try:
                await self._set(instance_id, FAILED, reason)
            except AgentError as stored:  # e.g. a full disk: the next run tries again
                log.warning("ssh state not recorded", extra={"error": stored.message})

    async def _session_env(self, container_id: str) -> list[tuple[str, str]]:
        state = await self._blocking.quick(self._engine.inspect, container_id)
        return session_env(state.env)

    async def _bring_up(self, container_id: str, script: str, provision: bool) -> None:
        run = self._blocking.slow if provision else self._blocking.quick
        timeout = PROVISION_TIMEOUT_S if provision else QUICK_TIMEOUT_S
        code, out = await run(self._engine.exec_run, container_id, ["sh", "-c", script], timeout)
        if code == 0:
            return
        if code == EXIT_NO_PACKAGE_MANAGER:
            raise _SetupFailed(
                "the image has no sshd and no package manager to install OpenSSH with"
            )
        tail = " ".join(out.strip().splitlines()[-3:])[-300:]
        if code == EXIT_INSTALL_FAILED:
            raise _SetupFailed(
                "installing OpenSSH with the image's package manager failed (can the container"
                f" reach its package mirror?): {tail}"
            )
        if code == EXIT_KEYS_FAILED:
            raise _SetupFailed(f"writing authorized_keys failed (is the disk full?): {tail}")
        if code == EXIT_SSHD_FAILED and "Address already in use" in out:
            raise _SetupFailed(
                "sshd could not listen: port 22 in the container is taken by another program"
                " (does the image start its own sshd?)"
            )
        if code == EXIT_SSHD_FAILED:
            raise _SetupFailed(f"sshd did not start: {tail}")
        raise _SetupFailed(f"bringing up sshd failed (exit {code}): {tail}")

    async def close(self) -> None:
        tasks = [t for t in self._tasks.values() if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
