"""The agent on the host providers run: Debian 13 in a VM, its own kernel on
cgroup v2, Docker 26, iptables over nftables (tests/support/vm.py).

First the guest's own tests (tests/vm_guest/, run inside the guest against
its dockerd with the agent's test support, timeouts sized for emulation):
limits read back from the cgroup v2 files, a core of its own, a published
port, SSH on busybox and Debian minbase, stats every 3 s, stop and start, the
wall in nftables, kill -9 and the restore; then what the container host's
kernel cannot do: the tunnel on the kernel's WireGuard, an XFS project quota
for volumes, trixie's runsc for the sandbox tier. Last, install.sh runs from
scratch as a provider would, against a recording fake control plane inside
the guest, and `doctor` may fail only on what a VM without a GPU lacks.
"""

from __future__ import annotations

import json
import time

import pytest

from support.vm import AGENT_DIR, VM, guest_pytest

pytestmark = [pytest.mark.docker, pytest.mark.timeout(3600)]

KEY = "qk_test_vm_0123456789"
CP_PORT = 18080


def test_the_essentials_inside_the_guest(vm: VM) -> None:
    """tests/vm_guest/ against the guest's Docker 26: limits in the cgroup v2 files,
    a port, SSH on busybox and Debian minbase, stats, stop/start, the wall, kill -9;
    the kernel's WireGuard, an XFS project quota, trixie's runsc."""
    guest_pytest(vm, "tests/vm_guest")


def test_install_from_scratch_as_a_provider_would(vm: VM) -> None:
    vm.sh(
        f"systemd-run --quiet --unit fake-cp python3 {AGENT_DIR}/tests/support/fake_cp.py"
        f" {CP_PORT} /var/tmp/cp.jsonl && for i in $(seq 100); do"
        f" curl -s -o /dev/null 127.0.0.1:{CP_PORT} && exit 0; sleep 0.2; done; exit 1"
    )
    started = time.monotonic()
    code, out = vm.code(
        f"cd / && bash {AGENT_DIR}/install.sh --api-key-file - --api-url"
        f" http://127.0.0.1:{CP_PORT}/v0 --set QUDATA_ADDRESS=127.0.0.1"
        " --set QUDATA_ADDRESS_LOOKUP_URLS=none",
        timeout=1800,
        stdin=KEY + "\n",
    )
    print(f"install.sh in the VM: {time.monotonic() - started:.0f}s, exit {code}")
    assert code == 0, out[-6000:]
    assert vm.sh("systemctl is-active qudata-agent").strip() == "active"
    calls = [json.loads(line) for line in vm.sh("cat /var/tmp/cp.jsonl").splitlines() if line]
    assert any(c["path"] == "/v0/init" for c in calls), calls[:3]
    report = json.loads(vm.sh("qudata-agent doctor --json || true"))
    print("doctor in the VM:", json.dumps(report["checks"], indent=1)[:6000])
    failed = {c["name"]: c for c in report["checks"] if c["level"] == "fail"}
    # What a small VM without a GPU lacks (its 12 GB disk), and the one real finding on
    # Debian 13's own packages (its runc predates the late-2025 escapes' fixes): each
    # named with its fix; nothing else may fail.
    assert set(failed) <= {"docker disk", "runc version"}, failed
    assert all(c["fix"] for c in failed.values()), failed
    checks = {c["name"]: c["level"] for c in report["checks"]}
    for name in ("tenant firewall", "control plane", "api tls", "instance ssh", "live restore"):
        assert checks.get(name) == "pass", (name, checks.get(name))
