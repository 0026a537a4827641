"""SSH public keys: parsing, identity, and the authorized_keys text built from them.

Pure list functions, separate from any file or container I/O. What stays true:
- a key is accepted only when it is one line `TYPE BASE64 [COMMENT]` of a known
  type whose decoded blob names the same type; authorized_keys options
  (`command=`, `from=`, ...) are refused, since a renter's key must not carry
  restrictions or forced commands the agent did not write;
- two keys are the same key when their type and blob are the same, whatever
  their comments; removal matches exactly that, never a substring;
- the rendered file lists each key once, in the order they were added.
"""

from __future__ import annotations

import base64
import binascii
import re
import struct
from dataclasses import dataclass

from qudata_agent.errors import InvalidRequest

KEY_TYPES = frozenset(
    {
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    }
)
MAX_KEY_CHARS = 16 * 1024
_COMMENT_OK = re.compile(r"^[\x20-\x7e]*$")


@dataclass(frozen=True)
class PublicKey:
    kind: str
    blob: str  # base64, as written
    comment: str = ""

    @property
    def identity(self) -> tuple[str, str]:
        return (self.kind, self.blob)

    def line(self) -> str:
        return f"{self.kind} {self.blob}" + (f" {self.comment}" if self.comment else "")


def _blob_type(blob: bytes) -> str | None:
    if len(blob) < 4:
        return None
    (length,) = struct.unpack(">I", blob[:4])
    if length > len(blob) - 4:
        return None
    try:
        return blob[4 : 4 + length].decode("ascii")
    except UnicodeDecodeError:
        return None


def parse_key(text: str, field: str = "ssh_pubkey") -> PublicKey:
    """One public key from `text`; InvalidRequest naming `field` otherwise."""
    if len(text) > MAX_KEY_CHARS:
        raise InvalidRequest(f"field '{field}': key longer than {MAX_KEY_CHARS} characters")
    stripped = text.strip()
    if not stripped or "\n" in stripped or "\r" in stripped or "\x00" in stripped:
        raise InvalidRequest(f"field '{field}': expected exactly one key on one line")
    parts = stripped.split(None, 2)
    kind = parts[0]
    if kind not in KEY_TYPES:
        raise InvalidRequest(
            f"field '{field}': not a public key of a supported type "
            "(options such as command= or from= are not accepted)"
        )
    if len(parts) < 2:
        raise InvalidRequest(f"field '{field}': the key body is missing")
    blob_text = parts[1]
    try:
        blob = base64.b64decode(blob_text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"field '{field}': the key body is not base64") from None
    if _blob_type(blob) != kind:
        raise InvalidRequest(f"field '{field}': the key body does not hold a {kind} key")
    comment = parts[2].strip() if len(parts) > 2 else ""
    if not _COMMENT_OK.match(comment):
        raise InvalidRequest(f"field '{field}': the comment holds control characters")
    return PublicKey(kind, blob_text, comment)


def add_key(keys: list[PublicKey], key: PublicKey) -> tuple[list[PublicKey], bool]:
    """`keys` with `key` appended; False when the same key is already there."""
    if any(k.identity == key.identity for k in keys):
        return keys, False
    return [*keys, key], True


def remove_key(keys: list[PublicKey], key: PublicKey) -> tuple[list[PublicKey], bool]:
    """`keys` without `key` (matched on type and body); False when it was not there."""
    kept = [k for k in keys if k.identity != key.identity]
    return kept, len(kept) != len(keys)


def render_authorized_keys(keys: list[PublicKey]) -> str:
    header = "# Managed by the QuData agent: changes here are overwritten.\n"
    return header + "".join(k.line() + "\n" for k in keys)
