"""The state directory's layout: every name in it, and the store's meta keys.

One owner of the names (as dstack's `consts`): the agent, `status`, `doctor`
and the installer's subcommands build each path in the state directory through
`StateDir`, and read or write each meta row of the store through `Meta`; no
other module spells them. The installer (install.sh) names only the directory
and the API-key file; a unit test holds its spelling to this one.

What stays true: a name never changes between versions (an upgrade, and a
rollback, find what the other version wrote); this module only names, it
creates and reads nothing, so any layer may import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DB_FILE = "agent.db"  # the SQLite store (adapters/store.py)
AGENT_SECRET_FILE = "agent_secret"  # noqa: S105 (a file name): the control plane's secret
API_KEY_FILE = "api_key"  # the control-plane API key install.sh writes
TUNNEL_KEY_FILE = "tunnel.key"  # this host's WireGuard private key
TLS_DIR = "tls"  # the agent-made key and certificate of the API port
TLS_KEY_FILE = "key.pem"
TLS_CERT_FILE = "cert.pem"
SSH_DIR = "ssh"  # the instances' SSH bundle and per-instance files
VOLUMES_DIR = "volumes"  # volume images and project folders
METER_FILE = "network-meter.json"  # the network meter's account across restarts
BACKUP_DIR = "backup"  # install.sh's copy of the database before an upgrade
BACKUP_LABEL_FILE = "venv"  # which installed version the backup was taken for


class Meta:
    """The store's meta keys (one row each, a string value)."""

    AGENT_ID = "agent_id"  # this host's identity, made at the first start
    AGENT_PORT = "agent_port"  # the port the API last listened on
    INVENTORY_DIGEST = "inventory_digest"  # set once the control plane accepted the host


@dataclass(frozen=True)
class StateDir:
    """The paths in one state directory (`root`, QUDATA_STATE_DIR)."""

    root: Path

    @property
    def db(self) -> Path:
        return self.root / DB_FILE

    @property
    def agent_secret(self) -> Path:
        return self.root / AGENT_SECRET_FILE

    @property
    def api_key(self) -> Path:
        return self.root / API_KEY_FILE

    @property
    def secret_files(self) -> tuple[Path, ...]:
        """The files doctor holds to mode 0600 (the TLS key has its own folder's mode)."""
        return (self.agent_secret, self.api_key)

    @property
    def tunnel_key(self) -> Path:
        return self.root / TUNNEL_KEY_FILE

    @property
    def tls_dir(self) -> Path:
        return self.root / TLS_DIR

    @property
    def tls_key(self) -> Path:
        return self.tls_dir / TLS_KEY_FILE

    @property
    def tls_cert(self) -> Path:
        return self.tls_dir / TLS_CERT_FILE

    @property
    def ssh_dir(self) -> Path:
        return self.root / SSH_DIR

    @property
    def volumes_dir(self) -> Path:
        return self.root / VOLUMES_DIR

    @property
    def meter_file(self) -> Path:
        return self.root / METER_FILE

    @property
    def backup_dir(self) -> Path:
        return self.root / BACKUP_DIR

    @property
    def backup_db(self) -> Path:
        return self.backup_dir / DB_FILE

    @property
    def backup_label(self) -> Path:
        return self.backup_dir / BACKUP_LABEL_FILE
