#!/bin/sh
# Start-up time each sandbox adds, per role, on this host (see bench/README.md).
exec cargo run --release -p bulkhead-tests --bin bench_sandbox -- "$@"
