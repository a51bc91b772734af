#!/bin/bash
# Idempotent setup of the wgmesh test VM: installs missing host packages,
# downloads and unpacks the Debian cloud kernel into the cache, decompresses
# and depmods its modules, and builds the static part of the initramfs.
# Prints the kernel version (uname -r of the guest) on stdout.
# See README.md in this directory.
set -euo pipefail
# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if [[ $# -gt 0 ]]; then
    case "$1" in
    -h | --help)
        sed -n '2,6s/^# \{0,1\}//p' "$0"
        exit 0
        ;;
    *) vm_die "prepare.sh takes no arguments" ;;
    esac
fi

vm_lock
vm_install_deps
version=$(vm_prepare_kernel)
vm_static_image "$version" >/dev/null
vm_unlock
printf '%s\n' "$version"
