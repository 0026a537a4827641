"""The agent's SSH bundle and init in real containers of the test images (real dockerd).

The bundle is built from the host's OpenSSH (openssh-server, patchelf,
busybox-static) into a temporary state directory; each container is made
through the Docker adapter from the spec `ssh_spec` computes, labelled with an
agent id of this module's own and removed afterwards, also on failure.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from shlex import quote

import docker
import pytest

from qudata_agent.adapters.docker import DockerEngine
from qudata_agent.adapters.ssh_bundle import Bundle, SshBundle
from qudata_agent.adapters.ssh_files import InstanceSshFiles
from qudata_agent.adapters.ssh_probe import read_in_container
from qudata_agent.domain.container_spec import IDLE_COMMAND, LABEL_AGENT, ContainerSpec
from qudata_agent.domain.ssh_init import READY, STATUS_FILE, WORD_BYTES, failure_of, ssh_spec
from qudata_agent.domain.ssh_setup import (
    BUNDLE_MOUNT,
    LOG_FILE,
    SSHD_CONFIG_TEXT,
    profile_env_text,
    sshd_config_text,
)
from support.docker_api import exec_sh

pytestmark = pytest.mark.docker

BUSYBOX = "qudata-test/busybox:1"
DEBIAN = "qudata-test/debian:12"
DEBIAN_SSH = "qudata-test/debian-ssh:12"
USER_IMAGE = "qudata-test/busybox-user:1"
EXITS_IMAGE = "qudata-test/busybox-exits:1"


@dataclass
class Rig:
    engine: DockerEngine
    bundle: Bundle
    files: InstanceSshFiles
    agent_id: str

    def start(
        self, image: str, command: tuple[str, ...] = IDLE_COMMAND, config: str = SSHD_CONFIG_TEXT
    ) -> str:
        instance_id = uuid.uuid4().hex[:12]
        spec = ContainerSpec(
            instance_id=instance_id,
            agent_id=self.agent_id,
            image=image,
            command=command,
            restart_policy="no",  # an exit is what these tests look at: nothing restarts it
        )
        where = self.files.prepare(instance_id, config, profile_env_text([]), "")
        final = ssh_spec(
            spec,
            self.engine.image_config(image),
            bundles_dir=str(self.bundle.bundles_dir),
            instance_dir=str(where),
        )
        container_id = self.engine.create(final)
        self.engine.start(container_id)
        return container_id

    def word(self, container_id: str) -> tuple[bool, str | None]:
        """The init's word, read from the host as the agent reads it (within 10 s)."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pid = self.engine.inspect(container_id).pid
            word = None if pid is None else read_in_container(pid, STATUS_FILE, WORD_BYTES)
            if word:
                return word.strip() == READY.encode(), failure_of(word)
            time.sleep(0.05)
        raise AssertionError(f"the init said nothing in 10 s: {_logs(container_id)}")

    def sh(self, container_id: str, script: str) -> str:
        """A test's own look inside (the agent never runs anything in a container)."""
        code, out = exec_sh(
            container_id, f"{BUNDLE_MOUNT}/current/bin/busybox sh -c {quote(script)}"
        )
        assert code == 0, out
        return out


def _docker(*args: str) -> str:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=True).stdout


def _logs(container_id: str) -> str:
    """The container's stdout and stderr together."""
    done = subprocess.run(
        ["docker", "logs", container_id], capture_output=True, text=True, check=True
    )
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    return SshBundle(tmp_path_factory.mktemp("state") / "ssh" / "bundles").ensure()


@pytest.fixture
def rig(bundle: Bundle, tmp_path: Path) -> Iterator[Rig]:
    agent_id = f"test-{uuid.uuid4().hex[:12]}"
    engine = DockerEngine(timeout_s=30)
    try:
        yield Rig(engine, bundle, InstanceSshFiles(tmp_path / "instances"), agent_id)
    finally:
        engine.close()
        sdk = docker.DockerClient(base_url="unix:///var/run/docker.sock", version="auto")
        for container in sdk.containers.list(
            all=True, filters={"label": f"{LABEL_AGENT}={agent_id}"}
        ):
            container.remove(force=True, v=True)
        sdk.close()


def test_the_bundle_is_made_once_and_rewritten_to_its_mount_path(bundle: Bundle) -> None:
    root = bundle.bundles_dir / bundle.key
    assert (bundle.bundles_dir / "current").resolve() == root.resolve()
    before = (root / "bin" / "sshd").stat().st_mtime_ns
    again = SshBundle(bundle.bundles_dir).ensure()
    assert again.key == bundle.key and (root / "bin" / "sshd").stat().st_mtime_ns == before
    inside = f"{BUNDLE_MOUNT}/{bundle.key}/lib"
    for name in ("sshd", "setpriv"):
        binary = str(root / "bin" / name)
        interp = subprocess.run(
            ["patchelf", "--print-interpreter", binary], capture_output=True, text=True
        )
        assert interp.stdout.strip().startswith(inside + "/")
        rpath = subprocess.run(
            ["patchelf", "--print-rpath", binary], capture_output=True, text=True
        )
        assert rpath.stdout.strip() == inside
        needed = subprocess.run(
            ["patchelf", "--print-needed", binary], capture_output=True, text=True
        )
        for soname in needed.stdout.split():
            assert (root / "lib" / soname).is_file(), soname
    assert (root / "lib" / "libc.so.6").is_file()


@pytest.mark.parametrize("image", [BUSYBOX, DEBIAN, DEBIAN_SSH])
def test_sshd_listens_on_every_image_with_nothing_installed(rig: Rig, image: str) -> None:
    before = _docker(
        "run", "--rm", "--entrypoint", "/bin/sh", image, "-c", "ls /etc/ssh 2>/dev/null | sort"
    )
    cid = rig.start(image)
    assert rig.word(cid) == (True, None)
    sshd = rig.sh(cid, "cat /.qudata/run/sshd.pid")
    assert rig.sh(cid, f"cat /proc/{sshd.strip()}/comm").strip() == "sshd"
    # The image's own sshd files are untouched, and nothing was installed.
    assert rig.sh(cid, "ls /etc/ssh 2>/dev/null | sort") == before
    if image == DEBIAN:
        assert "openssh-server" not in rig.sh(cid, "dpkg-query -W -f '${Package}\\n' 2>/dev/null")


def test_the_workload_runs_as_the_images_user_and_sshd_as_root(rig: Rig) -> None:
    cid = rig.start(
        USER_IMAGE, ("/bin/sh", "-c", 'echo "$(id -u):$(id -g) $HOME $(pwd)"; sleep 1000')
    )
    assert rig.word(cid) == (True, None)
    deadline = time.monotonic() + 10
    while "renter" not in _logs(cid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _logs(cid).strip() == "1000:1000 /home/renter /home/renter"
    pid = rig.sh(cid, "cat /.qudata/run/sshd.pid").strip()
    assert rig.sh(cid, f"stat -c %u /proc/{pid}").strip() == "0"


def test_the_workload_is_the_images_own_program_not_a_busybox_applet(rig: Rig) -> None:
    """The init is a busybox shell, whose `exec ls` would run busybox's ls."""
    cid = rig.start(DEBIAN, ("ls", "--version"))
    deadline = time.monotonic() + 10
    while rig.engine.inspect(cid).running and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "GNU coreutils" in _logs(cid)
    assert rig.engine.inspect(cid).exit_code == 0


def test_an_idle_instance_outlives_an_entrypoint_that_ignores_its_arguments(rig: Rig) -> None:
    cid = rig.start(EXITS_IMAGE)
    assert rig.word(cid) == (True, None)
    time.sleep(1)
    assert rig.engine.inspect(cid).running
    logs = _logs(cid)
    assert "the entrypoint ignores its arguments" in logs
    assert "the instance stays up for SSH" in logs
    # A stop ends the init at once on SIGTERM (137 would mean Docker had to kill it).
    rig.engine.stop(cid, timeout_s=10)
    assert rig.engine.inspect(cid).exit_code == 143


def test_an_sshd_that_cannot_start_is_reported_with_sshds_words(rig: Rig) -> None:
    cid = rig.start(BUSYBOX, config=sshd_config_text() + "NoSuchOption yes\n")
    ready, reason = rig.word(cid)
    assert not ready and reason is not None
    assert "sshd did not start" in reason and "NoSuchOption" in reason, reason
    assert rig.engine.inspect(cid).running  # the instance itself keeps running


def test_an_image_without_a_shell_fails_with_that_reason(rig: Rig, tmp_path: Path) -> None:
    root = tmp_path / "noshell"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    name = f"qudata-test/noshell:{uuid.uuid4().hex[:8]}"
    tar = subprocess.run(["tar", "-C", str(root), "-c", "."], capture_output=True, check=True)
    subprocess.run(
        ["docker", "import", "-", name], input=tar.stdout, capture_output=True, check=True
    )
    try:
        cid = rig.start(name)
        ready, reason = rig.word(cid)
        assert not ready and reason is not None and "no shell" in reason, reason
        assert rig.engine.inspect(cid).running
    finally:
        subprocess.run(
            ["docker", "rm", "-f", *_docker("ps", "-aq", "--filter", f"ancestor={name}").split()],
            capture_output=True,
        )
        subprocess.run(["docker", "rmi", name], capture_output=True)


def test_the_sshd_log_is_rotated_past_a_mebibyte_when_the_container_starts(rig: Rig) -> None:
    cid = rig.start(BUSYBOX)
    assert rig.word(cid) == (True, None)
    rig.sh(cid, f"head -c 2000000 /dev/zero > {LOG_FILE}")
    rig.engine.restart(cid, timeout_s=5)
    assert rig.word(cid) == (True, None)
    old, new = (int(x) for x in rig.sh(cid, f"wc -c < {LOG_FILE}.1; wc -c < {LOG_FILE}").split())
    assert old == 2000000 and new < 1000


def test_the_agents_read_of_the_word_follows_nothing_the_tenant_plants(rig: Rig) -> None:
    """The status file is the tenant's: a link to /dev/zero, a FIFO, a link out of the
    container or a flood are refused or cut, at once, from the host side."""
    cid = rig.start(BUSYBOX)
    assert rig.word(cid) == (True, None)
    pid = rig.engine.inspect(cid).pid
    assert pid is not None
    planted = {
        "ln -sf /dev/zero /.qudata/run/ssh": None,
        "rm -f /.qudata/run/ssh; mkfifo /.qudata/run/ssh": None,
        "rm -f /.qudata/run/ssh; ln -s /etc/hostname /.qudata/run/ssh": None,
        "rm -f /.qudata/run/ssh; head -c 900000 /dev/zero | tr '\\0' x > /.qudata/run/ssh": 512,
    }
    for script, size in planted.items():
        rig.sh(cid, script)
        started = time.monotonic()
        got = read_in_container(pid, STATUS_FILE, WORD_BYTES)
        assert time.monotonic() - started < 1, script
        assert (None if got is None else len(got)) == size, script
