"""SSH into instances with the real OpenSSH clients (ssh, scp, sftp), through the real
agent and Docker, on every test image: the agent brings its own sshd, nothing is
installed into the image and the container needs no network."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from support.agent_proc import AgentProcess, free_port
from support.docker_api import Api, agent_id, docker, inspect, remove_containers_of

AgentFactory = Callable[..., AgentProcess]
DEBIAN_SSH = {"image": "qudata-test/debian-ssh", "image_tag": "12"}
DEBIAN = {"image": "qudata-test/debian", "image_tag": "12"}
BUSYBOX = {"image": "qudata-test/busybox", "image_tag": "1"}
USER_IMAGE = {"image": "qudata-test/busybox-user", "image_tag": "1"}
EXITS_IMAGE = {"image": "qudata-test/busybox-exits", "image_tag": "1"}
ED25519_BODY = "AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
BUNDLE_BUSYBOX = "/.qudata/ssh/current/bin/busybox"
GREETING = "hello  world's"


def _keygen(path: Path) -> str:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"renter@{path.name}", "-f", path],
        check=True,
    )
    return path.with_suffix(".pub").read_text().strip()


class Keys:
    def __init__(self, tmp: Path) -> None:
        self.dir = tmp
        self.one = _keygen(tmp / "one")
        self.two = _keygen(tmp / "two")
        self.known_hosts = tmp / "known_hosts"

    def options(self, key: str, strict: bool = False) -> list[str]:
        return [
            "-i", str(self.dir / key),
            "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=5",
            "-o", f"StrictHostKeyChecking={'yes' if strict else 'accept-new'}",
            "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "LogLevel=ERROR",
        ]  # fmt: skip

    def ssh(
        self,
        key: str,
        port: str,
        command: str,
        strict: bool = False,
        extra: tuple[str, ...] = (),
        stdin: str | None = None,
        timeout: float = 20,
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ssh", *self.options(key, strict), "-p", port, *extra, "root@127.0.0.1", command],
            capture_output=True, text=True, timeout=timeout, check=False, input=stdin,
        )  # fmt: skip


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    (tmp_path / "keys").mkdir()
    return Keys(tmp_path / "keys")


@pytest.fixture
def agent_api(agent_factory: AgentFactory) -> Iterator[list[Any]]:
    env = {"QUDATA_SYNC_INTERVAL": "2"}
    agent = agent_factory(env).start()
    owner = agent_id(agent.state_dir)
    holder: list[Any] = [agent, Api(agent)]
    yield holder
    running: AgentProcess = holder[0]
    if running.proc is not None and running.proc.poll() is None:
        running.stop(signal.SIGKILL)
    remove_containers_of(owner)


def _wait_ssh(api: Api, status: str = "ready", timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    state = api.get()
    while time.monotonic() < deadline:
        state = api.get()
        if state.get("ssh") and state["ssh"]["status"] == status:
            return state
        if state.get("ssh") and state["ssh"]["status"] == "failed" and status != "failed":
            raise AssertionError(f"ssh failed while waiting for {status}: {state['ssh']}")
        time.sleep(0.1)
    raise AssertionError(f"ssh never became {status}: {state}")


def _add(api: Api, key: str, alias: str = "ssh_pubkey") -> Any:
    return api.client.post("/ssh", json={alias: key})


def _remove(api: Api, key: str) -> Any:
    return api.client.request("DELETE", "/ssh", json={"ssh_pubkey": key})


def _ready_instance(api: Api, keys: Keys, image: dict[str, str], **body: Any) -> dict[str, Any]:
    resp = api.create(**image, ssh_enabled=True, **body)
    assert resp.status_code == 202, resp.text
    assert _add(api, keys.one).status_code == 200
    return _wait_ssh(api)


def _scp_and_sftp(keys: Keys, port: str, tmp: Path) -> None:
    up = tmp / "up.txt"
    up.write_text("uploaded by scp\n")
    scp = ["scp", *keys.options("one"), "-P", port]
    done = subprocess.run([*scp, str(up), "root@127.0.0.1:/tmp/up.txt"], capture_output=True)
    assert done.returncode == 0, done.stderr
    down = tmp / "down.txt"
    done = subprocess.run([*scp, "root@127.0.0.1:/tmp/up.txt", str(down)], capture_output=True)
    assert done.returncode == 0, done.stderr
    assert down.read_text() == "uploaded by scp\n"
    batch = tmp / "batch"
    back = tmp / "sftp-back.txt"
    batch.write_text(f"put {up} /tmp/sftp.txt\nget /tmp/sftp.txt {back}\nls /tmp\n")
    sftp = ["sftp", *keys.options("one"), "-P", port, "-b", str(batch), "root@127.0.0.1"]
    done = subprocess.run(sftp, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert back.read_text() == "uploaded by scp\n" and "/tmp/sftp.txt" in done.stdout


def _tunnel(keys: Keys, port: str) -> None:
    """`ssh -L` to a web server inside the container (the bundle's busybox httpd)."""
    serve = (
        "mkdir -p /tmp/www && echo tunnel-ok > /tmp/www/index.html"
        f" && {BUNDLE_BUSYBOX} httpd -p 127.0.0.1:8000 -h /tmp/www"
    )
    assert keys.ssh("one", port, serve).returncode == 0
    local = free_port()
    tunnel = subprocess.Popen(
        ["ssh", *keys.options("one"), "-p", port, "-N", "-L", f"{local}:127.0.0.1:8000",
         "root@127.0.0.1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 15
        body = ""
        while time.monotonic() < deadline and body != "tunnel-ok":
            try:
                body = httpx.get(f"http://127.0.0.1:{local}/", timeout=2).text.strip()
            except httpx.HTTPError:
                time.sleep(0.2)
        assert body == "tunnel-ok"
    finally:
        tunnel.terminate()
        tunnel.wait(10)


@pytest.mark.parametrize(
    "image",
    [DEBIAN_SSH, DEBIAN, BUSYBOX, USER_IMAGE, EXITS_IMAGE],
    ids=["debian-ssh", "debian", "busybox", "user-not-root", "entrypoint-exits"],
)
def test_everything_a_renter_does_over_ssh(
    agent_api: list[Any], keys: Keys, tmp_path: Path, image: dict[str, str]
) -> None:
    _, api = agent_api
    state = _ready_instance(api, keys, image, env_variables={"QUDATA_TEST_GREETING": GREETING})
    port = state["ssh"]["port"]
    assert port == state["allocated_ports"]["22"]

    # A command, as root, with the container's environment.
    done = keys.ssh("one", port, 'echo "in-as-$(id -un)|$QUDATA_TEST_GREETING|$HOME"')
    assert done.stdout.strip() == f"in-as-root|{GREETING}|/root", done.stderr
    # An interactive login with a PTY; a login shell sees the environment too.
    session = keys.ssh(
        "one", port, "", extra=("-tt",), stdin='tty; echo "greeting=$QUDATA_TEST_GREETING"; exit\n'
    )
    assert "/dev/pts/" in session.stdout and f"greeting={GREETING}" in session.stdout, session
    _scp_and_sftp(keys, port, tmp_path)
    _tunnel(keys, port)
    assert api.get()["status"] == "running"


def test_sessions_survive_key_changes_and_an_agent_kill_and_the_host_key_stays(
    agent_api: list[Any], keys: Keys, agent_factory: AgentFactory
) -> None:
    agent, api = agent_api
    assert api.create(**DEBIAN, ssh_enabled=True).status_code == 202
    # A key given while the instance is still being built is applied once it exists.
    first = _add(api, keys.one)
    assert first.status_code == 200 and first.json()["data"]["added"] is True
    state = _wait_ssh(api)
    port, cid = state["ssh"]["port"], state["container_id"]
    assert keys.ssh("one", port, "echo in").stdout.strip() == "in"
    again = _add(api, keys.one, alias="public_key")  # the alias key; no duplicate
    assert again.json()["data"]["added"] is False
    assert _add(api, keys.two).status_code == 200
    listed = api.client.get("/ssh").json()["data"]["keys"]
    assert [k.split()[1] for k in listed] == [keys.one.split()[1], keys.two.split()[1]]

    # One session open across a key removal, a kill -9 of the agent and its restart.
    session = subprocess.Popen(
        ["ssh", *keys.options("one"), "-p", port, "root@127.0.0.1",
         "for i in 1 2 3 4 5 6 7 8; do sleep 1; done; echo survived"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(1.5)
    assert _remove(api, keys.one).status_code == 200
    assert keys.ssh("one", port, "true").returncode != 0, "a removed key still logs in"
    assert keys.ssh("two", port, "echo two").stdout.strip() == "two"
    agent.stop(signal.SIGKILL)
    agent = agent_factory(
        {"QUDATA_SYNC_INTERVAL": "2"}, state_dir=agent.state_dir, port=agent.port
    ).start()
    agent_api[0], agent_api[1] = agent, Api(agent)
    api = agent_api[1]
    _wait_ssh(api)
    out, err = session.communicate(timeout=30)
    assert out.strip() == "survived", err
    assert _remove(api, keys.one).status_code == 404

    # stop/start and restart: the same host key (known_hosts checked strictly).
    known = keys.known_hosts.read_text()
    for action in ("stop", "start", "restart"):
        assert api.act(action).status_code == 200
    _wait_ssh(api)
    after = keys.ssh("two", port, "echo after", strict=True)
    assert after.stdout.strip() == "after", after.stderr
    # A container restart while the agent is away, then the agent again.
    agent.stop(signal.SIGKILL)
    docker("restart", "-t", "1", cid)
    agent = agent_factory(
        {"QUDATA_SYNC_INTERVAL": "2"}, state_dir=agent.state_dir, port=agent.port
    ).start()
    agent_api[0], agent_api[1] = agent, Api(agent)
    _wait_ssh(agent_api[1])
    assert keys.ssh("two", port, "echo back", strict=True).stdout.strip() == "back"
    assert keys.known_hosts.read_text() == known


def test_keys_of_one_instance_do_not_log_into_another(
    agent_factory: AgentFactory, keys: Keys, tmp_path: Path
) -> None:
    """Two agents (own state dirs), one instance each, side by side."""
    apis: list[Api] = []
    owners: list[str] = []
    try:
        for name in ("a", "b"):
            agent = agent_factory({}, state_dir=tmp_path / f"state-{name}").start()
            owners.append(agent_id(agent.state_dir))
            apis.append(Api(agent))
        assert apis[0].create(**BUSYBOX, ssh_enabled=True).status_code == 202
        assert _add(apis[0], keys.one).status_code == 200
        a = _wait_ssh(apis[0])
        assert apis[1].create(**BUSYBOX, ssh_enabled=True).status_code == 202
        assert _add(apis[1], keys.two).status_code == 200
        b = _wait_ssh(apis[1])
        pa, pb = a["ssh"]["port"], b["ssh"]["port"]
        assert keys.ssh("one", pa, "echo a").stdout.strip() == "a"
        assert keys.ssh("two", pb, "echo b").stdout.strip() == "b"
        assert keys.ssh("one", pb, "true").returncode != 0
        assert keys.ssh("two", pa, "true").returncode != 0
        # Each container mounts the bundle and its own SSH directory, read-only, no more.
        for state, api in ((a, apis[0]), (b, apis[1])):
            mounts = inspect(state["container_id"])["Mounts"]
            own = str(api.agent.state_dir / "ssh" / "instances" / state["instance_id"])
            assert sorted(m["Source"] for m in mounts if m["Type"] == "bind") == sorted(
                [str(api.agent.state_dir / "ssh" / "bundles"), own]
            )
            assert all(m["RW"] is False for m in mounts if m["Type"] == "bind")
        # A deleted instance's SSH directory goes with it.
        assert apis[0].delete().status_code == 200
        gone = apis[0].agent.state_dir / "ssh" / "instances" / a["instance_id"]
        deadline = time.monotonic() + 10
        while gone.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not gone.exists()
    finally:
        for owner in owners:
            remove_containers_of(owner)


@pytest.fixture(name="internal")
def internal_network() -> Iterator[tuple[str, str]]:
    """A Docker network with no way out (--internal): no egress, no published ports.

    Made as the agent would make its own (bridge name, no traffic between
    containers), so the agent adopts it rather than making it again.
    """
    tag = uuid.uuid4().hex[:8]
    name, bridge = f"qudata-test-internal-{tag}", f"qdin{tag}"
    docker(
        "network", "create", "--internal", "--label", "qudata.test=ssh",
        "-o", f"com.docker.network.bridge.name={bridge}",
        "-o", "com.docker.network.bridge.enable_icc=false", name,
    )  # fmt: skip
    try:
        yield name, bridge
    finally:
        docker("network", "rm", name, check=False)
        table = f"qudata_net_{bridge}"  # the agent's network meter's, for this bridge
        subprocess.run(["nft", "delete", "table", "ip", table], check=False, capture_output=True)


def test_no_network_is_needed_from_the_container(
    agent_factory: AgentFactory, keys: Keys, internal: tuple[str, str], tmp_path: Path
) -> None:
    """On a network with no egress at all (and so no published port either) the renter
    reaches sshd through `docker exec` and the container's own loopback."""
    internal_network, bridge = internal
    env = {"QUDATA_NETWORK": internal_network, "QUDATA_BRIDGE": bridge, "QUDATA_FIREWALL": "0"}
    agent = agent_factory(env).start()
    owner = agent_id(agent.state_dir)
    try:
        api = Api(agent)
        state = _ready_instance(api, keys, DEBIAN)
        cid = state["container_id"]
        networks = inspect(cid)["NetworkSettings"]["Networks"]
        assert list(networks) == [internal_network]  # its only network, and that has no way out
        assert json.loads(docker("network", "inspect", internal_network))[0]["Internal"] is True
        proxy = f"ProxyCommand=docker exec -i {cid} {BUNDLE_BUSYBOX} nc 127.0.0.1 22"
        done = keys.ssh("one", "22", "echo walled-in", extra=("-o", proxy))
        assert done.stdout.strip() == "walled-in", done.stderr
    finally:
        remove_containers_of(owner)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "garbage",
        "ssh-ed25519",
        "ssh-ed25519 not*base64",
        "ssh-ed25519 AAAAB3NzaC1yc2EAAAADAQABAAABAQ==",  # an RSA blob under the ed25519 name
        f'command="rm -rf /" ssh-ed25519 {ED25519_BODY}',
        f"ssh-ed25519 {ED25519_BODY} x\nssh-ed25519 {ED25519_BODY} y",
        "ssh-dss AAAAB3NzaC1kc3MAAACBAP",
    ],
)
def test_bad_keys_are_refused_and_change_nothing(agent_api: list[Any], bad: str) -> None:
    _, api = agent_api
    api.create(**BUSYBOX, ssh_enabled=True)
    resp = _add(api, bad)
    assert resp.status_code == 400, resp.text
    assert "ssh_pubkey" in resp.json()["error"]
    assert api.client.get("/ssh").json()["data"]["keys"] == []


def test_ssh_routes_without_an_instance_or_with_ssh_disabled(
    agent_api: list[Any], keys: Keys
) -> None:
    _, api = agent_api
    assert _add(api, keys.one).status_code == 404
    api.create(**BUSYBOX)
    resp = _add(api, keys.one)
    assert resp.status_code == 409 and "ssh_enabled" in resp.json()["error"]
    assert api.get()["ssh"] == {"status": "disabled", "port": None, "reason": None}
    state = api.wait("running")
    assert not inspect(state["container_id"])["Mounts"]  # no SSH, no mount at all
