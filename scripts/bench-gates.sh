#!/usr/bin/env bash
# CI gates on performance ratios measured in the same run (never on absolute times, which swing
# 2-4x on this shared 2-core machine). Fails, naming the figure, when:
#   - ring_next_vs_uuid_v7:    the ring's single take (unid_ring::Consumer::try_take) ids/s
#                              < 10x Uuid::now_v7()/s
#   - client_next_vs_uuid_v7:  the unid client's next() from the ring < CLIENT_NEXT_MIN x
#                              Uuid::now_v7()/s (6x; 9.5-11.5x measured: results/peers-notes.md)
#   - ring_batch_vs_fetch_add: the client's take_range(64) ids/s < 50% of AtomicU64::fetch_add's
#   - grants_vs_echo:          block grants/s from one `unid server` < MIN_GRANTS_VS_ECHO of the
#                              answers/s of loadgen's UDP echo peer, both driven by the same
#                              loadgen agents (32 x 16 in flight)
# In-process figures: 31 interleaved 50 ms slices each, judged by the 75th percentile of their
# slices (other load only slows a slice down). Grants: the median over ROUNDS of the ratio
# within a round (echo, then grants). Margins well below what this machine measures
# (results/peers-notes.md): a flaky gate is worse than none.
#
#   scripts/bench-gates.sh          # builds release unid, loadgen, bench_gates first
# Env: ROUNDS (5 grant/echo pairs), LOADGEN_S (3), MIN_GRANTS_VS_ECHO (0.5),
#      CLIENT_NEXT_MIN (6), CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=${CARGO_TARGET_DIR:-target}
BIN=$TARGET/release
ROUNDS=${ROUNDS:-5}
LOADGEN_S=${LOADGEN_S:-3}
MIN_GRANTS_VS_ECHO=${MIN_GRANTS_VS_ECHO:-0.5}
CLIENT_NEXT_MIN=${CLIENT_NEXT_MIN:-6}
t0=$SECONDS
cargo build --release -q -p unid-cli -p unid-loadgen -p unid-bench \
  --bin unid --bin loadgen --bin bench_gates
echo "bench-gates: release build $((SECONDS - t0)) s; load average $(cut -d' ' -f1-3 /proc/loadavg)"
t1=$SECONDS
failed=0

"$BIN/bench_gates" --slices 31 --ms 50 --min-client-next-vs-uuid "$CLIENT_NEXT_MIN" || failed=1

WORK=$(mktemp -d /tmp/unid-bench-gates.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
# grants/s (or answers/s) from a loadgen report: the throughput table's third column.
rate() { awk -F'|' '/^\| requests \| granted/ { getline; getline; gsub(/ /, "", $4); print $4 }' "$1"; }
LG="--agents 32 --window 16 --count 100 --duration-s $LOADGEN_S --drain-s 5"
ratios=()
for r in $(seq "$ROUNDS"); do
  # shellcheck disable=SC2086
  "$BIN/loadgen" --echo-peer $LG --report "$WORK/echo.md" >"$WORK/echo.out" 2>&1 \
    || { tail -20 "$WORK/echo.out"; echo "GATE FAILED: grants_vs_echo: loadgen --echo-peer failed"; exit 1; }
  # shellcheck disable=SC2086
  "$BIN/loadgen" --spawn-servers 1 --unid-bin "$BIN/unid" $LG --report "$WORK/grants.md" \
    >"$WORK/grants.out" 2>&1 \
    || { tail -20 "$WORK/grants.out"; echo "GATE FAILED: grants_vs_echo: loadgen against unid server failed"; exit 1; }
  e=$(rate "$WORK/echo.md"); g=$(rate "$WORK/grants.md")
  ratios+=("$(awk -v g="$g" -v e="$e" 'BEGIN { printf "%.3f", (e > 0 ? g / e : 0) }')")
  echo "bench-gates: round $r: echo peer $e answers/s, unid server $g grants/s, ratio ${ratios[-1]}"
done
median=$(printf '%s\n' "${ratios[@]}" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }')
if awk -v m="$median" -v min="$MIN_GRANTS_VS_ECHO" 'BEGIN { exit !(m >= min) }'; then
  echo "gate grants_vs_echo: unid grants/s ÷ echo answers/s = $median (median; rounds: ${ratios[*]}), must be >= $MIN_GRANTS_VS_ECHO: ok"
else
  echo "gate grants_vs_echo: unid grants/s ÷ echo answers/s = $median (median; rounds: ${ratios[*]}), must be >= $MIN_GRANTS_VS_ECHO: FAILED"
  echo "GATE FAILED: grants_vs_echo: unid grants/s ÷ echo answers/s = $median < $MIN_GRANTS_VS_ECHO"
  failed=1
fi
echo "bench-gates: measured in $((SECONDS - t1)) s"
exit "$failed"
