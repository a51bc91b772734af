#!/bin/bash
# The checks are single-quoted snippets run by bash -c, on purpose.
# shellcheck disable=SC2016
# Runs INSIDE the wgmesh VM (scripts/vm/selftest.sh boots it). Proves that
# the guest has what the netlink integration tests need: kernel WireGuard
# without modprobe, netns + veth, a WireGuard tunnel over IPv4 and IPv6,
# nftables, sysctls, policy routing with fwmarks, and module autoload.
# Exits 0 only if every check passed.
set -u

if [[ ${WGMESH_IN_VM:-} != 1 ]]; then
    echo "selftest-guest.sh: refusing to run outside the VM (WGMESH_IN_VM != 1)" >&2
    exit 2
fi

passed=0
failed=0
failures=()
# check NAME CMD...: run CMD, record PASS/FAIL with its output on failure.
check() {
    local name="$1" out rc
    shift
    out=$("$@" 2>&1)
    rc=$?
    if [[ $rc == 0 ]]; then
        passed=$((passed + 1))
        echo "PASS $name"
    else
        failed=$((failed + 1))
        failures+=("$name")
        echo "FAIL $name (exit $rc)"
        [[ -z $out ]] || printf '    | %s\n' "${out//$'\n'/$'\n'    | }"
    fi
}
# Run a shell snippet as one check (so that pipelines and $(...) work).
# (No `grep -q` in pipelines: with pipefail, the writer may die of SIGPIPE.)
checksh() {
    local name="$1"
    shift
    check "$name" bash -c "set -euo pipefail; $1"
}

n1() { ip netns exec ns1 "$@"; }
n2() { ip netns exec ns2 "$@"; }
export -f n1 n2

echo "== environment"
echo "kernel $(uname -r), $(nproc) cpus, $(awk '/MemTotal/ {print $2 " kB"}' /proc/meminfo)"
checksh "real iproute2 on PATH" '[[ $(command -v ip) != *busybox* ]]; ip -V | grep -c iproute2 >/dev/null'
checksh "wireguard module loaded at boot" 'grep -q "^wireguard " /proc/modules'
check "running as root" test "$(id -u)" = 0
check "/var/run is writable tmpfs" bash -c 'touch /var/run/x && rm /var/run/x && grep -q " /run tmpfs " /proc/mounts'
check "/tmp is tmpfs" grep -q " /tmp tmpfs " /proc/mounts

echo "== WireGuard basics (root namespace)"
umask 077
check "ip link add wg0 type wireguard" ip link add wg0 type wireguard
check "wg genkey" bash -c 'wg genkey >/tmp/k0 && [[ $(wc -c </tmp/k0) == 45 ]]'
check "wg set private-key/listen-port" wg set wg0 private-key /tmp/k0 listen-port 51000
checksh "wg show reports the key and port" '
    [[ $(wg show wg0 public-key) == $(wg pubkey </tmp/k0) ]]
    [[ $(wg show wg0 listen-port) == 51000 ]]'
checksh "wg set peer + wg show dump" '
    peer=$(wg genkey | wg pubkey)
    wg set wg0 peer "$peer" allowed-ips 10.200.0.0/24,fd00:200::/64 endpoint 192.0.2.9:51820 persistent-keepalive 25
    wg show wg0 dump | grep -c "^$peer" >/dev/null
    wg show wg0 allowed-ips | grep -c "10.200.0.0/24" >/dev/null'
check "ip link del wg0" ip link del wg0

echo "== two namespaces, veth underlay, WireGuard tunnel"
wg genkey >/tmp/k1
wg genkey >/tmp/k2
pub1=$(wg pubkey </tmp/k1)
pub2=$(wg pubkey </tmp/k2)
export pub1 pub2
checksh "netns + veth" '
    ip netns add ns1
    ip netns add ns2
    ip link add v1 netns ns1 type veth peer name v2 netns ns2
    n1 ip addr add 192.0.2.1/24 dev v1
    n2 ip addr add 192.0.2.2/24 dev v2
    n1 ip addr add 2001:db8::1/64 dev v1 nodad
    n2 ip addr add 2001:db8::2/64 dev v2 nodad
    for ns in ns1 ns2; do ip -n $ns link set lo up; done
    n1 ip link set v1 up
    n2 ip link set v2 up'
check "underlay ping (IPv4)" n1 ping -c 1 -W 5 192.0.2.2
check "underlay ping (IPv6)" n1 ping -6 -c 1 -W 5 2001:db8::2
checksh "wireguard interfaces in the namespaces" '
    n1 ip link add wg1 type wireguard
    n2 ip link add wg2 type wireguard
    n1 wg set wg1 private-key /tmp/k1 listen-port 51820 \
        peer "$pub2" endpoint 192.0.2.2:51820 allowed-ips 10.99.0.2/32,fd99::2/128,198.51.100.0/24
    n2 wg set wg2 private-key /tmp/k2 listen-port 51820 \
        peer "$pub1" endpoint 192.0.2.1:51820 allowed-ips 10.99.0.1/32,fd99::1/128
    n1 ip addr add 10.99.0.1/24 dev wg1
    n2 ip addr add 10.99.0.2/24 dev wg2
    n1 ip addr add fd99::1/64 dev wg1 nodad
    n2 ip addr add fd99::2/64 dev wg2 nodad
    n1 ip link set wg1 up
    n2 ip link set wg2 up'

# The first handshake is slow under emulation: retry for up to 60 s.
wait_ping() {
    local deadline=$((SECONDS + 60))
    while ((SECONDS < deadline)); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.5
    done
    "$@"
}
t0=$EPOCHREALTIME
check "ping through the tunnel (IPv4, waits for the handshake)" wait_ping n1 ping -c 1 -W 2 10.99.0.2
echo "   (first ping through the tunnel answered after $(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }') s)"
checksh "handshake recorded by wg show" '
    hs=$(n1 wg show wg1 latest-handshakes | awk "{print \$2}")
    [[ $hs -gt 0 ]]
    n2 wg show wg2 transfer | awk "{ exit !(\$2 > 0 && \$3 > 0) }"'
check "ping through the tunnel (IPv6)" wait_ping n1 ping -6 -c 1 -W 2 fd99::2
checksh "tunnel over an IPv6 underlay" '
    n1 wg set wg1 peer "$pub2" endpoint "[2001:db8::2]:51820"
    n2 wg set wg2 peer "$pub1" endpoint "[2001:db8::1]:51820"
    n1 ping -c 3 -W 5 10.99.0.2 >/dev/null
    n1 wg show wg1 endpoints | grep -cF "[2001:db8::2]:51820" >/dev/null'

echo "== nftables"
checksh "nft table/chain/counter counts tunnel packets" '
    n1 nft add table inet t
    n1 nft add chain inet t out "{ type filter hook output priority 0; policy accept; }"
    n1 nft add rule inet t out ip daddr 10.99.0.2 counter
    n1 ping -c 2 -W 5 10.99.0.2 >/dev/null
    n1 nft list chain inet t out | grep -Ec "counter packets [1-9]" >/dev/null'
checksh "nft fib, ct, mark, named counter, JSON output" '
    n1 nft add counter inet t hits
    n1 nft add chain inet t in "{ type filter hook input priority 0; policy accept; }"
    n1 nft add rule inet t in fib daddr type local ct state established,related counter name hits
    n1 nft add rule inet t out meta mark set 0x1 udp dport 51820
    n1 ping -c 1 -W 5 10.99.0.2 >/dev/null
    n1 nft list counter inet t hits | grep -Ec "packets [1-9]" >/dev/null
    n1 nft -j list ruleset | grep -c "\"nftables\"" >/dev/null'
checksh "nft nat masquerade chain" '
    n1 nft add chain inet t post "{ type nat hook postrouting priority 100; }"
    n1 nft add rule inet t post oifname v1 masquerade'
check "nft delete table" n1 nft delete table inet t

echo "== sysctl and policy routing"
checksh "sysctl -w net.ipv4.conf.all.src_valid_mark=1" '
    sysctl -w net.ipv4.conf.all.src_valid_mark=1
    [[ $(cat /proc/sys/net/ipv4/conf/all/src_valid_mark) == 1 ]]'
checksh "ip rule not fwmark + throw route (root ns)" '
    ip rule add not fwmark 0x100000/0x100000 table 1
    ip route add throw 10.0.0.0/8 table 1
    ip rule show | grep -c "not from all fwmark 0x100000/0x100000 lookup 1" >/dev/null
    ip route show table 1 | grep -c "throw 10.0.0.0/8" >/dev/null
    ip -6 rule add not fwmark 0x100000/0x100000 table 1
    ip -6 route add throw fd00::/8 table 1'
checksh "fwmark policy routing steers traffic into the tunnel" '
    n2 ip link add d0 type dummy
    n2 ip addr add 198.51.100.1/32 dev d0
    n2 ip link set d0 up
    n1 sysctl -qw net.ipv4.conf.all.src_valid_mark=1
    n1 wg set wg1 fwmark 0x100000
    n1 ip rule add not fwmark 0x100000/0x100000 table 1
    n1 ip route add 198.51.100.0/24 dev wg1 table 1
    n1 ip route add throw 10.0.0.0/8 table 1
    n1 ip route get 198.51.100.1 | grep -c "dev wg1 table 1" >/dev/null
    if n1 ip route get 198.51.100.1 mark 0x100000 2>/dev/null | grep -c wg1 >/dev/null; then exit 1; fi
    n1 ping -c 2 -W 5 198.51.100.1 >/dev/null
    [[ $(n1 wg show wg1 fwmark) == 0x100000 ]]'

echo "== module autoload (kmod in the guest)"
check "vxlan autoloads" ip link add vx0 type vxlan id 42 dstport 4789 dev lo
check "sch_netem autoloads (tc qdisc netem)" tc qdisc add dev lo root netem delay 1ms
checksh "nft_log autoloads" '
    nft add table inet a
    nft add chain inet a c "{ type filter hook output priority 0; }"
    nft add rule inet a c udp dport 9 log prefix wgmesh
    nft delete table inet a'

echo "== summary"
if [[ $failed != 0 ]]; then
    echo "failed checks: ${failures[*]}"
fi
echo "selftest: $passed passed, $failed failed"
[[ $failed == 0 ]]
