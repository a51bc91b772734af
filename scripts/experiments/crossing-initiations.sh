#!/usr/bin/env bash
# Experiment behind BENCHMARKS.md's "crossing initiations": two wireguard-go peers in network
# namespaces, both freshly added on each side, send their first packet at the same moment.
# Prints, per round, how long until a ping gets through. With BOTH=0 only one side sends. With
# REPAIR=SECONDS, side a removes and re-adds its peer that long after the first packets (the
# repair BENCHMARKS.md proposes for a peer that has not completed a handshake).
#
#   scripts/experiments/crossing-initiations.sh [ROUNDS]     (as root; needs wireguard-go, wg)
#
# Not part of the test suite: it measures WireGuard's behaviour, not wgmesh's.
set -euo pipefail
rounds=${1:-10}
both=${BOTH:-1}
repair=${REPAIR:-}
# The daemons run in the foreground, in the background of this script: ended by their ids.
pids=()
remove_namespaces() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  ip netns del wgxa 2>/dev/null || true
  ip netns del wgxb 2>/dev/null || true
  rm -f /var/run/wireguard/wgxa.sock /var/run/wireguard/wgxb.sock
}
if [ -e /var/run/wireguard/wgxa.sock ] || [ -e /var/run/wireguard/wgxb.sock ]; then
  echo "crossing-initiations: wgxa/wgxb already exist (another run?)" >&2
  exit 1
fi
dir=$(mktemp -d)
trap 'remove_namespaces; rm -rf "$dir"' EXIT
a() { ip netns exec wgxa "$@"; }
b() { ip netns exec wgxb "$@"; }
ip netns add wgxa
ip netns add wgxb
ip link add va netns wgxa type veth peer name vb netns wgxb
ip -n wgxa addr add 192.168.77.1/24 dev va
ip -n wgxb addr add 192.168.77.2/24 dev vb
for ns in wgxa wgxb; do ip -n $ns link set lo up; done
ip -n wgxa link set va up
ip -n wgxb link set vb up
WG_PROCESS_FOREGROUND=1 ip netns exec wgxa wireguard-go wgxa >/dev/null 2>&1 &
pids+=($!)
WG_PROCESS_FOREGROUND=1 ip netns exec wgxb wireguard-go wgxb >/dev/null 2>&1 &
pids+=($!)
until [ -S /var/run/wireguard/wgxa.sock ] && [ -S /var/run/wireguard/wgxb.sock ]; do sleep 0.05; done
until ip -n wgxa link show wgxa >/dev/null 2>&1 && ip -n wgxb link show wgxb >/dev/null 2>&1; do sleep 0.05; done
(umask 077; wg genkey >"$dir/a"; wg genkey >"$dir/b")
pa=$(wg pubkey <"$dir/a")
pb=$(wg pubkey <"$dir/b")
a wg set wgxa private-key "$dir/a" listen-port 40001
b wg set wgxb private-key "$dir/b" listen-port 40002
ip -n wgxa addr add 10.99.0.1/32 dev wgxa
ip -n wgxb addr add 10.99.0.2/32 dev wgxb
ip -n wgxa link set wgxa up
ip -n wgxb link set wgxb up
ip -n wgxa route add 10.99.0.2/32 dev wgxa
ip -n wgxb route add 10.99.0.1/32 dev wgxb
for i in $(seq 1 "$rounds"); do
  # Fresh peers on both sides: no session, no handshake state, no rate limit.
  a wg set wgxa peer "$pb" remove
  b wg set wgxb peer "$pa" remove
  a wg set wgxa peer "$pb" endpoint 192.168.77.2:40002 allowed-ips 10.99.0.2/32
  b wg set wgxb peer "$pa" endpoint 192.168.77.1:40001 allowed-ips 10.99.0.1/32
  t0=$(date +%s%N)
  a ping -c1 -W0.01 10.99.0.2 >/dev/null 2>&1 &
  pings=($!)
  if [ "$both" = 1 ]; then b ping -c1 -W0.01 10.99.0.1 >/dev/null 2>&1 & pings+=($!); fi
  wait "${pings[@]}" || true
  if [ -n "$repair" ]; then
    sleep "$repair"
    a wg set wgxa peer "$pb" remove
    a wg set wgxa peer "$pb" endpoint 192.168.77.2:40002 allowed-ips 10.99.0.2/32
  fi
  until a ping -c1 -W0.2 10.99.0.2 >/dev/null 2>&1; do :; done
  echo "round $i: traffic flows after $(( ($(date +%s%N) - t0) / 1000000 )) ms"
done
