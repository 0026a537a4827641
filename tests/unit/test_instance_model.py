"""The instance's transition table, its record form, and how Docker states map to it."""

from __future__ import annotations

from dataclasses import replace

import pytest

from qudata_agent.adapters.store_codec import (
    instance_from_json,
    instance_to_json,
    spec_from_json,
    spec_to_json,
)
from qudata_agent.domain.container_spec import ContainerSpec, ContainerState, PortBinding
from qudata_agent.domain.instance import (
    ALLOWED,
    Action,
    IllegalTransition,
    Instance,
    Status,
    Wanted,
    observe,
)


def _instance(status: Status = Status.RUNNING, wanted: Wanted = Wanted.RUNNING) -> Instance:
    return Instance(
        id="i-1",
        status=status,
        wanted=wanted,
        image="busybox:1",
        container_name="qudata-i-1",
        ports={"22": 20001, "53/udp": 20002},
        gpus=("GPU-a",),
        container_id="c-1",
    )


def _state(status: str, exit_code: int | None = 0, **kw: object) -> ContainerState:
    return ContainerState(
        container_id="c-1",
        name="qudata-i-1",
        instance_id="i-1",
        agent_id="a",
        status=status,
        exit_code=exit_code,
        **kw,  # type: ignore[arg-type]
    )


def test_every_transition_outside_the_table_is_refused() -> None:
    for source in Status:
        for target in Status:
            instance = _instance(source)
            if target in ALLOWED[source]:
                assert instance.move(target, now=1.0).status is target
            else:
                with pytest.raises(IllegalTransition):
                    instance.move(target, now=1.0)


def test_the_first_failure_reason_is_kept() -> None:
    failed = _instance(Status.PENDING).move(Status.ERROR, now=1, reason="pull failed: denied")
    again = failed.move(Status.ERROR, now=2, reason="cleanup failed")
    assert again.reason == "pull failed: denied"


def test_pending_phase_is_cleared_when_it_leaves_pending() -> None:
    pending = _instance(Status.PENDING).move(Status.PENDING, now=1, phase="pulling")
    assert pending.phase == "pulling"
    assert pending.move(Status.RUNNING, now=2).phase is None


@pytest.mark.parametrize("action", list(Action))
def test_actions_only_on_built_instances(action: Action) -> None:
    for status in (Status.PENDING, Status.DESTROYED):
        with pytest.raises(IllegalTransition):
            _instance(status).check_action(action)
    failed_build = replace(_instance(Status.ERROR), container_id=None, reason="pull denied")
    with pytest.raises(IllegalTransition, match="creation failed"):
        failed_build.check_action(action)
    _instance(Status.RUNNING).check_action(action)
    _instance(Status.PAUSED).check_action(action)
    _instance(Status.ERROR).check_action(action)  # a crashed one keeps its container


def test_exit_0_is_done_and_a_crash_docker_gave_up_on_is_an_error() -> None:
    done = observe(_instance(), _state("exited", 0), now=1)
    assert (done.status, done.exit_code) == (Status.PAUSED, 0)
    assert "finished" in (done.reason or "")

    gave_up = _state("exited", 2, restart_policy="on-failure", max_retries=3, restart_count=3)
    crashed = observe(_instance(), gave_up, now=1)
    assert (crashed.status, crashed.exit_code) == (Status.ERROR, 2)
    assert "crashed" in (crashed.reason or "") and "3 restarts" in (crashed.reason or "")
    assert crashed.container_id == "c-1"  # kept, with its data
    # Still restarting (Docker has retries left): not an error yet.
    retrying = _state("exited", 2, restart_policy="on-failure", max_retries=3, restart_count=1)
    assert observe(_instance(), retrying, now=1).status is Status.PAUSED
    # Started again by the renter: out of error.
    assert observe(crashed, _state("running"), now=2).status is Status.RUNNING


def test_record_round_trip() -> None:
    instance = _instance().move(Status.PAUSED, now=5, reason="stopped", exit_code=137)
    assert instance_from_json(instance_to_json(instance), None) == instance


def test_spec_round_trip() -> None:
    spec = ContainerSpec(
        instance_id="i",
        agent_id="a",
        image="busybox:1",
        command=("tail", "-f", "/dev/null"),
        env={"A": "1"},
        ports=(PortBinding(22, 20001), PortBinding(53, 20002, "udp")),
        gpu_uuids=("GPU-1",),
    )
    assert spec_from_json(spec_to_json(spec)) == spec
    with_spec = replace(_instance(), spec=spec)
    assert instance_from_json(instance_to_json(with_spec), spec) == with_spec
    assert spec.name == "qudata-i"
    assert spec.labels == {"qudata.agent_id": "a", "qudata.instance_id": "i"}


def test_observe_maps_docker_states() -> None:
    running = observe(_instance(Status.PAUSED), _state("running"), now=1)
    assert (running.status, running.reason, running.exit_code) == (Status.RUNNING, None, None)

    exited = observe(_instance(), _state("exited", 3), now=1)
    assert exited.status is Status.PAUSED and exited.exit_code == 3
    assert "on its own" in (exited.reason or "")

    oom = observe(_instance(), _state("exited", 137, oom_killed=True), now=1)
    assert "out of memory" in (oom.reason or "")

    stopped = observe(_instance(wanted=Wanted.STOPPED), _state("exited", 143), now=1)
    assert (stopped.status, stopped.reason) == (Status.PAUSED, "stopped")

    restarting = observe(_instance(), _state("restarting", 1), now=1)
    assert restarting.status is Status.PAUSED and "restarting" in (restarting.reason or "")

    dead = observe(_instance(), _state("dead", 1, error="device busy"), now=1)
    assert dead.status is Status.ERROR and "device busy" in (dead.reason or "")
