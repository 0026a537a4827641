"""Prometheus metrics: the agent's own registry and the text `GET /metrics` renders.

Owns: the only import of `prometheus_client`; a registry per agent (never the
library's global one, so two agents or two tests in one process never share a
count); counters moved as things happen (API requests, control-plane
failures, reconcile runs); gauges read at scrape time from the sources it is
told to follow (the latest `/stats` payload and GPU samples, the GPU health
record), so nothing is written on the stats path.

What stays true:
- label values come from small, closed sets (route templates, HTTP methods,
  control-plane calls, GPU UUIDs, XID numbers), never from raw request paths;
- a source that has nothing yet gives no series, never a made-up zero;
- rendering never raises because a source is missing;
- Prometheus naming: base units (seconds, bytes, ratios 0..1 as `_ratio`),
  counters end in `_total`, one name per thing (a subject-level mean of the
  per-GPU series is left to the query).
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Info, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

from qudata_agent import __version__
from qudata_agent.domain.inventory import GpuSample

# The text format every Prometheus version reads (names here need no escaping).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"})
# /stats payload field -> (metric name, help); the payload's percent becomes a ratio.
_STATS_GAUGES = {
    "cpu_util": ("qudata_cpu_utilization_ratio", "CPU use, share of the CPU limit (host: all)"),
    "ram_util": ("qudata_memory_utilization_ratio", "Memory use, share of the limit (or host)"),
}


class StatsSource(Protocol):
    """What the stats gauges read: the telemetry service's latest figures."""

    @property
    def last(self) -> dict[str, Any] | None: ...

    @property
    def last_gpus(self) -> tuple[GpuSample, ...]: ...

    @property
    def last_net(self) -> Mapping[str, tuple[int, int]]: ...  # by instance id ("" host)


class NetworkSource(Protocol):
    """What the network counters read: each instance's `domain.netpolicy.NetworkUse`."""

    def uses(self) -> Mapping[str, Any]: ...


class HealthSource(Protocol):
    """What the GPU health counters read: counts by (uuid, kind, xid)."""

    def counts(self) -> Mapping[tuple[str, str, int | None], int]: ...


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._requests = Counter(
            "qudata_api_requests",
            "API requests answered, by route, method and HTTP status code",
            ["route", "method", "code"],
            registry=self.registry,
        )
        self._cp_failures = Counter(
            "qudata_control_plane_failures",
            "Control-plane calls that failed (network, timeout, HTTP error, refusal)",
            ["call"],
            registry=self.registry,
        )
        self._reconciles = Counter(
            "qudata_reconcile_runs",
            "Full reconciles with Docker, by result",
            ["result"],
            registry=self.registry,
        )
        self._loop_restarts = Counter(
            "qudata_loop_restarts",
            "Background loops that died and were started again, by loop",
            ["loop"],
            registry=self.registry,
        )
        self._image_removals = Counter(
            "qudata_image_removals",
            "Cached images the image GC removed, by reason (free_space, cache_size)",
            ["reason"],
            registry=self.registry,
        )
        self._cp_last_success: float | None = None  # time.time() of the last good call
        Info("qudata_build", "The agent's version", registry=self.registry).info(
            {"version": __version__, "python": platform.python_version()}
        )
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total, ..._bytes, fds
        self._stats: StatsSource | None = None
        self._health: HealthSource | None = None
        self._network: NetworkSource | None = None
        self._disk: tuple[Callable[[], str | None], Callable[[str], int | None]] | None = None
        self._volumes: Callable[[], Sequence[Any]] | None = None
        self._tunnel: Callable[[], dict[str, Any]] | None = None
        self._port: Callable[[], dict[str, int]] | None = None
        self.registry.register(_Snapshot(self))

    # -- events ----------------------------------------------------------------

    def count_request(self, route: str, method: str, code: int) -> None:
        method = method.upper() if method.upper() in _METHODS else "OTHER"
        self._requests.labels(route=route, method=method, code=str(code)).inc()

    def control_plane_failed(self, call: str) -> None:
        self._cp_failures.labels(call=call).inc()

    def control_plane_succeeded(self, call: str) -> None:
        self._cp_last_success = time.time()

    def reconcile_ran(self, ok: bool) -> None:
        self._reconciles.labels(result="ok" if ok else "error").inc()

    def loop_died(self, loop: str) -> None:
        self._loop_restarts.labels(loop=loop).inc()

    def image_removed(self, reason: str) -> None:
        self._image_removals.labels(reason=reason).inc()

    # -- sources read at scrape time --------------------------------------------

    def follow_stats(self, source: StatsSource) -> None:
        self._stats = source

    def follow_network(self, source: NetworkSource) -> None:
        self._network = source

    def follow_health(self, source: HealthSource) -> None:
        self._health = source

    def follow_disk(
        self, data_root: Callable[[], str | None], free_bytes: Callable[[str], int | None]
    ) -> None:
        """Free space on Docker's data root, measured at scrape time (one statvfs)."""
        self._disk = (data_root, free_bytes)

    def follow_volumes(self, volumes: Callable[[], Sequence[Any]]) -> None:
        """Each volume's size and use, read at scrape time (services.volumes' views)."""
        self._volumes = volumes

    def follow_tunnel(self, view: Callable[[], dict[str, Any]]) -> None:
        """Tunnel mode: its state and last handshake, read at scrape time."""
        self._tunnel = view

    def follow_port(self, figures: Callable[[], dict[str, int]]) -> None:
        """The API port: open connections by kind, evictions, refusals, header timeouts."""
        self._port = figures

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE

    def _collect(self) -> Iterator[Metric]:
        if self._cp_last_success is not None:
            yield GaugeMetricFamily(
                "qudata_control_plane_last_success_timestamp_seconds",
                "When a control-plane call last succeeded (Unix time)",
                value=self._cp_last_success,
            )
        if self._stats is not None:
            yield from _stats_families(self._stats.last)
            yield from _net_families(self._stats.last, self._stats.last_net)
            yield from _gpu_families(self._stats.last_gpus)
        if self._health is not None:
            yield from _health_families(self._health.counts())
        if self._network is not None:
            yield from _network_families(self._network.uses())
        if self._tunnel is not None:
            yield from _tunnel_families(self._tunnel())
        if self._disk is not None:
            root = self._disk[0]()
            free = self._disk[1](root) if root else None
            if root and free is not None:
                family = GaugeMetricFamily(
                    "qudata_docker_data_root_free_bytes",
                    "Free space on Docker's data root (images, writable layers)",
                    labels=["path"],
                )
                family.add_metric([root], float(free))
                yield family
        if self._volumes is not None:
            yield from _volume_families(self._volumes())
        if self._port is not None:
            yield from _port_families(self._port())


def _port_families(figures: dict[str, int]) -> Iterator[Metric]:
    open_now = GaugeMetricFamily(
        "qudata_api_connections",
        "Connections open on the API port: strangers, and those that proved the secret",
        labels=["kind"],
    )
    open_now.add_metric(["stranger"], float(figures["strangers"]))
    open_now.add_metric(["trusted"], float(figures["trusted"]))
    yield open_now
    for name, doc in (
        ("evicted", "Strangers closed to make room at the connection cap"),
        ("refused", "Newcomers closed at once: every slot proved the secret or was busy"),
        ("header_timeouts", "Connections closed at the request-header deadline"),
    ):
        yield CounterMetricFamily(f"qudata_api_connections_{name}", doc, value=figures[name])


def _volume_families(views: Sequence[Any]) -> Iterator[Metric]:
    size = GaugeMetricFamily(
        "qudata_volume_size_bytes", "Each volume's size (what a write may fill)", labels=["volume"]
    )
    used = GaugeMetricFamily(
        "qudata_volume_used_bytes", "What each volume holds now", labels=["volume"]
    )
    for view in views:
        size.add_metric([view.volume.id], float(view.volume.size_bytes))
        if view.used_bytes is not None:
            used.add_metric([view.volume.id], float(view.used_bytes))
    yield size
    yield used


def _tunnel_families(view: dict[str, Any]) -> Iterator[Metric]:
    labels = ["interface", "endpoint"]
    values = [str(view["interface"]), str(view["endpoint"] or "")]
    up = GaugeMetricFamily(
        "qudata_tunnel_up", "1 while the tunnel to the relay has a recent handshake", labels=labels
    )
    up.add_metric(values, 1.0 if view["state"] == "up" else 0.0)
    yield up
    if view["last_handshake_at"] is not None:
        last = GaugeMetricFamily(
            "qudata_tunnel_last_handshake_timestamp_seconds",
            "When the relay last completed a WireGuard handshake (Unix time)",
            labels=labels,
        )
        last.add_metric(values, float(view["last_handshake_at"]))
        yield last


class _Snapshot:
    """The registry's view of the followed sources (a custom collector)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return self._metrics._collect()


def _stats_families(payload: dict[str, Any] | None) -> Iterator[Metric]:
    if payload is None:
        return
    status = str(payload.get("status", "destroyed"))
    entries = payload.get("instances")
    if isinstance(entries, list):  # several instances per host: labelled by instance_id
        yield from _labelled_families(status, payload, entries)
        return
    subject = "host" if status == "destroyed" else "instance"
    for field, (name, doc) in _STATS_GAUGES.items():
        value = payload.get(field)
        if isinstance(value, int | float):
            family = GaugeMetricFamily(name, doc, labels=["subject"])
            family.add_metric([subject], float(value) / 100.0)
            yield family
    state = GaugeMetricFamily(
        "qudata_instance_status", "1 for the instance's current status", labels=["status"]
    )
    state.add_metric([status], 1.0)
    yield state


def _labelled_families(status: str, host: dict[str, Any], entries: list[Any]) -> Iterator[Metric]:
    """The host's figures (`instance_id` "") and each instance's, in one family per figure."""
    rows = [("host", "", host)] + [
        ("instance", str(e.get("instance_id", "")), e) for e in entries if isinstance(e, dict)
    ]
    for field, (name, doc) in _STATS_GAUGES.items():
        family = GaugeMetricFamily(name, doc, labels=["subject", "instance_id"])
        for subject, instance_id, figures in rows:
            value = figures.get(field)
            if isinstance(value, int | float):
                family.add_metric([subject, instance_id], float(value) / 100.0)
        yield family
    state = GaugeMetricFamily(
        "qudata_instance_status",
        "1 for each instance's current status (instance_id \"\": the host's summary)",
        labels=["status", "instance_id"],
    )
    state.add_metric([status, ""], 1.0)
    for _, instance_id, figures in rows[1:]:
        state.add_metric([str(figures.get("status", "")), instance_id], 1.0)
    yield state


def _net_families(
    payload: dict[str, Any] | None, net: Mapping[str, tuple[int, int]]
) -> Iterator[Metric]:
    """Bytes received and sent since each network namespace was made (counters).

    `net` is keyed by instance id ("" the host's). With several instances per
    host every series carries `instance_id`; with one, only `subject`.
    """
    if payload is None or not net:
        return
    several = isinstance(payload.get("instances"), list)
    single = "host" if str(payload.get("status", "destroyed")) == "destroyed" else "instance"
    for name, doc, index in (
        ("qudata_network_receive_bytes", "Bytes received (every interface but lo)", 0),
        ("qudata_network_transmit_bytes", "Bytes sent (every interface but lo)", 1),
    ):
        family = CounterMetricFamily(
            name, doc, labels=["subject", "instance_id"] if several else ["subject"]
        )
        for instance_id, counts in net.items():
            subject = "host" if instance_id == "" else "instance"
            if several:
                family.add_metric([subject, instance_id], float(counts[index]))
            elif subject == single:
                family.add_metric([subject], float(counts[index]))
        yield family


def _network_families(uses: Mapping[str, Any]) -> Iterator[Metric]:
    """Each instance's metered bytes (CONTRACT.md section 8) and refused connections."""
    traffic = CounterMetricFamily(
        "qudata_instance_network_bytes",
        "Bytes an instance received (rx) and sent (tx), public or private (never lower)",
        labels=["instance_id", "direction", "scope"],
    )
    refused = CounterMetricFamily(
        "qudata_instance_egress_refused",
        "New outbound connections refused: blocked port, denied network, over the rate",
        labels=["instance_id", "reason"],
    )
    for instance_id, use in sorted(uses.items()):
        for direction in ("rx", "tx"):
            public = getattr(use, f"{direction}_public_bytes")
            private = getattr(use, f"{direction}_bytes") - public
            traffic.add_metric([instance_id, direction, "public"], float(public))
            traffic.add_metric([instance_id, direction, "private"], float(private))
        for reason, count in use.refused:
            refused.add_metric([instance_id, reason], float(count))
    yield from (traffic, refused)


def _gpu_families(samples: tuple[GpuSample, ...]) -> Iterator[Metric]:
    if not samples:
        return
    util = GaugeMetricFamily(
        "qudata_gpu_utilization_ratio", "GPU utilisation (0..1)", labels=["uuid"]
    )
    used = GaugeMetricFamily("qudata_gpu_memory_used_bytes", "GPU memory in use", labels=["uuid"])
    total = GaugeMetricFamily("qudata_gpu_memory_total_bytes", "GPU memory", labels=["uuid"])
    temp = GaugeMetricFamily("qudata_gpu_temperature_celsius", "GPU temperature", labels=["uuid"])
    for s in samples:
        util.add_metric([s.uuid], s.util_percent / 100.0)
        used.add_metric([s.uuid], float(s.memory_used_bytes))
        total.add_metric([s.uuid], float(s.memory_total_bytes))
        if s.temperature_c is not None:
            temp.add_metric([s.uuid], s.temperature_c)
    yield from (util, used, total, temp)


def _health_families(counts: Mapping[tuple[str, str, int | None], int]) -> Iterator[Metric]:
    xids = CounterMetricFamily(
        "qudata_gpu_xid_errors",
        "XID errors seen through NVML events (application-caused XIDs not counted)",
        labels=["uuid", "xid"],
    )
    ecc = CounterMetricFamily(
        "qudata_gpu_ecc_errors", "ECC error events, by kind", labels=["uuid", "kind"]
    )
    for (uuid, kind, xid), n in sorted(counts.items(), key=lambda item: str(item[0])):
        if kind == "xid":
            xids.add_metric([uuid, str(xid)], float(n))
        else:
            ecc.add_metric([uuid, kind.removeprefix("ecc_")], float(n))
    yield from (xids, ecc)
