#!/usr/bin/env bash
# Experiment for issue 13's key rotation: what happens to an established WireGuard session
# when one device's private key changes? Two wireguard-go peers (a, b) in namespaces, a
# session up; then a's private key is replaced while b still lists a's OLD public key.
# Prints, for each direction, whether packets still flow over the old session, and a's and
# b's latest-handshake times before and after.
#
#   scripts/experiments/private-key-change.sh      (as root; needs wireguard-go, wg, ping)
#   scripts/vm/run.sh --env BACKEND=kernel scripts/experiments/private-key-change.sh
#                                                  (the kernel half, in the VM)
#
# Not part of the test suite: it measures WireGuard's behaviour, not wgmesh's.
set -euo pipefail
remove_namespaces() {
  ip netns del wgka 2>/dev/null || true
  ip netns del wgkb 2>/dev/null || true
  rm -f /var/run/wireguard/wgka.sock /var/run/wireguard/wgkb.sock
}
remove_namespaces
dir=$(mktemp -d)
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; remove_namespaces; rm -rf "$dir"' EXIT
a() { ip netns exec wgka "$@"; }
b() { ip netns exec wgkb "$@"; }
ip netns add wgka
ip netns add wgkb
ip link add va netns wgka type veth peer name vb netns wgkb
ip -n wgka addr add 192.168.78.1/24 dev va
ip -n wgkb addr add 192.168.78.2/24 dev vb
for ns in wgka wgkb; do ip -n $ns link set lo up; done
ip -n wgka link set va up
ip -n wgkb link set vb up
if [ "${BACKEND:-userspace}" = kernel ]; then
  ip -n wgka link add wgka type wireguard
  ip -n wgkb link add wgkb type wireguard
else
  WG_PROCESS_FOREGROUND=1 a wireguard-go wgka >/dev/null 2>&1 & pids+=($!)
  WG_PROCESS_FOREGROUND=1 b wireguard-go wgkb >/dev/null 2>&1 & pids+=($!)
  for _ in $(seq 50); do [ -S /var/run/wireguard/wgka.sock ] && [ -S /var/run/wireguard/wgkb.sock ] && break; sleep 0.1; done
fi
echo "backend: ${BACKEND:-userspace}"
(umask 077; wg genkey >"$dir/a"; wg genkey >"$dir/a2"; wg genkey >"$dir/b")
pa=$(wg pubkey <"$dir/a"); pb=$(wg pubkey <"$dir/b")
a wg set wgka private-key "$dir/a" listen-port 40011 peer "$pb" endpoint 192.168.78.2:40012 allowed-ips 10.98.0.2/32
b wg set wgkb private-key "$dir/b" listen-port 40012 peer "$pa" endpoint 192.168.78.1:40011 allowed-ips 10.98.0.1/32
ip -n wgka addr add 10.98.0.1/32 dev wgka; ip -n wgkb addr add 10.98.0.2/32 dev wgkb
ip -n wgka link set wgka up; ip -n wgkb link set wgkb up
ip -n wgka route add 10.98.0.2/32 dev wgka; ip -n wgkb route add 10.98.0.1/32 dev wgkb
a ping -c3 -i0.2 -W1 10.98.0.2 >/dev/null && echo "session up (a -> b answered)"
echo "before: a's handshake with b: $(a wg show wgka latest-handshakes | awk '{print $2}'), b's with a: $(b wg show wgkb latest-handshakes | awk '{print $2}')"
sleep 1.1  # handshake timestamps have 1 s resolution
rx_b_before=$(b wg show wgkb transfer | awk '{print $2}')
rx_a_before=$(a wg show wgka transfer | awk '{print $2}')
a wg set wgka private-key "$dir/a2"
echo "a's private key replaced (b still has a's old public key)"
# b -> a over the old session: does a still accept it, and can it answer?
if b ping -c5 -i0.2 -W1 10.98.0.1 >"$dir/ba" 2>&1; then r=all; else r=$(grep -o '[0-9]* \(packets \)\?received' "$dir/ba" || echo "0 received"); fi
echo "b -> a after the change: $r of 5 answered"
if a ping -c5 -i0.2 -W1 10.98.0.2 >"$dir/ab" 2>&1; then r=all; else r=$(grep -o '[0-9]* \(packets \)\?received' "$dir/ab" || echo "0 received"); fi
echo "a -> b after the change: $r of 5 answered"
echo "b received from a: $rx_b_before bytes before, $(b wg show wgkb transfer | awk '{print $2}') after"
echo "a received from b: $rx_a_before bytes before, $(a wg show wgka transfer | awk '{print $2}') after (old session still decrypts?)"
echo "after: a's handshake with b: $(a wg show wgka latest-handshakes | awk '{print $2}'), b's with a: $(b wg show wgkb latest-handshakes | awk '{print $2}')"
# b learns a's new key as a second entry (no allowed IPs), then the allowed IP moves.
pa2=$(wg pubkey <"$dir/a2")
b wg set wgkb peer "$pa2" endpoint 192.168.78.1:40011
b wg set wgkb peer "$pa2" allowed-ips 10.98.0.1/32
t0=${EPOCHREALTIME/./}
wait_flag=-W1; ping -V >/dev/null 2>&1 && wait_flag=-W0.2  # busybox ping: whole seconds only
until a ping -c1 "$wait_flag" 10.98.0.2 >/dev/null 2>&1; do :; done
echo "after b added a's new key and moved the allowed IP: a -> b answered after $(( (${EPOCHREALTIME/./} - t0) / 1000 )) ms"
