"""tests/gpu/check_gpu.py: its parsers and comparisons on captured nvidia-smi output (no GPU)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from qudata_agent.domain.inventory import (
    GpuInfo,
    GpuReport,
    GpuSample,
    HostInventory,
    init_host_payload,
)
from qudata_agent.domain.topology import Link, shape_from_json

SCRIPT = Path(__file__).parents[1] / "gpu" / "check_gpu.py"
MIB = 1024**2
QUERY = """\
0, GPU-5e3a2b1c-8f4d-4c2e-9a7b-1d2e3f4a5b6c, NVIDIA H100 80GB HBM3, 81559, 1, 0, 31, 550.54.15
1, GPU-7b8c9d0e-1f2a-3b4c-5d6e-7f8a9b0c1d2e, NVIDIA H100 80GB HBM3, 81559, 4242, 97, 64, 550.54.15
"""
HEADER = """\
Thu Nov 26 10:11:12 2026
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 550.54.15              Driver Version: 550.54.15      CUDA Version: 12.4     |
|-----------------------------------------+------------------------+----------------------+
"""
UUIDS = (
    "GPU-5e3a2b1c-8f4d-4c2e-9a7b-1d2e3f4a5b6c",
    "GPU-7b8c9d0e-1f2a-3b4c-5d6e-7f8a9b0c1d2e",
)


@pytest.fixture(scope="module")
def check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_gpu", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_gpu"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _report(cuda: str = "12.4") -> GpuReport:
    gpus = tuple(GpuInfo(i, u, "NVIDIA H100 80GB HBM3", 81559 * MIB) for i, u in enumerate(UUIDS))
    return GpuReport(gpus=gpus, driver_version="550.54.15", cuda_version=cuda)


def _payload(report: GpuReport) -> dict[str, Any]:
    inv = HostInventory("AMD EPYC 9654", 96, 192, 2.4, 512 * 1024**3, None, 4800, 10.0, report)
    return init_host_payload(inv)


def test_parsers(check: Any) -> None:
    rows = check.parse_query(QUERY)
    assert [(r.index, r.uuid, r.memory_used_mib, r.util_percent) for r in rows] == [
        (0, UUIDS[0], 1, 0.0),
        (1, UUIDS[1], 4242, 97.0),
    ]
    assert check.parse_cuda_version(HEADER) == "12.4"
    assert check.parse_cuda_version("no header") is None
    na = check.parse_query("0, GPU-x, Tesla T4, 15360, 0, [N/A], [N/A], 535.1\n")
    assert na[0].util_percent is None and na[0].temperature_c is None
    with pytest.raises(ValueError):
        check.parse_query("0, GPU-x\n")


def test_a_matching_inventory_passes(check: Any) -> None:
    report = _report()
    assert check.compare_inventory(check.parse_query(QUERY), "12.4", report, _payload(report)) == []


def test_inventory_mismatches_are_named(check: Any) -> None:
    rows = check.parse_query(QUERY)
    report = _report(cuda="12.1")
    problems = check.compare_inventory(rows, "12.10", report, _payload(report))
    assert problems == ["CUDA version '12.1', nvidia-smi prints '12.10'"]

    one_gpu = replace(_report(), gpus=_report().gpus[:1])
    problems = check.compare_inventory(rows, "12.4", one_gpu, _payload(one_gpu))
    assert any(p.startswith("GPU count") for p in problems)
    assert "GPU UUIDs differ between NVML and nvidia-smi" in problems


def test_live_figures_within_tolerance_pass_and_outside_fail(check: Any) -> None:
    rows = check.parse_query(QUERY)
    close = (
        GpuSample(UUIDS[0], 0.0, 300 * MIB, 81559 * MIB, 31.0),  # reserved memory counted
        GpuSample(UUIDS[1], 91.0, 4500 * MIB, 81559 * MIB, 65.0),
    )
    assert check.compare_samples(rows, close) == []
    far = (
        GpuSample(UUIDS[0], 50.0, 1 * MIB, 81559 * MIB, None),
        GpuSample(UUIDS[1], 97.0, 9000 * MIB, 81559 * MIB, 80.0),
    )
    problems = check.compare_samples(rows, far)
    assert len(problems) == 4
    assert check.compare_samples(rows, close[:1]) == [f"{UUIDS[1]}: no sample from the agent"]


def test_metrics_check(check: Any) -> None:
    sample = GpuSample(UUIDS[0], 1.0, MIB, 2 * MIB, 30.0)
    text = (
        f'qudata_gpu_utilization_ratio{{uuid="{UUIDS[0]}"}} 0.01\n'
        f'qudata_gpu_memory_used_bytes{{uuid="{UUIDS[0]}"}} 1048576.0\n'
    )
    assert check.compare_metrics(text, (sample,)) == []
    assert len(check.compare_metrics("", (sample,))) == 2


def test_without_nvidia_smi_it_exits_2(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT)],
        env={"PATH": str(tmp_path)},  # no nvidia-smi on it
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "no nvidia-smi" in done.stderr


# -- an instance per GPU -------------------------------------------------------------

SAMPLES = Path(__file__).parent / "samples"


def _pcie() -> Any:
    record = json.loads((SAMPLES / "topology_8x_pcie_two_sockets.json").read_text())
    return shape_from_json(record)


def _smi_rows(shape: Any) -> list[Any]:
    return [
        SimpleNamespace(index=i, uuid=u, temperature_c=40.0 + i, util_percent=10.0 * i)
        for i, u in enumerate(shape.gpus.uuids)
    ]


def test_topology_matching_nvidia_smi_passes_and_a_wrong_link_is_named(check: Any) -> None:
    shape = _pcie()
    text = (SAMPLES / "nvidia_smi_topo_8x_pcie_two_sockets.txt").read_text()
    rows = _smi_rows(shape)
    assert check.compare_topology(text, rows, shape.gpus) == []
    a, b = shape.gpus.uuids[:2]
    wrong = replace(shape.gpus, links={**shape.gpus.links, frozenset((a, b)): Link.SYSTEM})
    assert check.compare_topology(text, rows, wrong) == ["GPU0-GPU1: agent SYSTEM, nvidia-smi PIX"]
    assert check.compare_topology("garbage", rows, shape.gpus)[0].startswith("nvidia-smi topo")


def test_one_instance_per_gpu_is_placed_and_one_more_refused(check: Any) -> None:
    shape = _pcie()
    placed, extra = check.place_one_per_gpu(shape)
    assert len(placed) == 8 and check.compare_placement(shape, placed, extra) == []
    assert sorted(u for p in placed for u in p.gpus) == sorted(shape.gpus.uuids)
    problems = check.compare_placement(shape, placed[:7], extra)
    assert problems and problems[0].startswith("GPUs placed")


def test_a_container_sees_only_its_gpu(check: Any) -> None:
    listing = f"GPU 0: NVIDIA H100 80GB HBM3 (UUID: {UUIDS[0]})\n"
    assert check.compare_container_gpus(UUIDS[0], listing) == []
    both = listing + f"GPU 1: NVIDIA H100 80GB HBM3 (UUID: {UUIDS[1]})\n"
    assert check.compare_container_gpus(UUIDS[0], both) != []
    assert check.compare_container_gpus(UUIDS[0], "No devices were found\n") == [
        f"container for {UUIDS[0]} sees no GPU"
    ]


def test_a_sandbox_with_a_gpu_shows_gvisor_and_only_its_gpu(check: Any) -> None:
    listing = f"GPU 0: NVIDIA H100 80GB HBM3 (UUID: {UUIDS[0]})\n"
    dmesg = "[   0.000000] Starting gVisor...\n"
    assert check.compare_sandbox_gpu(UUIDS[0], dmesg + listing) == []
    assert check.compare_sandbox_gpu(UUIDS[0], listing) == [
        "the sandbox's dmesg does not show gVisor"
    ]
    assert check.compare_sandbox_gpu(UUIDS[0], dmesg) == [f"container for {UUIDS[0]} sees no GPU"]


def test_each_instances_stats_carry_its_gpu(check: Any) -> None:
    rows = check.parse_query(QUERY)
    entries = [
        {"instance_id": "a", "gpu_util": 1.0, "gpu_temp": 31.0},
        {"instance_id": "b", "gpu_util": 95.0, "gpu_temp": 64.0},
    ]
    assert check.compare_instance_stats(rows, entries, {"a": UUIDS[0], "b": UUIDS[1]}) == []
    swapped = check.compare_instance_stats(rows, entries, {"a": UUIDS[1], "b": UUIDS[0]})
    assert len(swapped) == 4
