#!/usr/bin/env bash
# Installs the Debian packages the privileged test suites need, when they are missing.
# Usage: scripts/ensure-deps.sh [COMMAND:PACKAGE]...   (default: every tool the suites use)
set -euo pipefail

want=("$@")
if [ ${#want[@]} -eq 0 ]; then
  want=(wg:wireguard-tools wireguard-go:wireguard-go nft:nftables ip:iproute2
        qemu-system-x86_64:qemu-system-x86 busybox:busybox-static depmod:kmod cpio:cpio
        ping:iputils-ping)
fi

missing=()
for pair in "${want[@]}"; do
  cmd=${pair%%:*}
  pkg=${pair#*:}
  if ! command -v "$cmd" >/dev/null 2>&1 && ! [ -x "/usr/sbin/$cmd" ] && ! [ -x "/sbin/$cmd" ]; then
    missing+=("$pkg")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "ensure-deps: missing packages (${missing[*]}) and not root: cannot install them" >&2
  exit 1
fi
echo "ensure-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
