"""Admission and placement of an instance on a host that runs several (CONTRACT.md section 4).

Owns `Capacity` (the host as admission sees it: its shape, reserves, free disk,
the instance limit), `Holding` (what one existing instance holds), `Request`
(what an order asks for), `decide` (admit with a `Placement`, or a `Refusal`
naming what is short), `place` (the same, raising Conflict) and `free` (what
is left, for `GET /v1/host`).

The rules:
- GPUs are exclusive, by UUID.
- CPU: the CPU limits of all instances add up to at most the host's logical
  CPUs less `reserved_cpu_cores`; memory limits to at most its memory less
  `reserved_memory_bytes`; `storage_bytes` to at most the free space of
  Docker's data root (space promised to an instance and not yet written
  counts as taken). An instance with no limit (None) holds the whole host's
  share of that resource: nothing else fits beside it.
- An order that names no CPU (or no memory) gets a share of the host:
  with `max_instances` 1, the whole host less the reserves (a limit still:
  the reserves keep the host's own daemons, the agent among them, alive);
  with GPUs asked on a host with GPUs, the fraction of the
  host matching its fraction of the GPUs (2 of 8 GPUs: a quarter of what is
  left after the reserves); otherwise (a host with no GPU, or an order with
  no GPU beside GPU renters) one instance slot's share, 1/`max_instances` of
  the host. Equal slots are what keeps the last of `max_instances` small
  instances admissible instead of the first taking everything free. A share
  larger than what is free is cut to what is free; only nothing free refuses.
- An order that names no `storage_gb` gets the provider's default
  (`default_storage_bytes`), else the same share of the disk's free space;
  cut to what is free; a default never refuses an order (only a
  `storage_gb` asked for can) and promises nothing: it is a ceiling on what
  the instance may write, not space kept from other instances or volumes
  (`Holding.of_spec` leaves it out). Where less than `MIN_DEFAULT_STORAGE_BYTES`
  is free it gets none (the image GC is there to free space). Unknown free
  space: the provider's default, else none.
- Whole cores: an order that names a whole number of CPUs gets a cpuset of
  whole physical cores (all SMT siblings of each) of its own when that many
  are free, on the NUMA node of its GPUs first, leaving out the lowest cores
  that cover the CPU reserve (where the system's interrupts and daemons run);
  otherwise it runs with its CPU limit and no cpuset. Cpusets never overlap.
- GPUs for one instance are the free ones with the closest worst link
  (NVLink, then one PCIe switch, then host bridge, then across sockets), then
  the smallest sum of links, then those that leave the other free GPUs
  best linked to each other, then the lowest host order: deterministic.

What stays true: pure and deterministic (same inputs, same answer); a
placement never shares a GPU or a pinned CPU with a holding and never takes
more CPU, memory, disk or instances than the rules leave.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from qudata_agent.domain.container_spec import ContainerSpec
from qudata_agent.domain.gpus import Resources
from qudata_agent.domain.topology import (
    Cpu,
    GpuTopology,
    HostShape,
    Link,
    format_cpu_list,
    parse_cpu_list,
)
from qudata_agent.errors import Conflict

GIB = 1024**3
MIB = 1024**2
DEFAULT_RESERVED_CPU_CORES = 1.0
DEFAULT_RESERVED_MEMORY_BYTES = 2 * GIB
MIN_CPU_CORES = 0.01  # Docker's smallest --cpus
MIN_MEMORY_BYTES = 6 * MIB  # Docker's smallest memory limit
MIN_DEFAULT_STORAGE_BYTES = GIB
_EXHAUSTIVE_MAX = 3000  # GPU subsets tried one by one; past that, a greedy search
_EPS = 1e-9


@dataclass(frozen=True)
class Capacity:
    """The host as admission sees it."""

    shape: HostShape
    disk_free_bytes: int | None = None  # free space of Docker's data root; None: unknown
    reserved_cpu_cores: float = DEFAULT_RESERVED_CPU_CORES
    reserved_memory_bytes: int = DEFAULT_RESERVED_MEMORY_BYTES
    max_instances: int = 1
    default_storage_bytes: int | None = None  # None: the order's share of the free space

    @property
    def cpu_cores(self) -> float:
        """The logical CPUs instances may be given in all (the host's less the reserve)."""
        return max(0.0, len(self.shape.cpus) - self.reserved_cpu_cores)

    @property
    def memory_bytes(self) -> int:
        return max(0, self.shape.memory_bytes - self.reserved_memory_bytes)


@dataclass(frozen=True)
class Holding:
    """What one existing instance holds."""

    gpus: tuple[str, ...] = ()
    cpuset: tuple[int, ...] = ()  # logical CPUs of its own; () when it has none
    cpu_cores: float | None = None  # its CPU limit; None: none (the whole host)
    memory_bytes: int | None = None  # its memory limit; None: none (the whole host)
    storage_bytes: int | None = None  # the writable-layer size promised
    storage_used_bytes: int = 0  # of that, already written (so already off the free space)

    @classmethod
    def of_spec(cls, spec: ContainerSpec, storage_used_bytes: int = 0) -> Holding:
        """What an existing instance holds, from the spec it was created with."""
        return cls(
            gpus=spec.gpu_uuids,
            cpuset=parse_cpu_list(spec.cpuset_cpus) if spec.cpuset_cpus else (),
            cpu_cores=None if spec.nano_cpus is None else spec.nano_cpus / 1e9,
            memory_bytes=spec.memory_bytes,
            storage_bytes=spec.storage_bytes if spec.storage_asked else None,
            storage_used_bytes=storage_used_bytes,
        )


@dataclass(frozen=True)
class Request:
    """What an order asks for; None: not named."""

    gpu_count: int = 0
    cpu_cores: float | None = None
    memory_bytes: int | None = None
    storage_bytes: int | None = None

    @classmethod
    def of(cls, resources: Resources, storage_bytes: int | None = None) -> Request:
        """The request of a parsed order (`gpus.parse_resources`) and its `storage_gb` in bytes."""
        return cls(resources.gpu_count, resources.cpu_cores, resources.memory_bytes, storage_bytes)


@dataclass(frozen=True)
class Placement:
    """An admitted order: what its container gets."""

    gpus: tuple[str, ...]
    cpuset: tuple[int, ...] | None  # None: no cpuset (it floats, bounded by its limit)
    cpu_cores: float | None  # the CPU limit; None: none
    memory_bytes: int | None  # the memory limit; None: none
    storage_bytes: int | None = None

    @property
    def cpuset_cpus(self) -> str | None:
        """The cpuset as Docker's `--cpuset-cpus` takes it ("0-3,56-59")."""
        return None if self.cpuset is None else format_cpu_list(self.cpuset)

    def holding(self) -> Holding:
        """What the instance holds once created (the input of the next decision)."""
        return Holding(
            gpus=self.gpus,
            cpuset=self.cpuset or (),
            cpu_cores=self.cpu_cores,
            memory_bytes=self.memory_bytes,
            storage_bytes=self.storage_bytes,
        )


@dataclass(frozen=True)
class Refusal:
    """An order that does not fit: each shortage in words ("needs 2 GPUs, 1 free")."""

    shortages: tuple[str, ...]

    @property
    def message(self) -> str:
        return "; ".join(self.shortages)


@dataclass(frozen=True)
class Free:
    """What is left on the host (`GET /v1/host`)."""

    instances: int
    gpus: tuple[str, ...]
    cpu_cores: float
    memory_bytes: int
    disk_bytes: int | None
    whole_cores: tuple[tuple[int, ...], ...] = field(default=())  # free physical cores' CPUs


# -- what is taken and what is free ----------------------------------------------


def _cpu_taken(capacity: Capacity, holdings: Iterable[Holding]) -> float:
    return sum(capacity.cpu_cores if h.cpu_cores is None else h.cpu_cores for h in holdings)


def _memory_taken(capacity: Capacity, holdings: Iterable[Holding]) -> int:
    return sum(
        capacity.memory_bytes if h.memory_bytes is None else h.memory_bytes for h in holdings
    )


def _disk_promised(holdings: Iterable[Holding]) -> int:
    return sum(max(0, (h.storage_bytes or 0) - h.storage_used_bytes) for h in holdings)


def free(capacity: Capacity, holdings: Sequence[Holding]) -> Free:
    """What is left for new instances, after what `holdings` hold."""
    taken_gpus = {uuid for h in holdings for uuid in h.gpus}
    disk = capacity.disk_free_bytes
    return Free(
        instances=max(0, capacity.max_instances - len(holdings)),
        gpus=tuple(u for u in capacity.shape.gpus.uuids if u not in taken_gpus),
        cpu_cores=_floor2(max(0.0, capacity.cpu_cores - _cpu_taken(capacity, holdings))),
        memory_bytes=max(0, capacity.memory_bytes - _memory_taken(capacity, holdings)),
        disk_bytes=None if disk is None else max(0, disk - _disk_promised(holdings)),
        whole_cores=tuple(cpus for _, cpus in _free_cores(capacity, holdings)),
    )


def shared_cpus(capacity: Capacity, holdings: Sequence[Holding]) -> tuple[int, ...]:
    """The CPUs no instance holds as its own: where every instance without a cpuset runs.

    Pinned cores are an instance's alone, so the others are kept off them (the
    reserve's cores stay in this pool: the host shares them).
    """
    pinned = {cpu for h in holdings for cpu in h.cpuset}
    pool = tuple(c.cpu for c in capacity.shape.cpus if c.cpu not in pinned)
    return pool or tuple(c.cpu for c in capacity.shape.cpus)


# -- the decision ------------------------------------------------------------------


def decide(
    capacity: Capacity, holdings: Sequence[Holding], request: Request
) -> Placement | Refusal:
    """Admit `request` beside `holdings` with a placement, or refuse it saying what is short."""
    left = free(capacity, holdings)
    short: list[str] = []
    if left.instances <= 0:
        short.append(
            f"the host already runs {len(holdings)} instances, its maximum of"
            f" {capacity.max_instances}"
        )
    gpus: tuple[str, ...] = ()
    if request.gpu_count > 0:
        if not capacity.shape.gpus.gpus:
            short.append(f"needs {_count(request.gpu_count, 'GPU')}, this host has none")
        elif len(left.gpus) < request.gpu_count:
            short.append(f"needs {_count(request.gpu_count, 'GPU')}, {len(left.gpus)} free")
        else:
            gpus = choose_gpus(capacity.shape.gpus, left.gpus, request.gpu_count)
    cpu = _cpu_limit(capacity, request, left.cpu_cores)
    if cpu is not None and cpu > left.cpu_cores + _EPS:
        short.append(f"needs {_cores(cpu)} CPU cores, {_cores(left.cpu_cores)} free")
    memory = _memory_limit(capacity, request, left.memory_bytes)
    if memory is not None and memory > left.memory_bytes:
        short.append(f"needs {_gib(memory)} GiB of memory, {_gib(left.memory_bytes)} free")
    storage = _storage_limit(capacity, request, left.disk_bytes)
    asked = request.storage_bytes
    if asked is not None and left.disk_bytes is not None and asked > left.disk_bytes:
        short.append(f"needs {_gib(asked)} GiB of disk, {_gib(left.disk_bytes)} free")
    if short:
        return Refusal(tuple(short))
    cpuset = _cpuset(capacity, holdings, request, gpus)
    return Placement(gpus=gpus, cpuset=cpuset, cpu_cores=cpu, memory_bytes=memory,
                     storage_bytes=storage)  # fmt: skip


def place(capacity: Capacity, holdings: Sequence[Holding], request: Request) -> Placement:
    """`decide`, raising Conflict (HTTP 409) with the shortages when the order does not fit."""
    answer = decide(capacity, holdings, request)
    if isinstance(answer, Refusal):
        raise Conflict(answer.message)
    return answer


def _share(capacity: Capacity, request: Request) -> float | None:
    """The fraction of the host an order that names no figure gets; None: no limit."""
    if capacity.max_instances <= 1:
        return 1.0
    total_gpus = len(capacity.shape.gpus.gpus)
    if request.gpu_count > 0 and total_gpus:
        return min(1.0, request.gpu_count / total_gpus)
    return 1.0 / capacity.max_instances


def _cpu_limit(capacity: Capacity, request: Request, free_cores: float) -> float | None:
    if request.cpu_cores is not None:
        return request.cpu_cores
    share = _share(capacity, request)
    if share is None:
        return None
    # What is free, when less; at least Docker's minimum, so nothing free refuses.
    return max(MIN_CPU_CORES, min(_floor2(capacity.cpu_cores * share), _floor2(free_cores)))


def _memory_limit(capacity: Capacity, request: Request, free_bytes: int) -> int | None:
    if request.memory_bytes is not None:
        return request.memory_bytes
    share = _share(capacity, request)
    if share is None:
        return None
    wanted = int(capacity.memory_bytes * share) // MIB * MIB
    return max(MIN_MEMORY_BYTES, min(wanted, free_bytes // MIB * MIB))


def _storage_limit(capacity: Capacity, request: Request, free_bytes: int | None) -> int | None:
    if request.storage_bytes is not None:
        return request.storage_bytes
    if free_bytes is None or capacity.disk_free_bytes is None:
        return capacity.default_storage_bytes
    wanted = capacity.default_storage_bytes
    if wanted is None:
        share = _share(capacity, request) or 1.0
        wanted = int(capacity.disk_free_bytes * share)
    cut = min(wanted, free_bytes) // MIB * MIB
    return cut if cut >= MIN_DEFAULT_STORAGE_BYTES else None


# -- GPUs ---------------------------------------------------------------------------


Matrix = list[list[int]]  # link levels between candidate GPUs, by position


def _score(links: Matrix, chosen: Sequence[int], rest: Sequence[int]) -> tuple[int, ...]:
    """Lower is better: worst and summed link inside, then how well `rest` keeps together."""
    inside = [links[a][b] for a, b in itertools.combinations(chosen, 2)]
    left = [links[a][b] for a, b in itertools.combinations(rest, 2)]
    return (max(inside, default=Link.NVLINK), sum(inside), max(left, default=Link.NVLINK),
            sum(left))  # fmt: skip


def choose_gpus(topology: GpuTopology, free_gpus: Sequence[str], count: int) -> tuple[str, ...]:
    """`count` of `free_gpus` that share the closest links, in the host's order.

    Raises ValueError when fewer are free (`decide` checks that first).
    """
    order = {uuid: i for i, uuid in enumerate(topology.uuids)}
    candidates = sorted(dict.fromkeys(u for u in free_gpus if u in order), key=order.__getitem__)
    if count > len(candidates):
        raise ValueError(f"{count} GPUs asked, {len(candidates)} free")
    if count == len(candidates):
        return tuple(candidates)
    links = [[int(topology.link(a, b)) for b in candidates] for a in candidates]
    positions = range(len(candidates))
    if math.comb(len(candidates), count) <= _EXHAUSTIVE_MAX:
        subsets: Iterable[tuple[int, ...]] = itertools.combinations(positions, count)
    else:
        subsets = (_grow(links, seed, count) for seed in positions)
    best: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    for subset in subsets:
        chosen = tuple(sorted(subset))
        rest = [i for i in positions if i not in chosen]
        key = (_score(links, chosen, rest), chosen)
        if best is None or key < best:
            best = key
    assert best is not None
    return tuple(candidates[i] for i in best[1])


def _grow(links: Matrix, seed: int, count: int) -> tuple[int, ...]:
    """A greedy group from `seed`: each next GPU the closest to those already in."""
    group = [seed]
    while len(group) < count:
        nearest = min(
            (u for u in range(len(links)) if u not in group),
            key=lambda u: (max(links[u][g] for g in group), sum(links[u][g] for g in group), u),
        )
        group.append(nearest)
    return tuple(group)


# -- CPUs ---------------------------------------------------------------------------


def _physical_cores(
    cpus: Iterable[Cpu],
) -> list[tuple[tuple[int | None, int, int], tuple[int, ...]]]:
    """Physical cores as ((node, package, core), their logical CPUs), in a stable order."""
    cores: dict[tuple[int | None, int, int], list[int]] = {}
    for cpu in cpus:
        cores.setdefault((cpu.node, cpu.package, cpu.core), []).append(cpu.cpu)
    keyed = sorted(cores.items(), key=lambda kv: (min(kv[1]), kv[0][1], kv[0][2]))
    return [(key, tuple(sorted(ids))) for key, ids in keyed]


def _reserved_cpus(capacity: Capacity) -> frozenset[int]:
    """The CPUs of the lowest physical cores that cover the CPU reserve: never pinned."""
    reserved: list[int] = []
    for _, cpus in _physical_cores(capacity.shape.cpus):
        if len(reserved) >= capacity.reserved_cpu_cores - _EPS:
            break
        reserved.extend(cpus)
    return frozenset(reserved)


def _free_cores(
    capacity: Capacity, holdings: Iterable[Holding]
) -> list[tuple[int | None, tuple[int, ...]]]:
    """Physical cores none of whose CPUs is pinned or reserved, as (node, CPUs)."""
    taken = set(_reserved_cpus(capacity))
    for h in holdings:
        taken.update(h.cpuset)
    return [
        (key[0], cpus)
        for key, cpus in _physical_cores(capacity.shape.cpus)
        if not taken.intersection(cpus)
    ]


def _cpuset(
    capacity: Capacity, holdings: Sequence[Holding], request: Request, gpus: Sequence[str]
) -> tuple[int, ...] | None:
    """Whole physical cores of its own for an order naming whole CPUs, or None."""
    wanted = request.cpu_cores
    if wanted is None or abs(wanted - round(wanted)) > _EPS or round(wanted) < 1:
        return None
    need = round(wanted)
    cores = _free_cores(capacity, holdings)
    if sum(len(cpus) for _, cpus in cores) < need:
        return None
    gpu_nodes = [capacity.shape.gpus.node_of(u) for u in gpus]
    by_node: dict[int | None, list[tuple[int, ...]]] = {}
    for node, cpus in cores:
        by_node.setdefault(node, []).append(cpus)

    def rank(node: int | None) -> tuple[int, int, int]:
        near = gpu_nodes.count(node) if node is not None else 0
        fits = sum(len(c) for c in by_node[node]) >= need
        return (-near, 0 if fits else 1, -1 if node is None else node)

    chosen: list[int] = []
    for node in sorted(by_node, key=rank):
        for cpus in by_node[node]:
            if len(chosen) >= need:
                break
            chosen.extend(cpus)
    return tuple(sorted(chosen))


# -- words --------------------------------------------------------------------------


def _floor2(value: float) -> float:
    return math.floor(value * 100 + _EPS) / 100


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _cores(value: float) -> str:
    return f"{_floor2(value):g}"


def _gib(value: int) -> str:
    """GiB rounded down to 0.01, written out in full ("1000000", not "1e+06")."""
    return f"{math.floor(value / GIB * 100) / 100:.2f}".rstrip("0").rstrip(".")
