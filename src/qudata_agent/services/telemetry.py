"""Telemetry: the `/stats` payload, from every instance's cgroup, its network and its GPUs.

Owns the previous counter samples (so each report is a rate over the last
interval), the cache of each container's init pid, and the shape of the
payload (CONTRACT.md sections 2 and 4). What stays true:
- figures come straight from the cgroup, /proc and NVML, never `docker stats`;
- each instance's percentages are of what it was given: its CPU limit (or
  the size of its cpuset, or the host's CPUs), its memory limit, its GPUs;
  network figures are bytes per second;
- with `max_instances` 1 the payload is the one of section 2: the running
  instance's figures, or the host's with the instance's status (`destroyed`
  without one). With more, the top-level figures are the host's (status
  `running` when any instance runs, else that of the most recent one) and
  `instances` carries one entry per instance; one payload per tick either way;
- one tick reads every running container's counters in one pass on one
  worker thread and asks NVML once for all the GPUs it needs;
- a figure that cannot be read is sent as 0 (a temperature as null), never
  made up, and the failure is logged once per instance, not every tick.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from qudata_agent.background import Streaks
from qudata_agent.blocking import Blocking
from qudata_agent.domain.instance import Instance, Status
from qudata_agent.domain.inventory import GpuSample
from qudata_agent.domain.topology import parse_cpu_list
from qudata_agent.domain.usage import CgroupSample, compute_usage
from qudata_agent.errors import AgentError
from qudata_agent.services.engine import Containers

log = logging.getLogger(__name__)

NET_FRESH_S = 1.0  # a network meter pass this recent is read as it is (the 3 s tick)
NET_FRESH_ON_CHANGE_S = 3.0  # and for a report of a lifecycle change (the meter's own cadence)
FIGURES = ("cpu_util", "ram_util", "inet_in", "inet_out", "gpu_util", "mem_util", "gpu_temp")


class CgroupSource(Protocol):
    def sample(self, container_id: str, pid: int) -> CgroupSample: ...


class NetworkSource(Protocol):
    """The network meter (services.netmeter): totals by instance, and deleted ones' last."""

    async def refresh(self, within_s: float = 0.0) -> None: ...

    def use(self, instance_id: str) -> Any: ...  # domain.netpolicy.NetworkUse | None

    async def take_finals(self) -> list[tuple[str, Any]]: ...


class HostSource(Protocol):
    def sample(self) -> Any: ...  # adapters.host.HostSample


@dataclass(frozen=True)
class HostSize:
    cpus: int
    memory_bytes: int


@dataclass(frozen=True)
class _Limits:
    cpu_cores: float | None
    memory_bytes: int | None


def _limits(instance: Instance) -> _Limits:
    """What the instance was given: its CPU limit or cpuset (the smaller), its memory limit."""
    spec = instance.spec
    if spec is None:
        return _Limits(None, None)
    cores = None if spec.nano_cpus is None else spec.nano_cpus / 1e9
    if spec.cpuset_cpus:
        try:
            pinned = float(len(parse_cpu_list(spec.cpuset_cpus)))
        except ValueError:
            pinned = 0.0
        if pinned and (cores is None or pinned < cores):
            cores = pinned
    return _Limits(cores, spec.memory_bytes)


def _gpu_figures(samples: Sequence[GpuSample]) -> dict[str, Any]:
    if not samples:
        return {"gpu_util": 0.0, "mem_util": 0.0, "gpu_temp": None}
    used = sum(s.memory_used_bytes for s in samples)
    total = sum(s.memory_total_bytes for s in samples) or 1
    temps = [s.temperature_c for s in samples if s.temperature_c is not None]
    return {
        "gpu_util": round(sum(s.util_percent for s in samples) / len(samples), 2),
        "mem_util": round(used / total * 100, 2),
        "gpu_temp": max(temps) if temps else None,
    }


def _zero() -> dict[str, Any]:
    return {
        "cpu_util": 0.0,
        "ram_util": 0.0,
        "inet_in": 0.0,
        "inet_out": 0.0,
        "gpu_util": 0.0,
        "mem_util": 0.0,
        "gpu_temp": None,
    }


def _running(instance: Instance) -> bool:
    return instance.status is Status.RUNNING and bool(instance.container_id)


def _host_status(instances: Sequence[Instance]) -> str:
    if any(i.status is Status.RUNNING for i in instances):
        return Status.RUNNING.value
    if not instances:
        return Status.DESTROYED.value
    return max(instances, key=lambda i: i.created_at).status.value


class Telemetry:
    def __init__(
        self,
        *,
        instances: Callable[[], Awaitable[Sequence[Instance]]],
        engine: Containers,
        cgroups: CgroupSource,
        host: HostSource,
        gpu_samples: Callable[[tuple[str, ...]], Awaitable[tuple[GpuSample, ...]]],
        host_gpus: Callable[[], Awaitable[tuple[str, ...]]],
        size: HostSize,
        blocking: Blocking,
        max_instances: int = 1,
        network: NetworkSource | None = None,
    ) -> None:
        self._instances = instances
        self._engine = engine
        self._cgroups = cgroups
        self._host = host
        self._gpu_samples = gpu_samples
        self._host_gpus = host_gpus
        self._size = size
        self._blocking = blocking
        self._several = max_instances > 1
        self._network = network
        self._prev: dict[str, CgroupSample] = {}  # container -> its previous sample
        self._prev_host: Any | None = None
        self._pids: dict[str, tuple[str | None, int]] = {}  # container -> (run, pid)
        self._failing: Streaks[str] = Streaks()  # instances whose figures could not be read
        self.last: dict[str, Any] | None = None  # the last payload made
        self.last_gpus: tuple[GpuSample, ...] = ()  # the GPU samples behind it (for /metrics)
        # Bytes received and sent so far, by instance id ("" the host's): /metrics counters.
        self.last_net: dict[str, tuple[int, int]] = {}

    async def sample_on_change(self) -> dict[str, Any]:
        """A report for a lifecycle change: made at once, so it takes the network counters
        of the meter's last pass (at most its 3 s old) rather than making a pass (a few nft
        calls, beside the create or start that changed)."""
        return await self.sample(net_within_s=NET_FRESH_ON_CHANGE_S)

    async def sample(self, net_within_s: float = NET_FRESH_S) -> dict[str, Any]:
        if self._network is not None:
            # The counters as of now (a pass of the last second will do): a delete's last
            # bytes too, unless the meter's own pass retires it just after: the next report.
            await self._network.refresh(within_s=net_within_s)
        instances = list(await self._instances())
        running = [i for i in instances if _running(i)]
        self.last_net = {}
        cgroup = await self._read_cgroups(running)
        wanted = {u for i in running for u in i.gpus}
        host_needed = self._several or not running
        host_gpus = await self._host_gpus() if host_needed else ()
        asked = tuple(dict.fromkeys((*host_gpus, *sorted(wanted - set(host_gpus)))))
        samples = await self._gpu_samples(asked) if asked else ()
        by_uuid = {s.uuid: s for s in samples}
        entries = [self._entry(i, cgroup.get(i.id), by_uuid) for i in instances]
        if self._several:
            payload = {**await self._host_figures(host_gpus, by_uuid),
                       "status": _host_status(instances), "instances": entries}  # fmt: skip
            self.last_gpus = samples
        elif running and cgroup.get(running[0].id) is not None:
            entry = entries[instances.index(running[0])]
            payload = {k: v for k, v in entry.items() if k != "instance_id"}
            self.last_gpus = tuple(by_uuid[u] for u in running[0].gpus if u in by_uuid)
        elif running:  # its figures are unreadable: zeros, not the host's
            payload = {**_zero(), "status": running[0].status.value}
            self.last_gpus = ()
        else:
            newest = max(instances, key=lambda i: i.created_at) if instances else None
            payload = {
                **await self._host_figures(host_gpus, by_uuid),
                "status": Status.DESTROYED.value if newest is None else newest.status.value,
            }
            self.last_gpus = samples
        await self._add_finals(payload)
        self.last = payload
        return payload

    async def _add_finals(self, payload: dict[str, Any]) -> None:
        """Deleted instances' last network totals (CONTRACT.md section 8), once each."""
        if self._network is None:
            return
        for instance_id, use in await self._network.take_finals():
            final = {"instance_id": instance_id, "status": Status.DESTROYED.value, **use.wire()}
            if isinstance(payload.get("instances"), list):
                payload["instances"].append({**_zero(), **final})
            else:
                payload.update(final)

    def _entry(
        self,
        instance: Instance,
        figures: dict[str, float] | None,
        gpus: dict[str, GpuSample],
    ) -> dict[str, Any]:
        entry: dict[str, Any] = {"instance_id": instance.id, "status": instance.status.value}
        use = self._network.use(instance.id) if self._network is not None else None
        if use is not None:
            entry.update(use.wire())
        if figures is None:
            return {**entry, **_zero()}
        own = [gpus[u] for u in instance.gpus if u in gpus]
        return {**entry, **figures, **_gpu_figures(own)}

    async def _read_cgroups(self, running: Sequence[Instance]) -> dict[str, dict[str, float]]:
        """CPU, memory and network figures of every running instance, read in one pass."""
        if not running:
            self._prev.clear()
            self._pids.clear()
            return {}
        targets: list[tuple[Instance, str, int]] = []
        for instance in running:
            assert instance.container_id is not None
            try:
                pid = await self._pid(instance.container_id, instance.started_at)
            except AgentError as e:
                self._failed(instance, e)
                continue
            targets.append((instance, instance.container_id, pid))
        read = await self._blocking.quick(self._read_all, [(cid, pid) for _, cid, pid in targets])
        alive = {cid for _, cid, _ in targets}
        self._prev = {cid: s for cid, s in self._prev.items() if cid in alive}
        self._pids = {cid: p for cid, p in self._pids.items() if cid in alive}
        figures: dict[str, dict[str, float]] = {}
        for instance, cid, _ in targets:
            outcome = read[cid]
            if isinstance(outcome, AgentError):
                self._failed(instance, outcome)
                self._pids.pop(cid, None)
                continue
            self._recovered(instance)
            self.last_net[instance.id] = (outcome.net_rx_bytes, outcome.net_tx_bytes)
            prev, self._prev[cid] = self._prev.get(cid), outcome
            limits = _limits(instance)
            usage = compute_usage(prev, outcome, limits.cpu_cores, limits.memory_bytes,
                                  self._size.cpus, self._size.memory_bytes)  # fmt: skip
            figures[instance.id] = {
                "cpu_util": round(usage.cpu_percent, 2),
                "ram_util": round(usage.ram_percent, 2),
                "inet_in": round(usage.rx_bytes_per_s, 1),
                "inet_out": round(usage.tx_bytes_per_s, 1),
            }
        return figures

    def _read_all(self, targets: list[tuple[str, int]]) -> dict[str, CgroupSample | AgentError]:
        """Runs on a worker thread: every container's counters, or why they could not be read."""
        out: dict[str, CgroupSample | AgentError] = {}
        for cid, pid in targets:
            try:
                out[cid] = self._cgroups.sample(cid, pid)
            except AgentError as e:
                out[cid] = e
        return out

    async def _pid(self, container_id: str, run: str | None) -> int:
        cached = self._pids.get(container_id)
        if cached is not None and cached[0] == run:
            return cached[1]
        state = await self._engine.inspect(container_id)
        self._pids[container_id] = (run, state.pid or 0)
        return state.pid or 0

    async def _host_figures(
        self, host_gpus: tuple[str, ...], gpus: dict[str, GpuSample]
    ) -> dict[str, Any]:
        cur = await self._blocking.quick(self._host.sample)
        self.last_net[""] = (cur.net_rx_bytes, cur.net_tx_bytes)
        prev, self._prev_host = self._prev_host, cur
        elapsed = cur.at - prev.at if prev is not None else 0.0
        rx = (cur.net_rx_bytes - prev.net_rx_bytes) / elapsed if prev and elapsed > 0 else 0.0
        tx = (cur.net_tx_bytes - prev.net_tx_bytes) / elapsed if prev and elapsed > 0 else 0.0
        return {
            "cpu_util": round(cur.cpu_percent, 2),
            "ram_util": round(cur.ram_percent, 2),
            "inet_in": round(max(rx, 0.0), 1),
            "inet_out": round(max(tx, 0.0), 1),
            **_gpu_figures([gpus[u] for u in host_gpus if u in gpus]),
        }

    def _failed(self, instance: Instance, error: AgentError) -> None:
        if self._failing.failed(instance.id):
            log.warning(
                "instance figures unreadable; sending zeros",
                extra={"instance_id": instance.id, "error": error.message},
            )

    def _recovered(self, instance: Instance) -> None:
        if self._failing.recovered(instance.id):
            log.info("instance figures readable again", extra={"instance_id": instance.id})
