"""Fuzzing every route of the real agent process from its own /openapi.json (schemathesis).

One agent process (standalone, the real Docker engine) serves the whole module.
Schemathesis generates valid and invalid requests for every operation the
document lists (examples, coverage and fuzzing phases; a fixed seed and at most
`MAX_EXAMPLES` fuzzed cases per operation, so a run is the same every time and
takes well under a minute) and sends them with the secret. The document is
built at collection with the agent's own `build_openapi`, and the first test
checks that the live agent serves exactly it (schemathesis's loader that reads
a URL from a fixture does not work with pytest 9, and collection cannot wait
for a process). What must hold:

- no 5xx and an answer conforming to the documented schema, status code and
  content type (schemathesis's checks; `positive_data_acceptance` is off: the
  schema cannot say that an SSH key must be a real key or that `login` needs
  `password`, so a schema-valid body may still rightly be refused);
- a refused request changes nothing: the instance (its id) and the SSH keys
  are the same after it as before;
- the process still answers /ping at the end, logged no internal error, and no
  container with its label exists unless a create was answered 202 (creates of
  images that do not exist end in `error`); the module removes what it made.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from schemathesis import Case

from qudata_agent import __version__
from qudata_agent.api.openapi import build_openapi
from qudata_agent.api.routes import ROUTES
from support.agent_proc import AgentProcess
from support.docker_api import agent_id, containers, remove_containers_of
from support.volumes import unmount_under

pytestmark = pytest.mark.docker

MAX_EXAMPLES = 50
SEED = 20260801
MUTATING = {"POST", "PUT", "DELETE"}


class _Record:
    """What the fuzzing saw, for the checks that run once it is over."""

    def __init__(self) -> None:
        self.calls = 0
        self.accepted_creates = 0
        self.statuses: dict[str, dict[int, int]] = {}

    def add(self, label: str, status: int) -> None:
        self.calls += 1
        per_op = self.statuses.setdefault(label, {})
        per_op[status] = per_op.get(status, 0) + 1


@pytest.fixture(scope="module")
def fuzz_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    state = tmp_path_factory.mktemp("fuzz") / "state"
    agent = AgentProcess(state, {"QUDATA_PORT_RANGE": "23000-23499"}).start()
    owner = agent_id(state)
    try:
        yield agent
    finally:
        if agent.proc is not None and agent.proc.poll() is None:
            httpx.delete(agent.url + "/instances", headers={"X-Agent-Secret": agent.secret()})
            agent.stop(signal.SIGTERM)
        remove_containers_of(owner)
        unmount_under(state)  # the volumes a fuzzed POST /v1/volumes made


@pytest.fixture(scope="module")
def record() -> _Record:
    return _Record()


def _schema() -> Any:
    """The document the agent serves (checked against the live one below), made at collection."""
    config = schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "generation": {
                "max-examples": MAX_EXAMPLES,
                "deterministic": True,
                "database": "none",
                # The right secret goes with every request; auth has its own tests.
                "with-security-parameters": False,
            },
            "phases": {"stateful": {"enabled": False}},
            "checks": {
                "positive_data_acceptance": {"enabled": False},
                # An oversize body is refused with 413 before its fields are looked at.
                "negative_data_rejection": {
                    "expected-statuses": [400, 401, 404, 405, 409, 413, 415, 422]
                },
            },
            "request-timeout": 10,
        }
    )
    return schemathesis.openapi.from_dict(build_openapi(ROUTES, __version__), config=config)


schema = _schema()


def test_the_fuzzed_document_is_the_one_the_agent_serves(fuzz_agent: AgentProcess) -> None:
    served = httpx.get(
        fuzz_agent.url + "/openapi.json", headers={"X-Agent-Secret": fuzz_agent.secret()}
    )
    assert served.status_code == 200
    assert served.json() == build_openapi(ROUTES, __version__)


def _snapshot(client: httpx.Client) -> tuple[Any, Any]:
    """What a refused request must leave alone: the instance's id and the SSH keys."""
    instance = client.get("/instances")
    assert instance.status_code == 200, instance.text
    keys = client.get("/ssh")
    key_state = keys.json()["data"]["keys"] if keys.status_code == 200 else keys.status_code
    return instance.json()["data"]["instance_id"], key_state


@schema.parametrize()
def test_every_operation_survives_fuzzing(
    case: Case, fuzz_agent: AgentProcess, record: _Record
) -> None:
    secret = {"X-Agent-Secret": fuzz_agent.secret()}
    with httpx.Client(base_url=fuzz_agent.url, headers=secret, timeout=10) as client:
        mutating = case.method.upper() in MUTATING
        before = _snapshot(client) if mutating else None
        response = case.call(base_url=fuzz_agent.url, headers=secret)
        record.add(f"{case.method.upper()} {case.path}", response.status_code)
        assert response.status_code < 500, response.text
        case.validate_response(response, headers=secret)
        if response.status_code == 202 and case.path == "/instances":
            record.accepted_creates += 1
        if mutating and not 200 <= response.status_code < 300:
            after = _snapshot(client)
            assert after == before, (
                f"{case.method} {case.path} refused but changed {before}->{after}"
            )


def test_agent_alive_and_nothing_left_behind(fuzz_agent: AgentProcess, record: _Record) -> None:
    """Runs after the fuzzing (file order; run the module whole): the process and Docker
    are as they should be."""
    print(f"fuzzed {record.calls} requests; statuses per operation: {record.statuses}")
    assert record.calls > 100, f"the fuzzing sent only {record.calls} requests"
    assert fuzz_agent.proc is not None and fuzz_agent.proc.poll() is None, "the agent died"
    assert httpx.get(fuzz_agent.url + "/ping").json() == {"ok": True, "data": None}

    owner = agent_id(fuzz_agent.state_dir)
    secret = {"X-Agent-Secret": fuzz_agent.secret()}
    if record.accepted_creates == 0:
        assert containers(owner) == [], "a container exists though no create was accepted"
    state = httpx.get(fuzz_agent.url + "/instances", headers=secret).json()["data"]
    if state["status"] == "destroyed":
        assert containers(owner) == [], "a container exists with no instance"
    else:
        assert len(containers(owner)) <= 1

    deleted = httpx.delete(fuzz_agent.url + "/instances", headers=secret, timeout=60)
    assert deleted.status_code == 200, deleted.text
    assert containers(owner) == []

    errors = [r for r in fuzz_agent.log_records() if r.get("level") in ("error", "critical")]
    assert errors == [], f"the agent logged errors: {errors[:3]}"


def test_log_holds_no_secret(fuzz_agent: AgentProcess) -> None:
    assert fuzz_agent.secret() not in Path(fuzz_agent.log_path).read_text(errors="replace")
