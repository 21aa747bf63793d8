#!/usr/bin/env bash
# Fails if the committed FlatBuffers code (proto/fbs/src/unid_generated.rs)
# is not exactly what scripts/gen-proto.sh produces from
# proto/schema/unid.fbs. Regenerates into a temporary directory; never
# touches the checkout (except installing flatc under .tools/ on first use).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
committed=$root/proto/fbs/src/unid_generated.rs
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

"$root/scripts/gen-proto.sh" "$tmp"

if ! diff -u "$committed" "$tmp/unid_generated.rs" > "$tmp/diff"; then
    head -n 60 "$tmp/diff" >&2
    echo >&2
    echo "check-generated: FAILED: proto/fbs/src/unid_generated.rs is out of date with proto/schema/unid.fbs." >&2
    echo "check-generated: run scripts/gen-proto.sh and commit the result." >&2
    exit 1
fi
echo "check-generated: OK: generated code matches proto/schema/unid.fbs"
