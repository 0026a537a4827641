"""CgroupReader against real containers on the real Docker engine.

Containers are made with the docker CLI from the suite's busybox image, labelled
`qudata.test=cgroups` plus a label of this run's own; the `containers` fixture
removes them afterwards, also on failure. The init pid comes from
`docker inspect` (State.Pid), as the agent gets it.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from qudata_agent.adapters.cgroups import CgroupReader, MetricsUnavailable
from qudata_agent.domain.usage import compute_usage

BUSYBOX = "qudata-test/busybox:1"
MIB = 1024**2
HOST_CPUS = os.cpu_count() or 1
HOST_MEMORY = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
ICMP_FRAME = 98  # a 56-byte ping: 64 ICMP + 20 IP + 14 Ethernet

pytestmark = pytest.mark.docker


def _docker(*args: str) -> str:
    return subprocess.run(
        ["docker", *args], check=True, capture_output=True, text=True, timeout=60
    ).stdout.strip()


def _pid(container_id: str) -> int:
    return int(_docker("inspect", "-f", "{{.State.Pid}}", container_id))


class Containers:
    """Runs labelled busybox containers; `remove_all` removes every one of this run."""

    def __init__(self) -> None:
        self.run_label = f"qudata.test.run={uuid.uuid4().hex}"

    def run(self, *options: str, command: str = "sleep 600") -> tuple[str, int]:
        """A started container's full id and init pid."""
        container_id = _docker(
            "run", "-d", "--label", "qudata.test=cgroups", "--label", self.run_label,
            *options, BUSYBOX, "sh", "-c", command,
        )  # fmt: skip
        return container_id, _pid(container_id)

    def remove_all(self) -> None:
        ids = _docker("ps", "-aq", "--filter", f"label={self.run_label}").split()
        if ids:
            subprocess.run(["docker", "rm", "-f", *ids], capture_output=True, check=False)


@pytest.fixture
def containers() -> Iterator[Containers]:
    made = Containers()
    try:
        yield made
    finally:
        made.remove_all()


def _exits_zero(*args: str) -> bool:
    return subprocess.run(["docker", *args], capture_output=True, check=False).returncode == 0


def _wait_for(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.1)


def test_busy_loop_under_half_a_core_reads_about_100_percent(containers: Containers) -> None:
    cid, pid = containers.run("--cpus", "0.5", command="while :; do :; done")
    reader = CgroupReader()
    time.sleep(0.3)  # let the loop settle into its CFS quota
    first = reader.sample(cid, pid)
    time.sleep(1.5)
    second = reader.sample(cid, pid)
    usage = compute_usage(first, second, 0.5, None, HOST_CPUS, HOST_MEMORY)
    print(f"busy loop, 0.5 core: {usage.cpu_percent:.1f}% of its limit")
    assert 70.0 <= usage.cpu_percent <= 100.0
    # the same work against the whole host is a fraction of it
    of_host = compute_usage(first, second, None, None, HOST_CPUS, HOST_MEMORY)
    # (the per-limit figure is capped at 100; CFS lets a loop overshoot its quota a little)
    share = 0.5 / HOST_CPUS * 100
    assert usage.cpu_percent * 0.5 / HOST_CPUS * (1 - 1e-6) <= of_host.cpu_percent <= share * 1.05


def test_an_idle_container_reads_almost_no_cpu(containers: Containers) -> None:
    cid, pid = containers.run("--cpus", "0.5")
    reader = CgroupReader()
    first = reader.sample(cid, pid)
    time.sleep(1.0)
    usage = compute_usage(first, reader.sample(cid, pid), 0.5, None, HOST_CPUS, HOST_MEMORY)
    assert usage.cpu_percent < 5.0


def _memory_seen_inside(container_id: str) -> int:
    """The container's memory use as its own cgroup files show it from inside (v1 or v2):
    usage less the inactive file cache, the figure `docker stats` shows. Read through the
    container's own view, not the host's hierarchy the reader walks. (`docker stats`
    itself is not the baseline: some hosts' dockerd cannot collect it at all.)"""
    script = (
        "if [ -f /sys/fs/cgroup/memory.current ]; then"
        " echo $(cat /sys/fs/cgroup/memory.current)"
        " $(sed -n 's/^inactive_file //p' /sys/fs/cgroup/memory.stat);"
        " else echo $(cat /sys/fs/cgroup/memory/memory.usage_in_bytes)"
        " $(sed -n 's/^total_inactive_file //p' /sys/fs/cgroup/memory/memory.stat); fi"
    )
    usage, inactive = _docker("exec", container_id, "sh", "-c", script).split()
    return int(usage) - int(inactive)


def test_memory_held_in_tmpfs_reads_as_a_share_of_the_limit(containers: Containers) -> None:
    """100 MiB written to /dev/shm (tmpfs, charged to the container's cgroup) stay held.

    Expected: 100/256 = 39.06% plus what busybox's sh, dd and sleep use (well
    under 2 MiB here): 100 MiB <= usage <= 106 MiB, i.e. 39.0% .. 41.5%.
    """
    cid, pid = containers.run(
        "--memory", "256m", "--shm-size", "200m",
        command="dd if=/dev/zero of=/dev/shm/x bs=1M count=100 && sleep 600",
    )  # fmt: skip
    reader = CgroupReader()
    _wait_for(lambda: reader.sample(cid, pid).memory_bytes >= 100 * MIB)
    time.sleep(0.2)  # dd has exited; its pages stay in the tmpfs
    held = reader.sample(cid, pid)
    usage = compute_usage(None, held, None, 256 * MIB, HOST_CPUS, HOST_MEMORY)
    print(f"100 MiB in tmpfs: {held.memory_bytes / MIB:.1f} MiB, {usage.ram_percent:.2f}%")
    assert 100 * MIB <= held.memory_bytes <= 106 * MIB
    assert 39.0 <= usage.ram_percent <= 41.5
    # the figure is the one the container's own cgroup files give (docker stats' figure)
    assert abs(_memory_seen_inside(cid) - reader.sample(cid, pid).memory_bytes) < MIB


def test_network_counters_grow_with_traffic_to_the_gateway(containers: Containers) -> None:
    cid, pid = containers.run()
    gateway = _docker(
        "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.Gateway}}{{end}}", cid
    )
    assert gateway, "the container has no bridge gateway"
    reader = CgroupReader()
    before = reader.sample(cid, pid)
    _docker("exec", cid, "ping", "-c", "5", "-i", "0.2", "-W", "2", gateway)
    after = reader.sample(cid, pid)
    sent = after.net_tx_bytes - before.net_tx_bytes
    received = after.net_rx_bytes - before.net_rx_bytes
    print(f"ping x5 to {gateway}: tx +{sent} B, rx +{received} B")
    assert sent >= 5 * ICMP_FRAME
    assert received >= 5 * ICMP_FRAME
    usage = compute_usage(before, after, None, None, HOST_CPUS, HOST_MEMORY)
    assert usage.tx_bytes_per_s > 0 and usage.rx_bytes_per_s > 0


def test_restart_gives_a_new_pid_and_counters_that_start_again(containers: Containers) -> None:
    # burns CPU on its first start only (/tmp survives a restart), then sleeps
    burn = "i=0; while [ $i -lt 100000 ]; do i=$((i+1)); done; touch /tmp/burnt"
    cid, pid = containers.run(command=f"[ -e /tmp/burnt ] || {{ {burn}; }}; exec sleep 600")
    reader = CgroupReader()
    _wait_for(lambda: _exits_zero("exec", cid, "test", "-e", "/tmp/burnt"))
    before = reader.sample(cid, pid)
    _docker("restart", "-t", "0", cid)
    new_pid = _pid(cid)
    assert new_pid != pid
    with pytest.raises(MetricsUnavailable):
        reader.sample(cid, pid)  # the old init is gone
    after = reader.sample(cid, new_pid)
    assert after.cpu_usage_ns < before.cpu_usage_ns  # a new cgroup: the counter restarted
    usage = compute_usage(before, after, 1, None, HOST_CPUS, HOST_MEMORY)
    assert usage.cpu_percent == 0.0


def test_stopped_container_and_foreign_pid_are_refused(containers: Containers) -> None:
    cid, _ = containers.run()
    reader = CgroupReader()
    with pytest.raises(MetricsUnavailable, match="not container"):
        reader.sample(cid, os.getpid())  # the test itself runs outside the container
    _docker("stop", "-t", "0", cid)
    with pytest.raises(MetricsUnavailable, match="not running"):
        reader.sample(cid, _pid(cid))  # Docker reports pid 0 for a stopped container


def test_sampling_is_cheap(containers: Containers) -> None:
    """Warm caches: one sample is four small reads. The bound is generous (timing is noisy);
    bench/stats_tick.py gives the real figures."""
    made = [containers.run() for _ in range(5)]
    reader = CgroupReader()
    for cid, pid in made:
        reader.sample(cid, pid)  # resolve and cache the paths
    rounds = 20
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    for _ in range(rounds):
        for cid, pid in made:
            reader.sample(cid, pid)
    samples = rounds * len(made)
    cpu_ms = (time.process_time() - cpu_start) / samples * 1000
    wall_ms = (time.perf_counter() - wall_start) / samples * 1000
    print(f"{samples} warm samples: {cpu_ms:.3f} ms CPU, {wall_ms:.3f} ms wall per sample")
    assert wall_ms < 5.0
