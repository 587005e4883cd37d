#!/usr/bin/env bash
# `xks-proxy audit verify` on a large trail: wall time, CPU, peak RSS, and
# the trail's disk cost per record, plain and gzip-compressed.
#
#   scripts/bench-audit.sh [RECORDS] [GZIP_RECORDS]   (default 10000000 1000000)
#
# Writes RECORDS request records (realistic fields: xks-bench
# --write-audit-trail) through the real trail with real seals in the dev
# token (scripts/dev-up.sh must have run once), then verifies them with the
# release binary, seals checked in the token, under /usr/bin/time. Then the
# same with audit.compress = "gzip" on GZIP_RECORDS records. Prints one JSON
# line per run. Needs RECORDS x ~0.6 KB of free space under $TMPDIR.
set -euo pipefail
cd "$(dirname "$0")/.."
records=${1:-10000000}
gzip_records=${2:-1000000}
[ -f .dev/softhsm2.conf ] || { echo "run scripts/dev-up.sh once first" >&2; exit 2; }
export SOFTHSM2_CONF=$PWD/.dev/softhsm2.conf
cargo build --release --bins >&2
work=$(mktemp -d "${TMPDIR:-/tmp}/xks-bench-audit.XXXXXX")
cfgs=()
cleanup() { rm -rf "$work"; rm -f "${cfgs[@]}"; }
trap cleanup EXIT

run() {
  local compress=$1 n=$2
  # Next to dev.toml, so that its relative paths still resolve.
  local cfg=config/.bench-audit-$compress.toml dir=$work/$compress
  # Its own instance id: a witness left in the token by an earlier run
  # (killed before its retirement) would call this trail cut.
  local instance=bench-$compress-$$
  cfgs+=("$cfg")
  { cat config/dev.toml
    printf '\n[audit]\ndir = "%s"\ninstance_id = "%s"\ncompress = "%s"\n' "$dir" "$instance" "$compress"
    # Rotated often enough that the gzip run has many compressed files.
    printf 'rotate_bytes = %s\nqueue_records = 65536\n' "$([ "$compress" = gzip ] && echo 16777216 || echo 134217728)"
  } > "$cfg"
  echo "== $compress: writing $n records" >&2
  ./target/release/xks-bench --config "$cfg" --write-audit-trail "$n" >&2
  # The compressor of the writing process may not have finished the last
  # rotated file: the disk cost counts the compressed files only.
  local plain_bytes gz_bytes gz_records files
  files=$(find "$dir" -name '*.jsonl*' ! -name '*.tmp' | wc -l)
  # (Summed in Python: awk's integers stop at 2^31 here.)
  sum() { find "$dir" -name "$1" -printf '%s\n' | python3 -c 'import sys; print(sum(int(l) for l in sys.stdin))'; }
  plain_bytes=$(sum '*.jsonl')
  gz_bytes=$(sum '*.jsonl.gz')
  gz_records=0
  if [ "$gz_bytes" -gt 0 ]; then
    gz_records=$(find "$dir" -name '*.jsonl.gz' -print0 | xargs -0 zcat | wc -l)
  fi
  echo "== $compress: verifying ($files files)" >&2
  local t=$work/time.txt rc=0
  /usr/bin/time -f '%e %U %S %M' -o "$t" \
    ./target/release/xks-proxy audit verify --config "$cfg" > "$work/verify.txt" || rc=$?
  head -5 "$work/verify.txt" >&2
  # (A failing command adds a line before the figures.)
  read -r wall user sys maxrss < <(tail -1 "$t")
  # Its witness leaves the token with it.
  ./target/release/xks-proxy audit retire --config "$cfg" --instance "$instance" >&2 || true
  python3 - "$compress" "$n" "$rc" "$wall" "$user" "$sys" "$maxrss" "$plain_bytes" "$gz_bytes" "$gz_records" "$files" <<'PY'
import json, sys
c, n, rc, wall, user, sys_, rss, plain, gz, gzn, files = sys.argv[1:]
n, wall = int(n), float(wall)
out = {"compress": c, "records": n, "files": int(files), "verify_exit": int(rc),
       "verify_seconds": wall, "verify_cpu_seconds": round(float(user) + float(sys_), 2),
       "records_per_second": round(n / wall), "peak_rss_mib": round(int(rss) / 1024, 1)}
if c == "none":
    out["bytes_per_record"] = round(int(plain) / n, 1)
elif int(gzn):
    out["gzip_bytes_per_record"] = round(int(gz) / int(gzn), 1)
print(json.dumps(out))
PY
  rm -rf "$dir"
}

run none "$records"
run gzip "$gzip_records"
