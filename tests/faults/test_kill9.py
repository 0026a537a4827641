"""kill -9 of the agent at each step of a create, then a start on the same state and port.

After each: exactly one instance, the ports of the first answer everywhere
(answer, database, Docker), no GPU, one labelled container, and a real
OpenSSH login with the key given before the kill.
"""

from __future__ import annotations

import select
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from faults.registry import Image, StallingRegistry
from faults.rig import DEBIAN, DEBIAN_SSH, Rig, RigFactory, ssh_until
from support.docker_api import docker, inspect

ENV = {"QUDATA_SYNC_INTERVAL": "2"}


@pytest.fixture(scope="module")
def registry() -> Iterator[StallingRegistry]:
    served = StallingRegistry(Image.export("qudata-test/debian-ssh:12")).start()
    yield served
    served.stop()
    docker("rmi", "-f", served.image.id, check=False)  # its containers are gone by now


def _create(rig: Rig, public_key: str, **body: Any) -> dict[str, str]:
    resp = rig.api.create(**body, ports={"8080": "auto"}, ssh_enabled=True)
    assert resp.status_code == 202, resp.text
    added = rig.api.client.post("/ssh", json={"ssh_pubkey": public_key})
    assert added.status_code == 200, added.text
    ports: dict[str, str] = resp.json()["data"]["ports"]
    assert set(ports) == {"22", "8080"}
    return ports


def _ssh_works(rig: Rig, key: Path, ports: dict[str, str], timeout: float = 60) -> None:
    state = rig.wait(lambda s: s["ssh"]["status"] == "ready", timeout, "ssh ready")
    assert state["ssh"]["port"] == ports["22"]
    assert ssh_until(key, ports["22"], "echo in-as-$(id -un)").strip() == "in-as-root"


@pytest.mark.timeout(90)
def test_kill9_while_the_image_is_pulled(
    rigs: RigFactory, registry: StallingRegistry, ssh_key: tuple[Path, str]
) -> None:
    ref = f"{registry.host}/fault/debian-ssh"
    rig = rigs({**ENV, "QUDATA_REGISTRY_ALLOW": registry.host})
    try:
        ports = _create(rig, ssh_key[1], image=ref, image_tag="12")
        registry.wait_stalled()
        rig.wait(lambda s: s["phase"] == "pulling", 5, "phase pulling")
        assert rig.containers() == []

        registry.stalled.clear()
        rig.kill9_and_start()
        registry.wait_stalled()  # the new agent's pull reached the registry again
        resumed = rig.wait(lambda s: s["phase"] == "pulling", 10, "pulling again")
        assert resumed["allocated_ports"] == ports
        registry.gate.set()  # the registry answers in full from now on
        rig.wait(lambda s: s["status"] == "running", 60, "running")
        rig.assert_consistent(ports)
        _ssh_works(rig, ssh_key[0], ports)
    finally:
        registry.gate.set()


def _watch_creates(owner: str) -> subprocess.Popen[str]:
    """`docker events` for this agent's container creates, from a second ago on.

    `--since` replays what Docker announced before the CLI was connected, so
    a create racing the start of the watch is not missed.
    """
    return subprocess.Popen(
        ["docker", "events", "--since", f"{time.time() - 1:.3f}", "--format", "{{.ID}}",
         "--filter", "event=create", "--filter", f"label=qudata.agent_id={owner}"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip


def _next_line(events: subprocess.Popen[str], timeout: float) -> str:
    assert events.stdout is not None
    ready, _, _ = select.select([events.stdout], [], [], timeout)
    assert ready, f"no container created within {timeout}s"
    return events.stdout.readline().strip()


@pytest.mark.timeout(60)
def test_kill9_right_after_the_container_is_created(
    rigs: RigFactory, ssh_key: tuple[Path, str], record_property: Any
) -> None:
    rig = rigs(ENV)
    events = _watch_creates(rig.owner)
    try:
        ports = _create(rig, ssh_key[1], **DEBIAN_SSH)
        container_id = _next_line(events, timeout=20)
        rig.kill9()  # as soon as Docker says the container exists
    finally:
        events.kill()
        events.wait()
    at_kill = inspect(container_id)["State"]["Status"]
    (phase,) = rig.query("SELECT json_extract(record, '$.phase') FROM instances")[0]
    record_property("container_at_kill", at_kill)
    record_property("phase_at_kill", phase)
    assert at_kill in ("created", "running")

    rig.kill9_and_start()
    rig.wait(lambda s: s["status"] == "running", 30, "running")
    state = rig.assert_consistent(ports)
    assert state["container_id"] == container_id, "the container was not adopted"
    _ssh_works(rig, ssh_key[0], ports)


@pytest.mark.timeout(300)
def test_kill9_while_ssh_comes_up(rigs: RigFactory, ssh_key: tuple[Path, str]) -> None:
    """The agent's sshd starts with the container (its init); the agent dies while it
    waits for the init's word. After the restart SSH is ready on the same container,
    the key logs in, and nothing was made twice."""
    rig = rigs(ENV)
    ports = _create(rig, ssh_key[1], **DEBIAN)
    state = rig.wait(lambda s: s["status"] == "running", 30, "running")
    rig.kill9()
    rig.kill9_and_start()
    after = rig.wait(
        lambda s: s["status"] == "running" and s["ssh"]["status"] == "ready", 30, "ssh ready"
    )
    assert after["container_id"] == state["container_id"]
    rig.assert_consistent(ports)
    _ssh_works(rig, ssh_key[0], ports, timeout=60)
    rig.assert_consistent(ports)
