#!/usr/bin/env bash
# Performance at a fixed request rate (open loop), where KMS keeps a proxy:
# its quota is 1,800 requests/s per key store. For each rate, this proxy and
# (with SAMPLE_BIN) the AWS sample, alternating, each alone on the machine:
# server CPU per request, context switches per request (in all and per
# thread name, from /proc/PID/task/*/status), p50 / p99 / p99.9 and errors.
#
#   [SAMPLE_BIN=…/xks-proxy] scripts/bench-rate.sh [PROXY_BIN] [ROUNDS] [RATES…]
#
# PROXY_BIN defaults to target/dist/xks-proxy, ROUNDS to 3, RATES to
# 200 1800 5000. The dev token of scripts/dev-up.sh (its proxy stopped);
# xks-bench sends Encrypts with a CDIV, as GenerateDataKey does, on 16
# connections for 20 s after 3 s of warm-up. Prints one JSON line per run,
# then the medians per rate and server (and the ratio proxy ÷ sample).
set -euo pipefail
cd "$(dirname "$0")/.."
proxy_bin=$(realpath "${1:-target/dist/xks-proxy}")
rounds=${2:-3}
shift $(( $# > 2 ? 2 : $# ))
rates=("$@")
[ ${#rates[@]} -gt 0 ] || rates=(200 1800 5000)
sample=${SAMPLE_BIN:+$(realpath "$SAMPLE_BIN")}
. scripts/lib.sh
bench_setup
out=$(mktemp -d)
trap 'stop_server; rm -rf "$out"' EXIT
bench_servers "$out" "$sample" "$proxy_bin"
servers=(proxy)
[ -z "$sample" ] || servers+=(sample)

for n in $(seq "$rounds"); do
  for rate in "${rates[@]}"; do
    for who in "${servers[@]}"; do
      start_server "$who"
      "$bench" --op encrypt --connections 16 --rate "$rate" --duration 20 --warmup 3 \
        --server-pid "$server" --json \
        | python3 -c 'import json,sys; r=json.load(sys.stdin); r.update(round=int(sys.argv[1]), server=sys.argv[2]); print(json.dumps(r))' "$n" "$who" \
        | tee -a "$out/results.jsonl"
      stop_server
    done
  done
done

python3 - "$out/results.jsonl" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
med = lambda xs: statistics.median(xs) if xs else float("nan")
print()
print("| rate | server | CPU µs/req | ctx switches/req | p50 ms | p99 ms | p99.9 ms | errors |")
print("|---|---|---|---|---|---|---|---|")
for rate in sorted({r["target_rate"] for r in runs}):
    cpu = {}
    for who in ("proxy", "sample"):
        rs = [r for r in runs if r["target_rate"] == rate and r["server"] == who]
        if not rs:
            continue
        cpu[who] = med([r["server_cpu_us_per_request"] or 0 for r in rs])
        cs = med([r["server_ctxt_switches_per_request"] or 0 for r in rs])
        lat = lambda k: med([r["latency_ms"][k] for r in rs])
        errors = sum(sum(r["errors"].values()) for r in rs)
        print(f"| {rate:.0f} | {who} | {cpu[who]:.1f} | {cs:.2f} | {lat('p50'):.3f} | {lat('p99'):.3f} | {lat('p99_9'):.3f} | {errors} |")
    if len(cpu) == 2:
        print(f"| {rate:.0f} | proxy ÷ sample | **{cpu['proxy'] / cpu['sample']:.2f}** | | | | | |")
print()
print("Context switches per request by thread (median over rounds):")
for rate in sorted({r["target_rate"] for r in runs}):
    for who in ("proxy", "sample"):
        rs = [r for r in runs if r["target_rate"] == rate and r["server"] == who]
        names = sorted({k for r in rs for k in (r.get("server_ctxt_switches_per_request_by_thread") or {})})
        parts = [f"{k} {med([(r.get('server_ctxt_switches_per_request_by_thread') or {}).get(k, 0) for r in rs]):.2f}" for k in names]
        if parts:
            print(f"  {rate:.0f} req/s, {who}: " + ", ".join(parts))
PY
