"""The reconcile loop: the wall, then restore at start, then the network checked and a full
sync, on a grid.

What stays true: the tenant firewall is applied before the restore (which may
start containers) and before the first periodic pass; instances are restored
(builds resumed, containers adopted) before the first periodic pass; a broken
firewall or network is logged and never stops the sync (the reconciler counts
its own passes), while creates stay refused until the wall is verified.
"""

from __future__ import annotations

import contextlib
from typing import Protocol

from qudata_agent.errors import AgentError
from qudata_agent.loops.periodic import run_every
from qudata_agent.retry import until_done


class Reconciles(Protocol):
    async def restore(self) -> None: ...

    async def sync(self) -> None: ...


class Network(Protocol):
    async def prepare(self) -> None: ...

    async def check(self) -> None: ...


async def reconcile_loop(
    reconciler: Reconciles,
    network: Network,
    interval_s: float,
) -> None:
    async def tick() -> None:
        try:  # a broken firewall is logged by run_every, and never stops the sync
            await network.prepare()
            await network.check()
        finally:
            await reconciler.sync()

    with contextlib.suppress(AgentError):  # the wall first (the guard logs a failure)
        await network.check()
    await until_done(reconciler.restore, "restore instances from Docker")
    await run_every(interval_s, tick, "sync", first_delay_s=0)
