"""Tunnel mode: brings the WireGuard tunnel to the relay up and keeps it up.

What stays true:
- the tunnel comes up before the agent reports the relay's address, and a
  failure to bring it up is logged with its fix, never a crash: the agent's
  API and the instances keep running, and every check tries again;
- every check (a few seconds apart) finds what went missing and puts it back:
  the interface (wireguard-go died, someone deleted it), the routing rule, the
  table's route, the mangle chains; a handshake that is too old re-sets the
  relay peer (which re-resolves its name: roaming, a moved relay); a small
  datagram into the tunnel makes WireGuard notice a relay that forgot the
  session within seconds;
- the first failure of a streak is logged, and its end, not every check.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from qudata_agent.blocking import Blocking
from qudata_agent.domain.tunnel import (
    Health,
    Routing,
    TunnelConfig,
    TunnelConfigError,
    block_problem,
    build,
    health,
    probe_target,
    view,
)
from qudata_agent.errors import AgentError

log = logging.getLogger(__name__)


class TunnelDevice(Protocol):
    routing: Routing

    def exists(self) -> bool: ...

    def create(self) -> None: ...

    def configure(self, config: TunnelConfig) -> None: ...

    def set_peer(self, config: TunnelConfig) -> None: ...

    def rule_present(self) -> bool: ...

    def route_present(self) -> bool: ...

    def mangle_present(self) -> bool: ...

    def latest_handshake(self) -> float | None: ...

    def probe(self, target: str) -> None: ...


class Tunnel:
    def __init__(
        self,
        device: TunnelDevice,
        blocking: Blocking,
        public_key: str,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._device = device
        self._blocking = blocking
        self.public_key = public_key
        self._clock = clock
        self.config: TunnelConfig | None = None
        self._problem: str | None = None
        self._handshake: float | None = None
        self._started_at: float | None = None
        self.repairs = 0  # times something had to be put back
        self._lock = asyncio.Lock()  # a start and a check never run at once

    async def start_from_settings(
        self, fields: Mapping[str, str | None], *, standalone: bool
    ) -> None:
        """Up now when the settings hold the whole configuration; else /init may bring it."""
        try:
            config = build(fields, {})
        except TunnelConfigError as e:
            if standalone:
                log.error("tunnel mode is off: settings incomplete", extra={"error": str(e)})
            else:
                log.info("tunnel settings incomplete; waiting for /init", extra={"missing": str(e)})
            return
        await self.start(config)

    async def start_from_answer(
        self,
        fields: Mapping[str, str | None],
        offer: Mapping[str, str],
        port_range: tuple[int, int],
    ) -> TunnelConfig | None:
        """Up from /init's data.tunnel where the settings lacked it; the config it took, or
        None when the tunnel was already configured or the offer cannot be used (logged)."""
        if self.config is not None:
            return None
        try:
            config = build(fields, offer)
        except TunnelConfigError as e:
            log.error("tunnel mode is off: no complete tunnel settings", extra={"error": str(e)})
            return None
        problem = block_problem(offer.get("ports"), port_range)
        if problem:
            log.error("tunnel mode is off", extra={"error": problem})
            return None
        await self.start(config)  # on failure the checks keep trying: the address moves now
        return config

    async def start(self, config: TunnelConfig) -> bool:
        """Brings the tunnel up with `config`; False (logged, kept for the checks) on failure."""
        async with self._lock:
            self.config = config
            self._started_at = self._clock()
            try:
                await self._blocking.slow(self._up, config)
            except (AgentError, OSError) as e:
                self._fail(f"the tunnel cannot be brought up: {e}")
                return False
        log.info(
            "tunnel up",
            extra={
                "if": self._device.routing.interface,
                "endpoint": config.endpoint,
                "address": str(config.address),
                "public_address": config.public_address,
            },
        )
        return True

    def _up(self, config: TunnelConfig) -> None:
        self._device.create()
        self._device.configure(config)

    def _fail(self, problem: str) -> None:
        if self._problem is None:
            log.error("tunnel problem", extra={"problem": problem})
        self._problem = problem

    def _ok(self) -> None:
        if self._problem is not None:
            log.info("tunnel working again", extra={"was": self._problem})
        self._problem = None

    async def check(self) -> None:
        """One pass: put back what is missing, renew a stale peer, probe."""
        config = self.config
        if config is None:
            return
        try:
            async with self._lock:
                await self._blocking.quick(self._check, config)
        except (AgentError, OSError) as e:
            self._fail(f"tunnel check failed: {e}")

    def _check(self, config: TunnelConfig) -> None:
        device = self._device
        if not device.exists():
            log.warning(
                "tunnel interface gone; making it again", extra={"if": device.routing.interface}
            )
            self.repairs += 1
            device.create()
            device.configure(config)
        elif not (device.rule_present() and device.route_present() and device.mangle_present()):
            log.warning("tunnel routing changed; putting it back")
            self.repairs += 1
            device.configure(config)
        self._handshake = device.latest_handshake()
        age = self._age()
        since_start = self._clock() - (self._started_at or self._clock())
        if health(age) is Health.UP:
            self._ok()
        elif age is not None or since_start > 30:
            what = "no handshake yet" if age is None else f"last handshake {age:.0f} s ago"
            self._fail(
                f"{what}: the relay {config.endpoint} does not answer; check that this host"
                f" can send UDP to {config.endpoint} and that the relay has this host's key"
                f" {self.public_key}"
            )
            device.set_peer(config)  # re-resolve the relay's name, restart the handshake
        device.probe(probe_target(config.address))

    def _age(self) -> float | None:
        return None if self._handshake is None else max(0.0, self._clock() - self._handshake)

    def view(self) -> dict[str, Any]:
        return view(self.config, self._device.routing, self._age(), self._handshake, self._problem)
