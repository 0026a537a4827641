"""Adopting an existing network of the agent's name: checked, made again, or refused.

Against the real dockerd: a network of that name with traffic between
containers on is made again when nothing uses it, and refused (with the fix)
when a container is attached; a correct one is adopted as it is. The pure
check is tested beside it.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator

import pytest

from qudata_agent.adapters.docker import DockerEngine
from qudata_agent.adapters.docker.ports import DockerPorts
from qudata_agent.blocking import Blocking
from qudata_agent.domain.network import OPT_BRIDGE, OPT_ICC, NetworkInfo, problems
from qudata_agent.errors import Unavailable
from qudata_agent.services.network import NetworkGuard

pytestmark = pytest.mark.docker


def _docker(*args: str) -> str:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=True).stdout


def test_problems_name_every_difference() -> None:
    good = NetworkInfo("n", "id", "bridge", {OPT_BRIDGE: "qd0", OPT_ICC: "false"})
    assert problems(good, "qd0") == []
    bad = NetworkInfo("n", "id", "macvlan", {OPT_BRIDGE: "br9"}, ipv6=True)
    found = " ".join(problems(bad, "qd0"))
    for words in ("macvlan", "br9", "between containers", "IPv6"):
        assert words in found


@pytest.fixture
def names() -> Iterator[tuple[str, str]]:
    tag = uuid.uuid4().hex[:6]
    name, bridge = f"qudata-adopt-{tag}", f"qdad{tag}"
    yield name, bridge
    subprocess.run(["docker", "rm", "-f", f"{name}-c"], capture_output=True, check=False)
    subprocess.run(["docker", "network", "rm", name], capture_output=True, check=False)


async def _prepare(name: str, bridge: str) -> None:
    engine, blocking = DockerEngine(), Blocking()
    try:
        networks = DockerPorts(engine, blocking)
        guard = NetworkGuard(networks, None, blocking, name=name, bridge=bridge, agent_id="a")
        await guard.prepare()
    finally:
        engine.close()
        blocking.close()


def _options(name: str) -> str:
    return _docker("network", "inspect", name, "--format", "{{json .Options}} {{.EnableIPv6}}")


async def test_a_wrong_unused_network_is_made_again_and_a_used_one_refused(
    names: tuple[str, str],
) -> None:
    name, bridge = names
    _docker("network", "create", "-o", f"{OPT_BRIDGE}={bridge}", name)  # ICC on
    await _prepare(name, bridge)
    assert f'"{OPT_ICC}":"false"' in _options(name)

    _docker("network", "rm", name)
    _docker("network", "create", "-o", f"{OPT_BRIDGE}={bridge}", name)
    _docker(
        "run",
        "-d",
        "--name",
        f"{name}-c",
        "--network",
        name,
        "qudata-test/busybox:1",
        "sleep",
        "60",
    )
    with pytest.raises(Unavailable, match="between containers") as refused:
        await _prepare(name, bridge)
    assert "docker network rm" in refused.value.message
    assert f'"{OPT_ICC}":"false"' not in _options(name)  # left alone: it is in use


async def test_a_correct_network_is_adopted_as_it_is(names: tuple[str, str]) -> None:
    name, bridge = names
    await _prepare(name, bridge)
    first = _docker("network", "inspect", name, "--format", "{{.Id}}")
    await _prepare(name, bridge)
    assert _docker("network", "inspect", name, "--format", "{{.Id}}") == first
    assert _options(name).endswith("false\n")  # no IPv6
