#!/usr/bin/env bash
# The scale table of results/scale.md: one `unid server` (its UDP shard pinned to CPU SERVER_CPU,
# its Raft threads not) driven by
# `loadgen --batched` (its agent thread pinned to CLIENT_CPU) with 1, 10, 100, 1,000 and
# 10,000 registered agents, at full speed (the same total concurrency, INFLIGHT, for every
# count) and at a fixed total rate (RATE requests/s), and the batched echo peer at full speed
# beside each full-speed row (grants ÷ echo and CPU per answer measured minutes apart: the
# gate measures them in the same run). Prints a markdown table; reports in $OUT.
#
#   scripts/scale.sh                     # builds release unid and loadgen first
# Env: COUNTS ("1 10 100 1000 10000"), DURATION_S (5), RATE (20000), INFLIGHT (512), WINDOW (16),
#      SERVER_CPU (1), CLIENT_CPU (0), OUT (a temporary folder), CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=${CARGO_TARGET_DIR:-target}
BIN=$TARGET/release
COUNTS=${COUNTS:-1 10 100 1000 10000}
DURATION_S=${DURATION_S:-5}
RATE=${RATE:-20000}
INFLIGHT=${INFLIGHT:-512}
WINDOW=${WINDOW:-16}
SERVER_CPU=${SERVER_CPU:-1}
CLIENT_CPU=${CLIENT_CPU:-0}
OUT=${OUT:-$(mktemp -d /tmp/unid-scale.XXXXXX)}
mkdir -p "$OUT"
cargo build --release -q -p unid-cli -p unid-loadgen --bin unid --bin loadgen

# Figures of a batched report.
grants() { awk -F'|' '/^\| requests \| granted/ { getline; getline; gsub(/ /, "", $4); print $4 }' "$1"; }
lat() { awk -F'|' -v c="$2" '/^\| answered \| p50/ { getline; getline; gsub(/ /, "", $c); print $c }' "$1"; }
fair() { awk -F'|' '/^\| agents \| slowest/ { getline; getline; gsub(/ /, "", $6); print $6 }' "$1"; }
fig() { awk -F'|' -v k="$2" '$2 ~ k { gsub(/ /, "", $3); print $3; exit }' "$1"; }

echo "| agents | mode | load | grants/s | echo answers/s | grants ÷ echo | p50 µs | p99 µs | p99.9 µs | median ÷ slowest agent | server CPU/grant ns | echo CPU/answer ns | RSS registered MiB | RSS/agent B | data/agent B |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
for n in $COUNTS; do
  # Per agent at most WINDOW (16): with 512 in flight, one agent met the server's per-source
  # rate limit (20,000/s) and Replayed answers; a real agent keeps few requests in flight.
  window=$(( (INFLIGHT + n - 1) / n )); [ "$window" -gt "$WINDOW" ] && window=$WINDOW
  common="--batched --agents $n --window $window --inflight-max $INFLIGHT --duration-s $DURATION_S --drain-s 3 --client-cpu $CLIENT_CPU --server-cpu $SERVER_CPU --register-timeout-s 300"
  for mode in full rate; do
    extra=""; [ "$mode" = rate ] && extra="--rate $RATE"
    load=$(cut -d' ' -f1 /proc/loadavg)
    e="-"; ecpu="-"; ratio="-"
    if [ "$mode" = full ]; then
      # shellcheck disable=SC2086
      "$BIN/loadgen" --echo-peer $common $extra --report "$OUT/echo-$n.md" >"$OUT/echo-$n.out" 2>&1 || true
      e=$(grants "$OUT/echo-$n.md"); ecpu=$(fig "$OUT/echo-$n.md" cpu_per_answer_ns)
    fi
    # shellcheck disable=SC2086
    "$BIN/loadgen" --spawn-servers 1 --unid-bin "$BIN/unid" $common $extra \
      --report "$OUT/server-$n-$mode.md" >"$OUT/server-$n-$mode.out" 2>&1 \
      || { echo "| $n | $mode | $load | FAILED: see $OUT/server-$n-$mode.out |"; continue; }
    r=$OUT/server-$n-$mode.md
    g=$(grants "$r")
    [ "$e" != "-" ] && ratio=$(awk -v g="$g" -v e="$e" 'BEGIN { printf "%.2f", (e > 0 ? g / e : 0) }')
    echo "| $n | $mode | $load | $g | $e | $ratio | $(lat "$r" 3) | $(lat "$r" 4) | $(lat "$r" 5) | $(fair "$r") | $(fig "$r" cpu_per_answer_ns) | $ecpu | $(fig "$r" 'RSS with all registered') | $(fig "$r" rss_per_agent_bytes) | $(fig "$r" data_per_agent_bytes) |"
  done
done
echo
echo "Reports: $OUT"
