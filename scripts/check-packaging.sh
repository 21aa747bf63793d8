#!/usr/bin/env bash
# Builds and checks the Debian package `unid` (cargo-deb; metadata in cli/Cargo.toml, files
# in packaging/ and ops/):
#   1. `cargo deb -p unid-cli` builds target/debian/unid_*.deb (a release build);
#   2. the package holds the binary, both units, sysusers.d, tmpfiles.d and the conffiles;
#   3. `systemd-analyze verify` passes on the units as packaged (extracted into a scratch
#      root with the host's system units), with no warning, and `systemd-analyze security`
#      rates both at most 4.0 ("OK");
#   4. the packaged binary runs: `unid --version`;
#   5. only with CI=1 (or CI=true) as root: `dpkg -i`, then the unid user and groups, the
#      ring folder /dev/shm/unid (0750 unid:unid-clients), a server and an agent started as
#      the packaged units would (user unid, packaged configs, ports 18900-18909) and ids
#      taken by an unprivileged user in group unid-clients; then `dpkg --purge`.
# Needs cargo-deb (`cargo install cargo-deb --locked`) and systemd-analyze (Debian package
# `systemd`). With CI=1 as root it installs `systemd` when missing; elsewhere it fails and
# says what to install. It never installs anything on a developer machine.
set -euo pipefail
cd "$(dirname "$0")/.."

in_ci() { [ "${CI:-}" = 1 ] || [ "${CI:-}" = true ]; }
say() { printf 'check-packaging: %s\n' "$*"; }
die() { printf 'check-packaging: FAILED: %s\n' "$*" >&2; exit 1; }

if ! command -v systemd-analyze >/dev/null; then
  if in_ci && [ "$(id -u)" = 0 ]; then
    say "installing systemd (for systemd-analyze, systemd-sysusers, systemd-tmpfiles)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd >/dev/null
  else
    die "systemd-analyze is missing: apt-get install systemd (or run with CI=1 as root)"
  fi
fi
cargo deb --version >/dev/null 2>&1 \
  || die "cargo-deb is missing: cargo install cargo-deb --locked (.ci/run does)"

tmp=$(mktemp -d)
installed=""
cleanup() {
  local pids
  pids=$(cat "$tmp"/*.pid 2>/dev/null || true)
  for p in $pids; do kill "$p" 2>/dev/null || true; done
  if [ -n "$installed" ]; then
    dpkg --purge unid >/dev/null 2>&1 || echo "check-packaging: could not purge unid" >&2
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT

say "1. cargo deb -p unid-cli"
rm -f target/debian/unid_*.deb
cargo deb -p unid-cli --locked --no-dbgsym --quiet >/dev/null
deb=$(ls target/debian/unid_*.deb)
say "built $deb"

say "2. contents"
dpkg-deb --contents "$deb" > "$tmp/contents"
for f in ./usr/bin/unid ./usr/lib/systemd/system/unid-server.service \
  ./usr/lib/systemd/system/unid-agent.service ./usr/lib/sysusers.d/unid.conf \
  ./usr/lib/tmpfiles.d/unid.conf ./etc/unid/server.toml ./etc/unid/agent.toml \
  ./usr/share/doc/unid/operations.md ./usr/share/unid/ops/unid-alerts.yml \
  ./usr/share/unid/ops/unid-dashboard.json; do
  grep -q " $f\$" "$tmp/contents" || die "$deb lacks $f"
done
mkdir "$tmp/ctrl"
dpkg-deb --control "$deb" "$tmp/ctrl"
for f in /etc/unid/server.toml /etc/unid/agent.toml; do
  grep -qx "$f" "$tmp/ctrl/conffiles" || die "$f is not a conffile"
done
for s in postinst prerm postrm; do
  [ -x "$tmp/ctrl/$s" ] || die "no $s maintainer script"
done

say "3. systemd-analyze verify and security on the packaged units"
root="$tmp/root"
mkdir -p "$root/usr/lib/systemd/system" "$root/etc/systemd/system"
cp -a /lib/systemd/system/. "$root/usr/lib/systemd/system/"
dpkg-deb --extract "$deb" "$root"
for unit in unid-server.service unid-agent.service; do
  if ! systemd-analyze verify --root="$root" "$unit" > "$tmp/verify" 2>&1; then
    cat "$tmp/verify" >&2
    die "systemd-analyze verify $unit"
  fi
  if [ -s "$tmp/verify" ]; then
    cat "$tmp/verify" >&2
    die "systemd-analyze verify $unit warned"
  fi
  # --threshold is on a 0-100 scale: 40 = exposure 4.0.
  systemd-analyze security --offline=true --root="$root" --threshold=40 "$unit" > "$tmp/security" 2>&1 \
    || { tail -n 30 "$tmp/security" >&2; die "$unit is exposed more than 4.0"; }
  say "$unit: $(grep -o 'Overall exposure level.*' "$tmp/security")"
done

say "4. the packaged binary runs"
version=$("$root/usr/bin/unid" --version)
want="unid $(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)"
[ "$version" = "$want" ] || die "unid --version said '$version', expected '$want'"
say "$version"

if ! in_ci || [ "$(id -u)" != 0 ]; then
  say "5. SKIPPED: dpkg -i runs only with CI=1 as root (it adds a user and files to this machine)"
  say "ok"
  exit 0
fi

# Whether 127.0.0.1:PORT/metrics has the line LINE (no curl needed).
metrics_have() {
  local body
  body=$({ exec 3<>"/dev/tcp/127.0.0.1/$1" && printf 'GET /metrics HTTP/1.0\r\n\r\n' >&3 && cat <&3; } 2>/dev/null) \
    || return 1
  printf '%s\n' "$body" | tr -d '\r' | grep -qx "$2"
}

# Step 5's checks, run inside a private mount namespace with its own /dev/shm (see below).
installed_checks() {
  mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
  dpkg -i "$deb" >/dev/null
  [ "$(unid --version)" = "$want" ] || die "installed unid --version: $(unid --version)"
  getent passwd unid >/dev/null || die "no unid user"
  getent group unid-clients >/dev/null || die "no unid-clients group"
  [ "$(stat -c '%a %U %G' /dev/shm/unid)" = "750 unid unid-clients" ] \
    || die "/dev/shm/unid is $(stat -c '%a %U %G' /dev/shm/unid 2>&1)"

  chmod 0755 "$tmp" # the unid user must reach its data dir inside (logs only besides)
  data="$tmp/state"
  install -d -o unid -g unid -m 0700 "$data"
  # exec: the background job's pid ($!) is the process itself, so cleanup can stop it.
  as_unid() { exec setpriv --reuid=unid --regid="$1" --init-groups -- "${@:2}"; }
  as_unid unid unid server --config /etc/unid/server.toml --id 1 --init --data-dir "$data" \
    --listen 127.0.0.1:18900 --raft 127.0.0.1:18901 --metrics 127.0.0.1:18902 \
    > "$tmp/server.log" 2>&1 &
  echo $! > "$tmp/server.pid"
  for _ in $(seq 100); do
    metrics_have 18902 'unid_server_granting 1' && break
    sleep 0.1
  done
  metrics_have 18902 'unid_server_granting 1' \
    || { cat "$tmp/server.log" >&2; die "the packaged server never granted"; }
  unid sequence create pkgcheck --width 8 --server 127.0.0.1:18900 >/dev/null
  as_unid unid-clients unid agent --config /etc/unid/agent.toml --server 127.0.0.1:18900 --sequence pkgcheck \
    --socket 127.0.0.1:18903 > "$tmp/agent.log" 2>&1 &
  echo $! > "$tmp/agent.pid"
  for _ in $(seq 100); do [ -e /dev/shm/unid/pkgcheck ] && break; sleep 0.1; done
  [ -e /dev/shm/unid/pkgcheck ] || { cat "$tmp/agent.log" >&2; die "the agent made no ring"; }
  [ "$(stat -c '%a %U %G' /dev/shm/unid/pkgcheck)" = "660 unid unid-clients" ] \
    || die "the ring is $(stat -c '%a %U %G' /dev/shm/unid/pkgcheck)"
  # An application: not root, not unid, in group unid-clients, trusting the unid user's rings.
  ids=$(UNID_AGENT_UID=$(id -u unid) setpriv --reuid=nobody --regid=nogroup --groups=unid-clients -- \
    unid next pkgcheck -n 3 --socket 127.0.0.1:1 2>&1) || true
  [ "$(printf '%s\n' "$ids" | grep -Ecx '[0-9]+')" = 3 ] && [ "$(printf '%s\n' "$ids" | wc -l)" = 3 ] \
    || die "an unid-clients user got no ids from the ring: $ids"
  say "ids from the ring as nobody:unid-clients: $(echo $ids)"
  # Without the group the ring is refused (the socket is the fallback; pointed nowhere here).
  if setpriv --reuid=nobody --regid=nogroup --clear-groups -- env UNID_AGENT_UID="$(id -u unid)" \
    unid next pkgcheck -n 1 --socket 127.0.0.1:1 --wait-ms 200 >/dev/null 2>&1; then
    die "a user outside unid-clients took ids from the ring"
  fi
  kill "$(cat "$tmp/agent.pid")" "$(cat "$tmp/server.pid")"
}

say "5. dpkg -i, then a server, an agent and a consumer as the units would run them"
dpkg --purge unid >/dev/null 2>&1 || true
installed=1
# dpkg -i and the server, agent and consumer run in a mount namespace with a private
# /dev/shm, so that the package's /dev/shm/unid (owned by unid; the postinst runs
# systemd-tmpfiles) never replaces a ring folder of this machine.
export -f installed_checks say die metrics_have
export tmp want deb
unshare --mount --propagation private -- bash -euo pipefail -c installed_checks
say "ok"
