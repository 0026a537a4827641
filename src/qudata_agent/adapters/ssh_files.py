"""Each instance's own SSH files on the host: `<state>/ssh/instances/<instance id>/`.

That directory is bind-mounted read-only into that instance's container only
(at `INSTANCE_MOUNT`). What stays true:
- the host key (ed25519, made in-process: no fork on a create's path) is made
  once per instance and kept
  until the instance is deleted: stop/start, Docker's restarts and the agent's
  own leave it alone, so the renter's known_hosts stays valid;
- every file is replaced by one rename, so sshd never reads half of one:
  a key added or removed is live at the next login, no exec, no restart of
  sshd, open sessions untouched (the mount is of the directory, so a rename
  inside it shows in the container);
- the host key, the config and the environment (which may hold the renter's
  secrets) are root's alone (0600); authorized_keys and the directory are
  readable (0644/0755), so any user of the container may log in by key.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from qudata_agent.domain.ssh_setup import AUTHORIZED_KEYS, ENVIRONMENT, HOST_KEY, SSHD_CONFIG
from qudata_agent.errors import AgentError

_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\Z")


class SshFilesError(AgentError):
    """An instance's SSH files could not be written (a full disk, say)."""


def _write(path: Path, text: str, mode: int) -> None:
    temp = path.with_name(f".{path.name}.new")
    try:
        with open(temp, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), mode)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except OSError as e:
        temp.unlink(missing_ok=True)
        raise SshFilesError(f"writing {path.name} failed: {e.strerror}") from e


class InstanceSshFiles:
    def __init__(self, root: Path) -> None:
        self._root = root

    def dir_of(self, instance_id: str) -> Path:
        if not _SAFE_ID.match(instance_id):
            raise ValueError(f"not an instance id: {instance_id!r}")
        return self._root / instance_id

    def prepare(
        self, instance_id: str, sshd_config: str, environment: str, authorized_keys: str
    ) -> Path:
        """Lays out the instance's directory (the host key only once); its path."""
        where = self.dir_of(instance_id)
        try:
            where.mkdir(parents=True, exist_ok=True)
            where.chmod(0o755)
        except OSError as e:
            raise SshFilesError(f"cannot make the instance's SSH directory: {e.strerror}") from e
        if not (where / HOST_KEY).is_file():
            self._host_key(where)
        _write(where / AUTHORIZED_KEYS, authorized_keys, 0o644)
        _write(where / ENVIRONMENT, environment, 0o600)
        _write(where / SSHD_CONFIG, sshd_config, 0o600)  # last: its presence means "prepared"
        return where

    def _host_key(self, where: Path) -> None:
        """The private key written last: its presence means the pair is whole."""
        key = Ed25519PrivateKey.generate()
        private = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        _write(where / f"{HOST_KEY}.pub", public.decode() + " qudata-instance\n", 0o644)
        _write(where / HOST_KEY, private.decode(), 0o600)

    def prepared(self, instance_id: str) -> bool:
        return (self.dir_of(instance_id) / SSHD_CONFIG).is_file()

    def write_keys(self, instance_id: str, authorized_keys: str) -> None:
        _write(self.dir_of(instance_id) / AUTHORIZED_KEYS, authorized_keys, 0o644)

    def host_public_key(self, instance_id: str) -> str:
        return (self.dir_of(instance_id) / f"{HOST_KEY}.pub").read_text().strip()

    def instance_ids(self) -> list[str]:
        try:
            return sorted(p.name for p in self._root.iterdir() if p.is_dir())
        except FileNotFoundError:
            return []

    def remove(self, instance_id: str) -> None:
        shutil.rmtree(self.dir_of(instance_id), ignore_errors=True)
