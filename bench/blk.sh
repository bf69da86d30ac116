#!/bin/sh
# vhost-user-blk: bulkhead-blockd vs qemu-storage-daemon on one image (see bench/README.md).
#
#   bench/blk.sh [vhost-blk-bench options]     e.g. --cache none,writeback --runs 5
#
# Builds bulkhead-blockd and vhost-blk-bench in release mode, writes a raw image of
# BLK_IMAGE_MIB MiB (default 1024) of random data into a fresh directory under BLK_DIR
# (default /var/tmp, on the host's disk; BLK_DIR=/dev/shm puts the image in memory, which takes
# the disk's own variation out and leaves the back ends' cost: tmpfs does O_DIRECT since Linux
# 6.6; the file system must take O_DIRECT for cache=none), runs the benchmark
# (which starts a fresh back end for every run), prints the tables, and removes the directory.
# Raw numbers: target/bench/blk-<unix-time>.json.
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
qsd=$(command -v qemu-storage-daemon || true)
if [ -z "$qsd" ]; then
    echo "blk.sh: qemu-storage-daemon not found (Debian: apt-get install qemu-system-common)" >&2
    exit 1
fi
cargo build --release --manifest-path "$root/Cargo.toml" \
    -p bulkhead-blockd-proc --bin bulkhead-blockd -p vhost-blk-bench --bin vhost-blk-bench
dir=$(mktemp -d "${BLK_DIR:-/var/tmp}/blkbench.XXXXXX")
trap 'rm -rf "$dir"' EXIT INT TERM
if ! dd if=/dev/zero of="$dir/probe" bs=4096 count=1 oflag=direct status=none 2>/dev/null; then
    echo "blk.sh: $dir ($(stat -f -c %T "$dir")) does not take O_DIRECT (cache=none); set BLK_DIR" >&2
    exit 1
fi
rm -f "$dir/probe"
echo "blk.sh: image directory $dir on $(stat -f -c %T "$dir")" >&2
mib=${BLK_IMAGE_MIB:-1024}
echo "blk.sh: writing a $mib MiB image of random data to $dir/disk.raw" >&2
dd if=/dev/urandom of="$dir/disk.raw" bs=1M count="$mib" conv=fsync status=none
mkdir -p "$root/target/bench"
"$target/release/vhost-blk-bench" \
    --blockd "$target/release/bulkhead-blockd" --qsd "$qsd" \
    --image "$dir/disk.raw" --dir "$dir" \
    --out "$root/target/bench/blk-$(date +%s).json" "$@"
