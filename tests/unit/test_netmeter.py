"""The network meter's pass with fakes of nft and tc: totals never go back, finals once.

The real nftables and tc are exercised by tests/e2e/test_net_meter.py; here
the pass's bookkeeping: counters made when missing (and counted from 0), a
reset counter, the account read back by a new meter, a delete's last totals.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from qudata_agent.adapters.docker.ports import DockerPorts
from qudata_agent.blocking import Blocking
from qudata_agent.domain.container_spec import ContainerSpec, ContainerState
from qudata_agent.domain.instance import Instance, Status, Wanted
from qudata_agent.domain.netpolicy import EgressPolicy, counter_names
from qudata_agent.services.netmeter import NetMeter

ID = "11111111-2222-3333-4444-555555555555"


class FakeNft:
    def __init__(self) -> None:
        self.counters_: dict[str, tuple[int, int]] = {}
        self.listings = 0  # `nft list counters` calls
        self.keys: dict[str, str] = {}
        self.scripts: list[str] = []
        self.gone = False

    def apply(self, script: str) -> None:
        self.scripts.append(script)
        if script.startswith("add table"):
            self.gone = False
        for line in script.splitlines():
            if m := re.fullmatch(r"add counter ip \S+ (\S+)", line):
                self.counters_.setdefault(m.group(1), (0, 0))
            elif m := re.fullmatch(r"delete counter ip \S+ (\S+)", line):
                del self.counters_[m.group(1)]
            elif m := re.fullmatch(r'add element ip \S+ m_rx_public \{ (\S+) : "(\S+)" \}', line):
                self.keys[m.group(1)] = m.group(2)
            elif m := re.fullmatch(r"delete element ip \S+ m_rx_public \{ (\S+) \}", line):
                del self.keys[m.group(1)]

    def counters(self) -> dict[str, tuple[int, int]]:
        self.listings += 1
        return dict(self.counters_)

    def exists(self) -> bool:
        return not self.gone

    def flush_ruleset(self) -> None:
        self.counters_.clear()
        self.keys.clear()
        self.gone = True

    def map_keys(self, name: str) -> dict[str, str]:
        return dict(self.keys)

    def count(self, kind: str, size: int) -> None:
        self.counters_[counter_names(ID)[kind]] = (1, size)


@dataclass
class FakeShaper:
    shaped: list[tuple[str, str, float]] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    def attachment(self, pid: int) -> Any:
        return type("Where", (), {"address": f"172.30.0.{pid}", "veth": f"veth{pid}"})()

    def shape(self, veth: str, ifb: str, mbps: float) -> str:
        self.shaped.append((veth, ifb, mbps))
        return "ifb"

    def remove_ifb(self, name: str) -> None:
        self.removed.append(name)


class FakeEngine:
    def inspect(self, container_id: str) -> ContainerState:
        return ContainerState(container_id, "c", ID, "a", "running", pid=7)


@dataclass
class MemoryAccount:
    data: dict[str, Any] = field(default_factory=dict)

    def load(self) -> dict[str, Any]:
        return self.data

    def save(self, data: dict[str, Any]) -> None:
        self.data = data


def _instance(env: dict[str, str] | None = None, started: str = "t1") -> Instance:
    spec = ContainerSpec(instance_id=ID, agent_id="a", image="i", command=("x",), env=env or {})
    return Instance(ID, Status.RUNNING, Wanted.RUNNING, "i", "c", container_id="cid",
                    spec=spec, started_at=started)  # fmt: skip


@dataclass
class Rig:
    nft: FakeNft = field(default_factory=FakeNft)
    shaper: FakeShaper = field(default_factory=FakeShaper)
    account: MemoryAccount = field(default_factory=MemoryAccount)
    instances: list[Instance] = field(default_factory=list)

    def meter(
        self, default_mbps: float | None = None, clock: Callable[[], float] = time.monotonic
    ) -> NetMeter:
        async def listed() -> list[Instance]:
            return list(self.instances)

        blocking = Blocking()
        return NetMeter(instances=listed, nft=self.nft, shaper=self.shaper,
                        engine=DockerPorts(FakeEngine(), blocking),  # type: ignore[arg-type]
                        account=self.account, blocking=blocking, bridge="br0",
                        policy=EgressPolicy(), default_mbps=default_mbps,
                        clock=clock)  # fmt: skip


@pytest.fixture
def rig() -> Rig:
    return Rig(instances=[_instance({"QUDATA_NET_MBPS": "20"})])


async def test_totals_never_go_back_over_resets_and_remade_counters(rig: Rig) -> None:
    meter = rig.meter()
    await meter.refresh()
    assert set(counter_names(ID).values()) <= set(rig.nft.counters_)
    assert rig.nft.keys == {"172.30.0.7": counter_names(ID)["rx_public"]}
    assert rig.shaper.shaped == [("veth7", "qdifb1111111122", 20.0)]
    rig.nft.count("rx_public", 1000)
    await meter.refresh()
    rig.nft.count("rx_public", 300)  # the kernel's counter began anew
    await meter.refresh()
    use = meter.use(ID)
    assert use is not None and use.rx_public_bytes == 1300
    rig.nft.counters_.clear()  # the table is gone (a reboot): remade, counted from 0
    await meter.refresh()
    rig.nft.count("rx_public", 50)
    await meter.refresh()
    use = meter.use(ID)
    assert use is not None and use.rx_public_bytes == 1350 and use.rx_bytes == 1350


async def test_a_new_meter_reads_the_account_and_counts_nothing_twice(rig: Rig) -> None:
    first = rig.meter()
    await first.refresh()
    rig.nft.count("tx_public", 700)
    await first.refresh()
    again = rig.meter()  # the agent after a kill -9: the kernel kept counting
    rig.nft.count("tx_public", 900)
    await again.refresh()
    use = again.use(ID)
    assert use is not None and use.tx_public_bytes == 900


async def test_a_deleted_instance_s_totals_are_handed_over_once(rig: Rig) -> None:
    meter = rig.meter()
    await meter.refresh()
    rig.nft.count("rx_private", 4000)
    rig.instances = []  # deleted: its counters are read once more, then removed
    await meter.refresh()
    assert not rig.nft.counters_ and not rig.nft.keys
    assert rig.shaper.removed == ["qdifb1111111122"]
    finals = await meter.take_finals()
    assert [(i, u.rx_bytes) for i, u in finals] == [(ID, 4000)]
    assert await meter.take_finals() == []
    assert meter.use(ID) is None


async def test_the_last_pass_at_close_retires_an_instance_deleted_just_before(
    rig: Rig,
) -> None:
    meter = rig.meter()
    await meter.refresh()
    rig.nft.count("tx_public", 700)
    rig.instances = []  # deleted, and the agent stops before the loop's next pass
    await meter.close()
    assert not rig.nft.counters_ and not rig.nft.keys
    assert [(i, u.tx_public_bytes) for i, u in await meter.take_finals()] == [(ID, 700)]
    assert rig.account.data  # the finals are on disk for the next start's report


async def test_a_last_pass_that_hangs_does_not_hold_up_the_stop(rig: Rig) -> None:
    meter = rig.meter()
    await meter.refresh()
    stuck = threading.Event()
    rig.nft.counters = lambda: (stuck.wait(10), {})[1]  # type: ignore[method-assign]
    loop = asyncio.get_running_loop()
    began = loop.time()
    await meter.close(timeout_s=0.2)
    assert loop.time() - began < 2  # given up at its deadline: the next start makes it
    stuck.set()


async def test_the_host_default_caps_an_order_without_its_own() -> None:
    rig = Rig(instances=[_instance()])
    await rig.meter(default_mbps=50).refresh()
    assert rig.shaper.shaped == [("veth7", "qdifb1111111122", 50.0)]
    rig = Rig(instances=[_instance()])
    await rig.meter().refresh()
    assert rig.shaper.shaped == []


async def test_a_new_run_is_attached_and_capped_again(rig: Rig) -> None:
    meter = rig.meter()
    await meter.refresh()
    await meter.refresh()
    assert len(rig.shaper.shaped) == 1  # the same run: nothing to do
    rig.instances = [_instance({"QUDATA_NET_MBPS": "20"}, started="t2")]
    await meter.refresh()
    assert len(rig.shaper.shaped) == 2


async def test_a_table_removed_behind_its_back_is_made_again_and_counts_on(rig: Rig) -> None:
    meter = rig.meter()
    await meter.refresh()
    rig.nft.count("rx_public", 100)
    await meter.refresh()
    rig.nft.flush_ruleset()  # a firewall reload
    await meter.refresh()
    assert not rig.nft.gone and rig.nft.keys == {"172.30.0.7": counter_names(ID)["rx_public"]}
    rig.nft.count("rx_public", 30)
    await meter.refresh()
    use = meter.use(ID)
    assert use is not None and use.rx_public_bytes == 130


async def test_counters_no_instance_of_the_account_owns_go_at_the_first_pass(rig: Rig) -> None:
    first = rig.meter()
    await first.refresh()
    rig.nft.count("tx_public", 700)
    await first.refresh()  # the account knows ID; the kernel also holds a wiped agent's:
    stray = counter_names("99999999-0000-0000-0000-000000000000")
    rig.nft.apply("".join(f"add counter ip t {n}\n" for n in stray.values()))
    rig.nft.apply(f'add element ip t m_rx_public {{ 172.30.0.99 : "{stray["rx_public"]}" }}')
    again = rig.meter()
    await again.refresh()
    assert set(rig.nft.counters_) == set(counter_names(ID).values())
    assert rig.nft.keys == {"172.30.0.7": counter_names(ID)["rx_public"]}
    use = again.use(ID)
    assert use is not None and use.tx_public_bytes == 700  # its own counter kept counting
    rig.nft.apply("".join(f"add counter ip t {n}\n" for n in stray.values()))
    await again.refresh()  # only the first pass sweeps: later strays are not this agent's doing
    assert set(stray.values()) <= set(rig.nft.counters_)


async def test_a_pass_of_the_last_second_serves_a_report_without_another(rig: Rig) -> None:
    now = [100.0]
    meter = rig.meter(clock=lambda: now[0])
    await meter.refresh()
    rig.nft.listings = 0
    rig.nft.count("rx_public", 100)
    now[0] += 0.5
    await meter.refresh(within_s=1.0)  # a burst of reports: the pass of 0.5 s ago will do
    assert rig.nft.listings == 0
    now[0] += 0.6
    await meter.refresh(within_s=1.0)  # 1.1 s since the last pass: counted anew
    assert rig.nft.listings == 1 and meter.use(ID).wire()["rx_public_bytes"] == 100
    rig.instances = []
    await meter.refresh()  # the meter's own passes (a poke, the loop, the stop) always run
    assert [i for i, _ in await meter.take_finals()] == [ID]


async def test_a_pass_lists_the_counters_once(rig: Rig) -> None:
    meter = rig.meter()
    await meter.refresh()  # the first pass makes the counters, then lists them again
    rig.nft.listings = 0
    rig.nft.count("rx_public", 100)
    await meter.refresh()
    assert rig.nft.listings == 1
    assert meter.use(ID) is not None and meter.use(ID).wire()["rx_public_bytes"] == 100


async def test_the_loop_leaves_the_passes_to_the_stats_tick_but_answers_a_poke(rig: Rig) -> None:
    meter = rig.meter()
    passes = 0
    refresh = meter.refresh

    async def counted() -> None:
        nonlocal passes
        passes += 1
        await refresh()

    meter.refresh = counted  # type: ignore[method-assign]
    loop = asyncio.create_task(meter.run(interval_s=1.0))
    try:
        await asyncio.sleep(0.05)
        assert passes == 1  # its first pass, at once
        for _ in range(25):  # the stats tick refreshes well within the interval, 2.5 s long
            await refresh()
            await asyncio.sleep(0.1)
        assert passes == 1, "the loop passed again although the tick had just done it"
        meter.poke()
        await asyncio.sleep(0.05)
        assert passes == 2  # a poke (a new run, a delete) is answered at once
    finally:
        loop.cancel()
