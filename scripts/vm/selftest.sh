#!/bin/bash
# Self-test of the VM harness (see README.md here). Boots the VM several times:
#   1. selftest-guest.sh: kernel WireGuard, netns/veth tunnel over IPv4 and
#      IPv6, nftables, sysctl, fwmark policy routing, module autoload;
#   2. a dynamically linked Rust hello-world (built with rustc) exiting 0
#      and 3, to prove binaries run and exit codes propagate;
#   3. --file, --env and --no-module wireguard;
#   4. the failure paths: a timeout (expects 124) and a kernel panic
#      (expects 125).
# usage: scripts/vm/selftest.sh [--quick]   (--quick: step 1 only)
# Exits 0 only if everything held.
set -euo pipefail
# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
export LC_ALL=C

quick=0
case "${1:-}" in
"") ;;
--quick) quick=1 ;;
*) sed -n '2,11s/^# \{0,1\}//p' "$0" >&2; exit 2 ;;
esac

run="$VM_DIR/run.sh"
passed=0
failed=0
failures=()
# expect NAME CODE CMD...: run CMD (output streamed), compare its exit code.
expect() {
    local name="$1" want="$2" rc t0
    shift 2
    echo "---- $name (expecting exit $want)"
    t0=$EPOCHREALTIME
    set +e
    "$@"
    rc=$?
    set -e
    local secs
    secs=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
    if [[ $rc == "$want" ]]; then
        passed=$((passed + 1))
        echo "---- PASS $name (${secs}s)"
    else
        failed=$((failed + 1))
        failures+=("$name")
        echo "---- FAIL $name: exit $rc, wanted $want (${secs}s)"
    fi
}

# Prepare once up front so that the timings below are of boots only.
"$VM_DIR/prepare.sh" >/dev/null

expect "guest selftest (WireGuard, netns, nftables, policy routing)" 0 \
    "$run" "$VM_DIR/selftest-guest.sh"

if [[ $quick == 0 ]]; then
    mkdir -p "$VM_CACHE/tmp"
    tmp=$(mktemp -d "$VM_CACHE/tmp/selftest.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT

    command -v rustc >/dev/null || vm_die "rustc not found (needed for the Rust binary check)"
    cat >"$tmp/hello.rs" <<'EOF'
use std::process::exit;
fn main() {
    let code: i32 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(99);
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let in_vm = std::env::var("WGMESH_IN_VM").unwrap_or_default();
    println!("hello from Rust: kernel {} WGMESH_IN_VM={} exit {}", release.trim(), in_vm, code);
    if in_vm != "1" {
        exit(98);
    }
    exit(code);
}
EOF
    rustc -O -o "$tmp/hello" "$tmp/hello.rs"
    expect "Rust binary, exit 0" 0 "$run" "$tmp/hello" 0
    expect "Rust binary, exit 3" 3 "$run" "$tmp/hello" 3

    printf 'fixture-data\n' >"$tmp/fixture.txt"
    cat >"$tmp/options.sh" <<'EOF'
#!/bin/bash
set -euo pipefail
[[ $(cat /data/fixture.txt) == fixture-data ]]
[[ $WGMESH_SELFTEST == "two words" ]]
[[ $1 == "an arg" ]]
# --no-module wireguard: neither preloaded nor autoloadable.
if grep -q '^wireguard ' /proc/modules; then exit 1; fi
if ip link add wg0 type wireguard 2>/dev/null; then exit 1; fi
echo "options ok"
EOF
    chmod +x "$tmp/options.sh"
    expect "--file, --env, --no-module wireguard" 0 \
        "$run" --file "$tmp/fixture.txt:/data/fixture.txt" --env "WGMESH_SELFTEST=two words" \
        --no-module wireguard "$tmp/options.sh" "an arg"

    printf '#!/bin/bash\necho sleeping; sleep 1000\n' >"$tmp/hang.sh"
    chmod +x "$tmp/hang.sh"
    expect "timeout is enforced" 124 "$run" --timeout 15 "$tmp/hang.sh"

    printf '#!/bin/bash\necho c >/proc/sysrq-trigger\nsleep 100\n' >"$tmp/panic.sh"
    chmod +x "$tmp/panic.sh"
    expect "kernel panic is reported" 125 "$run" --timeout 120 "$tmp/panic.sh"
fi

echo
[[ $failed == 0 ]] || echo "failed: ${failures[*]}"
echo "vm-selftest: $passed passed, $failed failed"
[[ $failed == 0 ]]
