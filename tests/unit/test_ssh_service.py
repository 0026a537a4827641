"""The SSH service: the spec it gives the build, the keys on the host, the init's word.

A real store and the real files adapter (in a temporary directory, the host's
ssh-keygen); the container is a stand-in that answers the image inspection and
the one exec with chosen answers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from qudata_agent.adapters.ssh_files import InstanceSshFiles
from qudata_agent.adapters.store import Store
from qudata_agent.blocking import Blocking
from qudata_agent.domain.container_spec import IDLE_COMMAND, ContainerSpec, ContainerState
from qudata_agent.domain.instance import Instance, Status, Wanted
from qudata_agent.domain.ssh_init import INIT, ImageConfig
from qudata_agent.domain.ssh_keys import parse_key
from qudata_agent.services.ssh import NO_AGENT_SSH, SshService

STARTED_AT = "2026-01-01T00:00:00Z"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl me@host"


class EngineStandIn:
    def __init__(self, image: ImageConfig, code: int = 0, output: str = "ready\n") -> None:
        self.image = image
        self.code = code
        self.output = output
        self.execs: list[list[str]] = []
        self.started_at = STARTED_AT  # what Docker says of the container's current run

    def image_config(self, ref: str) -> ImageConfig:
        return self.image

    def inspect(self, container_id: str) -> ContainerState:
        return ContainerState(
            container_id, "qudata-i1", "i1", "a1", "running", started_at=self.started_at
        )

    def exec_run(
        self, container_id: str, argv: list[str], timeout_s: float = 30
    ) -> tuple[int, str]:
        self.execs.append(argv)
        return self.code, self.output


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
    )
    store.insert_instance(instance)
    return instance


SPEC = ContainerSpec(
    instance_id="i1", agent_id="a1", image="img:1", command=IDLE_COMMAND, env={"A": "from order"}
)
IMAGE = ImageConfig(env=("PATH=/opt/x/bin:/usr/bin", "A=from image"), architecture="amd64")


def _service(
    store: Store, blocking: Blocking, tmp_path: Path, engine: EngineStandIn, bundle: object = None
) -> tuple[SshService, InstanceSshFiles]:
    files = InstanceSshFiles(tmp_path / "instances")
    chosen = FakeBundle(tmp_path / "bundles") if bundle is None else bundle
    return SshService(engine, store, blocking, files, chosen), files  # type: ignore[arg-type]


async def test_prepare_lays_out_the_instances_files_and_starts_the_init(
    store: Store, blocking: Blocking, tmp_path: Path
) -> None:
    instance = _instance(store)
    store.add_ssh_key("i1", parse_key(KEY))
    service, files = _service(store, blocking, tmp_path, EngineStandIn(IMAGE))
    final = await service.prepare(instance, SPEC)
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
    await service.prepare(instance, SPEC)  # a resumed build: the host key stays
    assert files.host_public_key("i1") == host_key
    assert store.ssh_state("i1") == ("installing", None, None)
    await service.close()


async def test_keys_are_written_to_the_host_at_once_without_an_exec(
    store: Store, blocking: Blocking, tmp_path: Path
) -> None:
    instance = _instance(store)
    engine = EngineStandIn(IMAGE)
    service, files = _service(store, blocking, tmp_path, engine)
    await service.prepare(instance, SPEC)
    assert await service.add_key("i1", KEY) is True
    assert KEY in (files.dir_of("i1") / "authorized_keys").read_text()
    await service.remove_key("i1", KEY)
    assert KEY not in (files.dir_of("i1") / "authorized_keys").read_text()
    assert engine.execs == []
    await service.close()


async def _watched(service: SshService, instance: Instance) -> None:
    service.on_new_run(instance)
    await service._tasks[instance.id]


@pytest.mark.parametrize(
    ("code", "output", "status", "words"),
    [
        (0, "ready\n", "ready", None),
        (0, "failed: the image has no shell for root's sessions (/bin/sh)\n", "failed", "no shell"),
        (0, "", "failed", "said nothing"),
        (126, "OCI runtime exec failed", "failed", "cannot ask the container"),
    ],
)
async def test_the_inits_word_becomes_the_ssh_state(
    store: Store,
    blocking: Blocking,
    tmp_path: Path,
    code: int,
    output: str,
    status: str,
    words: str | None,
) -> None:
    instance = _instance(store)
    service, _ = _service(store, blocking, tmp_path, EngineStandIn(IMAGE, code, output))
    await service.prepare(instance, SPEC)
    await _watched(service, instance)
    state = store.ssh_state("i1")
    assert state is not None and state[0] == status
    if words is None:
        assert state[2] == instance.started_at and (await service.view(instance)).status == "ready"
    else:
        assert state[1] is not None and words in state[1], state
    await service.close()


async def test_a_failed_ask_during_a_restart_is_left_to_the_next_run(
    store: Store, blocking: Blocking, tmp_path: Path
) -> None:
    instance = _instance(store)
    engine = EngineStandIn(IMAGE, 126, "OCI runtime exec failed: broken pipe")
    service, _ = _service(store, blocking, tmp_path, engine)
    await service.prepare(instance, SPEC)
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
    assert await service.prepare(instance, SPEC) == SPEC
    await _watched(service, instance)  # no exec into a container without the init
    state = store.ssh_state("i1")
    assert state is not None and state[0] == "failed" and "arm64" in (state[1] or "")
    assert engine.execs == []
    await service.close()


async def test_a_host_without_a_bundle_says_what_to_install(
    store: Store, blocking: Blocking, tmp_path: Path
) -> None:
    instance = _instance(store)
    why = "the agent's SSH is not available on this host: install patchelf"
    service, _ = _service(store, blocking, tmp_path, EngineStandIn(IMAGE), bundle=why)
    assert await service.prepare(instance, SPEC) == SPEC
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
    await service.prepare(instance, SPEC)
    files.dir_of("gone").mkdir()
    service.prune_soon()
    assert service._prune is not None
    await service._prune
    assert files.instance_ids() == ["i1"]
    await service.close()


async def test_a_disabled_instance_is_left_as_it_is(
    store: Store, blocking: Blocking, tmp_path: Path
) -> None:
    instance = _instance(store, ssh=False)
    service, files = _service(store, blocking, tmp_path, EngineStandIn(IMAGE))
    assert await service.prepare(instance, SPEC) == SPEC
    assert files.instance_ids() == []
    assert (await service.view(instance)).status == "disabled"
    await service.close()
