"""Prometheus metrics: counters move with requests, failures and reconciles; gauges follow sources.

The API is driven through falcon.testing (the real middleware and auth); the
exposition text is parsed back with prometheus_client's own parser.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import falcon.testing
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from qudata_agent.adapters.control_plane import ControlPlane, ControlPlaneError
from qudata_agent.api.app import ApiDeps, create_app
from qudata_agent.domain.gpu_health import GpuEvent, HealthRecord
from qudata_agent.domain.inventory import GpuSample
from qudata_agent.metrics import CONTENT_TYPE, Metrics

SECRET = "metrics-test-secret"
AUTH = {"X-Agent-Secret": SECRET}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, for every sample in the exposition text."""
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    body, _ = metrics.render()
    return samples(body.decode()).get((name, tuple(sorted(labels.items()))))


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def client(metrics: Metrics) -> falcon.testing.TestClient:
    return falcon.testing.TestClient(create_app(ApiDeps(secret=lambda: SECRET, metrics=metrics)))


# /metrics over the API


def test_metrics_needs_the_secret(client: falcon.testing.TestClient) -> None:
    refused = client.simulate_get("/metrics")
    assert refused.status_code == 401
    assert refused.json == {"ok": False, "error": "missing or wrong X-Agent-Secret"}
    wrong = client.simulate_get("/metrics", headers={"X-Agent-Secret": "nope"})
    assert wrong.status_code == 401


def test_metrics_is_prometheus_text_not_the_envelope(client: falcon.testing.TestClient) -> None:
    result = client.simulate_get("/metrics", headers=AUTH)
    assert result.status_code == 200
    assert result.headers["Content-Type"] == CONTENT_TYPE
    assert result.text.startswith("# HELP")
    assert "qudata_api_requests_total" in result.text


def test_api_requests_are_counted_by_route_method_and_code(
    client: falcon.testing.TestClient, metrics: Metrics
) -> None:
    for _ in range(3):
        client.simulate_get("/ping")
    client.simulate_get("/openapi.json")  # 401
    client.simulate_get("/openapi.json", headers=AUTH)
    client.simulate_get("/no/such/route", headers=AUTH)  # 404
    client.simulate_get("/no/such/route")  # 401 before routing
    client.simulate_delete("/ping", headers=AUTH)  # 405
    client.simulate_request("BREW", "/ping", headers=AUTH)

    name = "qudata_api_requests_total"
    assert value(metrics, name, route="/ping", method="GET", code="200") == 3
    assert value(metrics, name, route="/openapi.json", method="GET", code="401") == 1
    assert value(metrics, name, route="/openapi.json", method="GET", code="200") == 1
    assert value(metrics, name, route="unmatched", method="GET", code="404") == 1
    assert value(metrics, name, route="unmatched", method="GET", code="401") == 1
    assert value(metrics, name, route="/ping", method="DELETE", code="405") == 1
    body, _ = metrics.render()
    assert "BREW" not in body.decode()  # odd methods are folded into OTHER
    assert "/no/such/route" not in body.decode()  # raw paths never become labels


def test_a_metrics_scrape_counts_itself_once_scraped_again(
    client: falcon.testing.TestClient, metrics: Metrics
) -> None:
    client.simulate_get("/metrics", headers=AUTH)
    second = client.simulate_get("/metrics", headers=AUTH)
    found = samples(second.text)
    key = (
        "qudata_api_requests_total",
        (("code", "200"), ("method", "GET"), ("route", "/metrics")),
    )
    assert found[key] == 1


def test_the_document_lists_metrics_as_plain_text(client: falcon.testing.TestClient) -> None:
    doc = client.simulate_get("/openapi.json", headers=AUTH).json
    op = doc["paths"]["/metrics"]["get"]
    assert op["security"] == [{"agentSecret": []}]
    assert op["responses"]["200"]["content"] == {"text/plain": {"schema": {"type": "string"}}}
    assert "401" in op["responses"]


def test_without_metrics_there_is_no_route() -> None:
    client = falcon.testing.TestClient(create_app(ApiDeps(secret=lambda: SECRET)))
    assert client.simulate_get("/metrics", headers=AUTH).status_code == 404
    assert "/metrics" not in client.simulate_get("/openapi.json", headers=AUTH).json["paths"]


# counters moved by the rest of the agent


async def test_control_plane_failures_are_counted_by_call(metrics: Metrics) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/stats"):
            return httpx.Response(500, json={"ok": False, "error": "down"})
        return httpx.Response(200, json={"ok": True, "data": None})

    cp = ControlPlane(
        "http://cp.test/v0",
        "key",
        transport=httpx.MockTransport(answer),
        on_failure=metrics.control_plane_failed,
    )
    try:
        for _ in range(2):
            with pytest.raises(ControlPlaneError):
                await cp.stats({})
        await cp.init_host({})
    finally:
        await cp.aclose()
    assert value(metrics, "qudata_control_plane_failures_total", call="/stats") == 2
    assert value(metrics, "qudata_control_plane_failures_total", call="/init/host") is None


def test_reconcile_runs_are_counted_by_result(metrics: Metrics) -> None:
    metrics.reconcile_ran(ok=True)
    metrics.reconcile_ran(ok=True)
    metrics.reconcile_ran(ok=False)
    assert value(metrics, "qudata_reconcile_runs_total", result="ok") == 2
    assert value(metrics, "qudata_reconcile_runs_total", result="error") == 1


def test_two_agents_never_share_counts() -> None:
    first, second = Metrics(), Metrics()
    first.reconcile_ran(ok=True)
    assert value(second, "qudata_reconcile_runs_total", result="ok") is None


# gauges read from the followed sources


@dataclass
class FakeTelemetry:
    last: dict[str, Any] | None = None
    last_gpus: tuple[GpuSample, ...] = ()
    last_net: dict[str, tuple[int, int]] = field(default_factory=dict)


@dataclass
class FakeHealth:
    table: dict[tuple[str, str, int | None], int] = field(default_factory=dict)

    def counts(self) -> Mapping[tuple[str, str, int | None], int]:
        return self.table


HOST = {
    "cpu_util": 12.5,
    "ram_util": 40.0,
    "inet_in": 1000.0,
    "inet_out": 2000.0,
    "gpu_util": 0.0,
    "mem_util": 0.0,
    "gpu_temp": None,
    "status": "destroyed",
}


def test_no_stats_yet_means_no_gauges(metrics: Metrics) -> None:
    metrics.follow_stats(FakeTelemetry())
    body, _ = metrics.render()
    assert "qudata_cpu_utilization_ratio" not in body.decode()
    assert "qudata_network_receive_bytes_total" not in body.decode()


def test_host_figures_when_there_is_no_instance(metrics: Metrics) -> None:
    metrics.follow_stats(FakeTelemetry(last=dict(HOST), last_net={"": (5_000, 70_000)}))
    assert value(metrics, "qudata_cpu_utilization_ratio", subject="host") == 0.125
    assert value(metrics, "qudata_memory_utilization_ratio", subject="host") == 0.4
    assert value(metrics, "qudata_network_receive_bytes_total", subject="host") == 5_000
    assert value(metrics, "qudata_network_transmit_bytes_total", subject="host") == 70_000
    assert value(metrics, "qudata_instance_status", status="destroyed") == 1
    body, _ = metrics.render()
    text = body.decode()
    assert "# TYPE qudata_network_receive_bytes_total counter" in text
    # One name per thing: no per-second rates, no subject-level copies of per-GPU series.
    for gone in ("_per_second", "_percent", "qudata_gpu_temp_max", "qudata_gpu_mem_util"):
        assert gone not in text


def test_instance_and_gpu_figures_follow_the_latest_payload(metrics: Metrics) -> None:
    source = FakeTelemetry(last=dict(HOST))
    metrics.follow_stats(source)
    source.last = {**HOST, "cpu_util": 99.0, "gpu_temp": 71.0, "status": "running"}
    source.last_gpus = (
        GpuSample("GPU-aaaa", 87.0, 30 * 1024**3, 80 * 1024**3, 71.0),
        GpuSample("GPU-bbbb", 12.0, 1024**3, 80 * 1024**3, None),
    )
    assert value(metrics, "qudata_cpu_utilization_ratio", subject="instance") == 0.99
    assert value(metrics, "qudata_cpu_utilization_ratio", subject="host") is None
    assert value(metrics, "qudata_instance_status", status="running") == 1
    assert value(metrics, "qudata_gpu_utilization_ratio", uuid="GPU-aaaa") == 0.87
    assert value(metrics, "qudata_gpu_memory_used_bytes", uuid="GPU-aaaa") == 30 * 1024**3
    assert value(metrics, "qudata_gpu_memory_total_bytes", uuid="GPU-bbbb") == 80 * 1024**3
    assert value(metrics, "qudata_gpu_temperature_celsius", uuid="GPU-aaaa") == 71.0
    assert value(metrics, "qudata_gpu_temperature_celsius", uuid="GPU-bbbb") is None


def test_gpu_health_counts(metrics: Metrics) -> None:
    record = HealthRecord()
    for event in (
        GpuEvent("GPU-aaaa", "xid", 79, 1.0),
        GpuEvent("GPU-aaaa", "xid", 79, 2.0),
        GpuEvent("GPU-aaaa", "xid", 13, 3.0),  # the application's fault: not counted
        GpuEvent("GPU-bbbb", "ecc_uncorrected", None, 4.0),
        GpuEvent("GPU-bbbb", "ecc_corrected", None, 5.0),
    ):
        record.add(event)
    metrics.follow_health(record)
    assert value(metrics, "qudata_gpu_xid_errors_total", uuid="GPU-aaaa", xid="79") == 2
    assert value(metrics, "qudata_gpu_xid_errors_total", uuid="GPU-aaaa", xid="13") is None
    assert value(metrics, "qudata_gpu_ecc_errors_total", uuid="GPU-bbbb", kind="uncorrected") == 1
    assert value(metrics, "qudata_gpu_ecc_errors_total", uuid="GPU-bbbb", kind="corrected") == 1


def test_health_with_nothing_seen_renders(metrics: Metrics) -> None:
    metrics.follow_health(FakeHealth())
    body, _ = metrics.render()
    assert "# TYPE qudata_gpu_xid_errors_total counter" in body.decode()


def test_build_info_and_process_metrics(metrics: Metrics) -> None:
    from qudata_agent import __version__

    body, _ = metrics.render()
    found = samples(body.decode())
    build = [labels for (name, labels) in found if name == "qudata_build_info"]
    assert build and ("version", __version__) in build[0]
    assert ("process_cpu_seconds_total", ()) in found
    assert found[("process_resident_memory_bytes", ())] > 0


async def test_the_last_successful_control_plane_call_is_timed(metrics: Metrics) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/stats"):
            return httpx.Response(200, json={"ok": True, "data": None})
        return httpx.Response(503, json={"ok": False, "error": "down"})

    cp = ControlPlane(
        "http://cp.test/v0",
        "key",
        transport=httpx.MockTransport(answer),
        on_failure=metrics.control_plane_failed,
        on_success=metrics.control_plane_succeeded,
    )
    name = "qudata_control_plane_last_success_timestamp_seconds"
    assert value(metrics, name) is None  # none yet: no series, not a made-up zero
    with pytest.raises(ControlPlaneError):
        await cp.init_host({})
    assert value(metrics, name) is None
    before = time.time()
    await cp.stats({})
    stamp = value(metrics, name)
    assert stamp is not None and before <= stamp <= time.time()
    await cp.aclose()


def test_free_space_on_dockers_data_root_once_known(metrics: Metrics) -> None:
    root: list[str] = []
    metrics.follow_disk(lambda: root[0] if root else None, lambda path: 42 * 1024**3)
    assert value(metrics, "qudata_docker_data_root_free_bytes", path="/var/lib/docker") is None
    root.append("/var/lib/docker")
    found = value(metrics, "qudata_docker_data_root_free_bytes", path="/var/lib/docker")
    assert found == 42 * 1024**3


def test_the_api_port_figures_are_exported() -> None:
    metrics = Metrics()
    figures = {"strangers": 3, "trusted": 1, "evicted": 7, "refused": 2, "header_timeouts": 5}
    metrics.follow_port(lambda: figures)
    text = metrics.render()[0].decode()
    assert 'qudata_api_connections{kind="stranger"} 3.0' in text
    assert 'qudata_api_connections{kind="trusted"} 1.0' in text
    assert "qudata_api_connections_evicted_total 7.0" in text
    assert "qudata_api_connections_refused_total 2.0" in text
    assert "qudata_api_connections_header_timeouts_total 5.0" in text
