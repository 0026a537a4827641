"""The NVIDIA Container Toolkit's known container escapes, and whether a host's toolkit has them.

Owns the table of escapes with the upstream release that fixed each, the
parse of the version the toolkit prints (`nvidia-ctk --version`,
`nvidia-container-toolkit --version`, `nvidia-container-cli --version`), and
the decision (`toolkit_refusal`) that GPU orders get while the toolkit is
older than its last fixed escape. Pure: the agent, `doctor` and anyone else
share it.

What stays true:
- the comparison is on the upstream version the toolkit reports, never the
  distribution package's revision: a distribution that backports a fix into
  an older upstream version is treated as unfixed (fail closed), and the fix
  named is NVIDIA's own package at the fixed version or later;
- an unreadable version is treated as unfixed too;
- an escape whose fixed release is not confirmed is listed (for `doctor`) but
  does not move the floor: the floor can be raised by the setting
  `QUDATA_NVIDIA_TOOLKIT_MIN`, never lowered below the last confirmed fix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

Version = tuple[int, int, int]


@dataclass(frozen=True)
class Escape:
    cve: str
    fixed_in: Version | None  # None: the fixed release is not confirmed
    what: str


ESCAPES: tuple[Escape, ...] = (
    Escape("CVE-2024-0132", (1, 16, 2), "TOCTOU: a crafted image reaches the host's filesystem"),
    Escape(
        "CVE-2025-23266",
        (1, 17, 8),
        "NVIDIAScape: the enable-cuda-compat hook runs with the image's LD_PRELOAD",
    ),
    Escape("CVE-2026-24260", None, "TOCTOU race in the toolkit (fixed release not confirmed)"),
)


def _fmt(v: Version) -> str:
    return ".".join(map(str, v))


def last_fixed() -> tuple[Version, str]:
    """The newest confirmed fix: (version, CVE)."""
    confirmed = [(e.fixed_in, e.cve) for e in ESCAPES if e.fixed_in is not None]
    version, cve = max(confirmed)
    assert version is not None
    return version, cve


MIN_VERSION, MIN_CVE = last_fixed()
_VERSION = re.compile(r"version\s+v?(\d+)\.(\d+)\.(\d+)", re.IGNORECASE)
_BARE = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)")


def parse_version(text: str) -> Version | None:
    """The first `version X.Y.Z` in a tool's output, or a bare `X.Y.Z[-rev]` (a package's)."""
    m = _VERSION.search(text) or _BARE.match(text.strip())
    return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None


def parse_floor(raw: str) -> Version:
    """A setting's `X.Y.Z`; raises ValueError otherwise."""
    v = _BARE.match(raw.strip())
    if v is None or v.group(0) != raw.strip().lstrip("v"):
        raise ValueError(f"expected X.Y.Z, got {raw!r}")
    return (int(v.group(1)), int(v.group(2)), int(v.group(3)))


def floor(raised: Version | None = None) -> Version:
    """The version GPU orders need: the last confirmed fix, or a higher one the provider set."""
    return max(MIN_VERSION, raised) if raised is not None else MIN_VERSION


def open_escapes(version: Version | None) -> list[Escape]:
    """The confirmed escapes a toolkit of this version still has."""
    return [
        e for e in ESCAPES if e.fixed_in is not None and (version is None or version < e.fixed_in)
    ]


def toolkit_refusal(version: Version | None, raised: Version | None = None) -> str | None:
    """None when GPU orders may run with this toolkit; else why not and the fix."""
    need = floor(raised)
    if version is not None and version >= need:
        return None
    fix = (
        f"upgrade nvidia-container-toolkit to {_fmt(need)} or later from NVIDIA's repository"
        " (install.sh does)"
    )
    if version is None:
        return f"the NVIDIA Container Toolkit's version cannot be read: {fix}"
    cves = ", ".join(e.cve for e in open_escapes(version)) or f"below the floor {_fmt(need)}"
    return (
        f"the NVIDIA Container Toolkit {_fmt(version)} has known container escapes ({cves}): {fix}"
    )


def unconfirmed() -> list[str]:
    """The escapes whose fixed release the agent cannot check (for doctor)."""
    return [e.cve for e in ESCAPES if e.fixed_in is None]
