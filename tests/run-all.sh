#!/usr/bin/env bash
# Builds Bulkhead and runs the whole test suite: exactly what CI (.ci/run) does.
#
#   tests/run-all.sh                 # everything
#   tests/run-all.sh -E 'test(smp2)' # extra arguments go to `cargo nextest run`
#
# The end-to-end tests (tests/tests/*.rs) boot an L1 VM under QEMU/TCG in which Bulkhead runs
# a real Linux guest; they need qemu-system-x86_64 and apt-get access to the Debian archive
# (see .ci/run for the packages) and find the Bulkhead binaries in target/release (or
# $BULKHEAD_BIN_DIR). Logs of each VM run are kept in target/nested-runs/. The QMP client
# tests (monitor-proc/tests/python_clients.rs) need target/pyenv, which tests/python/setup.sh
# creates (python3 with venv support and access to PyPI, once).
set -euo pipefail
cd "$(dirname "$0")/.."

tests/python/setup.sh

cargo build --release --workspace --bins
cargo nextest run --workspace --release --no-fail-fast "$@"

# Proof by attack (docs/SECURITY.md): needs the test-only feature attack-hook, so it is built in
# a target directory of its own and can never replace the release binaries in target/release.
# The blockd and netd tests run the real standalone workers (netd opens a tap: root, as CI is).
# Each test checks its own columns of the tables; blessing (BULKHEAD_BLESS_SECURITY_MD) is for a
# single test at a time, never here.
CARGO_TARGET_DIR=target/attack-hook cargo nextest run -p bulkhead-sandbox -p bulkhead-vcpu-proc \
  -p bulkhead-blockd-proc -p bulkhead-netd-proc \
  --features bulkhead-sandbox/attack-hook,bulkhead-vcpu-proc/attack-hook \
  --features bulkhead-blockd-proc/attack-hook,bulkhead-netd-proc/attack-hook --no-fail-fast \
  -E 'binary(attacks)'
