#!/usr/bin/env bash
# Soak test: a 3-server cluster on 127.0.0.1 under load for a long time, the leader killed
# (SIGKILL) and restarted on a seeded schedule, every grant checked. Exits non-zero if the
# checker finds anything (an id granted twice, outside the width, an agent's block going down,
# a request never answered).
#
#   scripts/soak.sh                      # 600 s, kill the leader every 10 s, seed 1
#   DURATION_S=3600 SEED=7 scripts/soak.sh --drop 0.01 --reorder 0.01   # extra loadgen flags
#
# Env: DURATION_S (600), EVERY_MS (10000), SEED (1), RATE (0 = as fast as possible),
# REPORT (results/loadgen-soak.md), CARGO_TARGET_DIR (cargo's default).
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION_S=${DURATION_S:-600}
EVERY_MS=${EVERY_MS:-10000}
SEED=${SEED:-1}
RATE=${RATE:-0}
REPORT=${REPORT:-results/loadgen-soak.md}
TARGET=${CARGO_TARGET_DIR:-target}

cargo build --release -p unid-cli -p unid-loadgen
exec "$TARGET/release/loadgen" \
    --spawn-servers 3 --unid-bin "$TARGET/release/unid" \
    --duration-s "$DURATION_S" --rate "$RATE" \
    --nemesis kill-leader --every-ms "$EVERY_MS" --seed "$SEED" \
    --report "$REPORT" "$@"
