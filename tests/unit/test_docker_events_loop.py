"""The Docker events loop: a handler's failure is that event's alone, never a lost stream."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from qudata_agent.adapters.docker.ports import DockerPorts
from qudata_agent.blocking import Blocking
from qudata_agent.domain.instance import IllegalTransition
from qudata_agent.loops.docker_events import docker_events_loop


class Stream:
    def __init__(self, items: list[tuple[str, str]]) -> None:
        self._items = items

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._items)

    def close(self) -> None:
        pass


class Source:
    """One window of three events, then quiet windows."""

    def __init__(self) -> None:
        self.windows = 0

    def events(self, agent_id: str, since: float, until: float) -> Stream:
        self.windows += 1
        if self.windows == 1:
            return Stream([("die", "c1"), ("start", "c2"), ("die", "c3")])
        return Stream([])


async def test_a_raising_handler_does_not_stop_the_loop_or_count_as_a_lost_stream() -> None:
    source = Source()
    seen: list[str] = []
    resumed: list[bool] = []

    async def on_event(container_id: str) -> None:
        seen.append(container_id)
        if container_id == "c1":
            raise IllegalTransition("instance cannot go from error to pending")
        if container_id == "c2":
            raise RuntimeError("a bug in one handler")

    async def on_resume() -> None:
        resumed.append(True)

    blocking = Blocking()
    loop = asyncio.ensure_future(
        docker_events_loop(DockerPorts(source, blocking), "a", on_event, on_resume, window_s=0.01)
    )
    try:
        for _ in range(200):
            if source.windows >= 3:
                break
            await asyncio.sleep(0.01)
        assert not loop.done()  # still running
        assert seen == ["c1", "c2", "c3"]
        assert source.windows >= 3  # it went on reading windows
        assert resumed == []  # a handler's error is not a gap in the stream
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
        blocking.close()
