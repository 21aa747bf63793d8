#!/usr/bin/env bash
# CI gates on performance ratios measured in the same run (never on absolute times, which swing
# 2-4x on this shared 2-core machine). Fails, naming the figure, when:
#   - ring_next_vs_uuid_v7:    the ring's single take (unid_ring::Consumer::try_take) ids/s
#                              < 10x Uuid::now_v7()/s
#   - client_next_vs_uuid_v7:  the unid client's next() from the ring < CLIENT_NEXT_MIN x
#                              Uuid::now_v7()/s (6x; 9.5-11.5x measured: results/peers-notes.md)
#   - client_next_vs_ring_take: the client's next() ids/s < CLIENT_NEXT_VS_RING_MIN (0.8) x the
#                              ring's own try_take() ids/s (next() may cost at most 1.25x a take)
#   - ring_batch_vs_fetch_add: the client's take_range(64) ids/s < 50% of AtomicU64::fetch_add's
#   - grants_vs_echo:          block grants/s from one `unid server` < MIN_GRANTS_VS_ECHO (0.45) of
#                              the answers/s of loadgen's batched UDP echo peer, both driven by
#                              the same batched loadgen client (`--batched`: 32 registered agents
#                              x 16 in flight over 8 sockets, recvmmsg/sendmmsg), the server (or
#                              echo) pinned to CPU 1 and the client to CPU 0
#   - server_cpu_vs_echo:      the server process's CPU time per grant > MAX_CPU_VS_ECHO (2) x the
#                              echo peer's CPU time per answer (from /proc, same rounds; a
#                              regression bound: the target is 1.25)
#   - failover:                a 3-server cluster (`loadgen --spawn-servers 3`) with 2 real agents
#                              (a ring consumer each, 5k next()/s) and light simulated-agent load;
#                              the nemesis kill -9s the leader FAILOVER_KILLS (3) times: the median
#                              kill -> first grant by another server must be <= FAILOVER_MAX_MS
#                              (1000) and no consumer next() that began during a kill may wait
#                              over NEXT_WAIT_MAX_MS (50), and loadgen's checker must pass.
#                              Generous bounds (measured ~210 ms and < 1 ms): a regression gate;
#                              the figures are printed beside it.
# In-process figures: 31 interleaved 50 ms slices each, judged by the 75th percentile of their
# slices (other load only slows a slice down). Grants: the median over ROUNDS of the ratio
# within a round (echo, then grants). Margins well below what this machine measures
# (results/peers-notes.md): a flaky gate is worse than none.
#
#   scripts/bench-gates.sh          # builds release unid, loadgen, bench_gates first
# Env: ROUNDS (5 grant/echo pairs), LOADGEN_S (3), MIN_GRANTS_VS_ECHO (0.45), MAX_CPU_VS_ECHO (2),
#      CLIENT_NEXT_MIN (6), CLIENT_NEXT_VS_RING_MIN (0.8), FAILOVER_KILLS (3),
#      FAILOVER_EVERY_MS (3000), FAILOVER_MAX_MS (1000), NEXT_WAIT_MAX_MS (50), CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=${CARGO_TARGET_DIR:-target}
BIN=$TARGET/release
ROUNDS=${ROUNDS:-5}
LOADGEN_S=${LOADGEN_S:-3}
# 0.45: a regression bound below every round measured with the batched echo peer as it is now
# (fresh-clone CI runs of 2026-12-07, results/scale.md: 0.538-0.714; the server holds 238k-249k
# grants/s on its core while the echo varies from 349k to 443k answers/s between rounds, so this
# ratio moves with the echo). At 0.7 it failed: the echo got faster, the server did not get slower.
MIN_GRANTS_VS_ECHO=${MIN_GRANTS_VS_ECHO:-0.45}
MAX_CPU_VS_ECHO=${MAX_CPU_VS_ECHO:-2}
CLIENT_NEXT_MIN=${CLIENT_NEXT_MIN:-6}
CLIENT_NEXT_VS_RING_MIN=${CLIENT_NEXT_VS_RING_MIN:-0.8}
FAILOVER_KILLS=${FAILOVER_KILLS:-3}
FAILOVER_EVERY_MS=${FAILOVER_EVERY_MS:-3000}
FAILOVER_MAX_MS=${FAILOVER_MAX_MS:-1000}
NEXT_WAIT_MAX_MS=${NEXT_WAIT_MAX_MS:-50}
t0=$SECONDS
cargo build --release -q -p unid-cli -p unid-loadgen -p unid-bench \
  --bin unid --bin loadgen --bin bench_gates
echo "bench-gates: release build $((SECONDS - t0)) s; load average $(cut -d' ' -f1-3 /proc/loadavg)"
t1=$SECONDS
failed=0

"$BIN/bench_gates" --slices 31 --ms 50 --min-client-next-vs-uuid "$CLIENT_NEXT_MIN" \
  --min-client-next-vs-ring "$CLIENT_NEXT_VS_RING_MIN" || failed=1

WORK=$(mktemp -d /tmp/unid-bench-gates.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
# grants/s (or answers/s) from a loadgen report: the throughput table's third column.
rate() { awk -F'|' '/^\| requests \| granted/ { getline; getline; gsub(/ /, "", $4); print $4 }' "$1"; }
LG="--batched --agents 32 --window 16 --inflight-max 512 --count 100 --duration-s $LOADGEN_S"
LG="$LG --warmup-s 0.5 --drain-s 3 --client-cpu 0 --server-cpu 1"
# A batched report's figure: the row whose first cell matches.
fig() { awk -F'|' -v k="$2" '$2 ~ k { gsub(/ /, "", $3); print $3; exit }' "$1"; }
ratios=()
cpus=()
for r in $(seq "$ROUNDS"); do
  # shellcheck disable=SC2086
  "$BIN/loadgen" --echo-peer $LG --report "$WORK/echo.md" >"$WORK/echo.out" 2>&1 \
    || { tail -20 "$WORK/echo.out"; echo "GATE FAILED: grants_vs_echo: loadgen --echo-peer failed"; exit 1; }
  # shellcheck disable=SC2086
  "$BIN/loadgen" --spawn-servers 1 --unid-bin "$BIN/unid" $LG --report "$WORK/grants.md" \
    >"$WORK/grants.out" 2>&1 \
    || { tail -20 "$WORK/grants.out"; echo "GATE FAILED: grants_vs_echo: loadgen against unid server failed"; exit 1; }
  e=$(rate "$WORK/echo.md"); g=$(rate "$WORK/grants.md")
  ec=$(fig "$WORK/echo.md" cpu_per_answer_ns); gc=$(fig "$WORK/grants.md" cpu_per_answer_ns)
  ratios+=("$(awk -v g="$g" -v e="$e" 'BEGIN { printf "%.3f", (e > 0 ? g / e : 0) }')")
  cpus+=("$(awk -v g="$gc" -v e="$ec" 'BEGIN { printf "%.3f", (e > 0 ? g / e : 99) }')")
  echo "bench-gates: round $r (load $(cut -d' ' -f1 /proc/loadavg)): echo peer $e answers/s at $ec ns CPU each, unid server $g grants/s at $gc ns CPU each; grants ÷ echo ${ratios[-1]}, CPU per grant ÷ per answer ${cpus[-1]}"
done
med() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
median=$(med "${ratios[@]}")
if awk -v m="$median" -v min="$MIN_GRANTS_VS_ECHO" 'BEGIN { exit !(m >= min) }'; then
  echo "gate grants_vs_echo: unid grants/s ÷ batched echo answers/s = $median (median; rounds: ${ratios[*]}), must be >= $MIN_GRANTS_VS_ECHO: ok"
else
  echo "gate grants_vs_echo: unid grants/s ÷ batched echo answers/s = $median (median; rounds: ${ratios[*]}), must be >= $MIN_GRANTS_VS_ECHO: FAILED"
  echo "GATE FAILED: grants_vs_echo: unid grants/s ÷ echo answers/s = $median < $MIN_GRANTS_VS_ECHO"
  failed=1
fi
cmed=$(med "${cpus[@]}")
if awk -v m="$cmed" -v max="$MAX_CPU_VS_ECHO" 'BEGIN { exit !(m <= max) }'; then
  echo "gate server_cpu_vs_echo: server CPU per grant ÷ echo CPU per answer = $cmed (median; rounds: ${cpus[*]}), must be <= $MAX_CPU_VS_ECHO: ok"
else
  echo "gate server_cpu_vs_echo: server CPU per grant ÷ echo CPU per answer = $cmed (median; rounds: ${cpus[*]}), must be <= $MAX_CPU_VS_ECHO: FAILED"
  echo "GATE FAILED: server_cpu_vs_echo: server CPU per grant ÷ echo CPU per answer = $cmed > $MAX_CPU_VS_ECHO"
  failed=1
fi

# Failover: every interval is every-ms ± 25 %, and no fault starts in the last 2 s, so
# kills x every x 1.25 + 3 s leaves room for all of them.
fo_s=$(awk -v k="$FAILOVER_KILLS" -v e="$FAILOVER_EVERY_MS" 'BEGIN { printf "%.1f", k * e * 1.25 / 1000 + 3 }')
fo_rc=0
"$BIN/loadgen" --spawn-servers 3 --unid-bin "$BIN/unid" --agents 4 --window 4 --real-agents 2 \
  --consumers-per-agent 1 --nemesis kill-leader --every-ms "$FAILOVER_EVERY_MS" --seed 1 \
  --duration-s "$fo_s" --drain-s 5 --report "$WORK/failover.md" >"$WORK/failover.out" 2>&1 || fo_rc=$?
# The report's per-kill rows, and its summary line of the leader kills.
grep -E '^\| [0-9]+ \| kill-leader' "$WORK/failover.md" 2>/dev/null \
  | awk -F'|' '{ gsub(/ /, ""); printf "bench-gates: failover: kill %s at %s s of %s: first grant by another server after %s ms, longest next() wait %s ms\n", $2, $4, $5, $8, $9 }' \
  | sed 's/of server\([0-9]\)/of server \1/' || true
line=$(grep -F '**Leader kills**' "$WORK/failover.md" 2>/dev/null || true)
kills=$(sed -n 's/.*, \([0-9]*\) with a new leader.s grant.*/\1/p' <<<"$line")
fo_med=$(sed -n 's/.*another server median \([0-9.]*\) ms.*/\1/p' <<<"$line")
fo_worst=$(sed -n 's/.*ms, worst \([0-9.]*\) ms.*/\1/p' <<<"$line")
wait_ms=$(sed -n 's/.*during a leader kill: \([0-9.]*\) ms.*/\1/p' <<<"$line")
fo="${kills:-no} leader kills with a new leader's grant, kill -> first grant median ${fo_med:-?} ms (worst ${fo_worst:-?} ms), longest next() wait ${wait_ms:-?} ms, loadgen exit $fo_rc"
if [ "$fo_rc" = 0 ] && [ "${kills:-0}" -ge "$FAILOVER_KILLS" ] \
  && awk -v m="${fo_med:-1e9}" -v w="${wait_ms:-1e9}" -v mm="$FAILOVER_MAX_MS" -v wm="$NEXT_WAIT_MAX_MS" \
    'BEGIN { exit !(m <= mm && w <= wm) }'; then
  echo "gate failover: $fo; must be >= $FAILOVER_KILLS kills, median <= $FAILOVER_MAX_MS ms, wait <= $NEXT_WAIT_MAX_MS ms, checker passed: ok"
else
  tail -20 "$WORK/failover.out"
  echo "gate failover: $fo; must be >= $FAILOVER_KILLS kills, median <= $FAILOVER_MAX_MS ms, wait <= $NEXT_WAIT_MAX_MS ms, checker passed: FAILED"
  echo "GATE FAILED: failover: $fo"
  failed=1
fi
echo "bench-gates: measured in $((SECONDS - t1)) s"
exit "$failed"
