#!/usr/bin/env bash
# unid against what users would pick instead, measured side by side on this machine in one
# run, and written to results/peers.md (+ results/peers-throughput.svg, peers-latency.svg,
# peers-rows.tsv):
#   - PostgreSQL nextval() (sequences with CACHE 1 and CACHE 1000; 1 and 8 connections),
#   - Redis INCR and INCRBY 1000 (1 and 8 connections, pipelined by 16 and not),
#   - Uuid::now_v7() and a Snowflake crate (rs-snowflake) in process, AtomicU64::fetch_add,
#   - unid: next() and take_range(1000) from the ring (1 and 2 consumer processes), the agent's
#     localhost socket (NEXT seq 1 / 1000), block grants over UDP from one server to 32
#     loadgen agents, and loadgen's UDP echo peer as the network-stack baseline.
# Every in-process, PostgreSQL, Redis and unid-client figure comes from one driver
# (bench/src/bin/peers.rs, unid_bench::closed_loop); grants and echo both from loadgen's agents.
#
#   sudo scripts/peers.sh              # as root: installs postgresql and redis-server if missing
#   ROUNDS=3 SECONDS_PER=4 LOADGEN_S=8 scripts/peers.sh
#   ONLY='ring|socket|loadgen' OUT=/tmp/p scripts/peers.sh     # a subset (labels matching ONLY)
#
# Starts its own PostgreSQL cluster (initdb in a temporary folder, port 55432), its own
# redis-server (port 56379, no persistence) and one unid server + agent (UDP 17401, socket 17411), all
# on 127.0.0.1, and stops them at the end (also on error or Ctrl-C). The distribution's own
# PostgreSQL/Redis services are not touched.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
ROUNDS=${ROUNDS:-3}
SECONDS_PER=${SECONDS_PER:-4}
LOADGEN_S=${LOADGEN_S:-8}
PG_PORT=${PG_PORT:-55432}
REDIS_PORT=${REDIS_PORT:-56379}
UNID_BASE_PORT=${UNID_BASE_PORT:-17400}
UNID_SOCKET=127.0.0.1:${UNID_SOCKET_PORT:-17411}
OUT=${OUT:-results}
TARGET=${CARGO_TARGET_DIR:-target}
BIN=$TARGET/release
COMMAND="$0 $* (ROUNDS=$ROUNDS SECONDS_PER=$SECONDS_PER LOADGEN_S=$LOADGEN_S)"
log() { printf '[peers %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

# ---- install (idempotent) ------------------------------------------------------------------
pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }
if [ -z "$(pg_bin)" ] || ! command -v redis-server >/dev/null || ! command -v psql >/dev/null; then
  [ "$(id -u)" = 0 ] || { echo "peers.sh: PostgreSQL/Redis missing; run as root to install them" >&2; exit 2; }
  log "installing postgresql and redis-server from the distribution"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql redis-server >/dev/null
fi
PGBIN=$(pg_bin)

# ---- build ---------------------------------------------------------------------------------
log "building (release): unid, loadgen, peers"
nice -n 10 cargo build --release -q -p unid-cli -p unid-loadgen -p unid-bench \
  --features unid-bench/peers --bin unid --bin loadgen --bin peers

# ---- start ---------------------------------------------------------------------------------
WORK=$(mktemp -d /tmp/unid-peers.XXXXXX)
RING=/dev/shm/unid-peers-$$
PIDS=()
cleanup() {
  set +e
  log "stopping what this run started"
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
  for p in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null
  done
  if [ -f "$WORK/pg/postmaster.pid" ]; then
    as_pg "$PGBIN/pg_ctl" -D "$WORK/pg" -m fast -w stop >/dev/null 2>&1
  fi
  rm -rf "$WORK" "$RING"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
if [ "$(id -u)" = 0 ]; then
  chown postgres "$WORK"
  as_pg() { runuser -u postgres -- "$@"; }
else
  as_pg() { "$@"; }
fi

log "PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$PG_PORT"
as_pg "$PGBIN/initdb" -D "$WORK/pg" -A trust -U postgres >"$WORK/initdb.log" 2>&1
as_pg "$PGBIN/pg_ctl" -D "$WORK/pg" -l "$WORK/pg/server.log" -w \
  -o "-p $PG_PORT -k $WORK -c listen_addresses=127.0.0.1" start >/dev/null
psql -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 \
  -c "CREATE SEQUENCE peers_c1 CACHE 1; CREATE SEQUENCE peers_c1000 CACHE 1000;"

log "Redis $(redis-server --version | awk '{print $3}') on 127.0.0.1:$REDIS_PORT"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
  --dir "$WORK" --daemonize no >"$WORK/redis.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
redis-cli -p "$REDIS_PORT" ping >/dev/null

# One server and one agent, as README's "by hand" recipe (not `unid dev`, whose start-up check
# ignores --ring-dir/--socket at this commit).
UNID_UDP=127.0.0.1:$((UNID_BASE_PORT + 1))
UNID_RAFT=127.0.0.1:$((UNID_BASE_PORT + 101))
log "unid server on $UNID_UDP, agent socket $UNID_SOCKET, rings in $RING"
"$BIN/unid" server --id 1 --listen "$UNID_UDP" --raft "$UNID_RAFT" --data-dir "$WORK/unid-1" \
  --peer "1=$UNID_RAFT=$UNID_UDP" --init >"$WORK/unid-server.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do
  "$BIN/unid" sequence create default --width 8 --server "$UNID_UDP" >/dev/null 2>&1 && break
  sleep 0.2
done
"$BIN/unid" agent --sequence default --server "$UNID_UDP" --ring-dir "$RING" \
  --socket "$UNID_SOCKET" >"$WORK/unid-agent.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 300); do [ -e "$RING/default" ] && break; sleep 0.1; done
[ -e "$RING/default" ] || { tail "$WORK"/unid-*.log >&2; echo "peers.sh: no unid ring" >&2; exit 1; }

# ---- machine -------------------------------------------------------------------------------
META=$WORK/meta.md
{
  echo "# unid against its peers"
  echo
  echo "Measured side by side on one machine in one run by \`scripts/peers.sh\`."
  echo
  echo '```sh'
  echo "$COMMAND"
  echo '```'
  echo
  echo "- Date: $(date -u '+%Y-%m-%d %H:%M UTC'); commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- bench loadgen scripts 2>/dev/null || echo ' (bench/loadgen/scripts modified)')."
  echo "- Machine: \`nproc\` = $(nproc); $(lscpu | sed -n 's/^Model name: *//p' | head -1); kernel $(uname -r); $(rustc --version | awk '{print $1, $2}')."
  echo "- Load average at the start: $(cut -d' ' -f1-3 /proc/loadavg) (2 cores shared with other engineers' builds: absolute figures swing 2–4x; compare ratios within this run)."
  echo "- PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}') (own cluster from initdb, default settings, TCP on 127.0.0.1, prepared \`SELECT nextval('s')\`, autocommit); Redis $(redis-server --version | awk '{print $3}' | sed 's/v=//') (no RDB/AOF persistence, TCP on 127.0.0.1, \`redis\` crate); unid: one \`unid server\` and one \`unid agent\` (sequence \`default\`, width 8, default settings), the \`unid\` client crate, loadgen."
} >"$META"

# ---- measure -------------------------------------------------------------------------------
ROWS=$WORK/rows.tsv
: >"$ROWS"
m() { # label system threads procs [extra args...]
  local label=$1 sys=$2 threads=$3 procs=$4; shift 4
  [[ -z "${ONLY:-}" || "$label" =~ $ONLY ]] || return 0
  "$BIN/peers" measure --label "$label" --system "$sys" --threads "$threads" --procs "$procs" \
    --seconds "$SECONDS_PER" --pg "host=127.0.0.1 port=$PG_PORT user=postgres dbname=postgres" \
    --redis "redis://127.0.0.1:$REDIS_PORT/" --ring-dir "$RING" --socket "$UNID_SOCKET" \
    --sequence default "$@" | tee -a "$ROWS" >&2
}
# loadgen report -> row: throughput row (requests granted grants/s ids ids/s), latency row (µs)
lg_row() { # label system clients report
  awk -F'|' -v label="$1" -v sys="$2" -v clients="$3" '
    /^\| requests \| granted/ { getline; getline; ops=$4; ids=$6 }
    /^\| answered \| p50/ { getline; getline; p50=$3*1000; p99=$4*1000; p999=$5*1000 }
    END { gsub(/ /,"",ops); gsub(/ /,"",ids);
          printf "%s\t%s\t%s\t%s\t%s\t%d\t%d\t%d\t%s\n", label, sys, clients, ids, ops, p50, p99, p999, ids }' "$4"
}
LG="--agents 32 --window 16 --count 100 --duration-s $LOADGEN_S --drain-s 5"
for r in $(seq "$ROUNDS"); do
  log "round $r of $ROUNDS (load $(cut -d' ' -f1-3 /proc/loadavg))"
  m "timer (two Instant::now)" noop 1 1
  m "AtomicU64::fetch_add" fetch_add 1 1
  m "AtomicU64::fetch_add" fetch_add 2 1
  m "Uuid::now_v7()" uuid_v7 1 1
  m "Uuid::now_v7()" uuid_v7 2 1
  m "Snowflake (rs-snowflake)" snowflake 1 1
  m "Snowflake (rs-snowflake)" snowflake 2 1
  m "PostgreSQL nextval() CACHE 1" pg_nextval 1 1 --pg-seq peers_c1
  m "PostgreSQL nextval() CACHE 1" pg_nextval 8 1 --pg-seq peers_c1
  m "PostgreSQL nextval() CACHE 1000" pg_nextval 1 1 --pg-seq peers_c1000
  m "PostgreSQL nextval() CACHE 1000" pg_nextval 8 1 --pg-seq peers_c1000
  m "Redis INCR" redis_incr 1 1
  m "Redis INCR" redis_incr 8 1
  m "Redis INCR, pipeline 16" redis_incr 8 1 --pipeline 16
  m "Redis INCRBY 1000" redis_incr 1 1 --by 1000
  m "Redis INCRBY 1000, pipeline 16" redis_incr 8 1 --by 1000 --pipeline 16
  m "ring next()" unid_next 1 1
  m "ring next(), 2 processes" unid_next 1 2
  m "ring take_range(1000)" unid_take_range 1 1 --n 1000
  m "socket NEXT 1" unid_socket 1 1 --n 1
  m "socket NEXT 1" unid_socket 8 1 --n 1
  m "socket NEXT 1000" unid_socket 1 1 --n 1000
  [[ -z "${ONLY:-}" || "loadgen" =~ $ONLY ]] || continue
  # shellcheck disable=SC2086
  "$BIN/loadgen" --echo-peer $LG --report "$WORK/echo-$r.md" >"$WORK/echo-$r.out" 2>&1 \
    || { tail -20 "$WORK/echo-$r.out" >&2; exit 1; }
  lg_row "UDP echo peer (loadgen)" loadgen_echo "32 agents × 16" "$WORK/echo-$r.md" | tee -a "$ROWS" >&2
  # shellcheck disable=SC2086
  "$BIN/loadgen" --spawn-servers 1 --unid-bin "$BIN/unid" $LG --report "$WORK/grants-$r.md" \
    >"$WORK/grants-$r.out" 2>&1 || { tail -20 "$WORK/grants-$r.out" >&2; exit 1; }
  lg_row "block grants over UDP (1 server)" loadgen_grants "32 agents × 16" "$WORK/grants-$r.md" | tee -a "$ROWS" >&2
done
echo "- Load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)." >>"$META"

# ---- report --------------------------------------------------------------------------------
mkdir -p "$OUT"
cp "$ROWS" "$OUT/peers-rows.tsv"
cp "$WORK/grants-$ROUNDS.md" "$OUT/peers-loadgen-grants.md" 2>/dev/null || true
cp "$WORK/echo-$ROUNDS.md" "$OUT/peers-loadgen-echo.md" 2>/dev/null || true
"$BIN/peers" report --tsv "$ROWS" --meta "$META" --out "$OUT/peers.md" --svg-dir "$OUT"
log "wrote $OUT/peers.md, $OUT/peers-throughput.svg, $OUT/peers-latency.svg, $OUT/peers-rows.tsv"
