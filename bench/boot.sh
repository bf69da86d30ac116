#!/bin/sh
# Boot time and memory: Bulkhead vs QEMU/KVM inside one nested L1 VM (see bench/README.md).
exec cargo run --release -p bulkhead-tests --bin bench_boot -- "$@"
