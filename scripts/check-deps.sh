#!/usr/bin/env bash
# Fails if unid-proto, unid-core or unid-machine depends (normal or build dependencies,
# directly or not) on glommio, openraft, tokio or libc: those crates stay
# free of runtimes, consensus and the C library (see DEVELOPERS.md).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
forbidden='^(glommio|openraft|tokio|libc)$'
status=0
for pkg in unid-proto unid-core unid-machine; do
    if ! tree=$(cargo tree -p "$pkg" -e normal,build --prefix none --format '{p}' 2>&1); then
        echo "check-deps: cargo tree -p $pkg failed:" >&2
        echo "$tree" >&2
        status=1
        continue
    fi
    found=$(echo "$tree" | awk '{print $1}' | grep -E "$forbidden" | sort -u || true)
    if [[ -n $found ]]; then
        echo "check-deps: FAILED: $pkg depends on forbidden crate(s):" >&2
        for name in $found; do
            echo "  $name, via:" >&2
            cargo tree -p "$pkg" -e normal,build -i "$name" 2>&1 | sed 's/^/    /' >&2 || true
        done
        status=1
    else
        echo "check-deps: OK: $pkg has none of glommio, openraft, tokio, libc"
    fi
done
exit $status
