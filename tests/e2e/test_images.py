"""Images through the real agent process, a real registry and the real dockerd.

A private image is created with the right, wrong and no credentials (cached
and not), and its password is then looked for in every log line, in the
state directory (the database and its WAL) and in `docker inspect`; the
pre-pull list is pulled at start; the image GC removes an image once its
instance is deleted (counted in /metrics) and keeps the pre-pull one.
"""

from __future__ import annotations

import json
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from support.agent_proc import AgentProcess
from support.docker_api import Api, agent_id, docker, remove_containers_of
from support.registry import Registry

pytestmark = pytest.mark.docker

AgentFactory = Callable[..., AgentProcess]


def _split(ref: str) -> dict[str, str]:
    image, _, tag = ref.rpartition(":")
    return {"image": image, "image_tag": tag}


def _present(ref: str) -> bool:
    return bool(docker("images", "-q", ref).strip())


def _wait_for(what: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if what():
            return
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_a_private_image_stays_private_and_its_password_is_nowhere(
    agent_factory: AgentFactory, registry: Registry
) -> None:
    ref, digest = registry.push_new(f"team/private-{uuid.uuid4().hex[:8]}")
    agent = agent_factory({"QUDATA_SYNC_INTERVAL": "1"}).start()
    owner = agent_id(agent.state_dir)
    api = Api(agent)
    inspected = []
    try:
        # not cached: without credentials, and with wrong ones, the pull is refused
        for creds in ({}, registry.credentials("wrong-password")):
            assert api.create(**_split(ref), **creds).status_code == 202
            failed = api.wait("error")
            assert ref in failed["reason"], failed
            assert api.delete().status_code == 200
        assert not _present(ref)

        assert api.create(**_split(ref), **registry.credentials()).status_code == 202
        running = api.wait("running")
        assert running["image_check"] == {"digest": digest, "checked": True, "note": None}
        inspected.append(docker("inspect", running["container_id"]))
        assert api.delete().status_code == 200

        # cached now: the layers are here, yet the order must have the registry's yes
        assert api.create(**_split(ref)).status_code == 202
        refused = api.wait("error")
        assert "private" in refused["reason"], refused
        assert api.delete().status_code == 200
        assert api.create(**_split(ref), **registry.credentials("wrong")).status_code == 202
        refused = api.wait("error")
        assert "refused access" in refused["reason"], refused
        assert api.delete().status_code == 200

        assert api.create(**_split(ref), **registry.credentials()).status_code == 202
        again = api.wait("running")
        assert again["image_check"]["checked"] is True
        inspected.append(docker("inspect", again["container_id"]))
    finally:
        api.client.close()
        agent.stop(signal.SIGTERM)
        remove_containers_of(owner)
    assert registry.password not in agent.log()
    for record in agent.log_records():
        assert registry.password not in json.dumps(record)
    for path in agent.state_dir.rglob("*"):
        if path.is_file():
            assert registry.password.encode() not in path.read_bytes(), path
    for text in inspected:
        assert registry.password not in text
    assert registry.password not in docker("image", "inspect", ref)


def test_prepull_at_start_and_gc_after_a_delete(
    agent_factory: AgentFactory, open_registry: Registry, tmp_path: Path
) -> None:
    warm, _ = open_registry.push_new(f"team/warm-{uuid.uuid4().hex[:8]}")
    used, _ = open_registry.push_new(f"team/used-{uuid.uuid4().hex[:8]}")
    agent = agent_factory(
        {
            "QUDATA_PREPULL": warm,
            # Any cached image is over this cap: the GC removes what it may.
            "QUDATA_IMAGE_CACHE_GB": "0.000001",
            "QUDATA_IMAGE_GC_INTERVAL": "3600",  # only the start and the poke after a delete
        }
    ).start()
    owner = agent_id(agent.state_dir)
    api = Api(agent)
    try:
        _wait_for(lambda: _present(warm))
        _wait_for(lambda: "pre-pull ready" in agent.log())
        assert api.create(**_split(used)).status_code == 202
        api.wait("running")
        assert _present(used)  # in use: kept
        assert api.delete().status_code == 200
        _wait_for(lambda: not _present(used))
        assert _present(warm)  # on the pre-pull list: kept
        metrics = api.client.get("/metrics").text
        assert 'qudata_image_removals_total{reason="cache_size"} 1.0' in metrics
        removed = [r for r in agent.log_records() if r.get("msg") == "cached image removed"]
        assert [r["refs"] for r in removed] == [[used]]
    finally:
        api.client.close()
        agent.stop(signal.SIGTERM)
        remove_containers_of(owner)
