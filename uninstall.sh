#!/usr/bin/env bash
# Removes the QuData host agent that install.sh installed: the service and its
# unit, the boot unit of the tenant firewall (containers left running keep the
# wall until the next boot), the venvs under /opt/qudata-agent and the
# `qudata-agent` command link.
# The renters' containers, the agent's state and its configuration stay unless
# asked for:
#   --containers   also the containers the agent made (label qudata.agent_id),
#                  its Docker network, its firewall chains (QUDATA-*), the network
#                  meter's nftables tables and IFB devices, the tunnel
#                  of tunnel mode (interface, rule, table) and the
#                  reservation of their port range (sysctl.d)
#   --state        also the state dir (identity, secrets, the API key,
#                  database), the configuration dir and the log dir
#   --all          both
#   --dry-run      print each step without doing it
# Docker itself (its daemon.json with live-restore), the NVIDIA driver and
# toolkit stay, and so do their apt-mark holds: other software may use them.
set -euo pipefail

PREFIX=/opt/qudata-agent
CONF_DIR=/etc/qudata-agent
ENV_FILE=$CONF_DIR/agent.env
STATE_DIR=/var/lib/qudata-agent
UNIT=qudata-agent.service
UNIT_FILE=/etc/systemd/system/$UNIT
FW_UNIT=qudata-agent-firewall.service
FW_UNIT_FILE=/etc/systemd/system/$FW_UNIT
LINK=/usr/local/bin/qudata-agent
LABEL=qudata.agent_id
SYSCTL_FILE=/etc/sysctl.d/60-qudata-agent.conf
LOCK=/run/qudata-agent-install.lock
LOG_DIR=/var/log/qudata-agent

DRY_RUN=0
CONTAINERS=0
STATE=0

say() { printf '==> %s\n' "$*"; }
note() { printf '    %s\n' "$*"; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

run() {
  if [ "$DRY_RUN" = 1 ]; then
    printf '    would run:'
    printf ' %q' "$@"
    printf '\n'
    return 0
  fi
  "$@"
}

usage() { sed -n '2,17s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }

parse_args() {
  while [ $# -gt 0 ]; do
    case $1 in
      --containers) CONTAINERS=1 ;;
      --state) STATE=1 ;;
      --all) CONTAINERS=1 STATE=1 ;;
      --dry-run) DRY_RUN=1 ;;
      -h | --help) usage; exit 0 ;;
      *) die "unknown argument $1 (see --help)" ;;
    esac
    shift
  done
}

remove_service() {
  say "service $UNIT and $FW_UNIT"
  if [ -d /run/systemd/system ]; then
    if systemctl cat "$UNIT" >/dev/null 2>&1; then
      # Stopping the agent never stops a renter's container.
      run systemctl disable --now "$UNIT"
    fi
    # Stopping the oneshot removes no rule (the chains go with --containers).
    if systemctl cat "$FW_UNIT" >/dev/null 2>&1; then
      run systemctl disable --now --quiet "$FW_UNIT"
    fi
  else
    note "systemd is not running: nothing to stop (stop a hand-started agent yourself)"
  fi
  local removed=0 file
  for file in "$UNIT_FILE" "$FW_UNIT_FILE"; do
    [ -f "$file" ] || continue
    run rm -f "$file"
    removed=1
  done
  [ "$removed" = 0 ] || [ ! -d /run/systemd/system ] || run systemctl daemon-reload
}

remove_agent() {
  say "the agent ($PREFIX, $LINK)"
  [ ! -L "$LINK" ] || run rm -f "$LINK"
  [ ! -e "$PREFIX" ] || run rm -rf "$PREFIX"
  [ ! -e "$LOCK" ] || run rm -f "$LOCK"
}

# drop_jumps TABLE: deletes the rules of TABLE's other chains that jump to the
# agent's chains (QUDATA-*, whichever the agent's version made).
drop_jumps() {
  local rule args
  while IFS= read -r rule; do
    read -r -a args <<<"${rule/#-A /-D }"
    run iptables -w 5 -t "$1" "${args[@]}"
  done < <(iptables -w 5 -t "$1" -S 2>/dev/null | grep -E -- '-j QUDATA-[A-Z0-9-]+$' |
    grep -v -E '^-A QUDATA-' || true)
}

# drop_chains TABLE: flushes, then deletes, the agent's chains of TABLE.
drop_chains() {
  local chains chain
  chains=$(iptables -w 5 -t "$1" -S 2>/dev/null | sed -n 's/^-N \(QUDATA-[A-Z0-9-]*\)$/\1/p' || true)
  for chain in $chains; do run iptables -w 5 -t "$1" -F "$chain"; done
  for chain in $chains; do run iptables -w 5 -t "$1" -X "$chain"; done
}

# remove_tunnel: tunnel mode's interface, its routing rule and table (the agent keeps
# them up when it stops, so that its instances stay reachable); the mangle chains go
# with the other QUDATA-* chains.
remove_tunnel() {
  command -v ip >/dev/null || return 0
  local ifname table rules i
  ifname=$(sed -n 's/^QUDATA_TUNNEL_INTERFACE=//p' "$ENV_FILE" 2>/dev/null | tail -1)
  table=$(sed -n 's/^QUDATA_TUNNEL_TABLE=//p' "$ENV_FILE" 2>/dev/null | tail -1)
  ifname=${ifname:-qudata-wg} table=${table:-51820}
  if ip link show dev "$ifname" >/dev/null 2>&1; then run ip link del dev "$ifname"; fi
  rules=$(ip rule show 2>/dev/null | grep -c "lookup $table\b" || true)
  for ((i = 0; i < rules; i++)); do run ip rule del lookup "$table"; done
  if [ -n "$(ip route show table "$table" 2>/dev/null)" ]; then run ip route flush table "$table"; fi
}

# remove_netmeter: the network meter's nftables tables (qudata_net_<bridge>: counters,
# caps' policy, egress policy) and the IFB devices that shaped instances' uploads.
remove_netmeter() {
  if command -v nft >/dev/null; then
    local table
    for table in $(nft list tables ip 2>/dev/null | sed -n 's/^table ip \(qudata_net_[A-Za-z0-9_]*\)$/\1/p'); do
      run nft delete table ip "$table"
    done
  fi
  if command -v ip >/dev/null; then
    local ifb
    for ifb in $(ip -o link show type ifb 2>/dev/null | sed -n 's/^[0-9]*: \(qdifb[0-9a-f]*\)[:@].*/\1/p'); do
      run ip link del dev "$ifb"
    done
  fi
}

remove_containers() {
  say "tenant containers (label $LABEL), the agent's network and firewall chains"
  if ! docker version --format '{{.Server.Version}}' >/dev/null 2>&1; then
    warn "Docker does not answer: no container or network was removed"
  else
    local ids
    ids=$(docker ps -aq --filter "label=$LABEL")
    # shellcheck disable=SC2086 # one id per word
    if [ -n "$ids" ]; then run docker rm -f $ids; else note "no container"; fi
    ids=$(docker network ls -q --filter "label=$LABEL")
    # shellcheck disable=SC2086
    if [ -n "$ids" ]; then run docker network rm $ids; fi
  fi
  if command -v iptables >/dev/null; then
    local table
    for table in filter mangle nat raw; do
      drop_jumps "$table"
      drop_chains "$table"
    done
  fi
  remove_tunnel
  remove_netmeter
  if [ -f "$SYSCTL_FILE" ]; then
    # No tenant port to keep free any more (the reservation itself lasts until a reboot).
    run rm -f "$SYSCTL_FILE"
  fi
}

remove_state() {
  local state=$STATE_DIR configured
  configured=$(sed -n 's/^QUDATA_STATE_DIR=//p' "$ENV_FILE" 2>/dev/null | tail -1)
  [ -z "$configured" ] || state=$configured
  case $state in
    / | /var | /var/lib | /etc | /opt | /usr | /home | /root) die "refusing to remove $state" ;;
    /?*) ;;
    *) die "QUDATA_STATE_DIR=$state is not an absolute path: remove it yourself" ;;
  esac
  say "state ($state), configuration ($CONF_DIR) and logs ($LOG_DIR)"
  # Renters' volumes are loop mounts under the state: unmounted first, so rm
  # removes their images instead of descending into mounted filesystems.
  local point
  for point in "$state"/volumes/*/mnt; do
    ! mountpoint -q "$point" 2>/dev/null || run umount "$point"
  done
  [ ! -e "$state" ] || run rm -rf "$state"
  [ ! -e "$CONF_DIR" ] || run rm -rf "$CONF_DIR"
  [ ! -e "$LOG_DIR" ] || run rm -rf "$LOG_DIR"
}

main() {
  parse_args "$@"
  [ "$(id -u)" -eq 0 ] || [ "$DRY_RUN" = 1 ] || die "run as root"
  remove_service
  remove_agent
  if [ "$CONTAINERS" = 1 ]; then
    remove_containers
  else
    note "tenant containers are left running (--containers removes them)"
  fi
  if [ "$STATE" = 1 ]; then
    remove_state
  else
    note "kept: $STATE_DIR and $CONF_DIR (--state removes them; a new install.sh reuses them)"
  fi
  say "done$([ "$DRY_RUN" = 1 ] && echo ' (dry run: nothing was changed)')"
}

main "$@" </dev/null
