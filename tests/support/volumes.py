"""An agent under test with volumes: its v1 API, its instances' shells, and the cleanup.

`VolumeAgent` wraps the real agent process with the calls the volume tests
make; `unmount_under` takes down every mount a test's state directory still
holds (loop images the agent mounted), so no test leaves a mount or a loop
device behind, also on failure.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from support.agent_proc import AgentProcess
from support.docker_api import Api, agent_id, docker, remove_containers_of

AgentFactory = Callable[..., AgentProcess]
BUSYBOX = {"image": "qudata-test/busybox", "image_tag": "1"}
ENV = {"QUDATA_MAX_INSTANCES": "3", "QUDATA_SYNC_INTERVAL": "1", "QUDATA_RESERVED_CPU_CORES": "0"}


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below `path`, deepest first."""
    root = os.path.realpath(path)
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point == root or point.startswith(root + "/"):
                points.append(point)
    return sorted(points, key=len, reverse=True)


def unmount_under(path: Path) -> None:
    for point in mounts_under(path):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)


class VolumeAgent:
    def __init__(self, factory: AgentFactory, env: dict[str, str] | None = None) -> None:
        self.factory = factory
        self.env = {**ENV, **(env or {})}
        self.agent = factory(self.env).start()
        self.api = Api(self.agent)
        self.owner = agent_id(self.agent.state_dir)

    @property
    def state_dir(self) -> Path:
        return self.agent.state_dir

    def kill9_and_start(self) -> None:
        if self.agent.proc is not None and self.agent.proc.poll() is None:
            self.agent.stop(signal.SIGKILL)
        self.api.client.close()
        self.agent = self.factory(
            self.env, state_dir=self.agent.state_dir, port=self.agent.port
        ).start()
        self.api = Api(self.agent)

    def stop(self) -> None:
        self.api.client.close()
        if self.agent.proc is not None and self.agent.proc.poll() is None:
            self.agent.stop(signal.SIGKILL)

    # -- volumes -------------------------------------------------------------------

    def new_volume(self, size_gb: float, source: str | None = None) -> dict[str, Any]:
        resp = self.api.client.post("/v1/volumes", json={"size_gb": size_gb, "from": source})
        assert resp.status_code == 201, resp.text
        return resp.json()["data"]  # type: ignore[no-any-return]

    def volume(self, volume_id: str) -> dict[str, Any]:
        resp = self.api.client.get(f"/v1/volumes/{volume_id}")
        assert resp.status_code == 200, resp.text
        return resp.json()["data"]  # type: ignore[no-any-return]

    # -- instances ----------------------------------------------------------------

    def create(self, volumes: dict[str, str], **body: Any) -> Any:
        return self.api.client.post("/v1/instances", json={**BUSYBOX, **body, "volumes": volumes})

    def run_with(self, volumes: dict[str, str]) -> dict[str, Any]:
        """A running instance with these volumes."""
        resp = self.create(volumes)
        assert resp.status_code == 202, resp.text
        return self.wait(resp.json()["data"]["instance_id"], "running")

    def state(self, instance_id: str) -> dict[str, Any]:
        resp = self.api.client.get(f"/v1/instances/{instance_id}")
        assert resp.status_code == 200, resp.text
        return resp.json()["data"]  # type: ignore[no-any-return]

    def wait(self, instance_id: str, *statuses: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        state = self.state(instance_id)
        while state["status"] not in statuses:
            assert time.monotonic() < deadline, f"not {statuses} in {timeout}s: {state}"
            time.sleep(0.1)
            state = self.state(instance_id)
        return state

    def delete(self, instance_id: str) -> None:
        resp = self.api.client.delete(f"/v1/instances/{instance_id}")
        assert resp.status_code == 200, resp.text

    def instances(self) -> list[dict[str, Any]]:
        return self.api.client.get("/v1/instances").json()["data"]["instances"]  # type: ignore[no-any-return]


def shell(state: dict[str, Any], script: str) -> str:
    """Runs `sh -c script` in the instance's container; its output (stdout and stderr)."""
    return docker("exec", state["container_id"], "sh", "-c", f"{script} 2>&1; echo rc=$?")


@contextlib.contextmanager
def volume_agent(factory: AgentFactory, env: dict[str, str] | None = None) -> Iterator[VolumeAgent]:
    """A started agent; at the end: it killed, its containers removed, its mounts taken down."""
    made = VolumeAgent(factory, env)
    try:
        yield made
    finally:
        made.stop()
        remove_containers_of(made.owner)
        unmount_under(made.state_dir)
