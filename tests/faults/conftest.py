"""Fixtures of the fault tests: agents on the real dockerd, and the removal of all they made.

Every container an agent makes carries its agent id as a label; whatever a
test did or failed to do, teardown kills the agents it started and removes
every container with one of their ids.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from faults.rig import AgentFactory, Rig, RigFactory, ssh_keypair
from support.docker_api import remove_containers_of


@pytest.fixture
def rigs(agent_factory: AgentFactory) -> Iterator[RigFactory]:
    made: list[Rig] = []

    def make(env: dict[str, str] | None = None, state_dir: Path | None = None) -> Rig:
        rig = Rig.start(agent_factory, env or {}, state_dir)
        made.append(rig)
        return rig

    yield make
    for rig in made:
        rig.close()
    for rig in made:
        remove_containers_of(rig.owner)


@pytest.fixture
def ssh_key(tmp_path: Path) -> tuple[Path, str]:
    """A fresh ed25519 key pair: (private key file, public key line)."""
    directory = tmp_path / "ssh"
    directory.mkdir()
    return ssh_keypair(directory)
