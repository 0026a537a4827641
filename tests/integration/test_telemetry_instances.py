"""Telemetry of several instances on the real Docker engine: each figure of its own limits.

Containers are made through the agent's Docker adapter from specs (so a
cpuset in a spec is seen to reach Docker), labelled with an agent id of this
test's own, and removed by the fixture, also on failure.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from qudata_agent.adapters.cgroups import CgroupReader
from qudata_agent.adapters.docker import DockerEngine
from qudata_agent.adapters.docker.ports import DockerPorts
from qudata_agent.adapters.host import HostCounters, host_memory_bytes
from qudata_agent.blocking import Blocking
from qudata_agent.domain.container_spec import ContainerSpec
from qudata_agent.domain.instance import Instance, Status, Wanted
from qudata_agent.domain.inventory import GpuSample
from qudata_agent.services.telemetry import HostSize, Telemetry

BUSYBOX = "qudata-test/busybox:1"
MIB = 1024**2
BUSY = "while :; do :; done"

pytestmark = pytest.mark.docker


@pytest.fixture
def engine() -> Iterator[tuple[DockerEngine, str]]:
    owner = f"test-telemetry-{uuid.uuid4().hex[:12]}"
    made = DockerEngine()
    try:
        yield made, owner
    finally:
        ids = subprocess.run(
            ["docker", "ps", "-aq", "--filter", f"label=qudata.agent_id={owner}"],
            capture_output=True, text=True, check=False,
        ).stdout.split()  # fmt: skip
        if ids:
            subprocess.run(["docker", "rm", "-f", "-v", *ids], capture_output=True, check=False)
        made.close()


def _start(engine: DockerEngine, owner: str, n: int, command: str, **limits: Any) -> Instance:
    spec = ContainerSpec(
        instance_id=f"inst-{n}-{uuid.uuid4().hex[:8]}", agent_id=owner, image=BUSYBOX,
        command=("sh", "-c", command), **limits,
    )  # fmt: skip
    container_id = engine.create(spec)
    engine.start(container_id)
    state = engine.inspect(container_id)
    return Instance(
        id=spec.instance_id, status=Status.RUNNING, wanted=Wanted.RUNNING, image=BUSYBOX,
        container_name=spec.name, container_id=container_id, created_at=float(n),
        spec=spec, started_at=state.started_at,
    )  # fmt: skip


async def _no_gpus(_: tuple[str, ...]) -> tuple[GpuSample, ...]:
    return ()


async def _host_gpus() -> tuple[str, ...]:
    return ()


async def test_each_instance_is_measured_against_its_own_limits(
    engine: tuple[DockerEngine, str],
) -> None:
    docker, owner = engine
    last_cpu = max(os.sched_getaffinity(0))
    instances = [
        _start(docker, owner, 1, BUSY, nano_cpus=int(0.3e9), memory_bytes=64 * MIB),
        _start(docker, owner, 2, BUSY, cpuset_cpus=str(last_cpu), memory_bytes=256 * MIB),
        # 24 MiB in /dev/shm (tmpfs counts as the cgroup's memory) of a 48 MiB limit.
        _start(
            docker,
            owner,
            3,
            "dd if=/dev/zero of=/dev/shm/fill bs=1M count=24; sleep 600",
            memory_bytes=48 * MIB,
            shm_bytes=32 * MIB,
        ),
    ]
    assert docker.inspect(instances[1].container_id or "").running
    cpuset = subprocess.run(
        ["docker", "inspect", "-f", "{{.HostConfig.CpusetCpus}}", instances[1].container_id or ""],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert cpuset == str(last_cpu)  # the spec's cpuset reached Docker
    paused = Instance(
        id="inst-paused",
        status=Status.PAUSED,
        wanted=Wanted.STOPPED,
        image=BUSYBOX,
        container_name="qudata-inst-paused",
        created_at=9.0,
    )

    async def listed() -> list[Instance]:
        return [*instances, paused]

    reader = CgroupReader()  # an independent look at the same counters, for the expectation

    def used_ns() -> dict[str, tuple[float, int]]:
        out = {}
        for i in instances:
            cid = i.container_id or ""
            sample = reader.sample(cid, docker.inspect(cid).pid or 0)
            out[i.id] = (sample.at, sample.cpu_usage_ns)
        return out

    blocking = Blocking()
    try:
        telemetry = Telemetry(
            instances=listed, engine=DockerPorts(docker, blocking), cgroups=CgroupReader(),
            host=HostCounters(),
            gpu_samples=_no_gpus, host_gpus=_host_gpus,
            size=HostSize(cpus=os.cpu_count() or 1, memory_bytes=host_memory_bytes()),
            blocking=blocking, max_instances=4,
        )  # fmt: skip
        before = used_ns()
        await telemetry.sample()
        await asyncio.sleep(3.0)
        payload = await telemetry.sample()
        after = used_ns()
    finally:
        blocking.close()

    def expected(instance: Instance, given_cores: float) -> float:
        (t0, ns0), (t1, ns1) = before[instance.id], after[instance.id]
        return (ns1 - ns0) / ((t1 - t0) * 1e9 * given_cores) * 100

    assert payload["status"] == "running"
    by_id = {e["instance_id"]: e for e in payload["instances"]}
    limited, pinned, filled = (by_id[i.id] for i in instances)
    # Each CPU figure is of what that instance was given: 0.3 core, its one pinned CPU (not
    # the host's CPUs), the host's CPUs. Busy loops get less than that on a busy host, so the
    # figures are checked against the counters themselves (within what a few ms shift).
    host_cpus = float(os.cpu_count() or 1)
    for figures, inst, given in ((limited, instances[0], 0.3), (pinned, instances[1], 1.0),
                                 (filled, instances[2], host_cpus)):  # fmt: skip
        assert abs(figures["cpu_util"] - min(100.0, expected(inst, given))) <= 8, figures
    assert limited["cpu_util"] > 10 and pinned["cpu_util"] > 10
    assert filled["cpu_util"] < 20, filled
    assert 45 <= filled["ram_util"] <= 70, filled  # ~24 MiB of 48
    assert limited["ram_util"] < 20 and pinned["ram_util"] < 5
    assert by_id["inst-paused"]["status"] == "paused" and by_id["inst-paused"]["cpu_util"] == 0
    assert all(e["gpu_temp"] is None and e["gpu_util"] == 0 for e in by_id.values())
