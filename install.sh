#!/usr/bin/env bash
# Installs or upgrades the QuData host agent on Debian 12/13 or Ubuntu 22.04/24.04.
#
#   sudo bash install.sh --api-key-file KEYFILE          # from a checkout of the agent
#   curl -fsSL URL/install.sh | sudo bash -s -- --api-key-file KEYFILE --source URL/agent.tar.gz
#
# There is no package index for the agent itself: the package is installed from
# the checkout this script sits in, or from --source (a directory, a tarball, or
# an http(s) URL of a tarball). What it does, each step only when needed:
#   - the Docker engine (the distribution's docker.io) when there is none, its
#     daemon.json merged (live-restore, pull settings), its packages held;
#   - runc, containerd, Docker and the NVIDIA toolkit upgraded to the latest
#     version the repositories have (security fixes of container escapes);
#   - what the agent's SSH for instances is made from: the distribution's
#     openssh-server, patchelf and busybox-static (nothing goes into images);
#   - with an NVIDIA GPU on the PCI bus: checks the driver (installs the server
#     branch only with --install-driver; it needs a reboot), NVSwitch hosts get
#     nvidia-fabricmanager at the driver's version, installs the NVIDIA
#     Container Toolkit and registers its runtime with Docker; the driver's
#     packages are held from unattended upgrades;
#   - the tenant port range reserved from the kernel's ephemeral ports (sysctl.d);
#   - the agent in its own venv under /opt/qudata-agent (never the system
#     Python): a new venv per new version, switched to only once it works;
#   - /etc/qudata-agent/agent.env (0600; settings, no key), the API key alone in
#     the state dir /var/lib/qudata-agent (0700), the systemd unit (no key in it)
#     and the unit that puts the tenant firewall in before Docker at boot;
#   - enables the service and (re)starts it when something changed, runs `doctor`.
# Running it again upgrades in place: the agent's identity, secrets, state and
# configuration are kept (a key given again replaces the old one), the database
# is backed up before the new version starts, and the restarted agent adopts
# the running instances. A run with nothing to change changes nothing (no new
# venv, no restart). `--rollback` goes back to the previous version.
#
# Exit codes: 0 done; 1 a step failed; 2 bad usage; 3 the service is not active
# afterwards; 4 `qudata-agent doctor` found a failure (with --strict only).
set -euo pipefail

PREFIX=/opt/qudata-agent
CONF_DIR=/etc/qudata-agent
ENV_FILE=$CONF_DIR/agent.env
PROXY_FILE=$CONF_DIR/proxy.env
STATE_DIR=/var/lib/qudata-agent
# The one name in the state dir this script writes itself (the agent's state_dir.py
# owns the names; tests/unit/test_install_names.py holds this one to it). The
# database and its backup are reached through `qudata-agent state`.
KEY_FILE=$STATE_DIR/api_key
UNIT=qudata-agent.service
UNIT_FILE=/etc/systemd/system/$UNIT
# The tenant firewall at boot, before Docker starts containers (the agent may not be up).
FW_UNIT=qudata-agent-firewall.service
FW_UNIT_FILE=/etc/systemd/system/$FW_UNIT
LINK=/usr/local/bin/qudata-agent
AGENT=$PREFIX/venv/bin/qudata-agent # the installed agent's command line
DAEMON_JSON=/etc/docker/daemon.json
SYSCTL_FILE=/etc/sysctl.d/60-qudata-agent.conf
DEFAULT_AGENT_PORT=1024 # fixed, so that fleets can write firewall rules for it
DEFAULT_PORT_RANGE=40000-49999
# Where NVIDIA devices are looked for (the entries lspci reads); tests give a fake bus.
PCI_DEVICES=${QUDATA_INSTALL_PCI_DEVICES:-/sys/bus/pci/devices}

DRY_RUN=0
INSTALL_DRIVER=0
STRICT=0
ROLLBACK=0
HOLD=1
SOURCE=
API_KEY=${QUDATA_API_KEY:-}
API_KEY_FILE=
API_URL=
AGENT_PORT=
PROXY=${HTTPS_PROXY:-${https_proxy:-}}
NO_PROXY_LIST=${NO_PROXY:-${no_proxy:-}}
MAX_DOWNLOADS=
MIRRORS=()
SETTINGS=()
TUNNEL=""
SANDBOX=0     # --sandbox: gVisor's runsc registered as Docker's runsc runtime
SANDBOX_GPU=0 # --sandbox-gpu: a gVisor release with nvproxy (GPUs in the sandbox)
RUNSC=
# gVisor's release bucket (a runsc binary and its SHA-512 per architecture).
GVISOR_URL=${QUDATA_INSTALL_GVISOR_URL:-https://storage.googleapis.com/gvisor/releases/release/latest}
CHANGED=0       # something the agent reads changed: it is restarted
TOUCHED=0       # anything on the host changed (a file written, a command run)
VENV_SWITCHED=0 # a new version was switched in
SYSTEMD=0
APT_UPDATED=0
WROTE_UNIT=0    # step_unit: a unit file was written
NEED_REBOOT=0
OS_ID=
OS_VERSION=
PYTHON=
SRC_DIR=
SRC_HASH=
VERSION=
WORK=
STEP=

usage() {
  cat <<'EOF'
usage: install.sh [options]

  --api-key-file FILE   read the control-plane API key from FILE, or from standard
                        input with '-'; needed on the first install, kept on an
                        upgrade (a key is never an argument: `ps` would show it)
  --source SRC          install the agent from SRC: a directory, a tarball, or an
                        http(s) URL of a tarball (default: the checkout install.sh is in)
  --api-url URL         control-plane base URL (QUDATA_API_URL)
  --agent-port PORT     the agent's API port (QUDATA_AGENT_PORT), written on the
                        first install: 1024 unless given, fixed for firewall rules
  --set KEY=VALUE       a setting of the README's table into agent.env (repeatable)
  --tls MODE            the API port's TLS (QUDATA_TLS): on (TLS beside plain HTTP,
                        the agent's default), required (plain HTTP refused: for a
                        control plane that calls https:// and pins the key) or off
  --tunnel SPEC         tunnel mode, for a host behind NAT (README, "Hosts behind
                        NAT"): SPEC is RELAY:PORT,RELAY_KEY,ADDRESS/PREFIX,PUBLIC_IP,
                        or `init` when the control plane sends them; installs
                        wireguard-tools (and wireguard-go without kernel WireGuard)
  --proxy URL           HTTPS_PROXY and HTTP_PROXY for the agent (default: the
                        HTTPS_PROXY this script runs with); NO_PROXY goes along
  --max-concurrent-downloads N
                        Docker's parallel layer downloads per pull (daemon.json)
  --registry-mirror URL a registry mirror for Docker Hub pulls (daemon.json
                        registry-mirrors; repeatable)
  --install-driver      with an NVIDIA GPU and no working driver: install the
                        server driver branch (a reboot is needed after it)
  --no-hold             leave the Docker and NVIDIA packages unheld (apt-mark)
  --sandbox             offer the sandbox isolation tier: gVisor's runsc (the
                        distribution's package) registered in daemon.json as the
                        runsc runtime
  --sandbox-gpu         the same with gVisor's newest release (checksum verified)
                        and nvproxy on, so sandboxes may have GPUs (where that
                        release supports the host's driver)
  --strict              exit 4 when `qudata-agent doctor` finds a failure
  --rollback            go back to the previous version (its venv, and the
                        database saved before the upgrade when the upgrade changed
                        its schema) and restart the agent
  --dry-run             print each step and command without changing anything
  -h, --help            this text

exit codes: 0 done, 1 a step failed, 2 bad usage, 3 the service is not active
afterwards, 4 doctor found a failure (--strict)
EOF
}

say() { printf '==> %s\n' "$*"; }
note() { printf '    %s\n' "$*"; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}
usage_error() {
  printf 'error: %s (see --help)\n' "$*" >&2
  exit 2
}
step() {
  STEP=$1
  say "$1"
}

# run CMD...: runs it, or in a dry run only prints it.
run() {
  if [ "$DRY_RUN" = 1 ]; then
    printf '    would run:'
    printf ' %q' "$@"
    printf '\n'
    return 0
  fi
  TOUCHED=1
  "$@"
}

# would WHAT: true in a dry run, after saying what would be done.
would() {
  [ "$DRY_RUN" = 1 ] || return 1
  printf '    would %s\n' "$*"
}

# write_file PATH MODE: stdin to PATH atomically, created with MODE from its first byte.
# Explicit `|| die`s: set -e does not apply where a caller tests the result.
write_file() {
  local path=$1 mode=$2 tmp
  mkdir -p "$(dirname "$path")" || die "cannot create the directory of $path"
  tmp=$(umask 077 && mktemp "$path.XXXXXX") || die "cannot write $path"
  TOUCHED=1
  { cat >"$tmp" && chmod "$mode" "$tmp" && mv -f "$tmp" "$path"; } || {
    rm -f "$tmp"
    die "cannot write $path"
  }
}

# write_if_changed PATH MODE: like write_file, but only when the content differs;
# true when it wrote.
write_if_changed() {
  local path=$1 mode=$2 content
  content=$(cat)
  if [ -f "$path" ] && [ "$(cat "$path")" = "$content" ]; then
    return 1
  fi
  printf '%s\n' "$content" | write_file "$path" "$mode"
}

valid_url() { [[ $1 =~ ^https?://[^[:space:]\"\'\;\`\$\\]+$ ]]; }

set_option() {
  local name=$1 value=$2
  case $name in
    --source) SOURCE=$value ;;
    --api-url)
      valid_url "$value" || usage_error "--api-url: expected an http(s) URL"
      API_URL=$value
      ;;
    --api-key-file) API_KEY_FILE=$value ;;
    --agent-port)
      if ! [[ $value =~ ^[0-9]{1,5}$ ]] || [ "$value" -lt 1 ] || [ "$value" -gt 65535 ]; then
        usage_error "--agent-port: expected a port 1-65535"
      fi
      AGENT_PORT=$value
      ;;
    --set)
      [[ $value =~ ^(QUDATA_[A-Z0-9_]+|DOCKER_HOST)=[^[:space:]\"\'\\]*$ ]] ||
        usage_error "--set: expected QUDATA_NAME=VALUE (no spaces, quotes or backslashes)"
      [[ $value != QUDATA_API_KEY=* ]] || usage_error "--set: the API key goes in --api-key-file"
      SETTINGS+=("$value")
      ;;
    --proxy)
      valid_url "$value" || usage_error "--proxy: expected an http(s) URL"
      PROXY=$value
      ;;
    --max-concurrent-downloads)
      if ! [[ $value =~ ^[0-9]{1,2}$ ]] || [ "$value" -lt 1 ] || [ "$value" -gt 64 ]; then
        usage_error "--max-concurrent-downloads: expected 1-64"
      fi
      MAX_DOWNLOADS=$value
      ;;
    --registry-mirror)
      valid_url "$value" || usage_error "--registry-mirror: expected an http(s) URL"
      MIRRORS+=("$value")
      ;;
    --tunnel) set_tunnel "$value" ;;
    --tls)
      [[ $value =~ ^(on|required|off)$ ]] || usage_error "--tls: expected on, required or off"
      SETTINGS+=("QUDATA_TLS=$value")
      ;;
    *) usage_error "unknown option $name" ;;
  esac
}

# set_tunnel SPEC: QUDATA_TUNNEL and its fields into SETTINGS (the agent checks them
# again at start; here only their shape, so that nothing odd reaches agent.env).
set_tunnel() {
  TUNNEL=wireguard
  SETTINGS+=("QUDATA_TUNNEL=wireguard")
  [ "$1" != init ] || return 0
  local endpoint key address public
  IFS=, read -r endpoint key address public <<<"$1"
  [[ $endpoint =~ ^[A-Za-z0-9.-]+:[0-9]{1,5}$ ]] || usage_error "--tunnel: expected RELAY:PORT first"
  [[ $key =~ ^[A-Za-z0-9+/]{43}=$ ]] || usage_error "--tunnel: the relay's key is not a WireGuard key"
  [[ $address =~ ^[0-9.]+/[0-9]{1,2}$ ]] || usage_error "--tunnel: expected this host's ADDRESS/PREFIX"
  [[ $public =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ ]] || usage_error "--tunnel: expected the relay's public IPv4 last"
  SETTINGS+=("QUDATA_TUNNEL_ENDPOINT=$endpoint" "QUDATA_TUNNEL_RELAY_KEY=$key")
  SETTINGS+=("QUDATA_TUNNEL_ADDRESS=$address" "QUDATA_TUNNEL_PUBLIC_ADDRESS=$public")
}

parse_args() {
  while [ $# -gt 0 ]; do
    case $1 in
      --dry-run) DRY_RUN=1 ;;
      --install-driver) INSTALL_DRIVER=1 ;;
      --strict) STRICT=1 ;;
      --rollback) ROLLBACK=1 ;;
      --no-hold) HOLD=0 ;;
      --sandbox) SANDBOX=1 ;;
      --sandbox-gpu) SANDBOX=1 SANDBOX_GPU=1 ;;
      --source | --api-url | --api-key-file | --agent-port | --set | --proxy | \
        --max-concurrent-downloads | --registry-mirror | --tunnel | --tls)
        [ $# -ge 2 ] || usage_error "$1 needs a value"
        set_option "$1" "$2"
        shift
        ;;
      --*=*) set_option "${1%%=*}" "${1#*=}" ;;
      -h | --help)
        usage
        exit 0
        ;;
      -*) usage_error "unknown option $1" ;;
      *) usage_error "a key is never an argument (ps shows it): use --api-key-file FILE, or - for standard input" ;;
    esac
    shift
  done
  if [ -n "$PROXY" ] && ! valid_url "$PROXY"; then
    usage_error "HTTPS_PROXY: expected an http(s) URL"
  fi
}

# read_key: API_KEY from --api-key-file (fd 3 is the script's standard input).
# The key stays in this shell's memory: never an argument of any command.
read_key() {
  [ -n "$API_KEY_FILE" ] || return 0
  local line=
  if [ "$API_KEY_FILE" = - ]; then
    IFS= read -r line <&3 || true
  else
    [ -r "$API_KEY_FILE" ] || usage_error "--api-key-file $API_KEY_FILE cannot be read"
    IFS= read -r line <"$API_KEY_FILE" || true
  fi
  line=${line%$'\r'}
  [ -n "$line" ] || usage_error "--api-key-file $API_KEY_FILE: no key in it"
  API_KEY=$line
}

check_key() {
  if [ -n "$API_KEY" ] && ! [[ $API_KEY =~ ^[A-Za-z0-9._~+/=:-]+$ ]]; then
    usage_error "the API key holds characters an API key never has (spaces, quotes, ...)"
  fi
}

# The key a previous install left: in the state dir, or (older installs) in agent.env.
have_key() { [ -f "$KEY_FILE" ] || grep -q '^QUDATA_API_KEY=.' "$ENV_FILE" 2>/dev/null; }

preflight() {
  if [ "$(id -u)" -ne 0 ]; then
    [ "$DRY_RUN" = 1 ] || die "run as root (sudo bash install.sh ...)"
    warn "not root: fine for --dry-run only"
  fi
  resolve_state_dir # an earlier install may have moved it
  [ -r /etc/os-release ] || die "no /etc/os-release: supported are Debian 12/13 and Ubuntu 22.04/24.04"
  OS_ID=$(. /etc/os-release && echo "${ID:-}")
  OS_VERSION=$(. /etc/os-release && echo "${VERSION_ID:-}")
  case "$OS_ID $OS_VERSION" in
    "debian 12" | "debian 13" | "ubuntu 22.04" | "ubuntu 24.04") ;;
    *) die "unsupported system '$OS_ID $OS_VERSION': supported are Debian 12/13 and Ubuntu 22.04/24.04" ;;
  esac
  command -v apt-get >/dev/null || die "apt-get is missing"
  if [ -z "$API_KEY" ] && [ "$ROLLBACK" = 0 ] && ! have_key; then
    usage_error "the first install needs the API key: --api-key-file FILE (or - for standard input)"
  fi
  # sd_booted(): systemd is PID 1 exactly when this directory exists.
  [ -d /run/systemd/system ] && SYSTEMD=1
  say "installing the QuData host agent on $OS_ID $OS_VERSION$([ "$DRY_RUN" = 1 ] && echo ' (dry run: nothing is changed)')"
}

# apt_install PKG...: installs those not installed yet.
apt_install() {
  local missing=() pkg
  for pkg in "$@"; do
    installed "$pkg" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$APT_UPDATED" = 0 ]; then
    run apt-get update -q
    APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive run apt-get install -y -qq -o Dpkg::Use-Pty=0 \
    --no-install-recommends "${missing[@]}"
}

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "ok installed"; }

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
  step "Python 3.11 or newer (for the agent's own venv)"
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
  step "Docker engine"
  if command -v dockerd >/dev/null; then
    note "found: $(dockerd --version 2>/dev/null || echo dockerd)"
  else
    apt_install docker.io
  fi
  # nft and tc: the network meter, the caps and the egress policy of instances
  command -v nft >/dev/null || apt_install nftables
  command -v tc >/dev/null || apt_install iproute2
  if [ "$SYSTEMD" = 1 ]; then
    if systemctl is-enabled --quiet docker.service 2>/dev/null &&
      systemctl is-active --quiet docker.service; then
      note "docker.service enabled and running"
    else
      run systemctl enable --now docker.service
    fi
  elif docker_answers; then
    note "dockerd answers"
  else
    warn "systemd is not running here, so this script does not start dockerd:" \
      "start it yourself (e.g. 'dockerd &'); the agent needs it"
  fi
}

step_tunnel() {
  [ -n "$TUNNEL" ] || return 0
  step "tunnel mode: WireGuard (wireguard-tools; wireguard-go where the kernel has none)"
  apt_install wireguard-tools iptables iproute2
  if ip link add qudata-wgprobe type wireguard 2>/dev/null; then
    ip link del qudata-wgprobe
    note "the kernel has WireGuard"
  else
    note "the kernel has no WireGuard: wireguard-go (userspace) runs the tunnel"
    apt_install wireguard-go
  fi
}

# tunnel_agent_port: in tunnel mode the relay forwards only the port block, so the
# agent's port is the block's first port unless --agent-port says otherwise.
tunnel_agent_port() {
  [ -n "$TUNNEL" ] && [ -z "$AGENT_PORT" ] || return 0
  local range kv
  range=$(env_value QUDATA_PORT_RANGE)
  for kv in "${SETTINGS[@]+"${SETTINGS[@]}"}"; do
    [[ $kv != QUDATA_PORT_RANGE=* ]] || range=${kv#*=}
  done
  range=${range:-$DEFAULT_PORT_RANGE}
  AGENT_PORT=${range%%-*}
}

step_ssh() {
  step "SSH for instances (the host's OpenSSH server, patchelf, a static busybox)"
  apt_install openssh-server patchelf busybox-static
}

step_volumes() {
  step "Volumes (mkfs.ext4 for loop images; xfs_quota where the state is on XFS)"
  apt_install e2fsprogs util-linux
  local dir=$STATE_DIR
  while [ ! -d "$dir" ]; do dir=$(dirname "$dir"); done
  [ "$(stat -f -c %T "$dir" 2>/dev/null)" != xfs ] || apt_install xfsprogs
}

is_sha512_line() { grep -Eq '^[0-9a-f]{128}( |$)' "$1"; }
is_elf() { [ "$(head -c 4 "$1" | od -An -c | tr -d ' ')" = "177ELF" ]; }

# step_sandbox: gVisor for the sandbox tier (the agent offers it only once a
# probe container starts under it). The distribution's runsc, or with
# --sandbox-gpu gVisor's newest release (nvproxy: GPUs in a sandbox).
step_sandbox() {
  [ "$SANDBOX" = 1 ] || return 0
  step "Sandbox isolation tier (gVisor's runsc)"
  if [ "$SANDBOX_GPU" = 0 ]; then
    apt_install runsc
    RUNSC=/usr/bin/runsc
    note "runsc from the distribution; GPUs stay out of sandboxes (use --sandbox-gpu for them)"
    return 0
  fi
  local arch dest=/usr/local/bin/runsc
  arch=$(uname -m)
  RUNSC=$dest
  would "download $GVISOR_URL/$arch/runsc, check its SHA-512 and install it as $dest" && return 0
  fetch "$GVISOR_URL/$arch/runsc.sha512" "$WORK/runsc.sha512" is_sha512_line
  fetch "$GVISOR_URL/$arch/runsc" "$WORK/runsc" is_elf
  [ "$(sha512sum "$WORK/runsc" | cut -d' ' -f1)" = "$(cut -d' ' -f1 "$WORK/runsc.sha512")" ] ||
    die "the downloaded runsc does not match its SHA-512: nothing was installed"
  install -m 0755 "$WORK/runsc" "$dest"
  TOUCHED=1
  note "runsc $("$dest" --version 2>/dev/null | head -1) in $dest"
  "$dest" nvproxy list-supported-drivers >/dev/null 2>&1 ||
    warn "this runsc has no nvproxy: sandboxes get no GPUs"
}

# docker_settings: the KEY=JSON settings this install merges into daemon.json
# (the URLs are checked by valid_url: no quote or backslash to escape).
docker_settings() {
  echo "live-restore=true"
  [ -z "$MAX_DOWNLOADS" ] || echo "max-concurrent-downloads=$MAX_DOWNLOADS"
  if [ ${#MIRRORS[@]} -gt 0 ]; then
    local list
    list=$(printf '"%s",' "${MIRRORS[@]}")
    echo "registry-mirrors=[${list%,}]"
  fi
  if [ -n "$RUNSC" ]; then
    # --network=host: the container's own namespace through the host's stack (the
    # firewall and the published ports act on it as on any container).
    local args='"--network=host"'
    [ "$SANDBOX_GPU" = 0 ] || args+=', "--nvproxy"'
    echo "runtimes.runsc={\"path\": \"$RUNSC\", \"runtimeArgs\": [$args]}"
  fi
}

# step_docker_config: the settings merged into daemon.json by the agent's own
# `docker-config merge` (every other key kept; a file that is not JSON is refused).
step_docker_config() {
  step "Docker settings: $DAEMON_JSON (live-restore: tenants survive a Docker restart)"
  local result settings=()
  mapfile -t settings < <(docker_settings)
  if [ "$DRY_RUN" = 1 ]; then
    if ! result=$("$AGENT" docker-config merge --dry-run "$DAEMON_JSON" "${settings[@]}" 2>/dev/null); then
      would "merge live-restore into $DAEMON_JSON (with the agent installed above)"
      return 0
    fi
  elif ! result=$("$AGENT" docker-config merge "$DAEMON_JSON" "${settings[@]}"); then
    die "$DAEMON_JSON is not valid JSON: fix it (live-restore must be set there)"
  fi
  if [ "$result" = unchanged ]; then
    note "live-restore on$([ -z "$MAX_DOWNLOADS" ] || echo ", max-concurrent-downloads $MAX_DOWNLOADS")$([ ${#MIRRORS[@]} -eq 0 ] || echo ", registry mirrors ${MIRRORS[*]}")"
    return 0
  fi
  would "merge live-restore$([ -z "$MAX_DOWNLOADS" ] || echo ", max-concurrent-downloads")$([ ${#MIRRORS[@]} -eq 0 ] || echo ", registry-mirrors")$([ -z "$RUNSC" ] || echo ", the runsc runtime") into $DAEMON_JSON and reload dockerd" && return 0
  TOUCHED=1
  note "merged into $DAEMON_JSON"
  # These settings are reloadable: SIGHUP, no restart, no container stops.
  if [ "$SYSTEMD" = 1 ] && systemctl is-active --quiet docker.service; then
    run systemctl reload docker.service
  elif docker_answers; then
    warn "reload dockerd yourself (kill -HUP its pid) so that it reads $DAEMON_JSON"
  fi
}

# count_pci VENDOR CLASS_GLOB: devices of that vendor whose class matches.
count_pci() {
  local n=0 dev class
  for dev in "$PCI_DEVICES"/*; do
    { [ -r "$dev/vendor" ] && [ -r "$dev/class" ]; } || continue
    [ "$(cat "$dev/vendor")" = "$1" ] || continue
    class=$(cat "$dev/class")
    # shellcheck disable=SC2254 # the glob is the point
    case $class in $2) n=$((n + 1)) ;; esac
  done
  echo "$n"
}

nvidia_gpus_on_bus() { count_pci 0x10de '0x03*'; }       # display or 3D controller
nvidia_switches_on_bus() { count_pci 0x10de '0x0680*'; } # NVSwitch: HGX/DGX boards

driver_version() {
  { nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null || true; } | head -1
}

install_driver() {
  case $OS_ID in
    ubuntu)
      apt_install ubuntu-drivers-common
      # The server (GPGPU) branch: the datacenter driver, with fabric manager packages.
      run ubuntu-drivers install --gpgpu
      ;;
    debian)
      local list=/etc/apt/sources.list.d/qudata-nonfree.list codename
      codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
      if [ ! -s "$list" ]; then
        would "write $list ($codename contrib non-free non-free-firmware)" ||
          echo "deb http://deb.debian.org/debian $codename contrib non-free non-free-firmware" |
          write_file "$list" 0644
        APT_UPDATED=0
      fi
      apt_install "linux-headers-$(uname -r)" nvidia-driver firmware-misc-nonfree
      ;;
  esac
  NEED_REBOOT=1
  warn "the NVIDIA driver was installed: reboot, then run install.sh again"
}

# fetch URL DEST CHECK: downloads to a temporary file, runs CHECK on it, and only
# then moves it to DEST; a failed download or check leaves DEST as it was.
fetch() {
  local url=$1 dest=$2 check=$3 tmp
  tmp=$(mktemp "$WORK/fetch.XXXXXX")
  if ! curl -fsSL --retry 3 -o "$tmp" "$url" || [ ! -s "$tmp" ] || ! "$check" "$tmp"; then
    rm -f "$tmp"
    die "cannot download $url (or it is not what it should be): nothing was written to $dest"
  fi
  mkdir -p "$(dirname "$dest")"
  chmod 0644 "$tmp"
  mv -f "$tmp" "$dest"
}

is_apt_list() { grep -q '^deb ' "$1"; }
is_pgp_key() { grep -q 'BEGIN PGP PUBLIC KEY BLOCK' "$1"; }

add_toolkit_repo() {
  local key=/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg
  local list=/etc/apt/sources.list.d/nvidia-container-toolkit.list
  local base=${QUDATA_INSTALL_NVIDIA_REPO:-https://nvidia.github.io/libnvidia-container}
  # -s: an empty file (what a failed download of older versions left) is no list.
  [ -s "$list" ] && [ -s "$key" ] && return 0
  if [ -f "$list" ] && [ ! -s "$list" ]; then
    would "remove the empty $list an earlier failed download left" || rm -f "$list"
  fi
  apt_install curl gnupg ca-certificates
  would "add NVIDIA's apt repository ($base) to $list" && return 0
  fetch "$base/gpgkey" "$WORK/nvidia.asc" is_pgp_key
  gpg --batch --yes --dearmor -o "$WORK/nvidia.gpg" "$WORK/nvidia.asc"
  install -m 0644 "$WORK/nvidia.gpg" "$key"
  fetch "$base/stable/deb/nvidia-container-toolkit.list" "$WORK/nvidia.list" is_apt_list
  sed "s#deb https://#deb [signed-by=$key] https://#g" "$WORK/nvidia.list" | write_file "$list" 0644
  APT_UPDATED=0
}

# step_fabricmanager: an NVSwitch host (HGX/DGX) runs no CUDA job until
# nvidia-fabricmanager, of exactly the driver's version, runs.
step_fabricmanager() {
  local switches version branch pkg
  switches=$(nvidia_switches_on_bus)
  [ "$switches" -gt 0 ] || return 0
  note "$switches NVSwitch(es) on the PCI bus (HGX/DGX): nvidia-fabricmanager is needed"
  version=$(driver_version)
  if [ -z "$version" ]; then
    warn "no working driver yet: nvidia-fabricmanager is installed once there is one (run install.sh again)"
    return 0
  fi
  branch=${version%%.*}
  case $OS_ID in
    ubuntu) pkg=nvidia-fabricmanager-$branch ;;
    *) pkg=nvidia-fabricmanager ;; # Debian: from NVIDIA's CUDA repository, pinned below
  esac
  if installed "$pkg"; then
    note "$pkg installed"
  elif [ "$OS_ID" = ubuntu ]; then
    apt_install "$pkg"
  else
    apt_install "$pkg=$version-1"
  fi
  local fm_version
  fm_version=$(nv-fabricmanager --version 2>/dev/null | grep -oE '[0-9]+\.[0-9]+(\.[0-9]+)?' | head -1 || true)
  if [ -n "$fm_version" ] && [ "$fm_version" != "$version" ]; then
    warn "nvidia-fabricmanager $fm_version does not match driver $version: GPUs stay unusable until they match"
  fi
  [ "$SYSTEMD" = 0 ] || systemctl is-active --quiet nvidia-fabricmanager.service ||
    run systemctl enable --now nvidia-fabricmanager.service
}

# The CUDA forward-compat hook (the path of CVE-2025-23266) off for every container.
toolkit_compat_off() {
  local conf=/etc/nvidia-container-toolkit/config.toml
  if grep -Eq '^\s*disable-cuda-compat-lib-hook\s*=\s*true' "$conf" 2>/dev/null &&
    grep -Eq '^\s*cuda-compat-mode\s*=\s*"disabled"' "$conf" 2>/dev/null; then
    note "the toolkit's CUDA compat hook is off"
    return 0
  fi
  run nvidia-ctk config --in-place --set features.disable-cuda-compat-lib-hook=true \
    --set nvidia-container-runtime.modes.legacy.cuda-compat-mode=disabled ||
    warn "could not turn the CUDA compat hook off in $conf: see qudata-agent doctor"
}

step_nvidia() {
  step "NVIDIA GPUs"
  local count
  count=$(nvidia_gpus_on_bus)
  if [ "$count" -eq 0 ]; then
    note "no NVIDIA GPU on the PCI bus: no driver or NVIDIA Container Toolkit needed" \
      "(this host rents CPU instances only)"
    return 0
  fi
  note "$count NVIDIA GPU(s) on the PCI bus"
  if nvidia-smi -L >/dev/null 2>&1; then
    note "driver $(driver_version) works"
  elif [ "$INSTALL_DRIVER" = 1 ]; then
    install_driver
  else
    warn "no working NVIDIA driver (nvidia-smi fails): install one and reboot, or rerun" \
      "with --install-driver; until then the host rents CPU instances only"
  fi
  step_fabricmanager
  if ! command -v nvidia-ctk >/dev/null; then
    add_toolkit_repo
    apt_install nvidia-container-toolkit
  fi
  toolkit_compat_off
  # A CDI spec naming each GPU by UUID: the agent injects GPUs by CDI name where
  # Docker takes them (25 or later, CDI on).
  if [ ! -e /etc/cdi/nvidia.yaml ]; then
    run nvidia-ctk cdi generate --device-name-strategy=uuid --output=/etc/cdi/nvidia.yaml ||
      warn "could not write a CDI spec: GPUs go in through the legacy hook"
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

# step_upgrades: the container stack at the distribution's (or the vendor's)
# latest version: a runc, containerd, Docker or NVIDIA toolkit with a known
# escape lets a tenant out (doctor names them). An installed package with a
# newer candidate is upgraded, held or not (the hold stays: it only stops
# unattended upgrades). apt's lists are refreshed when older than a day;
# refreshing them is no change to the host.
UPGRADED_PACKAGES=(runc containerd docker.io containerd.io docker-ce docker-ce-cli
  nvidia-container-toolkit nvidia-container-toolkit-base libnvidia-container-tools libnvidia-container1)
step_upgrades() {
  step "security updates of the container stack (runc, containerd, Docker, NVIDIA toolkit)"
  local pkg have candidate upgrades=()
  if [ "$DRY_RUN" = 0 ] && [ "$APT_UPDATED" = 0 ] &&
    [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' -mmin -1440 -print -quit 2>/dev/null)" ]; then
    apt-get update -q >/dev/null || warn "apt-get update failed: the upgrade check uses the lists there are"
    APT_UPDATED=1
  fi
  for pkg in "${UPGRADED_PACKAGES[@]}"; do
    installed "$pkg" || continue
    have=$(dpkg-query -W -f='${Version}' "$pkg")
    # No binary cache written (apt-cache would refresh pkgcache.bin): a dry run changes nothing.
    candidate=$(apt-cache -o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache= policy "$pkg" \
      2>/dev/null | sed -n 's/^ *Candidate: //p')
    case $candidate in "" | "(none)") continue ;; esac
    if dpkg --compare-versions "$candidate" gt "$have"; then upgrades+=("$pkg"); fi
  done
  if [ ${#upgrades[@]} -eq 0 ]; then
    note "up to date (what the configured repositories have)"
    return 0
  fi
  DEBIAN_FRONTEND=noninteractive run apt-get install -y -qq -o Dpkg::Use-Pty=0 \
    --only-upgrade --allow-change-held-packages "${upgrades[@]}"
  note "upgraded: ${upgrades[*]} (Docker's live-restore keeps the tenants running)"
}

# held_candidates: installed packages an unattended upgrade must not replace
# under running tenants (a driver userland without its kernel module leaves zero
# GPUs; a Docker upgrade restarts dockerd).
held_candidates() {
  dpkg-query -W -f='${Package} ${Status}\n' 2>/dev/null | awk '$NF == "installed" {print $1}' |
    grep -E '^(docker\.io|docker-ce|docker-ce-cli|containerd|containerd\.io|runc|nvidia-driver.*|nvidia-kernel-.*|nvidia-dkms-.*|nvidia-utils-.*|libnvidia-.*|cuda-drivers.*|nvidia-fabricmanager.*|libnvidia-nscq-.*|nvidia-container-toolkit.*|linux-modules-nvidia-.*)$' || true
}

step_hold() {
  step "package holds (apt-mark hold: no unattended upgrade of Docker or the NVIDIA driver)"
  if [ "$HOLD" = 0 ]; then
    note "skipped (--no-hold)"
    return 0
  fi
  local wanted=() held pkg
  # dpkg's own view of the holds (apt-mark showhold would rebuild apt's cache).
  held=$(dpkg-query -W -f='${Package} ${Status}\n' 2>/dev/null | awk '$2 == "hold" {print $1}' || true)
  while IFS= read -r pkg; do
    [ -n "$pkg" ] || continue
    grep -qxF "$pkg" <<<"$held" || wanted+=("$pkg")
  done < <(held_candidates)
  if [ ${#wanted[@]} -eq 0 ]; then
    held=$(held_candidates | tr '\n' ' ')
    note "${held:+held: }${held:-nothing to hold (no Docker or NVIDIA package installed yet)}"
    return 0
  fi
  run apt-mark hold "${wanted[@]}" >/dev/null
  note "held now: ${wanted[*]} (upgrade them on purpose: apt-mark unhold, upgrade, reboot)"
}

# env_value KEY: the value agent.env gives KEY (empty when none).
env_value() {
  [ -f "$ENV_FILE" ] || return 0
  sed -n "s/^\(export[[:space:]]*\)\{0,1\}$1=//p" "$ENV_FILE" | tail -1
}

step_ports() {
  step "tenant ports: kept out of the kernel's ephemeral range"
  local range lo hi elo ehi reserved kv
  range=$(env_value QUDATA_PORT_RANGE)
  for kv in "${SETTINGS[@]+"${SETTINGS[@]}"}"; do
    [[ $kv != QUDATA_PORT_RANGE=* ]] || range=${kv#*=}
  done
  range=${range:-$DEFAULT_PORT_RANGE}
  [[ $range =~ ^([0-9]+)-([0-9]+)$ ]] || die "QUDATA_PORT_RANGE=$range: expected FIRST-LAST"
  lo=${BASH_REMATCH[1]} hi=${BASH_REMATCH[2]}
  read -r elo ehi </proc/sys/net/ipv4/ip_local_port_range
  if [ "$hi" -lt "$elo" ] || [ "$lo" -gt "$ehi" ]; then
    note "$range lies outside the ephemeral range $elo-$ehi"
    return 0
  fi
  reserved=$(cat /proc/sys/net/ipv4/ip_local_reserved_ports)
  if write_if_changed_dry "$SYSCTL_FILE" <<EOF; then
# Written by the QuData agent's install.sh: the ports the agent hands to tenants
# (QUDATA_PORT_RANGE) are never picked as the source port of an outgoing connection.
net.ipv4.ip_local_reserved_ports = $range
EOF
    note "wrote $SYSCTL_FILE"
  fi
  if [ "$reserved" = "$range" ]; then
    note "$range reserved (net.ipv4.ip_local_reserved_ports), within ephemeral $elo-$ehi"
  elif ! command -v sysctl >/dev/null || ! run sysctl -q -p "$SYSCTL_FILE"; then
    warn "could not apply $SYSCTL_FILE now (read-only /proc/sys?): it applies at the next boot"
  fi
}

# write_if_changed_dry PATH: write_if_changed with mode 0644, or in a dry run say so.
write_if_changed_dry() {
  local content
  content=$(cat)
  if [ -f "$1" ] && [ "$(cat "$1")" = "$content" ]; then
    return 1
  fi
  would "write $1" && return 1
  printf '%s\n' "$content" | write_file "$1" 0644
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

# source_hash: what identifies the package built from SRC_DIR (its files, not their times).
source_hash() {
  (cd "$SRC_DIR" && find pyproject.toml README.md src -type f \
    ! -path '*/__pycache__/*' ! -path '*.egg-info/*' -print0 | LC_ALL=C sort -z |
    xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
}

step_source() {
  step "agent source"
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
    fetch "$SOURCE" "$WORK/source.tar" test
    extract "$WORK/source.tar"
  else
    usage_error "--source $SOURCE: no such directory, file or http(s) URL"
  fi
  is_agent_tree "$SRC_DIR" || die "$SRC_DIR holds no qudata-agent package"
  [ -f "$SRC_DIR/packaging/qudata-agent.service" ] || die "$SRC_DIR has no packaging/qudata-agent.service"
  [ -f "$SRC_DIR/packaging/$FW_UNIT" ] || die "$SRC_DIR has no packaging/$FW_UNIT"
  VERSION=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$SRC_DIR/src/qudata_agent/__init__.py")
  SRC_HASH=$(source_hash)
  note "qudata-agent ${VERSION:-?} from $SRC_DIR"
}

# Keeps KEEP_VENVS venvs: the current one and the previous one (to roll back to).
prune_venvs() {
  local current previous dir
  current=$(readlink -f "$PREFIX/venv")
  previous=$(readlink -f "$PREFIX/venv.previous" 2>/dev/null || true)
  for dir in "$PREFIX"/venvs/*; do
    [ -d "$dir" ] || continue
    [ "$(readlink -f "$dir")" = "$current" ] || [ "$(readlink -f "$dir")" = "$previous" ] ||
      rm -rf "$dir"
  done
}

step_agent() {
  step "the agent, in its own venv under $PREFIX"
  local previous="" new build current
  [ -x "$PREFIX/venv/bin/qudata-agent" ] && previous=$("$PREFIX/venv/bin/qudata-agent" version 2>/dev/null || true)
  if [ -n "$previous" ] && [ -n "$SRC_HASH" ] &&
    [ "$(cat "$PREFIX/venv/.qudata-source" 2>/dev/null)" = "$SRC_HASH" ]; then
    note "qudata-agent $previous from this very source is installed: venv kept"
    link_command
    return 0
  fi
  [ -n "$previous" ] && note "installed now: $previous (upgrading in place; identity and state are kept)"
  new=$PREFIX/venvs/${VERSION:-unknown}-$(date -u +%Y%m%d%H%M%S)
  if would "create the venv $new, pip-install the agent into it, point $PREFIX/venv at it," \
    "link $LINK, and keep this venv and the previous one"; then
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
  echo "$SRC_HASH" >"$new/.qudata-source"
  current=$(readlink "$PREFIX/venv" 2>/dev/null || true)
  if [ -n "$current" ]; then
    ln -sfn "$current" "$PREFIX/venv.previous.next"
    mv -Tf "$PREFIX/venv.previous.next" "$PREFIX/venv.previous"
  fi
  ln -sfn "venvs/$(basename "$new")" "$PREFIX/venv.next"
  mv -Tf "$PREFIX/venv.next" "$PREFIX/venv" # atomic switch
  VENV_SWITCHED=1
  CHANGED=1
  prune_venvs
  link_command
  note "qudata-agent $("$PREFIX/venv/bin/qudata-agent" version) in $new"
}

link_command() {
  [ "$DRY_RUN" = 0 ] || return 0
  if [ -f "$SRC_DIR/uninstall.sh" ] && ! cmp -s "$SRC_DIR/uninstall.sh" "$PREFIX/uninstall.sh"; then
    install -m 0755 "$SRC_DIR/uninstall.sh" "$PREFIX/uninstall.sh"
    TOUCHED=1
  fi
  if [ "$(readlink "$LINK" 2>/dev/null)" != "$PREFIX/venv/bin/qudata-agent" ]; then
    ln -sfn "$PREFIX/venv/bin/qudata-agent" "$LINK"
    TOUCHED=1
  fi
}

# set_var KEY VALUE: sets KEY in the env file, keeping every other line.
set_var() {
  local key=$1 value=$2
  [ "$(env_value "$key")" = "$value" ] && grep -q "^$key=" "$ENV_FILE" && return 0
  if would "set $key=$value in $ENV_FILE"; then
    return 0
  fi
  { grep -v -E "^(export[[:space:]]+)?$key=" "$ENV_FILE" || true; echo "$key=$value"; } |
    write_file "$ENV_FILE" 0600
  CHANGED=1
}

step_config() {
  step "configuration: $ENV_FILE (mode 0600; settings, no API key)"
  tunnel_agent_port
  local existed=1
  if [ ! -f "$ENV_FILE" ]; then
    existed=0
    run install -d -m 0700 "$CONF_DIR"
    if ! would "write $ENV_FILE with QUDATA_STATE_DIR=$STATE_DIR and QUDATA_AGENT_PORT=${AGENT_PORT:-$DEFAULT_AGENT_PORT}"; then
      {
        echo "# The QuData host agent's configuration, written by install.sh. Any variable"
        echo "# of the README's table may be set here; then: systemctl restart qudata-agent"
        echo "# (the API key is kept in $KEY_FILE, not here)."
        echo "QUDATA_STATE_DIR=$STATE_DIR"
        echo "QUDATA_AGENT_PORT=${AGENT_PORT:-$DEFAULT_AGENT_PORT}"
        [ -z "$API_URL" ] || echo "QUDATA_API_URL=$API_URL"
        echo "# QUDATA_PORT_RANGE=$DEFAULT_PORT_RANGE"
        echo "# QUDATA_LOG_FILE=/var/log/qudata-agent/agent.log"
      } | write_file "$ENV_FILE" 0600
      CHANGED=1
    fi
  else
    [ -z "$API_URL" ] || set_var QUDATA_API_URL "$API_URL"
    [ -z "$AGENT_PORT" ] || set_var QUDATA_AGENT_PORT "$AGENT_PORT"
    [ "$DRY_RUN" = 1 ] || [ "$(stat -c %a "$ENV_FILE")" = 600 ] || chmod 600 "$ENV_FILE"
  fi
  local kv
  for kv in "${SETTINGS[@]+"${SETTINGS[@]}"}"; do
    set_var "${kv%%=*}" "${kv#*=}"
  done
  [ "$CHANGED" = 1 ] || [ "$existed" = 0 ] || note "kept as it is"
  resolve_state_dir
  step_proxy
}

# resolve_state_dir: the state dir agent.env names (QUDATA_STATE_DIR), and the
# paths in it; the unit's ReadWritePaths= follows it.
resolve_state_dir() {
  local configured
  configured=$(env_value QUDATA_STATE_DIR)
  [ -n "$configured" ] || return 0
  [[ $configured == /?* ]] || die "QUDATA_STATE_DIR=$configured: expected an absolute path"
  STATE_DIR=$configured
  KEY_FILE=$STATE_DIR/api_key
}

step_proxy() {
  [ -n "$PROXY" ] || [ -f "$PROXY_FILE" ] || return 0
  if [ -z "$PROXY" ]; then
    note "proxy: $PROXY_FILE kept"
    return 0
  fi
  local no_proxy=localhost,127.0.0.1,::1${NO_PROXY_LIST:+,$NO_PROXY_LIST}
  would "write $PROXY_FILE (HTTPS_PROXY=$PROXY for the agent)" && return 0
  if printf 'HTTPS_PROXY=%s\nHTTP_PROXY=%s\nNO_PROXY=%s\n' "$PROXY" "$PROXY" "$no_proxy" |
    write_if_changed "$PROXY_FILE" 0600; then
    note "proxy: HTTPS_PROXY=$PROXY in $PROXY_FILE"
    CHANGED=1
  fi
}

step_state() {
  step "state directory: $STATE_DIR (0700; kept across upgrades)"
  if [ -d "$STATE_DIR" ]; then
    [ "$(stat -c %a "$STATE_DIR")" = 700 ] || run chmod 700 "$STATE_DIR"
    note "kept"
  else
    run install -d -m 0700 "$STATE_DIR"
  fi
  step_key
}

# step_key: the API key in one place, $KEY_FILE (what the agent itself reads and
# keeps), written from this shell's memory; an older install's copy in agent.env
# is moved there.
step_key() {
  local current="" old=""
  [ -f "$KEY_FILE" ] && IFS= read -r current <"$KEY_FILE"
  if grep -q '^QUDATA_API_KEY=' "$ENV_FILE" 2>/dev/null; then
    old=$(env_value QUDATA_API_KEY)
    [ -n "$API_KEY" ] || API_KEY=$old
  fi
  if [ -n "$API_KEY" ] && [ "$API_KEY" != "$current" ]; then
    if ! would "write the API key to $KEY_FILE (0600)"; then
      (umask 077 && printf '%s\n' "$API_KEY" | write_file "$KEY_FILE" 0600)
      CHANGED=1
    fi
    note "API key $([ -n "$current" ] && echo replaced || echo stored) in $KEY_FILE"
  else
    note "API key kept in $KEY_FILE"
  fi
  if grep -q '^QUDATA_API_KEY=' "$ENV_FILE" 2>/dev/null; then
    would "remove QUDATA_API_KEY from $ENV_FILE (one copy of the key: $KEY_FILE)" ||
      { grep -v -E '^(export[[:space:]]+)?QUDATA_API_KEY=' "$ENV_FILE" | write_file "$ENV_FILE" 0600; }
    CHANGED=1
  fi
}

# render_unit NAME: packaging/NAME with this install's paths filled in.
render_unit() {
  sed -e "s|@PREFIX@|$PREFIX|g" -e "s|@ENV_FILE@|$ENV_FILE|g" -e "s|@STATE_DIR@|$STATE_DIR|g" \
    "$SRC_DIR/packaging/$1"
}

# write_unit NAME FILE: FILE made from packaging/NAME (WROTE_UNIT=1 when it changed).
write_unit() {
  local rendered
  rendered=$(render_unit "$1")
  if [ -n "$API_KEY" ] && [[ $rendered == *"$API_KEY"* ]]; then
    die "the unit would hold the API key: refusing to write it"
  fi
  if [ -f "$2" ] && [ "$(cat "$2")" = "$rendered" ]; then
    note "$2 unchanged"
    return 0
  fi
  would "write $2 (mode 0644, no API key in it)" && return 0
  mkdir -p "$(dirname "$2")"
  printf '%s\n' "$rendered" | write_file "$2" 0644
  WROTE_UNIT=1
}

step_unit() {
  step "systemd units: $UNIT_FILE, $FW_UNIT_FILE"
  if [ -z "$SRC_DIR" ]; then
    would "write $UNIT_FILE and $FW_UNIT_FILE from the source's packaging/"
    return 0
  fi
  WROTE_UNIT=0
  write_unit qudata-agent.service "$UNIT_FILE"
  write_unit "$FW_UNIT" "$FW_UNIT_FILE"
  [ "$WROTE_UNIT" = 1 ] || return 0
  CHANGED=1
  [ "$SYSTEMD" = 0 ] || systemctl daemon-reload
}

# step_firewall_unit: the wall in place now and at every boot before Docker
# (the oneshot runs `qudata-agent firewall apply`; the agent keeps it after).
step_firewall_unit() {
  [ "$SYSTEMD" = 1 ] || return 0
  systemctl is-enabled --quiet "$FW_UNIT" 2>/dev/null || run systemctl enable --quiet "$FW_UNIT"
  [ "$DRY_RUN" = 0 ] || return 0
  if [ "$CHANGED" = 1 ] || ! systemctl is-active --quiet "$FW_UNIT"; then
    systemctl restart "$FW_UNIT" ||
      warn "$FW_UNIT failed (journalctl -u $FW_UNIT): the agent refuses creates until the wall stands"
  fi
}

# backup_db: a consistent copy of the live database in the state dir's backup
# (`qudata-agent state backup`: a running agent's WAL is included), taken
# before a new version starts, for a rollback to the previous one.
backup_db() {
  local previous saved
  previous=$(readlink "$PREFIX/venv.previous" 2>/dev/null || true)
  [ -n "$previous" ] || return 0
  saved=$("$AGENT" state backup --state-dir "$STATE_DIR" --label "$previous") ||
    die "the database could not be backed up: the new version is not started"
  note "$saved"
}

wait_active() {
  # Type=notify: `systemctl restart` returns once the agent said READY=1, or failed.
  systemctl is-active --quiet "$UNIT" && return 0
  printf 'error: %s is not active; the last lines of its log:\n' "$UNIT" >&2
  journalctl -u qudata-agent -n 30 --no-pager >&2 || true
  exit 3
}

step_start() {
  step "service"
  if [ "$SYSTEMD" = 0 ]; then
    warn "systemd is not running here: $UNIT is not enabled or started (its unit file" \
      "is in place for when it is). Start the agent yourself:" \
      "$PREFIX/venv/bin/qudata-agent run --config $ENV_FILE"
    return 0
  fi
  step_firewall_unit
  systemctl is-enabled --quiet "$UNIT" 2>/dev/null || run systemctl enable --quiet "$UNIT"
  [ "$DRY_RUN" = 1 ] && { note "would restart $UNIT when anything changed"; return 0; }
  if [ "$CHANGED" = 0 ] && systemctl is-active --quiet "$UNIT"; then
    note "$UNIT active, nothing changed: not restarted"
    return 0
  fi
  [ "$VENV_SWITCHED" = 0 ] || backup_db
  # A first start, or an upgrade: the agent restarts and adopts the running instances.
  TOUCHED=1
  systemctl restart "$UNIT" || true
  wait_active
  note "$UNIT active (pid $(systemctl show -p MainPID --value "$UNIT"))"
}

step_doctor() {
  step "host check (qudata-agent doctor)"
  would "run $PREFIX/venv/bin/qudata-agent doctor --config $ENV_FILE" && return 0
  if "$PREFIX/venv/bin/qudata-agent" doctor --config "$ENV_FILE"; then
    return 0
  fi
  if [ "$STRICT" = 1 ]; then
    printf 'error: qudata-agent doctor found a failure (--strict)\n' >&2
    exit 4
  fi
  warn "doctor found a failure (see above); the agent runs, and --strict would fail the install"
}

rollback() {
  step "rollback to the previous version"
  local previous current saved=""
  previous=$(readlink "$PREFIX/venv.previous" 2>/dev/null || true)
  current=$(readlink "$PREFIX/venv" 2>/dev/null || true)
  if [ -z "$previous" ] || [ ! -x "$PREFIX/$previous/bin/qudata-agent" ]; then
    die "no previous version to go back to ($PREFIX/venv.previous)"
  fi
  note "from $current to $previous"
  would "stop $UNIT, switch $PREFIX/venv to $previous, restore the database if its schema changed, start $UNIT" &&
    return 0
  [ "$SYSTEMD" = 0 ] || systemctl stop "$UNIT"
  # The current (newer) agent puts the backup taken for $previous back in place
  # when the upgrade migrated the schema, which the older agent would refuse.
  if ! saved=$("$AGENT" state restore --state-dir "$STATE_DIR" --label "$previous"); then
    warn "the database could not be compared with its backup: kept as it is"
  fi
  [ -z "$saved" ] || note "$saved"
  ln -sfn "$current" "$PREFIX/venv.previous.next"
  ln -sfn "$previous" "$PREFIX/venv.next"
  mv -Tf "$PREFIX/venv.next" "$PREFIX/venv"
  mv -Tf "$PREFIX/venv.previous.next" "$PREFIX/venv.previous"
  if [ "$SYSTEMD" = 1 ]; then
    systemctl start "$UNIT" || true
    wait_active
  fi
  note "qudata-agent $("$PREFIX/venv/bin/qudata-agent" version) in $PREFIX/$previous"
}

on_exit() {
  local rc=$?
  rm -rf "$WORK"
  if [ "$rc" -ne 0 ] && [ -n "$STEP" ]; then
    printf 'error: install.sh stopped in the step "%s" (exit %d)\n' "$STEP" "$rc" >&2
  fi
}

main() {
  parse_args "$@"
  read_key
  check_key
  preflight
  WORK=$(mktemp -d /tmp/qudata-install.XXXXXX)
  trap on_exit EXIT
  if [ "$DRY_RUN" = 0 ]; then
    exec 9>/run/qudata-agent-install.lock
    flock -n 9 || die "another install.sh is running"
  fi
  if [ "$ROLLBACK" = 1 ]; then
    resolve_state_dir
    rollback
    say "done"
    return 0
  fi
  step_source
  step_python
  step_docker
  step_ssh
  step_volumes
  step_tunnel
  step_nvidia
  step_sandbox
  step_upgrades
  step_hold
  step_agent
  step_docker_config # by the agent installed above (its `docker-config merge`)
  step_config
  step_state
  step_ports
  step_unit
  step_start
  step_doctor
  STEP=
  if [ "$DRY_RUN" = 1 ]; then
    say "done (dry run: nothing was changed)"
  elif [ "$TOUCHED" = 0 ] && [ "$CHANGED" = 0 ] && [ "$VENV_SWITCHED" = 0 ]; then
    say "done (no change)" # automation reads this line: nothing on the host changed
  else
    say "done"
  fi
  note "config: $ENV_FILE   state: $STATE_DIR   logs: journalctl -u qudata-agent"
  note "status: qudata-agent status   checks: qudata-agent doctor   remove: $PREFIX/uninstall.sh"
  [ "$NEED_REBOOT" = 0 ] || warn "reboot to load the NVIDIA driver, then run install.sh again"
}

# Everything runs from main, after bash has read the whole script: when it comes
# through a pipe (curl | bash), no command can swallow the rest of it from stdin.
# The script's standard input stays reachable as fd 3, for --api-key-file -.
main "$@" 3<&0 </dev/null
