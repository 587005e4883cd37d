#!/usr/bin/env bash
# This proxy against the AWS sample proxy (aws-samples/aws-kms-xks-proxy),
# same machine, same token, same key, same request, in one run.
#
#   scripts/bench-vs-sample.sh SAMPLE_BIN [PROXY_BIN] [ROUNDS]
#
# SAMPLE_BIN is the sample's `xks-proxy`, built from its repository
# (`cd xks-axum && cargo build --release`); it is not part of this
# repository. PROXY_BIN defaults to target/dist/xks-proxy. Both serve TLS on
# 127.0.0.1:8443 with the dev certificate, on the dev token of
# scripts/dev-up.sh (run it once, then stop its proxy), the sample with its
# own defaults (a pool of 30 sessions, INFO logging to a file, like this
# proxy's access log). Each round, alternating, both get:
#   - wrk, 1 thread, 64 connections, 15 s, replaying one signed Encrypt
#     (32-byte plaintext, 33 bytes of AAD, no CDIV): the proxy's own cost
#     dominates, signing is not repeated;
#   - xks-bench, 64 connections, 15 s, every request freshly signed (the
#     load generator then takes a large share of the two cores).
# Prints one line per run and the medians with the ratio proxy ÷ sample.
set -euo pipefail
cd "$(dirname "$0")/.."
sample=$(realpath "$1")
proxy_bin=$(realpath "${2:-target/dist/xks-proxy}")
rounds=${3:-3}
command -v wrk >/dev/null || { echo "needs wrk (Debian package wrk)" >&2; exit 2; }
. scripts/lib.sh
bench_setup
out=$(mktemp -d)
trap 'stop_server; rm -rf "$out"' EXIT

secret=$(cat .dev/secrets/dev-a.secret)
bench_servers "$out" "$sample" "$proxy_bin"

# One signed Encrypt for wrk to replay (signed anew each round: SigV4
# allows 5 minutes of clock skew).
wrk_script() {
  local url=https://localhost:8443/example/kms/xks/v1/keys/demo-key/encrypt
  local body='{"requestMetadata":{"awsPrincipalArn":"arn:aws:iam::123456789012:user/bench","kmsKeyArn":"arn:aws:kms:us-east-1:123456789012:key/bench","kmsOperation":"Encrypt","kmsRequestId":"4112f4d6-db54-4af4-ae30-c55a22a8dfae","kmsViaService":"ebs"},"plaintext":"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=","encryptionAlgorithm":"AES_GCM","additionalAuthenticatedData":"YmVuY2gtZW5jcnlwdGlvbi1jb250ZXh0LTMzLWJ5dGVzIQ=="}'
  curl -s -v -o /dev/null --cacert certs/ca.crt --http1.1 \
    --aws-sigv4 "aws:amz:us-east-1:kms-xks-proxy" --user "XKSPROXYDEVEXAMPLEKEYA:$secret" \
    -H 'Content-Type: application/json' -d "$body" "$url" 2>"$out/curl.txt"
  python3 - "$out/curl.txt" "$body" >"$out/replay.lua" <<'PY'
import sys, json
headers = {}
for line in open(sys.argv[1]):
    if line.startswith("> ") and ":" in line:
        name, value = line[2:].rstrip("\r\n").split(":", 1)
        if name.lower() in ("authorization", "x-amz-date", "content-type", "host"):
            headers[name] = value.strip()
print('wrk.method = "POST"')
print("wrk.body = " + json.dumps(sys.argv[2]))
for k, v in headers.items():
    print(f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}")
print('wrk.path = "/example/kms/xks/v1/keys/demo-key/encrypt"')
print('local bad = 0')
print('response = function(status, headers, body) if status ~= 200 then bad = bad + 1 end end')
print('done = function(summary, latency, requests) io.write(string.format("non200 %d\\n", summary.errors.status)) end')
PY
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# One wrk run against the server just started; OBJECTS (the token's object
# count, or "dev") labels it.
run_wrk() {
  wrk_script
  local t0 t1 rps reqs non200
  t0=$(cpu_ticks "$server")
  wrk -t1 -c64 -d15s -s "$out/replay.lua" https://localhost:8443 >"$out/wrk.txt" 2>&1
  t1=$(cpu_ticks "$server")
  rps=$(awk '/Requests\/sec/ {print $2}' "$out/wrk.txt")
  reqs=$(awk '/requests in/ {print $1}' "$out/wrk.txt")
  non200=$(awk '/^non200/ {print $2}' "$out/wrk.txt")
  echo "{\"round\":$n,\"server\":\"$who\",\"load\":\"wrk\",\"objects\":\"$1\",\"rps\":$rps,\"non200\":${non200:-0},\"server_cpu_us_per_request\":$(python3 -c "print(($t1-$t0)*10000/max($reqs,1))")}" | tee -a "$out/results.jsonl"
}

# A fresh token in $out/token-N with N objects: the benchmark's key, the
# proxy's health-check key, and unused AES keys. Same label and PIN as the
# dev token, so both servers' settings work unchanged with SOFTHSM2_CONF.
make_token() {
  local count=$1 dir=$out/token-$1 i
  mkdir -p "$dir/tokens"
  printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n' \
    "$dir/tokens" >"$dir/softhsm2.conf"
  export SOFTHSM2_CONF=$dir/softhsm2.conf
  softhsm2-util --init-token --free --label xks-dev --so-pin bench-so-pin --pin "$(cat .dev/hsm-pin)" >/dev/null
  "$proxy_bin" keys create -c config/dev.toml --label demo-key >/dev/null
  "$proxy_bin" keys create -c config/dev.toml --label xks-proxy-health-check >/dev/null
  for i in $(seq 3 "$count"); do
    "$proxy_bin" keys create -c config/dev.toml --label "unused-$i" >/dev/null
  done
}

if [ -n "${OBJECTS:-}" ]; then
  for count in $OBJECTS; do
    make_token "$count"
    for n in $(seq "$rounds"); do
      for who in proxy sample; do
        start_server "$who"
        run_wrk "$count"
        stop_server
      done
    done
  done
else
  for n in $(seq "$rounds"); do
    for who in proxy sample; do
      start_server "$who"
      run_wrk dev
      "$bench" --op encrypt --cdiv false --aad-bytes 33 --connections 64 --duration 15 --server-pid "$server" --json \
        | python3 -c 'import json,sys; r=json.load(sys.stdin); print(json.dumps({"round":int(sys.argv[1]),"server":sys.argv[2],"load":"xks-bench","objects":"dev","rps":r["requests_ok"]/r["duration_s"],"errors":r["errors"],"p99_ms":r["latency_ms"]["p99"],"server_cpu_us_per_request":r.get("server_cpu_us_per_request")}))' "$n" "$who" \
        | tee -a "$out/results.jsonl"
      stop_server
    done
  done
fi

python3 - "$out/results.jsonl" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
print()
print("| token objects | load | this proxy req/s | AWS sample req/s | ratio | this proxy CPU µs/req | sample CPU µs/req |")
print("|---|---|---|---|---|---|---|")
for objects in dict.fromkeys(r["objects"] for r in runs):
    for load in ("wrk", "xks-bench"):
        m = {}
        for who in ("proxy", "sample"):
            rs = [r for r in runs if r["load"] == load and r["server"] == who and r["objects"] == objects]
            if rs:
                m[who] = (statistics.median(r["rps"] for r in rs),
                          statistics.median(r["server_cpu_us_per_request"] or 0 for r in rs))
        if len(m) == 2:
            print(f"| {objects} | {load} | {m['proxy'][0]:,.0f} | {m['sample'][0]:,.0f} | **{m['proxy'][0] / m['sample'][0]:.2f}** | {m['proxy'][1]:.1f} | {m['sample'][1]:.1f} |")
PY
