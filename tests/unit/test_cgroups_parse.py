"""The cgroup and /proc parsers on captured samples, and CgroupReader over a fake tree.

Samples: the cgroup_v1_*, proc_pid_cgroup_v1_cgroupfs, proc_net_dev_container
and proc_net_dev_host files were captured from busybox containers on a Docker
20.10 host (cgroupfs driver, cgroup v1; kernel 6.18); cgroup_v2_cpu_stat_hybrid
from the same host's unified hierarchy. The other v2 files, the systemd-driver
/proc/<pid>/cgroup files and proc_net_dev_wide were written by hand in the
kernel's format.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qudata_agent.adapters.cgroups import (
    CgroupEntry,
    CgroupReader,
    MetricsUnavailable,
    parse_cpu_stat,
    parse_memory_stat,
    parse_proc_cgroup,
    parse_proc_net_dev,
    working_set_bytes,
)
from qudata_agent.domain.usage import CgroupSample

SAMPLES = Path(__file__).parent / "samples"
CAPTURED_ID = "345069ad442945ec95b9e31bf1fde74e18ca4d6c4b67e950b1ee491dd8faffbb"
SYSTEMD_ID = "9c1f6e2d4b7a8e03f5d2c1b0a9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a2f1e0"


def sample(name: str) -> str:
    return (SAMPLES / name).read_text()


# /proc/<pid>/cgroup


def test_proc_cgroup_v1_cgroupfs_driver() -> None:
    entries = parse_proc_cgroup(sample("proc_pid_cgroup_v1_cgroupfs.txt"))
    assert len(entries) == 10
    assert CgroupEntry(2, ("cpuacct",), f"/docker/{CAPTURED_ID}") in entries
    assert CgroupEntry(4, ("memory",), f"/docker/{CAPTURED_ID}") in entries
    assert CgroupEntry(9, ("name=systemd",), f"/docker/{CAPTURED_ID}") in entries
    assert CgroupEntry(0, (), f"/docker/{CAPTURED_ID}") in entries  # the hybrid unified line


def test_proc_cgroup_v1_systemd_driver_with_comounted_cpu_cpuacct() -> None:
    entries = parse_proc_cgroup(sample("proc_pid_cgroup_v1_systemd.txt"))
    scope = f"/system.slice/docker-{SYSTEMD_ID}.scope"
    assert CgroupEntry(4, ("cpu", "cpuacct"), scope) in entries
    assert CgroupEntry(7, ("net_cls", "net_prio"), scope) in entries
    assert CgroupEntry(2, ("rdma",), "/") in entries


def test_proc_cgroup_v2() -> None:
    assert parse_proc_cgroup(sample("proc_pid_cgroup_v2_systemd.txt")) == [
        CgroupEntry(0, (), f"/system.slice/docker-{SYSTEMD_ID}.scope")
    ]
    assert parse_proc_cgroup(sample("proc_pid_cgroup_v2_namespaced.txt")) == [
        CgroupEntry(0, (), "/")
    ]


def test_proc_cgroup_skips_malformed_lines() -> None:
    text = "garbage\n\nx:memory:/a\n3:cpu\n4:memory:relative\n5:memory:/ok\n"
    assert parse_proc_cgroup(text) == [CgroupEntry(5, ("memory",), "/ok")]


# cpu


def test_cpu_stat_v2_in_nanoseconds() -> None:
    assert parse_cpu_stat(sample("cgroup_v2_cpu_stat.txt")) == 1532870519 * 1000
    assert parse_cpu_stat(sample("cgroup_v2_cpu_stat_hybrid.txt")) == 148360084 * 1000


def test_cpu_stat_without_usage_is_an_error() -> None:
    with pytest.raises(ValueError, match="usage_usec"):
        parse_cpu_stat("user_usec 5\nsystem_usec 1\n")


def test_cpuacct_usage_v1_is_plain_nanoseconds() -> None:
    assert int(sample("cgroup_v1_cpuacct_usage.txt")) == 148351918947


# memory


def test_memory_stat_v1_counts_tmpfs_as_in_use() -> None:
    """Captured from a container that wrote 100 MiB into /dev/shm."""
    stat = parse_memory_stat(sample("cgroup_v1_memory_stat.txt"))
    usage = int(sample("cgroup_v1_memory_usage_in_bytes.txt"))
    assert stat["total_shmem"] == 100 * 1024**2
    assert stat["hierarchical_memory_limit"] == 256 * 1024**2
    assert stat["total_inactive_file"] == 0
    assert working_set_bytes(usage, stat, v2=False) == usage == 105431040


def test_memory_stat_v2_working_set_leaves_out_inactive_file() -> None:
    stat = parse_memory_stat(sample("cgroup_v2_memory_stat.txt"))
    current = int(sample("cgroup_v2_memory_current.txt"))
    assert stat["inactive_file"] == 73728000
    assert stat["anon"] + stat["file"] + stat["kernel"] <= current
    assert working_set_bytes(current, stat, v2=True) == 118136832 - 73728000


def test_working_set_picks_the_key_of_its_version() -> None:
    stat = {"inactive_file": 100, "total_inactive_file": 300}
    assert working_set_bytes(1000, stat, v2=True) == 900
    assert working_set_bytes(1000, stat, v2=False) == 700


def test_working_set_never_goes_below_zero() -> None:
    # docker's CLI keeps the usage when the inactive cache is not smaller
    assert working_set_bytes(100, {"inactive_file": 500}, v2=True) == 100
    assert working_set_bytes(100, {}, v2=False) == 100


def test_memory_stat_skips_odd_lines() -> None:
    assert parse_memory_stat("a 1\nbroken\nb x\n\nc 3\n") == {"a": 1, "c": 3}


# /proc/<pid>/net/dev


def test_net_dev_of_a_container() -> None:
    assert parse_proc_net_dev(sample("proc_net_dev_container.txt")) == {
        "lo": (0, 0),
        "eth0": (2630, 378),
    }


def test_net_dev_of_the_host() -> None:
    counters = parse_proc_net_dev(sample("proc_net_dev_host.txt"))
    assert len(counters) == 12
    assert counters["lo"] == (42739011, 42739011)
    assert counters["docker0"] == (136785, 41561955)
    # the host's end of the captured container's pair: its rx is the container's tx
    assert counters["veth77f9f27"] == (378, 2630)


def test_net_dev_with_a_counter_touching_the_colon() -> None:
    counters = parse_proc_net_dev(sample("proc_net_dev_wide.txt"))
    assert counters == {
        "lo": (4096, 4096),
        "eth0": (12884901888, 6442450944),
        "eth1": (524288, 262144),
    }


# the reader over a fake tree


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _fake_proc(proc: Path, pid: int, cgroup: str, net_dev: str) -> None:
    _write(proc / str(pid) / "cgroup", cgroup)
    _write(proc / str(pid) / "net" / "dev", net_dev)


def _fake_v1(root: Path, proc: Path, pid: int, cpu_dir: str = "cpuacct") -> None:
    cgroup = f"/docker/{CAPTURED_ID}"
    _write(root / cpu_dir / cgroup[1:] / "cpuacct.usage", sample("cgroup_v1_cpuacct_usage.txt"))
    memory = root / "memory" / cgroup[1:]
    _write(memory / "memory.usage_in_bytes", sample("cgroup_v1_memory_usage_in_bytes.txt"))
    _write(memory / "memory.stat", sample("cgroup_v1_memory_stat.txt"))
    lines = sample("proc_pid_cgroup_v1_cgroupfs.txt")
    if cpu_dir != "cpuacct":
        lines = lines.replace(":cpuacct:", f":{cpu_dir}:")
    _fake_proc(proc, pid, lines, sample("proc_net_dev_wide.txt"))


def _fake_v2(root: Path, proc: Path, pid: int) -> None:
    _write(root / "cgroup.controllers", "cpuset cpu io memory hugetlb pids rdma misc\n")
    scope = root / "system.slice" / f"docker-{SYSTEMD_ID}.scope"
    _write(scope / "cpu.stat", sample("cgroup_v2_cpu_stat.txt"))
    _write(scope / "memory.current", sample("cgroup_v2_memory_current.txt"))
    _write(scope / "memory.stat", sample("cgroup_v2_memory_stat.txt"))
    _fake_proc(proc, pid, sample("proc_pid_cgroup_v2_systemd.txt"), sample("proc_net_dev_wide.txt"))


def test_reader_v1(tmp_path: Path) -> None:
    root, proc = tmp_path / "cgroup", tmp_path / "proc"
    _fake_v1(root, proc, 4242)
    reader = CgroupReader(str(root), str(proc))
    assert reader.v2 is False
    assert reader.sample(CAPTURED_ID, 4242, clock=lambda: 7.5) == CgroupSample(
        at=7.5,
        cpu_usage_ns=148351918947,
        memory_bytes=105431040,
        net_rx_bytes=12884901888 + 524288,  # lo left out
        net_tx_bytes=6442450944 + 262144,
    )


def test_reader_v1_finds_a_comounted_cpu_cpuacct_hierarchy(tmp_path: Path) -> None:
    root, proc = tmp_path / "cgroup", tmp_path / "proc"
    _fake_v1(root, proc, 4242, cpu_dir="cpu,cpuacct")
    got = CgroupReader(str(root), str(proc)).sample(CAPTURED_ID, 4242)
    assert got.cpu_usage_ns == 148351918947


def test_reader_v2(tmp_path: Path) -> None:
    root, proc = tmp_path / "cgroup", tmp_path / "proc"
    _fake_v2(root, proc, 77)
    reader = CgroupReader(str(root), str(proc))
    assert reader.v2 is True
    got = reader.sample(SYSTEMD_ID, 77, clock=lambda: 1.0)
    assert got.cpu_usage_ns == 1532870519000
    assert got.memory_bytes == 118136832 - 73728000
    assert (got.net_rx_bytes, got.net_tx_bytes) == (12884901888 + 524288, 6442450944 + 262144)


def test_reader_caches_paths_and_follows_a_new_pid(tmp_path: Path) -> None:
    root, proc = tmp_path / "cgroup", tmp_path / "proc"
    _fake_v2(root, proc, 77)
    reader = CgroupReader(str(root), str(proc))
    reader.sample(SYSTEMD_ID, 77)
    (proc / "77" / "cgroup").unlink()  # cached: not read again
    reader.sample(SYSTEMD_ID, 77)
    # the container restarted under a new pid, same cgroup
    _fake_proc(
        proc, 78, sample("proc_pid_cgroup_v2_systemd.txt"), sample("proc_net_dev_container.txt")
    )
    assert reader.sample(SYSTEMD_ID, 78).net_rx_bytes == 2630


def test_reader_resolves_again_when_a_cached_file_is_gone(tmp_path: Path) -> None:
    root, proc = tmp_path / "cgroup", tmp_path / "proc"
    _fake_v2(root, proc, 77)
    reader = CgroupReader(str(root), str(proc))
    reader.sample(SYSTEMD_ID, 77)
    # the cgroup moved (say, a new --cgroup-parent) and /proc says where
    old = root / "system.slice" / f"docker-{SYSTEMD_ID}.scope"
    new = root / "tenants.slice" / f"docker-{SYSTEMD_ID}.scope"
    new.parent.mkdir()
    os.rename(old, new)
    _write(proc / "77" / "cgroup", f"0::/tenants.slice/docker-{SYSTEMD_ID}.scope\n")
    assert reader.sample(SYSTEMD_ID, 77).cpu_usage_ns == 1532870519000


def test_reader_refuses_a_pid_of_another_cgroup(tmp_path: Path) -> None:
    root, proc = tmp_path / "cgroup", tmp_path / "proc"
    _fake_v2(root, proc, 77)
    _fake_proc(proc, 1, sample("proc_pid_cgroup_v2_namespaced.txt"), "")
    reader = CgroupReader(str(root), str(proc))
    with pytest.raises(MetricsUnavailable, match="not container 9c1f6e2d4b7a"):
        reader.sample(SYSTEMD_ID, 1)
    with pytest.raises(MetricsUnavailable, match="not container"):
        reader.sample(CAPTURED_ID, 77)


@pytest.mark.parametrize("pid", [0, -1])
def test_reader_refuses_a_stopped_container(tmp_path: Path, pid: int) -> None:
    with pytest.raises(MetricsUnavailable, match="not running"):
        CgroupReader(str(tmp_path), str(tmp_path)).sample(SYSTEMD_ID, pid)


def test_reader_a_gone_process_is_metrics_unavailable(tmp_path: Path) -> None:
    root, proc = tmp_path / "cgroup", tmp_path / "proc"
    _fake_v2(root, proc, 77)
    with pytest.raises(MetricsUnavailable, match="process 99 is gone") as caught:
        CgroupReader(str(root), str(proc)).sample(SYSTEMD_ID, 99)
    assert isinstance(caught.value.__cause__, FileNotFoundError)


def test_reader_a_file_gone_for_good_is_metrics_unavailable(tmp_path: Path) -> None:
    root, proc = tmp_path / "cgroup", tmp_path / "proc"
    _fake_v2(root, proc, 77)
    reader = CgroupReader(str(root), str(proc))
    reader.sample(SYSTEMD_ID, 77)
    (root / "system.slice" / f"docker-{SYSTEMD_ID}.scope" / "memory.current").unlink()
    with pytest.raises(MetricsUnavailable, match=r"memory\.current is gone"):
        reader.sample(SYSTEMD_ID, 77)


def test_reader_garbage_in_a_file_is_metrics_unavailable(tmp_path: Path) -> None:
    root, proc = tmp_path / "cgroup", tmp_path / "proc"
    _fake_v1(root, proc, 5)
    _write(root / "memory" / "docker" / CAPTURED_ID / "memory.usage_in_bytes", "max\n")
    with pytest.raises(MetricsUnavailable, match="ValueError") as caught:
        CgroupReader(str(root), str(proc)).sample(CAPTURED_ID, 5)
    assert isinstance(caught.value.__cause__, ValueError)


def test_reader_a_missing_hierarchy_is_metrics_unavailable(tmp_path: Path) -> None:
    root, proc = tmp_path / "cgroup", tmp_path / "proc"
    _fake_proc(proc, 5, f"4:memory:/docker/{CAPTURED_ID}\n", "")
    with pytest.raises(MetricsUnavailable, match="controller"):
        CgroupReader(str(root), str(proc)).sample(CAPTURED_ID, 5)  # no cpuacct line
    _fake_proc(proc, 6, sample("proc_pid_cgroup_v1_cgroupfs.txt"), "")
    with pytest.raises(MetricsUnavailable, match="no cpuacct hierarchy"):
        CgroupReader(str(root), str(proc)).sample(CAPTURED_ID, 6)


def test_reader_forget_drops_the_cache(tmp_path: Path) -> None:
    root, proc = tmp_path / "cgroup", tmp_path / "proc"
    _fake_v2(root, proc, 77)
    reader = CgroupReader(str(root), str(proc))
    reader.sample(SYSTEMD_ID, 77)
    reader.forget(SYSTEMD_ID)
    (proc / "77" / "cgroup").unlink()
    with pytest.raises(MetricsUnavailable, match="gone"):
        reader.sample(SYSTEMD_ID, 77)
