"""The isolation tiers this host offers, found out and kept current; the check an order passes.

Owns the `Offer` (`domain.isolation`) the agent works from: which runtimes
Docker has registered (asked each pass), whether a probe container starts
under each (run once per runtime definition: name, path and arguments, and
again when a probe failed), whether a sandbox may have this host's GPUs
(its runsc's `nvproxy` and the NVIDIA driver), and whether GPU orders may run
at all (the NVIDIA Container Toolkit's version, `domain.nvidia_toolkit`).

What stays true:
- nothing is offered before it was seen to work: until the first pass ends,
  a create waits for it (bounded by the probe's own time limit);
- a probe container has no network, no agent label and is removed whatever
  happens; it runs under the slow pool with its own time limit, so a hung
  runtime holds up neither the API nor another create's check;
- an order for a tier the host lacks makes one fresh pass (at most one every
  `recheck_s`), so a runtime registered after the start is found without a
  restart of the agent;
- a pass that cannot reach Docker keeps the last offer (an unreachable
  daemon says nothing about its runtimes); before any offer, a create gets
  503 naming Docker, never a 409 naming a runtime.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from qudata_agent.blocking import Blocking
from qudata_agent.domain.isolation import (
    CONTAINER_RUNTIME,
    DEFAULT_SANDBOX_RUNTIME,
    Offer,
    ProbeResult,
    RuntimeInfo,
    SandboxGpus,
    Tier,
    decide_offer,
    refusal,
)
from qudata_agent.domain.nvidia_toolkit import Version, toolkit_refusal
from qudata_agent.errors import AgentError, Conflict, Unavailable
from qudata_agent.services.engine import Engine

log = logging.getLogger(__name__)

PROBE_ARGV = ["/busybox", "true"]


class HostTools(Protocol):
    """The host-side reads (`adapters.runtimes`), each blocking and bounded."""

    def probe_image(self) -> tuple[bytes, str] | None: ...

    def sandbox_gpus(self, runsc: str) -> SandboxGpus: ...

    def toolkit_version(self) -> Version | None: ...


class Isolation:
    def __init__(
        self,
        *,
        engine: Engine,  # Docker's runtimes, the probe image imported, a probe
        tools: HostTools,
        blocking: Blocking,
        driver: Callable[[], Awaitable[tuple[int, str | None]]],  # (GPU count, driver version)
        sandbox_runtime: str = DEFAULT_SANDBOX_RUNTIME,
        toolkit_floor: Version | None = None,
        probe_timeout_s: float = 30.0,
        recheck_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = engine
        self._tools = tools
        self._blocking = blocking
        self._driver = driver
        self._sandbox_runtime = sandbox_runtime
        self._toolkit_floor = toolkit_floor
        self._probe_timeout_s = probe_timeout_s
        self._recheck_s = recheck_s
        self._clock = clock
        self._probes: dict[RuntimeInfo, ProbeResult] = {}  # by full definition
        self._gpus: dict[RuntimeInfo, SandboxGpus] = {}
        self._offer: Offer | None = None
        self._last_pass = -float("inf")
        self._lock = asyncio.Lock()

    @property
    def sandbox_runtime(self) -> str:
        return self._sandbox_runtime

    def current(self) -> Offer | None:
        """The offer of the last pass, without waiting (None before the first)."""
        return self._offer

    async def offer(self) -> Offer:
        """The current offer; the first call waits for the first pass."""
        if self._offer is None:
            return await self.refresh()
        return self._offer

    async def check(self, tier: Tier, gpu_count: int) -> None:
        """Raises Conflict naming why an order for `tier` with `gpu_count` GPUs cannot run."""
        offer = await self.offer()
        if offer.unreachable is not None:
            offer = await self.refresh()
            if offer.unreachable is not None:
                raise Unavailable(offer.unreachable)
        why = refusal(offer, tier, gpu_count)
        if why is not None and self._clock() - self._last_pass >= self._recheck_s:
            offer = await self.refresh()  # maybe registered since the last pass
            why = refusal(offer, tier, gpu_count)
        if why is not None:
            raise Conflict(why)

    async def refresh(self) -> Offer:
        """One pass: Docker's runtimes, a probe of each new one, the GPU decisions."""
        async with self._lock:
            self._last_pass = self._clock()
            try:
                runtimes = await self._engine.runtimes()
            except AgentError as e:
                # Docker down says nothing about the runtimes: the last offer stands.
                log.warning("cannot list Docker's runtimes", extra={"error": e.message})
                if self._offer is not None:
                    return self._offer
                why = f"Docker did not answer ({e.message})"
                return Offer(tiers=(), missing={t: why for t in Tier}, unreachable=why)
            probes = {}
            for name in (CONTAINER_RUNTIME, self._sandbox_runtime):
                if name in runtimes:
                    probes[name] = await self._probe(runtimes[name])
            gpus, driver, gpu_refusal = await self._gpu_facts(runtimes, probes)
            offer = decide_offer(
                runtimes,
                probes,
                sandbox_runtime=self._sandbox_runtime,
                gpus=gpus,
                driver_version=driver,
                gpu_refusal=gpu_refusal,
            )
            if offer != self._offer:
                log.info(
                    "isolation tiers",
                    extra={"offered": offer.names(), "missing": {**offer.missing}},
                )
            self._offer = offer
            return offer

    async def _gpu_facts(
        self, runtimes: dict[str, RuntimeInfo], probes: dict[str, ProbeResult]
    ) -> tuple[SandboxGpus | None, str | None, str | None]:
        """(what the sandbox's runsc says about GPUs, the driver, why GPU orders are refused)."""
        count, driver = await self._driver()
        if count == 0:
            return None, driver, None
        version = await self._blocking.quick(self._tools.toolkit_version)
        refused = toolkit_refusal(version, self._toolkit_floor)
        sandbox = runtimes.get(self._sandbox_runtime)
        probe = probes.get(self._sandbox_runtime)
        if sandbox is None or probe is None or not probe.started:
            return None, driver, refused
        if sandbox not in self._gpus:
            self._gpus[sandbox] = await self._blocking.quick(self._tools.sandbox_gpus, sandbox.path)
        return self._gpus[sandbox], driver, refused

    async def _probe(self, runtime: RuntimeInfo) -> ProbeResult:
        known = self._probes.get(runtime)
        if known is not None and known.started:
            return known
        result = await self._run_probe(runtime.name)
        self._probes[runtime] = result
        if not result.started:
            log.warning(
                "a container does not start under a runtime",
                extra={"runtime": runtime.name, "error": result.reason},
            )
        return result

    async def _run_probe(self, runtime: str) -> ProbeResult:
        image = await self._blocking.quick(self._tools.probe_image)
        if image is None:
            return ProbeResult(False, "the host has no static busybox for the probe")
        tar, ref = image
        try:
            await self._engine.import_image(tar, ref)
            await asyncio.wait_for(
                self._engine.probe_runtime(runtime, ref, PROBE_ARGV, self._probe_timeout_s),
                self._probe_timeout_s + 5,
            )
        except TimeoutError:
            return ProbeResult(False, f"no answer within {self._probe_timeout_s:g} s")
        except AgentError as e:
            return ProbeResult(False, e.message)
        return ProbeResult(True)
