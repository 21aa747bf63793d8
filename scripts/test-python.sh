#!/usr/bin/env bash
# The Python package (python/): builds the abi3 wheel with maturin (from a build venv in
# .tools/py), pip-installs it into a fresh venv, and runs the pytest suite there against a
# real `unid server` and agents on 127.0.0.1 (ports 18500-18649; see python/tests/conftest.py).
#
#   scripts/test-python.sh [pytest args]   # UNID_BIN: the unid binary (default target/debug/unid)
# Env: PYTHON (python3), UNID_BIN.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
export UNID_BIN=${UNID_BIN:-$ROOT/target/debug/unid}
[ -x "$UNID_BIN" ] || { echo "no unid binary at $UNID_BIN (cargo build -p unid-cli)"; exit 1; }
BUILD=$ROOT/.tools/py
if [ ! -x "$BUILD/bin/maturin" ] || [ ! -x "$BUILD/bin/pytest" ]; then
  "$PYTHON" -m venv "$BUILD"
  "$BUILD/bin/pip" install -q "maturin>=1.5,<2" "pytest>=7"
fi
WORK=$(mktemp -d /tmp/unid-python.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

echo "--- python: wheel (maturin build --release)"
(cd python && "$BUILD/bin/maturin" build --release -q -i "$BUILD/bin/python" -o "$WORK/wheels")
ls "$WORK"/wheels
echo "--- python: a fresh venv with the wheel"
"$PYTHON" -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q "$WORK"/wheels/unid-*.whl "pytest>=7"
(cd "$WORK" && "$WORK/venv/bin/python" -c 'import unid, sys; print("unid from", unid.__file__); assert "site-packages" in unid.__file__')
echo "--- python: pytest"
cd python/tests
"$WORK/venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
