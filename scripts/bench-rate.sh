#!/usr/bin/env bash
# Performance at a fixed request rate (open loop), where KMS keeps a proxy:
# its quota is 1,800 requests/s per key store. For each rate, this proxy and
# (with SAMPLE_BIN) the AWS sample, alternating, each alone on the machine:
# server CPU per request, context switches per request (in all and per
# thread name, from /proc/PID/task/*/status), p50 / p99 / p99.9 and errors.
#
#   [SAMPLE_BIN=…/xks-proxy] [BENCH_PNG=docs/bench/rate.png] \
#     scripts/bench-rate.sh [PROXY_BIN] [ROUNDS] [RATES…]
#
# PROXY_BIN defaults to target/dist/xks-proxy, ROUNDS to 3, RATES to
# 200 1800 5000. The dev token of scripts/dev-up.sh (its proxy stopped);
# xks-bench sends Encrypts with a CDIV, as GenerateDataKey does, on 16
# connections for 20 s after 3 s of warm-up. Prints one JSON line per run,
# then the medians per rate and server (and the ratio proxy ÷ sample). With
# BENCH_PNG, also the curve of CPU and context switches per request against
# the rate (gnuplot, installed when missing) and the runs beside it (.jsonl).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
# The curve: CPU per request (and context switches per request) against the
# rate, medians over rounds, each round's point behind, as a PNG (gnuplot).
# `plot_curve RESULTS.jsonl PNG` (also: scripts/bench-rate.sh --plot
# RESULTS.jsonl PNG, to redraw from the runs kept beside a PNG).
plot_curve() {
  local results=$1 png=$2 dir who name sep
  ensure_build_packages gnuplot-nox
  dir=$(mktemp -d)
  python3 - "$results" "$dir" <<'PY'
import json, statistics, sys, os
runs = [json.loads(l) for l in open(sys.argv[1])]
out = sys.argv[2]
for who in ("proxy", "sample"):
    rs = [r for r in runs if r["server"] == who]
    if not rs:
        continue
    with open(os.path.join(out, f"{who}.points"), "w") as f:
        for r in rs:
            f.write(f"{r['target_rate']} {r['server_cpu_us_per_request'] or 0} {r['server_ctxt_switches_per_request'] or 0}\n")
    with open(os.path.join(out, f"{who}.medians"), "w") as f:
        for rate in sorted({r["target_rate"] for r in rs}):
            xs = [r for r in rs if r["target_rate"] == rate]
            f.write(f"{rate} {statistics.median(r['server_cpu_us_per_request'] or 0 for r in xs)} "
                    f"{statistics.median(r['server_ctxt_switches_per_request'] or 0 for r in xs)}\n")
PY
  {
    echo "set terminal pngcairo size 1000,420 font ',10'"
    echo "set output '$png'"
    echo "set multiplot layout 1,2 title 'Encrypt with CDIV, 16 connections, open loop; medians of the rounds (grey: each round)'"
    echo "set logscale x; set xtics (200, 500, 1000, 1800, 5000); set grid; set key bottom left"
    echo "set xlabel 'requests/s (log)'; set yrange [0:*]"
    for col in 2 3; do
      if [ "$col" = 2 ]; then echo "set ylabel 'server CPU µs per request'"; else echo "set ylabel 'context switches per request'"; fi
      printf "plot "
      sep=""
      for who in proxy sample; do
        [ -f "$dir/$who.medians" ] || continue
        name=$([ "$who" = proxy ] && echo "this proxy" || echo "AWS sample")
        printf "%s'%s' u 1:%s w linespoints lw 2 pt 7 t '%s', '%s' u 1:%s w points pt 1 lc rgb 'gray' notitle" \
          "$sep" "$dir/$who.medians" "$col" "$name" "$dir/$who.points" "$col"
        sep=", "
      done
      echo
    done
    echo "unset multiplot"
  } >"$dir/curve.gp"
  gnuplot "$dir/curve.gp"
  rm -rf "$dir"
}

if [ "${1:-}" = --plot ]; then
  plot_curve "$2" "$3"
  exit 0
fi

proxy_bin=$(realpath "${1:-target/dist/xks-proxy}")
rounds=${2:-3}
shift $(( $# > 2 ? 2 : $# ))
rates=("$@")
[ ${#rates[@]} -gt 0 ] || rates=(200 1800 5000)
sample=${SAMPLE_BIN:+$(realpath "$SAMPLE_BIN")}
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

if [ -n "${BENCH_PNG:-}" ]; then
  cp "$out/results.jsonl" "${BENCH_PNG%.png}.jsonl"
  plot_curve "$out/results.jsonl" "$BENCH_PNG"
  echo "curve: $BENCH_PNG (runs: ${BENCH_PNG%.png}.jsonl)"
fi
