"""The agent's side of the control plane, in the order it happens.

1. The public address is settled (the relay's in tunnel mode, else the
   configured one, the lookups', the default route's) and put among the TLS
   certificate's names.
2. Registration (`POST /init`), retried with backoff until the control plane
   answers, only once the agent's port answers.
3. Tunnel mode with the tunnel in /init's answer: the tunnel comes up, the
   relay's address becomes the agent's, and the agent registers again.
4. Then, and only then, the stats every 3 s and the inventory checks.

What stays true: nothing goes to the control plane before it knows this agent,
and a failure in any step is retried by that step, never ends the agent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from qudata_agent.domain.backoff import Backoff
from qudata_agent.loops.inventory import inventory_loop
from qudata_agent.loops.registration import registration_loop
from qudata_agent.services.registration import Registrar
from qudata_agent.services.tunnel import Tunnel


@dataclass(frozen=True)
class ControlPlaneSteps:
    address: Callable[[], Awaitable[str | None]]  # step 1
    registrar: Callable[[str | None], Registrar]  # the registrar presenting that address
    renew_tls: Callable[[str | None], Awaitable[None]]  # the names follow the address
    backoff: Backoff
    retry_on: tuple[type[BaseException], ...]
    report_stats: Callable[[], Coroutine[Any, Any, None]]  # the stats reporter's loop
    inventory_interval_s: float
    tunnel: Tunnel | None = None
    tunnel_fields: dict[str, str | None] | None = None
    port_range: tuple[int, int] = (1, 65535)


async def control_plane_loop(steps: ControlPlaneSteps, listening: asyncio.Future[int]) -> None:
    address = await steps.address()
    await steps.renew_tls(address)
    registrar = steps.registrar(address)
    await registration_loop(registrar, listening, steps.backoff, steps.retry_on)
    await _tunnel_from_answer(steps, registrar, await listening)
    async with asyncio.TaskGroup() as group:
        group.create_task(steps.report_stats())
        group.create_task(inventory_loop(registrar.refresh_inventory, steps.inventory_interval_s))


async def _tunnel_from_answer(steps: ControlPlaneSteps, registrar: Registrar, port: int) -> None:
    """The tunnel from /init's data.tunnel where the settings lacked it, then re-register."""
    if steps.tunnel is None:
        return
    config = await steps.tunnel.start_from_answer(
        steps.tunnel_fields or {}, registrar.tunnel_offer, steps.port_range
    )
    if config is None:
        return
    await steps.renew_tls(config.public_address)  # the relay's address among the names
    registrar.move(config.public_address)
    await registrar.register(port)
