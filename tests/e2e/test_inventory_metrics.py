"""The real agent process: /metrics, the inventory sent again when it changes, the public address.

The inventory change is a real one as far as the agent can tell: a `dmidecode`
earlier on its PATH prints what the test writes, and the test changes the
memory speed it reports. The "what is my IP" lookups go to servers on
loopback only; nothing here reaches the internet.
"""

from __future__ import annotations

import os
import socket
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from qudata_agent.adapters.host import default_route_address
from support.agent_proc import AgentProcess
from support.fake_cp import DEFAULT_INIT, FakeControlPlane
from support.ip_service import IpService, dead_url

AgentFactory = Callable[..., AgentProcess]
CP_SECRET = DEFAULT_INIT["secret_key"]
DMI = """# dmidecode 3.5
Getting SMBIOS data from sysfs.

Handle 0x1100, DMI type 17, 100 bytes
Memory Device
\tSize: 64 GB
\tLocator: DIMM_A0
\tType: DDR5
\tSpeed: 5600 MT/s
\tConfigured Memory Speed: {speed} MT/s
"""


def _cp_env(cp: FakeControlPlane, **extra: str) -> dict[str, str]:
    return {"QUDATA_API_KEY": "inventory-key-0123", "QUDATA_API_URL": cp.url, **extra}


def _metrics(
    agent: AgentProcess, secret: str
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    resp = httpx.get(agent.url + "/metrics", headers={"X-Agent-Secret": secret})
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(resp.text)
        for s in family.samples
    }


def test_metrics_needs_the_secret_and_counts_api_requests(agent_factory: AgentFactory) -> None:
    agent = agent_factory().start()  # standalone
    secret = agent.secret()
    for _ in range(3):
        assert httpx.get(agent.url + "/ping").status_code == 200

    refused = httpx.get(agent.url + "/metrics")
    assert refused.status_code == 401
    assert refused.json() == {"ok": False, "error": "missing or wrong X-Agent-Secret"}

    found = _metrics(agent, secret)
    ping = ("qudata_api_requests_total", (("code", "200"), ("method", "GET"), ("route", "/ping")))
    assert found[ping] >= 3
    refused_key = (
        "qudata_api_requests_total",
        (("code", "401"), ("method", "GET"), ("route", "/metrics")),
    )
    assert found[refused_key] == 1
    doc = httpx.get(agent.url + "/openapi.json", headers={"X-Agent-Secret": secret}).json()
    assert "text/plain" in doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]

    # No GPU here: the GPU event watch degrades without a word.
    assert agent.stop()[0] == 0
    noisy = [
        r
        for r in agent.log_records()
        if r.get("level") in ("warning", "error")
        and r.get("logger", "").startswith(("qudata_agent.adapters.nvml", "qudata_agent.loops.gpu"))
    ]
    assert noisy == []


def test_metrics_show_the_stats_and_the_reconciles(
    fake_cp: FakeControlPlane, agent_factory: AgentFactory
) -> None:
    with socket.socket() as probe:  # a free loopback port for the metrics listener
        probe.bind(("127.0.0.1", 0))
        listen_port = probe.getsockname()[1]
    env = _cp_env(fake_cp, QUDATA_METRICS_LISTEN=f"127.0.0.1:{listen_port}")
    agent = agent_factory(env).start()
    fake_cp.wait_for("/stats", count=1)
    # The loopback listener serves the same text with no secret.
    plain = httpx.get(f"http://127.0.0.1:{listen_port}/metrics", timeout=5)
    assert plain.status_code == 200 and "qudata_build_info{" in plain.text
    found = _metrics(agent, CP_SECRET)
    assert 0 <= found[("qudata_cpu_utilization_ratio", (("subject", "host"),))] <= 1
    assert 0 < found[("qudata_memory_utilization_ratio", (("subject", "host"),))] <= 1
    assert found[("qudata_network_receive_bytes_total", (("subject", "host"),))] >= 0
    last_ok = found[("qudata_control_plane_last_success_timestamp_seconds", ())]
    assert time.time() - 60 < last_ok <= time.time()
    assert found[("process_resident_memory_bytes", ())] > 0
    free = [v for (name, _), v in found.items() if name == "qudata_docker_data_root_free_bytes"]
    assert free and free[0] > 0
    assert found[("qudata_instance_status", (("status", "destroyed"),))] == 1
    assert found[("qudata_reconcile_runs_total", (("result", "ok"),))] >= 1
    assert not any(name.startswith("qudata_gpu_utilization") for name, _ in found)  # no GPU

    fake_cp.answers["/v0/stats"] = (503, {"ok": False, "error": "maintenance"})
    deadline = time.monotonic() + 10
    failures = 0.0
    while time.monotonic() < deadline and failures < 1:
        time.sleep(0.5)
        found = _metrics(agent, CP_SECRET)
        failures = found.get(("qudata_control_plane_failures_total", (("call", "/stats"),)), 0)
    assert failures >= 1


@pytest.fixture
def fake_dmidecode(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    """A `dmidecode` on a PATH of its own that prints the file the test writes."""
    bin_dir, output = tmp_path / "bin", tmp_path / "dmidecode.out"
    bin_dir.mkdir()
    tool = bin_dir / "dmidecode"
    tool.write_text(f'#!/bin/sh\n[ "$1 $2" = "-t memory" ] || exit 2\ncat "{output}"\n')
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    yield output, {"PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}"}


def test_the_inventory_is_sent_again_when_it_changes(
    fake_cp: FakeControlPlane,
    agent_factory: AgentFactory,
    fake_dmidecode: tuple[Path, dict[str, str]],
) -> None:
    output, path_env = fake_dmidecode
    output.write_text(DMI.format(speed=3200))
    agent = agent_factory(_cp_env(fake_cp, QUDATA_INVENTORY_INTERVAL="1", **path_env)).start()
    (first,) = fake_cp.wait_for("/init/host")
    assert first.body["configuration"]["memory_speed"] == 3200

    time.sleep(2.5)  # two checks or more: unchanged, so nothing is sent
    assert len(fake_cp.requests("/init/host")) == 1

    output.write_text(DMI.format(speed=4800))  # the host changed
    second = fake_cp.wait_for("/init/host", count=2, timeout=5)[1]
    assert second.body["configuration"]["memory_speed"] == 4800
    assert second.headers["X-Agent-Secret"] == CP_SECRET
    time.sleep(1.5)
    assert len(fake_cp.requests("/init/host")) == 2, "an unchanged inventory was sent again"
    changed = [
        r for r in agent.log_records() if r.get("msg") == "host inventory changed; sent again"
    ]
    assert len(changed) == 1 and changed[0]["changed"] == ["configuration.memory_speed"]


@pytest.fixture
def ip_server() -> Iterator[IpService]:
    server = IpService(b"198.51.100.23\n")
    yield server
    server.close()


def test_the_public_address_comes_from_the_lookups(
    fake_cp: FakeControlPlane, agent_factory: AgentFactory, ip_server: IpService
) -> None:
    urls = f"{dead_url()},{ip_server.url}"
    agent_factory(_cp_env(fake_cp, QUDATA_ADDRESS_LOOKUP_URLS=urls)).start()
    (init,) = fake_cp.wait_for("/init")
    assert init.body["address"] == "198.51.100.23"
    assert ip_server.paths == ["/ip"]


def test_the_configured_address_wins_over_the_lookups(
    fake_cp: FakeControlPlane, agent_factory: AgentFactory, ip_server: IpService
) -> None:
    env = _cp_env(fake_cp, QUDATA_ADDRESS="203.0.113.7", QUDATA_ADDRESS_LOOKUP_URLS=ip_server.url)
    agent_factory(env).start()
    (init,) = fake_cp.wait_for("/init")
    assert init.body["address"] == "203.0.113.7"
    assert ip_server.paths == []


def test_without_an_answer_the_default_route_address_is_used(
    fake_cp: FakeControlPlane, agent_factory: AgentFactory
) -> None:
    agent_factory(_cp_env(fake_cp, QUDATA_ADDRESS_LOOKUP_URLS=dead_url())).start()
    (init,) = fake_cp.wait_for("/init")
    assert init.body["address"] == default_route_address()
