"""The instance: the one renter container the control plane asked for, and its states.

                 create
                   |
                   v
    +---------> pending ----------------------+
    |              |  pulled, created, started |  failure (pull, create, start):
    |              v                           v  no container is left
    |           running <------------+      error
    |           |     ^               |     ^   |
    |     stop, |     | start,        |     |   | start, restart: only a crashed
    |     exit  v     | restart       |     |   | one (its container is kept)
    |           paused -+             |     |   v
    |              |   Docker gave up restarting a crash   running / paused
    |              +--------------------------+
    |
    |    delete (from any state) ---> destroyed (the record is gone)
    +--- (a create cut short by a crash is resumed from pending)

`pending` carries a phase (queued, pulling, creating, starting) for the
answer. A command that exits 0 is done: `paused` with `exit_code` 0, and it
stays so. One that crashes is restarted by Docker a bounded number of times
(domain.container_spec.restart_policy); when Docker gives up, the instance is
`error` with the exit code, its container and data kept, and `start` runs it
again. An `error` from a failed build has no container: only delete helps.
Only the transitions in `ALLOWED` happen; `Instance.move` refuses the rest,
and the first failure reason is kept (a later failure does not hide the
cause). Pure: no I/O, no clocks except those passed in.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum

from qudata_agent.domain.container_spec import ContainerSpec, ContainerState


class Status(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    ERROR = "error"
    DESTROYED = "destroyed"


class Wanted(StrEnum):
    """What the renter last asked for: the reconciler converges towards it."""

    RUNNING = "running"
    STOPPED = "stopped"


class Action(StrEnum):
    STOP = "stop"
    START = "start"
    RESTART = "restart"


ALLOWED: dict[Status, frozenset[Status]] = {
    Status.PENDING: frozenset({Status.PENDING, Status.RUNNING, Status.PAUSED, Status.ERROR}),
    Status.RUNNING: frozenset({Status.RUNNING, Status.PAUSED, Status.ERROR}),
    Status.PAUSED: frozenset({Status.PAUSED, Status.RUNNING, Status.ERROR}),
    # Out of error only a crashed instance (one with a container) moves, by an action.
    Status.ERROR: frozenset({Status.ERROR, Status.RUNNING, Status.PAUSED}),
    Status.DESTROYED: frozenset(),
}

# Which statuses each action may start from (anything else is a 409).
ACTION_FROM: dict[Action, frozenset[Status]] = {
    Action.STOP: frozenset({Status.RUNNING, Status.PAUSED, Status.ERROR}),
    Action.START: frozenset({Status.RUNNING, Status.PAUSED, Status.ERROR}),
    Action.RESTART: frozenset({Status.RUNNING, Status.PAUSED, Status.ERROR}),
}


class IllegalTransition(ValueError):
    pass


@dataclass(frozen=True)
class Instance:
    id: str
    status: Status
    wanted: Wanted
    image: str
    container_name: str
    ports: dict[str, int] = field(default_factory=dict)  # "22" or "53/udp" -> host port
    gpus: tuple[str, ...] = ()
    container_id: str | None = None
    phase: str | None = None  # detail of pending: queued, pulling, creating, starting
    reason: str | None = None
    exit_code: int | None = None
    ssh_enabled: bool = False
    created_at: float = 0.0
    updated_at: float = 0.0
    spec: ContainerSpec | None = None  # what the container is made from (no credentials)
    started_at: str | None = None  # Docker's StartedAt: a new value means a new run
    wanted_at: float = 0.0  # when `wanted` was last recorded (the reconcile's yardstick)

    def new_run_of(self, before: Instance) -> bool:
        """True when this (running) instance is a fresh start compared with `before`."""
        return self.status is Status.RUNNING and (
            before.status is not Status.RUNNING or before.started_at != self.started_at
        )

    def move(self, status: Status, *, now: float, **changes: object) -> Instance:
        """The instance after a transition to `status`; refuses illegal ones."""
        if status not in ALLOWED[self.status]:
            raise IllegalTransition(f"instance cannot go from {self.status} to {status}")
        if status is Status.ERROR and self.status is Status.ERROR:
            changes.pop("reason", None)  # keep the first failure's reason
        if status is not Status.PENDING:
            changes.setdefault("phase", None)
        return replace(self, status=status, updated_at=now, **changes)  # type: ignore[arg-type]

    def check_action(self, action: Action) -> None:
        if self.status not in ACTION_FROM[action]:
            raise IllegalTransition(
                f"cannot {action} an instance that is {self.status}"
                + (f" ({self.phase})" if self.phase else "")
            )
        if self.container_id is None:
            raise IllegalTransition(
                f"cannot {action} an instance whose creation failed ({self.reason});"
                " delete it and create it again"
            )

    def want(self, wanted: Wanted, now: float) -> Instance:
        """The renter's intent, recorded before the Docker call that carries it out."""
        return replace(self, wanted=wanted, wanted_at=now, updated_at=now)

    def require_spec(self) -> ContainerSpec:
        """The container spec; every record the create path writes has one."""
        if self.spec is None:
            raise ValueError(f"instance {self.id} has no container spec recorded")
        return self.spec


def observe(instance: Instance, state: ContainerState, now: float) -> Instance:
    """The instance after Docker reported `state` for its container.

    A container that exited while the renter wanted it running exited on its
    own: it is reported `paused` with its exit code, never removed.
    """
    seen = {"container_id": state.container_id, "started_at": state.started_at}
    if state.status == "running":
        return instance.move(Status.RUNNING, now=now, reason=None, exit_code=None, **seen)
    if state.status == "dead":
        reason = "Docker reports the container dead" + (f": {state.error}" if state.error else "")
        return instance.move(
            Status.ERROR, now=now, reason=reason, exit_code=state.exit_code, **seen
        )
    if state.gave_up and instance.wanted is Wanted.RUNNING:
        reason = (
            f"crashed: exited with code {state.exit_code}"
            + (" (killed: out of memory)" if state.oom_killed else "")
            + f" after {state.restart_count} restarts; left stopped with its data"
            " (see last_logs; start runs it again)"
        )
        if instance.status is Status.ERROR:
            reason = instance.reason or reason  # the same crash, seen again
        return replace(
            instance.move(Status.ERROR, now=now, exit_code=state.exit_code, **seen), reason=reason
        )
    return instance.move(
        Status.PAUSED,
        now=now,
        reason=_paused_reason(instance, state),
        exit_code=state.exit_code,
        **seen,
    )


def _paused_reason(instance: Instance, state: ContainerState) -> str:
    if state.status == "paused":
        return "frozen by a `docker pause` outside the agent"
    if state.status == "restarting":
        return f"exited with code {state.exit_code}; Docker is restarting it"
    if instance.wanted is Wanted.STOPPED:
        return "stopped"
    if state.status == "created":
        return "created, not started" + (f": {state.error}" if state.error else "")
    if state.exit_code == 0:
        return "finished: the command exited with code 0 (start runs it again)"
    reason = f"exited on its own with code {state.exit_code}"
    if state.oom_killed:
        reason += " (killed: out of memory)"
    return reason
