#!/usr/bin/env bash
# Test hosts on one machine: Linux network namespaces cvh1..cvhN, each with one
# veth link to a bridge (cvbr0) and its own address in 10.77.0.0/24, used only
# inside these namespaces; the root namespace holds 10.77.0.1 on the bridge.
# Nothing is routed off the machine (no default route, no forwarding set up).
# Every host resolves every other by name (/etc/netns/<host>/hosts, which
# `ip netns exec` mounts over /etc/hosts).
#
#   tests/hosts.sh up N              hosts cvh1..cvhN (idempotent: an existing one is kept)
#   tests/hosts.sh down              removes every host, the bridge and the hosts files
#   tests/hosts.sh exec HOST CMD...  runs CMD inside HOST (ip netns exec)
#   tests/hosts.sh addr HOST         prints HOST's address
#   tests/hosts.sh partition HOST    cuts HOST's link (its processes keep running)
#   tests/hosts.sh heal HOST         restores it
#   tests/hosts.sh netem HOST ARGS   tc netem on HOST's link, both ways, e.g. "delay 100ms loss 1%"
#                                    (a delay D makes a round trip to HOST 2 D longer)
#   tests/hosts.sh netem HOST off    removes it
#   tests/hosts.sh throttle HOST RATE  a slow link both ways (tc tbf, e.g. "2mbit"): what waits more than
#                                    20 ms in its queue is dropped, so a busy link adds delay and loss
#                                    (where the kernel has no netem; this machine's has tbf)
#   tests/hosts.sh throttle HOST off removes it
#
# Needs root and iproute2. Exit status: 0 done, 1 failed (said why), 2 usage.
set -euo pipefail

BRIDGE=cvbr0
NET=10.77.0
MAX_HOSTS=20

die() { printf 'hosts: %s\n' "$*" >&2; exit 1; }
usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

addr_of() { # host name -> address
  local n=${1#cvh}
  [[ $1 == cvh* && $n =~ ^[0-9]+$ && $n -ge 1 && $n -le $MAX_HOSTS ]] || die "no such host '$1' (cvh1..cvh$MAX_HOSTS)"
  echo "$NET.$((10 + n))"
}

host_exists() { ip netns list | awk '{print $1}' | grep -qx "$1"; }

write_hosts_files() { # every host's /etc/netns/<host>/hosts names every host
  local hosts; hosts=$(ip netns list | awk '{print $1}' | grep -E '^cvh[0-9]+$' | sort -V)
  for h in $hosts; do
    mkdir -p "/etc/netns/$h"
    {
      echo "127.0.0.1 localhost"
      echo "::1 localhost"
      for o in $hosts; do echo "$(addr_of "$o") $o"; done
    } > "/etc/netns/$h/hosts"
  done
}

cmd_up() {
  local n=${1:-}
  [[ $n =~ ^[0-9]+$ && $n -ge 1 && $n -le $MAX_HOSTS ]] || usage
  [ "$(id -u)" = 0 ] || die "needs root (ip netns)"
  command -v ip >/dev/null || die "needs iproute2 (apt-get install iproute2)"
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
    ip addr add "$NET.1/24" dev "$BRIDGE"
  fi
  ip link set "$BRIDGE" up
  for i in $(seq "$n"); do
    local h=cvh$i
    if ! host_exists "$h"; then
      ip netns add "$h"
      ip link add "$h-a" type veth peer name "$h-b"
      ip link set "$h-b" netns "$h"
      ip link set "$h-a" master "$BRIDGE"
      ip -n "$h" link set "$h-b" name eth0
      ip -n "$h" addr add "$(addr_of "$h")/24" dev eth0
    fi
    ip link set "$h-a" up
    ip -n "$h" link set lo up
    ip -n "$h" link set eth0 up
  done
  write_hosts_files
}

cmd_down() {
  for h in $(ip netns list | awk '{print $1}' | grep -E '^cvh[0-9]+$' || true); do
    # what still runs inside goes first
    for pid in $(ip netns pids "$h" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    ip netns del "$h" 2>/dev/null || true
    ip link del "$h-a" 2>/dev/null || true
    rm -rf "/etc/netns/$h"
  done
  ip link del "$BRIDGE" 2>/dev/null || true
}

link_of() { addr_of "$1" >/dev/null; host_exists "$1" || die "host $1 is not up"; echo "$1-a"; }

case "${1:-}" in
  up) shift; cmd_up "$@" ;;
  down) cmd_down ;;
  exec) [ $# -ge 3 ] || usage; h=$2; shift 2; host_exists "$h" || die "host $h is not up"; exec ip netns exec "$h" "$@" ;;
  addr) [ $# = 2 ] || usage; addr_of "$2" ;;
  partition) [ $# = 2 ] || usage; dev=$(link_of "$2"); ip link set "$dev" down ;;
  heal) [ $# = 2 ] || usage; dev=$(link_of "$2"); ip link set "$dev" up ;;
  netem)
    [ $# -ge 3 ] || usage
    dev=$(link_of "$2"); shift 2
    h=${dev%-a}
    if [ "$*" = off ]; then
      tc qdisc del dev "$dev" root 2>/dev/null || true
      ip netns exec "$h" tc qdisc del dev eth0 root 2>/dev/null || true
    else
      # shellcheck disable=SC2068
      out=$(tc qdisc replace dev "$dev" root netem $@ 2>&1) ||
        die "tc netem failed on $dev: $out (this kernel may have no netem, sch_netem)"
      # shellcheck disable=SC2068
      ip netns exec "$h" tc qdisc replace dev eth0 root netem $@
    fi ;;
  throttle)
    [ $# = 3 ] || usage
    dev=$(link_of "$2"); h=${dev%-a}; rate=$3
    if [ "$rate" = off ]; then
      tc qdisc del dev "$dev" root 2>/dev/null || true
      ip netns exec "$h" tc qdisc del dev eth0 root 2>/dev/null || true
    else
      [[ $rate =~ ^[0-9]+(kbit|mbit)$ ]] || die "throttle: RATE is like 512kbit or 2mbit (got '$rate')"
      out=$(tc qdisc replace dev "$dev" root tbf rate "$rate" burst 16kb latency 20ms 2>&1) ||
        die "tc tbf failed on $dev: $out"
      ip netns exec "$h" tc qdisc replace dev eth0 root tbf rate "$rate" burst 16kb latency 20ms
    fi ;;
  -h|--help|"") usage ;;
  *) usage ;;
esac
