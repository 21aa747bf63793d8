#!/usr/bin/env bash
# Soak test: a 3-server cluster on 127.0.0.1 under load for a long time, faults on a seeded
# schedule, every grant and id checked. Exits non-zero if the checker finds anything (an id
# granted or taken twice, outside the width, an agent's block or a consumer's ids going down,
# a block after a failover below an earlier one, a request never answered).
#
#   scripts/soak.sh                      # 600 s, kill the leader every 10 s, seed 1
#   DURATION_S=3600 SEED=7 scripts/soak.sh --drop 0.01 --reorder 0.01   # extra loadgen flags
#   scripts/soak.sh all                  # 600 s, every fault kind in turn (the published
#                                        # results/loadgen-10min-all-faults.md): 2 real
#                                        # agents with ring consumers, all behind the fault
#                                        # proxy; partitions need root and iptables
#
# Env: DURATION_S (600), EVERY_MS (10000), SEED (1), RATE (0 = as fast as possible; 5000 for
# `all`), NEMESIS (kill-leader; all for `all`), REPORT (results/loadgen-soak.md, or
# results/loadgen-10min-all-faults.md for `all`), CARGO_TARGET_DIR (cargo's default).
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=default
if [[ "${1:-}" == "all" ]]; then
    MODE=all
    shift
fi
DURATION_S=${DURATION_S:-600}
EVERY_MS=${EVERY_MS:-10000}
SEED=${SEED:-1}
TARGET=${CARGO_TARGET_DIR:-target}

nice -n 10 cargo build --release -p unid-cli -p unid-loadgen
if [[ $MODE == all ]]; then
    RATE=${RATE:-5000}
    NEMESIS=${NEMESIS:-all}
    REPORT=${REPORT:-results/loadgen-10min-all-faults.md}
    exec "$TARGET/release/loadgen" \
        --spawn-servers 3 --unid-bin "$TARGET/release/unid" \
        --duration-s "$DURATION_S" --drain-s 30 --rate "$RATE" \
        --agents 16 --window 8 --count 100 \
        --real-agents 2 --consumers-per-agent 1 --consumer-rate 10000 \
        --proxy --proxy-drop 0.001 --proxy-duplicate 0.001 --proxy-reorder 0.001 \
        --proxy-delay 0.01 --proxy-delay-ms 5 --proxy-corrupt 0.0005 \
        --nemesis "$NEMESIS" --every-ms "$EVERY_MS" --seed "$SEED" \
        --report "$REPORT" "$@"
fi
RATE=${RATE:-0}
NEMESIS=${NEMESIS:-kill-leader}
REPORT=${REPORT:-results/loadgen-soak.md}
exec "$TARGET/release/loadgen" \
    --spawn-servers 3 --unid-bin "$TARGET/release/unid" \
    --duration-s "$DURATION_S" --rate "$RATE" \
    --nemesis "$NEMESIS" --every-ms "$EVERY_MS" --seed "$SEED" \
    --report "$REPORT" "$@"
