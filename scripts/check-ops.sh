#!/usr/bin/env bash
# Checks the monitoring files under ops/:
#   - the alert rules load (`promtool check rules`) and pass their unit tests
#     (`promtool test rules ops/prometheus/unid-alerts.test.yml`);
#   - the Grafana dashboard is valid JSON, and every PromQL query in it parses (each one,
#     with the dashboard's variables filled in, becomes a recording rule that promtool checks);
#   - every rule's `runbook` annotation names a section of docs/operations.md.
# That the metric names are real is checked by `cargo test -p unid-cli --test ops_metrics`.
# Needs promtool (Debian package `prometheus`) and python3. With CI=1 (or CI=true) as root it
# installs `prometheus` when promtool is missing; elsewhere it says how and fails.
set -euo pipefail
cd "$(dirname "$0")/.."

in_ci() { [ "${CI:-}" = 1 ] || [ "${CI:-}" = true ]; }

if ! command -v promtool >/dev/null; then
  if in_ci && [ "$(id -u)" = 0 ]; then
    echo "check-ops: installing promtool (Debian package prometheus)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  else
    echo "check-ops: promtool is missing: apt-get install prometheus (or run with CI=1 as root)" >&2
    exit 1
  fi
fi
command -v python3 >/dev/null || { echo "check-ops: python3 is missing" >&2; exit 1; }

rules=ops/prometheus/unid-alerts.yml
dashboard=ops/grafana/unid-dashboard.json
promtool check rules "$rules"
promtool test rules ops/prometheus/unid-alerts.test.yml

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 - "$dashboard" "$tmp/dashboard-rules.yml" <<'PY'
import json, sys
dash = json.load(open(sys.argv[1]))
exprs = []
def walk(panels):
    for p in panels:
        for t in p.get("targets", []):
            exprs.append((p["title"], t["expr"]))
        walk(p.get("panels", []))
walk(dash["panels"])
if len(exprs) < 20:
    sys.exit(f"{sys.argv[1]}: only {len(exprs)} queries found")
subst = {"$__rate_interval": "5m", "$agent_job": ".*", "$job": ".*"}
with open(sys.argv[2], "w") as out:
    out.write("groups:\n  - name: dashboard\n    rules:\n")
    for i, (title, e) in enumerate(exprs):
        for k, v in subst.items():
            e = e.replace(k, v)
        if "$" in e:
            sys.exit(f"{sys.argv[1]}: panel {title!r}: unknown variable in {e!r}")
        out.write(f"      - record: dashboard:query{i}\n        expr: {json.dumps(e)}\n")
print(f"check-ops: {len(exprs)} dashboard queries")
PY
promtool check rules "$tmp/dashboard-rules.yml"

# Every `runbook` annotation names a heading of docs/operations.md (GitHub's anchors).
python3 - "$rules" docs/operations.md <<'PY'
import re, sys
anchors = set()
for line in open(sys.argv[2]):
    m = re.match(r"#+ (.*)", line)
    if m:
        a = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        anchors.add(a)
refs = re.findall(r'runbook: "operations\.md#([^"]+)"', open(sys.argv[1]).read())
if len(refs) < 20:
    sys.exit(f"only {len(refs)} runbook annotations in {sys.argv[1]}")
missing = sorted(set(refs) - anchors)
if missing:
    sys.exit(f"{sys.argv[1]}: runbook sections missing from {sys.argv[2]}: {missing}")
print(f"check-ops: {len(refs)} runbook links resolve")
PY
echo "check-ops: ok"
