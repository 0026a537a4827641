"""An instance's resource usage, from two raw counter samples: pure arithmetic, no I/O.

Owns `CgroupSample` (the raw counters read from a container's cgroup and its
network namespace at one moment), `Usage` (what `POST /stats` reports) and
`compute_usage`, the one place those counters become percentages and rates.

The choice: every percentage is of what the instance was *given*, as the wire
contract says ("utilisations are percentages of its CPU limit, its memory
limit"). A container limited to 0.5 core that uses all of its CFS quota (half a
core's worth of time each period) reads ~100%, not 25% of a 2-core host. With no
limit the host's size is what it was given. A limit above the host's size is
capped at the host's size, because an instance cannot use more than the host has:
a 4-core limit on a 2-core host, both cores busy, reads 100%, not 50%. The
same holds for Docker's "unlimited" memory (a huge number on cgroup v1).

What stays true:
- every figure is finite and never negative; percentages lie in 0..100;
- the first sample (no previous one) reports CPU 0 and rates 0, never a
  figure made up from counters that started who knows when;
- a counter that went backwards (the container restarted, its cgroup or
  network namespace is new) gives 0 for that interval, not a negative rate;
- an interval of zero or negative length gives CPU 0 and rates 0.
"""

from __future__ import annotations

from dataclasses import dataclass

_NS_PER_S = 1e9


@dataclass(frozen=True)
class CgroupSample:
    """Raw counters of one container at one moment."""

    at: float  # monotonic seconds, when the counters were read
    cpu_usage_ns: int  # total CPU time used by the cgroup since it was made
    memory_bytes: int  # in use now, without the reclaimable inactive page cache
    net_rx_bytes: int  # received on every interface but lo, since the namespace was made
    net_tx_bytes: int  # sent, likewise


@dataclass(frozen=True)
class Usage:
    """What the instance used over the last interval, as `POST /stats` reports it."""

    cpu_percent: float  # of its CPU limit (or the host's CPUs), 0..100
    ram_percent: float  # of its memory limit (or the host's memory), 0..100
    rx_bytes_per_s: float  # into the instance
    tx_bytes_per_s: float  # out of the instance


def _clamp_percent(value: float) -> float:
    return min(100.0, max(0.0, value))


def _delta(prev: int, cur: int) -> int:
    """How much a counter grew; 0 when it went backwards (a reset)."""
    return cur - prev if cur >= prev else 0


def _given(limit: float | None, host: float) -> float:
    """What the instance was given: its limit, none or above the host's size meaning the host's."""
    if limit is None or limit <= 0:
        return host
    return min(float(limit), host)


def compute_usage(
    prev: CgroupSample | None,
    cur: CgroupSample,
    cpu_limit_cores: float | None,
    memory_limit_bytes: int | None,
    host_cpus: int,
    host_memory_bytes: int,
) -> Usage:
    """Usage over the interval prev -> cur, as percentages of what the instance was given.

    CPU% = delta CPU ns / (delta t * 1e9 * cores given) * 100; RAM% = memory now /
    memory given * 100; rates are byte deltas over delta t. A limit of None or 0
    means none (the host's size).
    """
    cores = _given(cpu_limit_cores, float(max(1, host_cpus)))
    memory = _given(memory_limit_bytes, float(max(1, host_memory_bytes)))
    ram = _clamp_percent(cur.memory_bytes / memory * 100.0)
    elapsed = cur.at - prev.at if prev is not None else 0.0
    if prev is None or elapsed <= 0:
        return Usage(cpu_percent=0.0, ram_percent=ram, rx_bytes_per_s=0.0, tx_bytes_per_s=0.0)
    cpu_ns = _delta(prev.cpu_usage_ns, cur.cpu_usage_ns)
    return Usage(
        cpu_percent=_clamp_percent(cpu_ns / (elapsed * _NS_PER_S * cores) * 100.0),
        ram_percent=ram,
        rx_bytes_per_s=_delta(prev.net_rx_bytes, cur.net_rx_bytes) / elapsed,
        tx_bytes_per_s=_delta(prev.net_tx_bytes, cur.net_tx_bytes) / elapsed,
    )
