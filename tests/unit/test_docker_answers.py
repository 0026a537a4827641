"""The agent reads Docker 20.10's and Docker 26's answers the same way.

The samples are real answers of both engines to the calls the agent makes
(`scripts/capture-docker-answers.sh`: Debian 12's docker.io 20.10, API 1.41,
on cgroup v1; Debian 13's docker.io 26, API 1.45, on cgroup v2): one
labelled container on a user-defined bridge with a published port and an
on-failure policy, stopped and started once. Each test names the difference
between the two engines that it guards.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from qudata_agent.adapters.docker import answers

SAMPLES = Path(__file__).parent / "samples" / "docker"
ENGINES = ("20.10", "26")


def _load(engine: str, name: str) -> Any:
    return json.loads((SAMPLES / engine / name).read_text())


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_both_engines_are_captured() -> None:
    versions = {e: (SAMPLES / e / "api_version").read_text().strip() for e in ENGINES}
    assert versions == {"20.10": "1.41", "26": "1.45"}


def test_container_state_from_inspect(engine: str) -> None:
    """26 drops HostConfig.KernelMemory/KernelMemoryTCP (the agent sets neither),
    and NetworkSettings' top-level IPAddress/Gateway/MacAddress are deprecated
    (still sent at 1.45, gone later): the address is read from
    NetworkSettings.Networks, which both engines fill, so an answer without the
    old fields reads the same (checked by dropping them)."""
    attrs = _load(engine, "container_inspect.json")
    assert ("KernelMemory" in attrs["HostConfig"]) == (engine == "20.10")
    state = answers.container_state(attrs)
    assert state.status == "running" and state.exit_code is None
    assert state.instance_id == "capture" and state.agent_id == "capture"
    assert state.restart_policy == "on-failure" and state.max_retries == 2
    assert state.started_ts is not None and state.created_ts is not None
    assert state.started_ts >= state.created_ts
    assert state.finished_at is not None  # stopped once, then started again
    assert list(state.ports) == ["8080/tcp"] and state.ports["8080/tcp"] > 1024
    assert state.address is not None and state.address.count(".") == 3
    assert state.pid is not None and state.pid > 0
    settings = attrs["NetworkSettings"]
    newer = {k: v for k, v in settings.items() if k not in ("IPAddress", "Gateway", "MacAddress")}
    assert answers.container_state({**attrs, "NetworkSettings": newer}) == state


def test_container_list_carries_the_writable_layer_size(engine: str) -> None:
    """`size=1` answers SizeRw on both (0 may be left out: read as 0)."""
    (summary,) = _load(engine, "container_list.json")
    assert int(summary.get("SizeRw") or 0) >= 0
    assert summary["Labels"]["qudata.instance_id"] == "capture"
    assert summary["ImageID"].startswith("sha256:")


def test_image_inspect(engine: str) -> None:
    """26 has no `ContainerConfig`, `Container` or `VirtualSize` (removed in API
    1.44/1.45): the agent reads `Config`, `Size`, `RepoTags` and `RepoDigests` only."""
    attrs = _load(engine, "image_inspect.json")
    gone = {"VirtualSize", "ContainerConfig", "Container"}
    assert (gone & set(attrs)) == (gone if engine == "20.10" else set())
    image = answers.local_image(attrs)
    assert image.image_id.startswith("sha256:") and image.size > 0
    assert "qudata-test/busybox:1" in image.tags
    config = answers.image_config(attrs)
    assert config.architecture == "amd64" and config.os == "linux"


def test_network_inspect(engine: str) -> None:
    attrs = _load(engine, "network_inspect.json")
    info = answers.network_info("capture", attrs)
    assert info.driver == "bridge" and not info.internal and not info.ipv6
    assert info.options["com.docker.network.bridge.enable_icc"] == "false"
    assert info.options["com.docker.network.bridge.name"] == "qdcap0"
    assert info.containers == 1


def test_events(engine: str) -> None:
    """Both still send the deprecated top-level `status`/`id`/`from` beside
    `Action`/`Actor` (newer engines drop them): the agent reads `Action` and
    `Actor.ID` first, so an answer without the old fields reads the same."""
    events = _load(engine, "events.json")
    seen = [answers.container_event(e) for e in events]
    actions = [a for a, _ in filter(None, seen)]
    assert actions[:2] == ["create", "start"] and actions[-1] == "start"
    assert "die" in actions and "stop" in actions
    stripped = [{k: v for k, v in e.items() if k not in ("status", "id", "from")} for e in events]
    assert [answers.container_event(e) for e in stripped] == seen
    assert (
        answers.container_event({"Type": "network", "Action": "connect", "Actor": {"ID": "x"}})
        is None
    )


def test_info(engine: str) -> None:
    info = _load(engine, "info.json")
    storage = answers.storage_info(info)
    assert storage.driver == "overlay2" and storage.data_root == "/var/lib/docker"
    assert storage.backing_filesystem == "extfs"
    assert info["CgroupVersion"] == ("1" if engine == "20.10" else "2")
    assert "runc" in info["Runtimes"]
