"""Volumes through the real agent process and dockerd (CONTRACT.md section 7).

Volumes here are loop-mounted ext4 images (this machine's state directory is
on ext4): a renter's file outlives the instance and the agent's kill -9, a
write past the size fails inside with "No space left on device" while the
host's disk drops by no more than the size, a volume serves one instance at
a time and is not deleted while held, a copy carries the data, bad mount
paths change nothing, and a damaged volume is `error`, never an empty
directory. Sizes are small (a write of tens of MB past a 0.05 GiB volume).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from support.agent_proc import AgentProcess
from support.docker_api import containers, docker, inspect
from support.volumes import mounts_under, shell, volume_agent

AgentFactory = Callable[..., AgentProcess]
GIB = 1024**3


def test_a_file_outlives_its_instance_and_the_agents_kill9(agent_factory: AgentFactory) -> None:
    with volume_agent(agent_factory) as rig:
        vol = rig.new_volume(0.05)
        assert vol["status"] == "ready" and vol["instance_id"] is None
        assert vol["mechanism"] == "loop-ext4"
        first = rig.run_with({vol["volume_id"]: "/workspace"})
        assert "rc=0" in shell(first, "echo kept > /workspace/note && sync")
        mount = next(
            m for m in inspect(first["container_id"])["Mounts"] if m["Destination"] == "/workspace"
        )
        assert mount["RW"] is True
        assert mount["Source"].startswith(str(rig.state_dir / "volumes" / vol["volume_id"]))
        held = rig.volume(vol["volume_id"])
        assert held["status"] == "in_use" and held["instance_id"] == first["instance_id"]

        rig.kill9_and_start()
        assert rig.volume(vol["volume_id"])["status"] == "in_use"
        assert "kept" in shell(first, "cat /workspace/note")

        rig.delete(first["instance_id"])
        assert rig.volume(vol["volume_id"])["status"] == "ready"
        second = rig.run_with({vol["volume_id"]: "/data/other"})
        assert "kept" in shell(second, "cat /data/other/note")


def test_after_a_reboot_the_volume_is_mounted_before_its_instance_starts(
    agent_factory: AgentFactory,
) -> None:
    """What a reboot leaves: the agent gone, the container stopped, the volume unmounted.
    The agent mounts the volume again, then starts the instance on it, data intact."""
    with volume_agent(agent_factory) as rig:
        vol = rig.new_volume(0.05)
        state = rig.run_with({vol["volume_id"]: "/workspace"})
        shell(state, "echo survived > /workspace/f && sync")
        rig.agent.stop(signal.SIGKILL)
        docker("stop", "-t", "1", state["container_id"])
        mnt = rig.state_dir / "volumes" / vol["volume_id"] / "mnt"
        subprocess.run(["umount", str(mnt)], check=True)
        # Docker alone cannot bring it back on an empty directory: the bind source is gone.
        refused = subprocess.run(
            ["docker", "start", state["container_id"]], capture_output=True, text=True
        )
        assert refused.returncode != 0 and "data" in refused.stderr, refused.stderr
        rig.kill9_and_start()
        # The record still says running from before: Docker tells when it runs again.
        deadline = time.monotonic() + 60
        while not inspect(state["container_id"])["State"]["Running"]:
            assert time.monotonic() < deadline, "the instance was not started again"
            time.sleep(0.2)
        after = rig.wait(state["instance_id"], "running")
        assert after["container_id"] == state["container_id"]
        assert "survived" in shell(after, "cat /workspace/f")
        assert rig.volume(vol["volume_id"])["status"] == "in_use"


def test_a_write_past_the_size_fails_inside_and_fills_nothing_outside(
    agent_factory: AgentFactory,
) -> None:
    with volume_agent(agent_factory) as rig:
        vol = rig.new_volume(0.05)  # 51 MiB
        state = rig.run_with({vol["volume_id"]: "/workspace"})
        before = shutil.disk_usage(rig.state_dir).free
        out = shell(state, "dd if=/dev/zero of=/workspace/fill bs=1M count=90 conv=fsync")
        after = shutil.disk_usage(rig.state_dir).free
        assert "No space left on device" in out and "rc=0" not in out, out
        assert before - after <= 0.05 * GIB + 4 * 1024**2, (before, after)
        # The container's own layer still takes writes: only the volume is full.
        assert "rc=0" in shell(state, "echo fine > /root-layer-file")
        assert rig.volume(vol["volume_id"])["used_gb"] >= 0.04


def test_a_volume_serves_one_instance_and_is_kept_while_held(agent_factory: AgentFactory) -> None:
    with volume_agent(agent_factory) as rig:
        vol = rig.new_volume(0.05)
        vid = vol["volume_id"]
        first = rig.run_with({vid: "/workspace"})
        count = len(containers(rig.owner))

        busy = rig.create({vid: "/workspace"})
        assert busy.status_code == 409, busy.text
        assert "in use by instance" in busy.json()["error"]
        unknown = rig.create({"00000000-0000-4000-8000-000000000000": "/workspace"})
        assert unknown.status_code == 404, unknown.text
        assert len(rig.instances()) == 1 and len(containers(rig.owner)) == count

        refused = rig.api.client.delete(f"/v1/volumes/{vid}")
        assert refused.status_code == 409, refused.text
        assert first["instance_id"] in refused.json()["error"]
        assert rig.volume(vid)["status"] == "in_use"

        rig.delete(first["instance_id"])
        assert rig.api.client.delete(f"/v1/volumes/{vid}").status_code == 200
        assert rig.api.client.get(f"/v1/volumes/{vid}").status_code == 404
        assert not (rig.state_dir / "volumes" / vid).exists()
        assert mounts_under(rig.state_dir / "volumes") == []


def test_a_copy_carries_the_data_while_the_source_is_in_use(agent_factory: AgentFactory) -> None:
    with volume_agent(agent_factory) as rig:
        source = rig.new_volume(0.05)
        writer = rig.run_with({source["volume_id"]: "/workspace"})
        shell(writer, "mkdir -p /workspace/d && echo copied > /workspace/d/f && sync")
        copy = rig.new_volume(0.05, source=source["volume_id"])
        assert copy["volume_id"] != source["volume_id"] and copy["status"] == "ready"
        reader = rig.run_with({copy["volume_id"]: "/in"})
        assert "copied" in shell(reader, "cat /in/d/f")
        # Two volumes, not one: a write to the copy does not reach the source.
        shell(reader, "echo changed > /in/d/f")
        assert "copied" in shell(writer, "cat /workspace/d/f")
        host = rig.api.client.get("/v1/host").json()["data"]
        assert host["volumes"]["count"] == 2 and host["volumes"]["disk_gb"] == pytest.approx(0.1)
        metrics = rig.api.client.get("/metrics").text
        assert f'qudata_volume_size_bytes{{volume="{copy["volume_id"]}"}}' in metrics
        assert f'qudata_volume_used_bytes{{volume="{source["volume_id"]}"}}' in metrics
        # doctor, on the same state directory: the mechanism and what the volumes hold.
        doctor = subprocess.run(
            [sys.executable, "-m", "qudata_agent", "doctor", "--json"],
            env={**rig.agent.env},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        checks = {c["name"]: c for c in json.loads(doctor.stdout)["checks"]}
        assert checks["volumes"]["level"] == "pass", checks["volumes"]
        assert checks["volumes"]["detail"].startswith("loop-ext4 (ext4")
        assert "2 volume(s): 0.1 GiB given" in checks["volumes"]["detail"]


BAD_PATHS = ("relative/dir", "/", "/proc/x", "/sys", "/dev/shm/v", "/.qudata/ssh", "/a/../proc", "")


def test_bad_mount_paths_are_400_and_create_nothing(agent_factory: AgentFactory) -> None:
    with volume_agent(agent_factory) as rig:
        vol = rig.new_volume(0.05)
        for path in BAD_PATHS:
            resp = rig.create({vol["volume_id"]: path})
            assert resp.status_code == 400, (path, resp.text)
            assert "mount path" in resp.json()["error"], path
        assert rig.instances() == [] and containers(rig.owner) == []
        assert rig.volume(vol["volume_id"])["status"] == "ready"


def test_a_damaged_volume_is_error_and_never_an_empty_directory(
    agent_factory: AgentFactory,
) -> None:
    """The image file gone while the agent is away (as after a reboot): `error` with the
    reason, and an instance ordered with it is refused; nothing starts on an empty mount."""
    with volume_agent(agent_factory) as rig:
        vol = rig.new_volume(0.05)
        vid = vol["volume_id"]
        rig.agent.stop()
        mnt = rig.state_dir / "volumes" / vid / "mnt"
        subprocess.run(["umount", str(mnt)], check=True)
        os.remove(rig.state_dir / "volumes" / vid / "image.ext4")
        rig.kill9_and_start()
        # The agent answers while its restore runs: the verdict comes with the restore.
        deadline = time.monotonic() + 30
        while (damaged := rig.volume(vid))["status"] != "error":
            assert time.monotonic() < deadline, damaged
            time.sleep(0.2)
        assert "image file" in damaged["reason"], damaged
        resp = rig.create({vid: "/workspace"})
        assert resp.status_code == 409 and "damaged" in resp.json()["error"], resp.text
        assert rig.instances() == [] and containers(rig.owner) == []
        assert not Path(mnt, "data").exists()
        assert rig.api.client.delete(f"/v1/volumes/{vid}").status_code == 200
