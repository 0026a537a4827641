"""Inside the VM: trixie's own runsc (gVisor) as install.sh --sandbox registers it.

On Debian, install.sh --sandbox takes runsc from the distribution (`apt-get
install runsc`) and registers it with `--network=host`: the container's own
network namespace, served by the host's stack. runsc's default, its own
user-space network stack, refuses to start on trixie's kernel (6.12) just as
on the container host's ("cannot run with network enabled in root network
namespace": this runsc takes /proc/sys/net/core/rmem_default for the sign
of the root namespace, and newer kernels show it in every one), so
`--network=host` is what works on Debian 13 too. Here, under a runtime name
of this test's own with those arguments, a busybox container gets an address
of its own on Docker's default bridge, fetches a page from a listener on the
bridge's gateway, and reports gVisor's kernel, not the host's. daemon.json
is put back as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.docker_api import docker

pytestmark = [pytest.mark.docker, pytest.mark.timeout(1200)]

DAEMON_JSON = Path("/etc/docker/daemon.json")
RUNTIME = "runsc-vm-test"
ARGS = ["--network=host"]  # what install.sh --sandbox registers (see docker_settings)
PORT = 18731


def _runtimes() -> dict[str, object]:
    return dict(json.loads(docker("info", "--format", "{{json .Runtimes}}")))


def _reload_dockerd(want: bool) -> None:
    os.kill(int(Path("/var/run/docker.pid").read_text().strip()), signal.SIGHUP)
    deadline = time.monotonic() + 120
    while (RUNTIME in _runtimes()) != want:
        assert time.monotonic() < deadline, f"dockerd did not {'load' if want else 'drop'} it"
        time.sleep(1)


def _apt_install_runsc() -> str:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    argv = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "runsc"]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:  # no package lists yet: fetch them once
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, check=True)
        done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    found = shutil.which("runsc")
    assert found, "the runsc package installed no runsc"
    return found


@pytest.fixture(scope="module")
def runtime() -> Iterator[str]:
    runsc = shutil.which("runsc") or _apt_install_runsc()
    before = DAEMON_JSON.read_text() if DAEMON_JSON.exists() else None
    config = json.loads(before) if before and before.strip() else {}
    kept = dict(config.get("runtimes", {}))
    config["runtimes"] = {**kept, RUNTIME: {"path": runsc, "runtimeArgs": ARGS}}
    DAEMON_JSON.parent.mkdir(parents=True, exist_ok=True)
    DAEMON_JSON.write_text(json.dumps(config, indent=2) + "\n")
    try:
        _reload_dockerd(True)
        yield RUNTIME
    finally:
        # A reload keeps the runtimes a file does not name: name them, then the old file.
        DAEMON_JSON.write_text(json.dumps({**config, "runtimes": kept}, indent=2) + "\n")
        _reload_dockerd(False)
        if before is None:
            DAEMON_JSON.unlink()
        else:
            DAEMON_JSON.write_text(before)


@pytest.fixture
def page(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A web server on the default bridge's gateway; (its address, the page's text)."""
    gateway = docker("network", "inspect", "bridge", "--format",
                     "{{(index .IPAM.Config 0).Gateway}}").strip()  # fmt: skip
    text = f"served-to-the-sandbox-{os.getpid()}"
    (tmp_path / "index.html").write_text(text + "\n")
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(PORT), "--bind", gateway],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield f"{gateway}:{PORT}", text
    finally:
        server.kill()
        server.wait()


def test_trixies_runsc_runs_a_container_on_the_bridge(runtime: str, page: tuple[str, str]) -> None:
    address, text = page
    # No `wget -T`: its SIGALRM timeout segfaults bookworm's busybox under this runsc in
    # the VM (the docker run's own timeout bounds the wait instead).
    script = (
        "uname -r; ip -4 -o addr show dev eth0;"
        f" for i in $(seq 30); do wget -q -O - http://{address}/ && exit 0; sleep 2; done;"
        " exit 1"
    )
    argv = ["docker", "run", "--rm", "--runtime", runtime, "qudata-test/busybox:1"]
    done = subprocess.run(
        [*argv, "sh", "-c", script],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert text in out, out[-3000:]
    assert "inet 172." in out or "inet 10." in out, f"no address of its own on the bridge: {out}"
    host_kernel = os.uname().release
    assert out.splitlines()[0].strip() != host_kernel, "it ran on the host's kernel, not gVisor's"
