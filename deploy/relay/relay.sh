#!/usr/bin/env bash
# Configures one QuData relay: WireGuard and nftables on a stock Linux machine,
# from a list of hosts. Nothing of QuData runs on the relay; running this again
# with a changed list makes the relay match it (peers and rules of hosts no
# longer listed are removed). Idempotent.
#
#   relay.sh --hosts FILE --public-address IP [--address 10.77.0.1/24]
#            [--interface wg-relay] [--port 51820] [--key-dir /etc/qudata-relay]
#   relay.sh --down [--interface wg-relay]    removes the interface and the rules
#
# The hosts file has one host a line (blank lines and # comments allowed):
#   PUBLIC_KEY  TUNNEL_ADDRESS  FIRST-LAST
# e.g. `kJ...=  10.77.0.2  40000-40999`: the host's WireGuard public key (sent by
# its agent in /init as tunnel_pubkey, or printed by `qudata-agent doctor`), its
# address in the tunnel network, and its port block (its QUDATA_PORT_RANGE).
#
# What it sets up, per host: one WireGuard peer (allowed-ips: its tunnel address
# only, so it can send from no other address) and one DNAT rule, TCP and UDP,
# sending the block on the public address to the same ports at the host's tunnel
# address. No SNAT: the host sees the renter's own address. Forwarding into the
# tunnel goes only to the DNAT-ed block of each host; hosts cannot reach each
# other, the relay itself, or the internet through the relay (only their replies
# leave it).
set -euo pipefail

IF=wg-relay
PORT=51820
ADDRESS=10.77.0.1/24
PUBLIC=""
HOSTS=""
KEY_DIR=/etc/qudata-relay
DOWN=0
TABLE=qudata_relay
MSS=1380

die() { echo "relay.sh: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --hosts) HOSTS=$2; shift 2 ;;
    --public-address) PUBLIC=$2; shift 2 ;;
    --address) ADDRESS=$2; shift 2 ;;
    --interface) IF=$2; shift 2 ;;
    --port) PORT=$2; shift 2 ;;
    --key-dir) KEY_DIR=$2; shift 2 ;;
    --down) DOWN=1; shift ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done

[ "$(id -u)" = 0 ] || die "run as root"
for tool in wg ip nft; do
  command -v "$tool" >/dev/null || die "$tool is missing (apt-get install wireguard-tools iproute2 nftables)"
done

if [ "$DOWN" = 1 ]; then
  nft delete table ip "$TABLE" 2>/dev/null || true
  ip link del dev "$IF" 2>/dev/null || true
  echo "relay removed ($IF, nftables table $TABLE)"
  exit 0
fi

{ [ -n "$HOSTS" ] && [ -r "$HOSTS" ]; } || die "--hosts FILE is required and must be readable"
[[ "$PUBLIC" =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "--public-address IPv4 is required"
[[ "$ADDRESS" =~ ^[0-9.]+/[0-9]+$ ]] || die "--address must be the relay's tunnel address with its prefix"
[[ "$PORT" =~ ^[0-9]+$ ]] || die "--port must be a number"

# -- the hosts: checked before anything changes ------------------------------
declare -a KEYS=() ADDRS=() BLOCKS=()
n=0
while read -r key addr block rest; do
  n=$((n + 1))
  case "$key" in ''|\#*) continue ;; esac
  [ -z "${rest:-}" ] || die "$HOSTS line $n: expected KEY ADDRESS FIRST-LAST"
  [[ "$key" =~ ^[A-Za-z0-9+/]{43}=$ ]] || die "$HOSTS line $n: not a WireGuard public key"
  [[ "$addr" =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "$HOSTS line $n: not an IPv4 address"
  [[ "$block" =~ ^([0-9]+)-([0-9]+)$ ]] || die "$HOSTS line $n: expected a port block FIRST-LAST"
  [ "${BASH_REMATCH[1]}" -le "${BASH_REMATCH[2]}" ] || die "$HOSTS line $n: empty port block"
  for i in "${!KEYS[@]}"; do
    [ "${KEYS[$i]}" != "$key" ] || die "$HOSTS line $n: key listed twice"
    [ "${ADDRS[$i]}" != "$addr" ] || die "$HOSTS line $n: address listed twice"
    lo=${block%-*}; hi=${block#*-}; olo=${BLOCKS[$i]%-*}; ohi=${BLOCKS[$i]#*-}
    { [ "$hi" -lt "$olo" ] || [ "$lo" -gt "$ohi" ]; } || die "$HOSTS line $n: block overlaps ${BLOCKS[$i]}"
  done
  KEYS+=("$key"); ADDRS+=("$addr"); BLOCKS+=("$block")
done < "$HOSTS"

# -- the relay's key ---------------------------------------------------------
mkdir -p "$KEY_DIR"
chmod 700 "$KEY_DIR"
if [ ! -s "$KEY_DIR/relay.key" ]; then
  (umask 077; wg genkey > "$KEY_DIR/relay.key.tmp") && mv "$KEY_DIR/relay.key.tmp" "$KEY_DIR/relay.key"
fi
wg pubkey < "$KEY_DIR/relay.key" > "$KEY_DIR/relay.pub"

# -- the interface: the kernel's WireGuard, else wireguard-go ----------------
if ! ip link show dev "$IF" >/dev/null 2>&1; then
  if ! ip link add dev "$IF" type wireguard 2>/dev/null; then
    command -v wireguard-go >/dev/null || die "no WireGuard in this kernel: apt-get install wireguard-go"
    wireguard-go "$IF"
  fi
fi
wg set "$IF" listen-port "$PORT" private-key "$KEY_DIR/relay.key"
for old in $(wg show "$IF" peers); do
  keep=0
  for key in "${KEYS[@]}"; do [ "$key" != "$old" ] || keep=1; done
  [ "$keep" = 1 ] || wg set "$IF" peer "$old" remove
done
for i in "${!KEYS[@]}"; do
  wg set "$IF" peer "${KEYS[$i]}" allowed-ips "${ADDRS[$i]}/32"
done
ip address replace "$ADDRESS" dev "$IF"
ip link set dev "$IF" mtu 1420 up
sysctl -q -w net.ipv4.ip_forward=1

# -- nftables: one table of our own, replaced in one transaction -------------
rules=$(mktemp)
trap 'rm -f "$rules"' EXIT
{
  echo "table ip $TABLE"
  echo "delete table ip $TABLE"
  echo "table ip $TABLE {"
  echo "  chain prerouting {"
  echo "    type nat hook prerouting priority dstnat; policy accept;"
  for i in "${!KEYS[@]}"; do
    echo "    ip daddr $PUBLIC meta l4proto { tcp, udp } th dport ${BLOCKS[$i]} dnat to ${ADDRS[$i]}"
  done
  echo "  }"
  echo "  chain forward {"
  echo "    type filter hook forward priority filter; policy accept;"
  echo "    iifname \"$IF\" oifname \"$IF\" drop"
  # The tunnel's MTU is 1420: both ends of a TCP connection are told to send at most
  # 1380-byte segments, so nothing relies on ICMP reaching the renter (often filtered).
  echo "    tcp flags syn / syn,rst tcp option maxseg size > $MSS tcp option maxseg size set $MSS"
  for i in "${!KEYS[@]}"; do
    echo "    oifname \"$IF\" ct status dnat ip daddr ${ADDRS[$i]} meta l4proto { tcp, udp } th dport ${BLOCKS[$i]} accept"
  done
  echo "    oifname \"$IF\" ct state established,related accept"
  echo "    oifname \"$IF\" drop"
  echo "    iifname \"$IF\" ct state established,related accept"
  echo "    iifname \"$IF\" drop"
  echo "  }"
  echo "  chain input {"
  echo "    type filter hook input priority filter; policy accept;"
  echo "    iifname \"$IF\" ct state established,related accept"
  echo "    iifname \"$IF\" drop"
  echo "  }"
  echo "}"
} > "$rules"
nft -f "$rules"

echo "relay up: $IF port $PORT, ${#KEYS[@]} host(s), public address $PUBLIC"
echo "relay public key: $(cat "$KEY_DIR/relay.pub")"
