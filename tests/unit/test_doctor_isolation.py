"""doctor's isolation checks: the sandbox tier, its GPUs, the toolkit's escapes, the compat hook."""

from __future__ import annotations

from typing import Any

from qudata_agent.doctor import (
    Level,
    forward_compat_check,
    isolation_check,
    sandbox_gpu_check,
    toolkit_version_check,
)
from qudata_agent.domain.inventory import GpuInfo, GpuReport
from qudata_agent.domain.isolation import SandboxGpus

RUNSC: dict[str, Any] = {
    "Runtimes": {
        "runc": {"path": "runc"},
        "runsc": {"path": "/usr/bin/runsc", "runtimeArgs": ["--nvproxy", "--network=host"]},
    }
}
GPU = GpuReport(
    gpus=(GpuInfo(0, "GPU-1", "NVIDIA H100", 80 * 1024**3),), driver_version="550.54.15"
)


def test_the_sandbox_tier_is_shown_when_docker_has_its_runtime() -> None:
    ok = isolation_check(RUNSC, "runsc")
    assert ok.level is Level.PASS and "/usr/bin/runsc" in ok.detail
    missing = isolation_check({"Runtimes": {"runc": {"path": "runc"}}}, "runsc")
    assert missing.level is Level.WARN and "install.sh --sandbox" in (missing.fix or "")
    assert isolation_check(None, "runsc").level is Level.WARN


def test_gpus_in_the_sandbox_follow_nvproxy_and_the_driver() -> None:
    assert sandbox_gpu_check(RUNSC, "runsc", GpuReport(), SandboxGpus(True)) is None
    listed = sandbox_gpu_check(RUNSC, "runsc", GPU, SandboxGpus(True, ("550.54.15",)))
    assert listed is not None and listed.level is Level.PASS
    old = sandbox_gpu_check(RUNSC, "runsc", GPU, SandboxGpus(False))
    assert old is not None and old.level is Level.WARN and "nvproxy" in old.detail


def test_an_old_toolkit_fails_with_the_fix_and_a_new_one_names_what_cannot_be_checked() -> None:
    assert toolkit_version_check(False, None, None).level is Level.PASS
    old = toolkit_version_check(True, (1, 17, 7), None)
    assert old.level is Level.FAIL and "CVE-2025-23266" in old.detail and old.fix
    unknown = toolkit_version_check(True, None, None)
    assert unknown.level is Level.FAIL and "cannot be read" in unknown.detail
    new = toolkit_version_check(True, (1, 18, 0), None)
    assert new.level is Level.PASS and "CVE-2026-24260" in new.detail
    raised = toolkit_version_check(True, (1, 18, 0), (1, 18, 2))
    assert raised.level is Level.FAIL


def test_the_cuda_compat_hook_is_a_warning_until_the_toolkit_turns_it_off() -> None:
    assert forward_compat_check(False, False, False, None).level is Level.PASS
    assert forward_compat_check(True, True, True, "disabled").level is Level.PASS
    on = forward_compat_check(True, True, False, None)
    assert on.level is Level.WARN and "disable-cuda-compat-lib-hook" in (on.fix or "")
    assert forward_compat_check(True, False, False, None).level is Level.WARN
    assert forward_compat_check(True, True, True, "hook").level is Level.WARN
