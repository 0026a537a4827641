"""Tunnel mode without a network: its settings, the merge with /init, health, the
policy-routing plan, the check's repairs (with a fake device) and the key file."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest

from qudata_agent.adapters.wireguard import ensure_key
from qudata_agent.blocking import Blocking
from qudata_agent.config import ConfigError, load_settings
from qudata_agent.domain.firewall import plan
from qudata_agent.domain.tunnel import (
    IN_CHAIN,
    OUT_CHAIN,
    Health,
    Routing,
    TunnelConfig,
    TunnelConfigError,
    block_problem,
    build,
    from_answer,
    health,
    mangle_rules,
    probe_target,
)
from qudata_agent.server import _candidates
from qudata_agent.services.tunnel import Tunnel

KEY = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
GOOD = {
    "QUDATA_TUNNEL": "wireguard",
    "QUDATA_TUNNEL_ENDPOINT": "relay.example.com:51820",
    "QUDATA_TUNNEL_RELAY_KEY": KEY,
    "QUDATA_TUNNEL_ADDRESS": "10.77.0.2/24",
    "QUDATA_TUNNEL_PUBLIC_ADDRESS": "198.51.100.1",
    "QUDATA_PORT_RANGE": "40000-40999",
}


def test_tunnel_settings_are_read_and_checked() -> None:
    s = load_settings(environ=GOOD)
    assert s.tunnel == "wireguard"
    assert (s.tunnel_endpoint, s.tunnel_address) == ("relay.example.com:51820", "10.77.0.2/24")
    assert (s.tunnel_interface, s.tunnel_table, s.tunnel_mark) == ("qudata-wg", 51820, 0x80000)
    assert load_settings(environ={**GOOD, "QUDATA_TUNNEL": "off"}).tunnel is None
    assert load_settings(environ={**GOOD, "QUDATA_TUNNEL_MARK": "0x200000"}).tunnel_mark == 0x200000


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("QUDATA_TUNNEL", "openvpn"),
        ("QUDATA_TUNNEL_ENDPOINT", "relay.example.com"),
        ("QUDATA_TUNNEL_ENDPOINT", "relay:99999"),
        ("QUDATA_TUNNEL_ENDPOINT", "-o:51820"),
        ("QUDATA_TUNNEL_RELAY_KEY", "not-a-key"),
        ("QUDATA_TUNNEL_ADDRESS", "10.77.0.2"),
        ("QUDATA_TUNNEL_ADDRESS", "10.77.0.0/24"),
        ("QUDATA_TUNNEL_PUBLIC_ADDRESS", "relay.example.com"),
        ("QUDATA_TUNNEL_MARK", "0"),
        ("QUDATA_TUNNEL_INTERFACE", "a-name-far-too-long-for-linux"),
    ],
)
def test_a_bad_tunnel_setting_names_its_variable(var: str, value: str) -> None:
    with pytest.raises(ConfigError, match=var):
        load_settings(environ={**GOOD, var: value})


def test_in_tunnel_mode_the_agent_port_lies_inside_the_block() -> None:
    assert load_settings(environ={**GOOD, "QUDATA_AGENT_PORT": "40000"}).agent_port == 40000
    with pytest.raises(ConfigError, match="inside QUDATA_PORT_RANGE"):
        load_settings(environ={**GOOD, "QUDATA_AGENT_PORT": "9999"})
    ports = list(_candidates(None, (40000, 40002), inside=True))
    assert ports == [40000, 40001, 40002]
    assert next(iter(_candidates(40001, (40000, 40002), inside=True))) == 40001
    assert next(iter(_candidates(20000, (40000, 40002), inside=True))) == 40000


def test_settings_win_over_the_init_answer_field_by_field() -> None:
    answer = from_answer(
        {
            "endpoint": "other.example.com:1",
            "relay_key": KEY,
            "address": "10.9.0.5/16",
            "public_address": "203.0.113.7",
            "ports": "40000-40999",
            "junk": {"x": 1},
        }
    )
    config = build({"endpoint": "relay.example.com:51820", "address": None}, answer)
    assert config.endpoint == "relay.example.com:51820"
    assert config.address == ipaddress.IPv4Interface("10.9.0.5/16")
    assert config.public_address == "203.0.113.7"
    assert from_answer("nonsense") == {}
    with pytest.raises(TunnelConfigError, match="QUDATA_TUNNEL_RELAY_KEY"):
        build({"endpoint": "r:1", "address": "10.0.0.2/24", "public_address": "1.2.3.4"}, {})
    with pytest.raises(TunnelConfigError, match="QUDATA_TUNNEL_ADDRESS"):
        build({}, {**answer, "address": "10.9.0.5; rm -rf /"})


def test_the_block_from_init_must_hold_the_port_range() -> None:
    assert block_problem(None, (40000, 40999)) is None
    assert block_problem("40000-40999", (40000, 40999)) is None
    problem = block_problem("41000-41999", (40000, 40999))
    assert problem is not None and "QUDATA_PORT_RANGE=41000-41999" in problem
    assert block_problem("junk", (1, 2)) is not None


def test_health_from_the_handshake_age() -> None:
    assert health(None) is Health.DOWN
    assert health(5) is Health.UP
    assert health(10_000) is Health.STALE


def test_probe_goes_to_another_address_of_the_tunnel_network() -> None:
    assert probe_target(ipaddress.IPv4Interface("10.77.0.2/24")) == "10.77.0.1"
    assert probe_target(ipaddress.IPv4Interface("10.77.0.1/24")) == "10.77.0.2"


def test_only_connections_from_the_tunnel_are_marked_and_only_their_packets_rerouted() -> None:
    rules = mangle_rules(Routing("wg22", 5222, 0x200000))
    mark = "0x200000/0x200000"
    # Packets from the tunnel mark their connection and are never re-marked themselves.
    assert rules[IN_CHAIN][0] == ["-i", "wg22", "-j", "CONNMARK", "--set-xmark", mark]
    assert rules[IN_CHAIN][1] == ["-i", "wg22", "-j", "RETURN"]
    # Everything else gets a packet mark only when its connection carries the mark.
    for rule in [rules[IN_CHAIN][2], *rules[OUT_CHAIN]]:
        assert rule[:4] == ["-m", "connmark", "--mark", mark]


def test_the_wall_drops_the_tunnel_network_even_when_allowed() -> None:
    egress = plan("br0", allow=("10.0.0.0/8",), always_blocked=("10.77.0.0/24",)).chains[
        "QUDATA-EGRESS"
    ]
    drop = egress.index(["-d", "10.77.0.0/24", "-j", "DROP"])
    assert drop < egress.index(["-d", "10.0.0.0/8", "-j", "RETURN"])


def test_the_key_file_is_private_and_stable(tmp_path: Path) -> None:
    path = tmp_path / "tunnel.key"
    public = ensure_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(public) == 44 and public != path.read_text().strip()
    assert ensure_key(path) == public


class FakeDevice:
    def __init__(self) -> None:
        self.routing = Routing("wg22", 5222, 0x200000)
        self.link = False
        self.routes = False
        self.handshake: float | None = None
        self.calls: list[str] = []

    def exists(self) -> bool:
        return self.link

    def create(self) -> None:
        self.calls.append("create")
        self.link = True

    def configure(self, config: TunnelConfig) -> None:
        self.calls.append("configure")
        self.routes = True

    def set_peer(self, config: TunnelConfig) -> None:
        self.calls.append("set_peer")

    def rule_present(self) -> bool:
        return self.routes

    def route_present(self) -> bool:
        return self.routes

    def mangle_present(self) -> bool:
        return self.routes

    def latest_handshake(self) -> float | None:
        return self.handshake

    def probe(self, target: str) -> None:
        self.calls.append(f"probe {target}")


async def test_the_check_puts_back_what_went_missing_and_renews_a_stale_peer() -> None:
    now = [1000.0]
    device = FakeDevice()
    blocking = Blocking()
    try:
        tunnel = Tunnel(device, blocking, "PUB", clock=lambda: now[0])
        config = build({k.removeprefix("QUDATA_TUNNEL_").lower(): v for k, v in GOOD.items()}, {})
        assert await tunnel.start(config)
        assert device.calls == ["create", "configure"]
        device.handshake = 995.0
        device.calls.clear()
        await tunnel.check()
        assert device.calls == ["probe 10.77.0.1"]
        assert tunnel.view()["state"] == "up" and tunnel.view()["problem"] is None
        device.link = False  # wireguard-go died
        device.calls.clear()
        await tunnel.check()
        assert device.calls[:2] == ["create", "configure"] and tunnel.repairs == 1
        now[0] += 600  # the relay is gone: the handshake ages
        device.calls.clear()
        await tunnel.check()
        assert "set_peer" in device.calls
        view = tunnel.view()
        assert view["state"] == "stale" and "UDP" in view["problem"] and "PUB" in view["problem"]
        device.handshake = now[0]
        await tunnel.check()
        assert tunnel.view()["problem"] is None
    finally:
        blocking.close()


def test_doctor_names_the_fix_for_each_tunnel_problem() -> None:
    from qudata_agent.doctor import Level
    from qudata_agent.tunnel_doctor import TunnelSeen, checks

    good = TunnelSeen(endpoint="relay:51820", tools=(), interface=True, handshake_age_s=20)
    assert all(c.level is Level.PASS for c in checks(good))
    bad = TunnelSeen(
        endpoint="relay:51820",
        tools=("wireguard-go",),
        route_error="Name or service not known",
        interface=True,
        handshake_age_s=900,
        missing_routing=("ip rule fwmark 0x80000/0x80000",),
        public_key="PUBKEY",
    )
    found = {c.name: c for c in checks(bad)}
    assert found["tunnel tools"].fix == "apt-get install wireguard-go"
    assert "QUDATA_TUNNEL_ENDPOINT" in (found["tunnel relay"].fix or "")
    handshake = found["tunnel handshake"]
    assert handshake.level is Level.FAIL and "UDP to relay:51820" in (handshake.fix or "")
    assert "PUBKEY" in (handshake.fix or "")
    assert "restart" in (found["tunnel routes"].fix or "")
    down = checks(TunnelSeen(endpoint=None, tools=(), interface=False))
    assert [c.level for c in down] == [Level.PASS, Level.PASS, Level.FAIL]
