#!/usr/bin/env bash
# Runs the fuzz targets, each for SECONDS (default 600), one after another.
#   fuzz/run.sh [SECONDS] [TARGET...]
# cargo-fuzz needs nightly features; RUSTC_BOOTSTRAP=1 enables them on the
# stable toolchain. Findings land in fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-600}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(request_decoding sigv4_authorization config_loader proxy_protocol)
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  RUSTC_BOOTSTRAP=1 cargo fuzz run -O "$t" "corpus/$t" "seeds/$t" -- \
    -max_total_time="$secs" -print_final_stats=1 2>&1 | tee "$t.log" | grep -E "^(#[0-9]+ *DONE|stat::|==|SUMMARY|Done)" || true
done
