"""No secret ever reaches the agent's log: the API key, the agent secret, a registry password.

One run of the real agent against the recording fake control plane walks every
path that handles a secret, at DEBUG level: registration (the API key goes out,
a secret comes back), a create with private-registry credentials whose pull
fails (the error path of the pull, where a careless message would echo them),
an instance with SSH and key posts, stats on their schedule, stats refused by
the control plane for a while (the failure path of the outbound client), and
a stop. Then the whole log (stdout and stderr, and the agent's own log file) is
searched for each secret; the registry password is also looked for in the
state directory, where it must never be stored.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from support.agent_proc import AgentProcess, free_port
from support.docker_api import Api, agent_id, remove_containers_of
from support.fake_cp import DEFAULT_INIT, FakeControlPlane

pytestmark = pytest.mark.docker

AgentFactory = Callable[..., AgentProcess]
ED25519 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl a@b"


def test_no_secret_in_the_log_after_a_full_run(
    fake_cp: FakeControlPlane, agent_factory: AgentFactory, tmp_path: Path
) -> None:
    api_key = f"api-key-{uuid.uuid4().hex}"
    agent_secret = f"cp-secret-{uuid.uuid4().hex}"
    password = f"reg-pass-{uuid.uuid4().hex}"
    fake_cp.answers["/v0/init"] = (
        200,
        {"ok": True, "data": {**DEFAULT_INIT, "secret_key": agent_secret}},
    )
    log_file = tmp_path / "agent-file.log"
    registry = f"127.0.0.1:{free_port()}"  # allowed: a loopback registry is refused otherwise
    agent = agent_factory(
        {
            "QUDATA_API_KEY": api_key,
            "QUDATA_API_URL": fake_cp.url,
            "QUDATA_LOG_FILE": str(log_file),
            "QUDATA_PORT_RANGE": "24000-24499",
            "QUDATA_REGISTRY_ALLOW": registry,
        }
    ).start()
    owner = agent_id(agent.state_dir)
    try:
        fake_cp.wait_for("/init/host")
        assert agent.secret() == agent_secret
        api = Api(agent)

        # A private registry that does not answer: the pull fails with the credentials in hand.
        created = api.create(
            image=f"{registry}/team/private",
            image_tag="1",
            registry=registry,
            login="renter",
            password=password,
        )
        assert created.status_code == 202, created.text
        failed = api.wait("error", timeout=60)
        assert password not in str(failed)
        assert api.delete().status_code == 200

        # A wrong password shape is refused without being echoed.
        refused = api.create(image="busybox", login="renter", password={"p": password})
        assert refused.status_code == 400 and password not in refused.text

        # An instance with SSH, keys added and removed, stats flowing.
        ssh = api.create(image="qudata-test/debian-ssh", image_tag="12", ssh_enabled=True)
        assert ssh.status_code == 202, ssh.text
        api.wait("running", timeout=60)
        key_calls = [
            api.client.post("/ssh", json={"ssh_pubkey": ED25519}),
            api.client.post("/ssh", json={"public_key": ED25519}),
            api.client.request("DELETE", "/ssh", json={"ssh_pubkey": ED25519}),
            api.client.post("/ssh", json={"ssh_pubkey": "ssh-ed25519 AAAA" + password}),
        ]
        assert [r.status_code for r in key_calls] == [200, 200, 200, 400], [
            r.text for r in key_calls
        ]
        seen = len(fake_cp.requests("/stats"))
        stats = fake_cp.wait_for("/stats", count=seen + 1, timeout=15)
        assert stats[-1].headers["X-Api-Key"] == api_key  # the secret did go out on the wire
        assert stats[-1].headers["X-Agent-Secret"] == agent_secret

        # The control plane refuses stats for a while: the failure path logs too.
        fake_cp.answers["/v0/stats"] = (401, {"ok": False, "error": f"bad key {api_key}"})
        seen = len(fake_cp.requests("/stats"))
        fake_cp.wait_for("/stats", count=seen + 2, timeout=15)
        fake_cp.answers["/v0/stats"] = (200, {"ok": True, "data": None})
        fake_cp.wait_for("/stats", count=seen + 3, timeout=15)

        # Wrong secrets at the door are not logged either.
        httpx.get(agent.url + "/instances", headers={"X-Agent-Secret": agent_secret + "x"})
        assert api.delete().status_code == 200
        code, _ = agent.stop(signal.SIGTERM)
        assert code == 0
    finally:
        if agent.proc is not None and agent.proc.poll() is None:
            agent.stop(signal.SIGKILL)
        remove_containers_of(owner)

    time.sleep(0.1)
    logs = {"stdout/stderr": agent.log(), "QUDATA_LOG_FILE": log_file.read_text()}
    for where, text in logs.items():
        assert len(text.splitlines()) > 20, f"{where}: the run logged too little to prove anything"
        assert "pull" in text and "stats" in text, where
        for name, value in [
            ("API key", api_key),
            ("agent secret", agent_secret),
            ("registry password", password),
        ]:
            assert value not in text, f"the {name} is in the {where} log"
    for path in agent.state_dir.rglob("*"):
        if path.is_file():
            assert password.encode() not in path.read_bytes(), f"registry password in {path.name}"
