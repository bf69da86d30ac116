#!/usr/bin/env bash
# Boots the default guest through Bulkhead with a QMP socket and shows its console.
#
#   scripts/run-guest.sh [idle|poweroff|reboot]
#
# Installs what it needs on Debian 12 (as root), builds Bulkhead, builds the guest kit from
# Debian packages (cached in target/guest-kit/) and runs it; see README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=0
for tool in qemu-system-x86_64 lz4 xz zstd depmod; do
    command -v "$tool" >/dev/null 2>&1 || missing=1
done
if [ "$missing" = 1 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends qemu-system-x86 xz-utils zstd lz4 kmod cpio
fi
cargo build --release --workspace --bins
exec target/release/run_guest "$@"
