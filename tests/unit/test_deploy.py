"""deploy/: the monitoring files name exported metrics only; the key stays off command lines."""

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
        self.last_net: dict[str, tuple[int, int]] = {"i1": (1, 2)}


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


def test_the_cloud_init_example_passes_the_key_in_a_file_and_removes_it() -> None:
    text = (DEPLOY / "cloud-init" / "user-data.yaml").read_text()
    assert text.startswith("#cloud-config\n")
    config = yaml.safe_load(text)
    (key_file,) = [f for f in config["write_files"] if f["path"].endswith("api_key")]
    assert key_file["path"].startswith("/run/") and key_file["permissions"] == "0600"
    install = next(cmd for cmd in config["runcmd"] if "install.sh" in " ".join(cmd[:2]))
    assert install[install.index("--api-key-file") + 1] == key_file["path"]
    assert "--strict" in install
    assert config["runcmd"][-1] == ["rm", "-f", key_file["path"]]


def test_the_role_passes_the_key_on_stdin_only() -> None:
    tasks = yaml.safe_load((DEPLOY / "ansible/roles/qudata_agent/tasks/main.yml").read_text())
    (install,) = [t for t in tasks if t["name"] == "Install or upgrade the agent"]
    assert "qudata_agent_api_key" in install["ansible.builtin.command"]["stdin"]
    assert "qudata_agent_api_key" not in install["ansible.builtin.command"]["argv"]
    assert install["no_log"]
    assert "(no change)" in install["changed_when"]


ROLE = DEPLOY / "ansible/roles/qudata_agent"


def _body(script: str) -> str:
    """A firewall script from `set -euo pipefail` on: what does not depend on the host."""
    return script[script.index("set -euo pipefail") :]


def test_the_role_and_cloud_init_close_the_agent_port_with_the_same_script() -> None:
    config = yaml.safe_load((DEPLOY / "cloud-init" / "user-data.yaml").read_text())
    files = {f["path"]: f for f in config["write_files"]}
    script = files["/usr/local/sbin/qudata-agent-api-firewall"]
    assert script["permissions"] == "0755"
    role_script = (ROLE / "templates/qudata-agent-api-firewall.j2").read_text()
    assert _body(script["content"]) == _body(role_script)
    unit = files["/etc/systemd/system/qudata-agent-api-firewall.service"]["content"]
    assert "Before=qudata-agent.service" in unit and "WantedBy=multi-user.target" in unit
    enable = ["systemctl", "enable", "--now", "qudata-agent-api-firewall.service"]
    install = next(i for i, cmd in enumerate(config["runcmd"]) if "install.sh" in " ".join(cmd[:2]))
    assert config["runcmd"].index(enable) > install  # iptables comes with install.sh


def test_the_role_needs_the_control_planes_networks_while_its_firewall_is_on() -> None:
    defaults = yaml.safe_load((ROLE / "defaults/main.yml").read_text())
    assert defaults["qudata_agent_firewall"] is True and defaults["qudata_agent_api_allow"] == []
    tasks = yaml.safe_load((ROLE / "tasks/main.yml").read_text())
    (check,) = [t for t in tasks if "control plane's networks" in t["name"]]
    assert "qudata_agent_api_allow" in check["ansible.builtin.assert"]["that"][0]
    applied = [t for t in tasks if "ansible.builtin.systemd" in t and "firewall" in t["name"]]
    assert applied and applied[0]["ansible.builtin.systemd"]["enabled"] is True
    site = yaml.safe_load((DEPLOY / "ansible/site.yml").read_text())
    assert site[0]["roles"][0]["vars"]["qudata_agent_api_allow"]
