"""Resource requests from env_variables, and the all-or-none GPU choice."""

from __future__ import annotations

import pytest

from qudata_agent.domain.gpus import GIB, Resources, choose_gpus, parse_resources
from qudata_agent.errors import Conflict, InvalidRequest

GPUS = ("GPU-a", "GPU-b", "GPU-c", "GPU-d")

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


# -- choose_gpus -----------------------------------------------------------------


def test_zero_gpus_is_empty_even_without_gpus() -> None:
    assert choose_gpus(0, (), ()) == ()
    assert choose_gpus(0, GPUS, GPUS) == ()


def test_picks_the_lowest_free_gpus_in_host_order() -> None:
    assert choose_gpus(2, GPUS, ()) == ("GPU-a", "GPU-b")
    assert choose_gpus(2, GPUS, {"GPU-a", "GPU-c"}) == ("GPU-b", "GPU-d")
    assert choose_gpus(1, GPUS, frozenset({"GPU-b"})) == ("GPU-a",)


def test_all_gpus() -> None:
    assert choose_gpus(4, GPUS, []) == GPUS


def test_follows_the_order_the_host_lists() -> None:
    assert choose_gpus(2, GPUS, ["GPU-b"]) == ("GPU-a", "GPU-c")
    assert choose_gpus(2, tuple(reversed(GPUS)), ["GPU-b"]) == ("GPU-d", "GPU-c")


def test_host_without_gpu_refuses_any() -> None:
    with pytest.raises(Conflict, match="this host has no GPU; QUDATA_GPU_COUNT must be 0"):
        choose_gpus(1, (), ())


def test_too_few_free_is_all_or_none() -> None:
    with pytest.raises(Conflict) as caught:
        choose_gpus(3, GPUS, {"GPU-a", "GPU-b"})
    assert "asks for 3" in caught.value.message
    assert "only 2 of 4" in caught.value.message


def test_all_allocated_is_a_conflict() -> None:
    with pytest.raises(Conflict, match="only 0 of 4"):
        choose_gpus(1, GPUS, GPUS)


def test_duplicate_uuids_from_the_host_are_not_given_twice() -> None:
    assert choose_gpus(2, ("GPU-a", "GPU-a", "GPU-b"), ()) == ("GPU-a", "GPU-b")
    with pytest.raises(Conflict, match="only 2 of 2"):
        choose_gpus(3, ("GPU-a", "GPU-a", "GPU-b"), ())


def test_allocated_uuids_unknown_to_the_host_are_ignored() -> None:
    assert choose_gpus(1, GPUS, {"GPU-gone"}) == ("GPU-a",)


def test_negative_count_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="QUDATA_GPU_COUNT"):
        choose_gpus(-1, GPUS, ())


def test_parsed_count_flows_into_the_choice() -> None:
    resources = parse_resources({"QUDATA_GPU_COUNT": "2"})
    assert choose_gpus(resources.gpu_count, GPUS, {"GPU-a"}) == ("GPU-b", "GPU-c")
