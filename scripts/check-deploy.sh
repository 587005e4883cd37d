#!/usr/bin/env bash
# Checks the deployment artefacts under deploy/ with their own tools, offline:
#
#   deploy/prometheus   promtool check config, check rules, test rules (unit
#                       tests: every alert fires on its case, stays quiet on
#                       the one next to it)
#   deploy/aws          cfn-lint (every template)
#   deploy/kubernetes   kubernetes-validate --strict (the Kubernetes schemas)
#   deploy/grafana      JSON, every panel has a PromQL target (the queries
#                       themselves run against a real Prometheus in
#                       tests/prometheus_dashboard.rs)
#   docs/operating.md   every `aws` command in its ```sh blocks parses with
#                       the AWS CLI's own argument model and validates against
#                       the service models (scripts/awscli-parse.py, offline)
#
# The PyPI tools are pinned and installed into a venv under
# ${XKS_CI_CACHE:-~/.cache/xks-ci} the first time (about a minute); promtool
# comes from the Debian package `prometheus`, installed when missing.
#
#   scripts/check-deploy.sh            run every check
#   scripts/check-deploy.sh --python   only make sure the venv exists and
#                                      print its python (tests/kms_commands.rs)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

PINS=(cfn-lint==1.58.0 kubernetes-validate==1.37.0 awscli==1.46.2)
CACHE=${XKS_CI_CACHE:-${HOME:-/tmp}/.cache/xks-ci}
VENV=$CACHE/venv

# Creates the venv, or re-creates it when the pins changed. Serialized with
# a lock: tests running in parallel may ask at the same time.
ensure_venv() {
  mkdir -p "$CACHE"
  exec 9>"$CACHE/lock"
  flock 9
  local want="${PINS[*]}"
  if [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/.xks-pins" 2>/dev/null)" = "$want" ]; then
    flock -u 9
    return 0
  fi
  if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    ensure_build_packages python3-venv
  fi
  echo "check-deploy: installing ${PINS[*]} into $VENV" >&2
  rm -rf "$VENV"
  python3 -m venv "$VENV" >&2
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "${PINS[@]}" >&2
  echo "$want" >"$VENV/.xks-pins"
  flock -u 9
}

if [ "${1:-}" = "--python" ]; then
  ensure_venv
  echo "$VENV/bin/python"
  exit 0
fi

command -v promtool >/dev/null || apt_install prometheus
ensure_venv

step() { echo "== $*" >&2; }

step "promtool: rules, their unit tests, the example scrape config"
promtool check rules deploy/prometheus/alerts.yaml
promtool test rules deploy/prometheus/alerts_test.yaml
promtool check config deploy/prometheus/prometheus.yml

step "cfn-lint: deploy/aws"
"$VENV/bin/cfn-lint" deploy/aws/*.yaml

step "kubernetes-validate: deploy/kubernetes"
"$VENV/bin/kubernetes-validate" --strict deploy/kubernetes/*.yaml

step "Grafana dashboard: deploy/grafana"
"$VENV/bin/python" - deploy/grafana/*.json <<'EOF'
import json, sys
for path in sys.argv[1:]:
    d = json.load(open(path))
    targets = 0
    for p in d["panels"]:
        if p["type"] == "row":
            continue
        exprs = [t.get("expr", "") for t in p.get("targets", [])]
        if not exprs or not all(exprs):
            sys.exit(f"{path}: panel '{p['title']}' has no PromQL target")
        targets += len(exprs)
    print(f"{path}: {len(d['panels'])} panels, {targets} queries")
EOF

step "AWS CLI commands in docs/operating.md (offline, awscli's argument model)"
# The ```sh blocks' `aws` commands, in order, continuation lines joined, run
# by bash with `aws` standing for scripts/awscli-parse.py. Variables set from
# one command's output (VAR=$(aws ...)) reach the next, as for an operator.
script=$(mktemp)
log=$(mktemp)
trap 'rm -f "$script" "$log"' EXIT
{
  echo 'set -euo pipefail'
  echo "aws() { AWSCLI_PARSE_LOG='$log' '$VENV/bin/python' scripts/awscli-parse.py \"\$@\"; }"
  awk '
    /^```sh$/ { inblock = 1; next }
    /^```/    { inblock = 0; next }
    inblock {
      line = line $0
      if (line ~ /\\$/) { sub(/\\$/, "", line); next }
      if (line ~ /^(export )?[A-Z_]+=\$\(aws / || line ~ /^aws /) print line
      line = ""
    }
  ' docs/operating.md
} >"$script"
bash "$script" >/dev/null
n=$(wc -l <"$log")
[ "$n" -gt 0 ] || { echo "check-deploy: no aws command found in docs/operating.md" >&2; exit 1; }
echo "docs/operating.md: $n aws commands parsed and validated" >&2

echo "check-deploy: all deployment artefacts check out" >&2
