"""NVML, the NVIDIA management library: the GPU inventory, samples and health events.

Owns: the only import of `pynvml` in the agent, NVML's initialisation, the
one thread every NVML call runs on, and the event set that receives the GPUs'
XID and ECC events.

What stays true:
- Every NVML call runs on this adapter's single worker thread, whether the
  caller uses `report()` (blocking) or `report_async()` (from the event loop).
- NVML is initialised once and kept; `close()` shuts it down and stops the
  thread. A failed initialisation is retried on the next report, so a driver
  loaded after the agent started is picked up.
- `report()` never raises for NVML's sake: a missing library, an unloaded
  driver, a permission problem or a missing `pynvml` give a report with no GPUs
  and a short `error`, logged once per distinct reason. No GPU is ever invented.
- Events are waited for on the NVML thread with a short timeout per call
  (`events_async`), so no call holds the thread for long and a stop is prompt;
  without NVML, a GPU or event support, `events_async` answers None at once
  and logs nothing more than the inventory already did. The event set is
  freed before NVML is shut down, and registered again on the next call.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final, Protocol

from qudata_agent.domain.gpu_health import EventKind, GpuEvent
from qudata_agent.domain.inventory import (
    GpuCondition,
    GpuInfo,
    GpuReport,
    GpuSample,
    format_cuda_version,
)

logger = logging.getLogger(__name__)

_OK: Final = "ok"
# NVML's event type bits (nvmlEventType*), part of its stable ABI.
_EVENT_KINDS: Final[dict[int, EventKind]] = {
    0x1: "ecc_corrected",  # nvmlEventTypeSingleBitEccError
    0x2: "ecc_uncorrected",  # nvmlEventTypeDoubleBitEccError
    0x8: "xid",  # nvmlEventTypeXidCriticalError
}
_EVENT_MASK: Final = 0x1 | 0x2 | 0x8
_NVML_ERROR_TIMEOUT: Final = 10  # NVML_ERROR_TIMEOUT: nothing arrived within the wait
_MAX_EVENTS_PER_CALL: Final = 256


class _MemoryInfo(Protocol):
    @property
    def total(self) -> int: ...

    @property
    def used(self) -> int: ...


class NvmlModule(Protocol):
    """The part of `pynvml` this adapter uses (the real module or a test fake)."""

    @property
    def NVMLError(self) -> type[Exception]: ...

    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlDeviceGetCount(self) -> int: ...
    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any: ...
    def nvmlDeviceGetUUID(self, handle: Any) -> str | bytes: ...
    def nvmlDeviceGetName(self, handle: Any) -> str | bytes: ...
    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> _MemoryInfo: ...
    def nvmlSystemGetDriverVersion(self) -> str | bytes: ...
    def nvmlSystemGetCudaDriverVersion(self) -> int: ...
    def nvmlDeviceGetHandleByUUID(self, uuid: str | bytes) -> Any: ...
    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Any: ...
    def nvmlDeviceGetTemperature(self, handle: Any, sensor: int) -> int: ...
    def nvmlDeviceGetSupportedEventTypes(self, handle: Any) -> int: ...
    def nvmlDeviceGetPersistenceMode(self, handle: Any) -> int: ...
    def nvmlDeviceGetRemappedRows(self, handle: Any) -> tuple[int, int, int, int]: ...
    def nvmlDeviceGetEccMode(self, handle: Any) -> tuple[int, int]: ...
    def nvmlDeviceGetTotalEccErrors(self, handle: Any, error_type: int, counter: int) -> int: ...
    def nvmlEventSetCreate(self) -> Any: ...
    def nvmlDeviceRegisterEvents(self, handle: Any, event_types: int, event_set: Any) -> None: ...
    def nvmlEventSetWait(self, event_set: Any, timeout_ms: int) -> Any: ...
    def nvmlEventSetFree(self, event_set: Any) -> None: ...


class Nvml:
    """GPU inventory through NVML, on one dedicated thread."""

    def __init__(self, module: NvmlModule | None = None) -> None:
        self._module = module
        self._initialised = False
        self._closed = False
        self._logged: str | None = None  # _OK or the last error reason logged
        self._event_set: Any = None  # NVML's event set, once registered
        self._events_logged: str | None = None  # the last event-registration outcome logged
        self._wait_failing = False  # an event wait failed; logged once until one succeeds
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nvml")

    def report(self) -> GpuReport:
        """The GPUs, driver and CUDA versions; blocks until NVML answers."""
        with self._lock:
            if self._closed:
                return GpuReport(error="NVML adapter closed")
            future = self._executor.submit(self._report)
        return future.result()

    async def report_async(self) -> GpuReport:
        """`report()` for the event loop: runs on the NVML thread, never blocks the loop."""
        with self._lock:
            if self._closed:
                return GpuReport(error="NVML adapter closed")
            future = asyncio.get_running_loop().run_in_executor(self._executor, self._report)
        return await future

    def conditions(self) -> tuple[GpuCondition, ...]:
        """Persistence mode, row remapping and ECC state of every GPU (for `doctor`)."""
        with self._lock:
            if self._closed:
                return ()
            future = self._executor.submit(self._conditions)
        return future.result()

    async def samples_async(self, uuids: tuple[str, ...]) -> tuple[GpuSample, ...]:
        """Utilisation, memory and temperature of these GPUs; a GPU NVML cannot read is left out."""
        if not uuids:
            return ()
        with self._lock:
            if self._closed:
                return ()
            future = asyncio.get_running_loop().run_in_executor(
                self._executor, self._samples, uuids
            )
        return await future

    async def events_async(self, wait_ms: int = 100) -> tuple[GpuEvent, ...] | None:
        """The GPUs' XID and ECC events since the last call, waiting up to `wait_ms` for one.

        None when events cannot be had now (no NVML, no GPU, no event support,
        adapter closed); the caller asks again later.
        """
        with self._lock:
            if self._closed:
                return None
            future = asyncio.get_running_loop().run_in_executor(
                self._executor, self._events, wait_ms
            )
        return await future

    def close(self) -> None:
        """Shut NVML down (when initialised) and stop the NVML thread; safe to repeat."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._executor.submit(self._shutdown)
        self._executor.shutdown(wait=True)

    # Everything below runs on the NVML thread only.

    def _report(self) -> GpuReport:
        try:
            nvml = self._load()
        except ImportError as e:
            return self._degraded(f"pynvml is not importable: {e}")
        try:
            if not self._initialised:
                nvml.nvmlInit()
                self._initialised = True
            gpus = tuple(_gpu(nvml, i) for i in range(nvml.nvmlDeviceGetCount()))
        except nvml.NVMLError as e:
            # Start from scratch next time: the driver may have gone or may come back.
            self._shutdown()
            return self._degraded(_reason(e))
        report = GpuReport(
            gpus=gpus,
            driver_version=_optional(nvml, lambda: _text(nvml.nvmlSystemGetDriverVersion())),
            cuda_version=_optional(nvml, lambda: _cuda_version(nvml)),
        )
        if self._logged != _OK:
            logger.info(
                "NVML available: %d GPU(s), driver %s, CUDA %s",
                len(gpus),
                report.driver_version,
                report.cuda_version,
            )
            self._logged = _OK
        return report

    def _conditions(self) -> tuple[GpuCondition, ...]:
        try:
            nvml = self._load()
            if not self._initialised:
                nvml.nvmlInit()
                self._initialised = True
            count = nvml.nvmlDeviceGetCount()
        except ImportError:
            return ()
        except nvml.NVMLError:
            return ()
        found = []
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                uuid = _text(nvml.nvmlDeviceGetUUID(handle))
            except nvml.NVMLError:
                continue
            found.append(_condition(nvml, handle, uuid))
        return tuple(found)

    def _samples(self, uuids: tuple[str, ...]) -> tuple[GpuSample, ...]:
        try:
            nvml = self._load()
            if not self._initialised:
                nvml.nvmlInit()
                self._initialised = True
        except ImportError:
            return ()
        except nvml.NVMLError:
            return ()
        samples = []
        for uuid in uuids:
            try:
                handle = nvml.nvmlDeviceGetHandleByUUID(uuid)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                samples.append(
                    GpuSample(
                        uuid=uuid,
                        util_percent=float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu),
                        memory_used_bytes=int(memory.used),
                        memory_total_bytes=int(memory.total),
                        temperature_c=float(nvml.nvmlDeviceGetTemperature(handle, 0)),
                    )
                )
            except nvml.NVMLError as e:
                logger.debug("GPU %s not readable: %s", uuid, _reason(e))
        return tuple(samples)

    def _events(self, wait_ms: int) -> tuple[GpuEvent, ...] | None:
        if self._event_set is None and not self._register_events():
            return None
        nvml = self._module
        assert nvml is not None
        events: list[GpuEvent] = []
        timeout = wait_ms
        while len(events) < _MAX_EVENTS_PER_CALL:
            try:
                data = nvml.nvmlEventSetWait(self._event_set, timeout)
            except nvml.NVMLError as e:
                if getattr(e, "value", None) == _NVML_ERROR_TIMEOUT:
                    self._wait_failing = False
                    break
                # A GPU fell off the bus or the driver went: the caller backs off, then
                # the set is registered again.
                if not self._wait_failing:
                    logger.warning("NVML event wait failed: %s", _reason(e))
                self._wait_failing = True
                self._free_events()
                return tuple(events) or None
            self._wait_failing = False
            timeout = 0  # drain what is queued without waiting again
            event = _event(nvml, data)
            if event is not None:
                events.append(event)
        return tuple(events)

    def _register_events(self) -> bool:
        try:
            nvml = self._load()
        except ImportError:
            return False
        try:
            if not self._initialised:
                nvml.nvmlInit()
                self._initialised = True
            count = nvml.nvmlDeviceGetCount()
            event_set = nvml.nvmlEventSetCreate() if count else None
        except nvml.NVMLError:
            return False  # the inventory logs why NVML is not usable
        if event_set is None:
            return False
        watched = sum(_register(nvml, event_set, index) for index in range(count))
        if not watched:
            self._log_events_once("no GPU supports XID/ECC events; GPU health not watched")
            _free(nvml, event_set)
            return False
        self._event_set = event_set
        self._log_events_once(f"watching {watched} of {count} GPU(s) for XID and ECC events")
        return True

    def _log_events_once(self, message: str) -> None:
        if self._events_logged != message:
            logger.info(message)
            self._events_logged = message

    def _free_events(self) -> None:
        if self._event_set is not None and self._module is not None:
            _free(self._module, self._event_set)
        self._event_set = None

    def _load(self) -> NvmlModule:
        if self._module is None:
            import pynvml  # imported here so a broken install degrades instead of failing

            self._module = pynvml
        return self._module

    def _degraded(self, reason: str) -> GpuReport:
        if self._logged != reason:
            logger.warning("NVML not usable, reporting no GPUs: %s", reason)
            self._logged = reason
        return GpuReport(error=reason)

    def _shutdown(self) -> None:
        self._free_events()
        if not self._initialised or self._module is None:
            return
        self._initialised = False
        try:
            self._module.nvmlShutdown()
        except self._module.NVMLError as e:
            logger.debug("nvmlShutdown failed: %s", _reason(e))


_NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
_NVML_VOLATILE_ECC = 0  # counts since the driver loaded


def _condition(nvml: NvmlModule, handle: Any, uuid: str) -> GpuCondition:
    """Each field on its own: a GPU without row remapping (pre-Ampere) still reports the rest."""

    def ask(call: Callable[[], Any]) -> Any:
        try:
            return call()
        except nvml.NVMLError:
            return None

    remapped = ask(lambda: nvml.nvmlDeviceGetRemappedRows(handle))
    ecc = ask(lambda: nvml.nvmlDeviceGetEccMode(handle))
    persistence = ask(lambda: nvml.nvmlDeviceGetPersistenceMode(handle))
    ecc_enabled = bool(ecc[0]) if ecc is not None else None
    uncorrected = (
        ask(
            lambda: nvml.nvmlDeviceGetTotalEccErrors(
                handle, _NVML_MEMORY_ERROR_TYPE_UNCORRECTED, _NVML_VOLATILE_ECC
            )
        )
        if ecc_enabled
        else None
    )
    return GpuCondition(
        uuid=uuid,
        persistence_mode=bool(persistence) if persistence is not None else None,
        remap_pending=bool(remapped[2]) if remapped is not None else None,
        remap_failed=bool(remapped[3]) if remapped is not None else None,
        ecc_enabled=ecc_enabled,
        ecc_uncorrected=int(uncorrected) if uncorrected is not None else None,
    )


def _gpu(nvml: NvmlModule, index: int) -> GpuInfo:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    return GpuInfo(
        index=index,
        uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
        name=_text(nvml.nvmlDeviceGetName(handle)),
        memory_total_bytes=int(nvml.nvmlDeviceGetMemoryInfo(handle).total),
    )


def _register(nvml: NvmlModule, event_set: Any, index: int) -> bool:
    """Registers GPU `index` for the XID and ECC events it supports; False when none."""
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        mask = int(nvml.nvmlDeviceGetSupportedEventTypes(handle)) & _EVENT_MASK
        if mask:
            nvml.nvmlDeviceRegisterEvents(handle, mask, event_set)
    except nvml.NVMLError as e:
        logger.debug("GPU %d: events not registered: %s", index, _reason(e))
        return False
    return bool(mask)


def _event(nvml: NvmlModule, data: Any) -> GpuEvent | None:
    kind = _EVENT_KINDS.get(int(data.eventType))
    if kind is None:
        return None
    try:
        uuid = _text(nvml.nvmlDeviceGetUUID(data.device))
    except nvml.NVMLError as e:
        uuid = "unknown"
        logger.debug("event of an unnamed GPU: %s", _reason(e))
    xid = int(data.eventData) if kind == "xid" else None
    return GpuEvent(uuid=uuid, kind=kind, xid=xid, at=time.time())


def _free(nvml: NvmlModule, event_set: Any) -> None:
    try:
        nvml.nvmlEventSetFree(event_set)
    except nvml.NVMLError as e:
        logger.debug("nvmlEventSetFree failed: %s", _reason(e))


def _cuda_version(nvml: NvmlModule) -> str | None:
    # The _v2 call exists in newer drivers; older ones only have the plain one.
    get = getattr(nvml, "nvmlSystemGetCudaDriverVersion_v2", None)
    version = int(get() if get is not None else nvml.nvmlSystemGetCudaDriverVersion())
    return format_cuda_version(version) if version > 0 else None


def _optional(nvml: NvmlModule, query: Callable[[], str | None]) -> str | None:
    """A version figure; one that NVML cannot give is unknown, not a reason to drop the GPUs."""
    try:
        return query()
    except nvml.NVMLError as e:
        logger.debug("NVML version query failed: %s", _reason(e))
        return None


def _text(value: str | bytes) -> str:
    # Older pynvml releases return bytes.
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace").strip()
    return value.strip()


def _reason(error: Exception) -> str:
    """A short reason for an NVML error, e.g. "NVML Shared Library Not Found"."""
    try:
        text = str(error)
    except Exception:  # pynvml's __str__ may itself call into a missing library
        text = ""
    return text or type(error).__name__
