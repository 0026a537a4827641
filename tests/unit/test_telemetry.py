"""The telemetry service over small fakes of its sources: one instance per host, and several."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from qudata_agent.adapters.cgroups import MetricsUnavailable
from qudata_agent.adapters.docker.ports import DockerPorts
from qudata_agent.blocking import Blocking
from qudata_agent.domain.container_spec import ContainerSpec, ContainerState
from qudata_agent.domain.instance import Instance, Status, Wanted
from qudata_agent.domain.inventory import GpuSample
from qudata_agent.domain.netpolicy import NetworkUse
from qudata_agent.domain.usage import CgroupSample
from qudata_agent.errors import NotFound
from qudata_agent.metrics import Metrics
from qudata_agent.services.telemetry import HostSize, Telemetry

GIB = 1024**3
FIELDS = {"gpu_util", "cpu_util", "ram_util", "mem_util", "inet_in", "inet_out", "status",
          "gpu_temp"}  # fmt: skip
ENTRY = FIELDS | {"instance_id"}
SIZE = HostSize(cpus=8, memory_bytes=64 * GIB)


@dataclass
class HostSample:
    at: float
    cpu_percent: float = 12.5
    ram_percent: float = 40.0
    net_rx_bytes: int = 0
    net_tx_bytes: int = 0


@dataclass
class FakeHost:
    t: float = 0.0

    def sample(self) -> HostSample:
        self.t += 3.0
        return HostSample(at=self.t, net_rx_bytes=int(self.t * 100))


@dataclass
class FakeCgroups:
    """Each container used `cores[cid]` CPUs and `memory[cid]` bytes; 3 s between ticks."""

    cores: dict[str, float] = field(default_factory=dict)
    memory: dict[str, int] = field(default_factory=dict)
    broken: set[str] = field(default_factory=set)
    ticks: dict[str, int] = field(default_factory=dict)
    threads: list[set[str]] = field(default_factory=list)

    def sample(self, container_id: str, pid: int) -> CgroupSample:
        self.threads[-1].add(threading.current_thread().name)
        if container_id in self.broken:
            raise MetricsUnavailable(f"{container_id} is gone")
        n = self.ticks[container_id] = self.ticks.get(container_id, 0) + 1
        cpu_ns = int(n * 3.0 * self.cores.get(container_id, 0.0) * 1e9)
        return CgroupSample(n * 3.0, cpu_ns, self.memory.get(container_id, 0), n * 3000, n * 300)


@dataclass
class FakeEngine:
    inspected: list[str] = field(default_factory=list)

    def inspect(self, container_id: str) -> ContainerState:
        self.inspected.append(container_id)
        if container_id.startswith("gone"):
            raise NotFound(f"no container {container_id}")
        return ContainerState(container_id, "n", None, None, "running", pid=100)


@dataclass
class FakeNvml:
    asked: list[tuple[str, ...]] = field(default_factory=list)

    async def samples(self, uuids: tuple[str, ...]) -> tuple[GpuSample, ...]:
        self.asked.append(uuids)
        return tuple(
            GpuSample(u, 10.0 * (i + 1), (i + 1) * GIB, 80 * GIB, 40.0 + i)
            for i, u in enumerate(sorted(uuids))
        )


def instance(
    n: int,
    status: Status = Status.RUNNING,
    *,
    cpus: float | None = None,
    cpuset: str | None = None,
    memory: int | None = None,
    gpus: tuple[str, ...] = (),
) -> Instance:
    spec = ContainerSpec(
        instance_id=f"i{n}", agent_id="a", image="img", command=("sleep",),
        nano_cpus=None if cpus is None else int(cpus * 1e9), cpuset_cpus=cpuset,
        memory_bytes=memory, gpu_uuids=gpus,
    )  # fmt: skip
    return Instance(
        id=f"i{n}", status=status, wanted=Wanted.RUNNING, image="img", container_name=spec.name,
        gpus=gpus, container_id=f"c{n}", created_at=float(n), spec=spec,
        started_at="run-1",
    )  # fmt: skip


class Rig:
    def __init__(self, blocking: Blocking, max_instances: int, network: Any = None) -> None:
        self.instances: list[Instance] = []
        self.cgroups = FakeCgroups()
        self.engine = FakeEngine()
        self.nvml = FakeNvml()
        self.host_gpus: tuple[str, ...] = ()

        async def listed() -> list[Instance]:
            return list(self.instances)

        async def host_gpus() -> tuple[str, ...]:
            return self.host_gpus

        self.telemetry = Telemetry(
            instances=listed, engine=DockerPorts(self.engine, blocking), cgroups=self.cgroups,
            host=FakeHost(),
            gpu_samples=self.nvml.samples, host_gpus=host_gpus, size=SIZE, blocking=blocking,
            max_instances=max_instances, network=network,
        )  # fmt: skip

    async def tick(self) -> dict[str, Any]:
        self.cgroups.threads.append(set())
        return await self.telemetry.sample()


@pytest.fixture
def blocking() -> Iterator[Blocking]:
    made = Blocking()
    yield made
    made.close()


# -- one instance per host: the payload of CONTRACT.md section 2 ------------------


async def test_one_per_host_without_an_instance_sends_the_hosts_figures(blocking: Blocking) -> None:
    rig = Rig(blocking, max_instances=1)
    rig.host_gpus = ("GPU-a",)
    await rig.tick()
    payload = await rig.tick()
    assert set(payload) == FIELDS
    assert payload["status"] == "destroyed" and payload["cpu_util"] == 12.5
    assert payload["inet_in"] == 100.0  # the host's rate
    assert payload["gpu_util"] == 10.0 and payload["gpu_temp"] == 40.0
    rig.instances = [instance(1, Status.PAUSED)]
    assert (await rig.tick())["status"] == "paused"


async def test_one_per_host_with_a_running_instance_sends_its_figures(blocking: Blocking) -> None:
    rig = Rig(blocking, max_instances=1)
    rig.host_gpus = ("GPU-a", "GPU-b")
    rig.instances = [instance(1, cpus=0.5, memory=GIB, gpus=("GPU-b",))]
    rig.cgroups.cores["c1"] = 0.5
    rig.cgroups.memory["c1"] = GIB // 4
    first = await rig.tick()
    assert first["cpu_util"] == 0  # no previous sample: no rate made up
    payload = await rig.tick()
    assert set(payload) == FIELDS and "instances" not in payload
    assert payload == {"cpu_util": 100.0, "ram_util": 25.0, "inet_in": 1000.0, "inet_out": 100.0,
                       "gpu_util": 10.0, "mem_util": 1.25, "gpu_temp": 40.0,
                       "status": "running"}  # fmt: skip
    assert rig.nvml.asked[-1] == ("GPU-b",)  # only its GPU
    assert rig.telemetry.last_gpus == (GpuSample("GPU-b", 10.0, GIB, 80 * GIB, 40.0),)
    rig.cgroups.broken.add("c1")
    assert await rig.tick() == {
        "cpu_util": 0.0, "ram_util": 0.0, "inet_in": 0.0, "inet_out": 0.0, "gpu_util": 0.0,
        "mem_util": 0.0, "gpu_temp": None, "status": "running",
    }  # fmt: skip


# -- several instances per host -------------------------------------------------------


async def test_several_each_relative_to_its_own_limits(
    blocking: Blocking, caplog: pytest.LogCaptureFixture
) -> None:
    rig = Rig(blocking, max_instances=8)
    rig.host_gpus = ("GPU-a", "GPU-b", "GPU-c")
    rig.instances = [
        instance(1, cpus=0.5, memory=GIB, gpus=("GPU-a",)),
        instance(2, cpus=4, cpuset="2-3", memory=2 * GIB, gpus=("GPU-b", "GPU-c")),
        instance(3),  # no limits: the host's size
        instance(4, Status.PAUSED, cpus=1),
        instance(5, cpus=1),  # its figures cannot be read
        replace(instance(6, cpus=1), container_id="gone6"),  # its container is gone
    ]
    rig.cgroups.cores.update({"c1": 0.25, "c2": 2.0, "c3": 2.0})
    rig.cgroups.memory.update({"c1": GIB // 2, "c2": GIB // 2, "c3": 16 * GIB})
    rig.cgroups.broken.add("c5")
    await rig.tick()
    payload = await rig.tick()
    assert set(payload) == FIELDS | {"instances"}
    assert payload["status"] == "running" and payload["cpu_util"] == 12.5  # the host's
    assert payload["gpu_util"] == 20.0  # the mean over the host's three GPUs
    by_id = {e["instance_id"]: e for e in payload["instances"]}
    assert list(by_id) == ["i1", "i2", "i3", "i4", "i5", "i6"]
    assert all(set(e) == ENTRY for e in by_id.values())
    assert (by_id["i1"]["cpu_util"], by_id["i1"]["ram_util"]) == (50.0, 50.0)
    assert (by_id["i1"]["gpu_util"], by_id["i1"]["gpu_temp"]) == (10.0, 40.0)
    assert by_id["i2"]["cpu_util"] == 100.0  # two CPUs of a cpuset of two, not of a limit of 4
    assert by_id["i2"]["ram_util"] == 25.0
    assert by_id["i2"]["gpu_util"] == 25.0 and by_id["i2"]["gpu_temp"] == 42.0  # its two GPUs
    assert (by_id["i3"]["cpu_util"], by_id["i3"]["ram_util"]) == (25.0, 25.0)  # of the host
    assert by_id["i3"]["gpu_temp"] is None
    for stopped in ("i4", "i5", "i6"):
        assert by_id[stopped]["cpu_util"] == 0 and by_id[stopped]["gpu_temp"] is None
    assert by_id["i4"]["status"] == "paused" and by_id["i5"]["status"] == "running"
    assert all(len(asked) == len(set(asked)) for asked in rig.nvml.asked)
    assert len(rig.nvml.asked) == 2  # one NVML call per tick for every GPU
    assert all(len(threads) == 1 for threads in rig.cgroups.threads)  # one pass, one thread
    assert rig.engine.inspected.count("c1") == 1  # the pid is cached for the run
    warnings = [r for r in caplog.records if r.getMessage().startswith("instance figures")]
    assert len(warnings) == 2  # i5 and i6, once each over two ticks


async def test_several_status_is_running_or_the_newest_ones(blocking: Blocking) -> None:
    rig = Rig(blocking, max_instances=4)
    assert (await rig.tick())["status"] == "destroyed"
    assert (await rig.tick())["instances"] == []
    rig.instances = [instance(2, Status.ERROR), instance(1, Status.PAUSED)]
    assert (await rig.tick())["status"] == "error"  # i2 is the most recent
    rig.instances.append(instance(3, Status.RUNNING))
    assert (await rig.tick())["status"] == "running"


async def test_metrics_label_each_instance(blocking: Blocking) -> None:
    rig = Rig(blocking, max_instances=4)
    rig.instances = [instance(1, cpus=1), instance(2, Status.PAUSED)]
    rig.cgroups.cores["c1"] = 0.5
    await rig.tick()
    await rig.tick()
    metrics = Metrics()
    metrics.follow_stats(rig.telemetry)
    text = metrics.render()[0].decode()
    assert 'qudata_cpu_utilization_ratio{instance_id="i1",subject="instance"} 0.5' in text
    assert 'qudata_cpu_utilization_ratio{instance_id="",subject="host"} 0.125' in text
    assert 'qudata_network_receive_bytes_total{instance_id="i1",subject="instance"}' in text
    assert 'qudata_instance_status{instance_id="i2",status="paused"} 1.0' in text
    assert 'qudata_instance_status{instance_id="",status="running"} 1.0' in text


# -- the network meter's figures (CONTRACT.md section 8) --------------------------


class FakeNetwork:
    def __init__(self) -> None:
        self.refreshed = 0
        self.within: list[float] = []
        self.finals: list[tuple[str, NetworkUse]] = []

    async def refresh(self, within_s: float = 0.0) -> None:
        self.refreshed += 1
        self.within.append(within_s)

    def use(self, instance_id: str) -> NetworkUse | None:
        return NetworkUse(rx_bytes=30, tx_bytes=20, rx_public_bytes=10, tx_public_bytes=5)

    async def take_finals(self) -> list[tuple[str, NetworkUse]]:
        taken, self.finals = self.finals, []
        return taken


NET = {"rx_bytes": 30, "tx_bytes": 20, "rx_public_bytes": 10, "tx_public_bytes": 5}


async def test_each_entry_carries_the_meters_four_and_a_deleted_one_comes_once(
    blocking: Blocking,
) -> None:
    network = FakeNetwork()
    rig = Rig(blocking, max_instances=4, network=network)
    rig.instances = [instance(1)]
    payload = await rig.tick()
    assert network.refreshed == 1  # read fresh for every report (a pass of the last second)
    assert network.within == [1.0]
    await rig.telemetry.sample_on_change()  # a lifecycle change's report: the meter's last pass
    assert network.within == [1.0, 3.0]
    assert {k: payload["instances"][0][k] for k in NET} == NET
    network.finals = [("i9", NetworkUse(rx_bytes=7, rx_public_bytes=7))]
    entries = (await rig.tick())["instances"]
    assert entries[-1]["instance_id"] == "i9" and entries[-1]["status"] == "destroyed"
    assert entries[-1]["rx_bytes"] == 7 and entries[-1]["cpu_util"] == 0.0
    assert [e["instance_id"] for e in (await rig.tick())["instances"]] == ["i1"]


async def test_one_per_host_a_deleted_instance_s_totals_ride_on_the_host_report(
    blocking: Blocking,
) -> None:
    network = FakeNetwork()
    rig = Rig(blocking, max_instances=1, network=network)
    running = [instance(1)]
    rig.instances = running
    payload = await rig.tick()
    assert {k: payload[k] for k in NET} == NET
    rig.instances = []
    network.finals = [("i1", NetworkUse(rx_bytes=99))]
    payload = await rig.tick()
    assert payload["status"] == "destroyed" and payload["instance_id"] == "i1"
    assert payload["rx_bytes"] == 99
    assert "instance_id" not in await rig.tick()
