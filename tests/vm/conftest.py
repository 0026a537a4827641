"""The Debian 13 VM host, booted once for all of tests/vm/ (see tests/support/vm.py).

These tests boot a QEMU VM under software emulation and take about a quarter
of an hour, so the default run does not collect them: `scripts/test-vm.sh`
(named in the README) runs them with `QUDATA_VM_TESTS=1`.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

from support.vm import AGENT_DIR, VM, booted

collect_ignore_glob = [] if os.environ.get("QUDATA_VM_TESTS") == "1" else ["test_*.py"]

# What the guest's tests need from this host's Docker: the cached test images.
IMAGES = ("qudata-test/busybox:1", "qudata-test/debian:12")


@pytest.fixture(scope="session")
def vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VM]:
    work = tmp_path_factory.mktemp("vm")
    with booted(work) as machine:
        machine.sh("systemctl is-system-running --wait || true", timeout=300)
        machine.sh("systemctl start docker && docker info >/dev/null", timeout=300)
        images = work / "images.tar"
        subprocess.run(["docker", "save", "-o", str(images), *IMAGES], check=True)
        machine.copy_in(images, "/root/images.tar")
        images.unlink()
        machine.sh("docker load -q -i /root/images.tar && rm /root/images.tar", timeout=600)
        # The checkout as it is here (read-only 9p share), less what is this host's own.
        machine.sh(
            f"mkdir -p {AGENT_DIR} && tar -C /src --exclude=./.venv --exclude=./.git"
            " --exclude='*.egg-info' --exclude=__pycache__ -cf - . | tar -C "
            f"{AGENT_DIR} -xf -"
        )
        yield machine
