#!/bin/sh
# QMP latency and throughput: Bulkhead vs QEMU, both -M none (see bench/README.md).
exec cargo run --release -p bulkhead-tests --bin bench_qmp -- "$@"
