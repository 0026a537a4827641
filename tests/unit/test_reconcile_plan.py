"""The reconcile plan, pure: each rule, and what it must never do."""

from __future__ import annotations

from dataclasses import replace

from qudata_agent.domain.container_spec import ContainerState
from qudata_agent.domain.instance import Instance, Status, Wanted
from qudata_agent.domain.reconcile import (
    Forget,
    Observe,
    RemoveLeftover,
    RemoveOrphan,
    Start,
    Stop,
    plan,
)

NOW = 1000.0


def _instance(iid: str = "i1", **kw: object) -> Instance:
    base = Instance(
        id=iid,
        status=Status.RUNNING,
        wanted=Wanted.RUNNING,
        image="busybox:1",
        container_name=f"qudata-{iid}",
        container_id=f"c-{iid}",
        wanted_at=100.0,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def _state(iid: str | None = "i1", **kw: object) -> ContainerState:
    base = ContainerState(
        container_id=f"c-{iid}",
        name=f"qudata-{iid}",
        instance_id=iid,
        agent_id="a",
        status="running",
        created_ts=50.0,
        started_ts=150.0,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def test_an_orphan_is_removed_only_past_the_grace_period() -> None:
    old, young = _state("gone"), _state("new", created_ts=NOW - 1)
    steps = plan([], [old, young], now=NOW, grace_s=10)
    assert steps == [RemoveOrphan("c-gone", "gone")]
    assert plan([], [_state("x", created_ts=None)], now=NOW) == []  # age unknown: kept


def test_a_container_being_built_or_pending_is_left_to_its_build() -> None:
    assert plan([], [_state("b")], building={"b"}, now=NOW) == []
    pending = _instance(status=Status.PENDING, container_id=None)
    assert plan([pending], [], now=NOW) == []


def test_a_built_instance_whose_container_is_gone_is_forgotten() -> None:
    assert plan([_instance()], [], now=NOW) == [Forget("i1")]


def test_the_leftover_of_a_failed_build_is_removed() -> None:
    failed = _instance(status=Status.ERROR, container_id=None)
    assert plan([failed], [_state()], now=NOW) == [RemoveLeftover("i1", "c-i1")]
    assert plan([failed], [], now=NOW) == []


def test_a_running_container_the_renter_wanted_stopped_is_stopped() -> None:
    wanted_stopped = _instance(wanted=Wanted.STOPPED)
    steps = plan([wanted_stopped], [_state()], now=NOW)
    assert steps == [Observe("i1", _state()), Stop("i1", "c-i1")]


def test_a_start_asked_for_after_the_last_run_is_carried_out() -> None:
    exited = _state(status="exited", exit_code=0, started_ts=90.0)  # before wanted_at
    assert plan([_instance()], [exited], now=NOW)[-1] == Start("i1", "c-i1")


def test_a_finished_job_or_a_crash_docker_gave_up_on_is_not_started_again() -> None:
    done = _state(status="exited", exit_code=0, restart_policy="on-failure", max_retries=5)
    gave_up = replace(done, exit_code=3, restart_count=5)
    for state in (done, gave_up):
        assert plan([_instance()], [state], now=NOW) == [Observe("i1", state)]


def test_a_crash_killed_before_its_retries_ran_out_is_started() -> None:
    """A dockerd restart or a reboot: Docker's on-failure does not bring it back."""
    killed = _state(
        status="exited", exit_code=143, restart_policy="on-failure", max_retries=5, restart_count=1
    )
    assert plan([_instance()], [killed], now=NOW)[-1] == Start("i1", "c-i1")
    # Not while Docker itself is restarting it, and not once the renter stopped it.
    assert Start("i1", "c-i1") not in plan(
        [_instance()], [replace(killed, status="restarting")], now=NOW
    )
    assert plan([_instance(wanted=Wanted.STOPPED)], [killed], now=NOW) == [Observe("i1", killed)]


def test_nothing_is_removed_that_a_record_claims() -> None:
    records = [_instance("i1"), _instance("i2", status=Status.PAUSED)]
    states = [_state("i1"), _state("i2", status="exited", exit_code=0)]
    removals = (RemoveOrphan, RemoveLeftover, Forget)
    assert not [s for s in plan(records, states, now=NOW) if isinstance(s, removals)]


def test_an_idle_instance_found_stopped_when_the_agent_starts_is_started_saying_why() -> None:
    """`docker stop` while the agent was away: an idle instance always comes back."""
    stopped = _state(status="exited", exit_code=137, restart_policy="unless-stopped")
    steps = plan([_instance(status=Status.PAUSED)], [stopped], now=NOW, at_start=True)
    assert steps[-1] == Start("i1", "c-i1", at_start=True)
    assert isinstance(steps[-1], Start) and "idle" in steps[-1].why
    # While the agent runs, a stop outside it is reported, not fought; nor is a
    # stop the renter asked for undone, nor a job that finished started again.
    assert plan([_instance()], [stopped], now=NOW) == [Observe("i1", stopped)]
    wanted_stopped = _instance(wanted=Wanted.STOPPED)
    assert plan([wanted_stopped], [stopped], now=NOW, at_start=True) == [Observe("i1", stopped)]
    job = replace(stopped, exit_code=0, restart_policy="on-failure", max_retries=5)
    assert plan([_instance()], [job], now=NOW, at_start=True) == [Observe("i1", job)]
