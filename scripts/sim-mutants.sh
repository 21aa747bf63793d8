#!/usr/bin/env bash
# Deliberate breakages of the code the simulator runs (the server state machine, the consensus
# driver and the requester, the very code the engine and the agent ship), one at a time, each
# in a copy of the tree: the simulator's seeds must fail on every one, naming the invariant
# that fired. A breakage no seed catches fails this script, unless its entry names a unit test
# (`crate::test`) that fails on it: a breakage another layer makes harmless, which no history
# can show (results/sim-mutants.md says why for each).
#
#   scripts/sim-mutants.sh              # every mutant, seeds 0..200 (full profile)
#   SEEDS=0..100 scripts/sim-mutants.sh
#   scripts/sim-mutants.sh raise-on-proposal   # one mutant by name
# Env: SEEDS, CARGO_TARGET_DIR (default: target/mutants, apart from target/: cargo would take a
# mutant's build for the tree's own, the copy's crates having the same names and versions; the
# copy sits at one path, so each mutant rebuilds only the crates it touches).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
SEEDS=${SEEDS:-0..200}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target/mutants}
work=$(mktemp -d /tmp/unid-mutants.XXXXXX)
trap 'rm -rf "$work"' EXIT

# name # file # text to find (exactly once) # replacement # what it breaks [# package test]
mutants=(
  "ready-from-local-state#engine/src/driver.rs#self.consensus.ready_state().await#Ok::<_, unid_consensus::Error>(self.consensus.state())#a new leader builds its allocator from its local applied state, not the ready read: it may grant below a ceiling an earlier leader committed"
  "grant-below-committed-ceiling#machine/src/server/leadership.rs#ceiling: s.ceiling,#ceiling: s.ceiling.saturating_sub(1_000).max(s.start),#a new leader grants from below its committed ceiling"
  "raise-on-proposal#machine/src/server/raises.rs#Some(raise) => self.actions.push_back(Action::Raise { term, raise }),#Some(raise) => { let _ = alloc.on_raise_committed(&raise.sequence, raise.ceiling); self.actions.push_back(Action::Raise { term, raise }) }#a grant above the committed ceiling: raises count as committed when proposed"
  "raise-of-an-earlier-term#machine/src/server/raises.rs#if self.phase != Phase::Leading || self.term != term {#if self.phase != Phase::Leading {#a raise result from an earlier term is applied to this term's allocator#unid-machine a_leader_grants_only_between_the_ceiling_it_read_and_the_one_it_committed"
  "redirect-raises-epoch#core/src/requester.rs#if !matches!(response.reply, Reply::Redirect { .. }) {#if true {#a redirect raises the requester's epoch#unid-core a_redirect_from_a_higher_term_does_not_make_the_leader_stale"
)

want=${1:-}
failed=0
summary=()
for m in "${mutants[@]}"; do
  IFS='#' read -r name file find replace what unit <<<"$m"
  [[ -z $want || $want == "$name" ]] || continue
  rm -rf "$work/tree"
  mkdir -p "$work/tree"
  (cd "$root" && git ls-files -z | xargs -0 -I{} cp --parents {} "$work/tree/")
  # Uncommitted edits of tracked files are included (cp reads the working tree).
  python3 - "$work/tree/$file" "$find" "$replace" <<'EOF'
import sys
path, find, replace = sys.argv[1], sys.argv[2], sys.argv[3]
s = open(path).read()
n = s.count(find)
if n != 1:
    sys.exit(f"sim-mutants: {path}: the text to break occurs {n} times, not once: {find!r}")
open(path, "w").write(s.replace(find, replace))
EOF
  echo "=== mutant $name: $what"
  if ! (cd "$work/tree" && cargo build -q --release -p unid-sim --bin unid-sim 2>"$work/build.log"); then
    tail -20 "$work/build.log"
    echo "sim-mutants: FAILED: mutant $name does not build" >&2
    failed=1
    continue
  fi
  out="$work/$name.log"
  set +e
  "$CARGO_TARGET_DIR/release/unid-sim" --seeds "$SEEDS" --quiet >"$out" 2>&1
  rc=$?
  set -e
  # unid-sim prints "seed N: FAILED: INVARIANT violated at ..." per failing seed.
  caught=$(grep -E '^seed [0-9]+: FAILED' "$out" | head -3 || true)
  if [[ $rc -ne 0 && -n $caught ]]; then
    invariants=$(grep -E '^seed [0-9]+: FAILED' "$out" | sed -E 's/^seed [0-9]+: FAILED: ([a-z_]+).*/\1/' | sort | uniq -c | tr -s ' ' | paste -sd, -)
    n=$(grep -cE '^seed [0-9]+: FAILED' "$out")
    echo "caught on $n of seeds $SEEDS, invariants: $invariants"
    echo "$caught"
    summary+=("$name: caught ($n seeds; $invariants)")
  elif [[ -n $unit ]] && ! (cd "$work/tree" && cargo test -q -p ${unit% *} --lib -- "${unit#* }" >"$work/unit.log" 2>&1); then
    # The unit test ran and failed on the breakage.
    grep -E "panicked|FAILED" "$work/unit.log" | head -2
    echo "not caught on seeds $SEEDS; caught by the unit test ${unit#* } (${unit% *})"
    summary+=("$name: seeds pass (harmless in histories, see results/sim-mutants.md); unit test ${unit#* } fails on it")
  else
    tail -5 "$out"
    echo "sim-mutants: mutant $name SURVIVED seeds $SEEDS (exit $rc)${unit:+ and the unit test ${unit#* }}" >&2
    summary+=("$name: SURVIVED")
    failed=1
  fi
done
echo
echo "=== sim-mutants summary (seeds $SEEDS)"
printf '%s\n' "${summary[@]}"
exit $failed
