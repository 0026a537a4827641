# shellcheck shell=bash
# Shared steps of the README's two commands (sourced, not run).
# Each step checks first and only acts when something is missing, so running
# a command twice is quick and harmless.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${QUDATA_VENV:-$ROOT/.venv}

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

need_root() {
  [ "$(id -u)" -eq 0 ] || die "run as root (it installs packages and starts dockerd)"
}

# apt_install PKG...: installs the packages that are not installed yet.
apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
}

# A Python of at least 3.11 (Debian 12 and Ubuntu 24.04 ship one; Ubuntu
# 22.04 gets python3.11 from its own archive).
find_python() {
  local py
  for py in python3 python3.13 python3.12 python3.11; do
    if command -v "$py" >/dev/null &&
      "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      command -v "$py"
      return 0
    fi
  done
  return 1
}

ensure_python() {
  PYTHON=$(find_python) || {
    apt_install python3.11 python3.11-venv
    PYTHON=$(find_python) || die "no Python 3.11 or newer could be installed"
  }
  # Debian's python needs the venv module from a separate package.
  "$PYTHON" -c 'import ensurepip' 2>/dev/null || {
    local v
    v=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    apt_install "python$v-venv"
  }
}

docker_answers() { docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }

# Starts dockerd when its socket does not answer, and waits for it.
ensure_dockerd() {
  apt_install docker.io iptables ca-certificates
  docker_answers && return 0
  say "starting dockerd"
  if [ -d /run/systemd/system ] && systemctl start docker 2>/dev/null; then
    :
  else
    mkdir -p /var/log
    setsid nohup dockerd >>/var/log/qudata-dockerd.log 2>&1 </dev/null &
  fi
  for _ in $(seq 1 60); do
    docker_answers && return 0
    sleep 1
  done
  tail -20 /var/log/qudata-dockerd.log >&2 || true
  die "dockerd did not answer within 60 s"
}

# ensure_venv EXTRAS: the package installed (editable) in $VENV.
ensure_venv() {
  local extras=${1:-}
  ensure_python
  [ -x "$VENV/bin/python" ] || { say "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
  local spec="$ROOT"
  [ -n "$extras" ] && spec="${ROOT}[$extras]"
  say "installing the agent into $VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$spec"
}

# gVisor's runsc as Docker's `runsc` runtime (the sandbox isolation tier), merged
# into daemon.json (other keys kept) and loaded with a SIGHUP: no restart, no
# container stops. The ptrace platform needs no /dev/kvm; the container's own
# network namespace is served by the host's stack (--network=host), which is
# what the firewall rules and port publishing act on.
SANDBOX_RUNTIME_ARGS='["--platform=ptrace", "--network=host"]'
ensure_sandbox_runtime() {
  local daemon_json=/etc/docker/daemon.json
  docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q '"runsc"' && return 0
  say "registering runsc with Docker ($daemon_json)"
  "$VENV/bin/qudata-agent" docker-config merge "$daemon_json" \
    "runtimes.runsc={\"path\": \"$(command -v runsc)\", \"runtimeArgs\": $SANDBOX_RUNTIME_ARGS}" >/dev/null ||
    die "cannot register runsc in $daemon_json"
  # The dockerd behind the default socket (its pid file), not any other one.
  local pid
  pid=$(cat /var/run/docker.pid 2>/dev/null || true)
  [ -n "$pid" ] && kill -HUP "$pid"
  for _ in $(seq 1 20); do
    docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q '"runsc"' && return 0
    sleep 0.5
  done
  die "dockerd did not load the runsc runtime from $daemon_json"
}
