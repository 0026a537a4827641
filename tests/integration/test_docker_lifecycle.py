"""Container lifecycle through the Docker adapter against the real engine.

Each test labels what it creates with an agent id of its own; the `engine`
fixture removes every container with that label afterwards, also on failure.
What Docker actually configured is read back through the SDK, not the adapter.
"""

from __future__ import annotations

import queue
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import docker
import docker.types
import pytest

from qudata_agent.adapters.docker import DockerEngine
from qudata_agent.adapters.docker.spec import create_kwargs
from qudata_agent.domain.container_spec import (
    CAPABILITIES,
    IDLE_COMMAND,
    LABEL_AGENT,
    ContainerSpec,
    PortBinding,
)
from qudata_agent.errors import Conflict, NotFound

BUSYBOX = "qudata-test/busybox:1"
MIB = 1024**2

pytestmark = pytest.mark.docker


@dataclass
class Env:
    engine: DockerEngine
    agent_id: str
    sdk: docker.DockerClient

    def spec(self, **overrides: Any) -> ContainerSpec:
        fields: dict[str, Any] = {
            "instance_id": uuid.uuid4().hex[:12],
            "agent_id": self.agent_id,
            "image": BUSYBOX,
            "command": IDLE_COMMAND,
            "env": {"GREETING": "hello"},
            "nano_cpus": 500_000_000,
            "memory_bytes": 256 * MIB,
            "shm_bytes": 128 * MIB,
            "pids_limit": 512,
        }
        fields.update(overrides)
        return ContainerSpec(**fields)

    def exec(self, container_id: str, script: str) -> str:
        code, out = self.sdk.containers.get(container_id).exec_run(["sh", "-c", script])
        assert code == 0 and isinstance(out, bytes), out
        return out.decode()


@pytest.fixture
def env() -> Iterator[Env]:
    agent_id = f"test-{uuid.uuid4().hex[:12]}"
    engine = DockerEngine(timeout_s=30)
    sdk = docker.DockerClient(base_url="unix:///var/run/docker.sock", version="auto")
    try:
        yield Env(engine, agent_id, sdk)
    finally:
        engine.close()
        for container in sdk.containers.list(
            all=True, filters={"label": f"{LABEL_AGENT}={agent_id}"}
        ):
            container.remove(force=True, v=True)
        sdk.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


def test_create_start_applies_the_spec(env: Env) -> None:
    port = free_port()
    spec = env.spec(ports=(PortBinding(8080, port),))
    container_id = env.engine.create(spec)
    env.engine.start(container_id)

    state = env.engine.inspect(container_id)
    assert state.running and state.status == "running"
    assert (state.container_id, state.name) == (container_id, f"qudata-{spec.instance_id}")
    assert (state.instance_id, state.agent_id) == (spec.instance_id, env.agent_id)
    assert state.ports == {"8080/tcp": port}
    assert state.started_at is not None and state.exit_code is None

    attrs = env.sdk.api.inspect_container(container_id)
    host = attrs["HostConfig"]
    assert attrs["Name"] == f"/qudata-{spec.instance_id}"
    assert host["NanoCpus"] == 500_000_000
    assert host["Memory"] == host["MemorySwap"] == 256 * MIB
    assert host["ShmSize"] == 128 * MIB
    assert host["PidsLimit"] == 512
    assert "ALL" in host["CapDrop"]
    assert sorted(host["CapAdd"]) == sorted(CAPABILITIES)
    assert "no-new-privileges:true" in host["SecurityOpt"]
    assert host["Privileged"] is False
    assert not host.get("Binds") and not attrs["Mounts"] and not host.get("Devices")
    assert host["Init"] is True
    assert host["RestartPolicy"]["Name"] == "unless-stopped"
    assert host["PortBindings"] == {"8080/tcp": [{"HostIp": "0.0.0.0", "HostPort": str(port)}]}
    assert attrs["Config"]["Labels"] == spec.labels
    assert attrs["Config"]["Tty"] is False
    assert "GREETING=hello" in attrs["Config"]["Env"]
    assert attrs["Config"]["Cmd"] == list(IDLE_COMMAND)


def test_stop_keeps_data_and_restart_and_remove(env: Env) -> None:
    container_id = env.engine.create(env.spec())
    env.engine.start(container_id)
    env.exec(container_id, "echo kept > /root-data && sync")

    env.engine.stop(container_id, timeout_s=5)
    stopped = env.engine.inspect(container_id)
    assert stopped.status == "exited" and not stopped.running
    assert stopped.finished_at is not None

    env.engine.start(container_id)
    assert env.engine.inspect(container_id).running
    assert env.exec(container_id, "cat /root-data").strip() == "kept"

    before = env.engine.inspect(container_id).started_at
    env.engine.restart(container_id, timeout_s=5)
    after = env.engine.inspect(container_id)
    assert after.running and after.started_at != before

    assert env.engine.remove(container_id) is True
    assert env.engine.remove(container_id) is False
    with pytest.raises(NotFound) as caught:
        env.engine.inspect(container_id)
    assert isinstance(caught.value.__cause__, docker.errors.NotFound)


def test_a_second_create_with_the_same_instance_id_conflicts(env: Env) -> None:
    spec = env.spec()
    first = env.engine.create(spec)
    with pytest.raises(Conflict) as caught:
        env.engine.create(spec)
    assert spec.name in caught.value.message
    assert isinstance(caught.value.__cause__, docker.errors.APIError)
    assert env.engine.inspect(spec.name).container_id == first  # left alone


def test_a_command_that_exits_is_reported_with_its_code_and_logs(env: Env) -> None:
    spec = env.spec(command=("sh", "-c", "echo bye; echo oops >&2; exit 3"), restart_policy="no")
    container_id = env.engine.create(spec)
    env.engine.start(container_id)
    deadline = time.monotonic() + 20
    state = env.engine.inspect(container_id)
    while state.status != "exited" and time.monotonic() < deadline:
        time.sleep(0.1)
        state = env.engine.inspect(container_id)
    assert (state.status, state.exit_code, state.oom_killed) == ("exited", 3, False)
    assert state.ports == {}
    logs = env.engine.logs(container_id, tail=10, max_bytes=1024, timeout_s=10)
    assert "bye" in logs.text and "oops" in logs.text
    assert not logs.cut and logs.complete


def test_logs_keep_only_their_newest_bytes_however_many_lines_are_asked_for(env: Env) -> None:
    """The tenant writes the log: `tail` lines of 16 KiB each are never all held."""
    flood = "head -c 3000000 /dev/zero | tr '\\0' x; echo; seq 1 200"
    spec = env.spec(command=("sh", "-c", flood), restart_policy="no")
    container_id = env.engine.create(spec)
    env.engine.start(container_id)
    deadline = time.monotonic() + 20
    while env.engine.inspect(container_id).running and time.monotonic() < deadline:
        time.sleep(0.1)
    logs = env.engine.logs(container_id, tail=10_000, max_bytes=64 * 1024, timeout_s=10)
    assert logs.cut and logs.complete
    assert len(logs.text.encode()) == 64 * 1024
    assert logs.text.endswith("\n199\n200\n") and logs.text.startswith("x")


def test_list_managed_finds_exactly_this_agents_containers(env: Env) -> None:
    running = env.engine.create(env.spec())
    env.engine.start(running)
    created = env.engine.create(env.spec())
    other = DockerEngine()
    stranger = other.create(env.spec(agent_id=f"{env.agent_id}-other"))
    try:
        states = env.engine.list_managed(env.agent_id)
    finally:
        other.remove(stranger)
        other.close()
    assert sorted(s.container_id for s in states) == sorted([running, created])
    assert {s.container_id: s.status for s in states} == {running: "running", created: "created"}
    assert env.engine.list_managed(f"{env.agent_id}-nobody") == []


def test_events_report_start_and_die_and_close_stops_the_reader(env: Env) -> None:
    seen: queue.Queue[tuple[str, str]] = queue.Queue()
    stream = env.engine.events(env.agent_id, since=time.time())

    def read() -> None:
        for item in stream:
            seen.put(item)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    container_id = env.engine.create(env.spec())
    env.engine.start(container_id)
    env.engine.stop(container_id, timeout_s=5)

    wanted = {("start", container_id), ("die", container_id)}
    got: set[tuple[str, str]] = set()
    deadline = time.monotonic() + 15
    while not wanted <= got and time.monotonic() < deadline:
        try:
            got.add(seen.get(timeout=0.5))
        except queue.Empty:
            continue
    assert wanted <= got, got
    assert {cid for _, cid in got} == {container_id}  # only this agent's containers

    stream.close()
    reader.join(timeout=5)
    assert not reader.is_alive()
    stream.close()  # closing twice is fine


def test_events_with_until_end_by_themselves(env: Env) -> None:
    start = time.time()
    container_id = env.engine.create(env.spec())
    items = list(env.engine.events(env.agent_id, since=start - 1, until=time.time() + 1))
    assert ("create", container_id) in items
    assert time.time() - start < 10


def test_close_events_ends_every_open_stream(env: Env) -> None:
    stream = env.engine.events(env.agent_id)
    done = threading.Event()

    def read() -> None:
        for _ in stream:
            pass
        done.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    time.sleep(0.3)  # the reader is blocked in a read
    env.engine.close_events()
    assert done.wait(5)


def test_create_kwargs_gpus_and_storage() -> None:
    spec = ContainerSpec(
        instance_id="i1",
        agent_id="a1",
        image="img:1",
        command=("run",),
        gpu_uuids=("GPU-aaaa", "GPU-bbbb"),
        storage_bytes=10 * 1024**3,
        network="tenant-net",
    )
    kwargs = create_kwargs(spec)
    (request,) = kwargs["device_requests"]
    assert isinstance(request, docker.types.DeviceRequest)
    assert request["DeviceIDs"] == ["GPU-aaaa", "GPU-bbbb"]
    assert request["Capabilities"] == [["gpu"]]
    assert kwargs["storage_opt"] == {"size": str(10 * 1024**3)}
    assert kwargs["network"] == "tenant-net"
    assert kwargs["privileged"] is False and kwargs["tty"] is False
    assert not {"volumes", "mounts", "devices"} & kwargs.keys()


def test_create_kwargs_without_gpus_or_storage_leaves_them_out() -> None:
    spec = ContainerSpec(instance_id="i1", agent_id="a1", image="img:1", command=())
    kwargs = create_kwargs(spec)
    assert not {"device_requests", "storage_opt", "network", "mem_limit"} & kwargs.keys()
    assert kwargs["command"] is None  # the image's own command
    assert kwargs["cap_drop"] == ["ALL"]
    assert kwargs["restart_policy"] == {"Name": "unless-stopped"}
