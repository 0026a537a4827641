"""Checks the agent's GPU inventory and GPU metrics against nvidia-smi, on a real NVIDIA GPU.

Run by hand where a GPU and its driver are present (see README.md next to
this file); pytest never collects it. Everything the agent reports is read
through the agent's own adapters (the NVML adapter, the host probe, the
`/init/host` payload builder, the metrics registry) and compared with what
`nvidia-smi` prints. Then an instance per GPU: the GPU topology the agent
reads against `nvidia-smi topo -m`, placement handing each of as many
one-GPU orders as there are GPUs a GPU of its own (and refusing one more),
and, with Docker and the NVIDIA Container Toolkit (`--image`), a container
per GPU made through the agent's Docker adapter that sees exactly its GPU,
with the telemetry of each instance showing that GPU's figures.
Exit code: 0 when everything matches, 1 on any mismatch (each is printed),
2 when there is no NVIDIA GPU, driver or nvidia-smi here.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from qudata_agent.adapters.cgroups import CgroupReader
from qudata_agent.adapters.docker import DockerEngine
from qudata_agent.adapters.docker.ports import DockerPorts
from qudata_agent.adapters.host import HostCounters, HostProbe, host_memory_bytes, host_shape
from qudata_agent.adapters.nvml import Nvml
from qudata_agent.adapters.runtimes import sandbox_gpus
from qudata_agent.blocking import Blocking
from qudata_agent.domain.container_spec import ContainerSpec
from qudata_agent.domain.instance import Instance, Status, Wanted
from qudata_agent.domain.inventory import GpuReport, GpuSample, init_host_payload, short_gpu_name
from qudata_agent.domain.isolation import sandbox_gpu_refusal
from qudata_agent.domain.placement import Capacity, Holding, Placement, Refusal, Request, decide
from qudata_agent.domain.topology import GpuTopology, HostShape, parse_smi_topology
from qudata_agent.metrics import Metrics
from qudata_agent.services.telemetry import HostSize, Telemetry

MIB = 1024**2
GIB = 1024**3
QUERY_FIELDS = (
    "index,uuid,name,memory.total,memory.used,utilization.gpu,temperature.gpu,driver_version"
)
# How far two readings taken a moment apart may differ and still match.
UTIL_TOLERANCE = 15.0  # percentage points: utilisation is sampled over different windows
TEMP_TOLERANCE = 3.0  # degrees C
MEMORY_TOLERANCE = 768 * MIB  # nvidia-smi leaves the driver's reserved memory out of "used"


@dataclass(frozen=True)
class SmiGpu:
    index: int
    uuid: str
    name: str
    memory_total_mib: int
    memory_used_mib: int
    util_percent: float | None
    temperature_c: float | None
    driver_version: str


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:  # "[N/A]", "[Not Supported]"
        return None


def parse_query(csv_text: str) -> list[SmiGpu]:
    """`nvidia-smi --query-gpu=QUERY_FIELDS --format=csv,noheader,nounits` rows."""
    gpus = []
    for line in csv_text.strip().splitlines():
        cells = [cell.strip() for cell in line.split(",")]
        if len(cells) != len(QUERY_FIELDS.split(",")):
            raise ValueError(f"unexpected nvidia-smi row: {line!r}")
        index, uuid, name, total, used, util, temp, driver = cells
        gpus.append(
            SmiGpu(
                index=int(index),
                uuid=uuid,
                name=name,
                memory_total_mib=int(float(total)),
                memory_used_mib=int(float(used)),
                util_percent=_number(util),
                temperature_c=_number(temp),
                driver_version=driver,
            )
        )
    return gpus


def parse_cuda_version(smi_text: str) -> str | None:
    """The "CUDA Version: 12.4" of plain `nvidia-smi` output, as printed."""
    for line in smi_text.splitlines():
        _, sep, rest = line.partition("CUDA Version:")
        if sep:
            return rest.replace("|", " ").split()[0]
    return None


def compare_inventory(
    smi: list[SmiGpu], cuda: str | None, report: GpuReport, payload: dict[str, Any]
) -> list[str]:
    """Mismatches between nvidia-smi and the agent's GPU report and `/init/host` payload."""
    problems = []
    if report.error:
        problems.append(f"NVML not usable by the agent: {report.error}")
    if len(report.gpus) != len(smi) or payload["gpu_amount"] != len(smi):
        problems.append(
            f"GPU count: agent {len(report.gpus)} (payload {payload['gpu_amount']}), "
            f"nvidia-smi {len(smi)}"
        )
    if {g.uuid for g in report.gpus} != {g.uuid for g in smi}:
        problems.append("GPU UUIDs differ between NVML and nvidia-smi")
    by_uuid = {g.uuid: g for g in smi}
    for gpu in report.gpus:
        other = by_uuid.get(gpu.uuid)
        if other is None:
            continue
        if gpu.name != other.name:
            problems.append(f"{gpu.uuid}: name {gpu.name!r}, nvidia-smi {other.name!r}")
        if abs(gpu.memory_total_bytes / MIB - other.memory_total_mib) > 1:
            problems.append(
                f"{gpu.uuid}: memory {gpu.memory_total_bytes // MIB} MiB, "
                f"nvidia-smi {other.memory_total_mib} MiB"
            )
    if smi:
        first = min(smi, key=lambda g: g.index)
        short = short_gpu_name(first.name)
        if payload["gpu_name"] != short:
            problems.append(f"gpu_name {payload['gpu_name']!r}, expected {short!r}")
        squashed = first.name.replace(" ", "").replace("-", "").lower()
        if not short or short.lower() not in squashed:
            problems.append(f"short name {short!r} is not part of {first.name!r}")
        vram = round(first.memory_total_mib * MIB / GIB)
        if payload["vram"] != vram:
            problems.append(f"vram {payload['vram']} GB, nvidia-smi says {vram} GB")
        if report.driver_version != first.driver_version:
            problems.append(
                f"driver {report.driver_version!r}, nvidia-smi {first.driver_version!r}"
            )
    cuda_reported = payload["configuration"]["max_cuda_version"]
    if cuda is None or cuda_reported != cuda:
        problems.append(f"CUDA version {cuda_reported!r}, nvidia-smi prints {cuda!r}")
    return problems


def compare_samples(smi: list[SmiGpu], samples: tuple[GpuSample, ...]) -> list[str]:
    """Mismatches between nvidia-smi's live figures and the agent's NVML samples."""
    problems = []
    got = {s.uuid: s for s in samples}
    for gpu in smi:
        sample = got.get(gpu.uuid)
        if sample is None:
            problems.append(f"{gpu.uuid}: no sample from the agent")
            continue
        if gpu.util_percent is not None and (
            abs(sample.util_percent - gpu.util_percent) > UTIL_TOLERANCE
        ):
            problems.append(
                f"{gpu.uuid}: utilisation {sample.util_percent}%, nvidia-smi {gpu.util_percent}%"
            )
        used_mib = sample.memory_used_bytes / MIB
        if abs(used_mib - gpu.memory_used_mib) > MEMORY_TOLERANCE / MIB:
            problems.append(
                f"{gpu.uuid}: memory used {used_mib:.0f} MiB, nvidia-smi {gpu.memory_used_mib} MiB"
            )
        if gpu.temperature_c is not None and (
            sample.temperature_c is None
            or abs(sample.temperature_c - gpu.temperature_c) > TEMP_TOLERANCE
        ):
            problems.append(
                f"{gpu.uuid}: temperature {sample.temperature_c} C, "
                f"nvidia-smi {gpu.temperature_c} C"
            )
    return problems


def compare_metrics(text: str, samples: tuple[GpuSample, ...]) -> list[str]:
    """Every sampled GPU has its gauges, labelled by UUID, in the /metrics text."""
    return [
        f"/metrics has no {name} for {s.uuid}"
        for s in samples
        for name in ("qudata_gpu_utilization_ratio", "qudata_gpu_memory_used_bytes")
        if f'{name}{{uuid="{s.uuid}"}}' not in text
    ]


def compare_topology(smi_topo_text: str, smi: list[SmiGpu], topology: GpuTopology) -> list[str]:
    """Mismatches between `nvidia-smi topo -m` and the links and NUMA nodes the agent read."""
    try:
        matrix = parse_smi_topology(smi_topo_text)
    except ValueError as e:
        return [f"nvidia-smi topo -m not understood: {e}"]
    by_index = {g.index: g.uuid for g in smi}
    problems = []
    if {g.uuid for g in topology.gpus} != set(by_index.values()):
        problems.append("the agent's topology does not list the GPUs nvidia-smi lists")
    for (i, j), link in sorted(matrix.links.items()):
        if i < j and i in by_index and j in by_index:
            got = topology.link(by_index[i], by_index[j])
            if got != link:
                problems.append(f"GPU{i}-GPU{j}: agent {got.name}, nvidia-smi {link.name}")
    for index, node in sorted(matrix.numa_nodes.items()):
        got_node = topology.node_of(by_index.get(index, ""))
        if node is not None and got_node != node:
            problems.append(f"GPU{index}: NUMA node {got_node}, nvidia-smi {node}")
    return problems


def place_one_per_gpu(shape: HostShape) -> tuple[list[Placement], Placement | Refusal]:
    """As many one-GPU orders as GPUs (naming nothing else), then one more."""
    capacity = Capacity(shape, max_instances=len(shape.gpus.gpus) + 1)
    holdings: list[Holding] = []
    placed: list[Placement] = []
    for _ in shape.gpus.gpus:
        answer = decide(capacity, holdings, Request(gpu_count=1))
        if not isinstance(answer, Placement):
            break
        placed.append(answer)
        holdings.append(answer.holding())
    return placed, decide(capacity, holdings, Request(gpu_count=1))


def compare_placement(
    shape: HostShape, placed: Sequence[Placement], extra: Placement | Refusal
) -> list[str]:
    """Each GPU to exactly one instance, CPU and memory shared out, the extra one refused."""
    problems = []
    given = [u for p in placed for u in p.gpus]
    if sorted(given) != sorted(shape.gpus.uuids) or any(len(p.gpus) != 1 for p in placed):
        problems.append(f"GPUs placed {given}, expected each of {list(shape.gpus.uuids)} once")
    cpus = sum(p.cpu_cores or 0 for p in placed)
    if placed and (cpus > len(shape.cpus) or any(p.cpu_cores is None for p in placed)):
        problems.append(f"CPU limits {[p.cpu_cores for p in placed]} exceed the host's")
    if not isinstance(extra, Refusal) or "needs 1 GPU, 0 free" not in extra.shortages:
        problems.append(f"one GPU more than the host has was not refused: {extra}")
    return problems


_SMI_LIST = re.compile(r"^GPU \d+: .*\(UUID: (GPU-[0-9a-fA-F-]+)\)", re.MULTILINE)


def compare_container_gpus(expected_uuid: str, smi_list_text: str) -> list[str]:
    """`nvidia-smi -L` run in an instance's container lists its GPU and no other."""
    seen = _SMI_LIST.findall(smi_list_text)
    if seen != [expected_uuid]:
        return [f"container for {expected_uuid} sees {seen or 'no GPU'}"]
    return []


def compare_instance_stats(
    smi: list[SmiGpu], entries: Sequence[dict[str, Any]], gpu_of: dict[str, str]
) -> list[str]:
    """Each instance's `/stats` entry carries the figures of its own GPU."""
    by_uuid = {g.uuid: g for g in smi}
    problems = []
    for entry in entries:
        gpu = by_uuid.get(gpu_of.get(str(entry.get("instance_id")), ""))
        if gpu is None:
            continue
        if gpu.temperature_c is not None and (
            entry.get("gpu_temp") is None
            or abs(float(entry["gpu_temp"]) - gpu.temperature_c) > TEMP_TOLERANCE
        ):
            problems.append(
                f"instance on {gpu.uuid}: gpu_temp {entry.get('gpu_temp')}, "
                f"nvidia-smi {gpu.temperature_c}"
            )
        if gpu.util_percent is not None and (
            abs(float(entry.get("gpu_util", 0)) - gpu.util_percent) > UTIL_TOLERANCE
        ):
            problems.append(
                f"instance on {gpu.uuid}: gpu_util {entry.get('gpu_util')}, "
                f"nvidia-smi {gpu.util_percent}"
            )
    return problems


def _smi(*args: str) -> str:
    return subprocess.run(
        ["nvidia-smi", *args], check=True, capture_output=True, text=True, timeout=30
    ).stdout


async def _agent_side(nvml: Nvml, uuids: tuple[str, ...]) -> tuple[Any, ...]:
    samples = await nvml.samples_async(uuids)
    events = await nvml.events_async(wait_ms=100)
    return samples, events


async def _containers_per_gpu(
    nvml: Nvml, placed: Sequence[Placement], image: str, smi: list[SmiGpu]
) -> list[str]:
    """A container per placement through the agent's Docker adapter, and its telemetry."""
    owner = f"check-gpu-{uuid.uuid4().hex[:12]}"
    engine, blocking = DockerEngine(), Blocking()
    problems: list[str] = []
    made: list[str] = []
    try:
        instances = []
        for n, placement in enumerate(placed):
            spec = ContainerSpec(
                instance_id=f"{owner}-{n}", agent_id=owner, image=image,
                command=("sh", "-c", "nvidia-smi -L; sleep 600"),
                nano_cpus=None if placement.cpu_cores is None else int(placement.cpu_cores * 1e9),
                cpuset_cpus=placement.cpuset_cpus, memory_bytes=placement.memory_bytes,
                gpu_uuids=placement.gpus,
            )  # fmt: skip
            cid = engine.create(spec)
            made.append(cid)
            engine.start(cid)
            state = engine.inspect(cid)
            instances.append(
                Instance(
                    id=spec.instance_id,
                    status=Status.RUNNING,
                    wanted=Wanted.RUNNING,
                    image=image,
                    container_name=spec.name,
                    gpus=placement.gpus,
                    container_id=cid,
                    created_at=float(n),
                    spec=spec,
                    started_at=state.started_at,
                )
            )
        await asyncio.sleep(3)
        for instance, placement in zip(instances, placed, strict=True):
            logs = engine.logs(instance.container_id or "", 20, 64 * 1024, 10).text
            problems += compare_container_gpus(placement.gpus[0], logs)

        async def listed() -> list[Instance]:
            return instances

        async def host_gpus() -> tuple[str, ...]:
            return tuple(g.uuid for g in smi)

        telemetry = Telemetry(
            instances=listed, engine=DockerPorts(engine, blocking), cgroups=CgroupReader(),
            host=HostCounters(),
            gpu_samples=nvml.samples_async, host_gpus=host_gpus,
            size=HostSize(os.cpu_count() or 1, host_memory_bytes()), blocking=blocking,
            max_instances=len(instances) + 1,
        )  # fmt: skip
        payload = await telemetry.sample()
        fresh = parse_query(_smi(f"--query-gpu={QUERY_FIELDS}", "--format=csv,noheader,nounits"))
        gpu_of = {i.id: i.gpus[0] for i in instances}
        problems += compare_instance_stats(fresh, payload["instances"], gpu_of)
        print(f"instances: {len(instances)} containers, one GPU each; /stats entries:")
        for entry in payload["instances"]:
            print(f"  {gpu_of[entry['instance_id']]}: {entry}")
    finally:
        for cid in made:
            engine.remove(cid)
        blocking.close()
        engine.close()
    return problems


def compare_sandbox_gpu(expected_uuid: str, logs: str) -> list[str]:
    """A sandbox with a GPU: gVisor's kernel inside, and exactly its GPU listed."""
    problems = [] if "gVisor" in logs else ["the sandbox's dmesg does not show gVisor"]
    return problems + compare_container_gpus(expected_uuid, logs)


def _sandbox_gpu(report: GpuReport, image: str, runtime_name: str) -> list[str]:
    """`isolation: sandbox` with one GPU: the agent's decision, and when it allows, a real one."""
    engine = DockerEngine()
    try:
        runtime = engine.runtimes().get(runtime_name)
        if runtime is None:
            print(f"sandbox gpu: Docker has no {runtime_name!r} runtime (install.sh --sandbox-gpu)")
            return []
        gpus = sandbox_gpus(runtime.path)
        why = sandbox_gpu_refusal(runtime, gpus, report.driver_version)
        print(
            f"sandbox gpu: {runtime.path} {' '.join(runtime.args)}; nvproxy {gpus.nvproxy},"
            f" {len(gpus.supported_drivers)} drivers listed; driver {report.driver_version}:"
            f" {'allowed' if why is None else 'refused: ' + why}"
        )
        if why is not None:
            return []  # the agent answers such an order 409 with this reason
        first = report.gpus[0].uuid
        spec = ContainerSpec(
            instance_id=f"check-gpu-sandbox-{uuid.uuid4().hex[:8]}", agent_id="check-gpu",
            image=image, command=("sh", "-c", "dmesg | head -3; nvidia-smi -L; sleep 60"),
            gpu_uuids=(first,), env={"NVIDIA_VISIBLE_DEVICES": first},
            runtime=runtime_name,
        )  # fmt: skip
        cid = engine.create(spec)
        try:
            engine.start(cid)
            deadline = time.monotonic() + 60
            logs = ""
            while time.monotonic() < deadline and "GPU 0" not in logs:
                time.sleep(1)
                logs = engine.logs(cid, 20, 64 * 1024, 10).text
            print(f"sandbox gpu: the container says\n{logs}")
            return compare_sandbox_gpu(first, logs)
        finally:
            engine.remove(cid)
    finally:
        engine.close()


def _instance_per_gpu(nvml: Nvml, smi: list[SmiGpu], image: str | None) -> list[str]:
    topology = asyncio.run(nvml.topology_async())
    shape = host_shape(topology)
    print("topology (agent):")
    for gpu in topology.gpus:
        links = {
            other.uuid[:12]: topology.link(gpu.uuid, other.uuid).name
            for other in topology.gpus
            if other.uuid != gpu.uuid
        }
        print(f"  {gpu.uuid} bus {gpu.pci_bus_id} NUMA {gpu.numa_node} {links}")
    problems = compare_topology(_smi("topo", "-m"), smi, topology)
    placed, extra = place_one_per_gpu(shape)
    for p in placed:
        print(
            f"  placed {p.gpus} cpus {p.cpu_cores} cpuset {p.cpuset_cpus} memory {p.memory_bytes}"
        )
    problems += compare_placement(shape, placed, extra)
    if image is None:
        print("containers per GPU: not checked (give --image IMAGE with Docker and the toolkit)")
    elif len(placed) == len(topology.gpus):
        problems += asyncio.run(_containers_per_gpu(nvml, placed, image, smi))
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docker-root", default="/", help="path whose filesystem is 'disk'")
    parser.add_argument(
        "--image",
        default=None,
        help="run a container per GPU from this local image (glibc-based, e.g. debian:12)",
    )
    parser.add_argument(
        "--sandbox",
        metavar="RUNTIME",
        default=None,
        help="with --image: also a sandbox with one GPU under this Docker runtime (runsc)",
    )
    args = parser.parse_args(argv)
    if shutil.which("nvidia-smi") is None:
        print("no nvidia-smi here: not a machine with an NVIDIA driver", file=sys.stderr)
        return 2
    try:
        smi = parse_query(_smi(f"--query-gpu={QUERY_FIELDS}", "--format=csv,noheader,nounits"))
        cuda = parse_cuda_version(_smi())
    except (subprocess.SubprocessError, OSError, ValueError) as e:
        print(f"nvidia-smi failed: {e}", file=sys.stderr)
        return 2
    if not smi:
        print("nvidia-smi lists no GPU", file=sys.stderr)
        return 2

    nvml = Nvml()
    try:
        report = nvml.report()
        payload: dict[str, Any] = init_host_payload(HostProbe(nvml).inventory(args.docker_root))
        uuids = tuple(g.uuid for g in report.gpus)
        samples, events = asyncio.run(_agent_side(nvml, uuids))
        per_gpu = _instance_per_gpu(nvml, smi, args.image)
        if args.sandbox and args.image:
            per_gpu += _sandbox_gpu(report, args.image, args.sandbox)
        conditions = nvml.conditions()
    finally:
        nvml.close()
    metrics = Metrics()
    metrics.follow_stats(SimpleNamespace(last=None, last_gpus=samples, last_net={}))
    text = metrics.render()[0].decode()

    print(f"nvidia-smi: {len(smi)} GPU(s), driver {smi[0].driver_version}, CUDA {cuda}")
    print(
        f"agent:      {payload['gpu_amount']} x {payload['gpu_name']}, {payload['vram']} GB, "
        f"driver {report.driver_version}, CUDA {payload['configuration']['max_cuda_version']}"
    )
    for gpu in smi:
        s = next((x for x in samples if x.uuid == gpu.uuid), None)
        print(
            f"  {gpu.uuid}  {gpu.name}\n"
            f"    nvidia-smi: util {gpu.util_percent}%  used {gpu.memory_used_mib} MiB"
            f" of {gpu.memory_total_mib}  temp {gpu.temperature_c} C"
        )
        if s is not None:
            print(
                f"    agent:      util {s.util_percent}%  used {s.memory_used_bytes // MIB} MiB"
                f" of {s.memory_total_bytes // MIB}  temp {s.temperature_c} C"
            )
    print(f"GPU events: {'not available' if events is None else f'{len(events)} pending'}")
    # What `qudata-agent doctor` reads for its "gpu health" row (information, not compared).
    for c in conditions:
        print(
            f"  {c.uuid}: persistence {c.persistence_mode}, row remap pending {c.remap_pending}"
            f" failed {c.remap_failed}, ECC {c.ecc_enabled} (uncorrected {c.ecc_uncorrected})"
        )

    problems = [
        *compare_inventory(smi, cuda, report, payload),
        *compare_samples(smi, samples),
        *compare_metrics(text, samples),
        *per_gpu,
    ]
    for problem in problems:
        print(f"MISMATCH: {problem}")
    print("OK" if not problems else f"{len(problems)} mismatch(es)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
