#!/usr/bin/env bash
# The image, proven without a container runtime (none runs on the machines this is tested on):
#   1. scripts/build-image builds target/image/wgmesh-agent-VERSION.oci.tar;
#   2. scripts/oci-unpack.py applies its layers (index.json -> manifest -> blobs, digests
#      checked, whiteouts honoured) into a directory; the config is checked: entry point,
#      PATH, labels;
#   3. the image's own programs run from that directory with chroot, with the image's
#      environment only: `wgmesh-agent --version` (the version and commit),
#      `wgmesh plan --cluster -` on the sample cluster, `wireguard-go --version` (its loader
#      and libc are right);
#   4. `wgmesh apply --backend userspace` in the image, in a throwaway network namespace,
#      starts the image's wireguard-go from PATH and programs the mesh; a second run finds
#      nothing to do;
#   5. the agent runs as PID 1 of its own PID namespace, in-cluster: a mock API server on
#      HTTPS (its own CA, given only as the service account's ca.crt; the image has no system
#      CA roots) receives its authenticated requests; SIGTERM stops it with status 0;
#   6. sizes: the archive (compressed) and the layers (uncompressed); the archive must stay
#      under 25 MB (25,000,000 bytes).
# Needs root (buildah, chroot, namespaces). Exits non-zero when any check fails.
#
#   scripts/test-image.sh              # build, then test
#   scripts/test-image.sh --no-build   # test the archive the last build wrote
set -euo pipefail
cd "$(dirname "$0")/.."
export LC_ALL=C

start=$(date +%s)
step() { printf '\n==> test-image: %s (%ss)\n' "$*" "$(($(date +%s) - start))"; }
die() { echo "test-image: FAILED: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "needs root (buildah, chroot, namespaces)"
export PATH="$PATH:/usr/sbin:/sbin"
max_archive=25000000
cluster=examples/clusters/aks-azure-cni.json
node=aks-nodepool1-19852467-vmss000000

build=1
case "${1:-}" in
"") ;;
--no-build) build=0 ;;
*) die "usage: scripts/test-image.sh [--no-build]" ;;
esac

build_seconds=
if [ "$build" -eq 1 ]; then
    step "build the image"
    t=$(date +%s)
    bash scripts/build-image
    build_seconds=$(($(date +%s) - t))
fi
for dep in openssl:openssl ip:iproute2 unshare:util-linux; do
    if ! command -v "${dep%%:*}" >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${dep#*:}" >/dev/null
    fi
done

version=$(cargo metadata --no-deps --format-version 1 --locked |
    python3 -c 'import json,sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"] == "wgmesh"))')
archive="target/image/wgmesh-agent-$version.oci.tar"
[ -f "$archive" ] || die "build-image wrote no $archive"

step "unpack the layers"
work="$PWD/target/image/test"
root="$work/rootfs"
mkdir -p "$work"
python3 scripts/oci-unpack.py --self-test || die "the unpacker fails its own test"
python3 scripts/oci-unpack.py "$archive" "$root" "$work/report.json" || die "cannot unpack $archive"
# Every fact the checks need from the config, as shell words.
eval "$(python3 - "$work/report.json" <<'EOF'
import json, shlex, sys
r = json.load(open(sys.argv[1]))
c = r["config"]
cfg = c.get("config", {})
labels = cfg.get("Labels") or {}
env = cfg.get("Env") or []
def out(k, v): print(f"{k}={shlex.quote(str(v))}")
out("cfg_entrypoint", json.dumps(cfg.get("Entrypoint")))
out("cfg_cmd", json.dumps(cfg.get("Cmd")))
out("cfg_os", c.get("os")); out("cfg_arch", c.get("architecture"))
out("cfg_user", cfg.get("User", ""))
print("cfg_env=(" + " ".join(shlex.quote(e) for e in env) + ")")
out("cfg_path", next((e[5:] for e in env if e.startswith("PATH=")), ""))
for k in ("version", "revision", "source", "licenses", "created"):
    out("label_" + k, labels.get("org.opencontainers.image." + k, ""))
out("ref", ",".join(x or "" for x in r["ref"]))
out("archive_bytes", r["archive_bytes"])
out("layers", len(r["layers"]))
out("compressed", sum(l["compressed"] for l in r["layers"]))
out("uncompressed", sum(l["uncompressed"] for l in r["layers"]))
EOF
)"

step "config"
echo "entrypoint $cfg_entrypoint, cmd $cfg_cmd, $cfg_os/$cfg_arch, user '${cfg_user}'"
echo "env: ${cfg_env[*]}"
echo "labels: version=$label_version revision=$label_revision source=$label_source licenses=$label_licenses created=$label_created"
echo "archive reference: $ref"
[ "$cfg_entrypoint" = '["/usr/local/bin/wgmesh-agent"]' ] || die "entry point is $cfg_entrypoint"
[ "$cfg_os/$cfg_arch" = linux/amd64 ] || die "platform is $cfg_os/$cfg_arch"
[ "$label_version" = "$version" ] || die "version label '$label_version', package version $version"
[ -n "$label_source" ] && [ -n "$label_licenses" ] && [ -n "$label_created" ] || die "a label is missing"
[ "$ref" = "wgmesh-agent:$version" ] || die "archive reference is '$ref'"
if [ -z "${WGMESH_COMMIT:-}" ] && git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    head=$(git rev-parse HEAD)
    [ "$label_revision" = "$head" ] || [ "$label_revision" = "$head-dirty" ] ||
        die "revision label '$label_revision', HEAD is $head"
fi
case ":$cfg_path:" in *:/usr/bin:*) ;; *) die "PATH '$cfg_path' misses /usr/bin (wireguard-go)" ;; esac
# What --version must print: the commit build-image gave the binaries (WGMESH_COMMIT as
# given, else the label's commit shortened to 12 digits, "-dirty" kept), or none.
if [ -n "${WGMESH_COMMIT:-}" ]; then
    commit=" (commit $WGMESH_COMMIT)"
elif [ "$label_revision" = unknown ]; then
    commit=
else
    commit=" (commit ${label_revision:0:12}${label_revision#"${label_revision%-dirty}"})"
fi

step "what is inside"
(cd "$root" && find . -mindepth 1 | sort | while read -r p; do
    if [ -L "$p" ]; then printf '  %-52s -> %s\n' "${p#.}" "$(readlink "$p")"
    elif [ -f "$p" ]; then printf '  %-52s %10s bytes  %s\n' "${p#.}" "$(stat -c %s "$p")" "$(stat -c %A "$p")"
    else printf '  %-52s %10s        %s\n' "${p#.}/" "" "$(stat -c %A "$p")"
    fi
done)
[ "$(stat -c %a "$root/tmp")" = 1777 ] || die "/tmp is not mode 1777"
[ -d "$root/var/run/wireguard" ] || die "no /var/run/wireguard"
! [ -e "$root/etc/ssl" ] || die "the image has system CA roots (the agent must not need them)"

# Runs a program of the image from its root with the image's environment only.
chroot_bin=$(command -v chroot)
unshare_bin=$(command -v unshare)
in_image() { env -i "${cfg_env[@]}" "$chroot_bin" "$root" "$@"; }

step "the entry point: --version"
got=$(in_image /usr/local/bin/wgmesh-agent --version) || die "wgmesh-agent --version failed"
echo "$got"
[ "$got" = "wgmesh-agent $version$commit" ] ||
    die "wgmesh-agent --version printed '$got', expected 'wgmesh-agent $version$commit'"
got=$(in_image wgmesh --version) || die "wgmesh --version failed (is PATH right?)"
echo "$got"
[ "$got" = "wgmesh $version$commit" ] || die "wgmesh --version printed '$got'"

step "wgmesh plan --cluster - (the sample cluster on stdin)"
in_image wgmesh plan --cluster - --node "$node" --format json <"$cluster" >"$work/plan.json" ||
    die "wgmesh plan failed"
python3 - "$work/plan.json" "$cluster" "$node" <<'EOF' || die "the plan is wrong"
import json, sys
plan = json.load(open(sys.argv[1]))
cluster = json.load(open(sys.argv[2]))
me = sys.argv[3]
others = [n for n in cluster["nodes"] if n["name"] != me]
peers = plan["interfaces"][0]["peers"]
assert plan["node"] == me, plan["node"]
assert sorted(p["public_key"] for p in peers) == sorted(n["wireguard"]["public_key"] for n in others), peers
for n in others:
    p = next(p for p in peers if p["public_key"] == n["wireguard"]["public_key"])
    want = {a + "/32" for a in n["addresses"] + n["workload_ips"]}
    assert want <= set(p["allowed_ips"]), (n["name"], p["allowed_ips"])
print(f"plan of {me}: {len(peers)} peers, {sum(len(p['allowed_ips']) for p in peers)} allowed IPs, "
      f"{len(plan['routes'])} routes, {len(plan['rules'])} rules")
EOF
in_image wgmesh plan --cluster - <"$cluster" | head -n 12

step "wireguard-go --version (its loader and libc)"
got=$(in_image wireguard-go --version) || die "wireguard-go does not run in the image"
echo "$got"
grep -q '^wireguard-go v' <<<"$got" || die "wireguard-go --version printed '$got'"

step "userspace fallback: wgmesh apply --backend userspace starts the image's wireguard-go"
# A private PID, mount and network namespace: /proc and /dev (for /dev/net/tun) are mounted
# into the root only there, and whatever wireguard-go daemons start end with the namespace.
mkdir -p "$root/proc" "$root/dev" "$root/run-test"
cp "$cluster" "$root/run-test/cluster.json"
envs=$(printf '%q ' "${cfg_env[@]}")
unshare --pid --fork --mount --net bash -euo pipefail -c "
    ip link set lo up
    mount -t proc proc '$root/proc'
    mount --rbind /dev '$root/dev'
    apply() { env -i $envs '$chroot_bin' '$root' wgmesh apply --cluster /run-test/cluster.json --node '$node' \
        --private-key /var/lib/wgmesh/private-key --backend userspace --format json; }
    apply >'$work/apply1.json'
    apply >'$work/apply2.json'
    ls '$root/var/run/wireguard' >'$work/sockets.txt'
    ip -d link show >'$work/links.txt'
" || die "wgmesh apply in the image failed"
python3 - "$work/apply1.json" "$work/apply2.json" <<'EOF' || die "apply did not converge"
import json, sys
first, second = (json.load(open(p)) for p in sys.argv[1:3])
print(f"first apply: {first['operations']} operations; second: {second['operations']}")
assert first["operations"] > 0 and second["operations"] == 0
EOF
echo "sockets: $(tr '\n' ' ' <"$work/sockets.txt")"
grep -q '\.sock$' "$work/sockets.txt" || die "wireguard-go made no socket in /var/run/wireguard"
grep -q 'tun' "$work/links.txt" || die "no TUN device (wireguard-go) was made"
[ "$(stat -c %a "$root/var/lib/wgmesh/private-key")" = 600 ] || die "the key file is not mode 0600"
rm -rf "$root/run-test" "$root/var/lib/wgmesh/private-key"
rm -f "$root"/var/run/wireguard/*

step "the agent as PID 1, in-cluster, against a mock API server on HTTPS"
pki="$work/pki"
rm -rf "$pki" && mkdir -p "$pki"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=test-ca \
    -keyout "$pki/ca.key" -out "$pki/ca.crt" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=kube-apiserver \
    -keyout "$pki/server.key" -out "$pki/server.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >"$pki/ext"
openssl x509 -req -in "$pki/server.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
    -days 2 -extfile "$pki/ext" -out "$pki/server.crt" 2>/dev/null
sa="$root/var/run/secrets/kubernetes.io/serviceaccount"
mkdir -p "$sa"
cp "$pki/ca.crt" "$sa/ca.crt"
token="wgmesh-test-token-$$"
printf '%s' "$token" >"$sa/token"
printf 'wgmesh-system' >"$sa/namespace"
cat >"$work/apiserver.py" <<'EOF'
import http.server, json, ssl, sys, time
log = open(sys.argv[1], "a", buffering=1)
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def reply(self, obj):
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def handle_one(self):
        log.write(f"{self.command} {self.path} auth={self.headers.get('Authorization', '')}\n")
        if "watch=true" in self.path or "watch=1" in self.path:
            time.sleep(1)
            return self.reply({"type": "BOOKMARK", "object": {"kind": "Node", "apiVersion": "v1",
                                                              "metadata": {"resourceVersion": "1"}}})
        kind = "PodList" if "/pods" in self.path else "NodeList"
        if self.command == "GET" and self.path.split("?")[0] in ("/api/v1/nodes", "/api/v1/pods"):
            return self.reply({"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": []})
        n = int(self.headers.get("Content-Length") or 0)
        if n:
            self.rfile.read(n)
        return self.reply({"kind": "Node", "apiVersion": "v1", "metadata": {"name": "node-a", "resourceVersion": "2"}})
    do_GET = do_PATCH = do_POST = do_PUT = handle_one
    def log_message(self, *a):
        pass
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[2], sys.argv[3])
class S(http.server.ThreadingHTTPServer):
    def get_request(self):
        conn, addr = self.socket.accept()
        try:
            return ctx.wrap_socket(conn, server_side=True), addr
        except OSError as e:  # the handshake failed: say why (the client's alert)
            log.write(f"tls-error {e}\n")
            conn.close()
            raise
srv = S(("127.0.0.1", 6443), H)
print("listening", file=log)
srv.serve_forever()
EOF
# One in-cluster run in a private network namespace: the mock API server on 127.0.0.1:6443,
# the agent (its health endpoint on 127.0.0.1:9469) as PID 1 of a nested PID namespace, with
# the service account files in $sa. Waits up to $2 tenths of a second for an authenticated
# request, then SIGTERM. Writes $work/$1.log (the agent's), $work/$1.api (the server's),
# $work/$1.status ("requests=0|1 healthz=CODE pid_in_namespace=N exit=CODE").
in_cluster() {
    local name=$1 tenths=$2
    : >"$work/$name.api"
    rm -f "$work/$name.log" "$work/$name.status"
    unshare --net --fork bash -euo pipefail -c "
        ip link set lo up
        python3 '$work/apiserver.py' '$work/$name.api' '$pki/server.crt' '$pki/server.key' &
        server=\$!
        for _ in \$(seq 50); do grep -q listening '$work/$name.api' && break; sleep 0.1; done
        env -i $envs KUBERNETES_SERVICE_HOST=127.0.0.1 KUBERNETES_SERVICE_PORT=6443 NODE_NAME=node-a \
            WGMESH_LOG_FORMAT=json '$unshare_bin' --pid --fork '$chroot_bin' '$root' \
            /usr/local/bin/wgmesh-agent --dry-run >'$work/$name.log' 2>&1 &
        launcher=\$!
        ok=0
        for _ in \$(seq $tenths); do
            if grep -q 'GET /api/v1/nodes.* auth=Bearer $token' '$work/$name.api'; then ok=1; break; fi
            sleep 0.1
        done
        health=\$(python3 -c 'import urllib.request; print(urllib.request.urlopen(\"http://127.0.0.1:9469/healthz\", timeout=5).status)' 2>&1 | tail -n 1 | tr ' ' _ || true)
        agent=\$(cat /proc/\$launcher/task/\$launcher/children 2>/dev/null | awk '{print \$1}')
        nspid=\$(awk '/^NSpid:/ {print \$NF}' /proc/\$agent/status 2>/dev/null || true)
        [ -n \"\$agent\" ] && kill -TERM \"\$agent\"
        for _ in \$(seq 100); do kill -0 \$launcher 2>/dev/null || break; sleep 0.1; done
        if kill -0 \$launcher 2>/dev/null; then
            kill -KILL \$launcher; wait \$launcher || true; code=timeout
        elif wait \$launcher; then code=0; else code=\$?; fi
        kill \$server; wait \$server 2>/dev/null || true
        echo \"requests=\$ok healthz=\$health pid_in_namespace=\$nspid exit=\$code\" >'$work/$name.status'
    " || die "the in-cluster run '$name' could not be set up"
    echo "agent log ($name, first lines):"
    head -n 8 "$work/$name.log" | cut -c1-220 | sed 's/^/  /'
    echo "API server saw:"
    sort "$work/$name.api" | uniq -c | sort -rn | head -n 6 | sed "s/$token/<token>/; s/^/  /"
    echo "$name: $(cat "$work/$name.status")"
    grep -q ' pid_in_namespace=1 ' "$work/$name.status" || die "$name: the agent was not PID 1 of its namespace"
    grep -q ' exit=0$' "$work/$name.status" || die "$name: the agent (PID 1) did not stop with status 0 on SIGTERM"
    grep -q ' healthz=200 ' "$work/$name.status" || die "$name: the health endpoint did not answer 200"
}
in_cluster in-cluster 300
grep -q '^requests=1 ' "$work/in-cluster.status" ||
    die "no authenticated request reached the mock API server over TLS (see $work/in-cluster.log)"

step "the same with a CA that did not sign the API server's certificate: no request may pass"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=other-ca \
    -keyout "$pki/other.key" -out "$sa/ca.crt" 2>/dev/null
in_cluster wrong-ca 30
grep -q '^requests=0 ' "$work/wrong-ca.status" || die "the agent trusted a server its CA did not sign"
# The client, not the network, refused: its TLS alert reached the server.
grep -q '^tls-error .*\(UNKNOWN_CA\|BAD_CERTIFICATE\)' "$work/wrong-ca.api" ||
    die "the handshake did not fail on the certificate (see $work/wrong-ca.api)"
rm -rf "$root/var/run/secrets"

step "sizes"
awk -v a="$archive_bytes" -v n="$layers" -v c="$compressed" -v u="$uncompressed" 'BEGIN {
    printf "archive (compressed): %d bytes (%.1f MB)\nlayers: %d, %d bytes compressed, %d bytes uncompressed (%.1f MB)\n",
        a, a / 1e6, n, c, u, u / 1e6 }'
[ -z "$build_seconds" ] || echo "build-image took $build_seconds s"
[ "$archive_bytes" -lt "$max_archive" ] || die "the archive has $archive_bytes bytes, over the $max_archive floor"

step "image tests passed"
