#!/usr/bin/env bash
# Log lines from a three-server cluster on 127.0.0.1 while one follower is down:
# WARN/ERROR lines per minute written by the two servers left, with openraft's repeats
# let through (UNID_LOG_REPEATS=all, as before issue 18) and held back (the default).
# Usage: scripts/log-noise.sh [SECONDS_DOWN] (default 20); UNID=path/to/unid (default
# target/release/unid, else target/debug/unid). Ports 19400-19402 and 19500-19502.
set -euo pipefail
cd "$(dirname "$0")/.."
down_s=${1:-20}
unid=${UNID:-}
if [ -z "$unid" ]; then
  if [ -x target/release/unid ]; then unid=target/release/unid; else unid=target/debug/unid; fi
fi
[ -x "$unid" ] || { echo "no unid binary at $unid: cargo build -p unid-cli" >&2; exit 1; }
work=$(mktemp -d /tmp/unid-log-noise.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

run_once() { # $1 = label, $2 = UNID_LOG_REPEATS value
  local label=$1 repeats=$2 peers=() i
  rm -rf "$work"/*; pids=()
  for i in 1 2 3; do peers+=(--peer "$i=127.0.0.1:$((19499 + i))=127.0.0.1:$((19399 + i))"); done
  for i in 1 2 3; do
    local init=(); [ "$i" = 1 ] && init=(--init)
    UNID_LOG_REPEATS=$repeats "$unid" server --id "$i" \
      --listen "127.0.0.1:$((19399 + i))" --raft "127.0.0.1:$((19499 + i))" \
      --data-dir "$work/d$i" "${peers[@]}" "${init[@]}" >"$work/s$i.log" 2>&1 &
    pids+=($!)
  done
  local deadline=$((SECONDS + 30)) leader=""
  while [ -z "$leader" ]; do
    [ $SECONDS -lt $deadline ] || { echo "no leader in 30 s" >&2; tail "$work"/s*.log >&2; exit 1; }
    sleep 0.5
    leader=$("$unid" status --server 127.0.0.1:19400 --server 127.0.0.1:19401 --server 127.0.0.1:19402 \
      --timeout-ms 1000 2>/dev/null | awk '/leader/ { for (f = 1; f <= NF; f++) if ($f ~ /^[0-9]+$/) { print $f; exit } }' || true)
  done
  local victim=3; [ "$leader" = 3 ] && victim=2
  sleep 2
  local before=()
  for i in 1 2 3; do before[$i]=$(grep -cE ' (WARN|ERROR) ' "$work/s$i.log" || true); done
  kill -9 "${pids[$((victim - 1))]}"; wait "${pids[$((victim - 1))]}" 2>/dev/null || true
  sleep "$down_s"
  local total=0 n
  for i in 1 2 3; do
    [ "$i" = "$victim" ] && continue
    n=$(( $(grep -cE ' (WARN|ERROR) ' "$work/s$i.log" || true) - before[$i] ))
    total=$((total + n))
  done
  printf '%-28s leader %s, follower %s killed: %5d WARN/ERROR lines in %s s (%d per minute) from the two left\n' \
    "$label" "$leader" "$victim" "$total" "$down_s" "$((total * 60 / down_s))"
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "$repeats" != all ]; then
    echo "--- the lines, held back ---"
    for i in 1 2 3; do [ "$i" = "$victim" ] || grep -E ' (WARN|ERROR) |held back' "$work/s$i.log" | tail -n +$((before[$i] + 1)) | cut -c1-200; done
  fi
}
echo "unid log noise: $("$unid" --version), $(nproc) cores, $(uname -r)"
run_once "every repeat (before)" all
run_once "repeats held back (now)" limited
