"""The deploy examples' firewall for the agent's port, run for real in a network namespace.

The script the Ansible role installs (its template, rendered the way the role
renders it) and the one in the cloud-init example each run in a namespace of
this test's own, with iptables and ip6tables of that namespace: the port
answers loopback and the allowed networks, drops every other source, a rerun
leaves one rule (and moves it with the port), and `stop` removes it all. The
sources are addresses on the namespace's loopback; no packet leaves it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
ROLE_SCRIPT = DEPLOY / "ansible/roles/qudata_agent/templates/qudata-agent-api-firewall.j2"
CLOUD_INIT = DEPLOY / "cloud-init/user-data.yaml"
PORT = 1024  # the cloud-init example's (install.sh's default)
LISTEN = """
import socket, sys
servers = []
for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
    s = socket.socket(family)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((host, int(sys.argv[1])))
    s.listen(64)
    servers.append(s)
print("listening", flush=True)
import selectors
sel = selectors.DefaultSelector()
for s in servers:
    sel.register(s, selectors.EVENT_READ)
while True:
    for key, _ in sel.select():
        conn, _ = key.fileobj.accept()
        conn.close()
"""
CONNECT = """
import socket, sys
source, target, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
family = socket.AF_INET6 if ":" in target else socket.AF_INET
s = socket.socket(family)
s.settimeout(1.0)
s.bind((source, 0))
try:
    s.connect((target, port))
    print("open")
except OSError:
    print("dropped")
"""


def _ns(name: str, *argv: str, check: bool = True) -> str:
    done = subprocess.run(
        ["ip", "netns", "exec", name, *argv], capture_output=True, text=True, timeout=30
    )
    if check and done.returncode != 0:
        raise AssertionError(f"{argv}: exit {done.returncode}\n{done.stdout}{done.stderr}")
    return done.stdout


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"t20-tls-fw-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        _ns(name, "ip", "link", "set", "lo", "up")
        for address in ("203.0.113.5/32", "192.0.2.5/32"):
            _ns(name, "ip", "addr", "add", address, "dev", "lo")
        for address in ("2001:db8:1::5/128", "2001:db8:2::5/128"):
            _ns(name, "ip", "-6", "addr", "add", address, "dev", "lo", "nodad")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _role_script(port: int, allow: list[str]) -> str:
    """The template as the role renders it (it uses these two expressions only)."""
    text = ROLE_SCRIPT.read_text()
    text = text.replace("{{ qudata_agent_port }}", str(port))
    text = text.replace("{{ qudata_agent_api_allow | join(' ') }}", " ".join(allow))
    assert "{{" not in text and "{%" not in text
    return text


def _cloud_init_script() -> str:
    files = yaml.safe_load(CLOUD_INIT.read_text())["write_files"]
    (script,) = [f["content"] for f in files if f["path"].endswith("qudata-agent-api-firewall")]
    return str(script)


def _reach(ns: str, source: str, target: str, port: int = PORT) -> str:
    return _ns(ns, sys.executable, "-c", CONNECT, source, target, str(port)).strip()


def _jumps(ns: str, tool: str) -> list[str]:
    return [r for r in _ns(ns, tool, "-S", "INPUT").splitlines() if "QUDATA-API" in r]


@pytest.mark.parametrize("which", ["ansible role", "cloud-init"])
def test_the_port_answers_only_loopback_and_the_allowed_networks(
    netns: str, tmp_path: Path, which: str
) -> None:
    script = tmp_path / "fw.sh"
    if which == "ansible role":
        script.write_text(_role_script(PORT, ["203.0.113.0/24", "2001:db8:1::/48"]))
    else:
        script.write_text(_cloud_init_script())
    listener = subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-c", LISTEN, str(PORT)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert listener.stdout is not None and listener.stdout.readline().strip() == "listening"
        assert _reach(netns, "192.0.2.5", "192.0.2.5") == "open"  # before: open to all
        _ns(netns, "bash", str(script), "start")
        _ns(netns, "bash", str(script), "start")  # a rerun changes nothing
        assert len(_jumps(netns, "iptables")) == 1
        assert _reach(netns, "127.0.0.1", "127.0.0.1") == "open"
        assert _reach(netns, "203.0.113.5", "192.0.2.5") == "open"
        assert _reach(netns, "192.0.2.5", "192.0.2.5") == "dropped"
        if which == "ansible role":
            assert _reach(netns, "::1", "::1") == "open"
            assert _reach(netns, "2001:db8:1::5", "2001:db8:2::5") == "open"
            assert _reach(netns, "2001:db8:2::5", "2001:db8:2::5") == "dropped"
        _ns(netns, "bash", str(script), "stop")
        assert _jumps(netns, "iptables") == [] and _jumps(netns, "ip6tables") == []
        assert _reach(netns, "192.0.2.5", "192.0.2.5") == "open"
    finally:
        listener.kill()
        listener.wait()


def test_a_new_port_moves_the_rule(netns: str, tmp_path: Path) -> None:
    script = tmp_path / "fw.sh"
    script.write_text(_role_script(PORT, ["203.0.113.0/24"]))
    _ns(netns, "bash", str(script), "start")
    script.write_text(_role_script(2024, ["203.0.113.0/24"]))
    _ns(netns, "bash", str(script), "start")
    (jump,) = _jumps(netns, "iptables")
    assert re.search(r"--dport 2024\b", jump), jump
