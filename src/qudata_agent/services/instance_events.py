"""Who hears of an instance's lifecycle: the one place listeners sign up.

`Records` publishes (a change, a new run of a container, a record that went);
each service that reacts takes this object in its constructor and signs up
there, so the reaction is read where it lives (the SSH service watches new
runs, the CPU pool and the network meter re-apply on runs and removals, the
image cache and the stats reporter wake on any change), not in the wiring.

What stays true: listeners are called in the order they signed up, on the
event loop's thread, and never wait (each only sets a flag or starts a task).
"""

from __future__ import annotations

from collections.abc import Callable

from qudata_agent.domain.instance import Instance


class InstanceEvents:
    def __init__(self) -> None:
        self._changed: list[Callable[[], None]] = []
        self._new_run: list[Callable[[Instance], None]] = []
        self._removed: list[Callable[[Instance], None]] = []

    def on_change(self, listener: Callable[[], None]) -> None:
        """`listener` is called after every lifecycle change (e.g. to send stats now)."""
        self._changed.append(listener)

    def on_new_run(self, listener: Callable[[Instance], None]) -> None:
        """`listener` is called each time a container starts a new run (SSH comes back)."""
        self._new_run.append(listener)

    def on_removed(self, listener: Callable[[Instance], None]) -> None:
        """`listener` is called once an instance's record is gone (deleted, or vanished)."""
        self._removed.append(listener)

    def changed(self) -> None:
        for listener in self._changed:
            listener()

    def new_run(self, instance: Instance) -> None:
        for listener in self._new_run:
            listener(instance)

    def removed(self, instance: Instance) -> None:
        for listener in self._removed:
            listener(instance)
        self.changed()
