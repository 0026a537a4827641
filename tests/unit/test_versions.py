"""Versions that let a tenant out: the order of versions and the verdicts, from captured outputs.

The outputs are what the programs print on real hosts (Debian 12's packages,
Docker's own packages, Ubuntu's and Debian's kernels).
"""

from __future__ import annotations

import pytest

from qudata_agent.domain.versions import (
    CONTAINERD,
    DOCKER,
    KERNEL,
    RUNC,
    Installed,
    Verdict,
    dpkg_compare,
    judge,
    kernel_version,
    program_version,
    version_key,
)

DEBIAN12_RUNC = "runc version 1.1.5+ds1\ncommit: 1.1.5+ds1-1+deb12u1\nspec: 1.0.2-dev\ngo: go1.19.8"
DOCKER_CE_RUNC = "runc version 1.1.12\ncommit: v1.1.12-0-g51d5e94\nspec: 1.0.2-dev\ngo: go1.20.13"
DEBIAN12_CONTAINERD = "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3"
DOCKER_CE_CONTAINERD = "containerd containerd.io 1.7.27 05044ec0a9a75232cad458027ca83437aae3f4da"
DEBIAN12_DOCKERD = "Docker version 20.10.24+dfsg1, build 5d6db84"
RUNC_CHANGELOG = (
    "runc (1.1.5+ds1-1+deb12u1) bookworm-security; urgency=high\n\n"
    "  * CVE-2024-21626: several container breakouts due to internally leaked fds\n"
)


@pytest.mark.parametrize(
    ("output", "version"),
    [
        (DEBIAN12_RUNC, "1.1.5+ds1"),
        (DOCKER_CE_RUNC, "1.1.12"),
        (DEBIAN12_CONTAINERD, "1.6.20~ds1"),
        (DOCKER_CE_CONTAINERD, "1.7.27"),
        (DEBIAN12_DOCKERD, "20.10.24+dfsg1"),
        ("runc: command not found", None),
    ],
)
def test_program_versions(output: str, version: str | None) -> None:
    assert program_version(output) == version


def test_upstream_order_with_release_candidates_and_distribution_suffixes() -> None:
    assert version_key("1.4.0-rc.3") < version_key("1.4.0") < version_key("1.4.1")  # type: ignore[operator]
    assert version_key("1.4.0-rc.2") < version_key("1.4.0-rc.3")  # type: ignore[operator]
    assert version_key("1.0.0-rc7") < version_key("1.0.0")  # type: ignore[operator]
    assert version_key("1.1.5+ds1") == version_key("1.1.5")
    assert version_key("1.6.20~ds1") == version_key("1.6.20")
    assert version_key("unknown") is None


@pytest.mark.parametrize(
    ("a", "b", "sign"),
    [
        ("1.1.5+ds1-1+deb12u1", "1.1.5+ds1-1", 1),
        ("1.1.5+ds1-1+deb12u2", "1.1.5+ds1-1+deb12u10", -1),
        ("1.3.3-0ubuntu1~24.04.2", "1.3.3-0ubuntu1", -1),  # ~ sorts before the end
        ("1:1.0-1", "2.0-1", 1),  # the epoch wins
        ("20.10.24+dfsg1-1+deb12u1+b6", "20.10.24+dfsg1-1+deb12u1", 1),
        ("1.2.3-1", "1.2.3-1", 0),
    ],
)
def test_debian_version_order(a: str, b: str, sign: int) -> None:
    result = dpkg_compare(a, b)
    assert (result > 0) - (result < 0) == sign


def _debian(component: str, version: str, package: str, package_version: str,
            changelog: str | None) -> Installed:  # fmt: skip
    return Installed(component, version, package, package_version, "debian", changelog)


def test_debian12_runc_names_the_2025_escapes_and_credits_the_backport() -> None:
    found = judge(_debian(RUNC, "1.1.5+ds1", "runc", "1.1.5+ds1-1+deb12u1", RUNC_CHANGELOG))
    assert found.verdict is Verdict.NOT_FIXED
    for cve in ("CVE-2025-31133", "CVE-2025-52565", "CVE-2025-52881"):
        assert cve in found.detail
    assert "1.2.8 / 1.3.3 / 1.4.0-rc.3" in found.detail
    assert "fixed by the distribution: CVE-2024-21626" in found.detail
    assert "CVE-2019-5736" not in found.detail.split("fixed by")[0]
    assert found.fix and "--only-upgrade runc" in found.fix


def test_a_distribution_build_without_its_changelog_is_cannot_tell_not_a_pass() -> None:
    found = judge(_debian(RUNC, "1.1.5+ds1", "runc", "1.1.5+ds1-1+deb12u1", None))
    assert found.verdict is Verdict.CANNOT_TELL
    assert found.detail.startswith("cannot tell") and "CVE-2025-52881" in found.detail
    # The known-fixed table still credits Debian's fix of CVE-2024-21626.
    assert "fixed by the distribution: CVE-2024-21626" in found.detail


def test_a_vendor_build_is_judged_by_its_upstream_version() -> None:
    old = judge(Installed(RUNC, "1.1.12", "containerd.io", "1.6.28-1"))
    assert old.verdict is Verdict.NOT_FIXED and "CVE-2024-21626" not in old.detail
    for fixed in ("1.2.8", "1.3.3", "1.4.0-rc.3", "1.4.0", "1.5.1"):
        assert judge(Installed(RUNC, fixed)).verdict is Verdict.FIXED, fixed
    for short in ("1.2.7", "1.3.2", "1.4.0-rc.2", "1.1.15"):
        assert judge(Installed(RUNC, short)).verdict is Verdict.NOT_FIXED, short


def test_docker_and_containerd_minimums() -> None:
    assert judge(_debian(DOCKER, "20.10.24+dfsg1", "docker.io", "20.10.24+dfsg1-1+deb12u1+b6",
                         "")).verdict is Verdict.FIXED  # fmt: skip
    assert judge(Installed(DOCKER, "28.2.2")).verdict is Verdict.FIXED
    old = judge(Installed(DOCKER, "20.10.8"))
    assert old.verdict is Verdict.NOT_FIXED and "CVE-2021-41089" in old.detail
    assert judge(Installed(CONTAINERD, "1.6.20~ds1")).verdict is Verdict.FIXED
    assert judge(Installed(CONTAINERD, "1.4.7")).verdict is Verdict.NOT_FIXED
    assert judge(Installed(CONTAINERD, "1.5.4")).verdict is Verdict.FIXED


def test_kernels() -> None:
    vanilla = kernel_version("6.18.44-fc-v1252", "#1 SMP PREEMPT_DYNAMIC @0", None)
    assert vanilla == Installed(KERNEL, "6.18.44-fc-v1252")
    assert judge(vanilla).verdict is Verdict.FIXED
    ubuntu = kernel_version(
        "5.15.0-91-generic", "#101-Ubuntu SMP", "Ubuntu 5.15.0-91.101-generic 5.15.131"
    )
    assert ubuntu.version == "5.15.131" and judge(ubuntu).verdict is Verdict.FIXED
    debian = kernel_version("6.1.0-28-amd64", "#1 SMP PREEMPT_DYNAMIC Debian 6.1.119-1", None)
    assert debian.version == "6.1.119" and judge(debian).verdict is Verdict.FIXED
    dirty = judge(Installed(KERNEL, "5.10.90"))
    assert dirty.verdict is Verdict.NOT_FIXED and "CVE-2022-0847" in dirty.detail
    assert judge(Installed(KERNEL, "5.4.200")).verdict is Verdict.FIXED  # before the bug
    rhel = kernel_version("5.14.0-427.el9.x86_64", "#1 SMP PREEMPT_DYNAMIC", None)
    assert not rhel.exact and judge(rhel).verdict is Verdict.CANNOT_TELL


def test_an_unreadable_version_is_cannot_tell() -> None:
    found = judge(Installed(CONTAINERD, None))
    assert found.verdict is Verdict.CANNOT_TELL and "could not be read" in found.detail
