#!/usr/bin/env bash
# The C library (capi/): checks that include/unid.h is what cbindgen makes of src/lib.rs,
# builds libunid.so and libunid.a, compiles the C test program and the example with `cc`
# (-Wall -Wextra -Werror; the header also as C++), then runs them against a real
# `unid server` and `unid agent` on 127.0.0.1 (ports 18650-18659).
#
#   scripts/test-capi.sh                  # UNID_BIN: the unid binary (default target/debug/unid)
#   scripts/test-capi.sh --update-header  # regenerate capi/include/unid.h, then commit it
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
if [ "${1:-}" = --update-header ]; then
  (cd capi && UNID_CAPI_UPDATE_HEADER=1 cargo build --release -q)
  echo "wrote capi/include/unid.h"
  exit 0
fi
UNID_BIN=${UNID_BIN:-$ROOT/target/debug/unid}
[ -x "$UNID_BIN" ] || { echo "no unid binary at $UNID_BIN (cargo build -p unid-cli)"; exit 1; }
CC=${CC:-cc}
LIB=$ROOT/capi/target/release

echo "--- capi: Rust tests (the header is current, conversions, error codes)"
(cd capi && cargo test --release -q 2>&1 | grep -E "^test result|FAILED|panicked|stale")
(cd capi && cargo build --release -q)

WORK=$(mktemp -d /tmp/unid-capi.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK" /dev/shm/unid-capi-test-$$
}
trap cleanup EXIT

echo "--- capi: compile with $CC"
"$CC" -std=c11 -O2 -Wall -Wextra -Werror -pthread -Icapi/include capi/tests/test_unid.c \
  "$LIB/libunid.a" -lpthread -ldl -lm -o "$WORK/test_unid"
"$CC" -std=c11 -O2 -Wall -Wextra -Werror -Icapi/include capi/examples/next_ids.c \
  -L"$LIB" -lunid -o "$WORK/next_ids"
if command -v c++ >/dev/null; then
  echo '#include "unid.h"' | c++ -x c++ -std=c++11 -Wall -Werror -fsyntax-only -Icapi/include -
fi

echo "--- capi: a server and an agent"
UDP=127.0.0.1:18650 RAFT=127.0.0.1:18651 SOCK=127.0.0.1:18652 NOBODY=127.0.0.1:18653
RINGS=/dev/shm/unid-capi-test-$$
"$UNID_BIN" server --id 1 --listen $UDP --raft $RAFT --data-dir "$WORK/data" \
  --peer 1=$RAFT=$UDP --init >"$WORK/server.log" 2>&1 &
pids+=($!)
for _ in $(seq 150); do
  "$UNID_BIN" sequence create capi --width 8 --server $UDP >/dev/null 2>&1 && break
  sleep 0.2
done
"$UNID_BIN" agent --server $UDP --sequence capi --ring-dir "$RINGS" --socket $SOCK \
  >"$WORK/agent.log" 2>&1 &
pids+=($!)
for _ in $(seq 200); do [ -e "$RINGS/capi" ] && break; sleep 0.05; done
[ -e "$RINGS/capi" ] || { tail -20 "$WORK/server.log" "$WORK/agent.log"; echo "no ring"; exit 1; }

echo "--- capi: the C test program"
"$WORK/test_unid" capi "$RINGS" $SOCK $NOBODY
echo "--- capi: the example (shared library)"
out=$(UNID_RING_DIR=$RINGS UNID_SOCKET=$SOCK LD_LIBRARY_PATH=$LIB "$WORK/next_ids" capi 3)
echo "$out"
[ "$(echo "$out" | wc -l)" = 3 ] || { echo "next_ids printed no 3 ids"; exit 1; }
