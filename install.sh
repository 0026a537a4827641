#!/usr/bin/env bash
# Installs or upgrades the QuData host agent on Debian 12 or Ubuntu 22.04/24.04.
#
#   sudo bash install.sh API_KEY                          # from a checkout of the agent
#   curl -fsSL URL/install.sh | sudo bash -s -- API_KEY --source URL/qudata-agent.tar.gz
#
# There is no package index for the agent itself: the package is installed from
# the checkout this script sits in, or from --source (a directory, a tarball, or
# an http(s) URL of a tarball). What it does, each step only when needed:
#   - the Docker engine (the distribution's docker.io) when there is none;
#   - what the agent's SSH for instances is made from: the distribution's
#     openssh-server, patchelf and busybox-static (nothing goes into images);
#   - with an NVIDIA GPU on the PCI bus: checks the driver (installs a packaged
#     one only with --install-driver; it needs a reboot), installs the NVIDIA
#     Container Toolkit and registers its runtime with Docker;
#   - the agent in its own venv under /opt/qudata-agent (never the system
#     Python): a new venv per install, switched to only once it works;
#   - /etc/qudata-agent/agent.env (mode 0600) with the API key, the state dir
#     /var/lib/qudata-agent (0700), and the systemd unit (no key in it);
#   - enables and (re)starts the service, shows its status, runs `doctor`.
# Running it again upgrades in place: the agent's identity, secrets, state and
# configuration are kept (a key given again replaces the old one), and the
# restarted agent adopts the running instances.
set -euo pipefail

PREFIX=/opt/qudata-agent
CONF_DIR=/etc/qudata-agent
ENV_FILE=$CONF_DIR/agent.env
STATE_DIR=/var/lib/qudata-agent
UNIT=qudata-agent.service
UNIT_FILE=/etc/systemd/system/$UNIT
LINK=/usr/local/bin/qudata-agent
KEEP_VENVS=2 # the current one and the previous one (to roll back to)
# Where NVIDIA GPUs are looked for (the entries lspci reads); tests give a fake bus.
PCI_DEVICES=${QUDATA_INSTALL_PCI_DEVICES:-/sys/bus/pci/devices}

DRY_RUN=0
INSTALL_DRIVER=0
SOURCE=
API_KEY=${QUDATA_API_KEY:-}
API_URL=
SYSTEMD=0
APT_UPDATED=0
NEED_REBOOT=0
OS_ID=
OS_VERSION=
PYTHON=
SRC_DIR=
VERSION=
WORK=

usage() {
  cat <<'EOF'
usage: install.sh [options] [API_KEY]

  API_KEY            the control-plane API key (or QUDATA_API_KEY in the environment);
                     needed on the first install, optional on an upgrade (kept)
  --source SRC       install the agent from SRC: a directory, a tarball, or an
                     http(s) URL of a tarball (default: the checkout install.sh is in)
  --api-url URL      control-plane base URL (QUDATA_API_URL in the config file)
  --install-driver   with an NVIDIA GPU and no working driver: install the
                     distribution's packaged driver (a reboot is needed after it)
  --dry-run          print each step and command without changing anything
  -h, --help         this text
EOF
}

say() { printf '==> %s\n' "$*"; }
note() { printf '    %s\n' "$*"; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

# run CMD...: runs it, or in a dry run only prints it.
run() {
  if [ "$DRY_RUN" = 1 ]; then
    printf '    would run:'
    printf ' %q' "$@"
    printf '\n'
    return 0
  fi
  "$@"
}

# would WHAT: true in a dry run, after saying what would be done.
would() {
  [ "$DRY_RUN" = 1 ] || return 1
  printf '    would %s\n' "$*"
}

# write_file PATH MODE: stdin to PATH atomically, created with MODE from its first byte.
write_file() {
  local path=$1 mode=$2 tmp
  tmp=$(umask 077 && mktemp "$path.XXXXXX")
  cat >"$tmp"
  chmod "$mode" "$tmp"
  mv -f "$tmp" "$path"
}

parse_args() {
  local positional=()
  while [ $# -gt 0 ]; do
    case $1 in
      --dry-run) DRY_RUN=1 ;;
      --install-driver) INSTALL_DRIVER=1 ;;
      --source) SOURCE=${2:?--source needs a value}; shift ;;
      --source=*) SOURCE=${1#*=} ;;
      --api-url) API_URL=${2:?--api-url needs a value}; shift ;;
      --api-url=*) API_URL=${1#*=} ;;
      -h | --help) usage; exit 0 ;;
      --) shift; positional+=("$@"); break ;;
      -*) die "unknown option $1 (see --help)" ;;
      *) positional+=("$1") ;;
    esac
    shift
  done
  [ ${#positional[@]} -le 1 ] || die "one API key at most (see --help)"
  [ ${#positional[@]} -eq 0 ] || API_KEY=${positional[0]}
  if [ -n "$API_KEY" ] && ! [[ $API_KEY =~ ^[A-Za-z0-9._~+/=:-]+$ ]]; then
    die "the API key holds characters an API key never has (spaces, quotes, ...)"
  fi
  if [ -n "$API_URL" ] && ! [[ $API_URL =~ ^https?://[^[:space:]\"\']+$ ]]; then
    die "--api-url: expected an http(s) URL"
  fi
}

preflight() {
  if [ "$(id -u)" -ne 0 ]; then
    [ "$DRY_RUN" = 1 ] || die "run as root (sudo bash install.sh ...)"
    warn "not root: fine for --dry-run only"
  fi
  [ -r /etc/os-release ] || die "no /etc/os-release: supported are Debian 12 and Ubuntu 22.04/24.04"
  OS_ID=$(. /etc/os-release && echo "${ID:-}")
  OS_VERSION=$(. /etc/os-release && echo "${VERSION_ID:-}")
  case "$OS_ID $OS_VERSION" in
    "debian 12" | "ubuntu 22.04" | "ubuntu 24.04") ;;
    *) die "unsupported system '$OS_ID $OS_VERSION': supported are Debian 12 and Ubuntu 22.04/24.04" ;;
  esac
  command -v apt-get >/dev/null || die "apt-get is missing"
  if [ -z "$API_KEY" ] && [ ! -f "$ENV_FILE" ]; then
    die "the first install needs the API key: install.sh API_KEY (see --help)"
  fi
  # sd_booted(): systemd is PID 1 exactly when this directory exists.
  [ -d /run/systemd/system ] && SYSTEMD=1
  say "installing the QuData host agent on $OS_ID $OS_VERSION$([ "$DRY_RUN" = 1 ] && echo ' (dry run: nothing is changed)')"
}

# apt_install PKG...: installs those not installed yet.
apt_install() {
  local missing=() pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$APT_UPDATED" = 0 ]; then
    run apt-get update -q
    APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive run apt-get install -y -qq -o Dpkg::Use-Pty=0 \
    --no-install-recommends "${missing[@]}"
}

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

step_python() {
  say "Python 3.11 or newer (for the agent's own venv)"
  if ! PYTHON=$(find_python); then
    if [ "$OS_ID $OS_VERSION" = "ubuntu 22.04" ]; then
      apt_install python3.11 python3.11-venv # its python3 is 3.10
    else
      apt_install python3 python3-venv
    fi
    if ! PYTHON=$(find_python); then
      [ "$DRY_RUN" = 1 ] || die "no Python 3.11 or newer could be installed"
      PYTHON=python3
      return 0
    fi
  fi
  # Debian and Ubuntu ship the venv module (ensurepip) in a package of its own.
  if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
    apt_install "$(basename "$PYTHON")-venv" # python3-venv, or python3.11-venv
  fi
  note "$("$PYTHON" --version 2>&1) at $PYTHON"
}

docker_answers() { docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }

step_docker() {
  say "Docker engine"
  if command -v dockerd >/dev/null; then
    note "found: $(dockerd --version 2>/dev/null || echo dockerd)"
  else
    apt_install docker.io
  fi
  if [ "$SYSTEMD" = 1 ]; then
    run systemctl enable --now docker.service
  elif docker_answers; then
    note "dockerd answers"
  else
    warn "systemd is not running here, so this script does not start dockerd:" \
      "start it yourself (e.g. 'dockerd &'); the agent needs it"
  fi
}

step_ssh() {
  say "SSH for instances (the host's OpenSSH server, patchelf, a static busybox)"
  apt_install openssh-server patchelf busybox-static
}

nvidia_gpus_on_bus() {
  local n=0 dev
  for dev in "$PCI_DEVICES"/*; do
    { [ -r "$dev/vendor" ] && [ -r "$dev/class" ]; } || continue
    [ "$(cat "$dev/vendor")" = 0x10de ] || continue
    case $(cat "$dev/class") in 0x03*) n=$((n + 1)) ;; esac # display or 3D controller
  done
  echo "$n"
}

install_driver() {
  case $OS_ID in
    ubuntu)
      apt_install ubuntu-drivers-common
      run ubuntu-drivers install
      ;;
    debian)
      local list=/etc/apt/sources.list.d/qudata-nonfree.list
      if [ ! -f "$list" ]; then
        would "write $list (bookworm contrib non-free non-free-firmware)" ||
          echo "deb http://deb.debian.org/debian bookworm contrib non-free non-free-firmware" |
          write_file "$list" 0644
        APT_UPDATED=0
      fi
      apt_install "linux-headers-$(uname -r)" nvidia-driver firmware-misc-nonfree
      ;;
  esac
  NEED_REBOOT=1
  warn "the NVIDIA driver was installed: reboot, then run install.sh again"
}

add_toolkit_repo() {
  local key=/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg
  local list=/etc/apt/sources.list.d/nvidia-container-toolkit.list
  local base=https://nvidia.github.io/libnvidia-container
  [ -f "$list" ] && return 0
  apt_install curl gnupg ca-certificates
  would "add NVIDIA's apt repository ($base) to $list" && return 0
  curl -fsSL "$base/gpgkey" | gpg --batch --yes --dearmor -o "$key"
  curl -fsSL "$base/stable/deb/nvidia-container-toolkit.list" |
    sed "s#deb https://#deb [signed-by=$key] https://#g" | write_file "$list" 0644
  APT_UPDATED=0
}

step_nvidia() {
  say "NVIDIA GPUs"
  local count
  count=$(nvidia_gpus_on_bus)
  if [ "$count" -eq 0 ]; then
    note "no NVIDIA GPU on the PCI bus: no driver or NVIDIA Container Toolkit needed" \
      "(this host rents CPU instances only)"
    return 0
  fi
  note "$count NVIDIA GPU(s) on the PCI bus"
  if nvidia-smi -L >/dev/null 2>&1; then
    note "driver $(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1) works"
  elif [ "$INSTALL_DRIVER" = 1 ]; then
    install_driver
  else
    warn "no working NVIDIA driver (nvidia-smi fails): install one and reboot, or rerun" \
      "with --install-driver; until then the host rents CPU instances only"
  fi
  if ! command -v nvidia-ctk >/dev/null; then
    add_toolkit_repo
    apt_install nvidia-container-toolkit
  fi
  if docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q '"nvidia"'; then
    note "Docker has the nvidia runtime"
    return 0
  fi
  run nvidia-ctk runtime configure --runtime=docker
  if [ "$SYSTEMD" = 1 ]; then
    run systemctl restart docker.service
  else
    warn "restart dockerd yourself so that it picks up the nvidia runtime"
  fi
}

script_dir() {
  local self=${BASH_SOURCE[0]:-}
  [ -n "$self" ] && [ -f "$self" ] || return 1 # piped into bash: no file
  (cd "$(dirname "$self")" && pwd)
}

is_agent_tree() { [ -f "$1/pyproject.toml" ] && grep -q '^name = "qudata-agent"' "$1/pyproject.toml"; }

# extract TARBALL: SRC_DIR becomes the agent tree inside it.
extract() {
  local dir=$WORK/source
  mkdir -p "$dir"
  tar -xf "$1" -C "$dir" || die "$1 is not a tarball tar can read"
  SRC_DIR=$(find "$dir" -maxdepth 2 -name pyproject.toml -printf '%h\n' | sort | head -1)
  [ -n "$SRC_DIR" ] || die "$1 holds no pyproject.toml"
}

step_source() {
  say "agent source"
  if [ -z "$SOURCE" ]; then
    { SRC_DIR=$(script_dir) && is_agent_tree "$SRC_DIR"; } ||
      die "install.sh is not in a checkout of the agent: give the package with" \
        "--source DIR|TARBALL|URL (there is no package index for the agent)"
  elif [ -d "$SOURCE" ]; then
    SRC_DIR=$(cd "$SOURCE" && pwd)
  elif [ -f "$SOURCE" ]; then
    extract "$SOURCE"
  elif [[ $SOURCE =~ ^https?:// ]]; then
    if would "download $SOURCE and install the agent from it"; then
      return 0
    fi
    apt_install curl ca-certificates
    curl -fsSL --retry 3 -o "$WORK/source.tar" "$SOURCE" || die "cannot download $SOURCE"
    extract "$WORK/source.tar"
  else
    die "--source $SOURCE: no such directory, file or http(s) URL"
  fi
  is_agent_tree "$SRC_DIR" || die "$SRC_DIR holds no qudata-agent package"
  [ -f "$SRC_DIR/packaging/qudata-agent.service" ] || die "$SRC_DIR has no packaging/qudata-agent.service"
  VERSION=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$SRC_DIR/src/qudata_agent/__init__.py")
  note "qudata-agent ${VERSION:-?} from $SRC_DIR"
}

# Keeps the current venv and the newest KEEP_VENVS-1 others; removes the rest.
prune_venvs() {
  local current others=0 dir
  current=$(readlink -f "$PREFIX/venv")
  while IFS= read -r dir; do
    [ "$(readlink -f "$dir")" = "$current" ] && continue
    others=$((others + 1))
    [ "$others" -lt "$KEEP_VENVS" ] || rm -rf "$dir"
  done < <(find "$PREFIX/venvs" -mindepth 1 -maxdepth 1 -type d -printf '%T@ %p\n' | sort -rn | cut -d' ' -f2-)
}

step_agent() {
  say "the agent, in its own venv under $PREFIX"
  local previous="" new build
  [ -x "$PREFIX/venv/bin/qudata-agent" ] && previous=$("$PREFIX/venv/bin/qudata-agent" version 2>/dev/null || true)
  [ -n "$previous" ] && note "installed now: $previous (upgrading in place; identity and state are kept)"
  new=$PREFIX/venvs/${VERSION:-unknown}-$(date -u +%Y%m%d%H%M%S)
  if would "create the venv $new, pip-install the agent into it, point $PREFIX/venv at it," \
    "link $LINK, and keep $KEEP_VENVS venvs"; then
    return 0
  fi
  install -d -m 0755 "$PREFIX" "$PREFIX/venvs"
  # Build from a copy: pip builds in the tree, and a checkout stays untouched (and not root's).
  build=$WORK/build
  mkdir -p "$build"
  cp -r "$SRC_DIR/pyproject.toml" "$SRC_DIR/README.md" "$SRC_DIR/src" "$build/"
  rm -rf "$build"/src/*.egg-info
  find "$build" -name __pycache__ -prune -exec rm -rf {} +
  "$PYTHON" -m venv "$new"
  if ! "$new/bin/python" -m pip install -q --disable-pip-version-check "$build" ||
    ! "$new/bin/qudata-agent" version >/dev/null; then
    rm -rf "$new"
    die "the agent could not be installed into a venv (the installed one, if any, is untouched)"
  fi
  ln -sfn "venvs/$(basename "$new")" "$PREFIX/venv.next"
  mv -Tf "$PREFIX/venv.next" "$PREFIX/venv" # atomic switch
  prune_venvs
  [ ! -f "$SRC_DIR/uninstall.sh" ] || install -m 0755 "$SRC_DIR/uninstall.sh" "$PREFIX/uninstall.sh"
  ln -sfn "$PREFIX/venv/bin/qudata-agent" "$LINK"
  note "qudata-agent $("$PREFIX/venv/bin/qudata-agent" version) in $new"
}

# set_var KEY VALUE: sets KEY in the env file, keeping every other line.
set_var() {
  local key=$1 value=$2
  { grep -v -E "^(export[[:space:]]+)?$key=" "$ENV_FILE" || true; echo "$key=$value"; } |
    write_file "$ENV_FILE" 0600
}

step_config() {
  say "configuration: $ENV_FILE (mode 0600; it holds the API key)"
  if [ -f "$ENV_FILE" ]; then
    if [ -n "$API_KEY" ] && ! grep -qxF "QUDATA_API_KEY=$API_KEY" "$ENV_FILE"; then
      would "replace QUDATA_API_KEY in $ENV_FILE" || set_var QUDATA_API_KEY "$API_KEY"
      note "API key replaced"
    else
      note "kept as it is"
    fi
    if [ -n "$API_URL" ] && ! grep -qxF "QUDATA_API_URL=$API_URL" "$ENV_FILE"; then
      would "set QUDATA_API_URL=$API_URL in $ENV_FILE" || set_var QUDATA_API_URL "$API_URL"
    fi
    run chmod 600 "$ENV_FILE"
    return 0
  fi
  run install -d -m 0700 "$CONF_DIR"
  would "write $ENV_FILE with QUDATA_API_KEY=*** and QUDATA_STATE_DIR=$STATE_DIR" && return 0
  {
    echo "# The QuData host agent's configuration, written by install.sh. Mode 0600: it"
    echo "# holds the API key. Any variable of the README's table may be set here;"
    echo "# then: systemctl restart qudata-agent"
    echo "QUDATA_API_KEY=$API_KEY"
    echo "QUDATA_STATE_DIR=$STATE_DIR"
    [ -z "$API_URL" ] || echo "QUDATA_API_URL=$API_URL"
    echo "# QUDATA_PORT_RANGE=40000-49999"
    echo "# QUDATA_LOG_FILE=/var/log/qudata-agent/agent.log"
  } | write_file "$ENV_FILE" 0600
}

step_state() {
  say "state directory: $STATE_DIR (0700; kept across upgrades)"
  if [ -d "$STATE_DIR" ]; then
    [ "$(stat -c %a "$STATE_DIR")" = 700 ] || run chmod 700 "$STATE_DIR"
    note "kept"
  else
    run install -d -m 0700 "$STATE_DIR"
  fi
}

step_unit() {
  say "systemd unit: $UNIT_FILE"
  local rendered
  if [ -z "$SRC_DIR" ]; then
    would "write $UNIT_FILE from the source's packaging/qudata-agent.service"
    return 0
  fi
  rendered=$(sed -e "s|@PREFIX@|$PREFIX|g" -e "s|@ENV_FILE@|$ENV_FILE|g" \
    "$SRC_DIR/packaging/qudata-agent.service")
  if [ -n "$API_KEY" ] && grep -qF -- "$API_KEY" <<<"$rendered"; then
    die "the unit would hold the API key: refusing to write it"
  fi
  if [ -f "$UNIT_FILE" ] && [ "$(cat "$UNIT_FILE")" = "$rendered" ]; then
    note "unchanged"
    return 0
  fi
  would "write $UNIT_FILE (mode 0644, no API key in it)" && return 0
  mkdir -p "$(dirname "$UNIT_FILE")"
  printf '%s\n' "$rendered" | write_file "$UNIT_FILE" 0644
}

step_start() {
  say "service"
  if [ "$SYSTEMD" = 0 ]; then
    warn "systemd is not running here: $UNIT is not enabled or started (its unit file" \
      "is in place for when it is). Start the agent yourself:" \
      "$PREFIX/venv/bin/qudata-agent run --config $ENV_FILE"
    return 0
  fi
  run systemctl daemon-reload
  run systemctl enable --quiet "$UNIT"
  # A first start, or an upgrade: the agent restarts and adopts the running instances.
  run systemctl restart "$UNIT"
  [ "$DRY_RUN" = 1 ] && return 0
  sleep 3
  systemctl --no-pager --lines=10 status "$UNIT" || true
  systemctl is-active --quiet "$UNIT" ||
    warn "$UNIT is not active: journalctl -u qudata-agent -n 50 says why"
}

step_doctor() {
  say "host check (qudata-agent doctor)"
  would "run $PREFIX/venv/bin/qudata-agent doctor --config $ENV_FILE" && return 0
  "$PREFIX/venv/bin/qudata-agent" doctor --config "$ENV_FILE" || true
}

main() {
  parse_args "$@"
  preflight
  WORK=$(mktemp -d /tmp/qudata-install.XXXXXX)
  trap 'rm -rf "$WORK"' EXIT
  if [ "$DRY_RUN" = 0 ]; then
    exec 9>/run/qudata-agent-install.lock
    flock -n 9 || die "another install.sh is running"
  fi
  step_source
  step_python
  step_docker
  step_ssh
  step_nvidia
  step_agent
  step_config
  step_state
  step_unit
  step_start
  step_doctor
  say "done$([ "$DRY_RUN" = 1 ] && echo ' (dry run: nothing was changed)')"
  note "config: $ENV_FILE   state: $STATE_DIR   logs: journalctl -u qudata-agent"
  note "status: qudata-agent status   checks: qudata-agent doctor   remove: $PREFIX/uninstall.sh"
  [ "$NEED_REBOOT" = 0 ] || warn "reboot to load the NVIDIA driver, then run install.sh again"
}

# Everything runs from main, after bash has read the whole script: when it comes
# through a pipe (curl | bash), no command can swallow the rest of it from stdin.
main "$@" </dev/null
