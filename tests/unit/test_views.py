"""The read view of an instance: its record with what is live around it.

Each field of `InstanceView` is checked against where it comes from: the
record, the engine's logs (bounded, and said so), the pull in flight, the
image check in the store, and the other services' parts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from qudata_agent.domain.instance import Instance, Status, Wanted
from qudata_agent.domain.isolation import SANDBOX_NOTES
from qudata_agent.domain.log_tail import (
    LAST_LOG_BYTES,
    LOG_ANSWER_BYTES,
    LOG_READ_TIMEOUT_S,
    LogTail,
)
from qudata_agent.errors import NotFound
from qudata_agent.services.views import LAST_LOG_LINES, LAST_LOG_READ_S, InstanceView
from support.fake_engine import FakeEngine
from support.services import Base, base_on, make_images, make_views, record, spec_of


class LogEngine(FakeEngine):
    """Logs as the test sets them; every read recorded; pulls report progress."""

    def __init__(self) -> None:
        super().__init__()
        self.tail = LogTail("line 1\nline 2\n")
        self.reads: list[tuple[str, int, int]] = []
        self.timeouts: list[float] = []

    def logs(self, container_id: str, tail: int, max_bytes: int, timeout_s: float) -> LogTail:
        self.reads.append((container_id, tail, max_bytes))
        self.timeouts.append(timeout_s)
        if container_id not in self.containers:
            raise NotFound(f"no container {container_id}")
        return self.tail

    def pull(
        self, ref: str, auth: Any, on_progress: Callable[[Any], None], inactivity_s: float
    ) -> None:
        on_progress({"status": "Downloading", "ref": ref})
        super().pull(ref, auth, on_progress, inactivity_s)


@pytest.fixture
def base(tmp_path: Path) -> Iterator[Base]:
    with base_on(tmp_path) as made:
        made.engine = LogEngine()
        yield made


def engine_of(base: Base) -> LogEngine:
    assert isinstance(base.engine, LogEngine)
    return base.engine


def with_container(base: Base, instance_id: str = "a", **changes: Any) -> Instance:
    cid = base.engine.create(spec_of(instance_id))
    return record(base, instance_id, container_id=cid, **changes)


async def test_no_instance_is_an_empty_view(base: Base) -> None:
    assert await make_views(base).describe(None) == InstanceView(None)


async def test_logs_are_read_only_when_asked(base: Base) -> None:
    views = make_views(base)
    instance = with_container(base)
    quiet = await views.describe(instance)
    assert quiet.instance == instance
    assert (quiet.logs, quiet.last_logs) == (None, None)
    assert engine_of(base).reads == []
    asked = await views.describe(instance, logs=True, tail=50)
    assert asked.logs == "line 1\nline 2\n" and asked.last_logs is None
    assert engine_of(base).reads == [(instance.container_id, 50, LOG_ANSWER_BYTES)]
    assert engine_of(base).timeouts == [LOG_READ_TIMEOUT_S]


async def test_a_container_that_exited_on_its_own_shows_its_last_lines(base: Base) -> None:
    views = make_views(base)
    crashed = with_container(base, "a", status=Status.PAUSED, exit_code=1)
    view = await views.describe(crashed)
    assert view.last_logs == "line 1\nline 2\n" and view.logs is None
    assert engine_of(base).reads == [(crashed.container_id, LAST_LOG_LINES, LAST_LOG_BYTES)]
    gave_up = with_container(base, "b", status=Status.ERROR, exit_code=137)
    assert (await views.describe(gave_up)).last_logs == "line 1\nline 2\n"


async def test_a_run_s_last_lines_are_read_once_briefly_and_kept(base: Base) -> None:
    """An answer never waits long on Docker for them (a Docker shutting down stops
    every container and answers slowly), and the next answers do not ask again."""
    views = make_views(base)
    engine = engine_of(base)
    engine.tail = LogTail("so far\n", complete=False)  # Docker too slow this time
    crashed = with_container(base, "a", status=Status.PAUSED, exit_code=1, started_at="t1")
    first = (await views.describe(crashed)).last_logs
    assert first is not None and first.endswith("\nso far\n") and "read for" in first
    engine.tail = LogTail("line 1\nline 2\n")
    for _ in range(3):
        assert (await views.describe(crashed)).last_logs == "line 1\nline 2\n"
    assert len(engine.reads) == 2  # the partial read is tried again, the whole one kept
    assert engine.timeouts == [LAST_LOG_READ_S] * 2
    again = replace(crashed, exit_code=2, started_at="t2")  # restarted, and ended again
    engine.tail = LogTail("the next run's end\n")
    assert (await views.describe(again)).last_logs == "the next run's end\n"


async def test_a_stop_through_the_api_or_a_failed_build_shows_no_last_lines(base: Base) -> None:
    views = make_views(base)
    stopped = with_container(base, "a", status=Status.PAUSED, wanted=Wanted.STOPPED)
    failed_build = record(base, "b", status=Status.ERROR, reason="pull failed")
    assert (await views.describe(stopped)).last_logs is None
    assert (await views.describe(failed_build)).last_logs is None
    assert engine_of(base).reads == []


async def test_a_log_cut_to_its_bound_says_so_on_its_first_line(base: Base) -> None:
    views = make_views(base)
    instance = with_container(base)
    engine_of(base).tail = LogTail("newest\n", cut=True)
    cut = await views.describe(instance, logs=True)
    assert cut.logs is not None
    first, rest = cut.logs.split("\n", 1)
    assert str(LOG_ANSWER_BYTES) in first and "older output left out" in first
    assert rest == "newest\n"
    engine_of(base).tail = LogTail("so far\n", complete=False)
    slow = await views.describe(instance, logs=True)
    assert slow.logs is not None
    first, rest = slow.logs.split("\n", 1)
    assert f"read for {LOG_READ_TIMEOUT_S} s only" in first and rest == "so far\n"


async def test_a_container_removed_a_moment_ago_has_no_logs(base: Base) -> None:
    views = make_views(base)
    instance = with_container(base)
    base.engine.containers.clear()
    view = await views.describe(instance, logs=True)
    assert view.instance == instance and view.logs is None


class Extras:
    """The SSH and storage parts, each batch call recorded with the ids it was given."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, tuple[str, ...]]] = []

    async def ssh(self, instances: Sequence[Instance]) -> dict[str, str]:
        self.asked.append(("ssh", tuple(i.id for i in instances)))
        return {i.id: f"ssh of {i.id}" for i in instances}

    async def views(self, instances: Sequence[Instance]) -> dict[str, str]:  # storage
        self.asked.append(("storage", tuple(i.id for i in instances)))
        return {i.id: f"storage of {i.id}" for i in instances if i.id != "b"}


async def test_the_other_services_parts_are_rendered_for_the_instance(base: Base) -> None:
    extras = Extras()
    asked: list[tuple[str, str]] = []

    def gpu_health(instance: Instance) -> list[str]:
        asked.append(("gpu", instance.id))
        return ["xid 79"]

    def network(instance_id: str) -> str:
        asked.append(("network", instance_id))
        return "12 bytes"

    views = make_views(base, ssh=extras.ssh, gpu_health=gpu_health, storage=extras, network=network)
    instance = with_container(base)
    base.store.set_instance_image("a", "sha256:img", "sha256:digest", 5.0, "checked")
    view = await views.describe(instance)
    assert (view.ssh, view.storage, view.gpu_health, view.network) == (
        "ssh of a",
        "storage of a",
        ("xid 79",),
        "12 bytes",
    )
    assert sorted(asked) == [("gpu", "a"), ("network", "a")]
    assert extras.asked == [("ssh", ("a",)), ("storage", ("a",))]
    assert view.image_check is not None
    assert (view.image_check.digest, view.image_check.checked) == ("sha256:digest", True)
    assert (view.isolation, view.isolation_notes) == ("container", ())


async def test_a_list_reads_each_part_once_for_all_its_instances(base: Base) -> None:
    extras = Extras()
    views = make_views(base, ssh=extras.ssh, storage=extras)
    listed = [record(base, name) for name in ("a", "b", "c")]
    base.store.set_instance_image("c", "sha256:img", None, None, "from the cache")
    shown = await views.describe_all(listed)
    assert [v.instance for v in shown] == listed
    assert [(v.ssh, v.storage) for v in shown] == [
        ("ssh of a", "storage of a"),
        ("ssh of b", None),  # asked for no storage
        ("ssh of c", "storage of c"),
    ]
    assert [v.image_check is not None for v in shown] == [False, False, True]
    assert extras.asked == [("ssh", ("a", "b", "c")), ("storage", ("a", "b", "c"))]


async def test_the_isolation_tier_comes_from_the_spec_runtime(base: Base) -> None:
    sandboxed = record(base, "a", spec=spec_of("a", runtime="runsc"))
    view = await make_views(base).describe(sandboxed)
    assert view.isolation == "sandbox" and view.isolation_notes == SANDBOX_NOTES
    assert view.image_check is None  # never checked


async def test_the_pull_progress_is_shown_while_pulling_only(base: Base) -> None:
    images = make_images(base)
    views = make_views(base, images=images)
    pull = asyncio.ensure_future(images.ensure("slow:1", None, "a"))
    try:
        pulling = record(base, "a", status=Status.PENDING, spec=spec_of("a", image="slow:1"))
        for _ in range(200):
            if images.progress("slow:1") is not None:
                break
            await asyncio.sleep(0.01)
        on_record = pulling.move(Status.PENDING, now=2.0, phase="pulling")
        assert (await views.describe(on_record)).pull == {"status": "Downloading", "ref": "slow:1"}
        creating = pulling.move(Status.PENDING, now=2.0, phase="creating")
        assert (await views.describe(creating)).pull is None
    finally:
        base.engine.pull_gate.set()
        await pull
