"""The SSH bundle builder's refusals and its optional helpers (the host's own tools:
ldd and patchelf; no Docker). That the bundle runs in containers is tested in
tests/integration/test_ssh_bundle.py."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from qudata_agent.adapters.ssh_bundle import BundleError, SshBundle
from qudata_agent.domain.ssh_setup import BUNDLE_MOUNT


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"sshd": Path("/nonexistent/sshd")}, "install openssh-server"),
        ({"setpriv": Path("/nonexistent/setpriv")}, "install util-linux"),
        ({"patchelf": "no-such-patchelf"}, "install patchelf"),
        ({"busybox": Path("/usr/bin/setpriv")}, "is not static: install busybox-static"),
    ],
)
def test_a_host_without_what_the_bundle_needs_is_told_what_to_install(
    tmp_path: Path, kwargs: dict[str, object], words: str
) -> None:
    with pytest.raises(BundleError) as refused:
        SshBundle(tmp_path / "bundles", **kwargs).ensure()  # type: ignore[arg-type]
    assert words in refused.value.message
    assert not (tmp_path / "bundles" / "current").exists()


def test_helpers_present_on_the_host_are_bundled_and_rewritten_like_sshd(tmp_path: Path) -> None:
    """OpenSSH 9.8+ ships sshd-session and sshd-auth beside sshd; stand-ins here."""
    helpers = (Path("/usr/bin/true"), Path("/nonexistent/sshd-auth"))
    bundle = SshBundle(tmp_path / "bundles", helpers=helpers).ensure()
    root = bundle.bundles_dir / bundle.key
    assert (root / "bin" / "true").is_file() and not (root / "bin" / "sshd-auth").exists()
    interp = subprocess.run(
        ["patchelf", "--print-interpreter", str(root / "bin" / "true")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert interp.stdout.startswith(f"{BUNDLE_MOUNT}/{bundle.key}/lib/")
    plain = SshBundle(tmp_path / "bundles", helpers=()).ensure()
    assert plain.key != bundle.key  # what goes in decides the build
    assert (tmp_path / "bundles" / "current").resolve() == (tmp_path / "bundles" / plain.key)
