"""Checks the agent's GPU inventory and GPU metrics against nvidia-smi, on a real NVIDIA GPU.

Run by hand where a GPU and its driver are present (see README.md next to
this file); pytest never collects it. Everything the agent reports is read
through the agent's own adapters (the NVML adapter, the host probe, the
`/init/host` payload builder, the metrics registry) and compared with what
`nvidia-smi` prints. Exit code: 0 when everything matches, 1 on any mismatch
(each is printed), 2 when there is no NVIDIA GPU, driver or nvidia-smi here.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from qudata_agent.adapters.host import HostProbe
from qudata_agent.adapters.nvml import Nvml
from qudata_agent.domain.inventory import GpuReport, GpuSample, init_host_payload, short_gpu_name
from qudata_agent.metrics import Metrics

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


def _smi(*args: str) -> str:
    return subprocess.run(
        ["nvidia-smi", *args], check=True, capture_output=True, text=True, timeout=30
    ).stdout


async def _agent_side(nvml: Nvml, uuids: tuple[str, ...]) -> tuple[Any, ...]:
    samples = await nvml.samples_async(uuids)
    events = await nvml.events_async(wait_ms=100)
    return samples, events


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docker-root", default="/", help="path whose filesystem is 'disk'")
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
        conditions = nvml.conditions()
    finally:
        nvml.close()
    metrics = Metrics()
    metrics.follow_stats(SimpleNamespace(last=None, last_gpus=samples, last_net=None))
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
    ]
    for problem in problems:
        print(f"MISMATCH: {problem}")
    print("OK" if not problems else f"{len(problems)} mismatch(es)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
