"""Docker's event stream of the agent's containers.

What stays true: only container events of containers labelled as this
agent's are read; each stream has a connection of its own, and `close()`
from any thread ends its iteration (so does `until` passing, or Docker
going away); a reader that needs every event resynchronises from
`list_managed` after reconnecting.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import docker
import docker.types

from qudata_agent.adapters.docker import answers
from qudata_agent.adapters.docker.client import Connection
from qudata_agent.domain.container_spec import LABEL_AGENT
from qudata_agent.errors import AgentError


class Events(Connection):
    def events(
        self, agent_id: str, since: float | None = None, until: float | None = None
    ) -> EventStream:
        """(action, container id) for each event of this agent's containers.

        Blocks between events. Stop it with `close()` on the returned stream
        (from any thread) or `close_events()`; with `until` it also ends by
        itself once that time has passed. Times are Unix seconds.
        """
        api = self._own_client(self._timeout)
        try:
            with self._translated("Docker event stream"):
                stream = api.events(
                    since=_docker_time(since),
                    until=_docker_time(until),
                    filters={"type": "container", "label": f"{LABEL_AGENT}={agent_id}"},
                    decode=True,
                )
        except AgentError:
            api.close()
            raise
        events = EventStream(stream, api, lambda s: self._track(s, False))
        self._track(events, True)
        return events

    def close_events(self) -> None:
        """Closes every open event stream; their readers see the iteration end."""
        with self._streams_lock:
            streams = [s for s in self._streams if isinstance(s, EventStream)]
        for stream in streams:
            stream.close()


class EventStream:
    """An iterator of (action, container id); `close()` from any thread ends it.

    The action is Docker's verbatim ("create", "start", "die", "oom", "stop",
    "destroy", "exec_start: sh ..."). The iteration also ends, quietly, when
    `until` passes or the connection to Docker drops; a caller that needs
    every event resynchronises from `list_managed` after reconnecting.
    """

    def __init__(
        self,
        stream: docker.types.CancellableStream[dict[str, Any]],
        api: docker.APIClient,
        on_close: Callable[[EventStream], None],
    ) -> None:
        self._stream = stream
        self._api = api
        self._on_close = on_close
        self._closed = False
        self._lock = threading.Lock()
        self._items = self._generate()

    def __iter__(self) -> EventStream:
        return self

    def __next__(self) -> tuple[str, str]:
        return next(self._items)

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _generate(self) -> Iterator[tuple[str, str]]:
        try:
            for event in self._stream:
                seen = answers.container_event(event)
                if seen is not None:
                    yield seen
        finally:
            self.close()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        with contextlib.suppress(OSError, AttributeError):  # Docker's side closed it
            self._stream.close()  # shuts the socket down, waking a blocked read
        self._api.close()
        self._on_close(self)


def _docker_time(t: float | None) -> Any:
    # Docker takes "seconds.nanoseconds"; the SDK's stubs only admit ints.
    return None if t is None else f"{t:.9f}"
