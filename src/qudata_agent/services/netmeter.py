"""The network meter: each instance's bytes, its caps and its refused connections.

Owns the account (`domain.netpolicy.Tally` per counter, persisted after every
pass that moved it), what the kernel is told about each run of a container
(its address in the counter maps, its veth's caps), and the last totals of
deleted instances until a `/stats` report has carried them.

What stays true:
- totals never go back: a kernel counter that is read again adds what it grew,
  one that began anew (a reboot, a table made again) adds all it holds, one
  the agent is about to make is first recorded as starting at 0 (so a crash
  in between never counts a byte twice); the account is written after the
  read, so a kill -9 between the two only delays the count;
- each new run of a container (a new address, a new veth) is found on the
  next pass (a new-run event pokes one at once): its address is pointed at
  the instance's counters and its cap applied again;
- a deleted instance's counters are read once more after its container went,
  then removed from the kernel; its totals wait (on disk too) until
  `take_finals` hands them to a report, or an hour passes. The agent's stop
  makes one last pass (`close`), so a delete just before it leaves no
  counter behind;
- counters the account does not know (an agent killed with its instances
  still there, then its state directory wiped: a reinstall) are removed at
  the first pass: a counter is on the account before it is made, so one
  missing from it is no instance of this agent's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from qudata_agent.background import Streak
from qudata_agent.blocking import Blocking
from qudata_agent.domain.instance import Instance, Status
from qudata_agent.domain.netpolicy import (
    EgressPolicy,
    NetworkUse,
    Tally,
    counter_names,
    counters_script,
    delete_counters_script,
    elements_script,
    ifb_name,
    parse_mbps,
    ruleset,
)
from qudata_agent.errors import AgentError
from qudata_agent.services.engine import Containers
from qudata_agent.services.instance_events import InstanceEvents

log = logging.getLogger(__name__)

INTERVAL_S = 3.0
FINAL_KEEP_S = 3600.0
CLOSE_TIMEOUT_S = 5.0
_KEY_MAP = "m_rx_public"  # every map has the same keys: this one is read


class Nft(Protocol):
    def apply(self, script: str) -> None: ...

    def counters(self) -> dict[str, tuple[int, int]]: ...

    def map_keys(self, name: str) -> dict[str, str]: ...

    def exists(self) -> bool: ...


class Shaper(Protocol):
    def attachment(self, pid: int) -> Any: ...  # adapters.traffic_control.Attachment

    def shape(self, veth: str, ifb: str, mbps: float) -> str: ...

    def remove_ifb(self, name: str) -> None: ...


class Account(Protocol):
    def load(self) -> dict[str, Any]: ...

    def save(self, data: dict[str, Any]) -> None: ...


@dataclass
class _Run:
    key: tuple[str, str | None]  # (container id, StartedAt): a new value is a new run
    address: str
    veth: str
    cap: str | None = None  # "ifb"/"police" once capped


@dataclass
class _Final:
    use: NetworkUse
    since: float
    tallies: dict[str, Tally] = field(default_factory=dict)


def net_limit(instance: Instance, default_mbps: float | None) -> float | None:
    """The instance's cap in Mbit/s: its order's QUDATA_NET_MBPS, else the host's default."""
    if instance.spec is None:
        return default_mbps
    env = instance.spec.env
    try:
        own = parse_mbps(env)
    except AgentError:
        own = None  # refused at create; an old record keeps the default
    return own if own is not None else default_mbps


def _measure(kind: str, reading: tuple[int, int]) -> int:
    """Bytes for traffic counters, packets (one per refused connection) for refusals."""
    return reading[0] if kind.startswith("refused_") else reading[1]


class NetMeter:
    def __init__(
        self,
        *,
        instances: Callable[[], Awaitable[Sequence[Instance]]],
        nft: Nft,
        shaper: Shaper,
        engine: Containers,
        account: Account,
        blocking: Blocking,
        bridge: str,
        policy: EgressPolicy,
        default_mbps: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        events: InstanceEvents | None = None,
    ) -> None:
        self._instances = instances
        self._nft = nft
        self._shaper = shaper
        self._engine = engine
        self._account = account
        self._blocking = blocking
        self._bridge = bridge
        self._policy = policy
        self._default_mbps = default_mbps
        self._clock = clock
        self._lock = asyncio.Lock()
        self._poked = asyncio.Event()
        self._ready = False
        self._tallies: dict[str, dict[str, Tally]] = {}
        self._finals: dict[str, _Final] = {}
        self._runs: dict[str, _Run] = {}
        self._streak = Streak()
        self._loaded = False
        self._swept = False
        if events is not None:
            events.on_new_run(self.poke)  # a new run has a new veth: caps and maps at once
            events.on_removed(self.poke)  # a deleted instance's last count, then its counters go
        self._saved: dict[str, Any] | None = None
        self._last_pass = -math.inf  # when the last pass began (the loop's own or the tick's)

    # -- what others read -----------------------------------------------------------

    def use(self, instance_id: str) -> NetworkUse | None:
        tallies = self._tallies.get(instance_id)
        return NetworkUse.of(dict(tallies)) if tallies is not None else None

    def uses(self) -> dict[str, NetworkUse]:
        """Every instance's figures (deleted ones until their final report), for /metrics."""
        # A pass on a worker thread may add or drop entries: iterate over copies.
        out = {i: f.use for i, f in list(self._finals.items())}
        out.update({i: NetworkUse.of(dict(t)) for i, t in list(self._tallies.items())})
        return out

    async def take_finals(self) -> list[tuple[str, NetworkUse]]:
        """Deleted instances' last totals, handed over once (to the next `/stats` report)."""
        async with self._lock:
            taken = [(i, f.use) for i, f in self._finals.items()]
            self._finals.clear()
        return taken  # the next pass writes the account without them

    def poke(self, _instance: Instance | None = None) -> None:
        self._poked.set()

    # -- passes -----------------------------------------------------------------------

    async def run(self, interval_s: float = INTERVAL_S) -> None:
        """A pass at once when poked, else whenever none ran for `interval_s`.

        The stats tick refreshes on its own 3 s grid: this loop then has
        nothing left to do but the pokes (and keeps the figures moving in
        standalone mode, where there is no tick).
        """
        while True:
            due = self._last_pass + interval_s - self._clock()
            if due > 0 and not self._poked.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._poked.wait(), due)
                if not self._poked.is_set():
                    continue  # a refresh by the tick may have moved the next pass on
            self._poked.clear()
            await self.refresh()

    async def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """The last pass, when the agent stops: deleted instances retired, the account
        written (a failing or slow pass is given up: the next start makes it)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self.refresh()

    async def refresh(self, within_s: float = 0.0) -> None:
        """One pass: new runs attached and capped, counters read, the account written.

        A pass that began within `within_s` seconds (waited for if in flight) is
        fresh enough: then none is made. The stats reports ask so, for they come
        in bursts (one per lifecycle change) and a pass costs a few nft calls.
        """
        async with self._lock:
            if self._clock() - self._last_pass < within_s:
                return
            self._last_pass = self._clock()
            try:
                await self._blocking.quick(self._ensure_table)
                instances = list(await self._instances())
                runs = await self._new_runs(instances)
                await self._blocking.quick(self._pass, instances, runs)
            except AgentError as e:
                if self._streak.failed():
                    log.error("network meter pass failed", extra={"error": e.message})
                return
            if self._streak.recovered():
                log.info("network meter works again")

    async def _new_runs(self, instances: list[Instance]) -> dict[str, _Run]:
        """The running instances whose container started a run the meter has not seen."""
        found: dict[str, _Run] = {}
        live = {i.id for i in instances}
        self._runs = {k: v for k, v in self._runs.items() if k in live}
        for instance in instances:
            if instance.status is not Status.RUNNING or not instance.container_id:
                continue
            key = (instance.container_id, instance.started_at)
            known = self._runs.get(instance.id)
            if known is not None and known.key == key:
                continue
            try:
                state = await self._engine.inspect(instance.container_id)
                if not state.running or not state.pid:
                    continue
                where = await self._blocking.quick(self._shaper.attachment, state.pid)
            except AgentError as e:
                log.warning(
                    "network meter cannot find the instance's interface yet",
                    extra={"instance_id": instance.id, "error": e.message},
                )
                continue
            found[instance.id] = _Run(key, where.address, where.veth)
        return found

    def _ensure_table(self) -> None:
        """The table in place: made at the first pass, and again if something removed it
        (a firewall reload's `nft flush ruleset`); then every run is attached again."""
        if not self._loaded:
            self._load()
        if self._ready and self._nft.exists():
            return
        if self._ready:
            log.warning("the network meter's nftables table was gone; made again")
        self._nft.apply(ruleset(self._bridge, self._policy))
        self._runs.clear()
        self._ready = True

    def _pass(self, instances: list[Instance], runs: dict[str, _Run]) -> None:
        live = {i.id: i for i in instances}
        for instance_id in live:
            self._tallies.setdefault(instance_id, {})
        if not self._swept:
            self._sweep()
        readings = self._ensure_counters()
        if runs:
            self._attach(runs)
        for instance_id, run in runs.items():
            self._cap(live[instance_id], run)
            self._runs[instance_id] = run
        readings = self._read(readings)
        self._retire([i for i in self._tallies if i not in live], readings)
        self._expire()
        self._save()

    def _sweep(self) -> None:
        """Counters of no instance in the account removed (once, at the first pass)."""
        known = {n for i in [*self._tallies, *self._finals] for n in counter_names(i).values()}
        present = self._nft.counters()
        orphans = {n for n in present if n not in known}
        if orphans:
            self._remove_counters(orphans, present)
            log.info(
                "network meter: counters of unknown instances removed",
                extra={"counters": len(orphans)},
            )
        self._swept = True

    def _ensure_counters(self) -> dict[str, tuple[int, int]] | None:
        """The counters listed; every instance's made when missing. Returns the listing,
        or None when counters were just made (the caller lists again)."""
        present = self._nft.counters()
        missing: list[str] = []
        for instance_id, tallies in self._tallies.items():
            for kind, name in counter_names(instance_id).items():
                if name not in present:
                    tallies[kind] = tallies.get(kind, Tally()).restarted()
                    missing.append(name)
        if not missing:
            return present
        self._save()  # "starts at 0" is on disk before the counter exists
        self._nft.apply(counters_script(self._bridge, missing))
        return None

    def _attach(self, runs: dict[str, _Run]) -> None:
        """Points each new run's address at its instance's counters (and no other address)."""
        keys = self._nft.map_keys(_KEY_MAP)
        prefixes = {i: counter_names(i)["rx_public"] for i in runs}
        remove = [
            address
            for address, counter in keys.items()
            if address in {r.address for r in runs.values()} or counter in prefixes.values()
        ]
        add = {run.address: instance_id for instance_id, run in runs.items()}
        self._nft.apply(elements_script(self._bridge, add, remove))

    def _cap(self, instance: Instance, run: _Run) -> None:
        mbps = net_limit(instance, self._default_mbps)
        if mbps is None:
            return
        try:
            run.cap = self._shaper.shape(run.veth, ifb_name(instance.id), mbps)
        except AgentError as e:
            log.error(
                "the instance's network cap could not be applied",
                extra={"instance_id": instance.id, "error": e.message},
            )
            return
        log.info(
            "network cap applied",
            extra={"instance_id": instance.id, "mbps": mbps, "veth": run.veth, "how": run.cap},
        )

    def _read(
        self, readings: dict[str, tuple[int, int]] | None = None
    ) -> dict[str, tuple[int, int]]:
        """Every tally advanced to its counter; the listing read (made here if None)."""
        if readings is None:
            readings = self._nft.counters()
        for instance_id, tallies in self._tallies.items():
            for kind, name in counter_names(instance_id).items():
                reading = readings.get(name)
                if reading is not None:
                    tallies[kind] = tallies.get(kind, Tally()).advance(_measure(kind, reading))
        return readings

    def _retire(self, gone: list[str], present: Collection[str]) -> None:
        """Deleted instances: their last totals kept for the report, their kernel state
        removed (`present`: the counters of this pass's listing)."""
        if not gone:
            return
        now = self._clock()
        for instance_id in gone:
            tallies = self._tallies[instance_id]
            self._finals[instance_id] = _Final(NetworkUse.of(tallies), now, tallies)
        self._save()  # the finals are on disk before the counters go
        self._remove_counters({n for i in gone for n in counter_names(i).values()}, present)
        for instance_id in gone:
            self._shaper.remove_ifb(ifb_name(instance_id))
            del self._tallies[instance_id]
            log.info("network meter: instance retired", extra={"instance_id": instance_id})

    def _remove_counters(self, names: Collection[str], present: Collection[str]) -> None:
        """These counters (those of them `present`) and the addresses pointing at them go."""
        keys = self._nft.map_keys(_KEY_MAP)
        stale = [address for address, counter in keys.items() if counter in names]
        script = elements_script(self._bridge, {}, stale)
        script += delete_counters_script(self._bridge, [n for n in names if n in present])
        self._nft.apply(script)

    def _expire(self) -> None:
        limit = self._clock() - FINAL_KEEP_S
        for instance_id in [i for i, f in self._finals.items() if f.since < limit]:
            del self._finals[instance_id]

    # -- the account on disk ------------------------------------------------------------

    def _load(self) -> None:
        data = self._account.load()
        for instance_id, kinds in dict(data.get("tallies", {})).items():
            self._tallies[instance_id] = {k: Tally(int(v[0]), int(v[1])) for k, v in kinds.items()}
        for instance_id, kinds in dict(data.get("finals", {})).items():
            tallies = {k: Tally(int(v[0]), int(v[1])) for k, v in kinds.items()}
            self._finals[instance_id] = _Final(NetworkUse.of(tallies), self._clock(), tallies)
        self._loaded = True

    def _save(self) -> None:
        def dump(tallies: dict[str, Tally]) -> dict[str, list[int]]:
            return {k: [t.raw, t.total] for k, t in tallies.items()}

        data = {
            "tallies": {i: dump(t) for i, t in self._tallies.items()},
            "finals": {i: dump(f.tallies) for i, f in self._finals.items()},
        }
        if data != self._saved:
            self._account.save(data)
            self._saved = data
