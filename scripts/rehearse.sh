#!/usr/bin/env bash
# A multi-host rehearsal from the Debian package: three servers and two agent hosts, each in
# its own network namespace (and mount namespace, for a private /dev/shm), joined by a bridge
# in a namespace of its own, run from the package's binary and the package's configs:
#   1. the .deb: `DEB=path` reuses one; else `cargo deb -p unid-cli` builds it (a release
#      build: on a shared machine run this script under `flock /work/release.lock`, or build
#      first and pass DEB=). `PKGROOT=dir` uses an extracted (or installed: PKGROOT=/) tree.
#      The .deb is extracted with `dpkg-deb -x` into a scratch root; nothing is installed.
#   2. per host, /etc/unid/server.toml or agent.toml is copied from the package and only what
#      an operator changes per host is set (`set_key` below uncomments or replaces one key;
#      every change is in hosts/HOST/etc/unid/*.diff): servers `id`, `listen`, `raft`,
#      `peer`, `data_dir`, `secret_file`, and `init` on server 1; agents `server`,
#      `sequence`, `secret_file`, `name`. The secret is made as the runbook says.
#   3. the processes run as the units would: the units' ExecStart with `--config` pointed at
#      the host's copy, as user `unid` (group `unid-clients` for the agent) with no new
#      privileges and the units' UMask, when that user exists; else as root (it says so).
#      With CI=1 (or CI=true) as root and no `unid` user, it is made from the package's
#      sysusers.d file, as the postinst does. The ring folder is made from the package's
#      tmpfiles.d file inside each agent host's private /dev/shm.
#   4. waits for a leader (`unid status`), creates the sequence, starts a consumer on each
#      agent host (`unid next` in a loop, as an application user in group unid-clients),
#      then per round: kill -9 the leader, wait for a new one and its first grant, restart
#      the killed server from the same data dir, wait until it is back in the leader's term;
#      kill -9 one agent, restart it, wait for the first id on that host.
#   5. checks: no id twice across both hosts, each consumer's ids increasing, ids taken on
#      both hosts after every kill; prints a summary.
# SHORT=1: one round with short phases (CI; ~1 min after the build). Default: 3 rounds,
# longer phases (ROUNDS=, PHASE_S= override). KEEP=1 keeps the scratch folder (logs).
# Needs root, iproute2 (ip netns, bridge), util-linux (nsenter, unshare, setpriv), dpkg-deb.
# Cleans up every process, namespace and mount on exit, also on failure.
# Traffic stays inside the namespaces it makes (10.231.18.0/24 exists only there).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'rehearse: %s\n' "$*"; }
die() {
  printf 'rehearse: FAILED: %s\n' "$*" >&2
  exit 1
}
in_ci() { [ "${CI:-}" = 1 ] || [ "${CI:-}" = true ]; }
[ "$(id -u)" = 0 ] || die "needs root (network namespaces)"
for c in ip nsenter unshare setpriv dpkg-deb awk; do
  command -v "$c" >/dev/null || die "$c is missing"
done

if [ "${SHORT:-}" = 1 ]; then
  rounds=${ROUNDS:-1} phase_s=${PHASE_S:-3}
else
  rounds=${ROUNDS:-3} phase_s=${PHASE_S:-15}
fi
SEQ=orders
NET=10.231.18
SERVERS=(1 2 3)
AGENTS=(a1 a2)
BATCH=200 # ids per `unid next` of a consumer

P="unidr$$"                                # namespace names: $P-s1 ... $P-a2, $P-br
tmp=$(mktemp -d /tmp/unid-rehearse.XXXXXX) # scratch root; removed on exit unless KEEP=1
chmod 0755 "$tmp"                          # the unid user reaches its host's folder inside
mnt="$tmp/mnt"                             # the hosts' mount namespaces, bind-mounted here
made_ns=()
cleanup() {
  local rc=$? p
  set +e
  touch "$tmp/stop"
  for p in $(cat "$tmp"/pids/* 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
  wait 2>/dev/null
  for n in "${made_ns[@]}"; do ip netns del "$n" 2>/dev/null; done
  for f in "$mnt"/*; do [ -e "$f" ] && umount "$f" 2>/dev/null; done
  mountpoint -q "$mnt" && umount "$mnt"
  if [ "$rc" != 0 ]; then
    for f in "$tmp"/hosts/*/*.log "$tmp"/*.out; do
      [ -s "$f" ] && printf '\n--- last lines of %s\n' "${f#"$tmp"/}" >&2 && tail -n 15 "$f" >&2
    done
  fi
  if [ "${KEEP:-}" = 1 ]; then
    say "kept $tmp"
  else
    rm -rf "$tmp"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
mkdir -p "$tmp/pids" "$tmp/hosts" "$mnt"

# ---- 1. the package
pkg="$tmp/pkg"
if [ -n "${PKGROOT:-}" ]; then
  pkg=$PKGROOT
  say "1. using the package tree $pkg"
else
  deb=${DEB:-}
  if [ -z "$deb" ]; then
    say "1. cargo deb -p unid-cli (release build)"
    cargo deb --version >/dev/null 2>&1 || die "cargo-deb is missing: cargo install cargo-deb --locked"
    rm -f target/debian/unid_*.deb
    cargo deb -p unid-cli --locked --no-dbgsym --quiet >/dev/null
    deb=$(ls target/debian/unid_*.deb)
  fi
  [ -f "$deb" ] || die "no package at '$deb'"
  say "1. extracting $deb"
  mkdir "$pkg"
  dpkg-deb -x "$deb" "$pkg"
fi
BIN="$pkg/usr/bin/unid"
for f in "$BIN" "$pkg/etc/unid/server.toml" "$pkg/etc/unid/agent.toml" \
  "$pkg/usr/lib/systemd/system/unid-server.service" "$pkg/usr/lib/systemd/system/unid-agent.service"; do
  [ -e "$f" ] || die "the package lacks ${f#"$pkg"}"
done
say "$("$BIN" --version)"

# The units' ExecStart, as packaged; only --config's path differs here (each host's copy).
exec_start() { sed -n 's/^ExecStart=//p' "$pkg/usr/lib/systemd/system/unid-$1.service"; }
[ "$(exec_start server)" = "/usr/bin/unid server --config /etc/unid/server.toml" ] \
  || die "unid-server.service's ExecStart changed: $(exec_start server); update this script"
[ "$(exec_start agent)" = "/usr/bin/unid agent --config /etc/unid/agent.toml" ] \
  || die "unid-agent.service's ExecStart changed: $(exec_start agent); update this script"
unit_umask() { sed -n 's/^UMask=//p' "$pkg/usr/lib/systemd/system/unid-$1.service"; }

# ---- who runs what
if ! getent passwd unid >/dev/null && in_ci; then
  say "no unid user: making it from the package's sysusers.d file (as the postinst does)"
  systemd-sysusers "$pkg/usr/lib/sysusers.d/unid.conf" \
    || say "systemd-sysusers failed: running as root"
fi
if getent passwd unid >/dev/null && getent group unid-clients >/dev/null; then
  as_user=unid
  # User=/Group= of the units, NoNewPrivileges=yes.
  run_server=(setpriv --reuid=unid --regid=unid --init-groups --no-new-privs --)
  run_agent=(setpriv --reuid=unid --regid=unid-clients --init-groups --no-new-privs --)
  # An application: neither root nor unid, in group unid-clients, trusting unid's rings.
  run_app=(setpriv --reuid=nobody --regid=nogroup --groups=unid-clients -- env "UNID_AGENT_UID=$(id -u unid)")
else
  as_user=root
  run_server=(env)
  run_agent=(env)
  run_app=(env)
  say "NOTE: no unid user on this machine: servers, agents and consumers run as root" \
    "(CI=1 makes the user from the package's sysusers.d file)"
fi

# ---- 2. per-host configs: the packaged file, with only the per-host keys set
# set_key FILE KEY VALUE: the first line `KEY = ...` or `#KEY = ...` becomes `KEY = VALUE`
# (the rest of a commented example, e.g. peer's list lines, stays commented); appended when
# the file has no such line. VALUE is TOML.
set_key() {
  awk -v k="$2" -v v="$3" '
    !done && ($0 ~ "^#?" k " = " || $0 ~ "^#?" k " =$") { print k " = " v; done = 1; next }
    { print }
    END { if (!done) print k " = " v }' "$1" >"$1.new"
  mv "$1.new" "$1"
}
host_dir() { echo "$tmp/hosts/$1"; }
ns_of() { echo "$P-$1"; }
secret="$tmp/secret"
head -c 32 /dev/urandom | base64 >"$secret" # as the runbook makes it
peers='['
for n in "${SERVERS[@]}"; do peers+="\"$n=$NET.$n:7500=$NET.$n:7400\", "; done
peers="${peers%, }]"
server_list='['
for n in "${SERVERS[@]}"; do server_list+="\"$NET.$n:7400\", "; done
server_list="${server_list%, }]"

for n in "${SERVERS[@]}"; do
  h="s$n" d=$(host_dir "s$n")
  mkdir -p "$d/etc/unid" "$d/var/lib/unid"
  c="$d/etc/unid/server.toml"
  cp "$pkg/etc/unid/server.toml" "$c"
  set_key "$c" id "$n"
  set_key "$c" listen "\"$NET.$n:7400\""
  set_key "$c" raft "\"$NET.$n:7500\""
  set_key "$c" peer "$peers"
  set_key "$c" data_dir "\"$d/var/lib/unid\"" # /var/lib/unid of this host
  set_key "$c" secret_file "\"$d/etc/unid/secret\""
  [ "$n" = 1 ] && set_key "$c" init true # first start of the cluster (runbook step 3)
  install -m 0600 "$secret" "$d/etc/unid/secret"
  chmod 0700 "$d/var/lib/unid" # StateDirectoryMode=0700
  if [ "$as_user" = unid ]; then
    chown unid:unid "$d/etc/unid/secret" "$d/var/lib/unid"
  fi
  diff -u "$pkg/etc/unid/server.toml" "$c" >"$c.diff" || true
done
for a in "${AGENTS[@]}"; do
  d=$(host_dir "$a")
  mkdir -p "$d/etc/unid"
  c="$d/etc/unid/agent.toml"
  cp "$pkg/etc/unid/agent.toml" "$c"
  set_key "$c" server "$server_list"
  set_key "$c" sequence "[\"$SEQ\"]"
  set_key "$c" secret_file "\"$d/etc/unid/secret\""
  set_key "$c" name "\"app-host-$a\""
  install -m 0600 "$secret" "$d/etc/unid/secret"
  [ "$as_user" = unid ] && chown unid:unid "$d/etc/unid/secret"
  diff -u "$pkg/etc/unid/agent.toml" "$c" >"$c.diff" || true
done
say "2. configs: the packaged ones with per-host keys set (diffs in hosts/*/etc/unid/*.diff)"
sed -n '/^+[a-z]/p' "$(host_dir s1)/etc/unid/server.toml.diff" | sed 's/^/    s1: /'
sed -n '/^+[a-z]/p' "$(host_dir a1)/etc/unid/agent.toml.diff" | sed 's/^/    a1: /'

# ---- network: 5 hosts, each an eth0 into a bridge in its own namespace
br=$(ns_of br)
ip netns add "$br"
made_ns+=("$br")
ip -n "$br" link add br0 type bridge
ip -n "$br" link set br0 up
mount --bind "$mnt" "$mnt"
mount --make-private "$mnt"
host_ip() { case $1 in s*) echo "$NET.${1#s}" ;; a1) echo "$NET.11" ;; a2) echo "$NET.12" ;; esac; }
for h in s1 s2 s3 "${AGENTS[@]}"; do
  ns=$(ns_of "$h")
  ip netns add "$ns"
  made_ns+=("$ns")
  ip link add eth0 netns "$ns" type veth peer name "$h" netns "$br"
  ip -n "$br" link set "$h" master br0 up
  ip -n "$ns" addr add "$(host_ip "$h")/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" link set lo up
  # The host's own /dev/shm (its agent's rings live in the packaged /dev/shm/unid).
  touch "$mnt/$h"
  unshare --mount="$mnt/$h" --propagation private \
    mount -t tmpfs -o mode=1777,nosuid,nodev "tmpfs-$h" /dev/shm
done
# on HOST CMD...: CMD in that host's network and mount namespaces.
on() {
  local h=$1
  shift
  nsenter --net="/run/netns/$(ns_of "$h")" --mount="$mnt/$h" -- "$@"
}
for a in "${AGENTS[@]}"; do # the ring folder, from the package's tmpfiles.d (boot-time)
  if [ "$as_user" = unid ]; then
    on "$a" systemd-tmpfiles --create "$pkg/usr/lib/tmpfiles.d/unid.conf"
  else
    on "$a" install -d -m 0750 /dev/shm/unid
  fi
done
say "network: bridge in $br; servers $NET.1-3, agent hosts $NET.11-12 (namespaces $P-*)"

# ---- processes
# start_server N / start_agent A: the unit's ExecStart, in the background; pid in pids/.
start_server() {
  local d
  d=$(host_dir "s$1")
  (
    umask "$(unit_umask server)"
    ulimit -l 65536 2>/dev/null || true # LimitMEMLOCK=64M, where the machine allows it
    exec nsenter --net="/run/netns/$(ns_of "s$1")" --mount="$mnt/s$1" -- "${run_server[@]}" "$BIN" server --config "$d/etc/unid/server.toml"
  ) >>"$d/server.log" 2>&1 &
  echo $! >"$tmp/pids/s$1"
}
start_agent() {
  local d
  d=$(host_dir "$1")
  (
    umask "$(unit_umask agent)"
    exec nsenter --net="/run/netns/$(ns_of "$1")" --mount="$mnt/$1" -- "${run_agent[@]}" "$BIN" agent --config "$d/etc/unid/agent.toml"
  ) >>"$d/agent.log" 2>&1 &
  echo $! >"$tmp/pids/$1"
}
kill9() {
  kill -9 "$(cat "$tmp/pids/$1")"
  { wait "$(cat "$tmp/pids/$1")"; } 2>/dev/null || true
  rm -f "$tmp/pids/$1"
}
# Tools run on agent host a1 with its copy of the secret, every server listed.
tool() {
  local args=() n
  for n in "${SERVERS[@]}"; do args+=(--server "$NET.$n:7400"); done
  on a1 "$BIN" "$@" "${args[@]}" --secret-file "$(host_dir a1)/etc/unid/secret"
}
status() { tool status 2>&1 || true; }
leader_of() { sed -n 's/^leader: \([0-9][0-9]*\) .*/\1/p' <<<"$1"; }
term_of() { sed -n 's/^leader: .*term: \([0-9]*\).*/\1/p' <<<"$1"; }
now_ms() { echo $((${EPOCHREALTIME/./} / 1000)); }
# metric HOST NAME: the value of NAME on that server's metrics endpoint (packaged 127.0.0.1:9400).
metric() {
  on "$1" bash -c 'exec 3<>/dev/tcp/127.0.0.1/9400 && printf "GET /metrics HTTP/1.0\r\n\r\n" >&3 && timeout 2 cat <&3' \
    2>/dev/null | tr -d '\r' | awk -v m="$2" '$1 == m && !found { print $2; found = 1 }' || true
} # (awk reads to the end: leaving early would kill tr with SIGPIPE, failing under pipefail)
# wait_until SECONDS WHAT CMD...: polls CMD every 100 ms.
wait_until() {
  local limit_ms=$(($1 * 1000)) what=$2 t0
  shift 2
  t0=$(now_ms)
  until "$@"; do
    [ $(($(now_ms) - t0)) -lt "$limit_ms" ] || die "timed out after $limit_ms ms waiting for $what"
    sleep 0.1
  done
}
has_leader() {
  local s
  s=$(status)
  [ -n "$(leader_of "$s")" ]
}
# The leader is not $1 (the one just killed).
new_leader() {
  local s l
  s=$(status)
  l=$(leader_of "$s")
  [ -n "$l" ] && [ "$l" != "$1" ]
}
# Server $1 is back in the cluster led by $2: its own metrics show the leader's term (a
# restarted server starts from the term it had stored and takes the leader's on hearing from
# it), and `unid status` asked of it alone names that leader.
rejoined() {
  local t s
  t=$(metric "s$2" unid_server_term)
  [ -n "$t" ] && [ "$(metric "s$1" unid_server_term)" = "$t" ] || return 1
  s=$(on a1 "$BIN" status --server "$NET.$1:7400" --secret-file "$(host_dir a1)/etc/unid/secret" 2>&1) || return 1
  [ "$(leader_of "$s")" = "$2" ]
}

say "3. starting servers 1-3 and waiting for a leader (as $as_user)"
t0=$(now_ms)
for n in "${SERVERS[@]}"; do start_server "$n"; done
wait_until 60 "a leader" has_leader
st=$(status)
say "leader after $(($(now_ms) - t0)) ms: $(leader_of "$st") (term $(term_of "$st"))"
create_seq() { tool sequence create "$SEQ" --width 8 >"$tmp/create.out" 2>&1; }
wait_until 30 "sequence create (its output: create.out)" create_seq
for a in "${AGENTS[@]}"; do start_agent "$a"; done
ring_made() { on "$1" test -e "/dev/shm/unid/$SEQ"; }
for a in "${AGENTS[@]}"; do wait_until 30 "$a's ring" ring_made "$a"; done
say "agents on ${AGENTS[*]} keep rings of '$SEQ'"
for h in s1 s2 s3 "${AGENTS[@]}"; do
  who=$(ps -o user=,group= -p "$(cat "$tmp/pids/$h")" | awk '{ print $1 ":" $2 }')
  case $h:$as_user:$who in
    s*:unid:unid:unid | a*:unid:unid:unid-clients | *:root:root:root) ;;
    *) die "$h runs as $who" ;;
  esac
  printf '%s %s  ' "$h" "$who"
done
echo

# ---- consumers: `unid next` in a loop, one batch of $BATCH per call, each batch after a
# line `T START_MS END_MS` (a failed call: `E START_MS END_MS`, its message in ids-HOST.err)
consumer() {
  local a=$1 out="$tmp/ids-$1" t ids
  while [ ! -e "$tmp/stop" ]; do
    t=$(now_ms)
    if ids=$(on "$a" "${run_app[@]}" "$BIN" next "$SEQ" -n "$BATCH" --wait-ms 1000 2>>"$out.err"); then
      printf 'T %s %s\n%s\n' "$t" "$(now_ms)" "$ids" >>"$out"
    else
      printf 'E %s %s\n' "$t" "$(now_ms)" >>"$out"
    fi
    sleep 0.02
  done
}
for a in "${AGENTS[@]}"; do
  consumer "$a" &
  echo $! >"$tmp/pids/consumer-$a"
done
# first_id_after HOST MS [FROM_MS]: ms from MS until HOST's consumer had the ids of its
# first batch that ended after MS and started after FROM_MS (default MS).
first_id_after() {
  awk -v t="$2" -v from="${3:-$2}" '$1 == "T" && $3 >= t && $2 >= from { print $3 - t; exit }' "$tmp/ids-$1"
}
wait_ids_after() { [ -n "$(first_id_after "$@")" ]; }
# errors_between HOST FROM_MS TO_MS: failed `unid next` calls that started in that window.
errors_between() { awk -v a="$2" -v b="$3" '$1 == "E" && $2 >= a && $2 <= b { n++ } END { print n + 0 }' "$tmp/ids-$1"; }

summary=()
leader_before=$(leader_of "$(status)")
sleep "$phase_s"
for r in $(seq "$rounds"); do
  st=$(status)
  l=$(leader_of "$st")
  [ -n "$l" ] || die "round $r: no leader: $st"
  say "round $r: kill -9 the leader, server $l (term $(term_of "$st"))"
  t_kill=$(now_ms)
  kill9 "s$l"
  wait_until 30 "a new leader" new_leader "$l"
  t_leader=$(now_ms)
  st=$(status)
  nl=$(leader_of "$st")
  g0=$(metric "s$nl" unid_server_grants_total)
  granting() { [ "$(metric "s$nl" unid_server_granting)" = 1 ]; }
  wait_until 30 "the new leader to grant (its first ceiling raise committed)" granting
  t_granting=$(now_ms)
  got_grant() { [ "$(metric "s$nl" unid_server_grants_total)" != "${g0:-}" ]; }
  wait_until 30 "a grant from the new leader" got_grant
  t_grant=$(now_ms)
  for a in "${AGENTS[@]}"; do wait_until 30 "ids on $a after the kill" wait_ids_after "$a" "$t_kill"; done
  say "  new leader $nl (term $(term_of "$st")) after $((t_leader - t_kill)) ms, granting after $((t_granting - t_kill)) ms, its first grant to an agent after $((t_grant - t_kill)) ms; first id after the kill: a1 $(first_id_after a1 "$t_kill") ms, a2 $(first_id_after a2 "$t_kill") ms"
  summary+=("round $r: leader $l killed -> $nl: new leader seen $((t_leader - t_kill)) ms, granting $((t_granting - t_kill)) ms, first grant $((t_grant - t_kill)) ms, first id a1 $(first_id_after a1 "$t_kill") ms / a2 $(first_id_after a2 "$t_kill") ms")
  sleep "$phase_s"
  say "  restarting server $l from its data dir"
  t_restart=$(now_ms)
  start_server "$l"
  wait_until 60 "server $l to rejoin" rejoined "$l" "$nl"
  say "  server $l back in term $(metric "s$l" unid_server_term) under leader $nl after $(($(now_ms) - t_restart)) ms"
  summary+=("round $r: server $l rejoined $(($(now_ms) - t_restart)) ms after its restart")
  sleep "$phase_s"
  a=${AGENTS[$(((r - 1) % ${#AGENTS[@]}))]}
  say "  kill -9 the agent on $a, restart it"
  t_akill=$(now_ms)
  kill9 "$a"
  sleep 1 # down for a second, as a crash and systemd's RestartSec=1s would be
  t_astart=$(now_ms)
  start_agent "$a"
  wait_until 30 "ids on $a after its agent's restart" wait_ids_after "$a" "$t_astart" "$t_akill"
  fa=$(first_id_after "$a" "$t_astart" "$t_akill")
  say "  first id on $a $fa ms after its agent's restart; failed calls on $a meanwhile: $(errors_between "$a" "$t_akill" "$((t_astart + fa))")"
  summary+=("round $r: agent on $a killed, restarted 1 s later: first id $fa ms after the restart")
  sleep "$phase_s"
done
touch "$tmp/stop"
for a in "${AGENTS[@]}"; do
  wait "$(cat "$tmp/pids/consumer-$a")" 2>/dev/null || true
  rm -f "$tmp/pids/consumer-$a"
done
st=$(status)
leader_after=$(leader_of "$st")
say "final status:"
sed 's/^/    /' <<<"$st"

# ---- 4. checks
for a in "${AGENTS[@]}"; do
  grep -Ev '^[TE] ' "$tmp/ids-$a" >"$tmp/only-$a"
  bad=$(grep -Evc '^[0-9]+$' "$tmp/only-$a" || true)
  [ "$bad" = 0 ] || die "$a's consumer printed $bad lines that are not ids: $(grep -Ev '^[0-9]+$' "$tmp/only-$a" | head -3)"
  # Increasing, compared as decimal strings (no float rounding): longer is larger.
  awk 'NR > 1 && !(length($1) > length(p) || (length($1) == length(p) && $1 "" > p "")) {
         print "line " NR ": " $1 " after " p; bad = 1; exit }
       { p = $1 } END { exit bad }' "$tmp/only-$a" || die "$a's ids do not increase"
done
taken=$(cat "$tmp"/only-* | wc -l)
dups=$(cat "$tmp"/only-* | sort | uniq -d | wc -l)
fails=$(cat "$tmp"/ids-a* | grep -c '^E ' || true)
say "summary"
say "  ids taken: $taken (a1 $(wc -l <"$tmp/only-a1"), a2 $(wc -l <"$tmp/only-a2")), duplicates $dups, each consumer's ids increasing"
say "  failed 'unid next' calls: $fails (of $(cat "$tmp"/ids-a* | grep -c '^[TE] '))"
say "  leader before: $leader_before, after: $leader_after; run as $as_user"
for l in "${summary[@]}"; do say "  $l"; done
[ "$dups" = 0 ] || die "$dups ids were taken twice"
[ "$taken" -gt 0 ] || die "no ids taken"
say "ok"
