"""The host's shape as placement sees it: GPUs and how they are linked, CPUs and their NUMA nodes.

Owns the value types the readers fill (`GpuPlace`, `GpuTopology`, `Cpu`,
`HostShape`), the `Link` scale (how close two GPUs are), the JSON form of a
shape (what `tests/unit/samples/topology_*.json` hold, so a capture from a
real server can be dropped in), the parser of `nvidia-smi topo -m` text, and
the Linux CPU list format ("0-3,8,10-11") both ways.

What stays true:
- pure: no I/O; the adapters (`adapters/nvml.py`, `adapters/host.py`) read
  NVML and sysfs and hand these values over;
- a pair of GPUs whose link is unknown is `Link.SYSTEM` (the farthest), never
  a closer link made up; a NUMA node that is unknown is None;
- no GPU is ever invented: a shape with no GPUs has an empty topology.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any


class Link(IntEnum):
    """How two GPUs reach each other; a lower value is a closer, faster link.

    The PCIe levels are NVML's `nvmlGpuTopologyLevel_t` (from
    `nvmlDeviceGetTopologyCommonAncestor`), with the names `nvidia-smi topo -m`
    prints; NVLink (direct or through NVSwitch) comes before all of them.
    """

    NVLINK = -10  # NV#: a bonded set of NVLinks (NVSwitch systems: every pair)
    BOARD = 0  # NVML_TOPOLOGY_INTERNAL: two GPUs on one board
    PIX = 10  # NVML_TOPOLOGY_SINGLE: at most one PCIe switch between them
    PXB = 20  # NVML_TOPOLOGY_MULTIPLE: several PCIe switches, no host bridge
    PHB = 30  # NVML_TOPOLOGY_HOSTBRIDGE: through a PCIe host bridge
    NODE = 40  # NVML_TOPOLOGY_NODE: host bridges within one NUMA node
    SYSTEM = 50  # NVML_TOPOLOGY_SYSTEM ("SYS"): across NUMA nodes (QPI/UPI, xGMI)


_SMI_LINKS = {"PIX": Link.PIX, "PXB": Link.PXB, "PHB": Link.PHB, "NODE": Link.NODE,
              "SYS": Link.SYSTEM, "SOC": Link.SYSTEM}  # fmt: skip
_NV = re.compile(r"NV\d+")
_CPU_RANGE = re.compile(r"(\d+)(?:-(\d+))?")


@dataclass(frozen=True)
class GpuPlace:
    """One GPU: its UUID, PCI bus id (sysfs form, `0000:18:00.0`) and NUMA node."""

    uuid: str
    pci_bus_id: str = ""
    numa_node: int | None = None  # None: unknown (sysfs says -1, or no NUMA)


@dataclass(frozen=True)
class GpuTopology:
    """The GPUs in the host's order and the link of every pair (by UUID)."""

    gpus: tuple[GpuPlace, ...] = ()
    links: Mapping[frozenset[str], Link] = field(default_factory=dict)

    def link(self, a: str, b: str) -> Link:
        """How `a` and `b` are linked; an unknown pair is `Link.SYSTEM`."""
        return self.links.get(frozenset((a, b)), Link.SYSTEM)

    @property
    def uuids(self) -> tuple[str, ...]:
        return tuple(g.uuid for g in self.gpus)

    def node_of(self, uuid: str) -> int | None:
        return next((g.numa_node for g in self.gpus if g.uuid == uuid), None)


@dataclass(frozen=True)
class Cpu:
    """One logical CPU (what a cpuset names) and where it sits."""

    cpu: int  # logical CPU number
    core: int  # core_id: SMT siblings share it within a package
    package: int = 0  # physical_package_id (the socket)
    node: int | None = None  # NUMA node; None where the kernel has no NUMA

    @property
    def physical_core(self) -> tuple[int, int]:
        """The physical core this CPU is a thread of: (package, core_id)."""
        return (self.package, self.core)


@dataclass(frozen=True)
class HostShape:
    """What the readers found: GPUs and their links, logical CPUs, memory."""

    gpus: GpuTopology = field(default_factory=GpuTopology)
    cpus: tuple[Cpu, ...] = ()
    memory_bytes: int = 0


# -- the CPU list format -------------------------------------------------------


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """ "0-3,8,10-11" (sysfs `online`, `cpulist`, a cpuset) -> (0, 1, 2, 3, 8, 10, 11).

    Raises ValueError on anything else; an empty text is no CPU.
    """
    cpus: set[int] = set()
    for item in text.strip().split(","):
        item = item.strip()
        if not item:
            continue
        match = _CPU_RANGE.fullmatch(item)
        if match is None:
            raise ValueError(f"not a CPU list: {text.strip()!r}")
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) is not None else lo
        if hi < lo:
            raise ValueError(f"not a CPU list: {text.strip()!r}")
        cpus.update(range(lo, hi + 1))
    return tuple(sorted(cpus))


def format_cpu_list(cpus: Iterable[int]) -> str:
    """(0, 1, 2, 3, 8) -> "0-3,8": what Docker's `--cpuset-cpus` takes."""
    ordered = sorted(set(cpus))
    parts: list[str] = []
    start = prev = None
    for cpu in ordered:
        if prev is not None and cpu == prev + 1:
            prev = cpu
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = cpu
    if start is not None:
        parts.append(str(start) if start == prev else f"{start}-{prev}")
    return ",".join(parts)


# -- nvidia-smi topo -m ----------------------------------------------------------


@dataclass(frozen=True)
class SmiMatrix:
    """The GPU part of `nvidia-smi topo -m`: links by GPU index, NUMA node by index."""

    links: Mapping[tuple[int, int], Link]
    numa_nodes: Mapping[int, int | None]

    def topology(self, uuids: Sequence[str], pci_bus_ids: Sequence[str] = ()) -> GpuTopology:
        """The topology with the GPUs named (index i is `uuids[i]`)."""
        gpus = tuple(
            GpuPlace(uuid, pci_bus_ids[i] if i < len(pci_bus_ids) else "", self.numa_nodes.get(i))
            for i, uuid in enumerate(uuids)
        )
        links = {
            frozenset((uuids[i], uuids[j])): link
            for (i, j), link in self.links.items()
            if i < len(uuids) and j < len(uuids) and i != j
        }
        return GpuTopology(gpus, links)


def _smi_link(cell: str) -> Link:
    cell = cell.strip()
    if _NV.fullmatch(cell):
        return Link.NVLINK
    return _SMI_LINKS.get(cell, Link.SYSTEM)


def _node(cell: str) -> int | None:
    cell = cell.strip()
    return int(cell) if cell.isdigit() else None


def parse_smi_topology(text: str) -> SmiMatrix:
    """`nvidia-smi topo -m` text -> links between GPUs and each GPU's NUMA node.

    The columns are split on tabs (as nvidia-smi prints them) or, in a copy
    whose tabs became spaces, on runs of whitespace; NIC rows and columns and
    the legend are ignored. Raises ValueError when no GPU header is found.
    """
    lines = [line for line in text.splitlines() if line.strip()]
    header_at = next((i for i, line in enumerate(lines) if line.split()[:1] == ["GPU0"]), None)
    if header_at is None:
        raise ValueError("no GPU0 column in the nvidia-smi topo -m text")
    header = _cells(lines[header_at])
    gpu_cols = [i for i, name in enumerate(header) if re.fullmatch(r"GPU\d+", name)]
    numa_col = next((i for i, name in enumerate(header) if name.startswith("NUMA")), None)
    links: dict[tuple[int, int], Link] = {}
    nodes: dict[int, int | None] = {}
    for line in lines[header_at + 1 :]:
        cells = _cells(line)
        if not cells or not re.fullmatch(r"GPU\d+", cells[0]):
            if cells and cells[0].startswith("Legend"):
                break
            continue
        row = int(cells[0][3:])
        values = cells[1:]  # the header has no cell above the row names
        for col in gpu_cols:
            other = int(header[col][3:])
            if col < len(values) and other != row:
                links[(row, other)] = _smi_link(values[col])
        if numa_col is not None and numa_col < len(values):
            nodes[row] = _node(values[numa_col])
    return SmiMatrix(links, nodes)


def _cells(line: str) -> list[str]:
    """The cells of one topo line: tab-separated when it has tabs, else by whitespace."""
    if "\t" in line:
        cells = [cell.strip() for cell in line.split("\t")]
        while cells and not cells[0]:
            cells.pop(0)
        return [cell for cell in cells if cell] if "CPU Affinity" in line else cells
    # Spaces only: "CPU Affinity" and "NUMA Affinity" are two words each.
    joined = re.sub(r"(CPU|NUMA) Affinity", r"\1_Affinity", line).replace("GPU NUMA ID", "GPU_NUMA")
    return joined.split()


# -- JSON (the samples, and a capture of a real server) ------------------------


def shape_to_json(shape: HostShape) -> dict[str, Any]:
    """A JSON-able dict of a shape: `gpus`, `gpu_links` (matrix of `Link` names), `cpus`, memory."""
    uuids = shape.gpus.uuids
    matrix = [["X" if a == b else shape.gpus.link(a, b).name for b in uuids] for a in uuids]
    return {
        "gpus": [
            {"uuid": g.uuid, "pci_bus_id": g.pci_bus_id, "numa_node": g.numa_node}
            for g in shape.gpus.gpus
        ],
        "gpu_links": matrix,
        "cpus": [
            {"cpu": c.cpu, "core": c.core, "package": c.package, "node": c.node} for c in shape.cpus
        ],
        "memory_bytes": shape.memory_bytes,
    }


def shape_from_json(record: Mapping[str, Any]) -> HostShape:
    """The inverse of `shape_to_json`; `gpu_links` cells may also be nvidia-smi's (NV18, SYS)."""
    gpus = tuple(
        GpuPlace(str(g["uuid"]), str(g.get("pci_bus_id", "")), g.get("numa_node"))
        for g in record.get("gpus", ())
    )
    links: dict[frozenset[str], Link] = {}
    for i, row in enumerate(record.get("gpu_links", ())):
        for j, cell in enumerate(row):
            if i != j and i < len(gpus) and j < len(gpus):
                name = str(cell)
                link = Link[name] if name in Link.__members__ else _smi_link(name)
                links[frozenset((gpus[i].uuid, gpus[j].uuid))] = link
    cpus = tuple(
        Cpu(int(c["cpu"]), int(c["core"]), int(c.get("package", 0)), c.get("node"))
        for c in record.get("cpus", ())
    )
    return HostShape(GpuTopology(gpus, links), cpus, int(record.get("memory_bytes", 0)))
