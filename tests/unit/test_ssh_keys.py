"""Public-key parsing and the authorized_keys list functions (pure)."""

from __future__ import annotations

import base64
import struct

import pytest

from qudata_agent.domain.ssh_init import INIT_SCRIPT
from qudata_agent.domain.ssh_keys import (
    PublicKey,
    add_key,
    parse_key,
    remove_key,
    render_authorized_keys,
)
from qudata_agent.domain.ssh_setup import SSHD_CONFIG_TEXT
from qudata_agent.errors import InvalidRequest


def _blob(kind: str, payload: bytes = b"\x00" * 32) -> str:
    name = kind.encode()
    return base64.b64encode(struct.pack(">I", len(name)) + name + payload).decode()


ED = f"ssh-ed25519 {_blob('ssh-ed25519')}"
RSA = f"ssh-rsa {_blob('ssh-rsa', b'rsa-body')}"


def test_a_valid_key_with_and_without_comment() -> None:
    key = parse_key(ED + " renter@laptop  ")
    assert (key.kind, key.comment) == ("ssh-ed25519", "renter@laptop")
    assert parse_key(ED).comment == ""
    assert parse_key(f"  {RSA} a comment with spaces ").comment == "a comment with spaces"
    assert parse_key(ED + " x").line() == ED + " x"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "ssh-ed25519",
        "ssh-ed25519 ####",
        f"ssh-ed25519 {_blob('ssh-rsa')}",  # body of another type
        f"ssh-ed25519 {base64.b64encode(b'xy').decode()}",  # too short to hold a type
        f'command="id" {ED}',
        f'from="10.0.0.1" {ED}',
        f"{ED}\n{RSA}",
        f"{ED} comment\x07bell",
        f"ssh-dss {_blob('ssh-dss')}",
        "x" * 20000,
    ],
)
def test_bad_keys_are_refused_naming_the_field(text: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_key(text)
    assert "ssh_pubkey" in caught.value.message


def test_same_key_means_same_type_and_body_whatever_the_comment() -> None:
    keys, added = add_key([], parse_key(ED + " a"))
    assert added
    keys, added = add_key(keys, parse_key(ED + " b"))
    assert not added and len(keys) == 1
    keys, _ = add_key(keys, parse_key(RSA))
    kept, removed = remove_key(keys, parse_key(ED + " another comment"))
    assert removed and [k.kind for k in kept] == ["ssh-rsa"]
    _, removed = remove_key(kept, parse_key(ED))
    assert not removed


def test_removal_is_never_a_substring_match() -> None:
    long_key = parse_key(ED)
    prefix = PublicKey("ssh-ed25519", long_key.blob[:20])
    kept, removed = remove_key([long_key], prefix)
    assert not removed and kept == [long_key]


def test_rendered_file_lists_each_key_once_in_order() -> None:
    text = render_authorized_keys([parse_key(RSA + " one"), parse_key(ED + " two")])
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert lines == [RSA + " one", ED + " two"]


def test_sshd_keeps_to_keys_only_and_the_init_is_shell_syntax() -> None:
    import subprocess

    subprocess.run(["sh", "-n", "-c", INIT_SCRIPT], check=True)
    for line in (
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password",
        "UsePAM no",
        "Subsystem sftp internal-sftp",
    ):
        assert line in SSHD_CONFIG_TEXT.splitlines()
