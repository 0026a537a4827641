"""Property: no sequence of admits and releases over-commits anything, on any host shape."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from qudata_agent.domain.placement import (
    GIB,
    Capacity,
    Holding,
    Placement,
    Refusal,
    Request,
    decide,
)
from qudata_agent.domain.topology import (
    Cpu,
    GpuPlace,
    GpuTopology,
    HostShape,
    Link,
    shape_from_json,
)

SAMPLES = Path(__file__).parent / "samples"
SAMPLE_SHAPES = [
    shape_from_json(json.loads(p.read_text())) for p in sorted(SAMPLES.glob("topology_*.json"))
]


@st.composite
def random_shapes(draw: st.DrawFn) -> HostShape:
    n_gpus = draw(st.integers(0, 8))
    uuids = [f"GPU-{i}" for i in range(n_gpus)]
    gpus = tuple(GpuPlace(u, "", draw(st.sampled_from([None, 0, 1]))) for u in uuids)
    links = {
        frozenset((a, b)): draw(st.sampled_from(list(Link)))
        for i, a in enumerate(uuids)
        for b in uuids[i + 1 :]
    }
    threads = draw(st.integers(1, 2))
    cores = draw(st.integers(1, 12))
    nodes = draw(st.integers(1, 2))
    cpus = tuple(Cpu(t * cores + c, c, 0, c % nodes) for t in range(threads) for c in range(cores))
    return HostShape(GpuTopology(gpus, links), cpus, draw(st.integers(1, 64)) * GIB)


shapes = st.one_of(st.sampled_from(SAMPLE_SHAPES), random_shapes())
requests = st.builds(
    Request,
    gpu_count=st.integers(0, 4),
    cpu_cores=st.one_of(st.none(), st.integers(1, 40).map(float), st.floats(0.01, 40)),
    memory_bytes=st.one_of(st.none(), st.integers(6 * 2**20, 80 * GIB)),
    storage_bytes=st.one_of(st.none(), st.integers(1, 200 * GIB)),
)
# Each step: admit a request, or release the k-th instance held.
steps = st.lists(st.one_of(requests, st.integers(0, 7)), max_size=25)


def check(capacity: Capacity, holdings: list[Holding]) -> None:
    host = capacity.shape
    assert len(holdings) <= capacity.max_instances
    gpus = [u for h in holdings for u in h.gpus]
    assert len(gpus) == len(set(gpus)) and set(gpus) <= set(host.gpus.uuids)
    pinned = [c for h in holdings for c in h.cpuset]
    assert len(pinned) == len(set(pinned)) and set(pinned) <= {c.cpu for c in host.cpus}
    cpu = sum(capacity.cpu_cores if h.cpu_cores is None else h.cpu_cores for h in holdings)
    assert cpu <= capacity.cpu_cores + 1e-6
    memory = sum(capacity.memory_bytes if h.memory_bytes is None else h.memory_bytes
                 for h in holdings)  # fmt: skip
    assert memory <= capacity.memory_bytes
    disk = sum(h.storage_bytes or 0 for h in holdings)
    assert capacity.disk_free_bytes is None or disk <= capacity.disk_free_bytes
    for h in holdings:  # a cpuset is whole cores: every sibling of each core it touches
        cores = {(c.package, c.core) for c in host.cpus if c.cpu in h.cpuset}
        assert {c.cpu for c in host.cpus if (c.package, c.core) in cores} == set(h.cpuset)


@settings(max_examples=300, deadline=None)
@given(
    shape=shapes,
    max_instances=st.integers(1, 8),
    reserve=st.sampled_from([0.0, 1.0, 2.5]),
    disk=st.one_of(st.none(), st.integers(0, 500).map(lambda g: g * GIB)),
    steps=steps,
)
def test_no_sequence_over_commits(
    shape: HostShape,
    max_instances: int,
    reserve: float,
    disk: int | None,
    steps: list[Request | int],
) -> None:
    capacity = Capacity(shape, disk, reserve, 2 * GIB, max_instances)
    holdings: list[Holding] = []
    for step in steps:
        if isinstance(step, int):
            if holdings:
                holdings.pop(step % len(holdings))
        else:
            answer = decide(capacity, holdings, step)
            assert decide(capacity, holdings, step) == answer  # deterministic
            if isinstance(answer, Refusal):
                assert answer.shortages and all(answer.shortages)
                continue
            assert isinstance(answer, Placement)
            assert len(answer.gpus) == step.gpu_count
            if step.cpu_cores is not None:
                assert answer.cpu_cores == step.cpu_cores
            holdings.append(answer.holding())
        check(capacity, holdings)
