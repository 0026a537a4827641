"""deploy/: the alert rules and the Grafana dashboard name only metrics the agent exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from qudata_agent.domain.gpu_health import GpuEvent, HealthRecord
from qudata_agent.domain.inventory import GpuSample
from qudata_agent.metrics import Metrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "qudata-agent.rules.yml"
DASHBOARD = DEPLOY / "grafana" / "qudata-agent-dashboard.json"
NAME = re.compile(r"\b((?:qudata|process)_[a-z0-9_]+)")


class _Telemetry:
    def __init__(self) -> None:
        self.last: dict[str, Any] | None = {"cpu_util": 1.0, "ram_util": 2.0, "status": "running"}
        self.last_gpus = (GpuSample("GPU-1", 50.0, 1, 2, 40.0),)
        self.last_net: tuple[int, int] | None = (1, 2)


def _exported() -> set[str]:
    """Every sample name a fully fed agent exports."""
    metrics = Metrics()
    metrics.count_request("/ping", "GET", 200)
    metrics.control_plane_failed("/stats")
    metrics.control_plane_succeeded("/stats")
    metrics.reconcile_ran(ok=True)
    metrics.follow_stats(_Telemetry())
    record = HealthRecord()
    record.add(GpuEvent("GPU-1", "xid", 79, 1.0))
    record.add(GpuEvent("GPU-1", "ecc_uncorrected", None, 1.0))
    metrics.follow_health(record)
    metrics.follow_disk(lambda: "/var/lib/docker", lambda path: 1)
    body, _ = metrics.render()
    return {
        s.name for family in text_string_to_metric_families(body.decode()) for s in family.samples
    }


def _alerts() -> list[dict[str, Any]]:
    rules = yaml.safe_load(RULES.read_text())
    return [rule for group in rules["groups"] for rule in group["rules"]]


def test_the_alert_rules_cover_xids_the_control_plane_and_disk() -> None:
    alerts = {rule["alert"]: rule for rule in _alerts()}
    for name in ("QudataGpuXid", "QudataControlPlaneUnreachable", "QudataDockerDiskLow"):
        assert name in alerts
    for rule in alerts.values():
        assert rule["expr"].strip() and rule["annotations"]["summary"]
        assert rule["labels"]["severity"] in ("warning", "critical")


def test_rules_and_dashboard_use_exported_metric_names_only() -> None:
    exported = _exported()
    exprs = [rule["expr"] for rule in _alerts()]
    dashboard = json.loads(DASHBOARD.read_text())
    exprs += [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {name for expr in exprs for name in NAME.findall(expr)}
    assert used and used <= exported, used - exported
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
