#!/usr/bin/env bash
# Experiment for issue 13: how many packets does a key rotation lose, in two orders?
# Two WireGuard devices a and b in namespaces, a session up, ping both ways every 10 ms; then
# a's private key changes from K1 to K2.
#   ORDER=late : b learns K2 only DELAY ms after a switched (what an agent does when it
#                reads the new key from the API): one `wg set` removes K1 and adds K2 with the
#                allowed IP, then a keepalive kick starts a handshake.
#   ORDER=early: b adds K2 as a second entry (same endpoint, no allowed IPs) before a
#                switches; after the switch b polls `wg show latest-handshakes` every POLL ms
#                and, once K2's entry has a handshake, moves the allowed IP to it and removes
#                K1 in one `wg set` (wgmesh's rotation order).
# Prints lost / sent per direction.
#
#   scripts/experiments/rotation-order.sh                         (as root; wireguard-go, wg)
#   ORDER=late DELAY=300 scripts/experiments/rotation-order.sh
#   scripts/vm/run.sh --env BACKEND=kernel scripts/experiments/rotation-order.sh  (kernel)
#
# Not part of the test suite: it measures WireGuard's behaviour, not wgmesh's.
set -euo pipefail
ORDER=${ORDER:-early} DELAY=${DELAY:-200} POLL=${POLL:-100} BACKEND=${BACKEND:-userspace}
remove_namespaces() {
  ip netns del wgra 2>/dev/null || true
  ip netns del wgrb 2>/dev/null || true
  rm -f /var/run/wireguard/wgra.sock /var/run/wireguard/wgrb.sock
}
remove_namespaces
dir=$(mktemp -d)
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; remove_namespaces; rm -rf "$dir"' EXIT
a() { ip netns exec wgra "$@"; }
b() { ip netns exec wgrb "$@"; }
sleep_ms() { sleep "$(printf '%d.%03d' $(($1 / 1000)) $(($1 % 1000)))"; }
ip netns add wgra
ip netns add wgrb
ip link add va netns wgra type veth peer name vb netns wgrb
ip -n wgra addr add 192.168.79.1/24 dev va
ip -n wgrb addr add 192.168.79.2/24 dev vb
for ns in wgra wgrb; do ip -n $ns link set lo up; done
ip -n wgra link set va up
ip -n wgrb link set vb up
if [ "$BACKEND" = kernel ]; then
  ip -n wgra link add wgra type wireguard
  ip -n wgrb link add wgrb type wireguard
else
  WG_PROCESS_FOREGROUND=1 a wireguard-go wgra >/dev/null 2>&1 & pids+=($!)
  WG_PROCESS_FOREGROUND=1 b wireguard-go wgrb >/dev/null 2>&1 & pids+=($!)
  for _ in $(seq 50); do [ -S /var/run/wireguard/wgra.sock ] && [ -S /var/run/wireguard/wgrb.sock ] && break; sleep 0.1; done
fi
(umask 077; wg genkey >"$dir/a"; wg genkey >"$dir/a2"; wg genkey >"$dir/b")
pa=$(wg pubkey <"$dir/a"); pa2=$(wg pubkey <"$dir/a2"); pb=$(wg pubkey <"$dir/b")
a wg set wgra private-key "$dir/a" listen-port 40021 peer "$pb" endpoint 192.168.79.2:40022 allowed-ips 10.97.0.2/32
b wg set wgrb private-key "$dir/b" listen-port 40022 peer "$pa" endpoint 192.168.79.1:40021 allowed-ips 10.97.0.1/32
ip -n wgra addr add 10.97.0.1/32 dev wgra; ip -n wgrb addr add 10.97.0.2/32 dev wgrb
ip -n wgra link set wgra up; ip -n wgrb link set wgrb up
ip -n wgra route add 10.97.0.2/32 dev wgra; ip -n wgrb route add 10.97.0.1/32 dev wgrb
for _ in $(seq 20); do a ping -c1 -W1 10.97.0.2 >/dev/null 2>&1 && break; done
echo "backend $BACKEND, order $ORDER (delay ${DELAY} ms, poll ${POLL} ms): session up"
if [ "$ORDER" = early ]; then
  b wg set wgrb peer "$pa2" endpoint 192.168.79.1:40021
fi
count=${COUNT:-400}
a ping -c "$count" -i 0.01 -W 2 10.97.0.2 >"$dir/ab" 2>&1 & pab=$!
b ping -c "$count" -i 0.01 -W 2 10.97.0.1 >"$dir/ba" 2>&1 & pba=$!
sleep 1
t0=${EPOCHREALTIME/./}
a wg set wgra private-key "$dir/a2"
if [ "$ORDER" = early ]; then
  until b wg show wgrb latest-handshakes | grep -q "^$pa2[[:space:]]*[1-9]"; do sleep_ms "$POLL"; done
  t1=${EPOCHREALTIME/./}
  b wg set wgrb peer "$pa2" allowed-ips 10.97.0.1/32 peer "$pa" remove
  echo "b saw K2's handshake and moved the allowed IP $(( (t1 - t0) / 1000 )) ms after the switch"
else
  sleep_ms "$DELAY"
  # add-new first (it takes the allowed IP from K1 in the same message), then remove-old
  b wg set wgrb peer "$pa2" endpoint 192.168.79.1:40021 allowed-ips 10.97.0.1/32 persistent-keepalive 1 peer "$pa" remove
  b wg set wgrb peer "$pa2" persistent-keepalive 0
  echo "b replaced K1 by K2 $(( (${EPOCHREALTIME/./} - t0) / 1000 )) ms after the switch"
fi
wait $pab || true; wait $pba || true
for d in ab ba; do
  line=$(grep 'transmitted' "$dir/$d" || true)
  if [ -z "$line" ]; then echo "${d:0:1} -> ${d:1:1}: ping ended early: $(tail -1 "$dir/$d")"; continue; fi
  sent=$(echo "$line" | grep -o '^[0-9]*'); got=$(echo "$line" | grep -o '[0-9]* \(packets \)\?received' | grep -o '^[0-9]*')
  echo "${d:0:1} -> ${d:1:1}: lost $((sent - got)) / $sent"
done
