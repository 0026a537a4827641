"""The agent's two secrets: the inbound agent secret and the outbound API key.

Owns their values in memory and their files in the state directory. What stays
true: the secret used to check `X-Agent-Secret` is the one in the file; a new
secret from the control plane replaces the file first, then the value in
memory; every value is registered with the log redactor before it can be
logged by anyone; a standalone agent always has a secret (generated once).
"""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import Protocol

from qudata_agent import logs

log = logging.getLogger(__name__)


class SecretStore(Protocol):
    path: Path

    def read(self) -> str | None: ...

    def write(self, value: str) -> None: ...


class Credentials:
    def __init__(self, secret_file: SecretStore, api_key_file: SecretStore) -> None:
        self._secret_file = secret_file
        self._api_key_file = api_key_file
        self._secret = secret_file.read()
        logs.redact(self._secret)

    @property
    def secret_path(self) -> Path:
        return self._secret_file.path

    @property
    def api_key_path(self) -> Path:
        return self._api_key_file.path

    def agent_secret(self) -> str | None:
        """The secret that inbound calls must present (None: none known yet)."""
        return self._secret

    def replace_secret(self, value: str) -> bool:
        """Stores a new secret; returns False when it equals the current one."""
        if value == self._secret:
            return False
        logs.redact(value)
        self._secret_file.write(value)
        self._secret = value
        log.info("agent secret replaced", extra={"path": str(self.secret_path)})
        return True

    def ensure_secret(self) -> str:
        """For standalone mode: the stored secret, or a new random one."""
        if self._secret is None:
            self.replace_secret(secrets.token_urlsafe(32))
        assert self._secret is not None
        return self._secret

    def api_key(self, configured: str | None) -> str | None:
        """The configured key (then kept in its file), else the one kept earlier."""
        if configured:
            logs.redact(configured)
            if self._api_key_file.read() != configured:
                self._api_key_file.write(configured)
            return configured
        stored = self._api_key_file.read()
        logs.redact(stored)
        return stored
