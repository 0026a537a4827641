"""Resource requests from env_variables."""

from __future__ import annotations

import pytest

from qudata_agent.domain.gpus import GIB, Resources, parse_resources
from qudata_agent.errors import InvalidRequest

# -- parse_resources -------------------------------------------------------------


def test_reads_all_three() -> None:
    env = {"QUDATA_CPU_CORES": "4", "QUDATA_MEMORY_GB": "8", "QUDATA_GPU_COUNT": "1", "X": "y"}
    assert parse_resources(env) == Resources(cpu_cores=4.0, memory_bytes=8 * GIB, gpu_count=1)


def test_absent_means_no_limit_and_no_gpu() -> None:
    assert parse_resources({}) == Resources(cpu_cores=None, memory_bytes=None, gpu_count=0)
    assert parse_resources({"OTHER": "1"}) == Resources()


@pytest.mark.parametrize(
    ("raw", "cores"), [("0.5", 0.5), ("1", 1.0), (" 2 ", 2.0), ("1024", 1024.0), (".25", 0.25)]
)
def test_fractional_cpu(raw: str, cores: float) -> None:
    assert parse_resources({"QUDATA_CPU_CORES": raw}).cpu_cores == cores


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("0.5", GIB // 2),
        ("1", GIB),
        ("1.5", 3 * GIB // 2),
        ("65536", 65536 * GIB),
        ("8.0", 8 * GIB),
    ],
)
def test_memory_in_gib(raw: str, expected: int) -> None:
    assert parse_resources({"QUDATA_MEMORY_GB": raw}).memory_bytes == expected


def test_memory_is_an_int_of_bytes() -> None:
    memory = parse_resources({"QUDATA_MEMORY_GB": "0.1"}).memory_bytes
    assert isinstance(memory, int)
    assert memory == int(0.1 * GIB)


@pytest.mark.parametrize(("raw", "count"), [("0", 0), ("1", 1), ("64", 64), (" 8 ", 8)])
def test_gpu_count(raw: str, count: int) -> None:
    assert parse_resources({"QUDATA_GPU_COUNT": raw}).gpu_count == count


@pytest.mark.parametrize(
    "raw",
    [
        "",
        " ",
        "abc",
        "four",
        "-1",
        "0",
        "0.0",
        "nan",
        "NaN",
        "inf",
        "-inf",
        "Infinity",
        "1e400",
        "1_0",
        "0x10",
        "1,5",
        "1025",
        "1024.5",
        "0.001",
        "4 cores",
    ],
)
def test_refuses_bad_cpu(raw: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_resources({"QUDATA_CPU_CORES": raw})
    assert "'env_variables.QUDATA_CPU_CORES'" in caught.value.message


@pytest.mark.parametrize(
    "raw", ["", "x", "-8", "0", "nan", "inf", "65537", "1e9", "8GB", "0.000001"]
)
def test_refuses_bad_memory(raw: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_resources({"QUDATA_MEMORY_GB": raw})
    assert "'env_variables.QUDATA_MEMORY_GB'" in caught.value.message


@pytest.mark.parametrize("raw", ["", "-1", "1.5", "1.0", "65", "one", "nan", "1e1", "+1"])
def test_refuses_bad_gpu_count(raw: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_resources({"QUDATA_GPU_COUNT": raw})
    assert "'env_variables.QUDATA_GPU_COUNT'" in caught.value.message


def test_message_shortens_a_long_value() -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_resources({"QUDATA_CPU_CORES": "y" * 500})
    assert "y" * 30 not in caught.value.message
