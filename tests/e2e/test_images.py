"""Images through the real agent process, a real registry and the real dockerd.

A private image is created with the right, wrong and no credentials (cached
and not), and its password is then looked for in every log line, in the
state directory (the database and its WAL) and in `docker inspect`; the
pre-pull list is pulled at start; the image GC removes an image once its
instance is deleted (counted in /metrics) and keeps the pre-pull one, also on
a small btrfs data root (a second dockerd) whose free space a filler file
makes really short; a cached public image runs while its registry is down.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from support.agent_proc import AgentProcess
from support.btrfs_docker import BtrfsDocker
from support.docker_api import Api, agent_id, docker, remove_containers_of
from support.registry import Registry

pytestmark = pytest.mark.docker

AgentFactory = Callable[..., AgentProcess]
GIB = 1024**3


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
    agent = agent_factory({"QUDATA_SYNC_INTERVAL": "1", **registry.allow_env}).start()
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
            **open_registry.allow_env,
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
        # Counted once the removal is done (the tag goes first, then the image and record).
        counted = 'qudata_image_removals_total{reason="cache_size"} 1.0'
        _wait_for(lambda: counted in api.client.get("/metrics").text, timeout=10)
        removed = [r for r in agent.log_records() if r.get("msg") == "cached image removed"]
        assert [r["refs"] for r in removed] == [[used]]
    finally:
        api.client.close()
        agent.stop(signal.SIGTERM)
        remove_containers_of(owner)


def test_a_cached_public_image_runs_while_its_registry_is_down_and_says_so(
    agent_factory: AgentFactory, open_registry: Registry
) -> None:
    ref, digest = open_registry.push_new(f"team/public-{uuid.uuid4().hex[:8]}")
    agent = agent_factory(open_registry.allow_env).start()
    owner = agent_id(agent.state_dir)
    api = Api(agent)
    try:
        assert api.create(**_split(ref)).status_code == 202
        first = api.wait("running")
        assert first["image_check"] == {"digest": digest, "checked": True, "note": None}
        assert api.delete().status_code == 200
        open_registry.pause()
        try:
            assert api.create(**_split(ref)).status_code == 202
            cached = api.wait("running")
        finally:
            open_registry.resume()
        check = cached["image_check"]
        assert check["checked"] is False and check["digest"] == digest
        assert "registry not reachable" in check["note"]
    finally:
        api.client.close()
        agent.stop(signal.SIGTERM)
        remove_containers_of(owner)


def test_gc_on_a_small_data_root_removes_only_while_space_is_short(
    agent_factory: AgentFactory, open_registry: Registry
) -> None:
    """A second dockerd on a 6 GB btrfs file: a filler file makes its free space really short."""
    warm, _ = open_registry.push_new(f"team/warm-{uuid.uuid4().hex[:8]}")
    first, _ = open_registry.push_new(f"team/first-{uuid.uuid4().hex[:8]}")
    second, _ = open_registry.push_new(f"team/second-{uuid.uuid4().hex[:8]}")
    with BtrfsDocker.running() as btrfs:
        agent = agent_factory(
            {
                "DOCKER_HOST": btrfs.host,
                "QUDATA_NETWORK": "qudata-gc-test",
                "QUDATA_BRIDGE": btrfs.network_bridge,
                "QUDATA_FIREWALL": "off",
                "QUDATA_IMAGE_GC_FREE_GB": "1",
                "QUDATA_IMAGE_GC_INTERVAL": "3600",  # the start and the pokes only
                "QUDATA_PREPULL": warm,
                **open_registry.allow_env,
            }
        ).start()
        api = Api(agent)

        def here(ref: str) -> bool:
            return bool(btrfs.docker("images", "-q", ref).strip())

        def passes() -> int:
            return sum(1 for r in agent.log_records() if r.get("msg") == "image GC pass")

        try:
            _wait_for(lambda: here(warm), timeout=60)
            # Plenty of space: an unused image stays.
            assert api.create(**_split(first)).status_code == 202
            api.wait("running")
            before = passes()
            assert api.delete().status_code == 200
            _wait_for(lambda: passes() > before)
            assert here(first)

            # Short of space: unused images go, the one in use and the pre-pull stay.
            free = shutil.disk_usage(btrfs.data_root).free
            with open(btrfs.work / "mnt" / "filler", "wb") as filler:
                os.posix_fallocate(filler.fileno(), 0, free - GIB // 2)
                os.fsync(filler.fileno())
            # btrfs counts the space once its transaction commits
            subprocess.run(["btrfs", "filesystem", "sync", str(btrfs.work / "mnt")], check=True)
            _wait_for(lambda: shutil.disk_usage(btrfs.data_root).free < GIB)
            assert api.create(**_split(second)).status_code == 202
            api.wait("running")
            _wait_for(lambda: not here(first))
            assert here(second) and here(warm)
            assert api.delete().status_code == 200
            _wait_for(lambda: not here(second))
            assert here(warm)
            counted = 'qudata_image_removals_total{reason="free_space"} 2.0'
            # counted right after Docker's removal returns: a scrape may come between
            _wait_for(lambda: counted in api.client.get("/metrics").text, timeout=10)
        finally:
            api.client.close()
            agent.stop(signal.SIGTERM)
