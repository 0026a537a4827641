"""A container's raw counters, read straight from its cgroup and /proc: never `docker stats`.

Owns `CgroupReader` (finds a container's cgroup from its init pid, caches the
file paths, reads one `CgroupSample`), the pure parsers of the kernel's text
files (`parse_proc_cgroup`, `parse_cpu_stat`, `parse_memory_stat`,
`parse_proc_net_dev`, `working_set_bytes`), and `MetricsUnavailable`.
Percentages and rates are computed elsewhere (`domain.usage`).

Where the figures come from:
- cgroup v2 (`<root>/cgroup.controllers` exists): `cpu.stat` usage_usec;
  `memory.current` minus `inactive_file` of `memory.stat`;
- cgroup v1: `cpuacct.usage` (ns) under the cpuacct hierarchy;
  `memory.usage_in_bytes` minus `total_inactive_file` under the memory one.
  Memory is what `docker stats` shows as usage: the reclaimable inactive page
  cache does not count, tmpfs and shared memory do;
- network: `/proc/<pid>/net/dev`, which shows the network namespace of that
  process, so the container's own interfaces; every one but `lo` is summed.

The cgroup path is read from `/proc/<pid>/cgroup`, so both Docker cgroup
drivers (cgroupfs `/docker/<id>`, systemd `/system.slice/docker-<id>.scope`)
and any `--cgroup-parent` work. Paths there are relative to the reader's cgroup
namespace: the agent must run in the host's (as a host service does).

What stays true:
- the cgroup version is detected once, at construction;
- a container's paths are resolved once and cached by container id; a new pid
  (the container restarted) or a read that finds a file gone resolves them
  again (once per sample), then gives up;
- a resolved path always contains the container id, so a pid that belongs to
  something else (reused, wrong container) is refused, never read;
- nothing but `MetricsUnavailable` escapes `sample`: no raw OSError or
  ValueError;
- one sample opens four small files and nothing else (cheap enough for 50
  containers every 3 s: well under a millisecond each).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

from qudata_agent.domain.usage import CgroupSample
from qudata_agent.errors import AgentError

__all__ = [
    "CgroupEntry",
    "CgroupReader",
    "MetricsUnavailable",
    "parse_cpu_stat",
    "parse_memory_stat",
    "parse_proc_cgroup",
    "parse_proc_net_dev",
    "working_set_bytes",
]

_LOOPBACK = "lo"
_READ_CHUNK = 65536


class MetricsUnavailable(AgentError):
    """A container's counters cannot be read (not running, gone, or its files unreadable)."""


# -- pure parsers --------------------------------------------------------------


class CgroupEntry(NamedTuple):
    """One line of /proc/<pid>/cgroup: `hierarchy-id:controllers:path`."""

    hierarchy: int
    controllers: tuple[str, ...]  # () for the v2 unified line `0::/path`
    path: str


def parse_proc_cgroup(text: str) -> list[CgroupEntry]:
    """The lines of /proc/<pid>/cgroup; malformed lines are skipped."""
    entries = []
    for line in text.splitlines():
        number, sep1, rest = line.partition(":")
        controllers, sep2, path = rest.partition(":")
        if not (sep1 and sep2 and number.isdigit() and path.startswith("/")):
            continue
        names = tuple(name for name in controllers.split(",") if name)
        entries.append(CgroupEntry(int(number), names, path))
    return entries


def _flat_keyed(text: str) -> dict[str, int]:
    """`key value` lines (cgroup's flat-keyed format) -> a dict; other lines are skipped."""
    values = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key and value.strip().isdigit():
            values[key] = int(value)
    return values


def parse_cpu_stat(text: str) -> int:
    """Total CPU time in ns from a cgroup v2 `cpu.stat` (its `usage_usec`)."""
    usage_usec = _flat_keyed(text).get("usage_usec")
    if usage_usec is None:
        raise ValueError("cpu.stat has no usage_usec")
    return usage_usec * 1000


def parse_memory_stat(text: str) -> dict[str, int]:
    """A `memory.stat` (v1 or v2) as a dict of counters."""
    return _flat_keyed(text)


def working_set_bytes(usage: int, stat: dict[str, int], v2: bool) -> int:
    """Memory in use without the inactive page cache, as `docker stats` computes it.

    Docker's CLI subtracts `total_inactive_file` (v1) or `inactive_file` (v2)
    only when it is smaller than the usage; so does this.
    """
    inactive = stat.get("inactive_file" if v2 else "total_inactive_file", 0)
    return usage - inactive if inactive < usage else usage


def parse_proc_net_dev(text: str) -> dict[str, tuple[int, int]]:
    """/proc/<pid>/net/dev -> interface -> (rx bytes, tx bytes); headers are skipped."""
    counters = {}
    for line in text.splitlines():
        name, sep, rest = line.rpartition(":")  # a wide counter may touch the colon
        fields = rest.split()
        # 8 receive columns, then transmit bytes; "Inter-|" and " face |" headers have no ':'
        if not sep or len(fields) < 9 or not (fields[0].isdigit() and fields[8].isdigit()):
            continue
        counters[name.strip()] = (int(fields[0]), int(fields[8]))
    return counters


def _sum_except_loopback(counters: dict[str, tuple[int, int]]) -> tuple[int, int]:
    rx = sum(pair[0] for name, pair in counters.items() if name != _LOOPBACK)
    tx = sum(pair[1] for name, pair in counters.items() if name != _LOOPBACK)
    return rx, tx


# -- the reader ----------------------------------------------------------------


@dataclass(frozen=True)
class _Files:
    """The four files one sample reads, resolved for one pid."""

    pid: int
    cpu: str
    memory_usage: str
    memory_stat: str
    net_dev: str


def _read_text(path: str) -> str:
    """A small kernel file at once (no buffered text layer: this runs 200 times a tick)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, _READ_CHUNK):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode("ascii", "replace")


def _short(container_id: str) -> str:
    return container_id[:12]


class CgroupReader:
    """Reads `CgroupSample`s of running containers; safe to share between threads."""

    def __init__(self, root: str = "/sys/fs/cgroup", proc_root: str = "/proc") -> None:
        self._root = root.rstrip("/") or "/"
        self._proc = proc_root.rstrip("/")
        self.v2 = os.path.exists(os.path.join(self._root, "cgroup.controllers"))
        self._files: dict[str, _Files] = {}

    def sample(
        self, container_id: str, pid: int, clock: Callable[[], float] = time.monotonic
    ) -> CgroupSample:
        """The container's counters now; `pid` is its init process (`State.Pid`)."""
        if pid <= 0 or not container_id:
            raise MetricsUnavailable(f"container {_short(container_id)!r} is not running")
        try:
            return self._read(self._files_for(container_id, pid), clock)
        except FileNotFoundError:
            self._files.pop(container_id, None)  # stale paths: find them once more
        try:
            return self._read(self._files_for(container_id, pid), clock)
        except FileNotFoundError as e:
            self._files.pop(container_id, None)
            raise MetricsUnavailable(
                f"container {_short(container_id)}: {e.filename} is gone"
            ) from e

    def forget(self, container_id: str) -> None:
        """Drop the cached paths of a container (it was removed)."""
        self._files.pop(container_id, None)

    def _files_for(self, container_id: str, pid: int) -> _Files:
        files = self._files.get(container_id)
        if files is None or files.pid != pid:
            files = self._resolve(container_id, pid)
            self._files[container_id] = files
        return files

    def _read(self, files: _Files, clock: Callable[[], float]) -> CgroupSample:
        """One sample; FileNotFoundError goes up (the caller resolves again), the rest converts."""
        try:
            at = clock()
            cpu_text = _read_text(files.cpu)
            cpu_ns = parse_cpu_stat(cpu_text) if self.v2 else int(cpu_text)
            usage = int(_read_text(files.memory_usage))
            stat = parse_memory_stat(_read_text(files.memory_stat))
            rx, tx = _sum_except_loopback(parse_proc_net_dev(_read_text(files.net_dev)))
        except FileNotFoundError:
            raise
        except (OSError, ValueError) as e:
            raise MetricsUnavailable(
                f"cannot read the counters of pid {files.pid} ({type(e).__name__})"
            ) from e
        return CgroupSample(
            at=at,
            cpu_usage_ns=cpu_ns,
            memory_bytes=working_set_bytes(usage, stat, self.v2),
            net_rx_bytes=rx,
            net_tx_bytes=tx,
        )

    def _resolve(self, container_id: str, pid: int) -> _Files:
        try:
            entries = parse_proc_cgroup(_read_text(f"{self._proc}/{pid}/cgroup"))
        except OSError as e:
            raise MetricsUnavailable(
                f"container {_short(container_id)}: process {pid} is gone"
            ) from e
        if self.v2:
            unified = self._owned(container_id, pid, _path_of(entries, None))
            cpu_dir = memory_dir = f"{self._root}{unified}"
            cpu, usage, stat = "cpu.stat", "memory.current", "memory.stat"
        else:
            cpu_dir = self._v1_dir(entries, "cpuacct", container_id, pid)
            memory_dir = self._v1_dir(entries, "memory", container_id, pid)
            cpu, usage, stat = "cpuacct.usage", "memory.usage_in_bytes", "memory.stat"
        return _Files(
            pid=pid,
            cpu=f"{cpu_dir}/{cpu}",
            memory_usage=f"{memory_dir}/{usage}",
            memory_stat=f"{memory_dir}/{stat}",
            net_dev=f"{self._proc}/{pid}/net/dev",
        )

    def _v1_dir(
        self, entries: list[CgroupEntry], controller: str, container_id: str, pid: int
    ) -> str:
        """The directory of the cgroup under the v1 hierarchy that holds `controller`."""
        path = self._owned(container_id, pid, _path_of(entries, controller))
        # A co-mounted hierarchy lives at <root>/cpu,cpuacct, usually with a
        # <root>/cpuacct symlink; try the controller's own name first.
        names = [controller] + [
            ",".join(e.controllers) for e in entries if controller in e.controllers
        ]
        for name in names:
            if os.path.isdir(f"{self._root}/{name}"):
                return f"{self._root}/{name}{path}"
        raise MetricsUnavailable(f"no {controller} hierarchy under {self._root}")

    def _owned(self, container_id: str, pid: int, path: str | None) -> str:
        """`path`, once it is known to be the container's own cgroup."""
        if path is None:
            raise MetricsUnavailable(f"process {pid} has no cgroup for the controller needed")
        if container_id not in path:
            # the root ("/") means the agent sits in a cgroup namespace of its own
            raise MetricsUnavailable(
                f"process {pid} is in cgroup {path}, not container {_short(container_id)}'s"
            )
        return path


def _path_of(entries: Iterable[CgroupEntry], controller: str | None) -> str | None:
    """The path of the v1 hierarchy with `controller`, or of the v2 line when None."""
    for entry in entries:
        if controller is None and entry.hierarchy == 0 and not entry.controllers:
            return entry.path
        if controller is not None and controller in entry.controllers:
            return entry.path
    return None
