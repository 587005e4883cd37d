#!/usr/bin/env bash
# What one request costs the proxy beyond CPU time: allocations, system
# calls and thread wake-ups, counted (not timed) over a fixed open-loop load.
#
#   scripts/per-request.sh [PROXY_BIN] [-- XKS_BENCH_ARGS…]
#
# Serves config/dev.toml (scripts/dev-up.sh must have run once; stop its
# proxy) with PROXY_BIN (default target/dist/xks-proxy), sends 400 req/s for
# 10 s with xks-bench (default: Encrypt without CDIV, 8 connections), and
# counts during that time, with perf uprobes and `strace -c`:
#   - allocations: calls of jemalloc's allocation functions (the proxy's own
#     Rust code) and of glibc's malloc family (the PKCS#11 module, OpenSSL);
#   - system calls by name, and futex calls (thread wake-ups and waits).
# Prints each count divided by the number of requests answered. Needs root
# (uprobes, ptrace). Counting slows the proxy; the load is well below
# capacity so every request is answered.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(realpath "${1:-target/dist/xks-proxy}")
[ $# -gt 0 ] && shift
[ "${1:-}" = "--" ] && shift
load=("$@")
[ ${#load[@]} -gt 0 ] || load=(--op encrypt --cdiv false --connections 8)
bench=${XKS_BENCH:-target/dist/xks-bench}
[ -x "$bench" ] || { echo "build $bench first (cargo build --profile dist --bins)" >&2; exit 2; }
export SOFTHSM2_CONF=$PWD/.dev/softhsm2.conf
libc=$(ldconfig -p | awk '/libc.so.6 .*x86-64/ {print $NF; exit}')
out=$(mktemp -d)
proxy=
cleanup() {
  [ -z "$proxy" ] || kill "$proxy" 2>/dev/null || true
  perf probe -q -d 'probe_xks:*' 2>/dev/null || true
  rm -rf "$out"
}
trap cleanup EXIT

perf probe -q -d 'probe_xks:*' 2>/dev/null || true
events=()
for f in _rjem_malloc _rjem_mallocx _rjem_calloc _rjem_rallocx _rjem_realloc; do
  perf probe -q -x "$bin" --add "probe_xks:$f=$f" && events+=(-e "probe_xks:$f")
done
for f in malloc calloc realloc; do
  perf probe -q -x "$libc" --add "probe_xks:libc_$f=$f" && events+=(-e "probe_xks:libc_$f")
done

"$bin" serve --config config/dev.toml 2>"$out/proxy.log" &
proxy=$!
. scripts/lib.sh
wait_dev_ping || true
# Warm up (key cache, sessions, TLS), then count.
"$bench" "${load[@]}" --rate 400 --duration 3 --warmup 0 >/dev/null
perf stat -x, "${events[@]}" -p "$proxy" -o "$out/perf.csv" -- sleep 12 &
perfpid=$!
strace -f -c -p "$proxy" -o "$out/strace.txt" &
stracepid=$!
sleep 1
"$bench" "${load[@]}" --rate 400 --duration 10 --warmup 0 --json >"$out/bench.json"
sleep 1
kill -INT "$stracepid" 2>/dev/null || true
wait "$perfpid" 2>/dev/null || true
wait "$stracepid" 2>/dev/null || true

python3 - "$out" <<'PY'
import json, sys, os
d = sys.argv[1]
b = json.load(open(os.path.join(d, "bench.json")))
n = b["requests_ok"] + sum(b["errors"].values())
print(f"requests: {n} ({b['op']}, {b['http']}, errors {b['errors']})")
rust = glibc = 0
for line in open(os.path.join(d, "perf.csv")):
    parts = line.strip().split(",")
    if len(parts) < 3 or not parts[0].replace(".", "").isdigit():
        continue
    count, event = float(parts[0]), parts[2]
    if "libc_" in event:
        glibc += count
    else:
        rust += count
    print(f"  {event.split(':')[-1]:<16} {count / n:8.2f} per request")
print(f"allocations per request: {rust / n:.1f} by the proxy (jemalloc), {glibc / n:.1f} by C libraries (glibc)")
print("system calls per request:")
total = 0
for line in open(os.path.join(d, "strace.txt")):
    f = line.split()
    if len(f) >= 5 and f[0][0].isdigit() and f[-1] != "total":
        calls = int(f[3])
        total += calls
        if calls / n >= 0.05:
            print(f"  {f[-1]:<16} {calls / n:8.2f}")
print(f"  {'all':<16} {total / n:8.2f}")
PY
