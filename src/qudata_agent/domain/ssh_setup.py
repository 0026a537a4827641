"""What runs inside a container to give the renter SSH: the scripts and sshd's config.

Pure text builders. The agent's sshd runs from its own files under
`/etc/qudata/` (config, host keys, authorized_keys) and leaves the image's own
`/etc/ssh` alone. What stays true:
- keys only: no passwords, no keyboard-interactive; root logs in by key;
- the host key (ed25519: milliseconds to make, where RSA-3072 takes most of a
  second on the path to the first login; every OpenSSH since 6.5 and PuTTY
  since 0.68 speak it) is generated once per container and kept in its
  writable layer, so the renter's known_hosts stays valid across restarts;
- every script is idempotent: running it again changes nothing that is right;
- the image's sshd is used when there is one: nothing is installed then;
- an SSH session sees the container's environment (the image's ENV, such as a
  PATH with /opt/conda/bin, and the instance's variables), as the programs
  Docker starts do: sshd's `SetEnv` for every session (OpenSSH 7.8 and later;
  an older sshd gets the config without it) and a file in /etc/profile.d for
  login shells, whose /etc/profile may reset PATH (Debian's does).
"""

from __future__ import annotations

import base64
import re
import shlex
from collections.abc import Iterable, Sequence

QUDATA_DIR = "/etc/qudata"
SSH_DIR = f"{QUDATA_DIR}/ssh"
SSHD_CONFIG = f"{QUDATA_DIR}/sshd_config"
AUTHORIZED_KEYS = f"{SSH_DIR}/authorized_keys"
PROFILE_ENV = "/etc/profile.d/qudata-env.sh"
PID_FILE = "/run/qudata-sshd.pid"
# sshd logs errors only (a failed bind, a broken key file), not every login or
# every bot knocking on a public port, and the file is rotated once past 1 MiB
# when sshd starts: it lives on the renter's disk.
LOG_FILE = "/var/log/qudata-sshd.log"
LOG_KEEP_BYTES = 1024 * 1024

# Exit codes of the provisioning script that mean "cannot be done here".
EXIT_NO_PACKAGE_MANAGER = 40
EXIT_INSTALL_FAILED = 41
EXIT_KEYS_FAILED = 42
EXIT_SSHD_FAILED = 43

SSHD_CONFIG_TEXT = f"""# Written by the QuData agent; the image's own /etc/ssh is not used.
Port 22
HostKey {SSH_DIR}/ssh_host_ed25519_key
PidFile {PID_FILE}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitEmptyPasswords no
AuthorizedKeysFile {AUTHORIZED_KEYS} .ssh/authorized_keys
PrintMotd no
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
# sshd before 8.5 cannot quote these inside a SetEnv value; control characters
# have no place in one either.
_ENV_UNSAFE = re.compile(r'["\\\x00-\x1f\x7f]')
# What the environment adds to the bring-up script, both files quoted into it:
# with the keys it must fit one exec argument (Linux: 128 KiB).
MAX_ENV_BYTES = 24 * 1024


def _script_cost(name: str, value: str) -> int:
    """Bytes a variable adds to the script: its SetEnv pair and its profile line, each
    shell-quoted once more inside the script (every ' becomes five characters)."""
    pair = f'"{name}={value}" '
    line = f"export {name}={shlex.quote(value)}\n"
    return sum(len(text) + 4 * text.count("'") for text in (pair, line))


def session_env(container_env: Iterable[str]) -> list[tuple[str, str]]:
    """The container's `NAME=value` list (Docker's Config.Env) as SSH sessions get it.

    Session variables (HOME, TERM...) are left to sshd, values sshd cannot carry
    are left out, and the whole is capped (MAX_ENV_BYTES in the script); a later
    duplicate wins.
    """
    chosen: dict[str, str] = {}
    for item in container_env:
        name, sep, value = item.partition("=")
        wanted = sep and _ENV_NAME.match(name) and name not in _SESSION_VARS
        if wanted and not _ENV_UNSAFE.search(value):
            chosen[name] = value
    out: list[tuple[str, str]] = []
    size = 0
    for name, value in chosen.items():
        size += _script_cost(name, value)
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


_FIND_SSHD = (
    'find_sshd() { for p in "$(command -v sshd 2>/dev/null)" /usr/sbin/sshd /usr/bin/sshd '
    '/usr/local/sbin/sshd; do [ -n "$p" ] && [ -x "$p" ] && { echo "$p"; return 0; }; done; '
    "return 1; }"
)

# A setup cut short (the agent killed mid-install) leaves its package manager
# running in the container, holding the package lock: the next setup waits for
# it (up to 10 minutes) instead of failing on the lock, and then finds sshd.
_WAIT_PACKAGE_MANAGER = (
    "wait_package_manager() { n=0; while [ $n -lt 600 ]; do busy=; "
    'for c in /proc/[0-9]*/comm; do name=; { read -r name < "$c"; } 2>/dev/null; '
    "case $name in apt|apt-get|dpkg|apk|dnf|microdnf|yum|rpm|zypper) busy=1; break;; esac; "
    "done; "
    '[ -z "$busy" ] && return 0; sleep 1; n=$((n + 1)); done; }'
)

_INSTALL = f"""
if command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  # One unreachable extra source (a CUDA repository, say) fails the update as a
  # whole but leaves the others' lists in place: the install decides.
  apt-get update -qq || echo "apt-get update failed for some sources; trying the install"
  apt-get install -y -qq --no-install-recommends openssh-server || exit {EXIT_INSTALL_FAILED}
elif command -v apk >/dev/null 2>&1; then
  apk add --no-cache openssh-server openssh-keygen || exit {EXIT_INSTALL_FAILED}
elif command -v dnf >/dev/null 2>&1; then
  dnf install -y -q openssh-server || exit {EXIT_INSTALL_FAILED}
elif command -v microdnf >/dev/null 2>&1; then
  microdnf install -y openssh-server || exit {EXIT_INSTALL_FAILED}
elif command -v yum >/dev/null 2>&1; then
  yum install -y -q openssh-server || exit {EXIT_INSTALL_FAILED}
elif command -v zypper >/dev/null 2>&1; then
  zypper -n -q install openssh-server || zypper -n -q install openssh || exit {EXIT_INSTALL_FAILED}
else
  echo "no sshd in the image and no package manager (apt, apk, dnf, microdnf, yum, zypper)"
  exit {EXIT_NO_PACKAGE_MANAGER}
fi
"""


def provision_script(env: Sequence[tuple[str, str]] = ()) -> str:
    """Installs OpenSSH when missing, then lays out the agent's sshd files."""
    config = shlex.quote(sshd_config_text(env))
    plain = shlex.quote(SSHD_CONFIG_TEXT)
    profile = shlex.quote(profile_env_text(env))
    return f"""set -u
{_FIND_SSHD}
{_WAIT_PACKAGE_MANAGER}
wait_package_manager
if ! find_sshd >/dev/null; then
{_INSTALL}
fi
find_sshd >/dev/null || {{ echo "sshd missing after the install"; exit {EXIT_INSTALL_FAILED}; }}
umask 022
D={SSH_DIR}
mkdir -p "$D" /run/sshd /var/log /etc/profile.d
chmod 755 {QUDATA_DIR} "$D"
[ -s "$D/ssh_host_ed25519_key" ] || ssh-keygen -q -t ed25519 -N '' -f "$D/ssh_host_ed25519_key"
printf '%s' {profile} > {PROFILE_ENV}.new && mv -f {PROFILE_ENV}.new {PROFILE_ENV}
printf '%s' {config} > {SSHD_CONFIG}.new && mv -f {SSHD_CONFIG}.new {SSHD_CONFIG}
[ -f {AUTHORIZED_KEYS} ] || : > {AUTHORIZED_KEYS}
# The environment may hold the renter's secrets (tokens in env_variables): root only.
chmod 644 {AUTHORIZED_KEYS}
chmod 600 {SSHD_CONFIG} {PROFILE_ENV}
if ! "$(find_sshd)" -t -f {SSHD_CONFIG} 2>/dev/null; then
  # An sshd older than 7.8 knows no SetEnv: login shells still get the profile file.
  printf '%s' {plain} > {SSHD_CONFIG}.new && mv -f {SSHD_CONFIG}.new {SSHD_CONFIG}
  chmod 600 {SSHD_CONFIG}
  "$(find_sshd)" -t -f {SSHD_CONFIG} || exit {EXIT_INSTALL_FAILED}
fi
"""


# The agent's sshd is up when its pid file names a live process called sshd: a
# pid file left in the writable layer by an earlier run of the container may
# name a pid that another program has in this run.
_SSHD_RUNNING = (
    f'sshd_running() {{ p=$(cat {PID_FILE} 2>/dev/null) && [ -n "$p" ] '
    '&& kill -0 "$p" 2>/dev/null && [ "$(cat "/proc/$p/comm" 2>/dev/null)" = sshd ]; }'
)

# sshd forks into the background before it binds (OpenSSH 9 exits 0 even when it
# cannot bind) and writes its pid file once it listens: wait for that, ~3 s at
# most. A `sleep` without fractions (rare) waits whole seconds instead.
_WAIT_SSHD = (
    "wait_sshd() { n=0; while [ $n -lt 600 ]; do sshd_running && return 0; "
    "if sleep 0.005 2>/dev/null; then n=$((n + 1)); else sleep 1; n=$((n + 200)); fi; "
    "done; return 1; }"
)


def start_script() -> str:
    """Starts the agent's sshd unless it already runs, and waits until it listens."""
    return f"""{_FIND_SSHD}
{_SSHD_RUNNING}
{_WAIT_SSHD}
sshd_running && exit 0
rm -f {PID_FILE}
mkdir -p /run/sshd
size=$(wc -c 2>/dev/null < {LOG_FILE} || echo 0)
[ "$size" -gt {LOG_KEEP_BYTES} ] && mv -f {LOG_FILE} {LOG_FILE}.1
"$(find_sshd)" -f {SSHD_CONFIG} -E {LOG_FILE} || exit {EXIT_SSHD_FAILED}
wait_sshd && exit 0
echo "sshd did not start:"
tail -n 3 {LOG_FILE} 2>/dev/null
exit {EXIT_SSHD_FAILED}
"""


def write_keys_script(authorized_keys: str) -> str:
    """Replaces authorized_keys with this text in one rename (sshd never sees half)."""
    encoded = base64.b64encode(authorized_keys.encode()).decode()
    return f"""umask 022
printf '%s' '{encoded}' | base64 -d > {AUTHORIZED_KEYS}.new || exit {EXIT_KEYS_FAILED}
chmod 644 {AUTHORIZED_KEYS}.new && mv -f {AUTHORIZED_KEYS}.new {AUTHORIZED_KEYS} \
  || exit {EXIT_KEYS_FAILED}
"""


def bring_up_script(
    authorized_keys: str, provision: bool, env: Sequence[tuple[str, str]] = ()
) -> str:
    """One exec for a new run: set up (when asked), write the keys, start sshd."""
    parts = [provision_script(env)] if provision else ["set -u"]
    parts += [write_keys_script(authorized_keys), start_script()]
    return "\n".join(parts)
