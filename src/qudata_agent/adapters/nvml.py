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
- No caller waits on NVML longer than `call_timeout_s`: a hung driver gives
  the caller an empty answer (or `Unavailable` where it asked for strictness)
  instead of holding the create path or the stats tick; while a call is still
  stuck, later calls answer at once the same way rather than queue behind it.
- The list of the host's GPUs (`uuids_async`) is read again once it is older
  than `gpu_list_max_age_s`, so a GPU that fell off the bus is noticed.
- `topology_async()` reads how the GPUs are linked (NVLink through
  `nvmlDeviceGetP2PStatus`, else the PCIe level of
  `nvmlDeviceGetTopologyCommonAncestor`) and each GPU's NUMA node from sysfs
  (`/sys/bus/pci/devices/<bus id>/numa_node`); a pair NVML cannot answer for
  is left out (placement takes it as the farthest link), and without NVML or a
  GPU the topology is empty.
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
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

from qudata_agent.background import Streak
from qudata_agent.domain.gpu_health import EventKind, GpuEvent
from qudata_agent.domain.inventory import (
    GpuCondition,
    GpuInfo,
    GpuReport,
    GpuSample,
    format_cuda_version,
)
from qudata_agent.domain.topology import GpuPlace, GpuTopology, Link
from qudata_agent.errors import Unavailable

logger = logging.getLogger(__name__)
T = TypeVar("T")

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
_P2P_CAPS_INDEX_NVLINK: Final = 2  # NVML_P2P_CAPS_INDEX_NVLINK
_P2P_STATUS_OK: Final = 0  # NVML_P2P_STATUS_OK
# nvmlGpuTopologyLevel_t -> Link (the values are NVML's stable ABI).
_TOPOLOGY_LEVELS: Final[dict[int, Link]] = {
    0: Link.BOARD,
    10: Link.PIX,
    20: Link.PXB,
    30: Link.PHB,
    40: Link.NODE,
    50: Link.SYSTEM,
}


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
    def nvmlDeviceGetPciInfo(self, handle: Any) -> Any: ...
    def nvmlDeviceGetTopologyCommonAncestor(self, first: Any, second: Any) -> int: ...


class Nvml:
    """GPU inventory through NVML, on one dedicated thread."""

    def __init__(
        self,
        module: NvmlModule | None = None,
        call_timeout_s: float = 5.0,
        gpu_list_max_age_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        sys_root: str = "/sys",
    ) -> None:
        self._module = module
        self._call_timeout_s = call_timeout_s
        self._gpu_list_max_age_s = gpu_list_max_age_s
        self._clock = clock
        self._stuck: asyncio.Future[Any] | None = None  # a call that outlived its timeout
        self._gpu_list: tuple[float, tuple[str, ...]] | None = None  # (read at, uuids)
        self._sys_root = sys_root
        self._initialised = False
        self._closed = False
        self._logged: str | None = None  # _OK or the last error reason logged
        self._event_set: Any = None  # NVML's event set, once registered
        self._events_logged: str | None = None  # the last event-registration outcome logged
        self._wait_streak = Streak()  # an event wait failed; logged once until one succeeds
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nvml")

    def report(self) -> GpuReport:
        """The GPUs, driver and CUDA versions; blocks until NVML answers."""
        with self._lock:
            if self._closed:
                return GpuReport(error="NVML adapter closed")
            future = self._executor.submit(self._report)
        return future.result()

    async def _bounded(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the NVML thread, waited for at most `call_timeout_s`.

        Raises `Unavailable` when NVML does not answer in time, or while an
        earlier call is still stuck, or once the adapter is closed.
        """
        with self._lock:
            if self._closed:
                raise Unavailable("NVML adapter closed")
            if self._stuck is not None and not self._stuck.done():
                raise Unavailable("NVML is not answering (a call to the GPU driver hangs)")
            future = asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        try:
            return await asyncio.wait_for(asyncio.shield(future), self._call_timeout_s)
        except TimeoutError:
            self._stuck = future
            if self._logged != "hung":
                logger.warning(
                    "NVML did not answer within %.0f s; GPU figures left out until it does",
                    self._call_timeout_s,
                )
                self._logged = "hung"
            raise Unavailable(
                f"NVML did not answer within {self._call_timeout_s:g} s (the GPU driver hangs)"
            ) from None

    async def report_async(self) -> GpuReport:
        """`report()` for the event loop: runs on the NVML thread, never blocks the loop."""
        try:
            return await self._bounded(self._report)
        except Unavailable as e:
            return GpuReport(error=e.message)

    async def uuids_async(self, strict: bool = False) -> tuple[str, ...]:
        """The host's GPUs, read again once the last read is older than `gpu_list_max_age_s`.

        With `strict`, a hung NVML raises `Unavailable` (a create that needs
        GPUs must not take "no answer" for "no GPU"); else it gives ().
        """
        now = self._clock()
        if self._gpu_list is not None and now - self._gpu_list[0] < self._gpu_list_max_age_s:
            return self._gpu_list[1]
        try:
            report = await self._bounded(self._report)
        except Unavailable:
            if strict:
                raise
            return ()
        uuids = tuple(gpu.uuid for gpu in report.gpus)
        self._gpu_list = (now, uuids)
        return uuids

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
        try:
            return await self._bounded(self._samples, uuids)
        except Unavailable:
            return ()

    async def topology_async(self, strict: bool = False) -> GpuTopology:
        """How the GPUs are linked and their NUMA nodes; empty without NVML or a GPU.

        With `strict`, a hung NVML raises `Unavailable` rather than answering empty.
        """
        try:
            return await self._bounded(self._topology)
        except Unavailable:
            if strict:
                raise
            return GpuTopology()

    async def events_async(self, wait_ms: int = 100) -> tuple[GpuEvent, ...] | None:
        """The GPUs' XID and ECC events since the last call, waiting up to `wait_ms` for one.

        None when events cannot be had now (no NVML, no GPU, no event support,
        adapter closed, NVML hung); the caller asks again later.
        """
        try:
            return await self._bounded(self._events, wait_ms)
        except Unavailable:
            return None

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
        nvml = self._ready()
        if nvml is None:
            return ()
        try:
            count = nvml.nvmlDeviceGetCount()
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
        nvml = self._ready()
        if nvml is None:
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

    def _topology(self) -> GpuTopology:
        nvml = self._ready()
        if nvml is None:
            return GpuTopology()
        try:
            handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
            places = [self._place(nvml, handle) for handle in handles]
        except nvml.NVMLError as e:
            logger.debug("GPU topology not readable: %s", _reason(e))
            return GpuTopology()
        links: dict[frozenset[str], Link] = {}
        for i, first in enumerate(handles):
            for j in range(i + 1, len(handles)):
                link = _link(nvml, first, handles[j])
                if link is not None:
                    links[frozenset((places[i].uuid, places[j].uuid))] = link
        return GpuTopology(tuple(places), links)

    def _place(self, nvml: NvmlModule, handle: Any) -> GpuPlace:
        uuid = _text(nvml.nvmlDeviceGetUUID(handle))
        try:
            bus_id = sysfs_bus_id(_text(nvml.nvmlDeviceGetPciInfo(handle).busId))
        except (nvml.NVMLError, ValueError, AttributeError) as e:
            logger.debug("GPU %s: no PCI bus id: %s", uuid, e)
            return GpuPlace(uuid)
        return GpuPlace(uuid, bus_id, read_numa_node(bus_id, self._sys_root))

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
                    self._wait_streak.recovered()
                    break
                # A GPU fell off the bus or the driver went: the caller backs off, then
                # the set is registered again.
                if self._wait_streak.failed():
                    logger.warning("NVML event wait failed: %s", _reason(e))
                self._free_events()
                return tuple(events) or None
            self._wait_streak.recovered()
            timeout = 0  # drain what is queued without waiting again
            event = _event(nvml, data)
            if event is not None:
                events.append(event)
        return tuple(events)

    def _register_events(self) -> bool:
        nvml = self._ready()
        if nvml is None:
            return False
        try:
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

    def _ready(self) -> NvmlModule | None:
        """The module, initialised; None when it cannot be had (the inventory logs why)."""
        try:
            nvml = self._load()
        except ImportError:
            return None
        try:
            if not self._initialised:
                nvml.nvmlInit()
                self._initialised = True
        except nvml.NVMLError:
            return None
        return nvml

    def _load(self) -> NvmlModule:
        if self._module is None:
            import pynvml  # imported here so a broken install degrades instead of failing

            self._module = pynvml
        return self._module

    def _degraded(self, reason: str) -> GpuReport:
        if self._logged != reason:
            # On a host with no NVIDIA device there is no driver to load: that is
            # a CPU-only host, not a fault. Where the bus has one, it is a fault.
            on_bus = nvidia_on_pci_bus(Path(self._sys_root) / "bus" / "pci" / "devices")
            level = logging.WARNING if on_bus else logging.INFO
            logger.log(level, "NVML not usable, reporting no GPUs: %s", reason)
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


def sysfs_bus_id(nvml_bus_id: str) -> str:
    """NVML's "00000000:1B:00.0" -> sysfs's "0000:1b:00.0"; ValueError when it is neither."""
    domain, sep, rest = nvml_bus_id.strip().rpartition(":")
    bus_domain, sep2, bus = domain.rpartition(":")
    device, dot, function = rest.partition(".")
    if not (sep and sep2 and dot):
        raise ValueError(f"not a PCI bus id: {nvml_bus_id!r}")
    return (
        f"{int(bus_domain, 16):04x}:{int(bus, 16):02x}:{int(device, 16):02x}.{int(function, 16):x}"
    )


def read_numa_node(bus_id: str, sys_root: str = "/sys") -> int | None:
    """The NUMA node of a PCI device from sysfs; None when the kernel says -1 or nothing."""
    if "/" in bus_id or not bus_id:
        return None
    try:
        with open(f"{sys_root}/bus/pci/devices/{bus_id}/numa_node", encoding="ascii") as f:
            node = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return node if node >= 0 else None


def _link(nvml: NvmlModule, first: Any, second: Any) -> Link | None:
    """How two GPUs are linked: NVLink when peer access over it is OK, else the PCIe level."""
    p2p = getattr(nvml, "nvmlDeviceGetP2PStatus", None)  # missing from old pynvml releases
    try:
        if p2p is not None and p2p(first, second, _P2P_CAPS_INDEX_NVLINK) == _P2P_STATUS_OK:
            return Link.NVLINK
    except nvml.NVMLError as e:
        logger.debug("NVLink status not readable: %s", _reason(e))
    try:
        level = int(nvml.nvmlDeviceGetTopologyCommonAncestor(first, second))
    except nvml.NVMLError as e:
        logger.debug("PCIe topology not readable: %s", _reason(e))
        return None
    return _TOPOLOGY_LEVELS.get(level)


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


def nvidia_on_pci_bus(devices: Path = Path("/sys/bus/pci/devices")) -> bool:
    """Whether any PCI device's vendor is NVIDIA (0x10de), as sysfs lists them."""
    try:
        return any(
            (device / "vendor").read_text().strip().lower() == "0x10de"
            for device in devices.iterdir()
        )
    except OSError:
        return False
