#!/usr/bin/env bash
# Clients beyond Rust, in one run against one real `unid server` and `unid agent` (release
# builds, 127.0.0.1 ports 18700-18709): the Python package's next(), take(1000) and
# take_range(1000) against uuid.uuid4(), uuid.uuid1() and the socket protocol from Python;
# C unid_next() (libunid.a, cc -O2) against the Rust client's next() and Uuid::now_v7().
# C and Rust alternate in ROUNDS rounds of SLICES slices of MS ms; medians of all slices.
# Results: results/clients.md (targets: Python next() >= 3x uuid4(); C >= 0.8x Rust).
#
#   scripts/bench-clients.sh        # Env: ROUNDS (5), SLICES (4), MS (200), PY_SLICES (15)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
ROUNDS=${ROUNDS:-5} SLICES=${SLICES:-4} MS=${MS:-200} PY_SLICES=${PY_SLICES:-15}
PYTHON=${PYTHON:-python3}
BUILD=$ROOT/.tools/py
t0=$SECONDS
cargo build --release -q -p unid-cli --bin unid
(cd capi && cargo build --release -q && cargo build --release -q --example bench_rust)
if [ ! -x "$BUILD/bin/maturin" ]; then
  "$PYTHON" -m venv "$BUILD" && "$BUILD/bin/pip" install -q "maturin>=1.5,<2" "pytest>=7"
fi
WORK=$(mktemp -d /tmp/unid-bench-clients.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK" "/dev/shm/unid-bench-clients-$$"
}
trap cleanup EXIT
(cd python && "$BUILD/bin/maturin" build --release -q -i "$BUILD/bin/python" -o "$WORK/wheels")
"$PYTHON" -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q "$WORK"/wheels/unid-*.whl
cc -std=c11 -O2 -Icapi/include capi/bench/bench_next.c capi/target/release/libunid.a \
  -lpthread -ldl -lm -o "$WORK/bench_next"
echo "bench-clients: builds $((SECONDS - t0)) s"

UNID=$ROOT/target/release/unid
UDP=127.0.0.1:18700 RAFT=127.0.0.1:18701 SOCK=127.0.0.1:18702
RINGS=/dev/shm/unid-bench-clients-$$
"$UNID" server --id 1 --listen $UDP --raft $RAFT --data-dir "$WORK/data" \
  --peer 1=$RAFT=$UDP --init >"$WORK/server.log" 2>&1 &
pids+=($!)
for _ in $(seq 150); do
  "$UNID" sequence create bench --width 8 --server $UDP >/dev/null 2>&1 && break
  sleep 0.2
done
"$UNID" agent --server $UDP --sequence bench --ring-dir "$RINGS" --socket $SOCK \
  >"$WORK/agent.log" 2>&1 &
pids+=($!)
for _ in $(seq 200); do [ -e "$RINGS/bench" ] && break; sleep 0.05; done
[ -e "$RINGS/bench" ] || { tail "$WORK/server.log" "$WORK/agent.log"; echo "no ring"; exit 1; }

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
: >"$WORK/c.tsv"
for r in $(seq "$ROUNDS"); do
  "$WORK/bench_next" bench "$RINGS" $SOCK "$SLICES" "$MS" >>"$WORK/c.tsv"
  capi/target/release/examples/bench_rust bench "$RINGS" $SOCK "$SLICES" "$MS" >>"$WORK/c.tsv"
done
echo
echo "C and Rust: $ROUNDS rounds x $SLICES slices x $MS ms each, alternating processes"
echo "| operation | ids/s (median slice) | min – max slice |"
echo "|---|---:|---:|"
for op in "unid_next()" "Rust next()" "Uuid::now_v7()"; do
  awk -F'\t' -v op="$op" '$1 == op { print $2 }' "$WORK/c.tsv" | sort -g | awk -v op="$op" \
    '{ v[NR] = $1 } END { printf "| %s | %.0f | %.0f – %.0f |\n", op, v[int((NR + 1) / 2)], v[1], v[NR] }'
done
med() { awk -F'\t' -v op="$1" '$1 == op { print $2 }' "$WORK/c.tsv" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
c=$(med "unid_next()") rust=$(med "Rust next()") v7=$(med "Uuid::now_v7()")
awk -v c="$c" -v r="$rust" -v v="$v7" 'BEGIN {
  printf "ratio: C unid_next() / Rust next() = %.2f (target 0.8: %s)\n", c / r, (c >= 0.8 * r ? "met" : "NOT met")
  printf "ratio: C unid_next() / Uuid::now_v7() = %.2f\n", c / v }'
echo
"$WORK/venv/bin/python" python/bench/bench_clients.py bench "$RINGS" $SOCK \
  --slices "$PY_SLICES" --ms "$MS" 2>"$WORK/py.tsv"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
