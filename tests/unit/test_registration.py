"""Registration: the Registrar over the real client, store and secret files; the retry loop."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import pytest

import qudata_agent
from qudata_agent.adapters.control_plane import ControlPlane, ControlPlaneError
from qudata_agent.adapters.secrets import SecretFile
from qudata_agent.adapters.store import Store
from qudata_agent.blocking import Blocking
from qudata_agent.domain.backoff import Backoff
from qudata_agent.loops.registration import registration_loop
from qudata_agent.services.credentials import Credentials
from qudata_agent.services.registration import Identity, Registrar
from qudata_agent.state_dir import AGENT_SECRET_FILE, API_KEY_FILE

BASE = "https://cp.example.test/v0"
API_KEY = "api-key-for-registration-tests"
IDENTITY = Identity(agent_id="agent-0001", fingerprint="ab" * 32, address="203.0.113.10")
PORT = 8123


class FakeControlPlaneServer:
    """The control plane's side of the wire: records requests, answers /init from a script."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.init_data: dict[str, Any] = {
            "agent_created": True,
            "emergency_reinit": False,
            "host_exists": False,
        }

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.path.endswith("/init"):
            return httpx.Response(200, json={"ok": True, "data": self.init_data})
        if request.url.path.endswith("/init/host"):
            return httpx.Response(200, json={"ok": True, "data": None})
        return httpx.Response(404, json={"ok": False, "error": "no route"})

    def paths(self) -> list[str]:
        return [r.url.path.removeprefix("/v0") for r in self.requests]

    def bodies(self, path: str) -> list[Any]:
        return [json.loads(r.content) for r in self.requests if r.url.path == f"/v0{path}"]


@dataclass
class Inventory:
    payload: dict[str, Any] = field(
        default_factory=lambda: {
            "gpu_name": "H100",
            "gpu_amount": 8,
            "vram": 80,
            "location": {"city": None, "country": None, "region": None},
            "configuration": {"ram": {"amount": 512, "unit": "gb"}, "vcpu": 192},
        }
    )
    calls: int = 0

    async def __call__(self) -> dict[str, Any]:
        self.calls += 1
        return copy.deepcopy(self.payload)


@dataclass
class Harness:
    server: FakeControlPlaneServer
    client: ControlPlane
    store: Store
    credentials: Credentials
    inventory: Inventory
    blocking: Blocking
    state: Path

    def registrar(self, identity: Identity = IDENTITY) -> Registrar:
        return Registrar(
            self.client, self.credentials, self.store, identity, self.inventory, self.blocking
        )


@pytest.fixture
def blocking() -> Iterator[Blocking]:
    b = Blocking(quick_workers=2, slow_workers=1)
    yield b
    b.close()


def _credentials(state: Path) -> Credentials:
    return Credentials(SecretFile(state / AGENT_SECRET_FILE), SecretFile(state / API_KEY_FILE))


@pytest.fixture
async def harness(tmp_path: Path, blocking: Blocking) -> AsyncIterator[Harness]:
    server = FakeControlPlaneServer()
    client = ControlPlane(BASE, API_KEY, transport=httpx.MockTransport(server))
    store = Store.open(tmp_path / "state.db")
    yield Harness(server, client, store, _credentials(tmp_path), Inventory(), blocking, tmp_path)
    await client.aclose()
    store.close()


def test_init_payload_fields(harness: Harness) -> None:
    assert harness.registrar().init_payload(PORT) == {
        "agent_id": "agent-0001",
        "agent_port": PORT,
        "address": "203.0.113.10",
        "fingerprint": "ab" * 32,
        "pid": os.getpid(),
        "version": qudata_agent.__version__,
        "tls_pubkey_sha256": None,  # TLS off; CONTRACT.md section 5
    }


def test_init_payload_carries_the_pin_of_the_port(harness: Harness) -> None:
    registrar = harness.registrar(replace(IDENTITY, tls_pubkey_sha256="PIN="))
    assert registrar.init_payload(PORT)["tls_pubkey_sha256"] == "PIN="


async def test_first_registration_sends_init_then_the_host_and_stores_the_secret(
    harness: Harness,
) -> None:
    harness.server.init_data["secret_key"] = "issued-secret-1234567890"
    await harness.registrar().register(PORT)

    assert harness.server.paths() == ["/init", "/init/host"]
    (init_body,) = harness.server.bodies("/init")
    assert init_body["agent_port"] == PORT
    assert init_body["agent_id"] == IDENTITY.agent_id
    assert harness.server.bodies("/init/host") == [harness.inventory.payload]

    init_req, host_req = harness.server.requests
    assert init_req.headers["X-Api-Key"] == API_KEY
    assert "X-Agent-Secret" not in init_req.headers  # none known yet
    assert host_req.headers["X-Agent-Secret"] == "issued-secret-1234567890"

    assert harness.credentials.agent_secret() == "issued-secret-1234567890"
    assert (harness.state / AGENT_SECRET_FILE).read_text().strip() == "issued-secret-1234567890"
    assert _credentials(harness.state).agent_secret() == "issued-secret-1234567890"


async def test_a_stored_secret_goes_out_with_the_first_init(harness: Harness) -> None:
    harness.credentials.replace_secret("secret-from-last-run-0000")
    await harness.registrar().register(PORT)
    assert [r.headers.get("X-Agent-Secret") for r in harness.server.requests] == [
        "secret-from-last-run-0000",
        "secret-from-last-run-0000",
    ]


async def test_an_unchanged_known_host_is_not_sent_again(harness: Harness) -> None:
    await harness.registrar().register(PORT)
    assert harness.server.paths() == ["/init", "/init/host"]

    harness.server.init_data.update(host_exists=True, agent_created=False)
    await harness.registrar().register(PORT)
    assert harness.server.paths() == ["/init", "/init/host", "/init"]


async def test_the_digest_of_what_was_sent_survives_a_restart(
    harness: Harness, tmp_path: Path
) -> None:
    await harness.registrar().register(PORT)
    harness.store.close()
    harness.store = Store.open(tmp_path / "state.db")
    harness.server.init_data["host_exists"] = True
    await harness.registrar().register(PORT)
    assert harness.server.paths() == ["/init", "/init/host", "/init"]


async def test_a_changed_inventory_is_sent_again(harness: Harness) -> None:
    await harness.registrar().register(PORT)
    harness.server.init_data["host_exists"] = True
    harness.inventory.payload["gpu_amount"] = 7  # a GPU fell off the bus
    await harness.registrar().register(PORT)
    assert harness.server.paths() == ["/init", "/init/host", "/init", "/init/host"]
    assert harness.server.bodies("/init/host")[-1]["gpu_amount"] == 7

    await harness.registrar().register(PORT)  # and then it is known again
    assert harness.server.paths()[-1] == "/init"


async def test_an_emergency_reinit_sends_the_host_again(harness: Harness) -> None:
    await harness.registrar().register(PORT)
    harness.server.init_data.update(host_exists=True, emergency_reinit=True)
    await harness.registrar().register(PORT)
    assert harness.server.paths() == ["/init", "/init/host", "/init", "/init/host"]


async def test_an_unknown_host_is_sent_even_with_an_unchanged_inventory(harness: Harness) -> None:
    await harness.registrar().register(PORT)
    await harness.registrar().register(PORT)  # host_exists is still False
    assert harness.server.paths() == ["/init", "/init/host", "/init", "/init/host"]


async def test_a_new_secret_replaces_the_stored_one(harness: Harness) -> None:
    harness.server.init_data["secret_key"] = "first-secret-0000000000"
    registrar = harness.registrar()
    await registrar.register(PORT)
    harness.server.init_data.update(host_exists=True, secret_key="second-secret-111111111")
    await registrar.register(PORT)
    assert harness.credentials.agent_secret() == "second-secret-111111111"
    assert (harness.state / AGENT_SECRET_FILE).read_text().strip() == "second-secret-111111111"
    # the third /init carries the newest secret
    await registrar.register(PORT)
    assert harness.server.requests[-1].headers["X-Agent-Secret"] == "second-secret-111111111"


async def test_an_answer_without_a_secret_keeps_the_stored_one(harness: Harness) -> None:
    harness.credentials.replace_secret("kept-secret-222222222")
    await harness.registrar().register(PORT)
    assert harness.credentials.agent_secret() == "kept-secret-222222222"


async def test_a_failed_host_upload_does_not_record_the_digest(
    tmp_path: Path, blocking: Blocking
) -> None:
    answers = iter(["init", "fail", "init", "host", "init"])
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path.removeprefix("/v0"))
        kind = next(answers)
        if kind == "fail":
            return httpx.Response(503, json={"ok": False, "error": "busy"})
        data = {"host_exists": True} if kind == "init" else None
        return httpx.Response(200, json={"ok": True, "data": data})

    client = ControlPlane(BASE, API_KEY, transport=httpx.MockTransport(handler))
    store = Store.open(tmp_path / "state.db")
    try:
        registrar = Registrar(
            client, _credentials(tmp_path), store, IDENTITY, Inventory(), blocking
        )
        with pytest.raises(ControlPlaneError):
            await registrar.register(PORT)
        await registrar.register(PORT)  # host_exists, but the inventory never arrived
        await registrar.register(PORT)
    finally:
        await client.aclose()
        store.close()
    assert seen == ["/init", "/init/host", "/init", "/init/host", "/init"]


# the registration loop


class FlakyRegistrar:
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.ports: list[int] = []

    async def register(self, port: int) -> None:
        self.ports.append(port)
        if len(self.ports) <= self.failures:
            raise ControlPlaneError(f"POST /init: try {len(self.ports)} refused", 503)


LOOP_LOGGER = "qudata_agent.loops.registration"


async def test_the_loop_waits_for_the_port_retries_and_returns_after_success(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOOP_LOGGER)
    registrar = FlakyRegistrar(failures=4)
    listening: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    backoff = Backoff(base_s=0.001, cap_s=0.002)
    task = asyncio.create_task(
        registration_loop(registrar, listening, backoff, (ControlPlaneError,))
    )
    for _ in range(5):
        await asyncio.sleep(0)
    assert registrar.ports == []  # nothing reported before the server listens
    assert not task.done()

    listening.set_result(PORT)
    await asyncio.wait_for(task, 5)

    assert registrar.ports == [PORT] * 5
    assert backoff.attempt == 4
    records = [r for r in caplog.records if r.name == LOOP_LOGGER]
    warnings = [r for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # once for the streak, not per try
    assert "try 1" in warnings[0].__dict__["error"]
    infos = [r for r in records if r.levelno == logging.INFO]
    assert [r.getMessage() for r in infos] == ["control plane reachable again"]
    assert infos[0].__dict__["failed_tries"] == 4
    assert [r for r in records if r.levelno >= logging.ERROR] == []


async def test_the_loop_logs_nothing_when_the_first_try_succeeds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOOP_LOGGER)
    registrar = FlakyRegistrar(failures=0)
    listening: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    listening.set_result(PORT)
    await asyncio.wait_for(
        registration_loop(registrar, listening, Backoff(0.001, 0.002), (ControlPlaneError,)), 5
    )
    assert registrar.ports == [PORT]
    assert [r for r in caplog.records if r.name == LOOP_LOGGER] == []


async def test_an_error_outside_retry_on_ends_the_loop() -> None:
    class Broken:
        calls = 0

        async def register(self, port: int) -> None:
            Broken.calls += 1
            raise KeyError("a bug, not an outage")

    listening: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    listening.set_result(PORT)
    with pytest.raises(KeyError):
        await registration_loop(Broken(), listening, Backoff(0.001, 0.002), (ControlPlaneError,))
    assert Broken.calls == 1


async def test_the_loop_can_be_cancelled_while_waiting_between_tries() -> None:
    registrar = FlakyRegistrar(failures=10**9)
    listening: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    listening.set_result(PORT)
    task = asyncio.create_task(
        registration_loop(registrar, listening, Backoff(10.0, 10.0), (ControlPlaneError,))
    )
    for _ in range(10):
        await asyncio.sleep(0)
        if registrar.ports:
            break
    assert registrar.ports == [PORT]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert registrar.ports == [PORT]


# the inventory check between registrations (the inventory loop's tick)


async def test_refresh_sends_nothing_while_the_inventory_is_unchanged(harness: Harness) -> None:
    registrar = harness.registrar()
    await registrar.register(PORT)
    assert await registrar.refresh_inventory() is False
    assert await registrar.refresh_inventory() is False
    assert harness.server.paths() == ["/init", "/init/host"]


async def test_refresh_sends_a_changed_inventory_once(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    registrar = harness.registrar()
    await registrar.register(PORT)
    harness.inventory.payload["gpu_amount"] = 7  # a GPU fell off the bus
    harness.inventory.payload["configuration"]["vcpu"] = 96
    with caplog.at_level(logging.INFO, logger="qudata_agent.services.registration"):
        assert await registrar.refresh_inventory() is True
    assert await registrar.refresh_inventory() is False
    assert harness.server.paths() == ["/init", "/init/host", "/init/host"]
    assert harness.server.bodies("/init/host")[-1]["gpu_amount"] == 7
    (changed,) = [r for r in caplog.records if "changed" in r.getMessage()]
    assert changed.changed == ["configuration.vcpu", "gpu_amount"]  # type: ignore[attr-defined]


async def test_refresh_after_a_restart_compares_with_the_stored_digest(
    harness: Harness, tmp_path: Path
) -> None:
    await harness.registrar().register(PORT)
    harness.store.close()
    harness.store = Store.open(tmp_path / "state.db")
    fresh = harness.registrar()  # a new process: nothing sent yet by this one
    assert await fresh.refresh_inventory() is False
    harness.inventory.payload["vram"] = 40
    assert await fresh.refresh_inventory() is True
    assert harness.server.paths() == ["/init", "/init/host", "/init/host"]


async def test_a_failed_refresh_is_tried_again_on_the_next_call(harness: Harness) -> None:
    registrar = harness.registrar()
    await registrar.register(PORT)
    harness.inventory.payload["gpu_amount"] = 0
    answer = harness.server.__call__

    def refuse_host(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/init/host"):
            harness.server.requests.append(request)
            return httpx.Response(502, json={"ok": False, "error": "bad gateway"})
        return answer(request)

    failing = ControlPlane(BASE, API_KEY, transport=httpx.MockTransport(refuse_host))
    flaky = Registrar(
        failing, harness.credentials, harness.store, IDENTITY, harness.inventory, harness.blocking
    )
    with pytest.raises(ControlPlaneError):
        await flaky.refresh_inventory()
    await failing.aclose()
    assert await registrar.refresh_inventory() is True  # the digest was not stored on failure
    assert harness.server.bodies("/init/host")[-1]["gpu_amount"] == 0
