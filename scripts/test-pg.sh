#!/usr/bin/env bash
# The PostgreSQL extension (pg/): format, clippy and rustdoc of the crate, its pgrx tests in a
# PostgreSQL 15 that cargo-pgrx starts (as the postgres user: pgrx refuses initdb as root), then
# the extension installed into the system's PostgreSQL 15 and tested there against a real
# `unid server` and `unid agent` on 127.0.0.1 (ports 18700-18719):
#
# - the agent runs as user `unid`, group `unid-clients`, with --group-readable rings, and
#   PostgreSQL (a temporary cluster run by pg_ctl as `postgres`, a member of unid-clients, on
#   loopback) takes ids from the ring: `unid_source()` says `ring`;
# - errors with their SQLSTATE: unknown sequence 42704, ids above 2^63-1 22003 (numeric takes
#   them), a 2-byte sequence run to 2200H, a ring PostgreSQL may not read 42501, a failed insert
#   and a rolled-back one lose their ids and repeat none;
# - 8 connections insert concurrently into `id bigint PRIMARY KEY DEFAULT unid_next('orders')`;
#   the agent is killed mid-run (inserts fail with 08001 and the hint), started again (they
#   succeed again); every id unique, each connection's increasing.
#
# Needs root (users, groups, the system's extension folder), postgresql-15,
# postgresql-server-dev-15, libclang-dev, sudo and cargo-pgrx 0.18.1 (.ci/run installs them).
#
#   scripts/test-pg.sh            # UNID_BIN: the unid binary (default target/debug/unid)
# Env: PG_CONFIG (/usr/lib/postgresql/15/bin/pg_config), UNID_BIN, UNID_PG_SKIP_PGRX=1 to skip
# the fmt/clippy/doc/pgrx-test part.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
UNID_BIN=${UNID_BIN:-$ROOT/target/debug/unid}
if [ "$(id -u)" != 0 ]; then
  echo "SKIPPED: scripts/test-pg.sh needs root (the postgres and unid users, the system's extension folder)"
  exit 0
fi
[ -x "$UNID_BIN" ] || { echo "no unid binary at $UNID_BIN (cargo build -p unid-cli)"; exit 1; }
[ -x "$PG_CONFIG" ] || { echo "no $PG_CONFIG (apt-get install postgresql-15 postgresql-server-dev-15)"; exit 1; }
cargo pgrx --version 2>/dev/null | grep -q ' 0\.18\.1$' \
  || { echo "cargo-pgrx 0.18.1 missing: cargo install cargo-pgrx --version 0.18.1 --locked"; exit 1; }
PGBIN=$("$PG_CONFIG" --bindir)
t0=$SECONDS
lap() { echo "    ($((SECONDS - t0)) s)"; }

# cargo-pgrx's own config: which pg_config is pg15 (downloads nothing).
if ! grep -qs '^pg15 = ' "${PGRX_HOME:-$HOME/.pgrx}/config.toml"; then
  cargo pgrx init --pg15 "$PG_CONFIG"
fi

WORK=$(mktemp -d /tmp/unid-pg.XXXXXX)
chmod 755 "$WORK"
trap 'pg_env_cleanup 2>/dev/null || rm -rf "$WORK"' EXIT

if [ "${UNID_PG_SKIP_PGRX:-0}" != 1 ]; then
  echo "--- pg: fmt, clippy, doc (they need pgrx's bindings, so they run here)"
  (cd pg && cargo fmt --check)
  (cd pg && cargo clippy -q --all-targets --features pg_test -- -D warnings)
  (cd pg && RUSTDOCFLAGS="-D warnings" cargo doc -q --no-deps)
  lap
  echo "--- pg: pgrx tests (cargo pgrx test pg15 --runas postgres)"
  mkdir -p "$WORK/pgrx" && chown postgres: "$WORK/pgrx"
  # pgrx builds as root, then runs initdb and postgres as `postgres` in --pgdata.
  (cd pg && cargo pgrx test pg15 --runas postgres --pgdata "$WORK/pgrx/data" 2>&1 \
    | grep -E "^test |^test result|panicked|FAILED|error(\[|:)" )
  lap
fi

echo "--- pg: cargo pgrx install into the system's PostgreSQL ($("$PG_CONFIG" --version))"
(cd pg && cargo pgrx install --pg-config "$PG_CONFIG" 2>&1 | grep -E "Installing|Finished|error" | tail -3)
ls -l "$("$PG_CONFIG" --pkglibdir)/unid.so" "$("$PG_CONFIG" --sharedir)/extension/unid.control"
lap

echo "--- pg: unid server, agent (user unid, --group-readable), PostgreSQL 15 (pg_ctl as postgres)"
. scripts/pg-env.sh
pg_env_server orders:8:1 \
  big:8:9223372036854775800 `# 2^63-8: eight ids fit bigint, then 22003` \
  wide:16:1267650600228229401496703205376 `# 2^100` \
  short:2:65530 `# 65530..=65534, then exhausted`
pg_env_agent --refill-period-ms 200
# A second agent without --group-readable: its rings are the unid user's only (0700 folder).
setpriv --reuid=unid --regid=unid-clients --init-groups "$U" agent --server 127.0.0.1:$SU \
  --name pg-private --ring-dir "$RING_PRIV" --socket 127.0.0.1:$AP2 --sequence orders \
  >"$WORK/agent-private.log" 2>&1 &
pids+=($!)
ls -la "$RING"
pg_env_postgres "max_connections = 40"
# Runs $1; it must fail with SQLSTATE $2 and a message matching $3; prints the error.
sql_fails() {
  local out
  if out=$("${PSQL[@]}" -v VERBOSITY=verbose -c "$1" 2>&1); then
    echo "FAIL: $1 succeeded: $out"; exit 1
  fi
  echo "$out" | grep -q "ERROR:  $2: " || { echo "FAIL: $1: wanted SQLSTATE $2, got: $out"; exit 1; }
  echo "$out" | grep -qE "$3" || { echo "FAIL: $1: message not matching '$3': $out"; exit 1; }
  echo "$out" | grep -q "^HINT:  " || { echo "FAIL: $1: no hint: $out"; exit 1; }
  echo "  $2 as wanted: $(echo "$out" | head -1 | cut -c1-150)"
}
check() { # description, then a SQL query that must return t
  local got
  got=$(sql "$2")
  [ "$got" = t ] || { echo "FAIL: $1 (got '$got')"; exit 1; }
  echo "  ok: $1"
}
check "ids come from the ring (not the socket)" "SELECT unid_source('orders') = 'ring'"
check "unid_next increases within a session" \
  "SELECT a < b FROM (SELECT unid_next('orders') a) x, LATERAL (SELECT unid_next('orders') b) y"
check "unid_take gives 1000 distinct increasing ids" \
  "SELECT count(DISTINCT x) = 1000 AND bool_and(x > p) FROM (SELECT x, lag(x, 1, 0::bigint) OVER (ORDER BY o) p FROM unid_take('orders', 1000) WITH ORDINALITY t(x, o)) s"

echo "--- pg: errors"
sql_fails "SELECT unid_next('nosuch')" 42704 'unknown sequence "nosuch"'
sql_fails "SELECT unid_take('orders', 0)" 22023 'cannot take 0 ids'
# big: 2^63-8 .. 2^63-1 fit bigint; the next id is refused (and lost), numeric takes the rest.
out=$("${PSQL[@]}" -v VERBOSITY=verbose -c "SELECT unid_next('big')" -c "SELECT unid_next('big')" \
  -c "SELECT unid_next('big')" -c "SELECT unid_next('big')" -c "SELECT unid_next('big')" \
  -c "SELECT unid_next('big')" -c "SELECT unid_next('big')" -c "SELECT unid_next('big')" \
  -c "SELECT unid_next('big')" -c "SELECT unid_next_numeric('big')" 2>&1 || true)
echo "$out" | head -8 | paste -sd' ' | grep -qx "$(seq -s' ' 9223372036854775800 9223372036854775807)" \
  || { echo "FAIL: big: $out"; exit 1; }
echo "$out" | grep -q "ERROR:  22003: id 9223372036854775808 of sequence \"big\" does not fit bigint" \
  || { echo "FAIL: big, 9th: $out"; exit 1; }
echo "$out" | grep -qx 9223372036854775809 || { echo "FAIL: big, numeric: $out"; exit 1; }
echo "  22003 after 2^63-1, the refused id lost, numeric gives 2^63+1"
check "16-byte ids as numeric" \
  "SELECT bool_and(x >= 2::numeric ^ 100) AND count(DISTINCT x) = 3 FROM unid_take_numeric('wide', 3) x"
sql_fails "SELECT unid_next('wide')" 22003 'does not fit bigint'
# short: 65530..=65534, then exhausted (final).
short=(-c "SET unid.wait_ms = 300")
for _ in 1 2 3 4 5 6; do short+=(-c "SELECT unid_next('short')"); done
out=$("${PSQL[@]}" -v VERBOSITY=verbose "${short[@]}" 2>&1 || true)
echo "$out" | head -5 | paste -sd' ' | grep -qx "65530 65531 65532 65533 65534" || { echo "FAIL: short: $out"; exit 1; }
echo "$out" | grep -q "ERROR:  2200H: sequence \"short\" is exhausted" || { echo "FAIL: short: $out"; exit 1; }
echo "  2200H after 65534"
sql_fails "SET unid.ring_dir = '$RING_PRIV'; SET unid.socket = '127.0.0.1:$AP2'; SELECT unid_next('orders')" \
  42501 'permission|refusing'
# A failed insert and a rolled-back one lose their ids; the next insert gets a higher one.
sql "CREATE TABLE orders (id bigint PRIMARY KEY DEFAULT unid_next('orders'), conn int NOT NULL, n int NOT NULL, UNIQUE (conn, n))"
out=$("${PSQL[@]}" -c "INSERT INTO orders (conn, n) VALUES (0, 1) RETURNING id" \
  -c "INSERT INTO orders (conn, n) VALUES (NULL, 2) RETURNING id" \
  -c "BEGIN" -c "INSERT INTO orders (conn, n) VALUES (0, 3) RETURNING id" -c "ROLLBACK" \
  -c "INSERT INTO orders (conn, n) VALUES (0, 4) RETURNING id" \
  -c "SELECT max(x) FROM unid_take('orders', 5) x" 2>&1 || true)
read -r a c d <<<"$(echo "$out" | grep -E '^[0-9]+$' | head -3 | paste -sd' ')"
echo "$out" | grep -q 'null value in column "conn"' || { echo "FAIL: the NULL insert: $out"; exit 1; }
[ -n "$d" ] && [ "$a" -lt "$c" ] && [ "$c" -lt "$d" ] && [ "$((d - a))" -ge 3 ] \
  || { echo "FAIL: ids around a failed and a rolled-back insert: $out"; exit 1; }
check "the rolled-back id is not in the table, nothing repeated" \
  "SELECT count(*) = 2 AND NOT bool_or(id = $c) FROM orders"
echo "  ids $a, (failed insert: lost), $c (rolled back: lost), $d"
sql "TRUNCATE orders"

echo "--- pg: 8 connections insert concurrently; the agent is killed mid-run and started again"
rm -f "$WORK/stop"
worker() { # one psql session: INSERTs numbered 1, 2, ... until $WORK/stop exists
  local c=$1 i=0
  {
    echo '\set VERBOSITY verbose'
    echo '\set ECHO errors'
    while [ ! -e "$WORK/stop" ]; do
      i=$((i + 1))
      echo "INSERT INTO orders (conn, n) VALUES ($c, $i);"
    done
  } | "${PSQL[@]}" >"$WORK/conn-$c.out" 2>"$WORK/conn-$c.err"
}
wpids=()
for c in 1 2 3 4 5 6 7 8; do worker $c & wpids+=($!); done
rows() { sql "SELECT count(*) FROM orders"; }
wait_rows() { # at least $1 rows, or fail after $2 seconds
  for _ in $(seq $(($2 * 10))); do [ "$(rows)" -ge "$1" ] && return 0; sleep 0.1; done
  echo "FAIL: fewer than $1 rows after $2 s ($(rows))"; tail -5 "$WORK"/conn-*.err; exit 1
}
wait_rows 2000 60
before_kill=$(rows)
kill -9 "$AGENT"
wait "$AGENT" 2>/dev/null || true
echo "  agent killed with $before_kill rows"
for _ in $(seq 300); do
  [ "$(cat "$WORK"/conn-*.err | grep -c 'ERROR:  08001')" -ge 8 ] && break
  sleep 0.1
done
errors_down=$(cat "$WORK"/conn-*.err | grep -c 'ERROR:  08001' || true)
[ "$errors_down" -ge 8 ] || { echo "FAIL: no 08001 errors after the kill"; tail -5 "$WORK"/conn-*.err; exit 1; }
during=$(rows)
sleep 1
pg_env_agent --refill-period-ms 200
echo "  agent started again ($errors_down errors 08001 so far, $during rows)"
wait_rows $((during + 4000)) 60
touch "$WORK/stop"
for p in "${wpids[@]}"; do wait "$p" || true; done
grep -h '^ERROR:' "$WORK"/conn-*.err | cut -c1-140 | sort | uniq -c | sort -rn | head -5
bad=$(grep -h '^ERROR:' "$WORK"/conn-*.err | grep -vcE 'ERROR:  (08001|55000): ' || true)
errors_all=$(cat "$WORK"/conn-*.err | grep -c '^ERROR:  08001' || true)
[ "$bad" = 0 ] || { echo "FAIL: errors other than 08001 (agent down) / 55000 (agent starting)"; exit 1; }
# Counted, not `grep -q`: under pipefail, grep -q leaving early makes the first grep die of
# SIGPIPE once its output outgrows the pipe, and the pipeline fails (it did, in CI).
hints=$(grep -h -A1 'ERROR:  08001' "$WORK"/conn-*.err | grep -c '^HINT:  start the agent on this host' || true)
[ "$hints" = "$errors_all" ] \
  || { echo "FAIL: $hints hints for $errors_all 08001 errors:"; grep -h -A3 'ERROR:  08001' "$WORK"/conn-*.err | head -12; exit 1; }
check "all 8 connections inserted" "SELECT count(DISTINCT conn) = 8 FROM orders"
# The last failed statement of each connection (ECHO errors prints it as STATEMENT:), against
# its rows after.
for c in 1 2 3 4 5 6 7 8; do
  last_fail=$(grep -oE "^STATEMENT:  INSERT INTO orders \(conn, n\) VALUES \($c, [0-9]+\);" \
    "$WORK/conn-$c.err" | tail -1 | grep -oE '[0-9]+\);$' | tr -d ');')
  [ -n "$last_fail" ] || { echo "FAIL: connection $c saw no error"; exit 1; }
  after=$(sql "SELECT count(*) FROM orders WHERE conn = $c AND n > $last_fail")
  [ "$after" -gt 0 ] || { echo "FAIL: connection $c inserted nothing after its last error"; exit 1; }
done
echo "  each connection: errors while the agent was down, inserts after it was back"
check "every id unique" "SELECT count(*) = count(DISTINCT id) FROM orders"
check "each connection's ids increase in its insert order" \
  "SELECT count(*) = 0 FROM (SELECT id, lag(id) OVER (PARTITION BY conn ORDER BY n) p FROM orders) s WHERE p >= id"
echo "  $(sql "SELECT count(*) || ' rows, ' || count(DISTINCT conn) || ' connections, ids ' || min(id) || '..' || max(id) FROM orders")"
echo "--- pg: passed in $((SECONDS - t0)) s"
