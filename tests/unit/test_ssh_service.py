"""The SSH service: the spec it gives the build, the keys on the host, the verdict on sshd.

A real store and the real files adapter (in a temporary directory); the
container is a stand-in that answers the image inspection and Docker's state,
and the host-side probe one that answers the port's banner and the init's word
with chosen answers. The engine stand-in has no way to run
anything in a container: the service must not need one."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from qudata_agent.adapters.docker.ports import DockerPorts
from qudata_agent.adapters.ssh_files import InstanceSshFiles
from qudata_agent.adapters.store import Store
from qudata_agent.blocking import Blocking
from qudata_agent.domain.container_spec import IDLE_COMMAND, ContainerSpec, ContainerState
from qudata_agent.domain.instance import Instance, Status, Wanted
from qudata_agent.domain.ssh_init import INIT, Banner, ImageConfig, banner_of
from qudata_agent.domain.ssh_keys import parse_key
from qudata_agent.errors import AgentError
from qudata_agent.services.instance_events import InstanceEvents
from qudata_agent.services.ssh import NO_AGENT_SSH, SshService

STARTED_AT = "2026-01-01T00:00:00Z"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl me@host"


class EngineStandIn:
    def __init__(self, image: ImageConfig) -> None:
        self.image = image
        self.started_at = STARTED_AT  # what Docker says of the container's current run

    def image_config(self, ref: str) -> ImageConfig:
        return self.image

    def inspect(self, container_id: str) -> ContainerState:
        return ContainerState(
            container_id, "qudata-i1", "i1", "a1", "running", started_at=self.started_at, pid=4242
        )


class ProbeStandIn:
    def __init__(self, banner: bytes = b"SSH-2.0-OpenSSH_9.2\r\n", word: bytes | None = None):
        self.line = banner
        self.word = word
        self.asked: list[tuple[int, str, int]] = []
        self.banners = 0

    async def banner(self, host: str, port: int) -> Banner:
        assert (host, port) == ("127.0.0.1", 20022)
        self.banners += 1
        return banner_of(self.line)

    def read_file(self, pid: int, path: str, max_bytes: int) -> bytes | None:
        self.asked.append((pid, path, max_bytes))
        return None if self.word is None else self.word[:max_bytes]


@dataclass(frozen=True)
class FakeBundle:
    bundles_dir: Path
    arch: str = "amd64"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store.open(tmp_path / "agent.db")
    yield opened
    opened.close()


@pytest.fixture
async def blocking() -> AsyncIterator[Blocking]:
    pool = Blocking()
    yield pool
    pool.close()


def _instance(store: Store, ssh: bool = True) -> Instance:
    instance = Instance(
        id="i1",
        status=Status.RUNNING,
        wanted=Wanted.RUNNING,
        image="img:1",
        container_name="qudata-i1",
        container_id="c1",
        ssh_enabled=ssh,
        started_at=STARTED_AT,
        ports={"22": 20022},
    )
    store.insert_instance(instance)
    return instance


SPEC = ContainerSpec(
    instance_id="i1", agent_id="a1", image="img:1", command=IDLE_COMMAND, env={"A": "from order"}
)
IMAGE = ImageConfig(env=("PATH=/opt/x/bin:/usr/bin", "A=from image"), architecture="amd64")


def _service(
    store: Store,
    blocking: Blocking,
    tmp_path: Path,
    engine: EngineStandIn,
    bundle: object = None,
    probe: ProbeStandIn | None = None,
    gate: GateStandIn | None = None,
    events: InstanceEvents | None = None,
) -> tuple[SshService, InstanceSshFiles]:
    files = InstanceSshFiles(tmp_path / "instances")
    chosen = FakeBundle(tmp_path / "bundles") if bundle is None else bundle
    service = SshService(
        DockerPorts(engine, blocking),  # type: ignore[arg-type]
        store,
        blocking,
        files,
        chosen,  # type: ignore[arg-type]
        probe or ProbeStandIn(),
        wait_timeout_s=0.5,
        gate=gate,
        events=events,
    )
    return service, files


async def test_prepare_lays_out_the_instances_files_and_starts_the_init(
    store: Store, blocking: Blocking, tmp_path: Path
) -> None:
    instance = _instance(store)
    store.add_ssh_key("i1", parse_key(KEY))
    service, files = _service(store, blocking, tmp_path, EngineStandIn(IMAGE))
    final = await service.prepare(instance, SPEC, IMAGE)
    assert final.entrypoint is not None and final.entrypoint[-1] == INIT
    where = files.dir_of("i1")
    assert {m.source for m in final.mounts} == {str(tmp_path / "bundles"), str(where)}
    config = (where / "sshd_config").read_text()
    assert '"PATH=/opt/x/bin:/usr/bin" "A=from order"' in config  # the order's value wins
    assert KEY in (where / "authorized_keys").read_text()
    modes = {p.name: p.stat().st_mode & 0o777 for p in where.iterdir()}
    assert modes["ssh_host_ed25519_key"] == modes["sshd_config"] == modes["environment"] == 0o600
    assert modes["authorized_keys"] == 0o644
    host_key = files.host_public_key("i1")
    await service.prepare(instance, SPEC, IMAGE)  # a resumed build: the host key stays
    assert files.host_public_key("i1") == host_key
    assert store.ssh_state("i1") == ("installing", None, None)
    await service.close()


async def test_keys_are_written_to_the_host_at_once_without_an_exec(
    store: Store, blocking: Blocking, tmp_path: Path
) -> None:
    instance = _instance(store)
    engine = EngineStandIn(IMAGE)
    service, files = _service(store, blocking, tmp_path, engine)
    await service.prepare(instance, SPEC, IMAGE)
    assert await service.add_key("i1", KEY) is True
    assert KEY in (files.dir_of("i1") / "authorized_keys").read_text()
    await service.remove_key("i1", KEY)
    assert KEY not in (files.dir_of("i1") / "authorized_keys").read_text()
    await service.close()


async def _watched(service: SshService, instance: Instance) -> None:
    service.on_new_run(instance)
    await service.settled()


@pytest.mark.parametrize(
    ("banner", "word", "status", "words"),
    [
        (b"SSH-2.0-OpenSSH_9.2\r\n", None, "ready", None),
        (b"SSH-2.0-OpenSSH_9.2\r\n", b"ready\n", "ready", None),
        # The tenant owns the word's file: garbage there changes nothing.
        (b"SSH-2.0-OpenSSH_9.2\r\n", b"\0" * 4096, "ready", None),
        (
            b"",
            b"failed: the image has no shell for root's sessions (/bin/sh)\n",
            "failed",
            "no shell",
        ),
        (b"", None, "failed", "does not answer on port 22 (host port 20022)"),
        (b"HTTP/1.1 400 Bad Request\r\n", b"ready\n", "failed", "something other than SSH"),
    ],
)
async def test_the_port_and_the_inits_word_become_the_ssh_state(
    store: Store,
    blocking: Blocking,
    tmp_path: Path,
    banner: bytes,
    word: bytes | None,
    status: str,
    words: str | None,
) -> None:
    instance = _instance(store)
    probe = ProbeStandIn(banner, word)
    service, _ = _service(store, blocking, tmp_path, EngineStandIn(IMAGE), probe=probe)
    await service.prepare(instance, SPEC, IMAGE)
    await _watched(service, instance)
    state = store.ssh_state("i1")
    assert state is not None and state[0] == status
    if words is None:
        assert (
            state[2] == instance.started_at
            and (await service.views([instance]))[instance.id].status == "ready"
        )
    else:
        assert state[1] is not None and words in state[1], state
    assert probe.asked and all(a == (4242, "/.qudata/run/ssh", 512) for a in probe.asked)
    await service.close()


async def test_a_reason_the_tenant_wrote_is_one_short_printable_line(
    store: Store, blocking: Blocking, tmp_path: Path
) -> None:
    instance = _instance(store)
    probe = ProbeStandIn(b"", b"failed: \x1b[2J" + b"x" * 5000 + b"\nsecond line")
    service, _ = _service(store, blocking, tmp_path, EngineStandIn(IMAGE), probe=probe)
    await service.prepare(instance, SPEC, IMAGE)
    await _watched(service, instance)
    state = store.ssh_state("i1")
    assert state is not None and state[0] == "failed" and state[1] is not None
    assert len(state[1]) <= 300 and state[1].isprintable() and "second" not in state[1]
    await service.close()


async def test_a_word_that_hangs_holds_one_thread_of_its_own_not_a_pool(
    store: Store, blocking: Blocking, tmp_path: Path
) -> None:
    """A read the tenant can hold (a file in its container) never waits in a shared pool."""
    release = threading.Event()

    class Hanging(ProbeStandIn):
        def read_file(self, pid: int, path: str, max_bytes: int) -> bytes | None:
            self.asked.append((pid, path, max_bytes))
            assert threading.current_thread().name.startswith("alone ")
            release.wait(10)
            return None

    instance = _instance(store)
    probe = Hanging(b"")
    service, _ = _service(store, blocking, tmp_path, EngineStandIn(IMAGE), probe=probe)
    service._word_timeout_s = 0.05
    await service.prepare(instance, SPEC, IMAGE)
    try:
        await _watched(service, instance)
        # One read began and hung; the later passes did not start another one.
        assert len(probe.asked) == 1 and probe.banners > 1
        state = store.ssh_state("i1")
        assert state is not None and state[0] == "failed"
        assert await blocking.quick(lambda: 1) == 1 and await blocking.slow(lambda: 2) == 2
    finally:
        release.set()
    await service.close()


async def test_a_run_that_ended_while_waiting_is_left_to_the_next_run(
    store: Store, blocking: Blocking, tmp_path: Path
) -> None:
    instance = _instance(store)
    engine = EngineStandIn(IMAGE)
    service, _ = _service(store, blocking, tmp_path, engine, probe=ProbeStandIn(b""))
    await service.prepare(instance, SPEC, IMAGE)
    engine.started_at = "2026-01-01T00:00:09Z"  # the container started again meanwhile
    await _watched(service, instance)
    assert store.ssh_state("i1") == ("installing", None, None)
    await service.close()


async def test_an_image_of_another_architecture_runs_without_ssh_and_says_why(
    store: Store, blocking: Blocking, tmp_path: Path
) -> None:
    instance = _instance(store)
    engine = EngineStandIn(ImageConfig(architecture="arm64"))
    service, _ = _service(store, blocking, tmp_path, engine)
    assert await service.prepare(instance, SPEC, engine.image) == SPEC
    await _watched(service, instance)  # no probe of a container without the init
    state = store.ssh_state("i1")
    assert state is not None and state[0] == "failed" and "arm64" in (state[1] or "")
    await service.close()


async def test_a_host_without_a_bundle_says_what_to_install(
    store: Store, blocking: Blocking, tmp_path: Path
) -> None:
    instance = _instance(store)
    why = "the agent's SSH is not available on this host: install patchelf"
    service, _ = _service(store, blocking, tmp_path, EngineStandIn(IMAGE), bundle=why)
    assert await service.prepare(instance, SPEC, IMAGE) == SPEC
    assert store.ssh_state("i1") == ("failed", why, None)
    await service.close()


async def test_a_container_made_without_the_agents_ssh_is_reported(
    store: Store, blocking: Blocking, tmp_path: Path
) -> None:
    instance = _instance(store)
    service, _ = _service(store, blocking, tmp_path, EngineStandIn(IMAGE))
    await _watched(service, instance)
    assert store.ssh_state("i1") == ("failed", NO_AGENT_SSH, None)
    await service.close()


async def test_prune_removes_only_the_directories_of_deleted_instances(
    store: Store, blocking: Blocking, tmp_path: Path
) -> None:
    instance = _instance(store)
    service, files = _service(store, blocking, tmp_path, EngineStandIn(IMAGE))
    await service.prepare(instance, SPEC, IMAGE)
    files.dir_of("gone").mkdir()
    service.prune_soon()
    await service.settled()
    assert files.instance_ids() == ["i1"]
    await service.close()


async def test_a_disabled_instance_is_left_as_it_is(
    store: Store, blocking: Blocking, tmp_path: Path
) -> None:
    instance = _instance(store, ssh=False)
    service, files = _service(store, blocking, tmp_path, EngineStandIn(IMAGE))
    assert await service.prepare(instance, SPEC, IMAGE) == SPEC
    assert files.instance_ids() == []
    assert (await service.views([instance]))[instance.id].status == "disabled"
    await service.close()


async def test_the_fine_poll_probes_the_banner_and_leaves_docker_and_the_word_slower(
    store: Store, blocking: Blocking, tmp_path: Path
) -> None:
    """While sshd comes up the banner is tried every 20 ms; Docker's inspect and the
    init's word (a thread each) only at the slow cadence, or 8 creates at once would
    ask dockerd hundreds of times a second."""

    class Late(ProbeStandIn):
        async def banner(self, host: str, port: int) -> Banner:
            self.banners += 1
            return banner_of(b"" if self.banners < 25 else self.line)  # ~0.5 s of refusals

    class Counting(EngineStandIn):
        inspects = 0

        def inspect(self, container_id: str) -> ContainerState:
            self.inspects += 1
            return super().inspect(container_id)

    instance = _instance(store)
    engine, probe = Counting(IMAGE), Late()
    service, _ = _service(store, blocking, tmp_path, engine, probe=probe)
    service._wait_timeout_s = 5.0
    await service.prepare(instance, SPEC, IMAGE)
    await _watched(service, instance)
    state = store.ssh_state("i1")
    assert state is not None and state[0] == "ready", state
    assert probe.banners == 25
    assert engine.inspects <= 5 and len(probe.asked) <= 5, (engine.inspects, probe.asked)
    await service.close()


class GateStandIn:
    def __init__(self) -> None:
        self.closed: set[int] = set()
        self.hold = threading.Event()  # cleared: a close waits (an iptables call under load)
        self.hold.set()
        self.hold_open = threading.Event()  # cleared: an opening waits
        self.hold_open.set()

    def close(self, port: int) -> None:
        self.hold.wait(10)
        self.closed.add(port)

    def open(self, port: int) -> None:
        self.hold_open.wait(10)
        self.closed.discard(port)


@dataclass
class Building:
    """An SSH instance mid-build: prepared (its gate closed), no container run yet."""

    service: SshService
    files: InstanceSshFiles
    gate: GateStandIn
    events: InstanceEvents
    instance: Instance


async def _building(store: Store, blocking: Blocking, tmp_path: Path) -> Building:
    events, gate = InstanceEvents(), GateStandIn()
    engine = EngineStandIn(IMAGE)
    service, files = _service(store, blocking, tmp_path, engine, gate=gate, events=events)
    building = replace(_instance(store), status=Status.PENDING, container_id=None)
    store.update_instance(building)
    await service.prepare(building, SPEC, IMAGE)
    assert gate.closed == set()  # the build shuts it beside Docker's create:
    await service.before_start(building)
    assert gate.closed == {20022}
    return Building(service, files, gate, events, building)


async def test_a_change_opens_the_gate_of_a_failed_build_and_a_removal_prunes(
    store: Store, blocking: Blocking, tmp_path: Path
) -> None:
    b = await _building(store, blocking, tmp_path)
    service, files, gate, events, building = b.service, b.files, b.gate, b.events, b.instance
    events.changed()  # another step of the build: the gate stays
    await service.settled()
    assert gate.closed == {20022}
    store.update_instance(replace(building, status=Status.ERROR))  # the build failed
    events.changed()
    await service.settled()
    assert gate.closed == set()
    files.dir_of("gone").mkdir()
    events.changed()  # not a removal: directories are left to the removal's pass
    await service.settled()
    assert sorted(files.instance_ids()) == ["gone", "i1"]
    events.removed(building)
    await service.settled()
    assert files.instance_ids() == ["i1"]
    await service.close()


async def test_the_agents_stop_opens_every_gate_still_closed(
    store: Store, blocking: Blocking, tmp_path: Path
) -> None:
    """A stop during a build: the gate closed for it has no watch yet to open it."""
    b = await _building(store, blocking, tmp_path)
    gate = b.gate
    await b.service.close()
    assert gate.closed == set()


async def test_a_stop_in_the_midst_of_shutting_a_gate_still_leaves_it_open(
    store: Store, blocking: Blocking, tmp_path: Path
) -> None:
    """The stop cancels the build while the gate's rule is going in (a thread the
    cancel cannot stop): the opening waits for that call, then removes the rule."""
    events, gate = InstanceEvents(), GateStandIn()
    service, _ = _service(store, blocking, tmp_path, EngineStandIn(IMAGE), gate=gate, events=events)
    building = replace(_instance(store), status=Status.PENDING, container_id=None)
    store.update_instance(building)
    await service.prepare(building, SPEC, IMAGE)
    gate.hold.clear()
    shutting = asyncio.create_task(service.before_start(building))
    await asyncio.sleep(0.05)
    shutting.cancel()  # the build, cancelled by the stop
    stopping = asyncio.create_task(service.close())
    await asyncio.sleep(0.05)
    gate.hold.set()  # the rule goes in only now
    await asyncio.wait_for(stopping, 5)
    assert gate.closed == set()


async def test_a_gate_that_cannot_be_shut_leaves_the_instance_ungated(
    store: Store, blocking: Blocking, tmp_path: Path
) -> None:
    """iptables refuses the rule: the start goes on without a gate, and none is counted
    as closed (nothing to open later)."""

    class Refusing(GateStandIn):
        def close(self, port: int) -> None:
            raise AgentError("iptables: no chain by that name")

    gate = Refusing()
    service, _ = _service(store, blocking, tmp_path, EngineStandIn(IMAGE), gate=gate)
    building = replace(_instance(store), status=Status.PENDING, container_id=None)
    store.update_instance(building)
    await service.prepare(building, SPEC, IMAGE)
    await service.before_start(building)  # no error: the instance is not held up
    assert service.gated() == {} and gate.closed == set()
    await service.close()


async def test_a_removal_during_the_build_opens_its_gate(
    store: Store, blocking: Blocking, tmp_path: Path
) -> None:
    b = await _building(store, blocking, tmp_path)
    service, files, gate, events, building = b.service, b.files, b.gate, b.events, b.instance
    store.delete_instance("i1")  # deleted before its container ever ran
    events.removed(building)
    await service.settled()
    assert gate.closed == set() and files.instance_ids() == []
    await service.close()


async def test_an_opening_and_a_shutting_of_one_port_leave_the_gate_known_as_it_is(
    store: Store, blocking: Blocking, tmp_path: Path
) -> None:
    """A watch opens the port while the next start shuts it again: whichever iptables
    call comes last, the agent knows the gate as closed exactly while the rule is in, so
    the next run's watch opens it (a rule the agent had forgotten refused the port until
    the agent's next start: a renter locked out of a running instance)."""
    b = await _building(store, blocking, tmp_path)
    service, gate, building = b.service, b.gate, b.instance
    gate.hold_open.clear()
    opening = asyncio.create_task(service.release("i1"))
    await asyncio.sleep(0.05)  # the rule's removal is under way
    shutting = asyncio.create_task(service.before_start(building))
    await asyncio.sleep(0.05)
    gate.hold_open.set()
    await asyncio.wait_for(asyncio.gather(opening, shutting), 5)
    assert gate.closed == {20022} and service.gated() == {"i1": 20022}
    await service.close()
    assert gate.closed == set()


async def test_a_restart_keeps_the_gate_shut_for_the_new_runs_sshd(
    store: Store, blocking: Blocking, tmp_path: Path
) -> None:
    """A restart shuts the gate while the run it replaces still answers: that run's watch
    neither opens the port nor says `ready`, and the gates' pass leaves it shut while the
    restart is under way; the new run's watch opens it and says `ready` for that run."""
    events, gate, engine = InstanceEvents(), GateStandIn(), EngineStandIn(IMAGE)
    service, _ = _service(store, blocking, tmp_path, engine, gate=gate, events=events)
    instance = _instance(store)
    await service.prepare(instance, SPEC, IMAGE)
    async with service.starting(instance):
        assert gate.closed == {20022}
        await _watched(service, instance)  # the old run's sshd still answers
        assert gate.closed == {20022} and store.ssh_state("i1") == ("installing", None, None)
        events.changed()  # a Docker event of the restart
        await service.settled()
        assert gate.closed == {20022}
        engine.started_at = "2026-01-01T00:00:09Z"  # the new run
        again = replace(instance, started_at=engine.started_at)
        store.update_instance(again)
        await _watched(service, again)
        assert gate.closed == set() and service.gated() == {}
        assert store.ssh_state("i1") == ("ready", None, engine.started_at)
    await service.close()


async def test_a_start_that_fails_or_brings_no_run_opens_its_gate(
    store: Store, blocking: Blocking, tmp_path: Path
) -> None:
    events, gate = InstanceEvents(), GateStandIn()
    service, _ = _service(store, blocking, tmp_path, EngineStandIn(IMAGE), gate=gate, events=events)
    instance = _instance(store)
    await service.prepare(instance, SPEC, IMAGE)
    with pytest.raises(AgentError):
        async with service.starting(instance):
            assert gate.closed == {20022}
            raise AgentError("docker: the start failed")
    assert gate.closed == set() and service.gated() == {}
    async with service.starting(instance):
        pass  # Docker started it, and it exited at once: no new run to watch
    assert gate.closed == {20022}
    store.update_instance(replace(instance, status=Status.PAUSED))
    events.changed()
    await service.settled()
    assert gate.closed == set()
    await service.close()
