#!/usr/bin/env bash
# The proxy's CPU per request as a multiple of the HSM's own CPU for the same
# work, measured in one run on one machine (absolute figures do not travel
# between machines; this ratio mostly does).
#
#   scripts/bench-ratios.sh [PROXY_BIN] [ROUNDS]
#
# For each of encrypt without CDIV (one HSM operation), encrypt with CDIV
# (the encryption and its verification decrypt) and decrypt, alternating
# ROUNDS times (default 3) so that drift hits both sides alike:
#   - the proxy (PROXY_BIN, default target/dist/xks-proxy) serving
#     config/dev.toml, closed loop at 64 connections for 15 s, with its CPU
#     time per request read from /proc (`xks-bench --server-pid`);
#   - `xks-bench --raw-hsm` doing the same PKCS#11 calls on the same token and
#     key in a loop, one thread per session as the proxy's pool has, with its
#     own CPU time per operation (SoftHSM runs in-process, so that is the
#     HSM's cost).
# Prints one JSON line per run, then per operation the medians and the ratio
# proxy ÷ raw. The load generator shares the cores with the proxy, as in
# every figure of docs/performance.md; run it on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(realpath "${1:-target/dist/xks-proxy}")
rounds=${2:-3}
. scripts/lib.sh
bench_setup
out=$(mktemp -d)
proxy=
trap '[ -z "$proxy" ] || kill "$proxy" 2>/dev/null || true; rm -rf "$out"' EXIT

# label, proxy load, raw operation
cases=(
  "encrypt|--op encrypt --cdiv false|encrypt"
  "encrypt-cdiv|--op encrypt --cdiv true|encrypt-cdiv"
  "decrypt|--op decrypt|decrypt"
)

for n in $(seq "$rounds"); do
  for c in "${cases[@]}"; do
    IFS='|' read -r label load raw <<<"$c"
    "$bin" serve --config config/dev.toml 2>"$out/proxy.log" &
    proxy=$!
    wait_dev_ping || true
    # shellcheck disable=SC2086
    "$bench" $load --connections 64 --duration 15 --server-pid "$proxy" --json \
      | python3 -c 'import json,sys; r=json.load(sys.stdin); r["case"]=sys.argv[1]; r["side"]="proxy"; print(json.dumps(r))' "$label" \
      | tee -a "$out/results.jsonl"
    kill "$proxy"
    wait "$proxy" 2>/dev/null || true
    proxy=
    "$bench" --raw-hsm "$raw" --duration 15 --json \
      | python3 -c 'import json,sys; r=json.load(sys.stdin); r["case"]=sys.argv[1]; r["side"]="raw"; print(json.dumps(r))' "$label" \
      | tee -a "$out/results.jsonl"
  done
done

python3 - "$out/results.jsonl" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
print()
print("| operation | proxy req/s | proxy CPU µs/req | raw HSM ops/s | raw HSM CPU µs/op | proxy ÷ raw |")
print("|---|---|---|---|---|---|")
for case in ("encrypt", "encrypt-cdiv", "decrypt"):
    p = [r for r in runs if r["case"] == case and r["side"] == "proxy"]
    h = [r for r in runs if r["case"] == case and r["side"] == "raw"]
    pc = statistics.median(r["server_cpu_us_per_request"] for r in p)
    hc = statistics.median(r["cpu_us_per_op"] for r in h)
    pr = statistics.median(r["rps"] for r in p)
    hr = statistics.median(r["rps"] for r in h)
    print(f"| {case} | {pr:,.0f} | {pc:.1f} | {hr:,.0f} | {hc:.1f} | **{pc / hc:.2f}** |")
PY
