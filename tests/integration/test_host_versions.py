"""The container stack's versions as this host has them (real programs, dpkg, changelogs, uname).

The verdicts themselves are tested from captured outputs in tests/unit/test_versions.py;
here the probes read the real host, and the verdict doctor prints follows from them.
"""

from __future__ import annotations

import os
import subprocess
import sys

from qudata_agent.adapters.host_versions import container_stack
from qudata_agent.domain.versions import CONTAINERD, DOCKER, KERNEL, RUNC, judge, version_key


def test_the_stack_is_read_with_versions_packages_and_changelogs() -> None:
    found = {installed.component: installed for installed in container_stack()}
    for component in (RUNC, CONTAINERD, DOCKER):
        installed = found[component]
        assert installed.version is not None and version_key(installed.version), installed
        # Docker's packages here come from the distribution: its build, its changelog.
        assert installed.package and installed.package_version, installed
        if installed.distro is not None:
            assert installed.changelog and installed.package in installed.changelog, installed
    runc = subprocess.run(["runc", "--version"], capture_output=True, text=True, check=True)
    assert found[RUNC].version in runc.stdout
    assert found[KERNEL].version is not None and os.uname().release.startswith(
        found[KERNEL].version.split("-")[0].rsplit(".", 1)[0]
    )


def test_doctor_prints_a_verdict_for_each_component() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUDATA_")}
    done = subprocess.run(
        [sys.executable, "-m", "qudata_agent", "doctor", "--config", os.devnull],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    for installed in container_stack():
        verdict = judge(installed)
        assert f"{installed.component} version" in done.stdout
        assert verdict.detail[:60] in done.stdout
