"""Failure paths through the real agent process and the real Docker engine.

Each test fails without its fix: the restart policy (a finished job stays
done, a crash is restarted a bounded number of times then left `error`, an
idle instance comes back), the GPU variables and the pinned runtime, the log
cap, admission of an order the host cannot hold, concurrent deletes, and
the periodic sync never taking a fresh instance for an orphan.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from support.agent_proc import AgentProcess
from support.docker_api import Api, agent_id, containers, docker, inspect, serve_api

BUSYBOX = {"image": "qudata-test/busybox", "image_tag": "1"}
CUDA_LIKE = "qudata-test/cuda-like:1"  # busybox whose image ENV asks for every GPU
AgentFactory = Callable[..., AgentProcess]


@pytest.fixture
def api(agent_factory: AgentFactory) -> Iterator[Api]:
    env = {
        "QUDATA_SYNC_INTERVAL": "1",
        "QUDATA_CRASH_RESTARTS": "2",
        "QUDATA_CONTAINER_LOG_MB": "1",
    }
    yield from serve_api(agent_factory(env).start())


def _until(api: Api, done: Callable[[dict[str, Any]], bool], timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    state = api.get()
    while time.monotonic() < deadline:
        state = api.get()
        if done(state):
            return state
        time.sleep(0.1)
    raise AssertionError(f"never reached the expected state: {state}")


def test_a_command_that_exits_0_is_done_and_stays_stopped(api: Api) -> None:
    api.create(**BUSYBOX, command="echo job-finished-ok; exit 0")
    state = _until(api, lambda s: s["status"] == "paused" and s["exit_code"] == 0)
    assert "finished" in state["reason"] and "job-finished-ok" in (state["last_logs"] or "")
    time.sleep(2)  # a restart policy that ran it again would have done so by now
    attrs = inspect(state["container_id"])
    assert attrs["State"]["Status"] == "exited" and attrs["RestartCount"] == 0
    assert attrs["HostConfig"]["RestartPolicy"]["Name"] == "on-failure"
    assert api.get()["status"] == "paused"
    before = attrs["State"]["StartedAt"]
    assert api.act("start").status_code == 200  # start runs it again
    _until(api, lambda s: inspect(s["container_id"])["State"]["StartedAt"] != before)
    assert docker("logs", state["container_id"]).count("job-finished-ok") == 2


def test_a_crash_is_restarted_a_bounded_number_of_times_then_left_in_error(api: Api) -> None:
    api.create(**BUSYBOX, command="echo crashing-job >> /root/runs; cat /root/runs; exit 3")
    state = _until(api, lambda s: s["status"] == "error", timeout=40)
    assert state["exit_code"] == 3 and "crashed" in state["reason"]
    assert state["container_id"] is not None  # container and data kept
    attrs = inspect(state["container_id"])
    assert attrs["RestartCount"] == 2 and attrs["State"]["Status"] == "exited"
    assert (state["last_logs"] or "").count("crashing-job") >= 3  # its data survived restarts
    time.sleep(1.5)
    assert inspect(state["container_id"])["RestartCount"] == 2  # Docker gave up for good
    runs = docker("logs", state["container_id"]).count("crashing-job")
    assert api.act("start").status_code == 200  # the renter may run it again
    _until(api, lambda s: docker("logs", s["container_id"]).count("crashing-job") > runs)


def test_an_idle_instance_comes_back_after_its_process_dies(api: Api) -> None:
    api.create(**BUSYBOX)
    cid = api.wait("running")["container_id"]
    before = inspect(cid)["State"]["StartedAt"]
    assert inspect(cid)["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"
    docker("exec", cid, "sh", "-c", "kill -9 $(pidof tail)")
    _until(api, lambda s: s["status"] == "running" and inspect(cid)["State"]["StartedAt"] != before)
    assert inspect(cid)["RestartCount"] >= 1


@pytest.fixture(scope="module")
def cuda_like_image() -> Iterator[str]:
    cid = docker("create", "qudata-test/busybox:1", "true").strip()
    try:
        docker(
            "commit",
            "--change",
            "ENV NVIDIA_VISIBLE_DEVICES=all",
            "--change",
            "ENV NVIDIA_DRIVER_CAPABILITIES=all",
            # What else the NVIDIA toolkit's hook reads: the agent's to decide, not the image's.
            "--change",
            "ENV NVIDIA_IMEX_CHANNELS=all NVIDIA_MIG_CONFIG_DEVICES=all"
            " NVIDIA_MIG_MONITOR_DEVICES=all NVIDIA_REQUIRE_CUDA=cuda>=99.0"
            " NVIDIA_DISABLE_REQUIRE=true NVIDIA_GDRCOPY=enabled NVIDIA_FABRIC_DEVICES=all",
            cid,
            CUDA_LIKE,
        )
    finally:
        docker("rm", "-f", cid, check=False)
    yield CUDA_LIKE
    docker("rmi", "-f", CUDA_LIKE, check=False)


def test_gpu_variables_are_the_agents_and_the_runtime_is_pinned(
    api: Api, cuda_like_image: str
) -> None:
    resp = api.create(
        image=cuda_like_image,
        env_variables={
            "QUDATA_GPU_COUNT": "0",
            "NVIDIA_VISIBLE_DEVICES": "all",
            "NVIDIA_DRIVER_CAPABILITIES": "compute,utility,graphics",
            "NVIDIA_IMEX_CHANNELS": "0",
            "NVIDIA_MIG_MONITOR_DEVICES": "all",
            "KEEP": "me",
        },
    )
    assert resp.status_code == 202, resp.text
    cid = api.wait("running")["container_id"]
    attrs = inspect(cid)
    env = attrs["Config"]["Env"]
    assert "NVIDIA_VISIBLE_DEVICES=void" in env and "KEEP=me" in env
    assert "NVIDIA_VISIBLE_DEVICES=all" not in env
    assert not any(e.startswith("NVIDIA_DRIVER_CAPABILITIES=compute,utility,graphics") for e in env)
    assert attrs["HostConfig"]["Runtime"] == "runc"
    # every other NVIDIA_ variable, from the image or the order, reaches the hook empty
    hook = {"IMEX_CHANNELS", "MIG_CONFIG_DEVICES", "MIG_MONITOR_DEVICES", "REQUIRE_CUDA"}
    hook |= {"DISABLE_REQUIRE", "GDRCOPY", "FABRIC_DEVICES", "DRIVER_CAPABILITIES"}
    for name in hook:
        assert f"NVIDIA_{name}=" in env, (name, env)
    assert not any(e.startswith("NVIDIA_") and e.endswith("=all") for e in env), env
    assert not any(e in env for e in ("NVIDIA_IMEX_CHANNELS=0", "NVIDIA_DISABLE_REQUIRE=true"))
    assert "NVIDIA_IMEX_CHANNELS" in api.agent.log()  # dropped from the order, and said so
    seen = docker("exec", cid, "sh", "-c", "echo $NVIDIA_VISIBLE_DEVICES").strip()
    assert seen == "void"  # what the runtime reads inside, image ENV included
    assert "NVIDIA_VISIBLE_DEVICES" in api.agent.log()  # the renter is told it was dropped


def test_instances_have_no_ipv6_around_the_ipv4_wall(api: Api) -> None:
    if not Path("/proc/sys/net/ipv6/conf/all/disable_ipv6").exists():
        pytest.fail("this test needs a kernel with IPv6 (the case the setting is for)")
    api.create(**BUSYBOX)
    cid = api.wait("running")["container_id"]
    assert docker("exec", cid, "cat", "/proc/sys/net/ipv6/conf/all/disable_ipv6").strip() == "1"
    assert "inet6" not in docker("exec", cid, "ip", "addr")


def test_container_logs_are_capped_and_still_readable(api: Api) -> None:
    line = "x" * 1000
    api.create(**BUSYBOX, command=f"i=0; while [ $i -lt 8000 ]; do echo {line}; i=$((i+1)); done")
    state = _until(api, lambda s: s["status"] == "paused" and s["exit_code"] == 0, timeout=60)
    attrs = inspect(state["container_id"])
    log_config = attrs["HostConfig"]["LogConfig"]
    assert log_config["Type"] == "local"
    assert log_config["Config"] == {"max-size": str(1024**2 // 5), "max-file": "5"}
    root = docker("info", "--format", "{{.DockerRootDir}}").strip()
    logs = Path(root) / "containers" / attrs["Id"] / "local-logs"
    on_disk = sum(f.stat().st_size for f in logs.iterdir())
    assert on_disk < 2 * 1024**2, f"{on_disk} bytes of log for 8 MB printed"
    assert line in api.get(logs="true", tail=3)["logs"]


def test_an_order_the_host_cannot_hold_is_refused_at_once(api: Api) -> None:
    for env, words in (
        ({"QUDATA_CPU_CORES": "512"}, ("512", "CPU", "free")),
        ({"QUDATA_MEMORY_GB": "4096"}, ("4096", "memory", "free")),
    ):
        resp = api.create(**BUSYBOX, env_variables=env)
        assert resp.status_code == 409, resp.text
        error = resp.json()["error"]
        assert all(w in error for w in words), error
    assert api.get()["status"] == "destroyed"
    assert containers(agent_id(api.agent.state_dir)) == []


def test_concurrent_deletes_all_answer_200(api: Api) -> None:
    api.create(**BUSYBOX)
    cid = api.wait("running")["container_id"]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        codes = list(pool.map(lambda _: api.delete().status_code, range(3)))
    assert codes == [200, 200, 200]
    assert docker("ps", "-aq", "--filter", f"id={cid}").strip() == ""
    assert api.get()["status"] == "destroyed"


def test_the_periodic_sync_never_takes_a_fresh_instance_for_an_orphan(api: Api) -> None:
    """25 create/delete cycles against a sync every second: no instance vanishes."""
    owner = agent_id(api.agent.state_dir)
    for cycle in range(25):
        assert api.create(**BUSYBOX).status_code == 202
        deadline = time.monotonic() + 30
        state = api.get()
        while state["status"] != "running":
            assert state["status"] == "pending", f"cycle {cycle}: {state}"
            assert time.monotonic() < deadline, f"cycle {cycle}: never ran"
            time.sleep(0.02)
            state = api.get()
        for _ in range(5):  # a sync or two passes while it runs
            time.sleep(0.1)
            now = api.get()
            assert now["status"] == "running", f"cycle {cycle}: {now}"
            assert now["container_id"] == state["container_id"]
        assert api.delete().status_code == 200
        assert containers(owner) == []
    assert "removing a container with no instance record" not in api.agent.log()
