#!/usr/bin/env bash
# The performance measurements of docs/performance.md, repeatable.
#
#   scripts/bench.sh [OUT_DIR]      (default docs/bench)
#
# Starts the dev proxy (scripts/dev-up.sh must have run once: token, keys,
# certs) from the dist build (fat LTO), runs xks-bench for each target of the
# performance issue and for a latency-versus-offered-load curve, and writes
# one JSON object per run to OUT_DIR/results.jsonl, then OUT_DIR/curve.png
# (when matplotlib is available), then the HSM-cost ratios
# (scripts/bench-ratios.sh → OUT_DIR/ratios.md) and, with SAMPLE_BIN set to a
# build of the AWS sample proxy, the comparison with it
# (scripts/bench-vs-sample.sh → OUT_DIR/vs-sample.md). Needs an otherwise
# idle machine.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/bench}
mkdir -p "$out"
results=$out/results.jsonl
: > "$results"

cargo build --profile dist --bins
export SOFTHSM2_CONF=$PWD/.dev/softhsm2.conf
[ -f .dev/softhsm2.conf ] || { echo "run scripts/dev-up.sh once first" >&2; exit 2; }

pkill -f 'xks-proxy serve --config config/dev.toml' 2>/dev/null || true
sleep 0.5
./target/dist/xks-proxy serve --config config/dev.toml 2>/tmp/xks-bench-proxy.log &
proxy=$!
trap 'kill $proxy 2>/dev/null || true' EXIT
for _ in $(seq 50); do
  grep -q listening /tmp/xks-bench-proxy.log && break
  sleep 0.1
done

bench() {
  local label=$1; shift
  echo "== $label: xks-bench $*" >&2
  ./target/dist/xks-bench --server-pid "$proxy" --json "$@" \
    | python3 -c 'import json,sys; r=json.load(sys.stdin); r["label"]=sys.argv[1]; print(json.dumps(r))' "$label" \
    | tee -a "$results" >&2
}

# Targets.
bench closed-8      --op encrypt --connections 8  --duration 20
bench closed-64     --op encrypt --connections 64 --duration 20
bench closed-64-h2  --op encrypt --connections 64 --duration 20 --http2
bench closed-64-nocdiv --op encrypt --connections 64 --duration 20 --cdiv false
bench open-1800     --op encrypt --connections 16 --rate 1800 --duration 60
# A new TLS connection per request: at a KMS-like modest rate (latency), and
# with 4 clients flat out (handshake throughput; the machine is saturated).
bench new-conn-full-300   --op encrypt --connections 8 --new-connection full   --rate 300 --duration 20
bench new-conn-resume-300 --op encrypt --connections 8 --new-connection resume --rate 300 --duration 20
bench new-conn-full   --op encrypt --connections 4 --new-connection full   --duration 10
bench new-conn-resume --op encrypt --connections 4 --new-connection resume --duration 10
bench idle-1000     --op encrypt --connections 4 --rate 200 --duration 5 --idle-connections 1000 --http2

# Latency versus offered load, open loop, up to saturation.
for rate in 500 1000 1800 3000 5000 8000 11000 14000 17000 20000; do
  bench "curve-$rate" --op encrypt --connections 64 --rate "$rate" --duration 10
done
bench mix-64 --op mix --connections 64 --duration 20

python3 scripts/bench-report.py "$results" "$out" || true

# The proxy's CPU per request over the HSM's own for the same work (encrypt
# with and without a CDIV, decrypt), and, when SAMPLE_BIN names a build of
# the AWS sample proxy, throughput against it; both start their own servers.
kill "$proxy" 2>/dev/null || true
wait "$proxy" 2>/dev/null || true
XKS_BENCH=target/dist/xks-bench scripts/bench-ratios.sh target/dist/xks-proxy | tee "$out/ratios.md"
if [ -n "${SAMPLE_BIN:-}" ]; then
  XKS_BENCH=target/dist/xks-bench scripts/bench-vs-sample.sh "$SAMPLE_BIN" target/dist/xks-proxy \
    | tee "$out/vs-sample.md"
fi
