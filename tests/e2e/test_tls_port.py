"""TLS on the agent's port against the real `qudata-agent run` process (CONTRACT.md section 5).

The pin the agent sends in `/init` is checked against the key the port really
serves (read with `ssl`), `curl --pinnedpubkey` gets `/v1/host` with it and
fails with any other, plain HTTP is served by default and refused with the
contract's 400 under `QUDATA_TLS=required`, the agent-made key outlives a
restart and a renewal, the provider's own certificate is served as given, and
mutual TLS refuses every client without a certificate from the CA. Every
certificate here is made by the test with `cryptography`; all traffic stays on
loopback. No Docker call is needed (the firewall is off).
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
import os
import socket
import ssl
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from support.agent_proc import AgentProcess, agent_command
from support.fake_cp import FakeControlPlane
from support.tls_certs import issue, make_ca, served_certificate, spki_pin

AgentFactory = Callable[..., AgentProcess]
TLS_REQUIRED = {"ok": False, "error": "TLS required: use https://"}
BASE = {"QUDATA_FIREWALL": "off", "QUDATA_PORT_RANGE": "20950-20999"}


def _curl(
    agent: AgentProcess, pin: str, path: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "curl", "-sS", "-k", "--max-time", "5",
            "--pinnedpubkey", f"sha256//{pin}",
            "-H", f"X-Agent-Secret: {agent.secret()}",
            *extra,
            f"{agent.https_url}{path}",
        ],
        capture_output=True, text=True, check=False, timeout=20,
    )  # fmt: skip


def _plain_get(port: int, path: str) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        answer = conn.getresponse()
        return answer.status, json.loads(answer.read())
    finally:
        conn.close()


def _tls_get(agent: AgentProcess, path: str, ctx: ssl.SSLContext) -> tuple[int, Any]:
    conn = http.client.HTTPSConnection("127.0.0.1", agent.port, timeout=5, context=ctx)
    try:
        conn.request("GET", path, headers={"X-Agent-Secret": agent.secret()})
        answer = conn.getresponse()
        return answer.status, json.loads(answer.read())
    finally:
        conn.close()


def test_the_pin_in_init_is_the_key_the_port_serves(
    fake_cp: FakeControlPlane, agent_factory: AgentFactory
) -> None:
    env = {**BASE, "QUDATA_API_KEY": "qk_tls_test", "QUDATA_API_URL": fake_cp.url}
    agent = agent_factory(env).start()
    (init,) = fake_cp.wait_for("/init")
    pin = init.body["tls_pubkey_sha256"]
    served = served_certificate(agent.port)
    assert pin == spki_pin(served)
    assert len(pin) == 44 and pin.endswith("=")  # base64 of 32 bytes
    fake_cp.wait_for("/init/host")
    done = _curl(agent, pin, "/v1/host")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["data"]["tls_pubkey_sha256"] == pin
    status = subprocess.run(
        [*agent_command(), "status"], env=agent.env, capture_output=True, text=True, timeout=30
    )
    assert f"sha256//{pin}" in status.stdout, status.stdout


def test_curl_pins_the_key_and_plain_http_is_served_by_default(
    agent_factory: AgentFactory,
) -> None:
    agent = agent_factory(BASE).start()
    pin = spki_pin(served_certificate(agent.port))
    wrong = "A" * 43 + "="
    done = _curl(agent, wrong, "/v1/host")
    assert done.returncode == 90, (done.returncode, done.stdout)  # SSL public key mismatch
    assert done.stdout == ""
    # curl stopped after the handshake: the request (and the secret in it) never left it.
    assert not [r for r in agent.log_records() if r.get("path") == "/v1/host"]
    done = _curl(agent, pin, "/v1/host")
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["ok"] is True and answer["data"]["tls_pubkey_sha256"] == pin
    assert [r for r in agent.log_records() if r.get("path") == "/v1/host"]
    assert _plain_get(agent.port, "/ping") == (200, {"ok": True, "data": None})


def test_tls_required_answers_plain_http_with_the_contracts_400(
    agent_factory: AgentFactory,
) -> None:
    agent = agent_factory({**BASE, "QUDATA_TLS": "required"}).start()
    for path in ("/ping", "/v1/host", "/no/such/route"):
        assert _plain_get(agent.port, path) == (400, TLS_REQUIRED)
    status, body = _tls_get(agent, "/v1/host", agent.tls_client())
    pin = body["data"]["tls_pubkey_sha256"]
    assert status == 200 and pin == spki_pin(served_certificate(agent.port))
    done = subprocess.run(
        [*agent_command(), "doctor", "--json"],
        env=agent.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    (tls,) = [c for c in json.loads(done.stdout)["checks"] if c["name"] == "api tls"]
    assert tls["level"] == "pass", tls
    assert f"required, pin sha256//{pin}" in tls["detail"] and "plain HTTP refused" in tls["detail"]


def test_tls_off_serves_plain_http_only(agent_factory: AgentFactory) -> None:
    agent = agent_factory({**BASE, "QUDATA_TLS": "off"}).start()
    assert _plain_get(agent.port, "/ping")[0] == 200
    with pytest.raises((ssl.SSLError, ConnectionError)):
        served_certificate(agent.port)
    assert not (agent.state_dir / "tls").exists()


def _near_expiry(state: Path) -> x509.Certificate:
    """Replaces the agent-made certificate by one with the same key that expires tomorrow."""
    key = serialization.load_pem_private_key((state / "tls/key.pem").read_bytes(), None)
    pair = issue(None, "old", server=True, names=("127.0.0.1",), key=key,  # type: ignore[arg-type]
                 valid_for=dt.timedelta(days=1))  # fmt: skip
    (state / "tls/cert.pem").write_bytes(pair.cert.public_bytes(serialization.Encoding.PEM))
    return pair.cert


def test_the_key_outlives_a_restart_and_a_renewal(agent_factory: AgentFactory) -> None:
    agent = agent_factory(BASE).start()
    first = served_certificate(agent.port)
    key_mode = stat.S_IMODE(os.stat(agent.state_dir / "tls/key.pem").st_mode)
    assert key_mode == 0o600
    assert agent.stop()[0] == 0

    again = agent_factory(BASE, state_dir=agent.state_dir, port=agent.port).start()
    second = served_certificate(again.port)
    assert second.serial_number == first.serial_number  # nothing to renew: the same certificate
    assert again.stop()[0] == 0

    old = _near_expiry(agent.state_dir)
    renewed = agent_factory(BASE, state_dir=agent.state_dir, port=agent.port).start()
    third = served_certificate(renewed.port)
    assert third.serial_number != old.serial_number
    assert third.not_valid_after_utc - dt.datetime.now(dt.UTC) > dt.timedelta(days=300)
    assert spki_pin(third) == spki_pin(old) == spki_pin(first)  # the pin outlives it all


def test_the_providers_own_certificate_is_served(
    tmp_path: Path, agent_factory: AgentFactory
) -> None:
    ca = make_ca("provider CA")
    leaf = issue(ca, "gpu-7.provider.test", server=True, names=("gpu-7.provider.test",))
    cert_file, key_file = leaf.write(tmp_path, "leaf")
    env = {**BASE, "QUDATA_TLS_CERT_FILE": str(cert_file), "QUDATA_TLS_KEY_FILE": str(key_file)}
    agent = agent_factory(env).start()
    assert served_certificate(agent.port) == leaf.cert
    # A client that trusts the provider's CA verifies the chain and the name.
    ctx = ssl.create_default_context(
        cadata=ca.cert.public_bytes(serialization.Encoding.PEM).decode()
    )
    with (
        socket.create_connection(("127.0.0.1", agent.port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="gpu-7.provider.test") as tls,
    ):
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
    status, body = _tls_get(agent, "/v1/host", agent.tls_client())
    assert status == 200 and body["data"]["tls_pubkey_sha256"] == spki_pin(leaf.cert)
    assert not (agent.state_dir / "tls").exists()  # no key of its own made


def test_a_provider_key_that_is_not_the_certificates_stops_the_start(
    tmp_path: Path, agent_factory: AgentFactory
) -> None:
    cert_file, _ = issue(None, "a", server=True).write(tmp_path, "a")
    _, other_key = issue(None, "b", server=True).write(tmp_path, "b")
    env = {**BASE, "QUDATA_TLS_CERT_FILE": str(cert_file), "QUDATA_TLS_KEY_FILE": str(other_key)}
    agent = agent_factory(env).start(wait=False)
    assert agent.proc is not None and agent.proc.wait(20) == 1
    assert f"{other_key} is not the key of the certificate" in agent.log()


def test_mutual_tls_serves_only_clients_with_a_certificate_from_the_ca(
    tmp_path: Path, agent_factory: AgentFactory
) -> None:
    ca, stranger_ca = make_ca("control plane CA"), make_ca("someone else")
    ca_file, _ = ca.write(tmp_path, "ca")
    good = issue(ca, "control-plane", server=False).write(tmp_path, "good")
    bad = issue(stranger_ca, "control-plane", server=False).write(tmp_path, "bad")
    agent = agent_factory({**BASE, "QUDATA_TLS_CLIENT_CA": str(ca_file)})
    agent.client_cert = (str(good[0]), str(good[1]))
    agent.start()

    assert _tls_get(agent, "/ping", agent.tls_client())[0] == 200
    for client_cert in (None, (str(bad[0]), str(bad[1]))):
        agent.client_cert = client_cert
        with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
            _tls_get(agent, "/ping", agent.tls_client())
    assert _plain_get(agent.port, "/ping") == (400, TLS_REQUIRED)
