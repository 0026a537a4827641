"""Fixtures shared by every suite."""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from support.agent_proc import AgentProcess
from support.fake_cp import FakeControlPlane
from support.registry import Registry

# Tests log at DEBUG (see pyproject) so every log call runs; the HTTP clients'
# own chatter would drown a failure's report.
for _noisy in ("httpcore", "httpx", "urllib3", "docker"):
    logging.getLogger(_noisy).setLevel(logging.WARNING)


@pytest.fixture
def fake_cp() -> Iterator[FakeControlPlane]:
    cp = FakeControlPlane().start()
    yield cp
    cp.stop()


@pytest.fixture
def agent_factory(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    """Makes agent processes; any still running at the end is killed."""
    made: list[AgentProcess] = []

    def make(
        env: dict[str, str] | None = None, state_dir: Path | None = None, port: int | None = None
    ) -> AgentProcess:
        agent = AgentProcess(state_dir or tmp_path / "state", env, port)
        made.append(agent)
        return agent

    yield make
    for agent in made:
        if agent.proc is not None and agent.proc.poll() is None:
            agent.stop(signal.SIGKILL)


@pytest.fixture(scope="session")
def registry() -> Iterator[Registry]:
    """A real registry with htpasswd authentication (its images need credentials)."""
    with Registry.running(private=True) as running:
        yield running


@pytest.fixture(scope="session")
def open_registry() -> Iterator[Registry]:
    """A real registry anyone may pull from (public images)."""
    with Registry.running(private=False) as running:
        yield running
