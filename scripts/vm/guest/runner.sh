#!/bin/bash
# Runs the test command inside the wgmesh VM (called by /init; never on the
# host). Its exit status is the test's. The per-run files come from the
# second initramfs archive that run.sh builds:
#   /wgmesh-vm/run/env   NUL-separated K=V entries to export
#   /wgmesh-vm/run/args  NUL-separated argv (argv[0] is the guest path)
set -u
run=/wgmesh-vm/run

export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root USER=root LOGNAME=root SHELL=/bin/bash TERM=dumb LANG=C.UTF-8
export TMPDIR=/tmp
export WGMESH_IN_VM=1
if [[ -f $run/env ]]; then
    while IFS= read -r -d '' kv; do
        export "${kv?}"
    done <"$run/env"
fi
export WGMESH_IN_VM=1

if [[ ! -f $run/args ]]; then
    echo "wgmesh-vm: no command to run ($run/args missing)" >&2
    exit 125
fi
mapfile -d '' argv <"$run/args"
if [[ ${#argv[@]} == 0 ]]; then
    echo "wgmesh-vm: empty command" >&2
    exit 125
fi

cd /tmp || exit 125
read -r up _ </proc/uptime
echo "wgmesh-vm: running ${argv[*]} (kernel $(uname -r), uptime ${up}s)" >&2
"${argv[@]}" </dev/null
