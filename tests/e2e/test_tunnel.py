"""Tunnel mode, end to end, as the provider would see it (see support/relay_net.py).

The agent and dockerd run in the root namespace, which reaches the relay
outbound only; the relay is configured by the real deploy/relay/relay.sh; the
renter reaches only the relay's public address. Everything the renter does
goes through that address: the agent's API, an SSH login into an instance, a
TCP and a UDP port of it. Then the relay's WireGuard restarts, the agent is
kill -9'd with its tunnel gone, and everything comes back.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qudata_agent.adapters.wireguard import ensure_key
from support.agent_proc import AgentProcess, agent_command
from support.docker_api import Api, agent_id, docker, remove_containers_of
from support.fake_cp import FakeControlPlane
from support.relay_net import (
    HOST_A_BLOCK,
    HOST_A_IF,
    HOST_A_TUNNEL,
    HOST_B_BLOCK,
    PUBLIC,
    RELAY_TUNNEL,
    RENTER,
    RelayNet,
    relay_net,
    remove_agent_tunnel,
    sh,
    wait_for,
)

DEBIAN_SSH = {"image": "qudata-test/debian-ssh", "image_tag": "12"}
WG = HOST_A_IF
TABLE, MARK = "5222", "0x2000000"
AGENT_PORT = HOST_A_BLOCK[0]
# A TCP service that tells each client the address it came from, and a UDP echo.
SERVICES = (
    "perl -MIO::Socket::INET -e 'if (fork) { my $s = IO::Socket::INET->new(LocalPort => 8080,"
    " Listen => 8, ReuseAddr => 1) or die; while (my $c = $s->accept) {"
    ' print $c "peer=" . $c->peerhost . "\\n"; close $c } } else {'
    " my $u = IO::Socket::INET->new(LocalPort => 9090, Proto => q(udp)) or die;"
    ' while (1) { my $m; my $from = $u->recv($m, 512); $u->send("echo:$m", 0, $from) } }\''
)
RENTER_CLIENT = r"""
import socket, sys
kind, port = sys.argv[1], int(sys.argv[2])
try:
    if kind == "tcp":
        with socket.create_connection((sys.argv[3], port), timeout=3) as s:
            print(s.makefile().readline().strip())
    else:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(3)
            s.sendto(b"ping", (sys.argv[3], port))
            print(s.recvfrom(512)[0].decode())
except OSError as e:
    print(f"error: {e}")
"""


class Renter:
    def __init__(self, net: RelayNet, keys: Path) -> None:
        self.net = net
        self.keys = keys

    def _run(self, *args: str) -> str:
        done = self.net.renter(sys.executable, "-c", RENTER_CLIENT, *args)
        return done.stdout.strip()

    def api(self, secret: str, pin: str, path: str = "/v1/host") -> dict[str, Any] | None:
        """Over TLS, the agent's key pinned (curl --pinnedpubkey), as a control plane would."""
        done = self.net.renter(
            "curl", "-sS", "-k", "--max-time", "5", "--pinnedpubkey", f"sha256//{pin}",
            "-H", f"X-Agent-Secret: {secret}", f"https://{PUBLIC}:{AGENT_PORT}{path}",
        )  # fmt: skip
        return json.loads(done.stdout) if done.returncode == 0 else None  # type: ignore[no-any-return]

    def tcp(self, port: int | str, address: str = PUBLIC) -> str:
        return self._run("tcp", str(port), address)

    def udp(self, port: int | str) -> str:
        return self._run("udp", str(port), PUBLIC)

    def ssh(self, port: int | str, command: str) -> subprocess.CompletedProcess[str]:
        return self.net.renter(
            "ssh", "-i", str(self.keys / "renter"), "-p", str(port),
            "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=5",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR", f"root@{PUBLIC}", command,
        )  # fmt: skip


def _cleanup_host() -> None:
    remove_agent_tunnel(WG, TABLE, MARK)


class Rig:
    def __init__(self, net: RelayNet, agent: AgentProcess, renter: Renter, cp: FakeControlPlane):
        self.net, self.agent, self.renter, self.cp = net, agent, renter, cp


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    work = tmp_path_factory.mktemp("tunnel")
    state = work / "state"
    state.mkdir(mode=0o700)
    public_key = ensure_key(state / "tunnel.key")
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", work / "renter"], check=True
    )
    default_route = sh("ip", "route", "show", "default")
    _cleanup_host()
    cp = FakeControlPlane().start()
    agent: AgentProcess | None = None
    try:
        with relay_net(work, public_key) as net:
            env = {
                "QUDATA_AGENT_HOST": "0.0.0.0",
                "QUDATA_API_KEY": "tunnel-test-key-0123456789",
                "QUDATA_API_URL": cp.url,
                "QUDATA_PORT_RANGE": f"{HOST_A_BLOCK[0]}-{HOST_A_BLOCK[1]}",
                "QUDATA_TUNNEL": "wireguard",
                "QUDATA_TUNNEL_ENDPOINT": net.endpoint,
                "QUDATA_TUNNEL_RELAY_KEY": net.relay_key,
                "QUDATA_TUNNEL_ADDRESS": HOST_A_TUNNEL,
                "QUDATA_TUNNEL_PUBLIC_ADDRESS": PUBLIC,
                "QUDATA_TUNNEL_INTERFACE": WG,
                "QUDATA_TUNNEL_TABLE": TABLE,
                "QUDATA_TUNNEL_MARK": MARK,
            }
            agent = AgentProcess(state, env, port=AGENT_PORT).start()
            cp.wait_for("/init")
            wait_for((state / "agent_secret").exists, 15, "the secret from /init")
            rig = Rig(net, agent, Renter(net, work), cp)
            yield rig
            agent = rig.agent  # a test may have started another
    finally:
        if agent is not None and agent.proc is not None and agent.proc.poll() is None:
            agent.stop(signal.SIGKILL)
        if agent is not None:
            remove_containers_of(agent_id(state))
        cp.stop()
        _cleanup_host()
        assert sh("ip", "route", "show", "default") == default_route


def _secret(rig: Rig) -> str:
    # The control plane may replace the secret; the agent's file holds the current one.
    return rig.agent.secret()


def _pin(rig: Rig) -> str:
    """The pin the agent sent in its last /init (tls_pubkey_sha256)."""
    return str(rig.cp.wait_for("/init")[-1].body["tls_pubkey_sha256"])


def _api(rig: Rig) -> dict[str, Any] | None:
    return rig.renter.api(_secret(rig), _pin(rig))


def _wait_api(rig: Rig, timeout: float) -> float:
    return wait_for(lambda: _api(rig) is not None, timeout, "the agent's API")


@pytest.fixture(scope="module")
def instance(rig: Rig) -> dict[str, Any]:
    _wait_api(rig, 30)
    api = Api(rig.agent)
    resp = api.create(
        **DEBIAN_SSH, ssh_enabled=True, ports={"8080": "auto", "9090/udp": "auto"}, command=SERVICES
    )
    assert resp.status_code == 202, resp.text
    key = (rig.renter.keys / "renter.pub").read_text().strip()
    assert api.client.post("/ssh", json={"ssh_pubkey": key}).status_code == 200
    deadline = time.monotonic() + 90
    state = api.get()
    while time.monotonic() < deadline and (state.get("ssh") or {}).get("status") != "ready":
        time.sleep(0.2)
        state = api.get()
    assert state["ssh"]["status"] == "ready", state
    return state


def test_the_renter_reaches_the_api_ssh_tcp_and_udp_through_the_relay(
    rig: Rig, instance: dict[str, Any]
) -> None:
    def tunnel() -> dict[str, Any]:
        host = _api(rig)
        assert host is not None
        return host["data"]["tunnel"]  # type: ignore[no-any-return]

    wait_for(lambda: tunnel()["state"] == "up", 15, "the tunnel's state up")
    # Pinned: a client that expects another key gets nothing.
    assert rig.renter.api(_secret(rig), "A" * 43 + "=") is None
    assert tunnel()["public_address"] == PUBLIC
    assert tunnel()["endpoint"] == rig.net.endpoint and tunnel()["last_handshake_at"] is not None
    # The control plane was told the relay's address, the agent's port and its key.
    init = rig.cp.wait_for("/init")[-1].body
    assert init["address"] == PUBLIC and init["agent_port"] == AGENT_PORT
    assert init["tunnel_pubkey"] == rig.net.host_a_key
    ports = instance["allocated_ports"]
    assert all(HOST_A_BLOCK[0] <= int(p) <= HOST_A_BLOCK[1] for p in ports.values())
    login = rig.renter.ssh(ports["22"], "echo $SSH_CLIENT; hostname")
    assert login.returncode == 0, login.stderr
    assert login.stdout.split()[0] == RENTER  # the renter's own address, not the relay's
    assert rig.renter.tcp(ports["8080"]) == f"peer={RENTER}"
    assert rig.renter.udp(ports["9090/udp"]) == "echo:ping"
    metrics = Api(rig.agent).client.get("/metrics").text
    assert f'qudata_tunnel_up{{endpoint="{rig.net.endpoint}",interface="{WG}"}} 1.0' in metrics


def test_only_tunnel_connections_are_routed_by_the_tunnel(
    rig: Rig, instance: dict[str, Any]
) -> None:
    """The host's default route is untouched; the instance's own connections leave by it."""
    assert f"default dev {WG}" in sh("ip", "route", "show", "table", TABLE)
    assert WG not in sh("ip", "route", "show", "default")
    # Unmarked traffic to the renter's address takes the main table (here: a blackhole).
    assert WG not in sh("ip", "route", "get", RENTER, check=False)
    assert f"dev {WG}" in sh("ip", "route", "get", RENTER, "mark", MARK)


def test_an_instances_own_connections_leave_by_the_hosts_route(
    rig: Rig, instance: dict[str, Any]
) -> None:
    """Out by the host's route to the relay's public address, host B's block: reached as
    any internet client reaches it (through the tunnel, host to host is dropped)."""
    listener = rig.net.host_b_listener()
    try:
        wait_for(lambda: rig.renter.tcp(HOST_B_BLOCK[0]) == "host-b-service", 20, "host B")
        out = docker(
            "exec", instance["container_id"], "bash", "-c",
            f"timeout 5 bash -c 'exec 3<>/dev/tcp/{PUBLIC}/{HOST_B_BLOCK[0]}; head -1 <&3'",
            check=False,
        )  # fmt: skip
        assert out.strip() == "host-b-service"
    finally:
        listener.kill()
        listener.wait()


def test_doctor_checks_the_tunnel(rig: Rig, instance: dict[str, Any]) -> None:
    done = subprocess.run(
        [*agent_command(), "doctor", "--json"],
        env=rig.agent.env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    found = {c["name"]: c for c in json.loads(done.stdout)["checks"]}
    for name in ("tunnel tools", "tunnel relay", "tunnel handshake", "tunnel routes"):
        assert found[name]["level"] == "pass", found[name]


def test_a_tenant_cannot_reach_the_tunnel_network_or_another_host(
    rig: Rig, instance: dict[str, Any]
) -> None:
    listener = rig.net.host_b_listener()
    try:
        # Host B is there: the renter reaches its service through the relay.
        wait_for(
            lambda: rig.renter.tcp(HOST_B_BLOCK[0]) == "host-b-service", 20, "host B's service"
        )
        container = instance["container_id"]
        relay_ip, host_b_ip = RELAY_TUNNEL.split("/")[0], "10.99.22.3"
        for address in (relay_ip, host_b_ip):
            out = docker(
                "exec", container, "bash", "-c",
                f"timeout 4 bash -c 'echo > /dev/tcp/{address}/{HOST_B_BLOCK[0]}' && echo open",
                check=False,
            )  # fmt: skip
            assert "open" not in out, address
        # Not from the host itself either: the relay forwards nothing between hosts.
        probe = (
            "import socket\ntry:\n"
            f"    socket.create_connection(('{host_b_ip}', {HOST_B_BLOCK[0]}), timeout=3)\n"
            "    print('open')\nexcept OSError:\n    print('closed')\n"
        )
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
        assert done.stdout.strip() == "closed"
    finally:
        listener.kill()
        listener.wait()


def test_a_relay_restart_is_survived_within_30_s(rig: Rig, instance: dict[str, Any]) -> None:
    rig.net.relay_down()
    assert _api(rig) is None
    rig.net.relay_up()
    took = _wait_api(rig, 30)
    ports = instance["allocated_ports"]
    wait_for(lambda: rig.renter.tcp(ports["8080"]) == f"peer={RENTER}", 10, "the TCP port")
    assert rig.renter.ssh(ports["22"], "true").returncode == 0
    print(f"reachable again {took:.1f} s after the relay restarted")


def test_the_agent_killed_and_its_tunnel_gone_comes_back(
    rig: Rig, instance: dict[str, Any]
) -> None:
    rig.agent.stop(signal.SIGKILL)
    # The instance does not depend on the agent process: it stays reachable.
    ports = instance["allocated_ports"]
    assert rig.renter.tcp(ports["8080"]) == f"peer={RENTER}"
    sh("ip", "link", "del", "dev", WG)  # as if wireguard-go had died with it
    assert rig.renter.tcp(ports["8080"]).startswith("error")
    rig.agent.start()
    _wait_api(rig, 30)
    assert rig.renter.tcp(ports["8080"]) == f"peer={RENTER}"
    # And while it runs, a dead wireguard-go is noticed and replaced.
    sh("ip", "link", "del", "dev", WG)
    _wait_api(rig, 30)
    host = _api(rig)
    assert host is not None and host["data"]["tunnel"]["state"] == "up"


def test_the_tunnel_can_come_from_the_init_answer(rig: Rig, instance: dict[str, Any]) -> None:
    """Only QUDATA_TUNNEL=wireguard set: the fields come in /init's data.tunnel; the agent
    brings the tunnel up and registers again with the relay's address."""
    rig.agent.stop(signal.SIGKILL)
    _cleanup_host()
    answer = {
        "endpoint": rig.net.endpoint,
        "relay_key": rig.net.relay_key,
        "address": HOST_A_TUNNEL,
        "public_address": PUBLIC,
        "ports": f"{HOST_A_BLOCK[0]}-{HOST_A_BLOCK[1]}",
    }
    status, body = rig.cp.answers["/v0/init"]
    rig.cp.answers["/v0/init"] = (status, {**body, "data": {**body["data"], "tunnel": answer}})
    rig.cp.calls.clear()
    fields = ("ENDPOINT", "RELAY_KEY", "ADDRESS", "PUBLIC_ADDRESS")
    env = {k: v for k, v in rig.agent.env.items() if k.removeprefix("QUDATA_TUNNEL_") not in fields}
    assert env["QUDATA_TUNNEL"] == "wireguard" and "QUDATA_TUNNEL_ENDPOINT" not in env
    rig.agent = AgentProcess(rig.agent.state_dir, env, port=AGENT_PORT).start()
    _wait_api(rig, 30)
    inits = rig.cp.wait_for("/init", count=2)
    assert inits[0].body["address"] != PUBLIC and inits[-1].body["address"] == PUBLIC
    assert all(i.body["tunnel_pubkey"] == rig.net.host_a_key for i in inits)
    ports = instance["allocated_ports"]
    assert rig.renter.tcp(ports["8080"]) == f"peer={RENTER}"
