"""Versions that let a tenant out: the fixed releases of the container stack, and the verdict.

Pure: `adapters/host_versions.py` reads what is installed into `Installed`;
`judge()` says, for one component, which known escapes its version still
carries, naming each fix.

How a version is judged. Distributions backport fixes without changing the
upstream version (Debian 12's runc says 1.1.5 and carries the fix of
CVE-2024-21626, which upstream made in 1.1.12), so for each advisory:

1. the upstream version the program reports is at or after the fixed release
   of its branch (or on a newer branch): fixed;
2. else, a distribution's build (Debian, Ubuntu) whose package changelog
   names the CVE, or whose package version is at or after a known fixed
   package version (`BACKPORTS`, Debian's version order): fixed by the
   distribution;
3. else, an upstream or vendor build (docker-ce, containerd.io), or a
   distribution build whose changelog was read and names no
   fix: not fixed;
4. else (a distribution build whose changelog is not there to read, a
   distribution kernel): cannot tell, which is a warning, never a pass.

What stays true: a fixed release here is one the project's own bulletin
names; where it could not be confirmed, the table says so and a version
short of it is "cannot tell", not "fixed" and not "not fixed".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

RUNC, CONTAINERD, DOCKER, KERNEL = ("runc", "containerd", "docker", "kernel")
# The NVIDIA Container Toolkit's escapes are domain/nvidia_toolkit.py's (doctor's
# "toolkit escapes" check, and the refusal of GPU orders below its floor).


@dataclass(frozen=True)
class Advisory:
    cve: str
    fixed: tuple[str, ...]  # the first fixed release of each branch, oldest branch first
    what: str
    introduced: str | None = None  # versions before it were never affected
    confirmed: bool = True  # False: the fixed release could not be confirmed from the bulletin


# Only escapes a tenant can reach from an instance (a root process in a container
# with Docker's default seccomp, no host network, no user namespace of its own).
ADVISORIES: dict[str, tuple[Advisory, ...]] = {
    RUNC: (
        Advisory("CVE-2019-5736", ("1.0.0-rc7",), "a container overwrites the host's runc"),
        Advisory("CVE-2024-21626", ("1.1.12",), "leaked host directory fd (WORKDIR)"),
        Advisory("CVE-2025-31133", ("1.2.8", "1.3.3", "1.4.0-rc.3"), "masked-path /dev/null swap"),
        Advisory("CVE-2025-52565", ("1.2.8", "1.3.3", "1.4.0-rc.3"), "/dev/console mount race"),
        Advisory("CVE-2025-52881", ("1.2.8", "1.3.3", "1.4.0-rc.3"), "redirected /proc writes"),
    ),
    CONTAINERD: (
        Advisory("CVE-2020-15257", ("1.3.9", "1.4.3"), "the shim's API socket reachable"),
        Advisory("CVE-2021-32760", ("1.4.8", "1.5.4"), "an image's archive changes host files"),
    ),
    DOCKER: (
        Advisory("CVE-2019-14271", ("19.03.1",), "docker cp runs the container's libraries"),
        Advisory("CVE-2021-41089", ("20.10.9",), "docker cp changes host file modes"),
    ),
    KERNEL: (
        Advisory(
            "CVE-2022-0847",
            ("5.10.102", "5.15.25", "5.16.11"),
            "Dirty Pipe: overwrite read-only files (the host's runc, images)",
            introduced="5.8",
        ),
    ),
}

# Distribution packages known to carry a fix their upstream version predates:
# (os-release ID, package, first fixed package version, CVE). Read from the
# packages' own changelogs; the changelog itself is read too where present.
BACKPORTS: tuple[tuple[str, str, str, str], ...] = (
    ("debian", "runc", "1.1.5+ds1-1+deb12u1", "CVE-2024-21626"),
)


class Verdict(StrEnum):
    FIXED = "fixed"
    NOT_FIXED = "not fixed"
    CANNOT_TELL = "cannot tell"


@dataclass(frozen=True)
class Installed:
    component: str
    version: str | None  # the upstream version the program reports; None: unreadable
    package: str | None = None  # the package it came from
    package_version: str | None = None
    distro: str | None = None  # os-release ID when the distribution built it
    changelog: str | None = None  # the distribution package's changelog, if readable
    exact: bool = True  # False: a distribution kernel whose stable version is not known


@dataclass(frozen=True)
class Judgement:
    component: str
    verdict: Verdict
    detail: str
    fix: str | None = None


# -- version order ----------------------------------------------------------------

_UPSTREAM = re.compile(r"v?(\d+)\.(\d+)(?:\.(\d+))?(?:[-.~]?(alpha|beta|rc)\.?(\d+)?)?")
_PRE = {"alpha": 0, "beta": 1, "rc": 2}
_RELEASE = 3


def version_key(text: str) -> tuple[int, int, int, int, int] | None:
    """An upstream version's order: `1.4.0-rc.3` < `1.4.0`; `1.1.5+ds1` is 1.1.5."""
    found = _UPSTREAM.search(text)
    if found is None:
        return None
    major, minor, patch, pre, number = found.groups()
    rank = _PRE[pre] if pre else _RELEASE
    return int(major), int(minor), int(patch or 0), rank, int(number or 0)


def _order(c: str) -> int:
    if c == "~":
        return -1
    if c.isdigit():
        return 0
    if c.isalpha():
        return ord(c)
    return ord(c) + 256


def _compare_part(a: str, b: str) -> int:
    """dpkg's verrevcmp: non-digits by `_order` (`~` sorts first), digits as numbers."""
    while a or b:
        while (a and not a[0].isdigit()) or (b and not b[0].isdigit()):
            ac = _order(a[0]) if a else 0
            bc = _order(b[0]) if b else 0
            if ac != bc:
                return ac - bc
            a, b = a[1:], b[1:]
        da = re.match(r"\d*", a).group()  # type: ignore[union-attr]
        db = re.match(r"\d*", b).group()  # type: ignore[union-attr]
        if int(da or 0) != int(db or 0):
            return int(da or 0) - int(db or 0)
        a, b = a[len(da) :], b[len(db) :]
    return 0


def _split(version: str) -> tuple[int, str, str]:
    epoch, _, rest = version.rpartition(":") if ":" in version else ("0", "", version)
    upstream, dash, revision = rest.rpartition("-")
    return (int(epoch or 0), upstream, revision) if dash else (int(epoch or 0), rest, "")


def dpkg_compare(a: str, b: str) -> int:
    """Debian's version order (`dpkg --compare-versions`): <0, 0 or >0."""
    (ea, ua, ra), (eb, ub, rb) = _split(a), _split(b)
    if ea != eb:
        return ea - eb
    return _compare_part(ua, ub) or _compare_part(ra, rb)


def fixed_upstream(version: str, advisory: Advisory) -> bool | None:
    """Whether an upstream version has the fix (None: unreadable)."""
    key = version_key(version)
    if key is None:
        return None
    if advisory.introduced is not None:
        intro = version_key(advisory.introduced)
        if intro is not None and key < intro:
            return True  # never affected
    fixes = [k for k in map(version_key, advisory.fixed) if k is not None]
    for fix in fixes:
        if key[:2] == fix[:2]:
            return key >= fix
    return key[:2] > max(fixes)[:2]  # a newer branch than every fixed one; an older: never fixed


# -- the verdict ------------------------------------------------------------------


def _backported(installed: Installed, cve: str) -> bool:
    if installed.changelog is not None and cve in installed.changelog:
        return True
    if installed.package_version is None:
        return False
    return any(
        distro == installed.distro
        and package == installed.package
        and cve == fixed_cve
        and dpkg_compare(installed.package_version, fixed) >= 0
        for distro, package, fixed, fixed_cve in BACKPORTS
    )


def verdict_for(installed: Installed, advisory: Advisory) -> Verdict:
    """One advisory, judged by the rules of the module's docstring."""
    upstream = fixed_upstream(installed.version or "", advisory)
    if upstream is None:
        return Verdict.CANNOT_TELL
    if upstream:
        return Verdict.FIXED
    if installed.distro is not None and _backported(installed, advisory.cve):
        return Verdict.FIXED
    if not advisory.confirmed:
        return Verdict.CANNOT_TELL
    if installed.distro is not None and (installed.changelog is None or not installed.exact):
        return Verdict.CANNOT_TELL
    return Verdict.NOT_FIXED


def _named(installed: Installed) -> str:
    text = f"{installed.component} {installed.version}"
    if installed.package and installed.package_version:
        by = f"{installed.distro.capitalize()} package" if installed.distro else "package"
        text += f" ({by} {installed.package} {installed.package_version})"
    return text


def _cves(advisories: list[Advisory]) -> str:
    return ", ".join(f"{a.cve} (fixed in {' / '.join(a.fixed)}: {a.what})" for a in advisories)


def judge(installed: Installed) -> Judgement:
    """Which escapes `installed` still carries, each named with its fixed release."""
    name = installed.component
    if installed.version is None:
        return Judgement(
            name,
            Verdict.CANNOT_TELL,
            f"cannot tell: the {name} version could not be read",
            f"check {name}'s version by hand against docs/security.md",
        )
    verdicts = {a: verdict_for(installed, a) for a in ADVISORIES[name]}
    missing = [a for a, v in verdicts.items() if v is Verdict.NOT_FIXED]
    unsure = [a for a, v in verdicts.items() if v is Verdict.CANNOT_TELL]
    backported = [
        a.cve
        for a, v in verdicts.items()
        if v is Verdict.FIXED and fixed_upstream(installed.version, a) is False
    ]
    note = f"; fixed by the distribution: {', '.join(backported)}" if backported else ""
    upgrade = f"upgrade {name}: " + _upgrade_hint(name)
    if missing:
        return Judgement(
            name,
            Verdict.NOT_FIXED,
            f"{_named(installed)} is older than the fix of {_cves(missing)}{note}",
            upgrade,
        )
    if unsure:
        why = (
            "the fixed release is not confirmed"
            if all(not a.confirmed for a in unsure)
            else "a distribution build older than the fix, and nothing says it was backported"
        )
        return Judgement(
            name,
            Verdict.CANNOT_TELL,
            f"cannot tell: {_named(installed)} may carry {_cves(unsure)} ({why}){note}",
            upgrade,
        )
    known = ", ".join(a.cve for a in ADVISORIES[name])
    return Judgement(name, Verdict.FIXED, f"{_named(installed)}: fixed ({known}){note}")


def _upgrade_hint(name: str) -> str:
    return {
        RUNC: "the distribution's security update if it has one (apt-get install --only-upgrade"
        " runc), else Docker's own packages (containerd.io ships runc)",
        CONTAINERD: "apt-get install --only-upgrade containerd (or containerd.io)",
        DOCKER: "apt-get install --only-upgrade docker.io (or docker-ce)",
        KERNEL: "install the distribution's current kernel and reboot",
    }[name]


# -- what the programs print ------------------------------------------------------


def program_version(output: str) -> str | None:
    """The version in `runc --version`, `containerd --version`, `dockerd --version`,
    `nvidia-ctk --version` or `nvidia-container-cli --version` output (first line that has one)."""
    for line in output.splitlines():
        words = line.replace(",", " ").split()
        for word in words:
            if version_key(word) is not None and re.match(r"v?\d+\.\d+", word):
                return word.removeprefix("v")
    return None


def kernel_version(release: str, build: str, signature: str | None) -> Installed:
    """The kernel as `uname -r`, `uname -v` and Ubuntu's /proc/version_signature give it."""
    if signature and len(signature.split()) >= 3:
        return Installed(KERNEL, signature.split()[-1], distro="ubuntu")
    debian = re.search(r"Debian (\d+\.\d+\.\d+)", build)
    if debian:
        return Installed(KERNEL, debian.group(1), distro="debian")
    if re.search(r"\.el\d|\.fc\d|\.amzn|-generic|-amd64|-arm64|-cloud|-azure|-aws|-gcp", release):
        return Installed(KERNEL, release, distro="distribution", exact=False)
    return Installed(KERNEL, release)
