"""The agent's init for SSH-enabled containers, and the spec that runs it.

Pure. An SSH-enabled container starts the agent's init (a busybox shell script
from the agent's SSH bundle, mounted read-only) under Docker's init (tini, PID 1).
The init starts the bundled sshd, then runs what the container would have run
without the agent: the image's ENTRYPOINT with the order's command, as the
image's USER. What stays true:
- nothing is installed into the image and nothing of it is needed but
  /etc/passwd (made when missing) and a shell for root's sessions: the bundle
  brings its own loader and libraries, so any libc (or none) will do;
- sshd listens before the workload starts, so a client never meets a published
  port with nothing behind it;
- the container runs as root (sshd must), the workload as the image's USER
  (dropped with util-linux `setpriv` from the bundle), with the HOME Docker
  would have given it;
- `command: null` keeps the container up whatever the image's entrypoint does:
  it runs with an idle command as its arguments, and when it exits (at once,
  or having ignored them) the init idles on, with sshd;
- a stop (SIGTERM from tini) ends the init and its children at once;
- the init says how sshd fared in a file on a tmpfs (`RUN_DIR`), fresh each
  start: `ready`, or `failed: <reason>`. The tenant can write that file too:
  the agent takes readiness from sshd's banner on the published port, and
  from the file (read from the host, bounded: `adapters.ssh_probe`) only a
  failure's reason, cleaned to one short printable line (`failure_of`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from qudata_agent.domain.container_spec import IDLE_COMMAND, ContainerSpec, Mount
from qudata_agent.domain.ssh_setup import (
    BUNDLE_MOUNT,
    ENVIRONMENT,
    INSTANCE_MOUNT,
    LOG_FILE,
    LOG_KEEP_BYTES,
    PID_FILE,
    PROFILE_LINK,
    RUN_DIR,
    SSHD_CONFIG,
)

CURRENT = f"{BUNDLE_MOUNT}/current"  # the newest bundle (a relative symlink in the mount)
BUSYBOX = f"{CURRENT}/bin/busybox"
INIT = f"{CURRENT}/init.sh"
STATUS_FILE = f"{RUN_DIR}/ssh"
READY = "ready"  # the init's word once sshd listens (the agent trusts the port, not this)
# What an idle instance's image entrypoint gets as its arguments (for an
# entrypoint that ends in `exec "$@"`): the bundle's static busybox, so it
# runs in any image.
IDLE_ARGS: tuple[str, ...] = (BUSYBOX, "sleep", "2147483647")
# Debian's sshd writes a login record to the kernel's audit log for every PTY
# session and ends the session when that is refused: SSH-enabled containers
# keep Docker's default AUDIT_WRITE.
SSH_CAPABILITIES: tuple[str, ...] = ("AUDIT_WRITE",)
RUN_TMPFS = "mode=755,size=1m"
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]+")


@dataclass(frozen=True)
class ImageConfig:
    """What `docker image inspect` says the image runs, and for which platform."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    user: str = ""
    env: tuple[str, ...] = ()
    architecture: str = ""  # Docker's naming: amd64, arm64...
    os: str = "linux"
    volumes: tuple[str, ...] = ()  # the image's VOLUME paths


def unsupported(image: ImageConfig, bundle_arch: str) -> str | None:
    """Why the bundle cannot serve this image (None: it can)."""
    if image.os and image.os != "linux":
        return f"the image is for {image.os}; the agent's SSH serves Linux images only"
    if image.architecture and image.architecture != bundle_arch:
        return (
            f"the image is built for {image.architecture} and the agent's SSH for"
            f" {bundle_arch} (this host's architecture): no SSH on this instance"
        )
    return None


def _sets_home(image: ImageConfig, spec: ContainerSpec) -> bool:
    return "HOME" in spec.env or any(item.startswith("HOME=") for item in image.env)


def ssh_spec(
    spec: ContainerSpec, image: ImageConfig, *, bundles_dir: str, instance_dir: str
) -> ContainerSpec:
    """`spec` changed to start the agent's init, with the bundle and the instance's own
    SSH directory mounted read-only (host paths `bundles_dir` and `instance_dir`)."""
    idle = spec.command == IDLE_COMMAND
    if idle:
        workload = (*image.entrypoint, *IDLE_ARGS) if image.entrypoint else ()
    else:
        workload = (*image.entrypoint, *spec.command)
    home = "0" if _sets_home(image, spec) else "1"
    extra_caps = tuple(c for c in SSH_CAPABILITIES if c not in spec.cap_add)
    return replace(
        spec,
        entrypoint=(BUSYBOX, "sh", INIT),
        command=("idle" if idle else "run", image.user, home, "--", *workload),
        user="0:0",
        mounts=(
            *spec.mounts,
            Mount(source=bundles_dir, target=BUNDLE_MOUNT),
            Mount(source=instance_dir, target=INSTANCE_MOUNT),
        ),
        tmpfs=(*spec.tmpfs, (RUN_DIR, RUN_TMPFS)),
        cap_add=(*spec.cap_add, *extra_caps),
    )


BANNER_BYTES = 256  # RFC 4253: the version line is at most 255 bytes with its CR LF
_SSH_VERSIONS = (b"SSH-2.0-", b"SSH-1.99-")


@dataclass(frozen=True)
class Banner:
    """What the published SSH port answered: an SSH server's version line, or why not."""

    ssh: bool
    detail: str


def banner_of(line: bytes) -> Banner:
    """The first line a server sent (at most BANNER_BYTES of it), judged."""
    line = line[:BANNER_BYTES]
    if line.startswith(_SSH_VERSIONS):
        return Banner(True, _UNPRINTABLE.sub(" ", line.decode("ascii", errors="replace")).strip())
    if not line:
        return Banner(False, "the connection was closed without a word")
    return Banner(False, "the port answers with something other than SSH")


# What the agent reads of the init's word, and keeps of a reason.
WORD_BYTES = 512
REASON_CHARS = 300


def failure_of(word: bytes | None) -> str | None:
    """The init's reason when its word (the status file's bytes, as read) says sshd
    failed; None otherwise. Whatever the tenant wrote there, the reason is one
    printable line of at most REASON_CHARS characters."""
    if not word:
        return None
    first = word[:WORD_BYTES].split(b"\n", 1)[0].decode("utf-8", errors="replace")
    if not first.startswith("failed:"):
        return None
    reason = _UNPRINTABLE.sub(" ", first.removeprefix("failed:")).strip()
    return reason[:REASON_CHARS] or "sshd did not start"


# The init, run by the bundle's static busybox (`sh INIT MODE USER SETHOME -- ARGV...`).
# Every tool is busybox's own applet: the image may have none.
INIT_SCRIPT = f"""# The QuData agent's init: starts the agent's sshd, then the image's workload.
# Arguments: MODE (run|idle) USER (the image's, may be empty) SETHOME (1|0) -- ARGV...
set -f  # no globbing of words taken from logs
B=$(readlink -f {CURRENT})
I={INSTANCE_MOUNT}
mode=$1 user=$2 sethome=$3
shift 4

say() {{ echo "qudata-init: $*" >&2; }}
tell() {{ printf '%s\\n' "$1" > {STATUS_FILE}.new && mv -f {STATUS_FILE}.new {STATUS_FILE}; }}
field() {{ # FILE KEY N: field N of the first entry whose name or id is KEY
  awk -F: -v k="$2" -v n="$3" '$1 == k || $3 == k {{ print $n; exit }}' "$1" 2>/dev/null
}}

accounts() {{
  [ -f /etc/passwd ] || printf 'root:x:0:0:root:/root:/bin/sh\\n' > /etc/passwd || return 1
  # OpenSSH needs its privilege separation user; an image without sshd has none.
  grep -q '^sshd:' /etc/passwd && return 0
  uid=$(awk -F: 'BEGIN {{ u = 74 }} {{ used[$3] = 1 }} END {{ while (u in used) u++; print u }}' \\
    /etc/passwd)
  printf 'sshd:x:%s:65534:sshd privilege separation:/run/sshd:/bin/false\\n' "$uid" \\
    >> /etc/passwd
}}

news() {{ # what sshd logged since it was started, the last 3 lines on one
  [ -f {LOG_FILE} ] && echo $(tail -c +$((size + 1)) {LOG_FILE} | tail -n 3)
}}

start_sshd() {{
  shell=$(field /etc/passwd root 7)
  [ -n "$shell" ] || shell=/bin/sh
  if [ ! -x "$shell" ]; then
    tell "failed: the image has no shell for root's sessions ($shell)"
    return
  fi
  accounts || {{ tell "failed: cannot add the sshd user to /etc/passwd (read-only?)"; return; }}
  mkdir -p /run/sshd /var/log /etc/profile.d 2>/dev/null
  chmod 755 /run/sshd 2>/dev/null
  ln -sf $I/{ENVIRONMENT} {PROFILE_LINK} 2>/dev/null
  size=0
  [ -f {LOG_FILE} ] && size=$(wc -c < {LOG_FILE})
  [ "$size" -gt {LOG_KEEP_BYTES} ] && mv -f {LOG_FILE} {LOG_FILE}.1 && size=0
  # OpenSSH 9.8+ execs helpers by a path compiled in: point it at the bundle's.
  set --
  [ -x "$B/bin/sshd-session" ] && set -- -o "SshdSessionPath=$B/bin/sshd-session"
  [ -x "$B/bin/sshd-auth" ] && set -- "$@" -o "SshdAuthPath=$B/bin/sshd-auth"
  if ! out=$("$B/bin/sshd" -f $I/{SSHD_CONFIG} -E {LOG_FILE} "$@" 2>&1); then
    tell "failed: sshd did not start: $(echo $out $(news))"
    return
  fi
  # sshd forks before it binds and writes its pid file once it listens.
  n=0
  while [ ! -s {PID_FILE} ]; do
    new=$(news)
    if [ -n "$new" ] || [ $n -ge 600 ]; then
      case $new in
        *"Address already in use"*) new="port 22 in the container is taken by another program";;
      esac
      tell "failed: sshd did not start: ${{new:-no word from sshd in 3 s}}"
      return
    fi
    usleep 5000
    n=$((n + 1))
  done
  tell {READY}
}}

as_user() {{ # ARGV...: exec ARGV as the image's USER, as Docker would have
  # Always through setpriv (glibc's execvp): busybox's own exec would run its
  # applet of the same name (sh, env, ls...) instead of the image's program.
  case $user in ""|root|0|0:0|root:root|root:0|0:root) exec "$B/bin/setpriv" -- "$@";; esac
  name=${{user%%:*}} group=
  case $user in *:*) group=${{user#*:}};; esac
  uid=$(field /etc/passwd "$name" 3)
  if [ -n "$uid" ]; then
    gid=$(field /etc/passwd "$name" 4) home=$(field /etc/passwd "$name" 6) groups=--init-groups
  else
    case $name in
      *[!0-9]*) say "unable to find user $name: no matching entries in passwd file"; exit 126;;
    esac
    uid=$name gid=0 home=/ groups=--clear-groups
  fi
  if [ -n "$group" ]; then
    gid=$(field /etc/group "$group" 3)
    if [ -z "$gid" ]; then
      case $group in *[!0-9]*) say "unable to find group $group"; exit 126;; esac
      gid=$group
    fi
    groups=--clear-groups
  fi
  [ "$sethome" = 1 ] && export HOME="${{home:-/}}"
  exec "$B/bin/setpriv" --reuid="$uid" --regid="$gid" $groups -- "$@"
}}

rm -f {STATUS_FILE} {PID_FILE}
start_sshd
[ "$mode" = run ] && as_user "$@"

# Idle: the image's entrypoint (if any) runs beside; the instance stays up for SSH.
ep='' sl=''
trap 'kill -TERM $ep $sl 2>/dev/null; exit 143' TERM INT HUP
if [ $# -gt 0 ]; then
  (as_user "$@") &
  ep=$!
  wait $ep
  say "the image's entrypoint exited (status $?); the instance stays up for SSH"
  ep=
fi
while :; do
  sleep 86400 &
  sl=$!
  wait $sl
done
"""
