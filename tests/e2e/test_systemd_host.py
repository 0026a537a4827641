"""install.sh, the unit and uninstall.sh on a real systemd: a Debian 12 container booted with
/sbin/init as PID 1 and its own dockerd inside (never this host's).

The container comes from the local image `qudata-test/debian-systemd:12`
(scripts/build-test-images.sh: systemd, dbus, docker.io, iptables, python3-venv
already in it, so nothing but the agent's own Python packages is downloaded).
Where `--privileged` fails (a host without CAP_SYS_RESOURCE to give) it gets
every capability but that one, seccomp and AppArmor unconfined, every device
allowed, /sys/fs/cgroup bound read-write with the host's cgroup namespace
(what systemd in a container needs on cgroup v1 and v2 alike), tmpfs /run, and
an anonymous volume for its /var/lib/docker. The tenant port range is reserved in its network
namespace (`--sysctl`), since /proc/sys is read-only in a container.

A recording fake control plane (tests/support/fake_cp.py, stdlib only) runs
inside the container on its own 127.0.0.1, so no test traffic leaves it. The
tests run in file order against one booted host: install, instance kept
through an agent restart and a Docker restart, journald priorities, an upgrade,
a rollback, a no-op re-run, and last an uninstall that leaves nothing behind.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import qudata_agent

pytestmark = [pytest.mark.docker, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
IMAGE = "qudata-test/debian-systemd:12"
TENANT_IMAGE = "qudata-test/busybox:1"
LABEL = "qudata.test=systemd"
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
KEY = "qk_test_systemd_0123456789"
CP_PORT = 18080
CP_URL = f"http://127.0.0.1:{CP_PORT}/v0"
CP_LOG = "/var/tmp/cp.jsonl"
SECRET = "cp-issued-secret-0001"  # what the fake control plane issues
AGENT = "http://127.0.0.1:1024"
UPGRADE_VERSION = qudata_agent.__version__ + "+upgrade"
INSTALL = (
    "bash /src/install.sh --api-key-file - --api-url " + CP_URL + " --set QUDATA_ADDRESS=127.0.0.1"
    " --set QUDATA_ADDRESS_LOOKUP_URLS=none --set QUDATA_SYNC_INTERVAL=5"
    " --max-concurrent-downloads 6 --registry-mirror http://127.0.0.1:5999"
    " --proxy http://127.0.0.1:3128"  # nothing listens: NO_PROXY must keep the fake CP direct
)


@dataclass
class Host:
    name: str

    def sh(self, script: str, check: bool = True, timeout: float = 300, stdin: str = "") -> str:
        code, out = self.code(script, timeout, stdin)
        if check and code != 0:
            raise AssertionError(f"exit {code}: {script}\n{out}")
        return out

    def code(self, script: str, timeout: float = 300, stdin: str = "") -> tuple[int, str]:
        done = subprocess.run(
            ["docker", "exec", "-i", self.name, "bash", "-c", f"{{ {script} ; }} 2>&1"],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        return done.returncode, done.stdout + done.stderr

    def api(self, method: str, path: str, body: object = None) -> Any:
        data = f"-d '{json.dumps(body)}' -H 'Content-Type: application/json'" if body else ""
        out = self.sh(f"curl -s -X {method} -H 'X-Agent-Secret: {SECRET}' {data} {AGENT}{path}")
        return json.loads(out)

    def main_pid(self) -> str:
        return self.sh("systemctl show -p MainPID --value qudata-agent").strip()

    def cp_calls(self, path: str) -> list[dict[str, Any]]:
        text = self.sh(f"cat {CP_LOG} 2>/dev/null || true")
        calls = [json.loads(line) for line in text.splitlines() if line.strip()]
        return [c for c in calls if c["path"] == "/v0" + path]

    def wait(self, what: str, check: Any, timeout: float = 60) -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = check()
            except (AssertionError, ValueError, KeyError) as e:
                last = e
            else:
                if last:
                    return last
            time.sleep(0.5)
        raise AssertionError(f"{what}: not within {timeout}s (last: {last!r})")


def _copy_repo(dest: Path, version: str | None = None) -> Path:
    ignore = shutil.ignore_patterns(
        ".git", ".venv", "*.egg-info", "__pycache__", ".*_cache", "state", "build", "dist"
    )
    shutil.copytree(REPO, dest, ignore=ignore)
    if version is not None:
        init = dest / "src" / "qudata_agent" / "__init__.py"
        init.write_text(
            re.sub(r'__version__ = ".*"', f'__version__ = "{version}"', init.read_text())
        )
    return dest


def _boot(tmp: Path) -> Host:
    if subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True).returncode:
        raise AssertionError(f"{IMAGE} is missing: run scripts/build-test-images.sh")
    src = _copy_repo(tmp / "src")
    src2 = _copy_repo(tmp / "src2", UPGRADE_VERSION)
    name = f"qudata-test-systemd-{uuid.uuid4().hex[:8]}"
    args = [
        "docker", "run", "-d", "--name", name, "--label", LABEL, "--hostname", "gpu-host",
        "--cap-add", "ALL", "--cap-drop", "SYS_RESOURCE", "--cgroupns", "host",
        "--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined",
        "--device-cgroup-rule", "a *:* rwm",
        "--tmpfs", "/run", "--tmpfs", "/run/lock", "-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw",
        "-v", "/var/lib/docker",
        "--sysctl", "net.ipv4.ip_local_reserved_ports=40000-49999",
        "-v", f"{src}:/src:ro", "-v", f"{src2}:/src2:ro",
        "-v", f"{REPO / 'tests/support/fake_cp.py'}:/opt/fake_cp.py:ro",
    ]  # fmt: skip
    if HOST_CA.is_file():
        args += ["-v", f"{HOST_CA}:/tmp/host-ca.crt:ro", "-e", "PIP_CERT=/tmp/host-ca.crt"]
    subprocess.run([*args, IMAGE], check=True, capture_output=True)
    return Host(name)


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    box = _boot(tmp_path_factory.mktemp("systemd"))
    try:
        # PID 1 makes its bus first; then `--wait` waits for the boot to finish.
        state = box.sh(
            "for i in $(seq 100); do test -S /run/systemd/private && break; sleep 0.1; done;"
            " systemctl is-system-running --wait",
            check=False,
            timeout=120,
        ).strip()
        assert state == "running", box.sh("systemctl --failed --no-pager", check=False)
        box.sh(
            f"systemd-run --quiet --unit fake-cp python3 /opt/fake_cp.py {CP_PORT} {CP_LOG}"
            f" && for i in $(seq 50); do curl -s -o /dev/null 127.0.0.1:{CP_PORT} && exit 0;"
            " sleep 0.1; done; exit 1"
        )
        yield box
    finally:
        subprocess.run(["docker", "rm", "-f", "-v", box.name], capture_output=True, check=False)


@pytest.fixture(scope="module")
def installed(host: Host) -> tuple[Host, str]:
    started = time.monotonic()
    code, output = host.code(f"cd / && PIP_CERT=${{PIP_CERT:-}} {INSTALL}", stdin=KEY + "\n")
    assert code == 0, output
    print(f"first install: {time.monotonic() - started:.1f}s")
    return host, output


def _instance(host: Host) -> dict[str, Any]:
    answer = host.api("GET", "/instances")
    assert answer["ok"], answer
    return dict(answer["data"])


def _container(host: Host) -> dict[str, str]:
    out = host.sh(
        "docker ps -a --filter label=qudata.agent_id --format '{{.ID}}' | head -1 | xargs -r"
        " docker inspect -f '{{.Id}} {{.State.Pid}} {{.State.StartedAt}} {{.State.Status}}'"
    ).split()
    assert len(out) == 4, out
    return dict(zip(("id", "pid", "started", "status"), out, strict=True))


# -- the first install ----------------------------------------------------------------------


def test_the_service_runs_under_systemd_and_registers(installed: tuple[Host, str]) -> None:
    host, output = installed
    assert KEY not in output
    assert host.sh("systemctl is-active qudata-agent").strip() == "active"
    assert host.sh("systemctl is-enabled qudata-agent").strip() == "enabled"
    props = host.sh("systemctl show -p Type -p NotifyAccess -p WatchdogUSec -p Wants qudata-agent")
    assert "Type=notify" in props and "NotifyAccess=main" in props, props
    assert "WatchdogUSec=1min" in props and "docker.service" in props, props
    # Active under Type=notify means the agent said READY=1 once its API listened.
    assert json.loads(host.sh(f"curl -s {AGENT}/ping"))["ok"] is True
    init = host.cp_calls("/init")
    assert init, host.sh("journalctl -u qudata-agent -n 30 --no-pager")
    headers = {k.lower(): v for k, v in init[0]["headers"].items()}
    assert headers.get("x-api-key") == KEY
    host.wait("inventory sent", lambda: host.cp_calls("/init/host"))
    # One copy of the key: the agent's own key file, not agent.env, not the unit.
    found = host.sh(f"grep -rlF -- '{KEY}' /etc /opt /var/lib/qudata-agent /run || true").split()
    assert found == ["/var/lib/qudata-agent/api_key"], found
    assert host.sh("stat -c %a /var/lib/qudata-agent/api_key").strip() == "600"
    assert host.sh("stat -c %a /var/log/qudata-agent").strip() == "700"  # LogsDirectory=
    env = host.sh("cat /etc/qudata-agent/agent.env")
    assert "QUDATA_AGENT_PORT=1024\n" in env and "QUDATA_ADDRESS_LOOKUP_URLS=none\n" in env
    # Docker's daemon.json: live-restore and the pull settings merged in.
    daemon = json.loads(host.sh("cat /etc/docker/daemon.json"))
    assert daemon["live-restore"] is True and daemon["max-concurrent-downloads"] == 6
    assert daemon["registry-mirrors"] == ["http://127.0.0.1:5999"]
    info = host.sh(
        "docker info --format '{{.LiveRestoreEnabled}} {{json .RegistryConfig.Mirrors}}'"
    )
    assert info.split()[0] == "true" and "127.0.0.1:5999" in info, info
    # The proxy reaches the agent's environment (the unit's EnvironmentFile), loopback exempt.
    environ = host.sh(f"tr '\\0' '\\n' < /proc/{host.main_pid()}/environ").splitlines()
    assert "HTTPS_PROXY=http://127.0.0.1:3128" in environ, environ
    assert any(v.startswith("NO_PROXY=localhost,127.0.0.1") for v in environ), environ
    assert host.sh("stat -c %a /etc/qudata-agent/proxy.env").strip() == "600"
    # Docker's packages held; the port range reserved for good (sysctl.d).
    assert "docker.io" in host.sh("apt-mark showhold").split()
    sysctl = host.sh("cat /etc/sysctl.d/60-qudata-agent.conf")
    assert "net.ipv4.ip_local_reserved_ports = 40000-49999" in sysctl


def test_doctor_reports_live_restore_and_the_pull_settings(installed: tuple[Host, str]) -> None:
    host, _ = installed
    _, text = host.code("qudata-agent doctor")
    report = json.loads(host.sh("qudata-agent doctor --json || true"))
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["live restore"]["level"] == "pass", text
    assert "max-concurrent-downloads 6" in checks["pulls"]["detail"], text
    assert "http://127.0.0.1:5999" in checks["pulls"]["detail"], text
    assert checks["ephemeral ports"]["level"] == "pass", text
    assert checks["control plane"]["level"] == "pass", text
    assert "authenticated call" in checks["control plane"]["detail"], text
    assert "clock skew" in checks["control plane"]["detail"], text
    assert "GiB free on /var/lib/docker" in checks["docker disk"]["detail"], text
    assert checks["tenant firewall"]["level"] == "pass", text  # the agent's own plan, in place
    assert "runc version" in checks and "kernel version" in checks, text


def test_an_instance_is_kept_through_agent_and_docker_restarts(installed: tuple[Host, str]) -> None:
    host, _ = installed
    image = subprocess.run(["docker", "save", TENANT_IMAGE], capture_output=True, check=True)
    subprocess.run(
        ["docker", "exec", "-i", host.name, "docker", "load"],
        input=image.stdout,
        capture_output=True,
        check=True,
    )
    body = {
        "image": TENANT_IMAGE,
        "env_variables": {},
        "ports": {"8080": "auto"},
        "command": "sleep 100000",
        "ssh_enabled": False,
    }
    created = host.api("POST", "/instances", body)
    assert created["ok"], created
    host.wait("instance running", lambda: _instance(host)["status"] == "running")
    before = _container(host)
    instance_id = _instance(host)["instance_id"]
    # The hardened unit still lets the agent wall tenants off (iptables).
    rules = host.sh("iptables -S")
    assert "-N QUDATA-EGRESS" in rules and "-N QUDATA-HOST" in rules, rules

    # The agent restarts: the tenant's container is untouched and adopted.
    agent_pid = host.main_pid()
    host.sh("systemctl restart qudata-agent")
    assert host.main_pid() != agent_pid
    host.wait("instance adopted", lambda: _instance(host)["status"] == "running")
    assert _instance(host)["instance_id"] == instance_id
    assert _container(host) == before

    # Docker restarts: live-restore keeps the container's process; the agent rides it out.
    agent_pid = host.main_pid()
    host.sh("systemctl restart docker")
    assert _container(host) == before
    assert host.sh("systemctl is-active qudata-agent").strip() == "active"
    assert host.main_pid() == agent_pid  # Wants=, not Requires=: not restarted with Docker
    host.wait("instance running after Docker", lambda: _instance(host)["status"] == "running")


def test_at_boot_the_wall_goes_in_before_docker_without_the_agent(
    installed: tuple[Host, str],
) -> None:
    """What a reboot does, step by step: no rules, Docker restarting the tenant by itself."""
    host, _ = installed
    assert host.sh("systemctl is-enabled qudata-agent-firewall").strip() == "enabled"
    assert "docker.service" in host.sh("systemctl show -p Before qudata-agent-firewall")
    host.sh("systemd-run --quiet --unit t19-listener python3 -m http.server 18999")
    tenant = _container(host)["id"]
    gateway = host.sh(
        f"docker inspect -f '{{{{.NetworkSettings.Networks.qudata.Gateway}}}}' {tenant}"
    ).strip()
    probe = (
        f'docker exec {tenant} sh -c \'printf "GET / HTTP/1.0\\r\\n\\r\\n"'
        f" | nc -w 2 {gateway} 18999' | grep -q 'HTTP/1.0 200'"
    )
    host.wait("the host service up", lambda: host.code("curl -sf 127.0.0.1:18999/")[0] == 0)
    assert host.code(probe)[0] != 0  # walled off
    # The rules as a boot leaves them (none): the tenant gets through; the probe can fail.
    host.sh(
        "systemctl stop qudata-agent qudata-agent-firewall"
        " && iptables -D DOCKER-USER -i qudata0 -j QUDATA-EGRESS"
        " && iptables -D INPUT -i qudata0 -j QUDATA-HOST"
        " && for c in QUDATA-EGRESS QUDATA-HOST; do iptables -F $c && iptables -X $c; done"
    )
    assert host.code(probe)[0] == 0
    # Docker goes down, the tenant's process dies; Docker comes back without the agent.
    pid = _container(host)["pid"]
    host.sh(f"systemctl stop docker.socket docker && kill -9 {pid}")
    host.sh("systemctl start docker")
    host.wait("Docker restarted the tenant", lambda: _container(host)["status"] == "running")
    assert _container(host)["pid"] != pid
    assert host.code("systemctl is-active qudata-agent")[1].strip() == "inactive"
    fw = host.sh("systemctl show -p ActiveEnterTimestampMonotonic --value qudata-agent-firewall")
    docker = host.sh("systemctl show -p ExecMainStartTimestampMonotonic --value docker")
    assert 0 < int(fw) <= int(docker), (fw, docker)
    # Docker kept the jump the unit put in its DOCKER-USER chain before it started.
    host.sh(
        "iptables -C DOCKER-USER -i qudata0 -j QUDATA-EGRESS && iptables -C FORWARD -j DOCKER-USER"
    )
    assert host.code(probe)[0] != 0
    host.sh("systemctl stop t19-listener && systemctl start qudata-agent")
    host.wait("instance running again", lambda: _instance(host)["status"] == "running")


def test_a_volume_is_mounted_where_docker_sees_it(installed: tuple[Host, str]) -> None:
    """The unit's own mount namespace: a volume is still mounted in the host's (through
    systemd-run), so the host's dockerd binds what the agent made, and a write past the
    size fails there with ENOSPC."""
    host, _ = installed
    # What a container lacks and a real host has: loop devices in /dev, and / shared
    # (systemd makes it so when the kernel starts it, not in a container); the agent's
    # namespace, a slave of the host's, then sees the mounts made in the host's.
    host.sh(
        "test -e /dev/loop-control || mknod /dev/loop-control c 10 237;"
        " for i in $(seq 0 63); do test -e /dev/loop$i || mknod /dev/loop$i b 7 $i; done;"
        " mount --make-rshared / && systemctl restart qudata-agent"
    )
    host.wait("agent back", lambda: host.api("GET", "/v1/volumes")["ok"])
    made = host.api("POST", "/v1/volumes", {"size_gb": 0.05})
    assert made["ok"], made
    volume_id = made["data"]["volume_id"]
    data = f"/var/lib/qudata-agent/volumes/{volume_id}/mnt/data"
    out = host.sh(
        f"docker run --rm --mount type=bind,source={data},target=/v {TENANT_IMAGE}"
        " sh -c 'echo kept > /v/f; dd if=/dev/zero of=/v/fill bs=1M count=80 2>&1; echo rc=$?'"
    )
    assert "No space left on device" in out and "rc=0" not in out, out
    assert host.sh(f"cat {data}/f").strip() == "kept"
    assert host.api("DELETE", f"/v1/volumes/{volume_id}")["ok"]
    assert host.sh(f"test -e /var/lib/qudata-agent/volumes/{volume_id} || echo gone") == "gone\n"


def test_the_watchdog_is_pinged_and_a_wedged_agent_is_restarted(
    installed: tuple[Host, str],
) -> None:
    host, _ = installed
    dropin = "/etc/systemd/system/qudata-agent.service.d"
    host.sh(
        f"mkdir -p {dropin} && printf '[Service]\\nWatchdogSec=2\\n' > {dropin}/test.conf"
        " && systemctl daemon-reload && systemctl restart qudata-agent"
    )
    try:

        def last_ping() -> int:
            out = host.sh("systemctl show -p WatchdogTimestampMonotonic --value qudata-agent")
            return int(out.strip() or 0)

        first = host.wait("a watchdog ping", last_ping)
        host.wait("another ping", lambda: last_ping() > first, timeout=10)
        # A wedged event loop (the process stopped) sends no ping: systemd restarts it.
        pid = host.main_pid()
        host.sh(f"kill -STOP {pid}")
        host.wait(
            "restart by the watchdog",
            lambda: (
                host.main_pid() not in (pid, "0")
                and host.sh("systemctl is-active qudata-agent || true").strip() == "active"
            ),
            timeout=30,
        )
        log = host.sh("journalctl -u qudata-agent --no-pager -o cat")
        assert "Watchdog timeout" in log, log[-2000:]
    finally:
        host.sh(f"rm -rf {dropin} && systemctl daemon-reload && systemctl restart qudata-agent")
    assert host.sh("systemctl show -p WatchdogUSec --value qudata-agent").strip() == "1min"
    host.wait("instance after the watchdog", lambda: _instance(host)["status"] == "running")


def test_journald_keeps_the_agents_priorities(installed: tuple[Host, str]) -> None:
    host, _ = installed
    warnings = host.sh("journalctl -p warning -u qudata-agent -o cat --no-pager")
    infos = host.sh("journalctl -p info..info -u qudata-agent -o cat --no-pager")
    assert '"agent listening"' in infos
    assert '"agent listening"' not in warnings
    agent_lines = [line for line in warnings.splitlines() if line.startswith("{")]
    assert agent_lines, warnings
    assert all(json.loads(line)["level"] in ("warning", "error") for line in agent_lines)
    assert not any(line.startswith("<") for line in infos.splitlines())  # prefix consumed


def test_the_security_exposure_of_the_unit(installed: tuple[Host, str]) -> None:
    host, _ = installed
    report = host.sh("systemd-analyze security --no-pager qudata-agent")
    match = re.search(r"Overall exposure level for qudata-agent.service: ([\d.]+) (\w+)", report)
    assert match, report
    print(f"systemd-analyze security: {match.group(1)} {match.group(2)}")
    assert float(match.group(1)) <= 6.0, report


# -- upgrade, rollback, a run with nothing to do ---------------------------------------------


def test_an_upgrade_backs_up_the_database_and_keeps_the_instance(
    installed: tuple[Host, str],
) -> None:
    host, _ = installed
    before = _container(host)
    venv = host.sh("readlink /opt/qudata-agent/venv").strip()
    pid = host.main_pid()
    started = time.monotonic()
    output = host.sh(INSTALL.replace("/src/", "/src2/").replace(" --api-key-file -", ""))
    print(f"upgrade: {time.monotonic() - started:.1f}s")
    assert "upgrading in place" in output
    assert host.sh("qudata-agent version").strip() == UPGRADE_VERSION
    assert host.sh("readlink /opt/qudata-agent/venv.previous").strip() == venv
    assert host.main_pid() != pid
    assert host.sh("cat /var/lib/qudata-agent/backup/venv").strip() == venv
    tables = host.sh("sqlite3 /var/lib/qudata-agent/backup/agent.db 'SELECT id FROM instances'")
    assert _instance(host)["instance_id"] in tables
    host.wait("instance running after upgrade", lambda: _instance(host)["status"] == "running")
    assert _container(host) == before


def test_a_rollback_goes_back_to_the_previous_venv_and_database(
    installed: tuple[Host, str],
) -> None:
    host, _ = installed
    before = _container(host)
    previous = host.sh("readlink /opt/qudata-agent/venv.previous").strip()
    # As if the upgrade had migrated the schema: the older agent would refuse the database.
    host.sh("sqlite3 /var/lib/qudata-agent/agent.db 'PRAGMA user_version = 99'")
    output = host.sh("bash /src/install.sh --rollback")
    assert "database restored" in output, output
    assert host.sh("readlink /opt/qudata-agent/venv").strip() == previous
    assert host.sh("qudata-agent version").strip() == qudata_agent.__version__
    assert host.sh("sqlite3 /var/lib/qudata-agent/agent.db 'PRAGMA user_version'").strip() != "99"
    assert host.sh("systemctl is-active qudata-agent").strip() == "active"
    host.wait("instance after rollback", lambda: _instance(host)["status"] == "running")
    assert _container(host) == before


def test_a_run_with_nothing_to_change_changes_nothing(installed: tuple[Host, str]) -> None:
    host, _ = installed
    pid = host.main_pid()
    venvs = host.sh("ls /opt/qudata-agent/venvs; readlink /opt/qudata-agent/venv")
    host.sh("touch /tmp/marker && sleep 1.1")
    output = host.sh(INSTALL.replace(" --api-key-file -", ""))
    assert "venv kept" in output and "not restarted" in output, output
    assert "==> done (no change)" in output, output
    assert host.main_pid() == pid
    assert host.sh("ls /opt/qudata-agent/venvs; readlink /opt/qudata-agent/venv") == venvs
    changed = host.sh(
        "find /etc /opt /usr/local -newer /tmp/marker -print; "
        "find /var/lib/qudata-agent -newer /tmp/marker ! -name 'agent.db*' -print"
    ).split()
    assert changed == [], changed


def test_failures_give_exit_codes_automation_can_trust(installed: tuple[Host, str]) -> None:
    host, _ = installed
    code, output = host.code("bash /src/install.sh " + KEY)
    assert code == 2 and "--api-key-file" in output
    code, output = host.code("bash /src/install.sh --frobnicate")
    assert code == 2
    # --strict: a doctor failure fails the run. Here: a port range inside the kernel's
    # ephemeral range that cannot be reserved now (/proc/sys is read-only in here).
    code, output = host.code("bash /src/install.sh --strict --set QUDATA_PORT_RANGE=50000-50999")
    assert code == 4, output
    assert "doctor found a failure" in output
    assert host.sh("systemctl is-active qudata-agent").strip() == "active"
    # A setting the agent refuses: the service does not come up, and the run says so.
    code, output = host.code("bash /src/install.sh --set QUDATA_PORT_RANGE=1000-1100")
    assert code == 3 and "is not active" in output, output
    output = host.sh("bash /src/install.sh --set QUDATA_PORT_RANGE=40000-49999")
    assert host.sh("systemctl is-active qudata-agent").strip() == "active"


# -- uninstall ---------------------------------------------------------------------------------


def test_uninstall_leaves_nothing_behind(installed: tuple[Host, str]) -> None:
    """Runs last."""
    host, _ = installed
    host.sh("bash /opt/qudata-agent/uninstall.sh --all")
    assert host.code("systemctl cat qudata-agent")[0] != 0
    assert host.sh("systemctl list-units --all --no-legend 'qudata*'").strip() == ""
    assert host.sh("docker ps -aq --filter label=qudata.agent_id").strip() == ""
    assert host.sh("docker network ls -q --filter label=qudata.agent_id").strip() == ""
    assert "QUDATA" not in host.sh("iptables -S")
    left = host.sh(
        "find / -xdev \\( -path /proc -o -path /sys -o -path /src -o -path /src2"
        " -o -path /var/lib/docker \\) -prune -o -iname '*qudata*' -print"
    ).split()
    assert left == [], left
    assert host.code("test -e /etc/sysctl.d/60-qudata-agent.conf")[0] == 1


# -- the Ansible role, on the host the uninstall left clean --------------------------------

ROLE_PLAY = f"""
- hosts: qudata_hosts
  gather_facts: false
  vars_files: [/root/qudata-vars.yml]
  roles:
    - role: qudata_agent
      vars:
        qudata_agent_source: /src
        qudata_agent_api_url: {CP_URL}
        qudata_agent_settings:
          QUDATA_ADDRESS: 127.0.0.1
          QUDATA_ADDRESS_LOOKUP_URLS: none
        qudata_agent_max_concurrent_downloads: 4
        # Debian 12's runc carries the runc escapes of November 2025, so doctor fails
        # `runc version` here and --strict would refuse the host (docs/security.md);
        # --strict itself is test_failures_give_exit_codes_automation_can_trust's.
        qudata_agent_strict: false
        qudata_agent_registry_mirrors: [http://127.0.0.1:5998]
        qudata_agent_api_allow: [198.51.100.0/24]
"""


def _play(host: Host) -> tuple[int, str]:
    return host.code(
        "cd /tmp && ANSIBLE_ROLES_PATH=/src/deploy/ansible/roles ANSIBLE_NOCOLOR=1"
        " ansible-playbook -i /root/qudata-inventory.ini /root/qudata-play.yml",
        timeout=600,
    )


def test_the_ansible_role_installs_and_a_second_run_changes_nothing(
    installed: tuple[Host, str],
) -> None:
    """After the uninstall: the role installs from scratch, then converges."""
    host, _ = installed
    code, output = host.code(
        "cd /src/deploy/ansible && ANSIBLE_ROLES_PATH=roles"
        " ansible-playbook -i localhost, --syntax-check site.yml"
    )
    assert code == 0, output
    host.sh(
        "printf '[qudata_hosts]\\nlocalhost ansible_connection=local"
        " ansible_python_interpreter=/usr/bin/python3\\n' > /root/qudata-inventory.ini"
    )
    host.sh(f"umask 077 && echo 'qudata_agent_api_key: {KEY}' > /root/qudata-vars.yml")
    host.sh("cat > /root/qudata-play.yml", stdin=ROLE_PLAY)
    started = time.monotonic()
    code, output = _play(host)
    print(f"ansible role, first run: {time.monotonic() - started:.1f}s")
    assert code == 0, output
    assert re.search(r"localhost\s+: ok=\d+\s+changed=[1-9]\d*\s+unreachable=0\s+failed=0", output)
    assert KEY not in output  # no_log
    assert host.sh("systemctl is-active qudata-agent").strip() == "active"
    assert json.loads(host.sh("cat /etc/docker/daemon.json"))["max-concurrent-downloads"] == 4
    assert "QUDATA_AGENT_PORT=1024" in host.sh("cat /etc/qudata-agent/agent.env")
    # The port is open to loopback and the control plane's networks only (the script's
    # behaviour, packets and all, is tests/e2e/test_port_firewall.py's).
    assert host.sh("systemctl is-active qudata-agent-api-firewall").strip() == "active"
    chain = host.sh("iptables -S QUDATA-API").splitlines()
    assert chain[1:] == [
        "-A QUDATA-API -s 127.0.0.0/8 -j ACCEPT",
        "-A QUDATA-API -s 198.51.100.0/24 -j ACCEPT",
        "-A QUDATA-API -j DROP",
    ], chain
    assert "--dport 1024 -j QUDATA-API" in host.sh("iptables -S INPUT")
    assert host.api("GET", "/v1/host")["ok"] is True  # loopback still served
    # Everywhere, the journal included, but the fake control plane's own recording.
    found = host.sh(
        f"grep -rlF --exclude=cp.jsonl -- '{KEY}' /etc /opt /var /root /run /tmp || true"
    ).split()
    assert sorted(found) == ["/root/qudata-vars.yml", "/var/lib/qudata-agent/api_key"], found

    pid = host.main_pid()
    code, output = _play(host)
    assert code == 0, output
    assert re.search(r"localhost\s+: ok=\d+\s+changed=0\s+unreachable=0\s+failed=0", output), output
    assert host.main_pid() == pid
