"""The SSH service's reading of the bring-up's exit status: each failure the script can
report becomes a reason that names its cause (a real store; the container is a stand-in
that answers the exec with a chosen exit status and output)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from qudata_agent.adapters.store import Store
from qudata_agent.blocking import Blocking
from qudata_agent.domain.container_spec import ContainerState
from qudata_agent.domain.instance import Instance, Status, Wanted
from qudata_agent.domain.ssh_setup import (
    EXIT_INSTALL_FAILED,
    EXIT_KEYS_FAILED,
    EXIT_NO_PACKAGE_MANAGER,
    EXIT_SSHD_FAILED,
)
from qudata_agent.services.ssh import SshService


class ExecStandIn:
    def __init__(self, code: int, output: str) -> None:
        self.code = code
        self.output = output
        self.scripts: list[str] = []

    def inspect(self, container_id: str) -> ContainerState:
        return ContainerState(
            container_id, "qudata-i1", "i1", "a1", "running", env=("PATH=/opt/x/bin:/usr/bin",)
        )

    def exec_run(
        self, container_id: str, argv: list[str], timeout_s: float = 30
    ) -> tuple[int, str]:
        self.scripts.append(argv[-1])
        return self.code, self.output


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store.open(tmp_path / "agent.db")
    yield opened
    opened.close()


async def _setup_with(store: Store, code: int, output: str) -> tuple[str, str | None, list[str]]:
    instance = Instance(
        id="i1",
        status=Status.RUNNING,
        wanted=Wanted.RUNNING,
        image="img:1",
        container_name="qudata-i1",
        container_id="c1",
        ssh_enabled=True,
        started_at="2026-01-01T00:00:00Z",
    )
    store.insert_instance(instance)
    engine = ExecStandIn(code, output)
    blocking = Blocking()
    service = SshService(engine, store, blocking)
    try:
        service.on_new_run(instance)
        await service._tasks["i1"]
    finally:
        await service.close()
        blocking.close()
    state = store.ssh_state("i1")
    assert state is not None
    return state[0], state[1], engine.scripts


@pytest.mark.parametrize(
    ("code", "output", "words"),
    [
        (EXIT_NO_PACKAGE_MANAGER, "", "no package manager"),
        (EXIT_INSTALL_FAILED, "E: Unable to locate package", "package mirror"),
        (EXIT_KEYS_FAILED, "No space left on device", "writing authorized_keys failed"),
        (EXIT_SSHD_FAILED, "Bind to port 22 failed: Address already in use.", "port 22"),
        (EXIT_SSHD_FAILED, "sshd did not start:\nfatal: bad key", "sshd did not start"),
        (1, "something else", "bringing up sshd failed (exit 1)"),
    ],
)
async def test_each_failure_is_reported_with_its_cause(
    store: Store, code: int, output: str, words: str
) -> None:
    status, reason, _ = await _setup_with(store, code, output)
    assert status == "failed"
    assert reason is not None and words in reason, reason


async def test_a_setup_that_succeeds_is_ready_and_carries_the_containers_environment(
    store: Store,
) -> None:
    status, reason, scripts = await _setup_with(store, 0, "")
    assert (status, reason) == ("ready", None)
    assert len(scripts) == 1 and "SetEnv" in scripts[0] and "/opt/x/bin" in scripts[0]
