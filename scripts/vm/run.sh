#!/bin/bash
# Run a test binary as root inside a Debian cloud kernel (with WireGuard)
# under qemu/TCG and exit with its exit status. See README.md here.
#
# usage: scripts/vm/run.sh [OPTIONS] BINARY [ARGS...]
#   --mem MB              guest memory (default 2048, env WGMESH_VM_MEM)
#   --smp N               guest CPUs (default 2, env WGMESH_VM_SMP)
#   --timeout SECS        kill the VM after SECS (default 1200, env WGMESH_VM_TIMEOUT)
#   --env K=V             export K=V to the test (repeatable)
#   --file HOST[:GUEST]   copy a file or directory into the guest at GUEST
#                         (default: the same absolute path) (repeatable)
#   --no-module NAME      do not load kernel module NAME, nor let it autoload
#                         (repeatable; e.g. --no-module wireguard)
#   --keep-log FILE       also write the console log to FILE
#   --append STR          extra kernel command line arguments
#   --strip-debug         strip debug info from BINARY's copy (smaller image,
#                         faster boot for big test binaries; env
#                         WGMESH_VM_STRIP_DEBUG=1)
#
# BINARY is copied into the guest at its absolute host path, together with
# the shared libraries ldd reports. It runs under bash, in /tmp, with stdin
# from /dev/null, with WGMESH_IN_VM=1, the --env variables and, when set on
# the host, RUST_BACKTRACE RUST_LOG RUST_TEST_THREADS RUST_TEST_NOCAPTURE
# RUST_MIN_STACK. The console (test output) is streamed to stdout.
# Exit status: the test's; 124 if the VM timed out; 125 if the VM ended
# without reporting a status (kernel panic, crash) or twice did not start
# BINARY within WGMESH_VM_BOOT_DEADLINE seconds (120; then it boots once
# more); 2 on harness errors.
set -euo pipefail
# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
export LC_ALL=C

usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&2
    exit 2
}

mem="${WGMESH_VM_MEM:-2048}"
smp="${WGMESH_VM_SMP:-2}"
timeout_s="${WGMESH_VM_TIMEOUT:-1200}"
keep_log=""
strip_debug="${WGMESH_VM_STRIP_DEBUG:-0}"
append=""
envs=()
files=()
blocked=()
while [[ $# -gt 0 ]]; do
    case "$1" in
    --mem) mem="${2:?--mem needs a value}"; shift 2 ;;
    --mem=*) mem="${1#*=}"; shift ;;
    --smp) smp="${2:?--smp needs a value}"; shift 2 ;;
    --smp=*) smp="${1#*=}"; shift ;;
    --timeout) timeout_s="${2:?--timeout needs a value}"; shift 2 ;;
    --timeout=*) timeout_s="${1#*=}"; shift ;;
    --env) envs+=("${2:?--env needs K=V}"); shift 2 ;;
    --env=*) envs+=("${1#*=}"); shift ;;
    --file) files+=("${2:?--file needs HOST[:GUEST]}"); shift 2 ;;
    --file=*) files+=("${1#*=}"); shift ;;
    --no-module) blocked+=("${2:?--no-module needs a name}"); shift 2 ;;
    --no-module=*) blocked+=("${1#*=}"); shift ;;
    --keep-log) keep_log="${2:?--keep-log needs a file}"; shift 2 ;;
    --keep-log=*) keep_log="${1#*=}"; shift ;;
    --append) append="${2?--append needs a value}"; shift 2 ;;
    --append=*) append="${1#*=}"; shift ;;
    --strip-debug) strip_debug=1; shift ;;
    -h | --help) usage ;;
    --) shift; break ;;
    -*) vm_log "unknown option $1"; usage ;;
    *) break ;;
    esac
done
[[ $# -ge 1 ]] || usage
[[ $mem =~ ^[0-9]+$ ]] || vm_die "--mem must be a number of MB"
[[ $smp =~ ^[0-9]+$ ]] || vm_die "--smp must be a number"
[[ $timeout_s =~ ^[0-9]+$ && $timeout_s -gt 0 ]] || vm_die "--timeout must be a positive number of seconds"
for kv in "${envs[@]}"; do
    [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || vm_die "--env wants K=V, got '$kv'"
done

binary="$1"
shift
if [[ $binary != */* ]]; then
    binary=$(command -v "$binary") || vm_die "$binary: command not found"
fi
[[ -f $binary ]] || vm_die "$binary: no such file"
binary=$(realpath -s "$(dirname "$binary")")/$(basename "$binary")

vm_lock
vm_install_deps
version=$(vm_prepare_kernel)
static=$(vm_static_image "$version")
# Files already in the static image need not be added again.
VM_STAGE_SKIP="$static.files"
kroot="$VM_CACHE/kernels/$version"
mkdir -p "$VM_CACHE/tmp"
# Leftovers of runs that were killed hard.
find "$VM_CACHE/tmp" -mindepth 1 -maxdepth 1 -mmin +720 -exec rm -rf {} + 2>/dev/null || true
work=$(mktemp -d "$VM_CACHE/tmp/run.XXXXXX")
# Copy the static image while holding the lock (a concurrent rebuild may
# remove stale images).
cp "$static" "$work/initrd"
# The appended archive must start 4-byte aligned (cpio pads to 512 anyway).
size=$(stat -c %s "$work/initrd")
truncate -s $(((size + 3) / 4 * 4)) "$work/initrd"
cp "$VM_STAGE_SKIP" "$work/static.files"
VM_STAGE_SKIP="$work/static.files"
vm_unlock

qemu_pid=""
# shellcheck disable=SC2317 # invoked by the EXIT trap
cleanup() {
    if [[ -n $qemu_pid ]]; then
        kill -TERM "$qemu_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'vm_log "interrupted"; exit 130' INT
trap 'vm_log "terminated"; exit 143' TERM

# --- the per-run archive: binary, its libraries, files, argv, env ---------
st="$work/stage"
mkdir -p "$st/wgmesh-vm/run"
vm_stage_skeleton "$st"
vm_stage_elf "$st" "$binary"
chmod 0755 "$st$binary"
if [[ $strip_debug == 1 ]]; then
    if command -v objcopy >/dev/null; then
        objcopy --strip-debug "$st$binary" 2>/dev/null || vm_log "objcopy --strip-debug failed; copying as is"
    else
        vm_log "objcopy not found (binutils); not stripping"
    fi
fi
for spec in "${files[@]}"; do
    host="${spec%%:*}"
    guest="${spec#*:}"
    [[ $spec == *:* ]] || guest=""
    [[ -e $host ]] || vm_die "--file $host: no such file or directory"
    [[ -n $guest ]] || guest=$(realpath -s "$host")
    [[ $guest == /* ]] || vm_die "--file $spec: the guest path must be absolute"
    mkdir -p "$st$(dirname "$guest")"
    cp -a "$host" "$st$guest"
done
printf '%s\0' "$binary" "$@" >"$st/wgmesh-vm/run/args"
{
    for name in RUST_BACKTRACE RUST_LOG RUST_TEST_THREADS RUST_TEST_NOCAPTURE RUST_MIN_STACK; do
        if [[ -n ${!name:-} ]]; then
            printf '%s=%s\0' "$name" "${!name}"
        fi
    done
    for kv in "${envs[@]}"; do
        printf '%s\0' "$kv"
    done
} >"$st/wgmesh-vm/run/env"
if [[ ${#blocked[@]} -gt 0 ]]; then
    mkdir -p "$st/etc/modprobe.d"
    for m in "${blocked[@]}"; do
        m="${m//-/_}"
        printf '%s\n' "$m" >>"$st/wgmesh-vm/run/blocked-modules"
        printf 'install %s /bin/false\n' "$m" >>"$st/etc/modprobe.d/wgmesh-vm-blocked.conf"
    done
fi
# The skeleton's directories already exist in the static archive; only add
# what is new (directories are harmless, but keep modes of /tmp etc.).
(cd "$st" && find . -mindepth 1 ! -path ./tmp ! -path ./dev ! -path ./proc \
    ! -path ./sys ! -path ./run ! -path ./root | LC_ALL=C sort |
    cpio -o -H newc -R 0:0 --quiet) >>"$work/initrd"
rm -rf "$st"

# --- boot ------------------------------------------------------------------
cmdline="console=ttyS0 panic=-1 quiet mitigations=off tsc=reliable no_timer_check cryptomgr.notests $append"
# A guest that has not started BINARY this long after qemu did is booted once
# more: under TCG a boot very rarely stalls before init prints anything (seen
# once in CI, where the same VM then booted in 3 s).
boot_deadline="${WGMESH_VM_BOOT_DEADLINE:-120}"
attempt=1
while :; do
    log="$work/console$attempt.log"
    mkfifo "$work/console$attempt"
    # Strip the CR of the serial line discipline, stream, and keep a copy.
    sed -u 's/\r$//' <"$work/console$attempt" | tee "$log" ${keep_log:+"$keep_log"} &
    reader_pid=$!

    vm_log "booting $version (mem ${mem}M, smp $smp, timeout ${timeout_s}s): $binary $*"
    start=$EPOCHREALTIME
    # /dev/kvm may exist but hang here: always TCG. timeout(1) enforces the
    # deadline even if this script is killed.
    timeout -k 10 "$timeout_s" qemu-system-x86_64 \
        -accel tcg -cpu max -m "$mem" -smp "$smp" \
        -nodefaults -display none -monitor none -serial stdio -no-reboot \
        -kernel "$kroot/boot/vmlinuz-$version" -initrd "$work/initrd" \
        -append "$cmdline" </dev/null >"$work/console$attempt" 2>&1 &
    qemu_pid=$!
    (
        for ((i = 0; i < boot_deadline; i++)); do
            sleep 1
            grep -qa '^wgmesh-vm: running ' "$log" 2>/dev/null && exit 0
            kill -0 "$qemu_pid" 2>/dev/null || exit 0
        done
        : >"$work/stalled"
        kill -TERM "$qemu_pid" 2>/dev/null || true
    ) &
    watch_pid=$!
    set +e
    wait "$qemu_pid"
    qemu_rc=$?
    while [[ $qemu_rc -gt 128 ]] && kill -0 "$qemu_pid" 2>/dev/null; do
        wait "$qemu_pid"
        qemu_rc=$?
    done
    kill "$watch_pid" 2>/dev/null
    wait "$watch_pid" 2>/dev/null
    set -e
    qemu_pid=""
    wait "$reader_pid" || true
    elapsed=$(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
    if [[ -e $work/stalled ]]; then
        rm -f "$work/stalled"
        if [[ $attempt -lt 2 ]]; then
            vm_log "the guest had not started the program ${boot_deadline}s after boot; booting again"
            attempt=$((attempt + 1))
            continue
        fi
        vm_log "error: the guest had not started the program ${boot_deadline}s after boot, twice"
        exit 125
    fi
    break
done

marker=$(grep -a -E '^WGMESH-VM-EXIT=[0-9]+$' "$log" | tail -n 1 || true)
if [[ -n $marker ]]; then
    rc="${marker#WGMESH-VM-EXIT=}"
    vm_log "test exited with status $rc (VM ran ${elapsed}s)"
    exit "$rc"
fi
if [[ $qemu_rc == 124 || $qemu_rc == 137 ]]; then
    vm_log "error: timed out after ${timeout_s}s; qemu was killed and the test reported no status"
    exit 124
fi
if grep -qa 'Kernel panic' "$log"; then
    vm_log "error: the guest kernel panicked (see the console output above); no exit status"
else
    vm_log "error: the VM stopped without reporting an exit status (qemu exit code $qemu_rc after ${elapsed}s)"
fi
exit 125
