#!/bin/sh
# vhost-user-net: bulkhead-netd vs plain read/write on the same tap (issue 6; see bench/README.md).
#
#   bench/net.sh [vhost-net-bench options]     e.g. --rounds 5 --duration 5
#
# Builds bulkhead-netd and vhost-net-bench in release mode and runs the benchmark as root: it
# makes its own network namespace with one tap (deleted at the end), starts a fresh sandboxed
# netd (--sandbox on) for every netd run, and prints a markdown table (medians over the
# rounds). Raw numbers: target/bench/net-<unix-time>.json.
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
if [ "$(id -u)" != 0 ]; then
    echo "net.sh: needs root (ip netns, taps)" >&2
    exit 1
fi
cargo build --release --manifest-path "$root/Cargo.toml" \
    -p bulkhead-netd-proc --bin bulkhead-netd -p vhost-net-bench --bin vhost-net-bench
mkdir -p "$root/target/bench"
exec "$target/release/vhost-net-bench" --netd "$target/release/bulkhead-netd" --sandbox on \
    --out "$root/target/bench/net-$(date +%s).json" "$@"
