#!/usr/bin/env bash
# Creates (or checks) the Python virtual environment the client tests use:
# target/pyenv with qemu.qmp pinned by tests/python/requirements.txt.
#
#   tests/python/setup.sh            # idempotent: does nothing when the venv is up to date
#
# Environment:
#   BULKHEAD_PYTHON  interpreter to build the venv from (default: python3 on PATH, which may be
#                    Debian's /usr/bin/python3 (needs the python3-venv package) or a pyenv one)
#   BULKHEAD_PYENV   where the venv lives (default: target/pyenv in the repository); the tests
#                    (monitor-proc/tests/python_clients.rs) read the same variable
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
req="$root/tests/python/requirements.txt"
venv="${BULKHEAD_PYENV:-$root/target/pyenv}"
python="${BULKHEAD_PYTHON:-python3}"
stamp="$venv/.bulkhead-requirements"

# Up to date: same requirements installed, and the venv's interpreter still runs (a pyenv
# version or a Debian python upgrade can pull it from under the venv).
if [ -f "$stamp" ] && cmp -s "$req" "$stamp" &&
    "$venv/bin/python" -c 'import qemu.qmp' >/dev/null 2>&1 &&
    [ -x "$venv/bin/qmp-shell" ]; then
    exit 0
fi

if ! command -v "$python" >/dev/null 2>&1; then
    echo "error: $python not found; install Python 3 (Debian: apt-get install python3 python3-venv)" >&2
    exit 1
fi
echo "tests/python/setup.sh: creating $venv with $("$python" --version 2>&1) ($(command -v "$python"))" >&2
rm -rf "$venv"
mkdir -p "$(dirname "$venv")"
if ! "$python" -m venv "$venv"; then
    echo "error: '$python -m venv' failed; on Debian install python3-venv" >&2
    rm -rf "$venv"
    exit 1
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
    --require-hashes -r "$req"
"$venv/bin/python" -c 'import qemu.qmp'
cp "$req" "$stamp"
echo "tests/python/setup.sh: $venv ready ($("$venv/bin/python" -m pip list --disable-pip-version-check 2>/dev/null | grep -i '^qemu.qmp'))" >&2
