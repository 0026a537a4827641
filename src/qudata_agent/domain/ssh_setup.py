"""The files of an instance's sshd: its config and the container's environment for sessions.

Pure text builders. The agent's sshd runs from its own bundle and reads only
the instance's own directory (mounted read-only at `INSTANCE_MOUNT`): the
image's `/etc/ssh` is never used. What stays true:
- keys only: no passwords, no keyboard-interactive, no PAM; root logs in by key;
- only the keys given through the API log in: sshd reads the instance's
  mounted authorized_keys and nothing else (not the image's ~/.ssh, no
  command, no certificate authority, no host-based trust), so a key baked
  into an image opens nothing and the API can revoke every key that works;
- the host key is ed25519 (milliseconds to make; every OpenSSH since 6.5 and
  PuTTY since 0.68 speak it), made once per instance on the host;
- SFTP is sshd's own (`internal-sftp`): scp and sftp need nothing from the image;
- an SSH session sees the container's environment (the image's ENV, such as a
  PATH with /opt/conda/bin, and the instance's variables), as the programs
  Docker starts do: sshd's `SetEnv` for every session and a file linked from
  /etc/profile.d for login shells, whose /etc/profile may reset PATH (Debian's does).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Sequence

MOUNT_ROOT = "/.qudata"
BUNDLE_MOUNT = f"{MOUNT_ROOT}/ssh"  # the agent's SSH bundles (read-only, all instances)
INSTANCE_MOUNT = f"{MOUNT_ROOT}/instance"  # this instance's SSH files (read-only, its own)
RUN_DIR = f"{MOUNT_ROOT}/run"  # a tmpfs: fresh on every start of the container
HOST_KEY = "ssh_host_ed25519_key"
SSHD_CONFIG = "sshd_config"
AUTHORIZED_KEYS = "authorized_keys"
ENVIRONMENT = "environment"  # the profile file for login shells
PROFILE_LINK = "/etc/profile.d/qudata-env.sh"
PID_FILE = f"{RUN_DIR}/sshd.pid"
# sshd logs errors only (a failed bind, a broken key file), not every login or
# every bot knocking on a public port, and the file is rotated once past 1 MiB
# when sshd starts: it lives on the renter's disk.
LOG_FILE = "/var/log/qudata-sshd.log"
LOG_KEEP_BYTES = 1024 * 1024

SSHD_CONFIG_TEXT = f"""# Written by the QuData agent; the image's own /etc/ssh is not used.
Port 22
HostKey {INSTANCE_MOUNT}/{HOST_KEY}
PidFile {PID_FILE}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitEmptyPasswords no
UsePAM no
AuthorizedKeysFile {INSTANCE_MOUNT}/{AUTHORIZED_KEYS}
AuthorizedKeysCommand none
AuthorizedPrincipalsFile none
AuthorizedPrincipalsCommand none
TrustedUserCAKeys none
HostbasedAuthentication no
IgnoreRhosts yes
PermitUserEnvironment no
PrintMotd no
PrintLastLog no
UseDNS no
X11Forwarding no
AllowTcpForwarding yes
ClientAliveInterval 30
ClientAliveCountMax 6
Subsystem sftp internal-sftp
LogLevel ERROR
"""

# Set per session by sshd or the login, never taken from the container.
_SESSION_VARS = frozenset(
    {"HOME", "HOSTNAME", "LOGNAME", "MAIL", "OLDPWD", "PWD", "SHELL", "SHLVL", "TERM", "USER", "_"}
)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# sshd cannot quote these inside a SetEnv value; control characters have no
# place in one either.
_ENV_UNSAFE = re.compile(r'["\\\x00-\x1f\x7f]')
# What the environment may add to sshd's config and the profile file together:
# sshd reads its whole config into one buffer at every connection.
MAX_ENV_BYTES = 24 * 1024


def _cost(name: str, value: str) -> int:
    """Bytes a variable adds: its SetEnv pair and its profile line."""
    return len(f'"{name}={value}" ') + len(f"export {name}={shlex.quote(value)}\n")


def container_env(image_env: Iterable[str], spec_env: dict[str, str]) -> list[str]:
    """The container's `NAME=value` list as Docker makes it: the image's, then the order's
    (a name the order sets replaces the image's)."""
    merged: dict[str, str] = {}
    for item in image_env:
        name, _, value = item.partition("=")
        merged[name] = value
    merged.update(spec_env)
    return [f"{name}={value}" for name, value in merged.items()]


def session_env(container: Iterable[str]) -> list[tuple[str, str]]:
    """The container's `NAME=value` list (Docker's Config.Env) as SSH sessions get it.

    Session variables (HOME, TERM...) are left to sshd, values sshd cannot carry
    are left out, and the whole is capped (MAX_ENV_BYTES); a later duplicate wins.
    """
    chosen: dict[str, str] = {}
    for item in container:
        name, sep, value = item.partition("=")
        wanted = sep and _ENV_NAME.match(name) and name not in _SESSION_VARS
        if wanted and not _ENV_UNSAFE.search(value):
            chosen[name] = value
    out: list[tuple[str, str]] = []
    size = 0
    for name, value in chosen.items():
        size += _cost(name, value)
        if size > MAX_ENV_BYTES:
            break
        out.append((name, value))
    return out


def sshd_config_text(env: Sequence[tuple[str, str]] = ()) -> str:
    """The agent's sshd_config; with `env`, one SetEnv line (sshd takes only the first)."""
    if not env:
        return SSHD_CONFIG_TEXT
    pairs = " ".join(f'"{name}={value}"' for name, value in env)
    return f"{SSHD_CONFIG_TEXT}SetEnv {pairs}\n"


def profile_env_text(env: Sequence[tuple[str, str]]) -> str:
    lines = ["# Written by the QuData agent: the container's environment for login shells."]
    lines += [f"export {name}={shlex.quote(value)}" for name, value in env]
    return "\n".join(lines) + "\n"
