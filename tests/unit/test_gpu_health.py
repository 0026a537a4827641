"""GPU health: XID filtering and the record, the event loop, NVML events through a fake pynvml.

There is no GPU here: the NVML event path is driven by a small fake of the
pynvml calls it makes (like test_nvml.py), and the real library is checked to
degrade without a word.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from qudata_agent.adapters.nvml import Nvml
from qudata_agent.api.resources.instances import to_state
from qudata_agent.domain.gpu_health import (
    APPLICATION_XIDS,
    GpuEvent,
    HealthRecord,
    is_health_problem,
)
from qudata_agent.domain.instance import Instance, Status, Wanted
from qudata_agent.loops.gpu_events import gpu_events_loop
from qudata_agent.services.views import InstanceView

HAS_DRIVER = Path("/proc/driver/nvidia/version").exists()
XID, DBE, SBE, PSTATE = 0x8, 0x2, 0x1, 0x4
TIMEOUT, GPU_IS_LOST, LIB_NOT_FOUND = 10, 15, 12


# the domain: which events are health problems


def test_the_application_xids_are_the_documented_ones() -> None:
    assert frozenset({13, 31, 43, 45, 68, 109}) == APPLICATION_XIDS


@pytest.mark.parametrize(
    ("event", "problem"),
    [
        (GpuEvent("GPU-a", "xid", 79, 0), True),  # fell off the bus
        (GpuEvent("GPU-a", "xid", 48, 0), True),  # double-bit ECC
        (GpuEvent("GPU-a", "xid", 94, 0), True),  # contained ECC error
        *[(GpuEvent("GPU-a", "xid", xid, 0), False) for xid in sorted(APPLICATION_XIDS)],
        (GpuEvent("GPU-a", "ecc_uncorrected", None, 0), True),
        (GpuEvent("GPU-a", "ecc_corrected", None, 0), False),
    ],
)
def test_health_problems(event: GpuEvent, problem: bool) -> None:
    assert is_health_problem(event) is problem


def test_the_record_keeps_problems_per_gpu_and_counts_the_rest() -> None:
    record = HealthRecord(per_gpu=3)
    assert record.add(GpuEvent("GPU-a", "xid", 13, 1.0)) == 0  # ignored
    assert record.add(GpuEvent("GPU-a", "ecc_corrected", None, 2.0)) == 1  # counted only
    for at in range(10, 15):
        record.add(GpuEvent("GPU-a", "xid", 79, float(at)))
    assert record.add(GpuEvent("GPU-b", "ecc_uncorrected", None, 20.0)) == 1

    kept = record.problems(["GPU-a"])
    assert [e.at for e in kept] == [12.0, 13.0, 14.0]  # the newest three
    assert record.problems(["GPU-a"], since=13.5) == [GpuEvent("GPU-a", "xid", 79, 14.0)]
    assert [e.uuid for e in record.problems(["GPU-b", "GPU-a"], since=14.0)] == ["GPU-a", "GPU-b"]
    assert record.problems(["GPU-c"]) == []
    assert record.counts() == {
        ("GPU-a", "ecc_corrected", None): 1,
        ("GPU-a", "xid", 79): 5,
        ("GPU-b", "ecc_uncorrected", None): 1,
    }


# the loop


class ScriptedSource:
    """Answers events_async from a script; then nothing more, forever."""

    def __init__(self, *answers: tuple[GpuEvent, ...] | None) -> None:
        self.answers = deque(answers)
        self.calls = 0

    async def events_async(self, wait_ms: int = 100) -> tuple[GpuEvent, ...] | None:
        self.calls += 1
        return self.answers.popleft() if self.answers else ()


async def _run_loop(source: Any, record: HealthRecord, seconds: float, **kw: Any) -> None:
    task = asyncio.create_task(gpu_events_loop(source, record, **kw))
    await asyncio.sleep(seconds)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_the_loop_records_and_logs_each_problem_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lost = GpuEvent("GPU-a", "xid", 79, 1.0)
    source = ScriptedSource(
        (lost, GpuEvent("GPU-a", "xid", 31, 1.1)),
        (lost, GpuEvent("GPU-a", "ecc_corrected", None, 1.2)),
    )
    record = HealthRecord()
    with caplog.at_level(logging.DEBUG, logger="qudata_agent.loops.gpu_events"):
        await _run_loop(source, record, 0.1, poll_s=0.01)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [(r.getMessage(), r.xid) for r in warnings] == [("GPU health problem", 79)]  # type: ignore[attr-defined]
    assert any("application-caused" in r.getMessage() for r in caplog.records)
    assert record.counts()[("GPU-a", "xid", 79)] == 2
    assert ("GPU-a", "xid", 31) not in record.counts()


async def test_without_events_the_loop_waits_long_and_says_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Nothing:
        calls = 0

        async def events_async(self, wait_ms: int = 100) -> None:
            Nothing.calls += 1
            return None

    with caplog.at_level(logging.DEBUG, logger="qudata_agent.loops.gpu_events"):
        await _run_loop(Nothing(), HealthRecord(), 0.1, poll_s=0.001, retry_s=0.05)
    assert 1 <= Nothing.calls <= 3
    assert caplog.records == []


async def test_a_raising_source_does_not_end_the_loop() -> None:
    class Raising:
        calls = 0

        async def events_async(self, wait_ms: int = 100) -> None:
            Raising.calls += 1
            raise RuntimeError("bug")

    await _run_loop(Raising(), HealthRecord(), 0.05, retry_s=0.01)
    assert Raising.calls >= 2


# NVML events through a fake pynvml


class FakeNVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return {TIMEOUT: "Timeout", GPU_IS_LOST: "GPU is lost"}.get(self.value, "Unknown Error")


@dataclass
class EventData:
    device: int
    eventType: int
    eventData: int


class FakeEventNvml:
    """Two GPUs that queue events; records every call and the thread it ran on."""

    NVMLError = FakeNVMLError

    def __init__(self, supported: tuple[int, ...] = (XID | DBE | SBE | PSTATE,) * 2) -> None:
        self.supported = supported
        self.queue: deque[EventData] = deque()
        self.calls: list[tuple[str, Any]] = []
        self.threads: set[str] = set()
        self.wait_error: int | None = None
        self.init_error: int | None = None

    def _call(self, name: str, arg: Any = None) -> None:
        self.calls.append((name, arg))
        self.threads.add(threading.current_thread().name)

    def nvmlInit(self) -> None:
        self._call("init")
        if self.init_error is not None:
            raise FakeNVMLError(self.init_error)

    def nvmlShutdown(self) -> None:
        self._call("shutdown")

    def nvmlDeviceGetCount(self) -> int:
        return len(self.supported)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return f"GPU-{handle:04d}"

    def nvmlDeviceGetSupportedEventTypes(self, handle: int) -> int:
        return self.supported[handle]

    def nvmlEventSetCreate(self) -> str:
        self._call("create")
        return "set-1"

    def nvmlDeviceRegisterEvents(self, handle: int, event_types: int, event_set: str) -> None:
        self._call("register", (handle, event_types))

    def nvmlEventSetWait(self, event_set: str, timeout_ms: int) -> EventData:
        self._call("wait", timeout_ms)
        if self.wait_error is not None:
            raise FakeNVMLError(self.wait_error)
        if not self.queue:
            raise FakeNVMLError(TIMEOUT)
        return self.queue.popleft()

    def nvmlEventSetFree(self, event_set: str) -> None:
        self._call("free", event_set)


def _names(fake: FakeEventNvml) -> list[str]:
    return [name for name, _ in fake.calls]


async def test_events_are_read_drained_and_translated() -> None:
    fake = FakeEventNvml()
    fake.queue.extend(
        [
            EventData(0, XID, 79),
            EventData(1, XID, 13),
            EventData(0, DBE, 0),
            EventData(1, PSTATE, 0),  # not a health event: dropped
            EventData(1, SBE, 0),
        ]
    )
    nvml = Nvml(fake)
    try:
        events = await nvml.events_async(wait_ms=50)
        again = await nvml.events_async(wait_ms=50)
    finally:
        nvml.close()
    assert events is not None
    assert [(e.uuid, e.kind, e.xid) for e in events] == [
        ("GPU-0000", "xid", 79),
        ("GPU-0001", "xid", 13),  # the adapter reports it; the record ignores it
        ("GPU-0000", "ecc_uncorrected", None),
        ("GPU-0001", "ecc_corrected", None),
    ]
    assert all(e.at > 0 for e in events)
    assert again == ()
    waits = [arg for name, arg in fake.calls if name == "wait"]
    assert waits[0] == 50 and set(waits[1:6]) == {0}  # waits once, then drains
    assert ("register", (0, XID | DBE | SBE)) in fake.calls  # only the kinds it watches
    assert _names(fake).count("create") == 1  # registered once, kept
    assert _names(fake)[-2:] == ["free", "shutdown"]  # freed before NVML goes
    assert len(fake.threads) == 1 and next(iter(fake.threads)).startswith("nvml")


async def test_gpus_without_event_support_are_skipped() -> None:
    fake = FakeEventNvml(supported=(PSTATE, XID | PSTATE))
    nvml = Nvml(fake)
    try:
        assert await nvml.events_async(wait_ms=0) == ()
    finally:
        nvml.close()
    assert [arg for name, arg in fake.calls if name == "register"] == [(1, XID)]


async def test_no_event_support_at_all_is_none_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = FakeEventNvml(supported=(PSTATE, 0))
    nvml = Nvml(fake)
    with caplog.at_level(logging.DEBUG, logger="qudata_agent.adapters.nvml"):
        try:
            answers = [await nvml.events_async(wait_ms=0) for _ in range(3)]
        finally:
            nvml.close()
    assert answers == [None, None, None]
    assert _names(fake).count("free") == 3  # each set made is freed again
    infos = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert len(infos) == 1 and "not watched" in infos[0].getMessage()


async def test_no_driver_is_none_and_silent(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeEventNvml()
    fake.init_error = LIB_NOT_FOUND
    nvml = Nvml(fake)
    with caplog.at_level(logging.DEBUG, logger="qudata_agent.adapters.nvml"):
        try:
            answers = [await nvml.events_async() for _ in range(3)]
        finally:
            nvml.close()
    assert answers == [None, None, None]
    assert caplog.records == []
    assert "create" not in _names(fake)


async def test_a_lost_gpu_frees_the_set_and_registers_again_later(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = FakeEventNvml()
    nvml = Nvml(fake)
    with caplog.at_level(logging.WARNING, logger="qudata_agent.adapters.nvml"):
        try:
            assert await nvml.events_async(wait_ms=0) == ()
            fake.wait_error = GPU_IS_LOST
            assert await nvml.events_async(wait_ms=0) is None  # the loop backs off
            assert await nvml.events_async(wait_ms=0) is None
            fake.wait_error = None
            fake.queue.append(EventData(1, XID, 79))
            events = await nvml.events_async(wait_ms=0)
        finally:
            nvml.close()
    assert events is not None and [e.xid for e in events] == [79]
    assert _names(fake).count("create") == 3
    assert [r.getMessage() for r in caplog.records] == ["NVML event wait failed: GPU is lost"]


async def test_events_after_close_are_none() -> None:
    nvml = Nvml(FakeEventNvml())
    nvml.close()
    assert await nvml.events_async() is None


@pytest.mark.skipif(HAS_DRIVER, reason="this host has an NVIDIA driver")
async def test_real_nvml_without_gpu_gives_no_events_and_no_noise(
    caplog: pytest.LogCaptureFixture,
) -> None:
    nvml = Nvml()
    with caplog.at_level(logging.DEBUG, logger="qudata_agent.adapters.nvml"):
        try:
            answers = [await nvml.events_async(wait_ms=10) for _ in range(3)]
        finally:
            nvml.close()
    assert answers == [None, None, None]
    assert [r for r in caplog.records if r.levelno >= logging.INFO] == []


# the instance's answer


def test_the_instance_answer_lists_its_gpu_health() -> None:
    instance = Instance(
        id="i-1",
        status=Status.RUNNING,
        wanted=Wanted.RUNNING,
        image="img:1",
        container_name="qudata-i-1",
        gpus=("GPU-a",),
    )
    view = InstanceView(instance, gpu_health=(GpuEvent("GPU-a", "xid", 79, 1700000000.5),))
    state = to_state(view).model_dump(mode="json")
    assert state["gpu_health"] == [{"uuid": "GPU-a", "event": "xid", "xid": 79, "at": 1700000000.5}]
    empty = to_state(InstanceView(None)).model_dump(mode="json")
    assert empty["gpu_health"] == []
