"""Admission and placement on the topologies of real server layouts (tests/unit/samples)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from qudata_agent.adapters.store_codec import spec_from_json, spec_to_json
from qudata_agent.domain.container_spec import ContainerSpec
from qudata_agent.domain.placement import (
    GIB,
    Capacity,
    Holding,
    Placement,
    Refusal,
    Request,
    choose_gpus,
    decide,
    free,
    place,
    shared_cpus,
)
from qudata_agent.domain.topology import (
    Cpu,
    GpuPlace,
    GpuTopology,
    HostShape,
    Link,
    format_cpu_list,
    parse_cpu_list,
    parse_smi_topology,
    shape_from_json,
    shape_to_json,
)
from qudata_agent.errors import Conflict

SAMPLES = Path(__file__).parent / "samples"


def shape(name: str) -> HostShape:
    return shape_from_json(json.loads((SAMPLES / f"topology_{name}.json").read_text()))


H100 = shape("8x_h100_sxm_nvswitch")
PCIE = shape("8x_pcie_two_sockets")
CONSUMER = shape("4x_consumer_one_socket")


def cap(host: HostShape, max_instances: int = 8, disk_gib: int | None = 1000) -> Capacity:
    disk = None if disk_gib is None else disk_gib * GIB
    return Capacity(host, disk_free_bytes=disk, max_instances=max_instances)


def admitted(answer: Placement | Refusal) -> Placement:
    assert isinstance(answer, Placement), answer
    return answer


def indices(host: HostShape, gpus: tuple[str, ...]) -> list[int]:
    return [host.gpus.uuids.index(u) for u in gpus]


def test_the_samples_read_back_as_written() -> None:
    for host in (H100, PCIE, CONSUMER):
        assert shape_from_json(shape_to_json(host)) == host
    assert len(H100.cpus) == 224 and len(PCIE.cpus) == 40 and len(CONSUMER.cpus) == 64
    uuids = H100.gpus.uuids
    assert all(H100.gpus.link(a, b) is Link.NVLINK for a in uuids for b in uuids if a != b)
    assert [g.numa_node for g in H100.gpus.gpus] == [0, 0, 0, 0, 1, 1, 1, 1]


def test_nvidia_smi_topo_text_gives_the_same_links_as_the_sample() -> None:
    matrix = parse_smi_topology((SAMPLES / "nvidia_smi_topo_8x_pcie_two_sockets.txt").read_text())
    topology = matrix.topology(PCIE.gpus.uuids, [g.pci_bus_id for g in PCIE.gpus.gpus])
    assert topology == PCIE.gpus
    assert dict(matrix.numa_nodes) == {i: i // 4 for i in range(8)}


def test_nvidia_smi_topo_copied_with_spaces_and_nvlink() -> None:
    text = """\
        GPU0    GPU1    CPU Affinity    NUMA Affinity   GPU NUMA ID
GPU0     X      NV12    0-31            0               N/A
GPU1    NV12     X      0-31            N/A             N/A

Legend:
  X    = Self
"""
    matrix = parse_smi_topology(text)
    assert matrix.links == {(0, 1): Link.NVLINK, (1, 0): Link.NVLINK}
    assert matrix.numa_nodes == {0: 0, 1: None}
    with pytest.raises(ValueError):
        parse_smi_topology("no GPU here\n")


def test_cpu_lists() -> None:
    assert parse_cpu_list("0-3,8,10-11\n") == (0, 1, 2, 3, 8, 10, 11)
    assert parse_cpu_list("") == ()
    assert format_cpu_list((11, 0, 1, 2, 3, 8, 10)) == "0-3,8,10-11"
    assert format_cpu_list(()) == ""
    for bad in ("a", "3-1", "1-"):
        with pytest.raises(ValueError):
            parse_cpu_list(bad)


# -- GPUs ---------------------------------------------------------------------------


def test_pcie_pairs_share_a_switch_and_a_broken_pair_is_used_first() -> None:
    c = cap(PCIE)
    pair = admitted(decide(c, [], Request(gpu_count=2)))
    assert indices(PCIE, pair.gpus) == [0, 1]  # PIX, not PHB
    four = admitted(decide(c, [], Request(gpu_count=4)))
    assert indices(PCIE, four.gpus) == [0, 1, 2, 3]  # one socket, not across
    holding = [Holding(gpus=(PCIE.gpus.uuids[0],), cpu_cores=1, memory_bytes=GIB)]
    one = admitted(decide(c, holding, Request(gpu_count=1)))
    assert indices(PCIE, one.gpus) == [1]  # its switch partner is gone: keep 2-3 whole
    two = admitted(decide(c, holding, Request(gpu_count=2)))
    assert indices(PCIE, two.gpus) == [2, 3]
    four = admitted(decide(c, holding, Request(gpu_count=4)))
    assert indices(PCIE, four.gpus) == [4, 5, 6, 7]


def test_nvswitch_any_gpus_and_consumer_cards_by_root_complex() -> None:
    eight = admitted(decide(cap(H100), [], Request(gpu_count=8)))
    assert indices(H100, eight.gpus) == list(range(8))
    two = admitted(decide(cap(H100), [], Request(gpu_count=2)))
    assert indices(H100, two.gpus) == [0, 1]
    pair = admitted(decide(cap(CONSUMER, 4), [], Request(gpu_count=2)))
    assert indices(CONSUMER, pair.gpus) == [0, 1]  # PHB, not NODE
    taken = [Holding(gpus=(CONSUMER.gpus.uuids[2],), cpu_cores=4, memory_bytes=GIB)]
    assert indices(CONSUMER, admitted(decide(cap(CONSUMER, 4), taken, Request(1))).gpus) == [3]


def test_the_same_inputs_give_the_same_placement() -> None:
    request = Request(gpu_count=3, cpu_cores=6, memory_bytes=8 * GIB)
    answers = {decide(cap(PCIE), [], request) for _ in range(5)}
    assert len(answers) == 1


# -- CPU, memory and the shares -----------------------------------------------------


def test_whole_cores_on_the_numa_node_of_the_gpus() -> None:
    c = cap(PCIE)
    first = admitted(decide(c, [], Request(gpu_count=4, cpu_cores=4, memory_bytes=GIB)))
    # Node 0, whole cores with their siblings, core 0 (CPUs 0 and 20) left to the system.
    assert first.cpuset == (1, 2, 21, 22) and first.cpuset_cpus == "1-2,21-22"
    assert first.cpu_cores == 4
    second = admitted(decide(c, [first.holding()], Request(4, cpu_cores=4, memory_bytes=GIB)))
    assert indices(PCIE, second.gpus) == [4, 5, 6, 7]
    assert second.cpuset == (10, 11, 30, 31)  # node 1, where its GPUs are
    odd = admitted(decide(c, [], Request(cpu_cores=3, memory_bytes=GIB)))
    assert odd.cpuset == (1, 2, 21, 22)  # two whole cores for three CPUs: no shared sibling
    assert odd.cpu_cores == 3


def test_fractions_or_no_free_whole_cores_mean_no_cpuset() -> None:
    c = cap(CONSUMER, 4)
    assert admitted(decide(c, [], Request(cpu_cores=2.5, memory_bytes=GIB))).cpuset is None
    pinned = Holding(cpuset=(*range(1, 32), *range(33, 64)), cpu_cores=8, memory_bytes=GIB)
    answer = admitted(decide(c, [pinned], Request(cpu_cores=2, memory_bytes=GIB)))
    assert answer.cpuset is None and answer.cpu_cores == 2  # limits left, no whole core


def test_an_order_naming_nothing_gets_the_share_of_its_gpus() -> None:
    c = cap(H100)
    one = admitted(decide(c, [], Request(gpu_count=1)))
    assert one.cpu_cores == 27.87  # (224 - 1) / 8
    assert one.memory_bytes == (2015 - 2) * GIB // 8 // 2**20 * 2**20
    half = admitted(decide(c, [], Request(gpu_count=4)))
    assert half.cpu_cores == 111.5
    assert one.cpuset is None  # a share is not a whole number of cores


def test_with_one_instance_per_host_nothing_named_means_the_host_less_its_reserves() -> None:
    c = cap(PCIE, max_instances=1)
    answer = admitted(decide(c, [], Request(gpu_count=1)))
    assert answer.cpu_cores == c.cpu_cores and answer.memory_bytes == c.memory_bytes
    assert answer.cpuset is None
    no_gpu = Capacity(HostShape(cpus=PCIE.cpus, memory_bytes=64 * GIB), max_instances=1)
    alone = admitted(decide(no_gpu, [], Request()))
    assert alone.cpu_cores == len(PCIE.cpus) - 1 and alone.memory_bytes == 62 * GIB
    refused = decide(c, [answer.holding()], Request())
    assert isinstance(refused, Refusal)
    assert refused.message.startswith("the host already runs 1 instances, its maximum of 1")


def test_no_gpu_host_with_several_instances_gives_equal_slots() -> None:
    host = HostShape(cpus=CONSUMER.cpus, memory_bytes=66 * GIB)
    c = Capacity(host, disk_free_bytes=100 * GIB, max_instances=4)
    holdings: list[Holding] = []
    for _ in range(4):
        holdings.append(admitted(decide(c, holdings, Request())).holding())
    assert [h.cpu_cores for h in holdings] == [15.75] * 4  # (64 - 1) / 4
    assert [h.memory_bytes for h in holdings] == [16 * GIB] * 4  # (66 - 2) / 4
    assert free(c, holdings).cpu_cores == 0 and free(c, holdings).memory_bytes == 0
    gpu = decide(Capacity(host, max_instances=4), [], Request(gpu_count=1))
    assert isinstance(gpu, Refusal) and gpu.message == "needs 1 GPU, this host has none"


def test_a_share_is_cut_to_what_is_free() -> None:
    c = cap(PCIE)
    big = Holding(cpu_cores=35, memory_bytes=250 * GIB)
    answer = admitted(decide(c, [big], Request(gpu_count=2)))
    assert answer.cpu_cores == 4  # a quarter would be 9.75; 39 - 35 are free
    assert answer.memory_bytes == 4 * GIB


# -- refusals -----------------------------------------------------------------------


def test_refusals_name_what_is_short() -> None:
    c = cap(PCIE, max_instances=3, disk_gib=100)
    six = Holding(gpus=PCIE.gpus.uuids[:7], cpu_cores=30, memory_bytes=200 * GIB,
                  storage_bytes=80 * GIB, storage_used_bytes=20 * GIB)  # fmt: skip
    answer = decide(c, [six], Request(gpu_count=2, cpu_cores=10, memory_bytes=60 * GIB,
                                      storage_bytes=50 * GIB))  # fmt: skip
    assert isinstance(answer, Refusal)
    assert answer.shortages == (
        "needs 2 GPUs, 1 free",
        "needs 10 CPU cores, 9 free",
        "needs 60 GiB of memory, 54 free",
        "needs 50 GiB of disk, 40 free",
    )
    with pytest.raises(Conflict, match="needs 2 GPUs, 1 free"):
        place(c, [six], Request(gpu_count=2))
    unlimited = Holding(cpu_cores=None, memory_bytes=None)
    refused = decide(c, [unlimited], Request(cpu_cores=1, memory_bytes=GIB))
    assert isinstance(refused, Refusal)  # a holding without limits holds the whole host
    assert "needs 1 CPU cores, 0 free" in refused.shortages


def test_unknown_free_disk_is_not_checked_and_a_vanished_gpu_is_not_free() -> None:
    c = cap(CONSUMER, 4, disk_gib=None)
    assert admitted(decide(c, [], Request(storage_bytes=10**15, cpu_cores=1, memory_bytes=GIB)))
    gone = Holding(gpus=("GPU-not-here",), cpu_cores=1, memory_bytes=GIB)
    assert free(c, [gone]).gpus == CONSUMER.gpus.uuids


def test_a_host_without_cpu_topology_still_admits_by_limits() -> None:
    flat = HostShape(cpus=tuple(Cpu(i, i) for i in range(4)), memory_bytes=8 * GIB)
    answer = admitted(decide(Capacity(flat, max_instances=2), [], Request(cpu_cores=2)))
    assert answer.cpuset == (1, 2)  # one thread per core; CPU 0 left to the system


def test_a_holding_from_the_spec_an_instance_was_made_with() -> None:
    placement = admitted(decide(cap(PCIE), [], Request(2, cpu_cores=4, memory_bytes=GIB,
                                                       storage_bytes=5 * GIB)))  # fmt: skip
    spec = ContainerSpec(
        instance_id="i", agent_id="a", image="img", command=("sleep",),
        nano_cpus=int(4e9), cpuset_cpus=placement.cpuset_cpus, memory_bytes=GIB,
        gpu_uuids=placement.gpus, storage_bytes=5 * GIB,
    )  # fmt: skip
    stored = spec_from_json(spec_to_json(spec))
    assert stored is not None
    held = Holding.of_spec(stored, storage_used_bytes=GIB)
    assert held == replace(placement.holding(), storage_used_bytes=GIB)
    assert Holding.of_spec(replace(spec, nano_cpus=None, cpuset_cpus=None)).cpu_cores is None


def test_many_gpus_are_searched_greedily_and_still_keep_an_island_together() -> None:
    uuids = [f"GPU-{i:02d}" for i in range(20)]  # five NVLink islands of four
    links = {
        frozenset((a, b)): Link.NVLINK if i // 4 == j // 4 else Link.SYSTEM
        for i, a in enumerate(uuids)
        for j, b in enumerate(uuids)
        if i < j
    }
    topology = GpuTopology(tuple(GpuPlace(u) for u in uuids), links)
    assert choose_gpus(topology, uuids, 4) == tuple(uuids[:4])  # C(20, 4) > the exhaustive bound
    broken = [u for u in uuids if u != "GPU-01"]
    assert choose_gpus(topology, broken, 4) == tuple(uuids[4:8])
    assert choose_gpus(topology, broken, 3) == ("GPU-00", "GPU-02", "GPU-03")  # the broken one


def test_the_shared_pool_is_every_cpu_no_instance_holds() -> None:
    shape = HostShape(cpus=tuple(Cpu(i, i) for i in range(4)), memory_bytes=8 * GIB)
    capacity = Capacity(shape=shape, reserved_cpu_cores=0, max_instances=4)
    assert shared_cpus(capacity, []) == (0, 1, 2, 3)
    pinned = [Holding(cpuset=(1,)), Holding(cpuset=(3,)), Holding(cpu_cores=0.5)]
    assert shared_cpus(capacity, pinned) == (0, 2)
    everything = [Holding(cpuset=(0, 1, 2, 3))]
    assert shared_cpus(capacity, everything) == (0, 1, 2, 3)  # never an empty cpuset


def test_an_order_without_storage_gets_the_default_or_its_share_of_the_free_disk() -> None:
    host = HostShape(cpus=CONSUMER.cpus, memory_bytes=66 * GIB)
    alone = Capacity(host, disk_free_bytes=100 * GIB, max_instances=1)
    assert admitted(decide(alone, [], Request())).storage_bytes == 100 * GIB
    four = Capacity(host, disk_free_bytes=100 * GIB, max_instances=4)
    first = admitted(decide(four, [], Request()))
    assert first.storage_bytes == 25 * GIB
    set_by_provider = replace(four, default_storage_bytes=30 * GIB)
    assert admitted(decide(set_by_provider, [], Request())).storage_bytes == 30 * GIB
    # cut to what is free
    tight = replace(four, disk_free_bytes=4 * GIB, default_storage_bytes=30 * GIB)
    assert admitted(decide(tight, [], Request())).storage_bytes == 4 * GIB
    full = replace(four, disk_free_bytes=GIB // 2)
    assert admitted(decide(full, [], Request())).storage_bytes is None  # never refused
    unknown = replace(four, disk_free_bytes=None)
    assert admitted(decide(unknown, [], Request())).storage_bytes is None
    assert admitted(decide(four, [], Request(storage_bytes=3 * GIB))).storage_bytes == 3 * GIB


def test_a_default_size_is_a_ceiling_that_promises_no_disk() -> None:
    from qudata_agent.domain.container_spec import ContainerSpec

    spec = ContainerSpec("i", "a", "x:1", (), storage_bytes=50 * GIB, storage_asked=False)
    assert Holding.of_spec(spec).storage_bytes is None
    assert Holding.of_spec(replace(spec, storage_asked=True)).storage_bytes == 50 * GIB
