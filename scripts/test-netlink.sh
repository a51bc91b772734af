#!/usr/bin/env bash
# wgmesh-netlink's privileged suites, run by scripts/test-all:
#   1. the userspace suite: tests/linux.rs against wireguard-go, in a fresh network namespace
#      on this host (root needed);
#   2. the kernel suite: the same tests inside a qemu VM with Debian's cloud kernel
#      (scripts/vm/run.sh), and auto's fallback with the wireguard module blocked;
#   3. the benchmark (tests/bench.rs) in the VM; its BENCH lines go to
#      target/bench-netlink.txt (WGMESH_SKIP_BENCH=1 skips it).
# Installs what is missing (Debian packages). Exits non-zero when any test fails or cannot run.
#
# Knobs: WGMESH_DRIFT_CASES (default 24 random drifted start states per suite),
#        WGMESH_BENCH_PEERS / WGMESH_BENCH_IPS (default 2000 x 50).
set -euo pipefail
cd "$(dirname "$0")/.."
export LC_ALL=C

start=$(date +%s)
step() { printf '\n==> test-netlink: %s (%ss)\n' "$*" "$(($(date +%s) - start))"; }
die() { echo "test-netlink: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "needs root (network namespaces, netlink, the VM)"
export PATH="$PATH:/usr/sbin:/sbin"

step "packages"
missing=()
# ping: the userspace suite sends traffic through a wireguard-go tunnel.
for dep in wireguard-go:wireguard-go wg:wireguard-tools nft:nftables ip:iproute2 ping:iputils-ping \
    qemu-system-x86_64:qemu-system-x86 busybox:busybox-static cpio:cpio kmod:kmod objcopy:binutils; do
    command -v "${dep%%:*}" >/dev/null 2>&1 || missing+=("${dep#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

step "build the test binaries (release: the VM is slow enough)"
mapfile -t bins < <(cargo test --release -p wgmesh-netlink --tests --no-run --message-format=json 2>/dev/null |
    python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] in ("linux", "bench", "nft_sets"):
        print(m["target"]["name"], m["executable"])
')
# The `wgmesh apply` test (cargo builds the binary it runs).
example=$(cargo test --release --features cli,netlink --test apply_cli --no-run --message-format=json 2>/dev/null |
    python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "apply_cli":
        print(m["executable"])
')
linux="" bench="" sets=""
for b in "${bins[@]}"; do
    case "$b" in
    "linux "*) linux="${b#linux }" ;;
    "bench "*) bench="${b#bench }" ;;
    "nft_sets "*) sets="${b#nft_sets }" ;;
    esac
done
[ -x "$linux" ] && [ -x "$bench" ] && [ -x "$example" ] && [ -x "$sets" ] ||
    die "could not find the linux, bench, nft_sets and apply_cli test binaries (cargo test --no-run failed?)"

failed=()
cases="${WGMESH_DRIFT_CASES:-24}"

step "userspace suite: wireguard-go in a network namespace"
ns="wgmesh-test-$$"
cleanup() {
    if ip netns list 2>/dev/null | grep -qw "$ns"; then
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill "$pid" 2>/dev/null || true; done
        sleep 0.5
        ip netns del "$ns" 2>/dev/null || true
    fi
}
trap cleanup EXIT
ip netns add "$ns"
ip -n "$ns" link set lo up
# Oracle for auto's choice: can this kernel make a WireGuard link?
if ip -n "$ns" link add wgmesh-probe type wireguard 2>/dev/null; then
    ip -n "$ns" link del wgmesh-probe
    host_wg=1
else
    host_wg=0
fi
t=$(date +%s)
if ! WGMESH_TEST_BACKEND=userspace WGMESH_TEST_KERNEL_HAS_WIREGUARD=$host_wg WGMESH_DRIFT_CASES=$cases \
    RUST_BACKTRACE=1 ip netns exec "$ns" "$linux" --ignored --test-threads=1; then
    failed+=("userspace suite")
fi
if ! WGMESH_TEST_BACKEND=userspace RUST_BACKTRACE=1 ip netns exec "$ns" "$example" --ignored --test-threads=1; then
    failed+=("wgmesh apply")
fi
echo "userspace suite: $(($(date +%s) - t)) s"
cleanup

step "the phases' nftables interval sets on the host kernel (a namespace of their own, ~3 s)"
ip netns add "$ns"
if ! RUST_BACKTRACE=1 ip netns exec "$ns" "$sets" --ignored --test-threads=1 --skip measure_; then
    failed+=("nftables sets")
fi
cleanup

step "kernel suite in the VM"
t=$(date +%s)
if ! scripts/vm/run.sh --strip-debug --timeout 1500 --env WGMESH_TEST_BACKEND=kernel \
    --env WGMESH_TEST_KERNEL_HAS_WIREGUARD=1 --env WGMESH_DRIFT_CASES="$cases" --env RUST_BACKTRACE=1 \
    "$linux" --ignored --test-threads=1; then
    failed+=("kernel suite")
fi
echo "kernel suite: $(($(date +%s) - t)) s"

step "auto without kernel WireGuard (VM, wireguard module blocked)"
if ! scripts/vm/run.sh --strip-debug --timeout 300 --no-module wireguard --env WGMESH_TEST_BACKEND=userspace \
    --env WGMESH_TEST_KERNEL_HAS_WIREGUARD=0 "$linux" --ignored --exact auto_backend_says_what_it_picked; then
    failed+=("auto fallback")
fi

if [ -z "${WGMESH_SKIP_BENCH:-}" ]; then
    step "benchmark in the VM"
    mkdir -p target
    out=target/bench-netlink.txt
    if scripts/vm/run.sh --strip-debug --timeout 1500 --mem 3072 \
        --env WGMESH_BENCH_PEERS="${WGMESH_BENCH_PEERS:-2000}" --env WGMESH_BENCH_IPS="${WGMESH_BENCH_IPS:-50}" \
        "$bench" --ignored --nocapture --test-threads=1 | tee "$out.log"; then
        grep '^BENCH ' "$out.log" >"$out" || true
        cat "$out"
    else
        failed+=("benchmark")
    fi
fi

step "done"
if [ ${#failed[@]} -gt 0 ]; then
    echo "test-netlink: FAILED: ${failed[*]}" >&2
    exit 1
fi
echo "test-netlink: all suites passed"
