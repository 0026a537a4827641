"""What one stats tick costs: CgroupReader vs `docker stats --no-stream`, and the whole
telemetry tick with 8 and with 50 instances.

Starts 50 idle busybox containers (label `qudata.test=cgroups`, removed at the
end, also on Ctrl-C or failure), then for 1, 10 and 50 of them measures:

- ours: one tick = `CgroupReader.sample` + `compute_usage` for every container,
  paths cached (they are resolved once per container start). CPU is this
  process's `time.process_time()` (user + system, so the kernel's work
  generating the files counts), averaged over many ticks;
- baseline: one `docker stats --no-stream <ids>` call: its wall time, the CPU
  of the docker CLI (children's rusage) and of dockerd + containerd (from
  /proc/<pid>/stat), since that is where `docker stats` spends its work.

Then the agent's whole tick, `Telemetry.sample()` with QUDATA_MAX_INSTANCES
above 1 (the payload with every instance, as the stats loop sends it), for 8
and 50 of the containers as running instances (each with its limits in its
spec, its pid found through the real Docker engine once): CPU per tick of
this process, all threads (the event loop and the worker that reads the
cgroups), over many ticks. Targets: at most 20 ms per tick at 50 instances,
and linear growth (the CPU per instance at 50 at most 1.5x that at 8).

Run: .venv/bin/python bench/stats_tick.py [--ticks 50] [--sizes 1,10,50] [--instances 8,50]
Exit status: 0 when the telemetry targets hold, 1 when not.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

from qudata_agent.adapters.cgroups import CgroupReader
from qudata_agent.adapters.docker import DockerEngine
from qudata_agent.adapters.docker.ports import DockerPorts
from qudata_agent.adapters.host import HostCounters
from qudata_agent.blocking import Blocking
from qudata_agent.domain.container_spec import ContainerSpec
from qudata_agent.domain.instance import Instance, Status, Wanted
from qudata_agent.domain.inventory import GpuSample
from qudata_agent.domain.usage import CgroupSample, compute_usage
from qudata_agent.services.telemetry import HostSize, Telemetry

BUSYBOX = "qudata-test/busybox:1"
HOST_CPUS = os.cpu_count() or 1
HOST_MEMORY = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
CLK_TCK = os.sysconf("SC_CLK_TCK")
DAEMONS = ("dockerd", "containerd")
TICK_TARGET_MS = 20.0  # per telemetry tick, at the largest instance count
LINEAR_TARGET = 1.5  # CPU per instance, largest count over smallest


def _docker(*args: str) -> str:
    out = subprocess.run(["docker", *args], check=True, capture_output=True, text=True)
    return out.stdout.strip()


@contextmanager
def _containers(count: int) -> Iterator[list[tuple[str, int]]]:
    """`count` running idle containers as (id, init pid); all removed on the way out."""
    label = f"qudata.test.run={uuid.uuid4().hex}"

    def start(_: int) -> str:
        return _docker(
            "run", "-d", "--label", "qudata.test=cgroups", "--label", label,
            "--cpus", "0.5", "--memory", "64m", BUSYBOX, "sleep", "3600",
        )  # fmt: skip

    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            ids = list(pool.map(start, range(count)))
        pids = _docker("inspect", "-f", "{{.State.Pid}}", *ids).split()
        yield list(zip(ids, map(int, pids), strict=True))
    finally:
        left = _docker("ps", "-aq", "--filter", f"label={label}").split()
        if left:
            subprocess.run(["docker", "rm", "-f", *left], capture_output=True, check=False)


def _daemon_pids() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as f:
                    if f.read().strip() in DAEMONS:
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def _daemon_cpu_s(pids: list[int]) -> float:
    """utime + stime of the daemons, in seconds (clock-tick resolution)."""
    ticks = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return ticks / CLK_TCK


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Figures:
    cpu_ms: float  # per tick, the agent's side
    wall_ms: float
    daemon_cpu_ms: float = 0.0


def ours(reader: CgroupReader, targets: list[tuple[str, int]], ticks: int) -> Figures:
    previous: dict[str, CgroupSample] = {}
    for cid, pid in targets:  # warm: resolve and cache the paths
        previous[cid] = reader.sample(cid, pid)
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(ticks):
        for cid, pid in targets:
            current = reader.sample(cid, pid)
            compute_usage(previous[cid], current, 0.5, 64 * 2**20, HOST_CPUS, HOST_MEMORY)
            previous[cid] = current
    return Figures(
        cpu_ms=(time.process_time() - cpu) / ticks * 1000,
        wall_ms=(time.perf_counter() - wall) / ticks * 1000,
    )


def docker_stats(targets: list[tuple[str, int]], daemons: list[int]) -> Figures:
    ids = [cid for cid, _ in targets]
    children, daemon, wall = _children_cpu_s(), _daemon_cpu_s(daemons), time.perf_counter()
    _docker("stats", "--no-stream", "--format", "{{.ID}} {{.CPUPerc}} {{.MemPerc}}", *ids)
    return Figures(
        cpu_ms=(_children_cpu_s() - children) * 1000,
        wall_ms=(time.perf_counter() - wall) * 1000,
        daemon_cpu_ms=(_daemon_cpu_s(daemons) - daemon) * 1000,
    )


def _cold_ms(targets: list[tuple[str, int]]) -> float:
    """CPU per container of a first sample (paths not cached yet)."""
    reader = CgroupReader()
    cpu = time.process_time()
    for cid, pid in targets:
        reader.sample(cid, pid)
    return (time.process_time() - cpu) / len(targets) * 1000


def _instance(n: int, container_id: str) -> Instance:
    spec = ContainerSpec(
        instance_id=f"bench-{n}", agent_id="bench", image=BUSYBOX, command=("sleep", "3600"),
        nano_cpus=int(0.5e9), memory_bytes=64 * 2**20, gpu_uuids=(),
    )  # fmt: skip
    return Instance(
        id=spec.instance_id, status=Status.RUNNING, wanted=Wanted.RUNNING, image=BUSYBOX,
        container_name=spec.name, container_id=container_id, created_at=float(n),
        spec=spec, started_at="bench",
    )  # fmt: skip


async def _no_gpus(_: tuple[str, ...]) -> tuple[GpuSample, ...]:
    return ()


async def _no_host_gpus() -> tuple[str, ...]:
    return ()


async def _telemetry_ticks(targets: list[tuple[str, int]], ticks: int) -> Figures:
    instances = [_instance(n, cid) for n, (cid, _) in enumerate(targets)]

    async def listed() -> list[Instance]:
        return instances

    engine, blocking = DockerEngine(), Blocking()
    try:
        telemetry = Telemetry(
            instances=listed, engine=DockerPorts(engine, blocking), cgroups=CgroupReader(),
            host=HostCounters(),
            gpu_samples=_no_gpus, host_gpus=_no_host_gpus,
            size=HostSize(HOST_CPUS, HOST_MEMORY), blocking=blocking, max_instances=len(targets),
        )  # fmt: skip
        payload = await telemetry.sample()  # warm: pids looked up, cgroup paths resolved
        assert len(payload["instances"]) == len(targets)
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(ticks):
            payload = await telemetry.sample()
        figures = Figures(
            cpu_ms=(time.process_time() - cpu) / ticks * 1000,
            wall_ms=(time.perf_counter() - wall) / ticks * 1000,
        )
        unread = [e for e in payload["instances"] if e["ram_util"] == 0]
        if unread:
            raise SystemExit(f"{len(unread)} instances had no figures: the tick is not whole")
        return figures
    finally:
        blocking.close()
        engine.close()


def telemetry_table(running: list[tuple[str, int]], counts: list[int], ticks: int) -> bool:
    """The whole telemetry tick for each count of instances; True when the targets hold."""
    print(f"telemetry tick (Telemetry.sample, every instance in the payload), {ticks} ticks:")
    print(f"{'instances':>9} | {'CPU/tick':>9} {'wall/tick':>9} | {'CPU/instance':>12}")
    rows = []
    for n in counts:
        got = asyncio.run(_telemetry_ticks(running[:n], ticks))
        rows.append((n, got))
        print(f"{n:>9} | {got.cpu_ms:>6.2f} ms {got.wall_ms:>6.2f} ms | {got.cpu_ms / n:>9.3f} ms")
    (small, first), (large, last) = rows[0], rows[-1]
    growth = (last.cpu_ms / large) / max(first.cpu_ms / small, 1e-9)
    tick_ok, linear_ok = last.cpu_ms <= TICK_TARGET_MS, growth <= LINEAR_TARGET
    print(
        f"{large} vs {small} instances: CPU per tick x{last.cpu_ms / max(first.cpu_ms, 1e-9):.2f}"
        f" for x{large / small:.2f} the instances; per instance x{growth:.2f}"
        f" (target <= {LINEAR_TARGET:g}: {'PASS' if linear_ok else 'FAIL'})"
    )
    print(
        f"CPU per tick at {large}: {last.cpu_ms:.2f} ms, {last.cpu_ms / TICK_TARGET_MS:.2f}x"
        f" the {TICK_TARGET_MS:g} ms target ({'PASS' if tick_ok else 'FAIL'});"
        f" {last.cpu_ms / 3000 * 100:.3f}% of one CPU at one tick per 3 s"
    )
    return tick_ok and linear_ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ticks", type=int, default=50)
    parser.add_argument("--sizes", default="1,10,50")
    parser.add_argument("--instances", default="8,50")
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    counts = sorted(int(s) for s in args.instances.split(","))
    reader = CgroupReader()
    daemons = _daemon_pids()
    print(f"cgroup v{2 if reader.v2 else 1}, {HOST_CPUS} CPUs, {args.ticks} ticks per size")
    with _containers(max(*sizes, *counts)) as running:
        print(f"cold first sample: {_cold_ms(running):.3f} ms CPU per container")
        header = f"{'n':>3} | {'ours CPU':>9} {'wall':>8} | {'docker stats CLI CPU':>20}"
        print(header + f" {'daemons CPU':>11} {'wall':>9} | CPU ratio  wall ratio")
        for n in sizes:
            mine = ours(reader, running[:n], args.ticks)
            theirs = docker_stats(running[:n], daemons)
            their_cpu = theirs.cpu_ms + theirs.daemon_cpu_ms
            print(
                f"{n:>3} | {mine.cpu_ms:>6.2f} ms {mine.wall_ms:>5.2f} ms |"
                f" {theirs.cpu_ms:>17.1f} ms {theirs.daemon_cpu_ms:>8.1f} ms"
                f" {theirs.wall_ms:>6.0f} ms |"
                f" {their_cpu / max(mine.cpu_ms, 1e-6):>8.0f}x"
                f" {theirs.wall_ms / max(mine.wall_ms, 1e-6):>9.0f}x"
            )
        print("ours: per tick, every container; docker stats: one call for the same containers")
        ok = telemetry_table(running, counts, args.ticks)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
