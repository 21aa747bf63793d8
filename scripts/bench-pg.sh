#!/usr/bin/env bash
# Benchmarks of the PostgreSQL extension (pg/), one run on one machine, for results/postgres.md:
# pgbench with custom scripts against a temporary PostgreSQL 15 cluster, a real `unid server`
# and agent (scripts/pg-env.sh; as root).
#
# - INSERT throughput, empty tables, 1 and 8 clients: `bigint DEFAULT unid_next('bench')`,
#   `bigint GENERATED ALWAYS AS IDENTITY`, `uuid DEFAULT gen_random_uuid()` and
#   `uuid DEFAULT uuidv7()` (a SQL function: 48-bit Unix ms, version and variant bits, the rest
#   random from gen_random_uuid());
# - `SELECT unid_next('sel')` against `SELECT nextval('s')`, 1 and 8 clients;
# - each table grown to 1M rows and then to ROWS_BIG (default 10M) rows (INSERT ... SELECT
#   from generate_series, 1M rows per statement, the default evaluated per row): table and
#   primary-key index size, load time, and INSERT throughput (8 clients) at that size;
# - server side, no round trips: unid_next(), nextval(), gen_random_uuid(), uuidv7() and
#   generate_series alone (g) evaluated 1M times in one backend, and unid_take(1M).
#
#   scripts/bench-pg.sh     # writes results/postgres.tsv and results/postgres.svg
# - then, at ROWS_BIG rows, PAIRS rounds of t_unid against t_identity back to back (8 clients,
#   DUR seconds each, a CHECKPOINT before each run, the order swapped every round), so that the
#   two are compared run against neighbouring run: each round's ratio and their median.
# Env: DUR (seconds per pgbench run, 10), REPS (pgbench runs per figure, median; 3), ROWS_BIG (10000000),
# PAIRS (rounds of the paired comparison, 8; 0 skips it), UNID_BIN (target/debug/unid;
# the agent only refills blocks), PG_CONFIG, SKIP_INSTALL=1 (use the installed extension),
# PAIRS_ONLY=1 (only grow t_unid and t_identity to ROWS_BIG and run the paired rounds; writes
# results/postgres-pairs.tsv and results/postgres-pairs.log, leaves the other results alone).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
UNID_BIN=${UNID_BIN:-$ROOT/target/debug/unid}
DUR=${DUR:-10}
REPS=${REPS:-3}
PAIRS=${PAIRS:-8}
ROWS_BIG=${ROWS_BIG:-10000000}
[ "$(id -u)" = 0 ] || { echo "needs root (see scripts/pg-env.sh)"; exit 1; }
PGBIN=$("$PG_CONFIG" --bindir)
PAIRS_ONLY=${PAIRS_ONLY:-0}
TSV=$ROOT/results/postgres.tsv
RUNS=$ROOT/results/postgres-runs.log
if [ "$PAIRS_ONLY" = 1 ]; then
  TSV=$ROOT/results/postgres-pairs.tsv
  RUNS=$ROOT/results/postgres-pairs.log
fi
if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  echo "--- cargo pgrx install --release"
  (cd pg && cargo pgrx install --release --pg-config "$PG_CONFIG" 2>&1 | grep -E "Finished|error" | tail -2)
fi
WORK=$(mktemp -d /tmp/unid-pgbench.XXXXXX)
chmod 755 "$WORK"
trap 'pg_env_cleanup 2>/dev/null || rm -rf "$WORK"' EXIT
. scripts/pg-env.sh
pg_env_server bench:8:1 sel:8:1
pg_env_agent
# Commits do not wait for the WAL flush (synchronous_commit = off): on this VM an fsync per
# commit would make every variant the same speed. Autovacuum off: no vacuum in the middle of a
# run of an insert-only table.
pg_env_postgres "shared_buffers = 1GB" "synchronous_commit = off" "max_wal_size = 8GB" \
  "checkpoint_timeout = 30min" "autovacuum = off" "max_connections = 40"

sql "CREATE FUNCTION uuidv7() RETURNS uuid LANGUAGE sql VOLATILE AS \$\$
  SELECT encode(set_bit(set_bit(overlay(uuid_send(gen_random_uuid())
    PLACING substring(int8send((extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
    FROM 1 FOR 6), 52, 1), 53, 1), 'hex')::uuid \$\$"
sql "CREATE TABLE t_unid (id bigint PRIMARY KEY DEFAULT unid_next('bench'), v int)"
sql "CREATE TABLE t_identity (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v int)"
sql "CREATE TABLE t_uuid4 (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), v int)"
sql "CREATE TABLE t_uuid7 (id uuid PRIMARY KEY DEFAULT uuidv7(), v int)"
sql "CREATE SEQUENCE s"
# Sanity: the defaults give what they should (uuidv7: version 7, increasing with time).
sql "SELECT unid_source('bench'), unid_next('bench') > 0, substr(uuidv7()::text, 15, 1) = '7'" 
TABLES=(t_unid t_identity t_uuid4 t_uuid7)
for t in "${TABLES[@]}"; do echo "INSERT INTO $t (v) VALUES (1);" >"$WORK/ins_$t.sql"; done
echo "SELECT unid_next('sel');" >"$WORK/sel_unid.sql"
echo "SELECT nextval('s');" >"$WORK/sel_nextval.sql"

bench() { # script clients: the median tps of REPS pgbench runs (all of them in bench.log)
  local j=$(( $2 < 2 ? $2 : 2 )) runs=()
  for _ in $(seq "$REPS"); do
    runs+=("$("$PGBIN/pgbench" -n -M prepared -h 127.0.0.1 -p "$PP" -U postgres -c "$2" -j "$j" \
      -T "$DUR" -f "$1" postgres 2>&1 | awk '/^tps = / { printf "%.0f\n", $3 }')")
  done
  echo "$1 -c $2: ${runs[*]}" >>"$RUNS"
  printf '%s\n' "${runs[@]}" | sort -n | sed -n "$(( (REPS + 1) / 2 ))p"
}
# Server side, no round trips: one backend evaluating an expression 1M times (median of 3).
sql "CREATE FUNCTION time_ms(q text) RETURNS float8 LANGUAGE plpgsql AS \$\$
  DECLARE t0 timestamptz := clock_timestamp();
  BEGIN EXECUTE q; RETURN extract(epoch FROM clock_timestamp() - t0) * 1000; END \$\$"
per_s() { # SQL expression: evaluations per second in one backend
  local q="SELECT count($1) FROM generate_series(1, 1000000) g" ms=()
  [ "$1" = take ] && q="SELECT count(*) FROM unid_take('sel', 1000000)"
  for _ in 1 2 3; do ms+=("$(sql "SELECT time_ms(\$q\$$q\$q\$)")"); done
  printf '%s\n' "${ms[@]}" | sort -g | sed -n 2p | awk '{ printf "%.0f\n", 1e9 / $1 }'
}
load() { uptime | sed 's/.*load average: //; s/,//g' | awk '{print $1}'; }
: >"$TSV"
row() { printf '%s\n' "$*" | tr ' ' '\t' | tee -a "$TSV"; }
echo "--- kind test clients value unit load1"
: >"$RUNS"
echo "# $(date -u '+%F %T') UTC, DUR=$DUR PAIRS=$PAIRS ROWS_BIG=$ROWS_BIG PAIRS_ONLY=$PAIRS_ONLY, $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //')" >>"$RUNS"
if [ "$PAIRS_ONLY" != 1 ]; then
for e in "unid_next=unid_next('sel')" "nextval=nextval('s')" "gen_random_uuid=gen_random_uuid()" \
  "uuidv7=uuidv7()" "series_only=g" "unid_take=take"; do
  row server "${e%%=*}" 1 "$(per_s "${e#*=}")" per_s "$(load)"
done
for c in 1 8; do
  for t in "${TABLES[@]}"; do row insert "$t" "$c" "$(bench "$WORK/ins_$t.sql" $c)" tps "$(load)"; done
  for s in sel_unid sel_nextval; do row select "$s" "$c" "$(bench "$WORK/$s.sql" $c)" tps "$(load)"; done
done
fi

grow() { # table rows: INSERT ... SELECT 1M rows at a time until the table has `rows`
  local t=$1 want=$2 have
  have=$(sql "SELECT count(*) FROM $1")
  while [ "$have" -lt "$want" ]; do
    local n=$(( want - have < 1000000 ? want - have : 1000000 ))
    sql "INSERT INTO $t (v) SELECT 1 FROM generate_series(1, $n)"
    have=$((have + n))
  done
}
SIZES=(1000000 "$ROWS_BIG")
[ "$PAIRS_ONLY" = 1 ] && { SIZES=("$ROWS_BIG"); TABLES=(t_unid t_identity); }
for size in "${SIZES[@]}"; do
  for t in "${TABLES[@]}"; do
    s0=$SECONDS
    grow "$t" "$size"
    sql "CHECKPOINT"
    row load_s "$t" "$size" "$((SECONDS - s0))" s "$(load)"
    row table_bytes "$t" "$size" "$(sql "SELECT pg_relation_size('$t')")" bytes "$(load)"
    row pkey_bytes "$t" "$size" "$(sql "SELECT pg_relation_size('${t}_pkey')")" bytes "$(load)"
    [ "$PAIRS_ONLY" = 1 ] || row insert_at "$t" "$size" "$(bench "$WORK/ins_$t.sql" 8)" tps "$(load)"
  done
done
# Paired rounds at ROWS_BIG: unid and IDENTITY in neighbouring runs, order swapped each round.
one_run() { # table: tps of one 8-client pgbench run after a checkpoint
  sql "CHECKPOINT" >/dev/null
  "$PGBIN/pgbench" -n -M prepared -h 127.0.0.1 -p "$PP" -U postgres -c 8 -j 2 -T "$DUR" \
    -f "$WORK/ins_$1.sql" postgres 2>&1 | awk '/^tps = / { printf "%.0f\n", $3 }'
}
ratios=()
for i in $(seq "$PAIRS"); do
  if [ $((i % 2)) = 1 ]; then u=$(one_run t_unid); d=$(one_run t_identity)
  else d=$(one_run t_identity); u=$(one_run t_unid); fi
  r=$(awk -v u="$u" -v d="$d" 'BEGIN { printf "%.3f", u / d }')
  ratios+=("$r")
  echo "pair $i: t_unid $u t_identity $d ratio $r load $(load)" >>"$RUNS"
  row pair_unid "$i" 8 "$u" tps "$(load)"
  row pair_identity "$i" 8 "$d" tps "$(load)"
done
if [ "$PAIRS" -gt 0 ]; then
  med=$(printf '%s\n' "${ratios[@]}" | sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }')
  wins=$(printf '%s\n' "${ratios[@]}" | awk '$1 >= 1 { n++ } END { print n + 0 }')
  row pair_ratio median 8 "$med" ratio "$(load)"
  echo "--- paired at $ROWS_BIG rows: unid/IDENTITY ratios ${ratios[*]}; median $med; unid >= IDENTITY in $wins of $PAIRS"
fi
if [ "$PAIRS_ONLY" = 1 ]; then
  echo "--- wrote $TSV and $RUNS"
else
  python3 scripts/plot-pg.py "$TSV" "$ROOT/results/postgres.svg"
  echo "--- wrote $TSV and results/postgres.svg"
fi
