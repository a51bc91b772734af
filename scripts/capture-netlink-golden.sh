#!/usr/bin/env bash
# Captures wgmesh-netlink's golden messages from a real kernel: inside the VM of scripts/vm,
# the unit test wire::capture::capture_golden_messages applies a plan with wgmesh, then sends
# every request of its capture windows while an nlmon device captures the traffic both ways.
# The captured frames go to wgmesh-netlink/testdata/nlmon-linux-<version>.txt, which plain
# `cargo test` reads back (parse and re-emit byte for byte, today's requests, the fake
# kernel's answers). Needs root (the VM). Run it again when the capture windows change or the
# VM's kernel does.
set -euo pipefail
cd "$(dirname "$0")/.."
export LC_ALL=C
[ "$(id -u)" -eq 0 ] || { echo "capture-netlink-golden: needs root (the VM)" >&2; exit 1; }

bin=$(cargo test --release -p wgmesh-netlink --lib --no-run --message-format=json 2>/dev/null |
    python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "wgmesh_netlink":
        print(m["executable"])
')
[ -x "$bin" ] || { echo "capture-netlink-golden: no unit test binary (cargo test --no-run failed?)" >&2; exit 1; }

log=$(mktemp)
trap 'rm -f "$log"' EXIT
scripts/vm/run.sh --strip-debug --timeout 900 "$bin" --ignored --exact \
    wire::capture::capture_golden_messages --nocapture --test-threads=1 | tee "$log"
kernel=$(sed -n 's/.*(kernel \([^,]*\), uptime.*/\1/p' "$log" | head -n 1)
version=$(echo "$kernel" | sed -n 's/^\([0-9]*\.[0-9]*\).*/\1/p')
[ -n "$version" ] || { echo "capture-netlink-golden: no kernel version in the log" >&2; exit 1; }
out="wgmesh-netlink/testdata/nlmon-linux-$version.txt"
{
    echo "# Netlink traffic captured with an nlmon device in the VM of scripts/vm (kernel $kernel),"
    echo "# $(date -u +%Y-%m-%d), by scripts/capture-netlink-golden.sh: one captured frame per line,"
    echo "# '<window> <req|ans> <hex>' (req: sent by wgmesh; ans: sent by the kernel). The windows"
    echo "# and their requests are wire::capture::windows(); 'meta' gives the wireguard family id"
    echo "# and the index of wireguard.cali in that run."
    grep -ao 'GOLDEN .*' "$log" | sed 's/^GOLDEN //'
} >"$out"
echo "capture-netlink-golden: $(grep -vc '^#' "$out") frames in $out"
