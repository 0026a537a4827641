"""The scripts the agent runs inside containers for SSH, run by `docker exec` in real
containers of the test images (sshd from Debian's openssh-server)."""

from __future__ import annotations

import shlex
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from qudata_agent.domain.ssh_setup import (
    EXIT_SSHD_FAILED,
    LOG_FILE,
    PID_FILE,
    PROFILE_ENV,
    SSHD_CONFIG,
    bring_up_script,
    start_script,
)

IMAGE = "qudata-test/debian-ssh:12"
LABEL = "qudata.test=ssh-scripts"


def _docker(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=check)


def _exec(cid: str, script: str) -> subprocess.CompletedProcess[str]:
    return _docker("exec", cid, "sh", "-c", script, check=False)


def _sshd_pid(cid: str) -> str:
    """The pid in the agent's pid file, checked to be a live sshd."""
    done = _exec(cid, f'p=$(cat {PID_FILE}) && cat /proc/"$p"/comm && echo "$p"')
    assert done.returncode == 0, done.stderr
    comm, pid = done.stdout.split()
    assert comm == "sshd"
    return pid


@pytest.fixture
def container() -> Iterator[str]:
    """A running container of the sshd image doing nothing (its own sshd not started)."""
    name = f"qudata-ssh-scripts-{uuid.uuid4().hex[:8]}"
    cid = _docker(
        "run", "-d", "--name", name, "--label", LABEL, "--init", IMAGE, "sleep", "infinity"
    ).stdout.strip()
    try:
        yield cid
    finally:
        _docker("rm", "-f", cid, check=False)


def test_bring_up_starts_sshd_and_a_second_run_leaves_it_alone(container: str) -> None:
    first = _exec(container, bring_up_script("", provision=True))
    assert first.returncode == 0, first.stdout + first.stderr
    pid = _sshd_pid(container)
    again = _exec(container, bring_up_script("", provision=False))
    assert again.returncode == 0, again.stdout + again.stderr
    assert _sshd_pid(container) == pid  # not restarted: open sessions stay


def test_a_stale_pid_file_naming_another_program_does_not_pass_for_sshd(
    container: str,
) -> None:
    """After a container restart the old pid file stays in the writable layer; the pid in it
    may belong to another program in the new run (here: the container's init, pid 1)."""
    assert _exec(container, bring_up_script("", provision=True)).returncode == 0
    assert _exec(container, f"kill $(cat {PID_FILE})").returncode == 0
    assert _exec(container, f"echo 1 > {PID_FILE}").returncode == 0
    started = _exec(container, start_script())
    assert started.returncode == 0, started.stdout + started.stderr
    assert _sshd_pid(container) != "1"


def test_port_22_taken_by_another_sshd_fails_with_the_cause(container: str) -> None:
    """An image that starts its own sshd holds port 22: ours cannot listen, and says so
    (OpenSSH 9 forks before it binds, so sshd's own exit status is 0 here)."""
    assert _exec(container, bring_up_script("", provision=True)).returncode == 0
    assert _exec(container, f"kill $(cat {PID_FILE})").returncode == 0
    own = _exec(container, "mkdir -p /run/sshd && ssh-keygen -A >/dev/null && /usr/sbin/sshd")
    assert own.returncode == 0, own.stderr
    failed = _exec(container, start_script())
    assert failed.returncode == EXIT_SSHD_FAILED, failed.stdout + failed.stderr
    assert "Address already in use" in failed.stdout


def test_sshd_log_is_rotated_past_a_mebibyte_when_sshd_starts(container: str) -> None:
    """The log lives on the renter's disk: past 1 MiB it is moved aside (once) at a start."""
    assert _exec(container, bring_up_script("", provision=True)).returncode == 0
    assert _exec(container, f"kill $(cat {PID_FILE})").returncode == 0
    big = _exec(container, f"head -c 2000000 /dev/zero > {LOG_FILE}")
    assert big.returncode == 0, big.stderr
    assert _exec(container, start_script()).returncode == 0
    sizes = _exec(container, f"wc -c < {LOG_FILE}.1; wc -c < {LOG_FILE} 2>/dev/null || echo 0")
    old, new = (int(x) for x in sizes.stdout.split())
    assert old == 2000000 and new < 1000


OLD_SSHD = """#!/bin/sh
# Stands in for an sshd older than 7.8, which refuses SetEnv as a bad option.
if [ "$1" = -t ] && grep -q '^SetEnv' "$3"; then
  echo "$3: Bad configuration option: SetEnv" >&2
  exit 255
fi
exec /usr/sbin/sshd "$@"
"""


def test_an_sshd_without_setenv_gets_the_config_without_it(container: str) -> None:
    wrapper = _exec(
        container,
        f"printf '%s' {shlex.quote(OLD_SSHD)} > /usr/local/sbin/sshd"
        " && chmod 755 /usr/local/sbin/sshd",
    )
    assert wrapper.returncode == 0, wrapper.stderr
    done = _exec(container, bring_up_script("", True, [("GREETING", "hi there")]))
    assert done.returncode == 0, done.stdout + done.stderr
    config = _exec(container, f"cat {SSHD_CONFIG}").stdout
    assert "SetEnv" not in config and "PermitRootLogin prohibit-password" in config
    assert "export GREETING='hi there'" in _exec(container, f"cat {PROFILE_ENV}").stdout
    _sshd_pid(container)  # and sshd runs
