"""install.sh and uninstall.sh, run for real inside Debian 12 containers (never on this host).

Each container comes from the local image `qudata-test/debian:12` (apt, the
Debian mirror, nothing else), with a copy of the repository mounted read-only
at /src. systemd does not run there, so install.sh must say so, write the
unit and not start it; no NVIDIA device is on the (fake, empty) PCI bus, so no
NVIDIA step runs. install.sh installs docker.io for real (dockerd is not
started: no systemd) and the agent from PyPI into its venv; pip is given the
host's CA bundle, so a TLS-intercepting proxy the host trusts works here too.

The tests of the installed container run in file order: the last one
uninstalls.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import qudata_agent

pytestmark = [pytest.mark.docker, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
IMAGE = "qudata-test/debian:12"
LABEL = "qudata.test=install"
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
KEY = "qk_test_0123456789abcdef"
NEW_KEY = "qk_test_fedcba9876543210"
# The keys reach install.sh in files (a key is never an argument of a command).
WITH_KEY = "--api-key-file /tmp/key"
WITH_NEW_KEY = "--api-key-file /tmp/new-key"
KEY_FILE = "/var/lib/qudata-agent/api_key"
CP_URL = "http://127.0.0.1:9"  # nothing listens: doctor's control-plane check fails fast
FAKE_BUS = "/tmp/fake-pci"  # QUDATA_INSTALL_PCI_DEVICES: an empty bus unless a test adds a GPU
ENV_FILE = "/etc/qudata-agent/agent.env"
UNIT_FILE = "/etc/systemd/system/qudata-agent.service"
# What a dry run may not touch: everything outside the kernel's and the scratch trees.
CHANGED_SINCE = (
    "find / -xdev \\( -path /proc -o -path /sys -o -path /dev -o -path /run -o -path /tmp \\)"
    " -prune -o -newer /tmp/marker -print"
)


@dataclass
class Box:
    name: str

    def sh(self, script: str, check: bool = True, timeout: float = 300) -> str:
        """Runs `script` with bash in the container; stdout and stderr together."""
        done = subprocess.run(
            ["docker", "exec", self.name, "bash", "-c", f"{{ {script} ; }} 2>&1"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"exit {done.returncode}: {script}\n{done.stdout}{done.stderr}")
        return done.stdout

    def code(self, script: str, timeout: float = 300) -> tuple[int, str]:
        done = subprocess.run(
            ["docker", "exec", self.name, "bash", "-c", f"{{ {script} ; }} 2>&1"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        return done.returncode, done.stdout

    def install(self, *args: str) -> str:
        return self.sh(
            f"cd / && QUDATA_INSTALL_PCI_DEVICES={FAKE_BUS} bash /src/install.sh {' '.join(args)}"
        )

    def unchanged_by(self, script: str) -> str:
        """Runs `script`; returns its output after checking that no file changed."""
        self.sh("touch /tmp/marker && sleep 1.1")
        output = self.sh(script)
        changed = self.sh(CHANGED_SINCE).split()
        assert changed == [], f"{script} changed {changed}\n{output}"
        return output


def _copy_repo(dest: Path) -> Path:
    ignore = shutil.ignore_patterns(
        ".git", ".venv", "*.egg-info", "__pycache__", ".*_cache", "state", "build", "dist"
    )
    shutil.copytree(REPO, dest, ignore=ignore)
    return dest


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _copy_repo(tmp_path_factory.mktemp("install") / "src")


def _start_box(source: Path) -> Box:
    name = f"qudata-test-install-{uuid.uuid4().hex[:8]}"
    args = ["docker", "run", "-d", "--name", name, "--label", LABEL, "-v", f"{source}:/src:ro"]
    if HOST_CA.is_file():
        args += ["-v", f"{HOST_CA}:/tmp/host-ca.crt:ro", "-e", "PIP_CERT=/tmp/host-ca.crt"]
    subprocess.run([*args, IMAGE, "sleep", "infinity"], check=True, capture_output=True)
    box = Box(name)
    box.sh(f"mkdir -p {FAKE_BUS} && echo {KEY} > /tmp/key && echo {NEW_KEY} > /tmp/new-key")
    return box


@pytest.fixture(scope="module")
def fresh(source: Path) -> Iterator[Box]:
    """A container nothing was installed in (only dry runs happen here)."""
    box = _start_box(source)
    yield box
    subprocess.run(["docker", "rm", "-f", box.name], capture_output=True, check=False)


@pytest.fixture(scope="module")
def installed(source: Path) -> Iterator[tuple[Box, str]]:
    """A container after one real `install.sh --api-key-file FILE`, and what it printed."""
    box = _start_box(source)
    try:
        yield box, box.install("--api-url", CP_URL, WITH_KEY)
    finally:
        subprocess.run(["docker", "rm", "-f", box.name], capture_output=True, check=False)


# -- dry runs and refusals on a fresh host ------------------------------------------------


def test_a_dry_run_prints_every_step_and_changes_nothing(fresh: Box) -> None:
    output = fresh.unchanged_by(
        f"QUDATA_INSTALL_PCI_DEVICES={FAKE_BUS} bash /src/install.sh --dry-run {WITH_KEY}"
    )
    for step in (
        "would run: apt-get install -y -qq -o Dpkg::Use-Pty=0 --no-install-recommends "
        "python3 python3-venv",
        "would run: apt-get install -y -qq -o Dpkg::Use-Pty=0 --no-install-recommends docker.io",
        "would run: apt-get install -y -qq -o Dpkg::Use-Pty=0 --no-install-recommends "
        "openssh-server patchelf busybox-static",
        "would create the venv /opt/qudata-agent/venvs/",
        f"would write {ENV_FILE} with QUDATA_STATE_DIR=/var/lib/qudata-agent and"
        " QUDATA_AGENT_PORT=1024",
        f"would write the API key to {KEY_FILE} (0600)",
        "would merge live-restore into /etc/docker/daemon.json",
        "would run: install -d -m 0700 /var/lib/qudata-agent",
        f"would write {UNIT_FILE} (mode 0644, no API key in it)",
        "systemd is not running here",
        "done (dry run: nothing was changed)",
    ):
        assert step in output, output
    assert KEY not in output
    assert "no NVIDIA GPU on the PCI bus" in output
    assert "nvidia-ctk" not in output and "NVIDIA's apt repository" not in output
    assert fresh.code("test -e /opt/qudata-agent || test -e /etc/qudata-agent")[0] == 1


def test_a_dry_run_with_the_sandbox_installs_runsc_and_registers_it(fresh: Box) -> None:
    output = fresh.unchanged_by(
        f"QUDATA_INSTALL_PCI_DEVICES={FAKE_BUS} bash /src/install.sh --dry-run --sandbox {WITH_KEY}"
    )
    apt = [line for line in output.splitlines() if "would run: apt-get install" in line]
    assert any(line.endswith(" runsc") for line in apt), output
    gpu = fresh.unchanged_by(
        f"QUDATA_INSTALL_PCI_DEVICES={FAKE_BUS} bash /src/install.sh --dry-run --sandbox-gpu"
        f" {WITH_KEY}"
    )
    assert "check its SHA-512 and install it as /usr/local/bin/runsc" in gpu, gpu


def test_a_dry_run_on_a_gpu_host_shows_the_driver_and_toolkit_steps(fresh: Box) -> None:
    bus = "/tmp/gpu-bus/0000:65:00.0"
    fresh.sh(f"mkdir -p {bus} && echo 0x10de > {bus}/vendor && echo 0x030200 > {bus}/class")
    output = fresh.unchanged_by(
        "QUDATA_INSTALL_PCI_DEVICES=/tmp/gpu-bus bash /src/install.sh --dry-run --install-driver "
        + WITH_KEY
    )
    assert "1 NVIDIA GPU(s) on the PCI bus" in output
    assert "nvidia-driver" in output and "reboot" in output
    assert "would add NVIDIA's apt repository" in output
    assert "nvidia-container-toolkit" in output
    assert "would run: nvidia-ctk runtime configure --runtime=docker" in output
    # Without --install-driver the driver is only checked, never installed.
    output = fresh.sh(
        f"QUDATA_INSTALL_PCI_DEVICES=/tmp/gpu-bus bash /src/install.sh --dry-run {WITH_KEY}"
    )
    assert "no working NVIDIA driver" in output and "--install-driver" in output
    assert "nvidia-driver " not in output


FAKE_SMI = (
    "mkdir -p /tmp/fake-bin && printf '#!/bin/sh\\n"
    'case "$*" in *driver_version*) echo 550.54.15;; *) echo "GPU 0: NVIDIA H100";; esac\\n'
    "' > /tmp/fake-bin/nvidia-smi && chmod +x /tmp/fake-bin/nvidia-smi"
)


def _hgx_bus(box: Box) -> str:
    """A fake HGX board: one GPU and one NVSwitch (class 0x0680) of vendor 10de."""
    bus = "/tmp/hgx-bus"
    for dev, klass in (("0000:18:00.0", "0x030200"), ("0000:05:00.0", "0x068000")):
        box.sh(f"mkdir -p {bus}/{dev} && echo 0x10de > {bus}/{dev}/vendor")
        box.sh(f"echo {klass} > {bus}/{dev}/class")
    return bus


def test_an_nvswitch_host_gets_fabric_manager_at_the_drivers_version(fresh: Box) -> None:
    bus = _hgx_bus(fresh)
    fresh.sh(FAKE_SMI)
    output = fresh.unchanged_by(
        f"PATH=/tmp/fake-bin:$PATH QUDATA_INSTALL_PCI_DEVICES={bus} bash /src/install.sh"
        f" --dry-run {WITH_KEY}"
    )
    assert "1 NVIDIA GPU(s) on the PCI bus" in output and "driver 550.54.15 works" in output
    assert "1 NVSwitch(es) on the PCI bus (HGX/DGX)" in output
    assert "nvidia-fabricmanager=550.54.15-1" in output
    # Without a working driver there is no version to match: said, and left for later.
    output = fresh.sh(f"QUDATA_INSTALL_PCI_DEVICES={bus} bash /src/install.sh --dry-run {WITH_KEY}")
    assert "nvidia-fabricmanager is installed once there is one" in output


def test_on_ubuntu_the_driver_is_the_server_branch(fresh: Box) -> None:
    fresh.sh("cp /etc/os-release /tmp/os-release.debian")
    try:
        fresh.sh("printf 'ID=ubuntu\\nVERSION_ID=\"24.04\"\\n' > /etc/os-release")
        bus = "/tmp/gpu-bus/0000:65:00.0"
        fresh.sh(f"mkdir -p {bus} && echo 0x10de > {bus}/vendor && echo 0x030200 > {bus}/class")
        output = fresh.sh(
            "QUDATA_INSTALL_PCI_DEVICES=/tmp/gpu-bus bash /src/install.sh --dry-run"
            f" --install-driver {WITH_KEY}"
        )
        assert "would run: ubuntu-drivers install --gpgpu" in output
    finally:
        fresh.sh("cp /tmp/os-release.debian /etc/os-release")


def test_debian_13_is_supported_with_its_own_codename_and_debian_11_is_not(fresh: Box) -> None:
    fresh.sh("cp /etc/os-release /tmp/os-release.debian")
    try:
        fresh.sh(
            "printf 'ID=debian\\nVERSION_ID=\"13\"\\nVERSION_CODENAME=trixie\\n' > /etc/os-release"
        )
        bus = "/tmp/gpu-bus13/0000:65:00.0"
        fresh.sh(f"mkdir -p {bus} && echo 0x10de > {bus}/vendor && echo 0x030200 > {bus}/class")
        output = fresh.sh(
            "QUDATA_INSTALL_PCI_DEVICES=/tmp/gpu-bus13 bash /src/install.sh --dry-run"
            f" --install-driver {WITH_KEY}"
        )
        assert "installing the QuData host agent on debian 13" in output, output
        assert "(trixie contrib non-free non-free-firmware)" in output, output
        fresh.sh("printf 'ID=debian\\nVERSION_ID=\"11\"\\n' > /etc/os-release")
        code, output = fresh.code(f"bash /src/install.sh --dry-run {WITH_KEY}")
        assert code == 1 and "unsupported system 'debian 11'" in output, output
    finally:
        fresh.sh("cp /tmp/os-release.debian /etc/os-release")


def test_the_first_install_needs_a_key_and_a_source(fresh: Box) -> None:
    code, output = fresh.code("bash /src/install.sh --dry-run")
    assert code == 2 and "the first install needs the API key" in output
    # Piped into bash (curl | bash) there is no checkout to install from ...
    code, output = fresh.code(f"cd / && bash -s -- --dry-run {WITH_KEY} < /src/install.sh")
    assert code == 1 and "--source DIR|TARBALL|URL" in output
    # ... unless --source names one: a directory or a tarball.
    output = fresh.unchanged_by(
        f"cd / && bash -s -- --dry-run --source /src {WITH_KEY} < /src/install.sh"
    )
    assert f"qudata-agent {qudata_agent.__version__} from /src" in output
    fresh.sh("tar -C / -czf /tmp/agent.tar.gz src")
    output = fresh.sh(
        f"bash -s -- --dry-run --source /tmp/agent.tar.gz {WITH_KEY} < /src/install.sh"
    )
    assert re.search(r"qudata-agent \S+ from /tmp/qudata-install\.\w+/source/src", output), output


def test_a_bad_key_or_option_is_refused(fresh: Box) -> None:
    code, output = fresh.code(
        "echo 'key with spaces' > /tmp/bad-key && bash /src/install.sh --dry-run"
        " --api-key-file /tmp/bad-key"
    )
    assert code == 2 and "API key" in output and "key with spaces" not in output
    code, output = fresh.code(f"bash /src/install.sh --dry-run --frobnicate {WITH_KEY}")
    assert code == 2 and "unknown option --frobnicate" in output
    # A key on the command line (ps shows it) is refused, and not echoed.
    code, output = fresh.code(f"bash /src/install.sh --dry-run {KEY}")
    assert code == 2 and "--api-key-file" in output and KEY not in output
    # From standard input: the key never appears in any process's arguments.
    code, output = fresh.code(
        f"bash /src/install.sh --dry-run --api-key-file - < /tmp/key & "
        # The pattern is the key with its last letter in brackets: this shell's own
        # command line and grep's hold the pattern, never the key itself.
        f"for i in $(seq 40); do grep -ls '{KEY[:-1]}[{KEY[-1]}]' /proc/[0-9]*/cmdline;"
        " sleep 0.05; done; wait"
    )
    assert KEY not in output and "/cmdline" not in output, output


def test_a_dry_run_in_tunnel_mode_installs_wireguard_and_writes_its_settings(fresh: Box) -> None:
    relay_key = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
    spec = f"relay.example.com:51820,{relay_key},10.77.0.2/24,198.51.100.1"
    output = fresh.unchanged_by(
        f"QUDATA_INSTALL_PCI_DEVICES={FAKE_BUS} bash /src/install.sh --dry-run --tunnel {spec}"
        f" --set QUDATA_PORT_RANGE=41000-41999 {WITH_KEY}"
    )
    apt = [line for line in output.splitlines() if "would run: apt-get install" in line]
    assert any("wireguard-tools" in line for line in apt), output
    # This container may not make a WireGuard link: the userspace one is installed.
    assert any(line.endswith(" wireguard-go") for line in apt), output
    # The agent's port is the block's first: the relay forwards only the block.
    assert "QUDATA_AGENT_PORT=41000" in output
    for setting in (
        "QUDATA_TUNNEL=wireguard",
        "QUDATA_TUNNEL_ENDPOINT=relay.example.com:51820",
        f"QUDATA_TUNNEL_RELAY_KEY={relay_key}",
        "QUDATA_TUNNEL_ADDRESS=10.77.0.2/24",
        "QUDATA_TUNNEL_PUBLIC_ADDRESS=198.51.100.1",
    ):
        assert f"would set {setting} in {ENV_FILE}" in output, setting
    code, output = fresh.code(
        f"bash /src/install.sh --dry-run --tunnel relay:1,not-a-key,10.0.0.2/24,1.2.3.4 {WITH_KEY}"
    )
    assert code == 2 and "not a WireGuard key" in output


def test_a_dry_run_with_tls_required_writes_the_setting(fresh: Box) -> None:
    output = fresh.unchanged_by(
        f"QUDATA_INSTALL_PCI_DEVICES={FAKE_BUS} bash /src/install.sh --dry-run --tls required"
        f" {WITH_KEY}"
    )
    assert f"would set QUDATA_TLS=required in {ENV_FILE}" in output, output
    code, output = fresh.code(f"bash /src/install.sh --dry-run --tls maybe {WITH_KEY}")
    assert code == 2 and "--tls: expected on, required or off" in output


# -- a real install, then an upgrade, then an uninstall ------------------------------------


def test_the_first_install(installed: tuple[Box, str]) -> None:
    box, output = installed
    assert KEY not in output
    # No systemd: the unit is written, not started, and the script says so.
    assert "systemd is not running here: qudata-agent.service is not enabled or started" in output
    assert (
        "/opt/qudata-agent/venv/bin/qudata-agent run --config /etc/qudata-agent/agent.env" in output
    )
    assert "this script does not start dockerd" in output
    assert "ok installed" in box.sh("dpkg-query -W -f='${Status}' docker.io")
    # No GPU: no NVIDIA step.
    assert "no NVIDIA GPU on the PCI bus" in output
    assert "nvidia-ctk" not in output and "nvidia-container-toolkit" not in output
    assert box.code("test -e /etc/apt/sources.list.d/nvidia-container-toolkit.list")[0] == 1
    # The agent, in its own venv, never in the system Python.
    assert box.sh("/opt/qudata-agent/venv/bin/qudata-agent version").strip() == (
        qudata_agent.__version__
    )
    assert box.sh("readlink /opt/qudata-agent/venv").startswith("venvs/")
    assert box.sh("qudata-agent version").strip() == qudata_agent.__version__  # the link
    assert box.code("python3 -c 'import qudata_agent'")[0] == 1
    # The configuration: private, with the key.
    assert box.sh(f"stat -c '%a %U' {ENV_FILE} /etc/qudata-agent").split() == [
        "600", "root", "700", "root"
    ]  # fmt: skip
    env = box.sh(f"cat {ENV_FILE}")
    assert "QUDATA_API_KEY" not in env and f"QUDATA_API_URL={CP_URL}\n" in env
    assert "QUDATA_AGENT_PORT=1024\n" in env  # fixed: firewall rules can name it
    # One copy of the key on the host: the agent's own key file.
    assert box.sh(f"cat {KEY_FILE}").strip() == KEY
    assert box.sh(f"stat -c %a {KEY_FILE}").strip() == "600"
    found = box.sh(f"grep -rlF {KEY} /etc /opt /var/lib /usr/local /root || true").split()
    assert found == [KEY_FILE], found
    daemon = json.loads(box.sh("cat /etc/docker/daemon.json"))
    assert daemon == {"live-restore": True}
    # The tenant range overlaps the kernel's ephemeral one (32768-60999): reserved for good.
    assert "net.ipv4.ip_local_reserved_ports = 40000-49999" in box.sh(
        "cat /etc/sysctl.d/60-qudata-agent.conf"
    )
    assert box.sh("stat -c %a /var/lib/qudata-agent").strip() == "700"
    # The unit: world-readable, no key, restarts always, bound to Docker.
    unit = box.sh(f"cat {UNIT_FILE}")
    assert box.sh(f"stat -c %a {UNIT_FILE}").strip() == "644"
    assert KEY not in unit and "QUDATA_API_KEY" not in unit
    lines = unit.splitlines()
    assert "Restart=always" in lines
    assert "Wants=network-online.target docker.service" in lines
    assert "Requires=docker.service" not in lines
    assert "Type=notify" in lines
    assert f"ExecStart=/opt/qudata-agent/venv/bin/qudata-agent run --config {ENV_FILE}" in lines
    assert "@PREFIX@" not in unit and "@ENV_FILE@" not in unit and "@STATE_DIR@" not in unit
    assert "ReadWritePaths=/var/lib/qudata-agent -/run" in lines
    # Docker's packages are held from unattended upgrades.
    assert "hold ok installed" in box.sh("dpkg-query -W -f='${Status}' docker.io")
    # It ended with the doctor's table.
    assert "host NOT ready" in output and "docker" in output


def _agent_id(box: Box) -> str:
    return box.sh(
        "/opt/qudata-agent/venv/bin/python -c 'from pathlib import Path;"
        " from qudata_agent.adapters.store import Store;"
        ' s = Store.open(Path("/var/lib/qudata-agent/agent.db"));'
        ' print(s.get_or_create("agent_id", lambda: "id-made-by-the-first-agent"))\''
    ).strip()


def test_a_second_run_upgrades_in_place_and_keeps_identity_secrets_and_config(
    installed: tuple[Box, str],
) -> None:
    box, _ = installed
    # What a first start of the agent leaves behind: its identity and its secret.
    assert _agent_id(box) == "id-made-by-the-first-agent"
    box.sh("umask 077 && echo secret-of-the-first-agent > /var/lib/qudata-agent/agent_secret")
    env_before = box.sh(f"sha256sum {ENV_FILE}")
    unit_before = box.sh(f"sha256sum {UNIT_FILE}")
    venv_before = box.sh("readlink /opt/qudata-agent/venv").strip()

    output = box.install()  # no key: the kept one stays; the same source: the same venv
    assert "venv kept" in output and "kept as it is" in output and "API key kept" in output
    assert _agent_id(box) == "id-made-by-the-first-agent"
    assert box.sh("cat /var/lib/qudata-agent/agent_secret").strip() == "secret-of-the-first-agent"
    assert box.sh(f"sha256sum {ENV_FILE}") == env_before
    assert box.sh(f"sha256sum {UNIT_FILE}") == unit_before
    assert box.sh("readlink /opt/qudata-agent/venv").strip() == venv_before
    # status reads the kept state, and says the agent is down.
    code, status = box.code("qudata-agent status")
    assert code == 3 and "NOT running" in status and "agent id id-made-by-the-first-agent" in status

    # A new version with a new key: a new venv, the key replaced, the rest kept;
    # the previous venv stays for a rollback.
    box.sh(
        'rm -rf /tmp/src2 && cp -r /src /tmp/src2 && sed -i \'s/^__version__ = "\\(.*\\)"/'
        '__version__ = "\\1+next"/\' /tmp/src2/src/qudata_agent/__init__.py'
    )
    box.sh(f"echo QUDATA_PORT_RANGE=41000-41999 >> {ENV_FILE}")
    output = box.sh(
        f"cd / && QUDATA_INSTALL_PCI_DEVICES={FAKE_BUS} bash /tmp/src2/install.sh {WITH_NEW_KEY}"
    )
    assert "upgrading in place" in output and "API key replaced" in output
    assert NEW_KEY not in output
    assert box.sh(f"cat {KEY_FILE}").strip() == NEW_KEY
    env = box.sh(f"cat {ENV_FILE}")
    assert "QUDATA_PORT_RANGE=41000-41999" in env and f"QUDATA_API_URL={CP_URL}" in env
    assert box.sh(f"stat -c %a {ENV_FILE}").strip() == "600"
    assert box.sh("qudata-agent version").strip() == qudata_agent.__version__ + "+next"
    venvs = box.sh("ls /opt/qudata-agent/venvs").split()
    assert len(venvs) == 2 and venv_before.removeprefix("venvs/") in venvs
    assert box.sh("readlink /opt/qudata-agent/venv.previous").strip() == venv_before
    assert _agent_id(box) == "id-made-by-the-first-agent"


def test_a_key_an_older_install_kept_in_agent_env_is_moved(installed: tuple[Box, str]) -> None:
    box, _ = installed
    box.sh(f"echo QUDATA_API_KEY=qk_test_old_0000 >> {ENV_FILE} && rm {KEY_FILE}")
    output = box.install()
    assert "API key stored" in output
    assert box.sh(f"cat {KEY_FILE}").strip() == "qk_test_old_0000"
    assert "QUDATA_API_KEY" not in box.sh(f"cat {ENV_FILE}")
    box.sh(f"cp /tmp/new-key {KEY_FILE}")


def test_a_failed_download_leaves_nothing_behind_and_fails_the_run(
    installed: tuple[Box, str],
) -> None:
    box, _ = installed
    lists = "/etc/apt/sources.list.d"
    bus = _hgx_bus(box)
    box.sh(f"rm -rf {bus}/0000:05:00.0")  # a GPU, no switch
    # What older versions left after a failed download: an empty list (skipped forever).
    box.sh(f"touch {lists}/nvidia-container-toolkit.list")
    code, output = box.code(
        "cd / && QUDATA_INSTALL_NVIDIA_REPO=http://127.0.0.1:9/nothing"
        f" QUDATA_INSTALL_PCI_DEVICES={bus} bash /src/install.sh"
    )
    assert code == 1, output
    assert "cannot download http://127.0.0.1:9/nothing/gpgkey" in output
    assert 'stopped in the step "NVIDIA GPUs"' in output
    assert (
        box.sh(f"ls {lists} /usr/share/keyrings").split().count("nvidia-container-toolkit.list")
        == 0
    )
    assert "nvidia-container-toolkit-keyring.gpg" not in box.sh("ls /usr/share/keyrings")
    assert box.sh("ls /tmp | grep -c qudata-install || true").strip() == "0"


def test_daemon_json_is_merged_not_clobbered(installed: tuple[Box, str]) -> None:
    box, _ = installed
    box.sh(
        """echo '{"log-driver": "json-file", "log-opts": {"max-size": "10m"},"""
        """ "live-restore": false}' > /etc/docker/daemon.json"""
    )
    output = box.install("--max-concurrent-downloads", "5", "--registry-mirror", "http://m.test")
    assert "merged into /etc/docker/daemon.json" in output
    assert json.loads(box.sh("cat /etc/docker/daemon.json")) == {
        "log-driver": "json-file",
        "log-opts": {"max-size": "10m"},
        "live-restore": True,
        "max-concurrent-downloads": 5,
        "registry-mirrors": ["http://m.test"],
    }
    # A daemon.json that is not JSON is never overwritten: the run fails and says why.
    box.sh("echo '{broken' > /etc/docker/daemon.json")
    code, output = box.code(f"cd / && QUDATA_INSTALL_PCI_DEVICES={FAKE_BUS} bash /src/install.sh")
    assert code == 1 and "is not valid JSON" in output, output
    assert box.sh("cat /etc/docker/daemon.json").strip() == "{broken"
    box.sh("""echo '{"live-restore": true}' > /etc/docker/daemon.json""")


def test_sandbox_installs_runsc_and_registers_it_merged_into_daemon_json(
    installed: tuple[Box, str],
) -> None:
    box, _ = installed
    box.sh("""echo '{"live-restore": true, "log-driver": "local"}' > /etc/docker/daemon.json""")
    output = box.install("--sandbox")
    assert "Sandbox isolation tier" in output and "merged into /etc/docker/daemon.json" in output
    assert json.loads(box.sh("cat /etc/docker/daemon.json")) == {
        "live-restore": True,
        "log-driver": "local",
        "runtimes": {"runsc": {"path": "/usr/bin/runsc", "runtimeArgs": ["--network=host"]}},
    }
    assert "runsc version" in box.sh("/usr/bin/runsc --version")
    installs = "grep -c ' install ' /var/log/dpkg.log || true"
    before = box.sh(installs)
    again = box.install("--sandbox")  # nothing left to do for the sandbox
    assert "merged into" not in again, again
    # dpkg's own log, not the output: doctor's advice may name `apt-get install`.
    assert box.sh(installs) == before, again
    box.sh("""echo '{"live-restore": true}' > /etc/docker/daemon.json""")


# A security update of containerd, as a repository would publish it: the installed
# package rebuilt with a higher version, in a local repository apt trusts.
SECURITY_REPO = """set -e
rm -rf /tmp/repo /tmp/pkg && mkdir -p /tmp/repo && cd /tmp/repo
apt-get download -q containerd >/dev/null
have=$(dpkg-query -W -f='${Version}' containerd)
dpkg-deb -R containerd_*.deb /tmp/pkg && rm containerd_*.deb
sed -i "s/^Version: .*/Version: ${have}+sec1/" /tmp/pkg/DEBIAN/control
dpkg-deb -b /tmp/pkg containerd-sec1.deb >/dev/null
{ cat /tmp/pkg/DEBIAN/control; echo Filename: ./containerd-sec1.deb
  echo "Size: $(stat -c %s containerd-sec1.deb)"
  echo "SHA256: $(sha256sum containerd-sec1.deb | cut -d' ' -f1)"; echo; } > Packages
echo 'deb [trusted=yes] file:/tmp/repo ./' > /etc/apt/sources.list.d/test-security.list
apt-get update -q >/dev/null
apt-mark hold containerd >/dev/null
echo "$have"
"""


def test_a_held_container_stack_package_is_upgraded_and_stays_held(
    installed: tuple[Box, str],
) -> None:
    """A runc/containerd/Docker with a known escape lets a tenant out: install.sh upgrades."""
    box, _ = installed
    have = box.sh(SECURITY_REPO.strip()).strip().splitlines()[-1]
    try:
        output = box.install()
        assert "security updates of the container stack" in output
        assert "upgraded: containerd" in output, output
        assert box.sh("dpkg-query -W -f='${Version}' containerd").strip() == have + "+sec1"
        assert "containerd" in box.sh("apt-mark showhold").split()
        again = box.install()
        assert "up to date (what the configured repositories have)" in again, again
    finally:
        box.sh("rm -f /etc/apt/sources.list.d/test-security.list && rm -rf /tmp/repo /tmp/pkg")


def test_a_dry_run_of_an_upgrade_changes_nothing(installed: tuple[Box, str]) -> None:
    box, _ = installed
    output = box.unchanged_by(
        f"cd / && QUDATA_INSTALL_PCI_DEVICES={FAKE_BUS} bash /src/install.sh --dry-run"
        f" {WITH_NEW_KEY}"
    )
    assert "venv kept" in output and "kept as it is" in output and "API key kept" in output


def test_uninstall_keeps_state_and_containers_unless_asked(installed: tuple[Box, str]) -> None:
    """Runs last: it removes the install."""
    box, _ = installed
    box.unchanged_by("bash /opt/qudata-agent/uninstall.sh --all --dry-run")
    output = box.sh("bash /opt/qudata-agent/uninstall.sh")
    assert "tenant containers are left running" in output
    for path in ("/opt/qudata-agent", UNIT_FILE, "/usr/local/bin/qudata-agent"):
        assert box.code(f"test -e {path}")[0] == 1, path
    assert box.sh("ls /var/lib/qudata-agent").split() == ["agent.db", "agent_secret", "api_key"]
    assert box.sh(f"cat {KEY_FILE}").strip() == NEW_KEY
    box.sh("bash /src/uninstall.sh --state")
    assert box.code("test -e /var/lib/qudata-agent || test -e /etc/qudata-agent")[0] == 1


# -- the scripts and the unit, checked by their tools ----------------------------------------


def test_the_shell_scripts_are_shellcheck_clean() -> None:
    scripts = [
        "install.sh",
        "uninstall.sh",
        "deploy/relay/relay.sh",
        *sorted(str(p.relative_to(REPO)) for p in (REPO / "scripts").rglob("*.sh")),
    ]
    assert "scripts/test.sh" in scripts
    done = subprocess.run(
        ["shellcheck", "-x", *scripts], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("name", ["qudata-agent.service", "qudata-agent-firewall.service"])
def test_the_unit_template_passes_systemd_analyze(tmp_path: Path, name: str) -> None:
    prefix = tmp_path / "opt"
    exe = prefix / "venv" / "bin" / "qudata-agent"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    template = (REPO / "packaging" / name).read_text()
    unit = tmp_path / name
    unit.write_text(
        template.replace("@PREFIX@", str(prefix))
        .replace("@ENV_FILE@", "/etc/qudata-agent/agent.env")
        .replace("@STATE_DIR@", "/var/lib/qudata-agent")
    )
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        check=False,
    )
    report = done.stdout + done.stderr
    assert done.returncode == 0, report
    # An unknown or misspelt option is only a warning for systemd: refuse it here.
    assert "Unknown" not in report and "ignoring" not in report, report
