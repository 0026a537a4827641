"""compute_usage: percentages of what the instance was given, rates, and the edge cases."""

from __future__ import annotations

import math

import pytest

from qudata_agent.domain.usage import CgroupSample, Usage, compute_usage

GIB = 1024**3
MIB = 1024**2
HOST_CPUS = 8
HOST_MEMORY = 64 * GIB


def sample(
    at: float, cpu_s: float = 0.0, memory: int = 0, rx: int = 0, tx: int = 0
) -> CgroupSample:
    return CgroupSample(
        at=at, cpu_usage_ns=int(cpu_s * 1e9), memory_bytes=memory, net_rx_bytes=rx, net_tx_bytes=tx
    )


def usage(
    prev: CgroupSample | None,
    cur: CgroupSample,
    cores: float | None = None,
    memory: int | None = None,
) -> Usage:
    return compute_usage(prev, cur, cores, memory, HOST_CPUS, HOST_MEMORY)


def test_half_a_core_limit_fully_used_reads_100_percent() -> None:
    # 0.5 core for 3 s is 1.5 s of CPU: all the instance was given
    result = usage(sample(10.0, cpu_s=100.0), sample(13.0, cpu_s=101.5), cores=0.5)
    assert result.cpu_percent == pytest.approx(100.0)


def test_cpu_is_a_share_of_the_limit() -> None:
    # 4 cores for 2 s is 8 s of CPU; 2 s used is a quarter
    result = usage(sample(0.0), sample(2.0, cpu_s=2.0), cores=4)
    assert result.cpu_percent == pytest.approx(25.0)


def test_no_cpu_limit_means_the_hosts_cpus() -> None:
    # 8 host CPUs for 1 s; 2 s of CPU used
    assert usage(sample(0.0), sample(1.0, cpu_s=2.0)).cpu_percent == pytest.approx(25.0)
    assert usage(sample(0.0), sample(1.0, cpu_s=2.0), cores=0).cpu_percent == pytest.approx(25.0)


def test_a_cpu_limit_above_the_host_is_the_host() -> None:
    # 16 cores asked on an 8-CPU host: every CPU busy is 100%, not 50%
    result = usage(sample(0.0), sample(1.0, cpu_s=8.0), cores=16)
    assert result.cpu_percent == pytest.approx(100.0)


def test_cpu_above_the_limit_is_clamped_to_100() -> None:
    # CFS quota lets a container overshoot a little within one period
    result = usage(sample(0.0), sample(1.0, cpu_s=0.6), cores=0.5)
    assert result.cpu_percent == 100.0


def test_ram_is_a_share_of_the_memory_limit() -> None:
    result = usage(None, sample(0.0, memory=100 * MIB), memory=256 * MIB)
    assert result.ram_percent == pytest.approx(100 / 256 * 100)


def test_no_memory_limit_means_the_hosts_memory() -> None:
    assert usage(None, sample(0.0, memory=16 * GIB)).ram_percent == pytest.approx(25.0)
    assert usage(None, sample(0.0, memory=16 * GIB), memory=0).ram_percent == pytest.approx(25.0)


def test_dockers_unlimited_memory_on_cgroup_v1_is_the_hosts_memory() -> None:
    unlimited_v1 = 9223372036854771712  # memory.limit_in_bytes with no limit
    result = usage(None, sample(0.0, memory=32 * GIB), memory=unlimited_v1)
    assert result.ram_percent == pytest.approx(50.0)


def test_ram_above_the_limit_is_clamped_to_100() -> None:
    assert usage(None, sample(0.0, memory=300 * MIB), memory=256 * MIB).ram_percent == 100.0


def test_network_rates_are_byte_deltas_per_second() -> None:
    result = usage(sample(5.0, rx=1000, tx=500), sample(7.0, rx=5000, tx=2500))
    assert result.rx_bytes_per_s == pytest.approx(2000.0)
    assert result.tx_bytes_per_s == pytest.approx(1000.0)


def test_first_sample_reports_no_cpu_and_no_rates_but_ram() -> None:
    result = usage(None, sample(3.0, cpu_s=50.0, memory=64 * MIB, rx=10**9, tx=10**9), 1, 128 * MIB)
    assert result == Usage(
        cpu_percent=0.0, ram_percent=50.0, rx_bytes_per_s=0.0, tx_bytes_per_s=0.0
    )


def test_counters_going_backwards_read_zero_not_negative() -> None:
    # the container restarted: a new cgroup and a new network namespace start from 0
    before = sample(10.0, cpu_s=500.0, memory=MIB, rx=10**6, tx=10**6)
    after = sample(13.0, cpu_s=0.2, memory=MIB, rx=300, tx=100)
    result = usage(before, after, cores=1)
    assert result.cpu_percent == 0.0
    assert result.rx_bytes_per_s == 0.0
    assert result.tx_bytes_per_s == 0.0


def test_only_the_counter_that_went_backwards_reads_zero() -> None:
    result = usage(sample(0.0, cpu_s=1.0, rx=100, tx=10**6), sample(1.0, cpu_s=1.5, rx=400, tx=5))
    assert result.rx_bytes_per_s == pytest.approx(300.0)
    assert result.tx_bytes_per_s == 0.0
    assert result.cpu_percent == pytest.approx(0.5 / HOST_CPUS * 100)


@pytest.mark.parametrize("cur_at", [10.0, 9.0])
def test_an_empty_or_backward_interval_reads_zero(cur_at: float) -> None:
    result = usage(sample(10.0, cpu_s=1.0, rx=0), sample(cur_at, cpu_s=2.0, rx=10**6), cores=1)
    assert (result.cpu_percent, result.rx_bytes_per_s, result.tx_bytes_per_s) == (0.0, 0.0, 0.0)


def test_figures_are_finite_with_a_host_reporting_nothing() -> None:
    result = compute_usage(sample(0.0), sample(1.0, cpu_s=1.0, memory=MIB), None, None, 0, 0)
    assert all(math.isfinite(v) and 0 <= v <= 100 for v in (result.cpu_percent, result.ram_percent))
