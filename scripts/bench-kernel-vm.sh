#!/bin/bash
# Kernel WireGuard under the agent at scale (issue 15): the `agent_scale` bench with
# `--dataplane kernel`, run as root in the VM of scripts/vm (Debian's cloud kernel, whose
# wireguard module the host lacks). The VM is TCG-emulated: its CPU is many times slower
# than the host's, so the default scale is far below 5,000 nodes x 110 pods.
#
#   scripts/bench-kernel-vm.sh                 # 500 nodes x 20 pods, short phases
#   scripts/bench-kernel-vm.sh --nodes 200 …   # the bench's own options instead
set -euo pipefail
cd "$(dirname "$0")/.."

args=("$@")
if [ ${#args[@]} -eq 0 ]; then
    args=(--nodes 500 --pods 20 --rates 100 --churn-secs 20 --burst 20
          --outage-secs 5 --outage-rate 20 --steady-secs 5 --resync-secs 10)
fi
bin=$(cargo bench -p wgmesh-k8s --bench agent_scale --no-run 2>&1 |
    sed -n 's/.*Executable .*(\(.*\))$/\1/p' | tail -1)
if [ -z "$bin" ] || [ ! -x "$bin" ]; then
    echo "bench-kernel-vm: could not build the agent_scale bench" >&2
    exit 2
fi
echo "bench-kernel-vm: $bin --bench --dataplane kernel ${args[*]}" >&2
exec scripts/vm/run.sh --mem "${WGMESH_VM_MEM:-4096}" --timeout "${WGMESH_VM_TIMEOUT:-2400}" \
    --strip-debug "$bin" --bench --dataplane kernel "${args[@]}"
