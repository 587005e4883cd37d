#!/usr/bin/env bash
# Two proxy binaries under the same load, in one run: A/B comparison.
#
#   scripts/bench-ab.sh BIN_A BIN_B [ROUNDS] [-- XKS_BENCH_ARGS…]
#
# Serves config/dev.toml (scripts/dev-up.sh must have run once; stop its
# proxy) with BIN_A, then BIN_B, alternating ROUNDS times (default 3) so that
# drift of the machine (thermal, other load) hits both alike; each round runs
# xks-bench (the dist build in target/dist) with the same arguments against
# each ($XKS_BENCH picks another load generator binary). Compare builds of the same profile (`dist` now; `release` before the
# dist profile existed, when it was the fat-LTO one).
# Prints one JSON line per run and, per binary, the median req/s, p50, p99
# and server CPU per request, and the ratios B/A. Default load: Encrypt,
# 64 connections, closed loop, 20 s.
#
# $CONFIG_A / $CONFIG_B serve another configuration for A / B (default
# config/dev.toml), e.g. the audit trail off and on with one binary:
#   { cat config/dev.toml; printf '\n[audit]\ndir = "audit"\n'; } > .dev/bench-audit.toml
#   CONFIG_B=.dev/bench-audit.toml scripts/bench-ab.sh target/dist/xks-proxy target/dist/xks-proxy
# (a copy in .dev/ keeps dev.toml's relative paths valid; the trail goes to
# .dev/audit).
set -euo pipefail
cd "$(dirname "$0")/.."
a=$(realpath "$1") b=$(realpath "$2")
shift 2
rounds=3
if [ $# -gt 0 ] && [ "$1" != "--" ]; then rounds=$1; shift; fi
[ "${1:-}" = "--" ] && shift
load=("$@")
[ ${#load[@]} -gt 0 ] || load=(--op encrypt --connections 64 --duration 20)
. scripts/lib.sh
bench_setup
out=$(mktemp -d)
proxy=
trap '[ -z "$proxy" ] || kill "$proxy" 2>/dev/null || true; rm -rf "$out"' EXIT

run() {
  local label=$1 bin=$2 n=$3
  local config=config/dev.toml
  if [ "$label" = A ]; then config=${CONFIG_A:-$config}; else config=${CONFIG_B:-$config}; fi
  "$bin" serve --config "$config" 2>"$out/proxy-$label-$n.log" &
  proxy=$!
  local ready=
  for _ in $(seq 100); do
    kill -0 "$proxy" 2>/dev/null || break
    curl -sf http://127.0.0.1:8080/ping >/dev/null 2>&1 && { ready=1; break; }
    sleep 0.1
  done
  if [ -z "$ready" ]; then
    echo "proxy $label ($bin) did not become ready:" >&2
    tail -5 "$out/proxy-$label-$n.log" >&2
    exit 1
  fi
  "$bench" --server-pid "$proxy" --json "${load[@]}" \
    | python3 -c 'import json,sys; r=json.load(sys.stdin); r["label"]=sys.argv[1]; print(json.dumps(r))' "$label" \
    | tee -a "$out/runs.jsonl"
  kill "$proxy" 2>/dev/null || true
  wait "$proxy" 2>/dev/null || true
  proxy=
}

for n in $(seq "$rounds"); do
  run A "$a" "$n"
  run B "$b" "$n"
done

python3 - "$out/runs.jsonl" "$a" "$b" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
def med(label, f):
    return statistics.median(f(r) for r in runs if r["label"] == label)
fields = [
    ("req/s", lambda r: r["rps"]),
    ("p50 ms", lambda r: r["latency_ms"]["p50"]),
    ("p99 ms", lambda r: r["latency_ms"]["p99"]),
    ("server CPU µs/req", lambda r: r["server_cpu_us_per_request"] or 0.0),
]
print(f"A = {sys.argv[2]}\nB = {sys.argv[3]}")
print(f"{'median of runs':<20}{'A':>12}{'B':>12}{'B/A':>8}")
for name, f in fields:
    x, y = med("A", f), med("B", f)
    print(f"{name:<20}{x:>12.3f}{y:>12.3f}{(y / x if x else float('nan')):>8.3f}")
errors = [r for r in runs if r["errors"]]
if errors:
    print("runs with errors:", [(r["label"], r["errors"]) for r in errors])
PY
