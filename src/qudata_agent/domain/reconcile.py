"""The reconcile plan: what to do so that Docker matches what the store wants.

`plan(wanted, observed, ...)` is pure. `wanted` is every instance record, read
from the store *before* `observed` (the labelled containers) was listed, so a
container that a create made after the store read shows up without a record:
it must not be taken for an orphan. Two guards keep such a container: the
grace period (a container younger than `grace_s` is never removed) and the
applier's re-check of the store right before a removal.

What stays true:
- an instance being built (`building`) or still `pending` is left to its build;
- a container is removed only when no record claims it (an orphan older than
  the grace period) or when it is the leftover of a build that failed;
- a record is dropped only when its built container is missing from a listing
  taken after the record was read (the applier confirms with an inspect);
- an instance converges towards `wanted`: a container running while the
  renter wanted it stopped is stopped; one not running while the renter asked
  for it to run *after* its last start (the intent was recorded but the start
  never happened: the agent crashed in between) is started, and so is a
  crashed command Docker stopped restarting before its retries ran out (a
  dockerd restart or a reboot killed it: Docker's on-failure policy does not
  bring those back). A command that exited 0 is done and stays so; a crash
  Docker gave up on (retries used) is left stopped;
- an idle instance (`command: null`, Docker's `unless-stopped`) always comes
  back: one found stopped by the first pass after the agent starts (stopped
  behind its back while it was away, e.g. `docker stop`) is started. While
  the agent runs, a stop outside it is reported (`paused`), not fought.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from qudata_agent.domain.container_spec import ContainerState
from qudata_agent.domain.instance import Instance, Status, Wanted

DEFAULT_GRACE_S = 10.0


@dataclass(frozen=True)
class RemoveOrphan:
    """A labelled container with no record (older than the grace period)."""

    container_id: str
    instance_id: str | None


@dataclass(frozen=True)
class RemoveLeftover:
    """The container of a build that failed (its removal failed then, e.g. Docker was down)."""

    instance_id: str
    container_id: str


@dataclass(frozen=True)
class Forget:
    """The built container is gone (removed behind the agent's back): drop the record."""

    instance_id: str


@dataclass(frozen=True)
class Observe:
    """Bring the record in line with what Docker reports for its container."""

    instance_id: str
    state: ContainerState


@dataclass(frozen=True)
class Start:
    instance_id: str
    container_id: str
    why: str = field(default="", compare=False)  # for the log: what left it stopped
    at_start: bool = False  # planned by the first pass after the agent started


@dataclass(frozen=True)
class Stop:
    instance_id: str
    container_id: str


Step = RemoveOrphan | RemoveLeftover | Forget | Observe | Start | Stop


def plan(
    wanted: Sequence[Instance],
    observed: Sequence[ContainerState],
    *,
    building: Iterable[str] = (),
    now: float,
    grace_s: float = DEFAULT_GRACE_S,
    at_start: bool = False,
) -> list[Step]:
    """The steps, orphans first; each instance's steps in the order they apply.

    `at_start`: this is the first pass since the agent started."""
    busy = frozenset(building)
    records = {instance.id: instance for instance in wanted}
    steps: list[Step] = []
    for state in observed:
        if state.instance_id in records or state.instance_id in busy:
            continue
        if _age(state, now) >= grace_s:
            steps.append(RemoveOrphan(state.container_id, state.instance_id))
    for instance in wanted:
        if instance.id in busy or instance.status is Status.PENDING:
            continue
        steps.extend(_converge(instance, _container_of(instance, observed), at_start))
    return steps


def _converge(instance: Instance, state: ContainerState | None, at_start: bool) -> list[Step]:
    if instance.container_id is None:  # a build that failed: nothing of it may stay
        return [] if state is None else [RemoveLeftover(instance.id, state.container_id)]
    if state is None:
        return [Forget(instance.id)]
    steps: list[Step] = [Observe(instance.id, state)]
    if instance.wanted is Wanted.STOPPED and state.status in ("running", "restarting"):
        steps.append(Stop(instance.id, state.container_id))
    elif instance.wanted is Wanted.RUNNING:
        why = missed_start(instance, state, at_start)
        if why is not None:
            steps.append(Start(instance.id, state.container_id, why, at_start))
    return steps


IDLE_POLICY = "unless-stopped"  # domain.container_spec.restart_policy of `command: null`


def missed_start(instance: Instance, state: ContainerState, at_start: bool = False) -> str | None:
    """Why the container should run while nothing else will start it (None: it should not).

    The renter asked for a run that never began (the container last started
    before that); a crashed command was left stopped with restarts to spare
    (killed by a dockerd restart or a reboot); or, on the first pass after
    the agent started, an idle instance was found stopped.
    """
    if state.status not in ("exited", "created"):
        return None
    if instance.wanted_at > 0 and (
        state.started_ts is None or state.started_ts < instance.wanted_at
    ):
        return "the start the renter asked for never happened"
    crashed = state.status == "exited" and bool(state.exit_code)
    if crashed and state.restart_policy == "on-failure" and not state.gave_up:
        return "a crash was left stopped with restarts to spare"
    if at_start and state.restart_policy == IDLE_POLICY:
        return "an idle instance was stopped while the agent was away; it always comes back"
    return None


def start_was_missed(instance: Instance, state: ContainerState, at_start: bool = False) -> bool:
    """The container should run and nothing else will start it (`missed_start`)."""
    return missed_start(instance, state, at_start) is not None


def _container_of(instance: Instance, observed: Sequence[ContainerState]) -> ContainerState | None:
    for state in observed:
        if state.instance_id == instance.id or state.container_id == instance.container_id:
            return state
    return None


def _age(state: ContainerState, now: float) -> float:
    # A container whose creation time Docker did not give is treated as new.
    return 0.0 if state.created_ts is None else now - state.created_ts
