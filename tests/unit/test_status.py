"""`status`: the metrics parser, the recorded view of an instance, and the text made of them."""

from __future__ import annotations

import json
from pathlib import Path

from qudata_agent import status
from qudata_agent.adapters.store import Store
from qudata_agent.adapters.tls import TlsKeeper
from qudata_agent.config import load_settings
from qudata_agent.domain.instance import Instance, Status, Wanted
from qudata_agent.status import Live, Recorded, Report

METRICS = """\
# HELP qudata_control_plane_failures_total Control-plane calls that failed
# TYPE qudata_control_plane_failures_total counter
qudata_control_plane_failures_total{call="/stats"} 3.0
qudata_control_plane_failures_total{call="/init"} 0.0
qudata_control_plane_failures_created{call="/stats"} 1.7e+09
qudata_cpu_utilization_ratio{subject="instance"} 0.125
qudata_memory_utilization_ratio{subject="instance"} 0.4
qudata_gpu_utilization_ratio{uuid="GPU-a"} 0.9
qudata_gpu_utilization_ratio{uuid="GPU-b"} 0.7
qudata_gpu_memory_used_bytes{uuid="GPU-a"} 3.0e+09
qudata_gpu_memory_used_bytes{uuid="GPU-b"} 1.0e+09
qudata_gpu_memory_total_bytes{uuid="GPU-a"} 8.0e+09
qudata_gpu_memory_total_bytes{uuid="GPU-b"} 8.0e+09
qudata_gpu_temperature_celsius{uuid="GPU-a"} 61.0
qudata_gpu_temperature_celsius{uuid="GPU-b"} 55.0
qudata_api_requests_total{route="/instances",method="GET",code="200"} 7.0
qudata_instance_status{status="running"} 1.0
"""

INSTANCE = Instance(
    id="i-1",
    status=Status.RUNNING,
    wanted=Wanted.RUNNING,
    image="nvidia/cuda:12.6.1-base-ubuntu22.04",
    container_name="qudata-i-1",
    ports={"22": 40001, "8080": 40002},
    gpus=("GPU-a",),
    ssh_enabled=True,
)


def _report(**changes: object) -> Report:
    base: dict[str, object] = {
        "state_dir": Path("/var/lib/qudata-agent"),
        "api_url": "https://cp.example/v0",
        "has_api_key": True,
        "address": "127.0.0.1:1024",
        "recorded": Recorded("agent-1", 1024, True, ()),
        "live": None,
        "down_reason": None,
    }
    base.update(changes)
    return Report(**base)  # type: ignore[arg-type]


def test_metrics_are_parsed_by_name_and_labels() -> None:
    samples = status.parse_metrics(METRICS)
    assert samples["qudata_control_plane_failures_total"] == [
        ({"call": "/stats"}, 3.0),
        ({"call": "/init"}, 0.0),
    ]
    assert samples["qudata_api_requests_total"] == [
        ({"route": "/instances", "method": "GET", "code": "200"}, 7.0)
    ]
    assert "# HELP" not in " ".join(samples)


def test_a_stored_instance_reads_like_the_api_answer() -> None:
    view = status.recorded_instance(INSTANCE, ("ready", None, "run-1"))
    assert view["instance_id"] == "i-1" and view["status"] == "running"
    assert view["allocated_ports"] == {"22": "40001", "8080": "40002"}
    assert view["ssh"] == {"status": "ready", "port": "40001", "reason": None}
    assert "ssh" not in status.recorded_instance(
        Instance(**{**INSTANCE.__dict__, "ssh_enabled": False}), None
    )


def test_a_running_agent_shows_its_instance_links_and_stats() -> None:
    live = Live(
        instance={
            "instance_id": "i-1",
            "status": "running",
            "image": "img:1",
            "allocated_ports": {"22": "40001", "8080": "40002"},
            "gpus": ["GPU-a"],
            "ssh_enabled": True,
            "ssh": {"status": "ready", "port": "40001", "reason": None},
        },
        metrics=status.parse_metrics(METRICS),
    )
    text = status.render(_report(live=live))
    assert "agent       running, API on 127.0.0.1:1024" in text
    assert "instance    i-1 running, image img:1" in text
    assert "ports       22 -> 40001, 8080 -> 40002" in text
    assert "gpus        GPU-a" in text
    assert "ssh         ready on host port 40001" in text
    assert "host registered; failed calls since start: /stats 3" in text
    assert "stats       cpu 12%, ram 40%, gpu 80%, gpu mem 25%, gpu temp 61C (instance)" in text
    assert status.exit_code(_report(live=live)) == status.EXIT_RUNNING == 0


def test_a_stopped_agent_is_said_to_be_down_and_the_record_is_shown() -> None:
    recorded = Recorded("agent-1", 1024, False, (status.recorded_instance(INSTANCE, None),))
    report = _report(recorded=recorded, down_reason="nothing answers on 127.0.0.1:1024")
    text = status.render(report)
    assert text.startswith("agent       NOT running (nothing answers on 127.0.0.1:1024)")
    assert "agent id agent-1" in text
    assert "instance    i-1 running, image nvidia/cuda" in text
    assert "ssh         installing on host port 40001" in text
    assert "(as last recorded; the agent is down)" in text
    assert "https://cp.example/v0: not registered yet" in text
    assert status.exit_code(report) == status.EXIT_DOWN == 3


def test_no_state_and_no_key() -> None:
    text = status.render(_report(recorded=None, has_api_key=False, down_reason="no port"))
    assert "no state yet" in text
    assert "standalone (no API key)" in text
    data = json.loads(status.to_json(_report(recorded=None, has_api_key=False)))
    assert data["running"] is False and data["standalone"] is True and data["agent_id"] is None


def test_read_recorded_never_creates_a_database(tmp_path: Path) -> None:
    assert status.read_recorded(tmp_path) is None
    assert list(tmp_path.iterdir()) == []


def test_read_recorded_from_a_store(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "agent.db")
    store.set("agent_id", "agent-9")
    store.set("agent_port", "1031")
    store.insert_instance(INSTANCE)
    store.set_ssh_state("i-1", "failed", "no package manager")
    store.close()
    recorded = status.read_recorded(tmp_path)
    assert recorded is not None
    assert (recorded.agent_id, recorded.agent_port, recorded.registered) == ("agent-9", 1031, False)
    (view,) = recorded.instances
    assert view["ssh"] == {"status": "failed", "port": "40001", "reason": "no package manager"}


def test_the_tls_line_shows_the_mode_the_pin_and_the_expiry(tmp_path: Path) -> None:
    off = status.tls_state(load_settings(environ={"QUDATA_TLS": "off"}))
    assert "plain HTTP only" in status.render(_report(tls=off))
    settings = load_settings(environ={"QUDATA_STATE_DIR": str(tmp_path)})
    assert "no certificate yet" in status.render(_report(tls=status.tls_state(settings)))
    keeper = TlsKeeper(tmp_path, ("host-1",))
    state = status.tls_state(settings)
    line = status.render(_report(tls=state))
    assert f"pin sha256//{keeper.identity.pin}" in line and "(plain HTTP too)" in line
    assert state.not_after == keeper.identity.not_after.isoformat(timespec="seconds")
    assert json.loads(status.to_json(_report(tls=state)))["tls"]["pin"] == keeper.identity.pin
