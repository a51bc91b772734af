#!/usr/bin/env bash
# `wgmesh plan --format json` for one node of a generated NODES x PODS cluster (Azure CNI
# style: workload_ips, host encryption), measured as a whole process with /usr/bin/time -v.
#
#   scripts/bench-cli.sh [BINARY...]     (default: target/release/wgmesh)
#
# Env: NODES (2500), PODS (60), RUNS (5). Output goes to a pipe (compact JSON since 14b1d40);
# each binary's wall time, user+sys CPU and max RSS are printed, median of RUNS.
set -euo pipefail
NODES=${NODES:-2500} PODS=${PODS:-60} RUNS=${RUNS:-5}
[ $# -gt 0 ] || set -- target/release/wgmesh
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
python3 - "$NODES" "$PODS" > "$dir/cluster.json" <<'PY'
import base64, json, sys
n, p = int(sys.argv[1]), int(sys.argv[2])
def key(i):  # 32 distinct bytes per node (public keys are not checked against a curve)
    return base64.b64encode(bytes([7]) + i.to_bytes(8, "little") + bytes(23)).decode()
nodes = []
for i in range(n):
    a, b = i // 250, i % 250
    nodes.append({"name": f"aks-nodepool1-00000000-vmss{i:06}",
                  "addresses": [f"10.{a}.{b}.1"],
                  "wireguard": {"enabled": True, "public_key": key(i)},
                  "workload_ips": [f"10.{a}.{b}.{2 + k}" for k in range(p)]})
json.dump({"mesh": {"route_source": "workload_ips", "host_encryption": True}, "nodes": nodes},
          sys.stdout)
PY
node="aks-nodepool1-00000000-vmss$(printf %06d $((NODES / 2)))"
echo "cluster: $NODES nodes x $PODS workload IPs ($(du -h "$dir/cluster.json" | cut -f1)), node $node, $RUNS runs"
for bin in "$@"; do
  for r in $(seq "$RUNS"); do
    /usr/bin/time -f "%e %U %S %M" -o "$dir/t.$r" "$bin" plan --cluster "$dir/cluster.json" \
      --node "$node" --format json | wc -c > "$dir/bytes"
  done
  sort -n "$dir"/t.* | awk -v bin="$bin" -v bytes="$(cat "$dir/bytes")" -v runs="$RUNS" '
    { w[NR]=$1; c[NR]=$2+$3; m[NR]=$4 }
    END { i=int((runs+1)/2); printf "%s: wall %.3f s (min %.3f, max %.3f), user+sys %.2f s, max RSS %d MB, output %.1f MB\n",
          bin, w[i], w[1], w[NR], c[i], m[i]/1024, bytes/1e6 }'
  rm -f "$dir"/t.*
done
