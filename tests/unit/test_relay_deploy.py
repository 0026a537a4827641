"""deploy/relay: the Ansible role runs the same relay.sh, with options relay.sh knows;
relay.sh refuses a bad hosts list before it changes anything."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

RELAY = Path(__file__).resolve().parents[2] / "deploy" / "relay"
ROLE = RELAY / "ansible" / "roles" / "qudata_relay"
KEY_A = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
KEY_B = "kJ3dFQ0bWm8W4KcA5x2Vz0q9R1yXo7uQe6tY3sLp4Hc="


def test_the_role_copies_relay_sh_and_calls_it_with_options_it_knows() -> None:
    tasks = yaml.safe_load((ROLE / "tasks" / "main.yml").read_text())
    copy = next(t for t in tasks if t.get("name") == "relay.sh")["ansible.builtin.copy"]
    assert (ROLE / copy["src"].replace("{{ role_path }}/", "")).resolve() == RELAY / "relay.sh"
    for name in ("defaults", "handlers", "meta"):
        assert yaml.safe_load((ROLE / name / "main.yml").read_text())
    yaml.safe_load((RELAY / "ansible" / "relay.yml").read_text())
    unit = (ROLE / "templates" / "qudata-relay.service.j2").read_text()
    script = (RELAY / "relay.sh").read_text()
    used = set(re.findall(r" (--[a-z-]+)", unit))
    assert used >= {"--hosts", "--public-address", "--down"}
    for option in used:
        assert f"    {option})" in script, option


@pytest.mark.parametrize(
    ("hosts", "problem"),
    [
        (f"{KEY_A} 10.77.0.2 40000-40999\n{KEY_B} 10.77.0.3 40500-41500\n", "overlaps"),
        (f"{KEY_A} 10.77.0.2 40000-40999\n{KEY_A} 10.77.0.3 41000-41999\n", "key listed twice"),
        ("not-a-key 10.77.0.2 40000-40999\n", "not a WireGuard public key"),
        (f"{KEY_A} 10.77.0.2; 40000-40999\n", "not an IPv4 address"),
        (f"{KEY_A} 10.77.0.2 40000\n", "port block"),
    ],
)
def test_relay_sh_refuses_a_bad_hosts_list_and_changes_nothing(
    tmp_path: Path, hosts: str, problem: str
) -> None:
    (tmp_path / "hosts").write_text("# comment\n\n" + hosts)
    done = subprocess.run(
        ["bash", str(RELAY / "relay.sh"), "--hosts", str(tmp_path / "hosts"),
         "--public-address", "198.51.100.1", "--key-dir", str(tmp_path / "keys"),
         "--interface", "t22-never"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 1 and problem in done.stderr, done.stderr
    assert not (tmp_path / "keys").exists()
