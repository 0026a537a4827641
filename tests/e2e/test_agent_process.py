"""The real `qudata-agent run` process against a recording fake control plane."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import pytest

import qudata_agent
from support.agent_proc import AgentProcess, free_port
from support.fake_cp import DEFAULT_INIT, FakeControlPlane

API_KEY = "test-api-key-7f3e9c1d"
CP_SECRET = DEFAULT_INIT["secret_key"]
GIB = 1024**3

AgentFactory = Callable[..., AgentProcess]


def _cp_env(cp_url: str, **extra: str) -> dict[str, str]:
    return {"QUDATA_API_KEY": API_KEY, "QUDATA_API_URL": cp_url, **extra}


def _docker_root() -> str:
    out = subprocess.run(
        ["docker", "info", "--format", "{{.DockerRootDir}}"],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


def _cpu_model() -> str | None:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return None


def test_registers_with_the_contract_payloads(
    fake_cp: FakeControlPlane, agent_factory: AgentFactory
) -> None:
    agent = agent_factory(_cp_env(fake_cp.url, QUDATA_ADDRESS="203.0.113.7")).start()
    (init,) = fake_cp.wait_for("/init")
    (host,) = fake_cp.wait_for("/init/host")

    body = init.body
    assert set(body) == {
        "agent_id",
        "agent_port",
        "address",
        "fingerprint",
        "pid",
        "version",
        "tls_pubkey_sha256",  # CONTRACT.md section 5 (tests/e2e/test_tls_port.py checks it)
    }
    assert str(uuid.UUID(body["agent_id"])) == body["agent_id"]
    assert body["agent_port"] == agent.port
    assert init.agent_port_answered is True, "reported the port before it was listening"
    assert body["address"] == "203.0.113.7"
    assert re.fullmatch(r"[0-9a-f]{64}", body["fingerprint"])
    assert body["pid"] == agent.proc.pid
    assert body["version"] == qudata_agent.__version__
    assert init.headers["X-Api-Key"] == API_KEY
    assert "X-Agent-Secret" not in init.headers  # none known before the first answer

    # The secret from /init goes out from then on and guards the inbound API.
    assert host.headers["X-Api-Key"] == API_KEY
    assert host.headers["X-Agent-Secret"] == CP_SECRET
    assert agent.secret() == CP_SECRET
    secret_mode = stat.S_IMODE((agent.state_dir / "agent_secret").stat().st_mode)
    assert secret_mode == 0o600
    assert httpx.get(agent.url + "/openapi.json", headers={"X-Agent-Secret": CP_SECRET}).is_success

    payload = host.body
    assert set(payload) == {
        "gpu_name",
        "gpu_amount",
        "vram",
        "location",
        "configuration",
        "isolation",  # CONTRACT.md section 9: the tiers offered (tests/e2e/test_sandbox.py)
    }
    assert "container" in payload["isolation"]
    # No GPU on this host: none reported, none invented.
    assert payload["gpu_amount"] == 0
    assert payload["gpu_name"] is None
    assert payload["vram"] == 0
    assert payload["location"] == {"city": None, "country": None, "region": None}
    conf = payload["configuration"]
    assert conf["ram"] == {"amount": round(psutil.virtual_memory().total / GIB), "unit": "gb"}
    disk_total = shutil.disk_usage(_docker_root()).total
    assert conf["disk"] == {"amount": round(disk_total / GIB), "unit": "gb"}
    assert conf["cpu_name"] == _cpu_model()
    assert conf["vcpu"] == os.cpu_count()
    assert conf["cpu_cores"] == psutil.cpu_count(logical=False)
    assert conf["cpu_freq"] is None or 0.1 < conf["cpu_freq"] < 10
    assert conf["max_cuda_version"] is None
    assert set(conf) >= {"memory_speed", "ethernet_in", "ethernet_out", "capacity"}

    code, _ = agent.stop()
    assert code == 0
    log = agent.log()
    assert API_KEY not in log and CP_SECRET not in log


def test_identity_and_secret_survive_a_restart(
    fake_cp: FakeControlPlane, agent_factory: AgentFactory
) -> None:
    first = agent_factory(_cp_env(fake_cp.url)).start()
    fake_cp.wait_for("/init/host")
    assert first.stop()[0] == 0

    # The control plane now knows the host and issues no new secret.
    fake_cp.answers["/v0/init"] = (
        200,
        {
            "ok": True,
            "data": {"agent_created": False, "emergency_reinit": False, "host_exists": True},
        },
    )
    second = agent_factory(_cp_env(fake_cp.url), state_dir=first.state_dir).start()
    inits = fake_cp.wait_for("/init", count=2)
    assert inits[1].body["agent_id"] == inits[0].body["agent_id"]
    assert inits[1].body["fingerprint"] == inits[0].body["fingerprint"]
    assert inits[1].body["pid"] == second.proc.pid != first.proc.pid
    assert inits[1].headers["X-Agent-Secret"] == CP_SECRET  # kept from the first run
    time.sleep(0.5)
    assert len(fake_cp.requests("/init/host")) == 1, "unchanged, known host re-sent"
    assert httpx.get(second.url + "/openapi.json", headers={"X-Agent-Secret": CP_SECRET}).is_success
    assert second.stop()[0] == 0


def test_api_key_from_the_command_line_is_kept_for_later_starts(
    fake_cp: FakeControlPlane, agent_factory: AgentFactory
) -> None:
    env = {"QUDATA_API_URL": fake_cp.url}
    first = agent_factory(env).start("--api-key", API_KEY)
    fake_cp.wait_for("/init")
    assert first.stop()[0] == 0
    key_file = first.state_dir / "api_key"
    assert key_file.read_text().strip() == API_KEY
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(first.state_dir.stat().st_mode) == 0o700

    agent_factory(env, state_dir=first.state_dir).start()  # no key given this time
    second = fake_cp.wait_for("/init", count=2)[1]
    assert second.headers["X-Api-Key"] == API_KEY


def test_standalone_mode_makes_no_calls_and_keeps_a_private_secret(
    fake_cp: FakeControlPlane, agent_factory: AgentFactory
) -> None:
    agent = agent_factory({"QUDATA_API_URL": fake_cp.url}).start()
    secret_file = agent.state_dir / "agent_secret"
    assert str(secret_file) in agent.log()  # its path is printed at start
    secret = agent.secret()
    assert len(secret) >= 32
    for path in agent.state_dir.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, f"{path.name} readable by others"
    assert stat.S_IMODE(agent.state_dir.stat().st_mode) == 0o700
    assert httpx.get(agent.url + "/openapi.json", headers={"X-Agent-Secret": secret}).is_success
    time.sleep(0.5)
    assert fake_cp.calls == []
    assert agent.stop()[0] == 0
    assert secret not in agent.log()

    again = agent_factory({}, state_dir=agent.state_dir).start()
    assert again.secret() == secret


def _near_misses(secret: str) -> list[str]:
    return [
        secret[:-1],
        secret + "x",
        secret.upper() if secret != secret.upper() else secret.lower(),
        secret[1:],
        secret[:-1] + ("A" if secret[-1] != "A" else "B"),
    ]


def test_every_route_but_ping_needs_the_secret(agent_factory: AgentFactory) -> None:
    agent = agent_factory().start()
    secret = agent.secret()
    doc = httpx.get(agent.url + "/openapi.json", headers={"X-Agent-Secret": secret}).json()
    checked = 0
    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            if not op["security"]:
                assert (method, path) == ("get", "/ping")
                continue
            for headers in [{}, {"X-Agent-Secret": "wrong"}] + [
                {"X-Agent-Secret": s} for s in _near_misses(secret)
            ]:
                resp = httpx.request(method.upper(), agent.url + path, headers=headers)
                assert resp.status_code == 401, (method, path, headers)
                assert resp.json() == {"ok": False, "error": "missing or wrong X-Agent-Secret"}
            checked += 1
    assert checked >= 1
    assert httpx.get(agent.url + "/ping").json() == {"ok": True, "data": None}


def test_framework_errors_come_in_the_envelope(agent_factory: AgentFactory) -> None:
    agent = agent_factory().start()
    auth = {"X-Agent-Secret": agent.secret()}

    not_found = httpx.get(agent.url + "/no/such/route", headers=auth)
    assert not_found.status_code == 404
    assert not_found.json()["ok"] is False and "title" not in not_found.json()

    wrong_method = httpx.delete(agent.url + "/ping", headers=auth)
    assert wrong_method.status_code == 405
    assert wrong_method.json()["ok"] is False and "GET" in wrong_method.headers["allow"]

    too_big = httpx.post(agent.url + "/openapi.json", headers=auth, content=b"x" * (1024**2 + 1))
    assert too_big.status_code == 413
    assert too_big.json() == {"ok": False, "error": "request body over the limit of 1048576 bytes"}


def test_oversize_body_refused_before_it_is_sent(agent_factory: AgentFactory) -> None:
    """A declared 100 MB body gets 413 at once: the agent does not wait to read it."""
    agent = agent_factory().start()
    with socket.create_connection(("127.0.0.1", agent.port), timeout=5) as conn:
        conn.sendall(
            b"POST /openapi.json HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"X-Agent-Secret: {agent.secret()}\r\n".encode()
            + b"Content-Length: 104857600\r\n\r\n{"
        )
        started = time.monotonic()
        head = conn.recv(4096).decode(errors="replace")
    assert head.startswith("HTTP/1.1 413"), head
    assert time.monotonic() - started < 2


def test_ping_answers_while_the_control_plane_is_down_then_registers(
    agent_factory: AgentFactory,
) -> None:
    cp_port = free_port()  # nothing listens here yet
    agent = agent_factory(_cp_env(f"http://127.0.0.1:{cp_port}/v0")).start()
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        started = time.monotonic()
        assert httpx.get(agent.url + "/ping", timeout=2).status_code == 200
        assert time.monotonic() - started < 0.5
        time.sleep(0.1)

    cp = FakeControlPlane(cp_port).start()
    try:
        cp.wait_for("/init/host", timeout=10)
    finally:
        cp.stop()
    failures = [r for r in agent.log_records() if "registration failed" in r.get("msg", "")]
    assert len(failures) == 1, "a failure streak is logged once, not on every try"
    assert any("reachable again" in r.get("msg", "") for r in agent.log_records())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_the_agent_cleanly(agent_factory: AgentFactory, sig: int) -> None:
    # A control plane that accepts connections and never answers keeps a
    # registration call in flight while the signal arrives.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        env = _cp_env(f"http://127.0.0.1:{silent.getsockname()[1]}/v0", QUDATA_CP_TIMEOUT="60")
        agent = agent_factory(env).start()
        keepalive = httpx.Client()
        assert keepalive.get(agent.url + "/ping").status_code == 200  # an idle open connection
        code, elapsed = agent.stop(sig)
        keepalive.close()
    finally:
        silent.close()
    assert code == 0
    assert elapsed < 10
    assert any(r.get("msg") == "agent stopped" for r in agent.log_records())


def test_bad_configuration_exits_2_naming_the_variable(tmp_path: Path) -> None:
    agent = AgentProcess(tmp_path / "state", {"QUDATA_AGENT_PORT": "not-a-port"})
    agent.start(wait=False)
    code, _ = agent.stop(signal.SIGCONT)  # just wait for it to exit by itself
    assert code == 2
    assert "QUDATA_AGENT_PORT" in agent.log()
    assert not agent.state_dir.exists(), "nothing is created before the config is valid"


def test_kept_alive_connections_answer_without_delayed_ack_stalls(
    agent_factory: AgentFactory,
) -> None:
    """Each answer on a reused connection comes at once (TCP_NODELAY is on)."""
    agent = agent_factory().start()
    with httpx.Client(base_url=agent.url) as client:
        client.get("/ping")
        times = []
        for _ in range(20):
            started = time.monotonic()
            assert client.get("/ping").status_code == 200
            times.append(time.monotonic() - started)
    times.sort()
    assert times[len(times) // 2] < 0.02, f"median {times[len(times) // 2] * 1000:.1f} ms"
