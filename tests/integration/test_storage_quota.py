"""storage_gb for real: a btrfs-backed second dockerd caps a container's writable layer.

The second daemon (support.btrfs_docker) is started once for the module and
removed afterwards, also when a test fails. Containers are made through the
agent's own Docker adapter with `storage_bytes` in the spec, exactly as the
instance service makes them; what they can write is tried with `dd` inside.
The main daemon is used only to check that the agent's verdict on it agrees
with what Docker itself does with a size limit there.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from qudata_agent.adapters.docker import DockerEngine, DockerError
from qudata_agent.adapters.host import mount_options
from qudata_agent.domain.container_spec import IDLE_COMMAND, ContainerSpec
from qudata_agent.errors import NotFound
from qudata_agent.services.storage import detect_quota_support
from support.btrfs_docker import BtrfsDocker
from support.docker_api import exec_sh

pytestmark = pytest.mark.docker

GIB = 1024**3
MIB = 1024**2
BUSYBOX = "qudata-test/busybox:1"
WRITE_1_5_GIB = "dd if=/dev/zero of=/fill bs=1M count=1536 conv=fsync 2>&1; echo rc=$?"


@pytest.fixture(scope="module")
def btrfs() -> Iterator[BtrfsDocker]:
    with BtrfsDocker.running() as daemon:
        yield daemon


@dataclass
class Env:
    engine: DockerEngine
    agent_id: str
    base_url: str | None = None

    def sh(self, container_id: str, script: str, timeout_s: float = 30) -> tuple[int, str]:
        return exec_sh(container_id, script, self.base_url, timeout_s)

    def run(self, storage_bytes: int | None) -> str:
        spec = ContainerSpec(
            instance_id=uuid.uuid4().hex[:12],
            agent_id=self.agent_id,
            image=BUSYBOX,
            command=IDLE_COMMAND,
            storage_bytes=storage_bytes,
        )
        container_id = self.engine.create(spec)
        self.engine.start(container_id)
        return container_id


def _engine_env(base_url: str | None) -> Iterator[Env]:
    agent_id = f"test-{uuid.uuid4().hex[:12]}"
    engine = DockerEngine(base_url, timeout_s=60)
    try:
        yield Env(engine, agent_id, base_url)
    finally:
        for state in engine.list_managed(agent_id):
            engine.remove(state.container_id)
        engine.close()


@pytest.fixture
def on_btrfs(btrfs: BtrfsDocker) -> Iterator[Env]:
    yield from _engine_env(btrfs.host)


@pytest.fixture
def on_main() -> Iterator[Env]:
    yield from _engine_env(None)


def test_the_btrfs_daemon_is_found_to_enforce_sizes(btrfs: BtrfsDocker, on_btrfs: Env) -> None:
    support = detect_quota_support(on_btrfs.engine.storage_info, mount_options)
    assert support.enforceable and support.fix == ""
    assert support.driver == "btrfs"
    assert support.data_root == str(btrfs.data_root)


def test_a_container_given_1_gb_cannot_write_1_5_gb(on_btrfs: Env) -> None:
    container_id = on_btrfs.run(storage_bytes=1 * GIB)
    code, out = on_btrfs.sh(container_id, WRITE_1_5_GIB, timeout_s=60)
    assert code == 0, out
    assert "rc=0" not in out, out
    assert "Disk quota exceeded" in out or "No space left" in out, out
    _, size = on_btrfs.sh(container_id, "wc -c < /fill")
    assert int(size.strip()) < 1536 * MIB


def test_a_container_given_2_gb_can_write_1_5_gb(on_btrfs: Env) -> None:
    container_id = on_btrfs.run(storage_bytes=2 * GIB)
    code, out = on_btrfs.sh(container_id, WRITE_1_5_GIB, timeout_s=60)
    assert code == 0 and "rc=0" in out, out
    _, size = on_btrfs.sh(container_id, "wc -c < /fill")
    assert int(size.strip()) == 1536 * MIB
    # What the monitor reads where nothing caps the layer (`docker ps --size`).
    started = time.monotonic()
    used = on_btrfs.engine.writable_layer_bytes(container_id)
    assert 1536 * MIB <= used < 1600 * MIB
    assert time.monotonic() - started < 10


def test_the_verdict_on_the_main_daemon_matches_what_docker_does(on_main: Env) -> None:
    """Where the agent says "cannot enforce", Docker refuses a size; where "can", it works."""
    support = detect_quota_support(on_main.engine.storage_info, mount_options)
    assert support.driver == on_main.engine.storage_info().driver
    if support.enforceable:
        container_id = on_main.run(storage_bytes=1 * GIB)
        assert on_main.engine.inspect(container_id).running
    else:
        assert support.fix
        with pytest.raises(DockerError, match=r"storage-opt|quota|size"):
            on_main.run(storage_bytes=1 * GIB)


def test_the_writable_layer_is_measured_on_the_main_daemon(on_main: Env) -> None:
    container_id = on_main.run(storage_bytes=None)
    code, out = on_main.sh(container_id, "dd if=/dev/zero of=/fill bs=1M count=64 2>&1")
    assert code == 0, out
    used = on_main.engine.writable_layer_bytes(container_id)
    assert 64 * MIB <= used < 70 * MIB
    on_main.engine.remove(container_id)
    with pytest.raises(NotFound):
        on_main.engine.writable_layer_bytes(container_id)
