#!/usr/bin/env bash
# The crates embed: two applications outside the workspace (tests/embed/*, each its own
# workspace with its own committed Cargo.lock, path dependencies on this repository's crates)
# build with `cargo build --locked` and run.
#   tests/embed/kube-app        a kube-rs application that picks Kubernetes 1.35 (the
#                               workspace picks 1.33) and embeds wgmesh-k8s: adapter, agent
#                               state machine, daemon::run_agent;
#   tests/embed/netlink-agent   an agent on wgmesh-netlink alone; `cargo tree -e normal` must
#                               show no YAML, no JSON and no async runtime crate.
# Needs no root; as root it also runs the netlink agent's dry run in a throwaway network
# namespace. Both share one target directory (target/embed). Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
export LC_ALL=C
export CARGO_TARGET_DIR="$PWD/target/embed"

start=$(date +%s)
step() { printf '\n==> test-embed: %s (%ss)\n' "$*" "$(($(date +%s) - start))"; }
die() { echo "test-embed: FAILED: $*" >&2; exit 1; }

kube_app=tests/embed/kube-app/Cargo.toml
netlink_agent=tests/embed/netlink-agent/Cargo.toml
forbidden='^(serde_yaml.*|serde_json|tokio.*|futures.*|async-.*|mio|smol|async_std)$'

# The crates (names only) a manifest pulls into its normal build.
normal_crates() {
    cargo tree --locked --manifest-path "$1" -e normal --prefix none --format '{p}' |
        awk '{print $1}' | sort -u
}

step "lockfiles"
# The committed lockfiles must still fit the repository's crates (a dependency added to
# wgmesh-k8s or wgmesh-netlink needs them refreshed: `cargo update --workspace` changes no
# other version).
for m in "$kube_app" "$netlink_agent"; do
    cargo metadata --locked --format-version 1 --manifest-path "$m" >/dev/null ||
        die "$(dirname "$m")/Cargo.lock is stale: run \`cargo update --workspace --manifest-path $m\` and commit it"
done

step "formatting"
for m in "$kube_app" "$netlink_agent"; do
    cargo fmt --manifest-path "$m" --check || die "$m is not formatted (cargo fmt --manifest-path $m)"
done

step "netlink-agent: dependencies"
mkdir -p "$CARGO_TARGET_DIR"
normal_crates "$netlink_agent" >"$CARGO_TARGET_DIR/netlink-agent.crates"
echo "$(wc -l <"$CARGO_TARGET_DIR/netlink-agent.crates") crates: $(tr '\n' ' ' <"$CARGO_TARGET_DIR/netlink-agent.crates")"
if bad=$(grep -E "$forbidden" "$CARGO_TARGET_DIR/netlink-agent.crates"); then
    die "wgmesh-netlink pulls $(echo "$bad" | tr '\n' ' ')into an embedder's build"
fi
# The same filter finds them where they are (so it is not blind): the kube-rs application.
normal_crates "$kube_app" >"$CARGO_TARGET_DIR/kube-app.crates"
for want in tokio serde_json serde_yaml_ng futures; do
    grep -qx "$want" "$CARGO_TARGET_DIR/kube-app.crates" || die "the check is blind: kube-app shows no $want"
done

step "netlink-agent: cargo build --locked"
cargo build --locked --manifest-path "$netlink_agent"
agent="$CARGO_TARGET_DIR/debug/wgmesh-embed-netlink-agent"

step "netlink-agent: run"
set +e
"$agent" >/dev/null 2>&1
code=$?
set -e
[ "$code" -eq 2 ] || die "netlink-agent without a mode exited $code, expected 2"
out=$("$agent" plan) || die "netlink-agent plan failed"
echo "$out"
grep -q '^plan: interface wireguard.cali mtu [0-9]* port 51820 peers 2$' <<<"$out" || die "the plan has not 2 peers"
grep -q '^plan: peer b 10.0.0.2:51820 allowed ips 10.65.0.64/26$' <<<"$out" || die "peer b is wrong"
grep -q '^plan: peer c 10.0.0.3:51820 allowed ips 10.65.0.128/26$' <<<"$out" || die "peer c is wrong"
if [ "$(id -u)" -eq 0 ]; then
    # The real host's dataplane, read in an empty network namespace: a dry run changes nothing.
    out=$(unshare --net "$agent" dry-run) || die "netlink-agent dry-run failed"
    grep -E '^(dataplane|would|dry run)' <<<"$out" | head -n 8
    n=$(sed -n 's/^dry run: \([0-9]*\) operations$/\1/p' <<<"$out")
    [ -n "$n" ] && [ "$n" -gt 0 ] || die "the dry run reported no operations on an empty host"
else
    echo "not root: the dry run over the real dataplane (needs CAP_NET_ADMIN) is not run"
fi

step "kube-app: its own Kubernetes version (1.35) with wgmesh-k8s in the graph"
features=$(cargo tree --locked --manifest-path "$kube_app" -e features -i k8s-openapi)
versions=$(grep -o 'k8s-openapi feature "v1_[0-9]*"' <<<"$features" | sort -u)
echo "$versions"
[ "$versions" = 'k8s-openapi feature "v1_35"' ] || die "k8s-openapi version features: $versions"

step "kube-app: cargo build --locked"
cargo build --locked --manifest-path "$kube_app"
app="$CARGO_TARGET_DIR/debug/wgmesh-embed-kube-app"

step "kube-app: run"
out=$("$app" demo) || die "kube-app demo failed"
echo "$out"
grep -qx 'kubernetes api: 1.35' <<<"$out" || die "the application's Kubernetes version is not 1.35"
grep -q '^adapter: node b addresses \[10.0.0.2\] pod cidrs \[10.65.0.64/26\] warnings 0$' <<<"$out" ||
    die "the adapter did not convert node b"
grep -q '^agent: interface wireguard.cali peer b key .* allowed ips 10.65.0.64/26$' <<<"$out" ||
    die "the agent did not program peer b"
# The whole reference agent on the application's runtime: without a cluster (no kubeconfig,
# not in a pod) it must stop at the client, with an error, not hang or panic.
set +e
out=$(cd / && env -i PATH=/usr/bin:/bin HOME=/nonexistent timeout 60 "$app" run 2>&1)
code=$?
set -e
echo "$out" | tail -n 3
[ "$code" -eq 1 ] || die "kube-app run exited $code, expected 1"
grep -q '^error: run_agent: .*\(kubeconfig\|in-cluster\|incluster\)' <<<"$out" ||
    die "kube-app run did not fail at the Kubernetes client"

step "embedding tests passed"
