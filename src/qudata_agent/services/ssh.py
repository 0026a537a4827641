"""SSH into the instance: the agent's own sshd in every SSH-enabled container, and the keys.

Owns the SSH state of an instance (disabled, installing, ready, failed), its
keys and its SSH directory on the host. The build asks `prepare` for the
container's final spec: the agent's init as its entrypoint, the bundle and
the instance's own directory mounted read-only (`domain.ssh_init`). What
stays true:
- keys live in the store first; the instance's authorized_keys on the host is
  rewritten from the store in one rename, at once, whatever state the
  container is in: no exec, no restart of sshd, open sessions stay;
- nothing is installed into the image and the container needs no network:
  sshd starts with the container, before its workload;
- nothing is ever run in the container on the agent's initiative (no exec):
  SSH is `ready` once sshd's banner answers on the published port in this
  run of the container; it is `failed` with the init's reason when the init
  says so (its status file, read from the host, bounded), or when no banner
  comes within `wait_timeout_s`. Every read of what the tenant controls is
  bounded in bytes and time and runs outside the shared pools;
- an image the bundle cannot serve (another architecture) runs without SSH,
  reported `failed` with the reason; a failure never stops the instance;
- an instance's directory goes with the instance (`prune`);
- with a port gate (`domain.port_gate`), the published SSH port refuses new
  connections with a reset from before the container starts until sshd
  answers on the container's own address, so a renter never meets a port
  that accepts and then drops; the gate opens then, or when the agent gives
  up on sshd, and never outlives the run it was closed for, the instance, or
  the agent's own run (its stop opens every gate).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Final, Literal, Protocol, cast

from qudata_agent.background import KeyedLocks, Rerun, Reruns
from qudata_agent.blocking import Blocking, StillRunning
from qudata_agent.domain.container_spec import ContainerSpec, ContainerState
from qudata_agent.domain.instance import Instance, Status
from qudata_agent.domain.ssh_init import (
    STATUS_FILE,
    WORD_BYTES,
    Banner,
    ImageConfig,
    failure_of,
    ssh_spec,
    unsupported,
)
from qudata_agent.domain.ssh_keys import PublicKey, parse_key, render_authorized_keys
from qudata_agent.domain.ssh_setup import (
    container_env,
    profile_env_text,
    session_env,
    sshd_config_text,
)
from qudata_agent.errors import AgentError, Conflict, NotFound
from qudata_agent.services.engine import Engine
from qudata_agent.services.instance_events import InstanceEvents

log = logging.getLogger(__name__)

SshStatus = Literal["disabled", "installing", "ready", "failed"]
DISABLED: SshStatus = "disabled"
INSTALLING: SshStatus = "installing"
READY: SshStatus = "ready"
FAILED: SshStatus = "failed"
WAIT_TIMEOUT_S = 30.0  # how long a new run's sshd has to answer on its port
POLL_S = 0.25
# A new run's sshd usually answers within a fraction of a second: the first
# seconds are polled finely (a connection to the container's own address,
# refused at once while nothing listens), so a gated port opens promptly.
FAST_POLL_S = 0.02
FAST_POLL_FOR_S = 3.0
WORD_TIMEOUT_S = 2.0
LOOPBACK = "127.0.0.1"  # published ports are published on every address of the host
# sshd reads authorized_keys at every login: keep it small.
MAX_KEYS_BYTES = 64 * 1024
NO_AGENT_SSH = (
    "this container was made without the agent's SSH (by an older agent?):"
    " create the instance again"
)


class _Any(Enum):
    RUN = "any run"


ANY_RUN: Final = _Any.RUN  # a release that opens whatever run the gate waits past


@dataclass(frozen=True)
class _Gate:
    """A closed SSH port gate: the host port, and the run recorded when it closed (the
    run a start or restart is about to replace; None before the first)."""

    port: int
    after: str | None


class SshProbe(Protocol):
    """Host-side reads of what the tenant controls (adapters.ssh_probe)."""

    async def banner(self, host: str, port: int) -> Banner: ...

    def read_file(self, pid: int, path: str, max_bytes: int) -> bytes | None: ...


class SshFiles(Protocol):
    def prepare(
        self, instance_id: str, sshd_config: str, environment: str, authorized_keys: str
    ) -> Path: ...

    def prepared(self, instance_id: str) -> bool: ...

    def write_keys(self, instance_id: str, authorized_keys: str) -> None: ...

    def instance_ids(self) -> list[str]: ...

    def remove(self, instance_id: str) -> None: ...


class PortGate(Protocol):
    """Refuses new connections to a host port with a reset (adapters.port_gate)."""

    def close(self, port: int) -> None: ...

    def open(self, port: int) -> None: ...


class BundleInfo(Protocol):
    @property
    def bundles_dir(self) -> Path: ...

    @property
    def arch(self) -> str: ...


class SshStore(Protocol):
    def ssh_keys(self, instance_id: str) -> list[PublicKey]: ...

    def add_ssh_key(self, instance_id: str, key: PublicKey) -> bool: ...

    def remove_ssh_key(self, instance_id: str, key: PublicKey) -> bool: ...

    def ssh_state(self, instance_id: str) -> tuple[str, str | None, str | None] | None: ...

    def ssh_states(
        self, instance_ids: Sequence[str]
    ) -> dict[str, tuple[str, str | None, str | None]]: ...

    def set_ssh_state(
        self, instance_id: str, status: str, reason: str | None, run: str | None = None
    ) -> None: ...

    def get_instance(self, instance_id: str) -> Instance | None: ...

    def list_instances(self) -> list[Instance]: ...


@dataclass(frozen=True)
class SshView:
    status: SshStatus
    port: int | None
    reason: str | None


class SshService:
    def __init__(
        self,
        engine: Engine,  # image configs and containers' state
        store: SshStore,
        blocking: Blocking,
        files: SshFiles,
        bundle: BundleInfo | str,  # the bundle, or why the host could not make one
        probe: SshProbe,
        wait_timeout_s: float = WAIT_TIMEOUT_S,
        gate: PortGate | None = None,
        events: InstanceEvents | None = None,
    ) -> None:
        self._engine = engine
        self._gate = gate
        self._gated: dict[str, _Gate] = {}  # instance id -> its closed gate
        self._starting: set[str] = set()  # instances whose start or restart is under way
        self._probe = probe
        self._wait_timeout_s = wait_timeout_s
        self._word_timeout_s = WORD_TIMEOUT_S
        self._store = store
        self._blocking = blocking
        self._files = files
        self._bundle = bundle
        self._lock: KeyedLocks[str] = KeyedLocks()
        self._gate_locks: KeyedLocks[int] = KeyedLocks()
        self._watches: Reruns[str] = Reruns(self._watch_pass, "ssh")
        self._prune = Rerun(self._prune_pass, "ssh prune")
        self._gate_checks = Rerun(self._gates_pass, "ssh gates")
        if events is not None:
            events.on_new_run(self.on_new_run)  # sshd's banner watched on each run
            events.on_removed(lambda _gone: self.prune_soon())  # its SSH directory goes
            # After any change, a removal too: the gates no watch will open (a build or a
            # start that failed, an instance gone) open.
            events.on_change(self._gates_soon)

    async def _instance(self, instance_id: str) -> Instance:
        instance = await self._blocking.quick(self._store.get_instance, instance_id)
        if instance is None:
            raise NotFound(f"no instance {instance_id}")
        if not instance.ssh_enabled:
            raise Conflict("SSH is not enabled on this instance (create it with ssh_enabled)")
        return instance

    # -- state ------------------------------------------------------------------

    async def views(self, instances: Sequence[Instance]) -> dict[str, SshView]:
        """The SSH part of each instance's answer (one read of the store), by id."""
        states = await self._blocking.quick(self._store.ssh_states, [i.id for i in instances])
        return {i.id: _view(i, states.get(i.id)) for i in instances}

    async def _set(
        self, instance_id: str, status: SshStatus, reason: str | None = None, run: str | None = None
    ) -> None:
        await self._blocking.quick(self._store.set_ssh_state, instance_id, status, reason, run)

    async def _fail(self, instance_id: str, reason: str) -> None:
        log.warning("ssh setup failed", extra={"instance_id": instance_id, "reason": reason})
        try:
            await self._set(instance_id, FAILED, reason)
        except AgentError as stored:  # e.g. a full disk: the next run tries again
            log.warning("ssh state not recorded", extra={"error": stored.message})

    # -- keys -------------------------------------------------------------------

    async def keys(self, instance_id: str) -> list[str]:
        instance = await self._instance(instance_id)
        keys = await self._blocking.quick(self._store.ssh_keys, instance.id)
        return [key.line() for key in keys]

    async def add_key(self, instance_id: str, text: str) -> bool:
        """Adds a key to this instance only (False: it was there already); it logs in from
        the next login on."""
        key = parse_key(text)
        instance = await self._instance(instance_id)
        async with self._lock(instance.id):
            keys = await self._blocking.quick(self._store.ssh_keys, instance.id)
            if len(render_authorized_keys([*keys, key])) > MAX_KEYS_BYTES:
                raise Conflict(f"the keys of an instance are limited to {MAX_KEYS_BYTES} bytes")
            added = await self._blocking.quick(self._store.add_ssh_key, instance.id, key)
            if added:
                await self._apply_keys(instance.id)
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
            await self._apply_keys(instance.id)
        log.info("ssh key removed", extra={"instance_id": instance.id, "key_type": key.kind})

    async def _authorized_keys(self, instance_id: str) -> str:
        keys = await self._blocking.quick(self._store.ssh_keys, instance_id)
        return render_authorized_keys(keys)

    async def _apply_keys(self, instance_id: str) -> None:
        """Under the instance's lock: the file follows the store (once there is a file)."""
        if await self._blocking.quick(self._files.prepared, instance_id):
            text = await self._authorized_keys(instance_id)
            await self._blocking.quick(self._files.write_keys, instance_id, text)

    # -- the container ------------------------------------------------------------

    async def prepare(
        self, instance: Instance, spec: ContainerSpec, image: ImageConfig
    ) -> ContainerSpec:
        """The spec to create: with the agent's init and SSH, when the instance has SSH
        (`image`: the image's config, as the build read it)."""
        if not instance.ssh_enabled:
            return spec
        if isinstance(self._bundle, str):
            await self._fail(instance.id, self._bundle)
            return spec
        reason = unsupported(image, self._bundle.arch)
        if reason is not None:
            await self._fail(instance.id, reason)
            return spec
        env = session_env(container_env(image.env, spec.env))
        async with self._lock(instance.id):
            keys = await self._authorized_keys(instance.id)
            try:
                where = await self._blocking.slow(  # small files, each fsynced (disk time)
                    self._files.prepare,
                    instance.id,
                    sshd_config_text(env),
                    profile_env_text(env),
                    keys,
                )
            except AgentError as e:  # a full disk, say: the instance runs without SSH
                await self._fail(instance.id, e.message)
                return spec
            await self._set(instance.id, INSTALLING)
        return ssh_spec(
            spec, image, bundles_dir=str(self._bundle.bundles_dir), instance_dir=str(where)
        )

    # -- the gate -----------------------------------------------------------------

    async def _close_gate(self, instance: Instance) -> None:
        """Before the container starts: its SSH port refuses until sshd answers.

        The gate is known as closed, with the run it waits past, before its turn on the
        port comes (so the agent's stop sees it) and again as the rule goes in under the
        port's lock (an opening that had the lock first forgot it); that step is carried
        to its end even when the caller is cancelled (a stop cancels the builds), and an
        opening that comes meanwhile waits for it, then removes the rule. No rule is
        ever in place that no one will open."""
        port = instance.ports.get("22")
        if self._gate is None or port is None:
            return
        gate = _Gate(port, instance.started_at)
        self._gated[instance.id] = gate
        try:
            await asyncio.shield(self._shut(instance.id, gate))
        except AgentError as e:  # the instance goes on, ungated (as without a gate)
            log.warning("ssh port not gated", extra={"instance_id": instance.id, "error": str(e)})

    async def _shut(self, instance_id: str, gate: _Gate) -> None:
        assert self._gate is not None
        async with self._gate_locks(gate.port):
            self._gated[instance_id] = gate
            try:
                await self._blocking.quick(self._gate.close, gate.port)
            except AgentError:
                if self._gated.get(instance_id) == gate:
                    del self._gated[instance_id]
                raise

    async def before_start(self, instance: Instance) -> None:
        """A start of the instance's container is coming (the build's first, while Docker
        creates it; a start or restart): its SSH port is gated until this new run's
        sshd answers."""
        if instance.ssh_enabled and await self._blocking.quick(self._files.prepared, instance.id):
            await self._close_gate(instance)

    @asynccontextmanager
    async def starting(self, instance: Instance) -> AsyncIterator[None]:
        """A start or restart of the instance's container in the block: its port is gated
        for the new run (`before_start`); while the block runs, the current run's watch
        leaves the gate to the next run's, and the gates' pass leaves it alone; a start
        that fails opens it (whatever runs now is not held up)."""
        self._starting.add(instance.id)
        try:
            await self.before_start(instance)
            yield
        except BaseException:
            await asyncio.shield(self.release(instance.id))
            raise
        finally:
            self._starting.discard(instance.id)

    async def _open_gate(self, instance_id: str, run: str | _Any | None = ANY_RUN) -> bool:
        """Opens the instance's gate, unless `run` (the run whose sshd was seen, or whose
        watch ended) is the one the gate was closed past while that start is still
        under way: then the next run's watch opens it. True when the port is open."""
        gate = self._gated.get(instance_id)
        if self._gate is None or gate is None:
            return True
        async with self._gate_locks(gate.port):
            now = self._gated.get(instance_id)  # what the changes before this one left
            if now is None or now.port != gate.port:
                return now is None
            if run is not ANY_RUN and now.after == run and instance_id in self._starting:
                return False
            await self._blocking.quick(self._gate.open, now.port)
            del self._gated[instance_id]
        log.debug("ssh port opened", extra={"instance_id": instance_id, "port": gate.port})
        return True

    def gated(self) -> dict[str, int]:
        """The instances whose SSH port is gated now, with the port."""
        return {instance_id: gate.port for instance_id, gate in self._gated.items()}

    async def release(self, instance_id: str, run: str | _Any | None = ANY_RUN) -> None:
        """The run is over, the instance is gone, or its build failed: its gate (if any)
        opens (for a run's watch: unless a start past that run is under way)."""
        try:
            await self._open_gate(instance_id, run)
        except AgentError as e:  # the next prune tries again
            log.warning("ssh port gate not removed", extra={"error": e.message})

    def on_new_run(self, instance: Instance) -> None:
        """Called on every new run of the container: watches for sshd's banner."""
        if not instance.ssh_enabled or not instance.container_id:
            return
        self._watches.poke(instance.id)  # during a watch: one more once it ends

    async def _watch_pass(self, instance_id: str) -> None:
        try:
            await self._watch(instance_id)
        except AgentError as e:
            await self._fail(instance_id, e.message)

    async def _watch(self, instance_id: str) -> None:
        instance: Instance | None = None
        try:
            instance = await self._blocking.quick(self._store.get_instance, instance_id)
            await self._watch_run(instance)
        finally:  # whatever this run came to, its port is not left refusing
            run = ANY_RUN if instance is None else instance.started_at
            await asyncio.shield(self.release(instance_id, run))

    async def _watch_run(self, instance: Instance | None) -> None:
        if instance is None or instance.status is not Status.RUNNING or not instance.container_id:
            return
        instance_id = instance.id
        if not await self._blocking.quick(self._files.prepared, instance_id):
            state = await self._blocking.quick(self._store.ssh_state, instance_id)
            if state is None or state[0] != FAILED:  # keep the reason given at the build
                await self._fail(instance_id, NO_AGENT_SSH)
            return
        verdict = await self._verdict(instance)
        if verdict is None:
            return  # stopped or started again: the next run's pass decides
        ready, reason = verdict
        if ready:
            # Opened before `ready`, so who reads it gets in; a restart under way since
            # this run's sshd answered keeps the gate for the next run (its watch says).
            if not await self._open_gate(instance_id, instance.started_at):
                return
            await self._set(instance_id, READY, run=instance.started_at)
            log.info("ssh ready", extra={"instance_id": instance_id})
        else:
            await self._fail(instance_id, reason)

    async def _verdict(self, instance: Instance) -> tuple[bool, str] | None:
        """(ready, why not), or None when this run is over: learnt from the host side only
        (the container's state, the init's word read bounded, sshd's banner)."""
        assert instance.container_id is not None
        start = asyncio.get_running_loop().time()
        deadline = start + self._wait_timeout_s
        looked_at = -math.inf
        while True:
            # Docker's state and the init's word at the slow cadence (an inspect and a
            # thread each); only the cheap banner probe at the fast one.
            if asyncio.get_running_loop().time() - looked_at >= POLL_S:
                try:
                    state = await self._engine.inspect(instance.container_id)
                except AgentError:
                    return None  # gone, or Docker away: nothing to say about this run
                if not state.running or state.started_at != instance.started_at:
                    return None
                reason = failure_of(await self._init_word(instance.id, state.pid))
                if reason is not None:
                    return False, reason
                looked_at = asyncio.get_running_loop().time()
            tried = []
            gated = instance.id in self._gated and state.address is not None
            for host, port in _sshd_addresses(instance, state, gated):
                banner = await self._probe.banner(host, port)
                if banner.ssh:
                    return True, ""
                tried.append(banner.detail)
            last = tried[0] if tried else "no address of the container to reach"
            now = asyncio.get_running_loop().time()
            if now >= deadline:
                return False, f"sshd does not answer on port 22 ({_port_words(instance)}): {last}"
            await asyncio.sleep(FAST_POLL_S if now - start < FAST_POLL_FOR_S else POLL_S)

    async def _init_word(self, instance_id: str, pid: int | None) -> bytes | None:
        """The init's status file, read from the host: bounded in bytes and time, in a
        thread of its own (the tenant controls that file)."""
        if pid is None:
            return None
        try:
            return await self._blocking.alone(
                f"ssh word {instance_id}",
                self._word_timeout_s,
                self._probe.read_file,
                pid,
                STATUS_FILE,
                WORD_BYTES,
            )
        except (TimeoutError, StillRunning, OSError) as e:
            log.debug("the init's word was not read", extra={"error": repr(e)})
            return None

    # -- the instance's directory -----------------------------------------------

    def prune_soon(self) -> None:
        """Removes (in the background) the SSH directories of instances that are gone."""
        self._prune.poke()

    def _gates_soon(self) -> None:
        """A pass of `_prune_gates` only when a gate waits with no watch on it (a build or
        a start may have failed, an instance may be gone); otherwise nothing."""
        if self._unattended():
            self._gate_checks.poke()

    def _unattended(self) -> list[str]:
        """The instances whose gate is closed with no watch of a new run on it and no start
        under way (whose end opens it, or the new run's watch)."""
        return [i for i in self._gated if not self._watches.running(i) and i not in self._starting]

    async def _gates_pass(self) -> None:
        try:
            await self._prune_gates()
        except AgentError as e:
            log.warning("ssh port gates not checked", extra={"error": e.message})

    async def _prune_pass(self) -> None:
        try:
            await self._prune_once()
        except (AgentError, OSError) as e:
            log.warning("ssh directories not pruned", extra={"error": str(e)})

    async def _prune_once(self) -> None:
        # Listed before the store is read: an instance is recorded before its
        # directory is made, so a directory listed here whose instance is not
        # in the store belongs to a deleted one.
        present = await self._blocking.quick(self._files.instance_ids)
        if not present:
            return
        known = {i.id for i in await self._blocking.quick(self._store.list_instances)}
        for instance_id in present:
            if instance_id not in known:
                await self._blocking.quick(self._files.remove, instance_id)
                self._lock.forget(instance_id)
                log.info("ssh directory removed", extra={"instance_id": instance_id})

    async def _prune_gates(self) -> None:
        """Opens the gates no watch will open: of instances that are gone, or not being
        built and with no watch of a new run (a failed build, a start that failed)."""
        for instance_id in self._unattended():
            instance = await self._blocking.quick(self._store.get_instance, instance_id)
            if instance is None or instance.status is not Status.PENDING:
                await self.release(instance_id)

    async def settled(self) -> None:
        """Returns once no watch and no prune runs (what was asked for is done)."""
        await self._watches.settled()
        await self._prune.settled()
        await self._gate_checks.settled()

    async def close(self) -> None:
        """Stops the watches and opens every gate still closed: a cancelled watch's own
        opening may not finish before the agent's loop ends, and a rule left behind would
        refuse its port until this agent starts again (for ever, if it never does)."""
        await self._watches.close(timeout_s=5)
        await self._prune.close(timeout_s=5)
        await self._gate_checks.close(timeout_s=5)
        for instance_id in list(self._gated):
            await self.release(instance_id)


def _view(instance: Instance, state: tuple[str, str | None, str | None] | None) -> SshView:
    if not instance.ssh_enabled:
        return SshView(DISABLED, None, None)
    recorded, reason, run = state if state is not None else (INSTALLING, None, None)
    status = cast(SshStatus, recorded)  # the store holds only what `_set` wrote
    if status == READY and instance.status is Status.RUNNING and run != instance.started_at:
        status = INSTALLING  # ready in an earlier run; this one has not said yet
    return SshView(status, instance.ports.get("22"), reason)


def _sshd_addresses(
    instance: Instance, state: ContainerState, gated: bool
) -> list[tuple[str, int]]:
    """Where the host reaches this run's sshd: the published port, as a renter does, then
    the container's own address (an internal network publishes nothing); while the port
    is gated, the container's own address only."""
    port = instance.ports.get("22")
    found = [] if port is None or gated else [(LOOPBACK, port)]
    return found if state.address is None else [*found, (state.address, 22)]


def _port_words(instance: Instance) -> str:
    port = instance.ports.get("22")
    return "nothing published" if port is None else f"host port {port}"
