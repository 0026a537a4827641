"""The inventory domain: short GPU names, CUDA strings, the /init/host payload, the digest."""

from __future__ import annotations

from dataclasses import replace

import pytest

from qudata_agent.domain.inventory import (
    GpuInfo,
    GpuReport,
    HostInventory,
    format_cuda_version,
    init_host_payload,
    inventory_digest,
    short_gpu_name,
)

GIB = 1024**3


@pytest.mark.parametrize(
    ("full", "short"),
    [
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA H100 PCIe", "H100"),
        ("NVIDIA H100 NVL", "H100"),
        ("NVIDIA GeForce RTX 4090", "RTX4090"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA A100 80GB PCIe", "A100"),
        ("Tesla V100-SXM2-16GB", "V100"),
        ("Tesla T4", "T4"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA RTX A6000", "RTXA6000"),
        ("NVIDIA GeForce RTX 3090 Ti", "RTX3090Ti"),
        ("NVIDIA RTX 6000 Ada Generation", "RTX6000Ada"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA GH200 480GB", "GH200"),
        ("NVIDIA B200", "B200"),
        ("Quadro RTX 8000", "RTX8000"),
        ("Tesla P100-PCIE-16GB", "P100"),
        ("NVIDIA H200 141GB HBM3e", "H200"),
        ("NVIDIA A100-SXM4-40GB MIG 1g.5gb", "A100"),
    ],
)
def test_short_gpu_name(full: str, short: str) -> None:
    assert short_gpu_name(full) == short


@pytest.mark.parametrize(
    ("full", "short"), [("NVIDIA", "NVIDIA"), ("  ", "unknown"), ("", "unknown")]
)
def test_short_gpu_name_is_never_empty(full: str, short: str) -> None:
    assert short_gpu_name(full) == short


@pytest.mark.parametrize(
    ("value", "text"),
    [(12040, "12.4"), (12100, "12.10"), (12010, "12.1"), (11080, "11.8"), (13000, "13.0")],
)
def test_format_cuda_version(value: int, text: str) -> None:
    assert format_cuda_version(value) == text


def test_cuda_12_10_is_not_12_1() -> None:
    assert format_cuda_version(12100) != format_cuda_version(12010)


def _inventory(gpu: GpuReport) -> HostInventory:
    return HostInventory(
        cpu_name="AMD EPYC 9654 96-Core Processor",
        cpu_cores=96,
        vcpu=192,
        cpu_freq_ghz=2.4,
        ram_bytes=512 * GIB,
        disk_bytes=3840 * GIB,
        memory_speed_mts=4800,
        ethernet_gbps=10.0,
        gpu=gpu,
    )


H100 = GpuInfo(
    index=0, uuid="GPU-aaaa", name="NVIDIA H100 80GB HBM3", memory_total_bytes=85520809984
)
EIGHT_H100 = GpuReport(
    gpus=tuple(GpuInfo(i, f"GPU-{i}", H100.name, H100.memory_total_bytes) for i in range(8)),
    driver_version="550.54.15",
    cuda_version="12.4",
)


def test_payload_with_gpus_field_by_field() -> None:
    payload = init_host_payload(_inventory(EIGHT_H100))

    assert set(payload) == {"gpu_name", "gpu_amount", "vram", "location", "configuration"}
    assert payload["gpu_name"] == "H100"
    assert payload["gpu_amount"] == 8
    assert payload["vram"] == 80  # 81559 MiB rounds to 80
    assert payload["location"] == {"city": None, "country": None, "region": None}
    assert payload["configuration"] == {
        "ram": {"amount": 512, "unit": "gb"},
        "disk": {"amount": 3840, "unit": "gb"},
        "cpu_name": "AMD EPYC 9654 96-Core Processor",
        "vcpu": 192,
        "cpu_cores": 96,
        "cpu_freq": 2.4,
        "memory_speed": 4800,
        "ethernet_in": 10.0,
        "ethernet_out": 10.0,
        "capacity": None,
        "max_cuda_version": "12.4",
    }


def test_payload_without_gpus_invents_none() -> None:
    payload = init_host_payload(_inventory(GpuReport(error="NVML Shared Library Not Found")))

    assert payload["gpu_name"] is None
    assert payload["gpu_amount"] == 0
    assert payload["vram"] == 0
    configuration = payload["configuration"]
    assert isinstance(configuration, dict)
    assert configuration["max_cuda_version"] is None
    assert configuration["ram"] == {"amount": 512, "unit": "gb"}


def test_payload_unknown_figures_are_none() -> None:
    inv = HostInventory(
        cpu_name=None,
        cpu_cores=None,
        vcpu=None,
        cpu_freq_ghz=None,
        ram_bytes=int(15.6 * GIB),
        disk_bytes=None,
        memory_speed_mts=None,
        ethernet_gbps=None,
        gpu=GpuReport(),
    )
    configuration = init_host_payload(inv)["configuration"]

    assert configuration == {
        "ram": {"amount": 16, "unit": "gb"},
        "disk": {"amount": None, "unit": "gb"},
        "cpu_name": None,
        "vcpu": None,
        "cpu_cores": None,
        "cpu_freq": None,
        "memory_speed": None,
        "ethernet_in": None,
        "ethernet_out": None,
        "capacity": None,
        "max_cuda_version": None,
    }


def test_cpu_freq_rounded_to_two_places() -> None:
    inv = replace(_inventory(GpuReport()), cpu_freq_ghz=2.596134)
    configuration = init_host_payload(inv)["configuration"]
    assert isinstance(configuration, dict)
    assert configuration["cpu_freq"] == 2.6


def test_digest_is_stable() -> None:
    first = inventory_digest(init_host_payload(_inventory(EIGHT_H100)))
    again = inventory_digest(init_host_payload(_inventory(EIGHT_H100)))
    assert first == again
    assert len(first) == 64
    assert int(first, 16) >= 0


def test_digest_ignores_key_order() -> None:
    assert inventory_digest({"a": 1, "b": {"c": 2, "d": 3}}) == inventory_digest(
        {"b": {"d": 3, "c": 2}, "a": 1}
    )


def test_digest_changes_when_a_field_changes() -> None:
    base = init_host_payload(_inventory(EIGHT_H100))
    fewer_gpus = init_host_payload(
        _inventory(GpuReport(gpus=EIGHT_H100.gpus[:7], cuda_version="12.4"))
    )
    newer_cuda = init_host_payload(
        _inventory(GpuReport(gpus=EIGHT_H100.gpus, cuda_version="12.10"))
    )
    assert inventory_digest(base) != inventory_digest(fewer_gpus)
    assert inventory_digest(base) != inventory_digest(newer_cuda)
