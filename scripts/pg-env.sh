# Sourced by scripts/test-pg.sh and scripts/bench-pg.sh (as root): a real `unid server`, an
# agent as user `unid` (group unid-clients, --group-readable rings) and a temporary
# PostgreSQL 15 cluster run by pg_ctl as `postgres` (a member of unid-clients) on 127.0.0.1,
# configured to take ids from that agent. Ports from 18700-18719.
#
# Needs: WORK (a 0755 temporary folder), UNID_BIN, PGBIN. Sets U, SU, SR, AP, AP2, PP, RING,
# RING_PRIV, UNID_UID, PSQL; `pids` collects what to kill; pg_env_cleanup stops everything.
# Functions: pg_env_server NAME:WIDTH:START..., pg_env_agent (re)starts the agent (AGENT: its
# pid), pg_env_postgres [conf lines], sql, pg_env_cleanup.

pids=()

# The agent as `unid` (group unid-clients), postgres a member of unid-clients, as the Debian
# package sets them up (packaging/sysusers.d/unid.conf).
getent group unid-clients >/dev/null || groupadd --system unid-clients
id -u unid >/dev/null 2>&1 \
  || useradd --system --user-group --home-dir /var/lib/unid --no-create-home --shell /usr/sbin/nologin unid
id -nG postgres | tr ' ' '\n' | grep -qx unid-clients || usermod -aG unid-clients postgres
UNID_UID=$(id -u unid)
install -m 755 "$UNID_BIN" "$WORK/unid"   # executable by the unid user wherever the build is
U=$WORK/unid

pg_env_free_port() { # a port in $1..18719 nothing listens on (TCP and UDP)
  python3 - "$1" <<'EOF'
import socket, sys
for p in range(int(sys.argv[1]), 18720):
    try:
        t = socket.socket(); u = socket.socket(type=socket.SOCK_DGRAM)
        t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        t.bind(("127.0.0.1", p)); u.bind(("127.0.0.1", p)); t.close(); u.close()
        print(p); break
    except OSError:
        pass
else:
    sys.exit("no free port in 18700-18719")
EOF
}
SU=$(pg_env_free_port 18700); SR=$(pg_env_free_port $((SU + 1)))
AP=$(pg_env_free_port $((SR + 1))); AP2=$(pg_env_free_port $((AP + 1)))
PP=$(pg_env_free_port $((AP2 + 1)))
RING=/dev/shm/unid-pg-$$          # made by the agent: owner unid, 0750 unid:unid-clients
RING_PRIV=/dev/shm/unid-pg-priv-$$
rm -rf "$RING" "$RING_PRIV"
AGENT_SEQUENCES=()

pg_env_server() { # NAME:WIDTH:START ...: a one-server cluster with these sequences
  "$U" server --id 1 --listen 127.0.0.1:$SU --raft 127.0.0.1:$SR --data-dir "$WORK/data" \
    --peer "1=127.0.0.1:$SR=127.0.0.1:$SU" --init >"$WORK/server.log" 2>&1 &
  pids+=($!)
  local s name width start ok
  for s in "$@"; do
    IFS=: read -r name width start <<<"$s"
    ok=0
    for _ in $(seq 150); do
      if "$U" sequence create "$name" --width "$width" --start "$start" --server 127.0.0.1:$SU \
        >/dev/null 2>&1; then ok=1; break; fi
      sleep 0.2
    done
    [ $ok = 1 ] || { echo "sequence create $name failed"; tail -20 "$WORK/server.log"; exit 1; }
    AGENT_SEQUENCES+=(--sequence "$name")
  done
}

pg_env_agent() { # [agent options]: starts the agent serving the server's sequences in $RING
  setpriv --reuid=unid --regid=unid-clients --init-groups "$U" agent --server 127.0.0.1:$SU \
    --name pg --ring-dir "$RING" --socket 127.0.0.1:$AP --group-readable \
    "${AGENT_SEQUENCES[@]}" "$@" >>"$WORK/agent.log" 2>&1 &
  AGENT=$!
  pids+=($AGENT)
  for _ in $(seq 200); do
    [ -e "$RING/${AGENT_SEQUENCES[1]}" ] && [ -S "$RING/.unid-socket" ] && return 0
    sleep 0.05
  done
  echo "the agent made no ring in $RING"; tail -20 "$WORK/agent.log"; exit 1
}

pg_env_postgres() { # [postgresql.conf lines]: initdb, start, CREATE EXTENSION unid
  mkdir -p "$WORK/pg" && chown postgres: "$WORK/pg"
  sudo -u postgres "$PGBIN/initdb" -D "$WORK/pg/data" --auth=trust -U postgres >/dev/null
  {
    echo "listen_addresses = '127.0.0.1'"
    echo "port = $PP"
    echo "unix_socket_directories = '$WORK/pg'"
    echo "unid.ring_dir = '$RING'"
    echo "unid.socket = '127.0.0.1:$AP'"
    echo "unid.agent_uid = $UNID_UID"
    printf '%s\n' "$@"
  } >>"$WORK/pg/data/postgresql.conf"
  sudo -u postgres "$PGBIN/pg_ctl" -D "$WORK/pg/data" -l "$WORK/pg/log" -w start >/dev/null
  PSQL=("$PGBIN/psql" -X -q -At -h 127.0.0.1 -p "$PP" -U postgres -d postgres)
  sql "CREATE EXTENSION unid"
}

sql() { "${PSQL[@]}" -v ON_ERROR_STOP=1 -c "$1"; }

pg_env_cleanup() {
  set +e
  [ -f "$WORK/pg/data/postmaster.pid" ] \
    && sudo -u postgres "$PGBIN/pg_ctl" -D "$WORK/pg/data" -m immediate stop >/dev/null 2>&1
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null; done
  wait 2>/dev/null
  rm -rf "$WORK" "$RING" "$RING_PRIV"
}
