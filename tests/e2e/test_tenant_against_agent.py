"""A hostile tenant against the agent itself, with the real agent process and real dockerd.

The tenant owns everything inside its container and everything it writes to
its logs. Whatever it plants there, the agent's memory stays bounded (sampled
with psutil across a new run of the instance and across an agent restart),
the agent stays up, only the keys given through the API log in, and an idle
instance stopped behind the agent's back comes back when the agent starts.
The agent's memory is sampled in a thread that kills it past a ceiling, so a
regression fails the test without taking the shared machine down.
"""

from __future__ import annotations

import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from support.agent_proc import AgentProcess
from support.docker_api import Api, agent_id, docker, inspect, remove_containers_of
from support.rss import MB, RssWatch

pytestmark = pytest.mark.docker

AgentFactory = Callable[..., AgentProcess]
BUSYBOX = {"image": "qudata-test/busybox", "image_tag": "1"}
ENV = {"QUDATA_SYNC_INTERVAL": "2", "QUDATA_PORT_RANGE": "20900-20949"}
GROWTH_BOUND = 50 * MB  # what the agent may grow by while the tenant does its worst
CEILING = 400 * MB  # past this the sampler kills the agent (a leak found, the machine kept)
# The tenant's workload: the init's status file becomes a link to /dev/zero (again and
# again, so every new run finds it so), and junk fills the run directory.
PLANT = (
    "while :; do ln -sf /dev/zero /.qudata/run/ssh;"
    " head -c 200000 /dev/urandom > /.qudata/run/junk 2>/dev/null; sleep 0.2; done"
)


def _keygen(path: Path) -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", path], check=True
    )
    return path.with_suffix(".pub").read_text().strip()


def _ssh(key: Path, port: int, command: str = "echo in") -> subprocess.CompletedProcess[str]:
    options = [
        "-i", str(key), "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
        "-o", "ConnectTimeout=5", "-o", "StrictHostKeyChecking=no",
        "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
    ]  # fmt: skip
    return subprocess.run(
        ["ssh", *options, "-p", str(port), "root@127.0.0.1", command],
        capture_output=True, text=True, timeout=20, check=False,
    )  # fmt: skip


def _wait(
    what: Callable[[], Any], timeout: float, message: str, guard: Callable[[], None] = lambda: None
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got = what()
        except httpx.HTTPError:  # the agent away (killed by the sampler): the caller says so
            got = None
        if got:
            return got
        time.sleep(0.1)
    guard()  # a failure of its own first (the agent's memory), if it has one
    raise AssertionError(message)


def _ssh_ready(
    api: Api, timeout: float = 60, guard: Callable[[], None] = lambda: None
) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        state = api.get()
        ssh = state.get("ssh") or {}
        assert ssh.get("status") != "failed", ssh
        return state if ssh.get("status") == "ready" else None

    return _wait(ready, timeout, "ssh never became ready", guard)  # type: ignore[no-any-return]


@pytest.fixture
def agents(agent_factory: AgentFactory) -> Iterator[list[AgentProcess]]:
    """The agents of one state directory, in order; their containers go at the end."""
    made: list[AgentProcess] = []
    yield made
    if made:
        owner = agent_id(made[0].state_dir)
        for agent in made:
            if agent.proc is not None and agent.proc.poll() is None:
                agent.stop(signal.SIGKILL)
        remove_containers_of(owner)


def _start(agents: list[AgentProcess], factory: AgentFactory) -> AgentProcess:
    if agents:
        agent = factory(ENV, state_dir=agents[0].state_dir, port=agents[0].port)
    else:
        agent = factory(ENV)
    agents.append(agent.start())
    return agent


def _bounded(watch: RssWatch, before: int, agent: AgentProcess, what: str) -> None:
    assert agent.proc is not None
    alive = not watch.killed and agent.proc.poll() is None
    growth = (watch.peak - before) / MB
    assert alive and growth < GROWTH_BOUND / MB, (
        f"{what}: the agent grew by {growth:.0f} MB"
        f" ({'killed at the ceiling' if watch.killed else 'alive' if alive else 'dead'})"
    )


@pytest.mark.timeout(240)
def test_a_status_file_linked_to_dev_zero_cannot_grow_or_kill_the_agent(
    agents: list[AgentProcess], agent_factory: AgentFactory, tmp_path: Path, record_property: Any
) -> None:
    agent = _start(agents, agent_factory)
    assert agent.proc is not None
    api = Api(agent)
    key = tmp_path / "renter"
    before = RssWatch(agent.proc.pid, CEILING).now()

    # The first run: the workload plants the link as soon as it starts.
    with RssWatch(agent.proc.pid, before + CEILING) as first_watch:
        resp = api.create(**BUSYBOX, ssh_enabled=True, command=PLANT)
        assert resp.status_code == 202, resp.text
        assert api.client.post("/ssh", json={"ssh_pubkey": _keygen(key)}).status_code == 200
        _wait(
            lambda: api.get()["status"] == "running",
            60,
            "the instance never ran",
            lambda: _bounded(first_watch, before, agent, "the first run"),
        )
        time.sleep(12)  # the old agent waited 10 s for a word before reading the file
        first_guard = lambda: _bounded(first_watch, before, agent, "the first run")  # noqa: E731
        first_guard()
        state = _ssh_ready(api, guard=first_guard)
        first_guard()
    port = int(state["ssh"]["port"])
    container = state["container_id"]
    assert _ssh(key, port, "test -L /.qudata/run/ssh && echo planted").stdout.strip() == "planted"

    # A new run of the instance: the agent learns of sshd again.
    first_run = inspect(container)["State"]["StartedAt"]
    with RssWatch(agent.proc.pid, before + CEILING) as run_watch:
        assert api.act("restart").status_code == 200
        _wait(lambda: inspect(container)["State"]["StartedAt"] != first_run, 30, "no new run")
        _wait(lambda: _ssh(key, port).returncode == 0, 30, "no login after the restart")
        time.sleep(12)
        _bounded(run_watch, before, agent, "a new run")
        _ssh_ready(api)

    # An agent restart: the agent looks at every running instance again.
    agent.stop()
    agent = _start(agents, agent_factory)
    assert agent.proc is not None
    api = Api(agent)
    with RssWatch(agent.proc.pid, before + CEILING) as restart_watch:
        time.sleep(12)
        _bounded(restart_watch, before, agent, "an agent restart")
        _ssh_ready(api)
    assert _ssh(key, port).stdout.strip() == "in"

    peaks = {
        "first run": first_watch.peak,
        "new run": run_watch.peak,
        "agent restart": restart_watch.peak,
    }
    for what, peak in peaks.items():
        record_property(f"rss_peak_{what.replace(' ', '_')}_mb", round(peak / MB, 1))
    record_property("rss_before_mb", round(before / MB, 1))
    print(
        f"agent RSS before {before / MB:.1f} MB; peaks: "
        + ", ".join(f"{what} {peak / MB:.1f} MB" for what, peak in peaks.items())
    )


@pytest.mark.timeout(180)
def test_a_log_flood_is_answered_within_the_byte_bound(
    agents: list[AgentProcess], agent_factory: AgentFactory, record_property: Any
) -> None:
    """60 MB on one line (Docker keeps it as ~3,700 entries of 16 KiB); tail=10000 would
    be all of it: the answer carries the last MiB, and the agent holds no more."""
    agent = _start(agents, agent_factory)
    api = Api(agent)
    flood = "head -c 60000000 /dev/zero | tr '\\0' x; echo; echo END-OF-FLOOD; sleep 1000000"
    assert api.create(**BUSYBOX, command=flood).status_code == 202
    api.wait("running")
    _wait(
        lambda: "END-OF-FLOOD" in (api.get(logs="true", tail="1").get("logs") or ""),
        60,
        "the flood never ended",
    )
    watch = RssWatch(agent.proc.pid, CEILING)  # type: ignore[union-attr]
    before = watch.now()
    with watch:
        started = time.monotonic()
        resp = api.client.get("/instances", params={"logs": "true", "tail": "10000"})
        took = time.monotonic() - started
        time.sleep(0.5)
    record_property("rss_log_flood_growth_mb", round((watch.peak - before) / MB, 1))
    print(f"log flood: RSS {before / MB:.1f} -> peak {watch.peak / MB:.1f} MB, {took:.2f} s")
    _bounded(watch, before, agent, "a log flood answered")
    assert resp.status_code == 200, resp.text[:300]
    logs = resp.json()["data"]["logs"]
    first, _, rest = logs.partition("\n")
    assert "older output left out" in first, first[:300]
    assert len(rest.encode()) <= 1024 * 1024, len(rest.encode())
    assert rest.endswith("END-OF-FLOOD\n") and set(rest[:1000]) == {"x"}, rest[-300:]


@pytest.mark.timeout(180)
def test_a_key_baked_into_the_image_does_not_log_in(
    agents: list[AgentProcess], agent_factory: AgentFactory, tmp_path: Path
) -> None:
    api_key, baked_key = tmp_path / "api", tmp_path / "baked"
    api_pub, baked_pub = _keygen(api_key), _keygen(baked_key)
    image = f"qudata-test/baked-key:{uuid.uuid4().hex[:8]}"
    maker = f"qudata-test-bake-{uuid.uuid4().hex[:8]}"
    bake = (
        f"mkdir -p /root/.ssh && echo '{baked_pub}' > /root/.ssh/authorized_keys"
        f" && echo '{baked_pub}' > /root/.ssh/authorized_keys2"
        " && chmod 700 /root/.ssh && chmod 600 /root/.ssh/authorized_keys*"
    )
    docker("run", "--name", maker, "qudata-test/busybox:1", "sh", "-c", bake)
    try:
        docker("commit", maker, image)
        agent = _start(agents, agent_factory)
        api = Api(agent)
        name, tag = image.split(":")
        assert api.create(image=name, image_tag=tag, ssh_enabled=True).status_code == 202
        assert api.client.post("/ssh", json={"ssh_pubkey": api_pub}).status_code == 200
        port = int(_ssh_ready(api)["ssh"]["port"])
        assert _ssh(api_key, port).stdout.strip() == "in"
        assert _ssh(api_key, port, "cat /root/.ssh/authorized_keys").stdout.strip() == baked_pub
        refused = _ssh(baked_key, port)
        assert refused.returncode != 0 and "in" not in refused.stdout, refused.stderr[-300:]
    finally:
        docker("rm", "-f", maker, check=False)
        if agents:
            remove_containers_of(agent_id(agents[0].state_dir))
        docker("rmi", "-f", image, check=False)


@pytest.mark.timeout(180)
def test_an_idle_instance_stopped_while_the_agent_was_away_comes_back(
    agents: list[AgentProcess], agent_factory: AgentFactory
) -> None:
    agent = _start(agents, agent_factory)
    api = Api(agent)
    assert api.create(**BUSYBOX).status_code == 202  # command null: idle
    container = api.wait("running")["container_id"]
    agent.stop()
    docker("stop", "-t", "1", container)
    assert inspect(container)["State"]["Status"] == "exited"
    agent = _start(agents, agent_factory)
    api = Api(agent)
    # The record still says running from before: wait for Docker's own word.
    deadline = time.monotonic() + 30
    while not inspect(container)["State"]["Running"]:
        assert time.monotonic() < deadline, agent.log()[-3000:]
        time.sleep(0.2)
    api.wait("running", timeout=30)
    why = [
        r
        for r in agent.log_records()
        if r.get("msg") == "converged an instance towards what the renter wanted"
    ]
    assert why and "idle" in why[0].get("why", ""), agent.log()[-3000:]
