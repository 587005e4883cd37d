#!/usr/bin/env bash
# Builds the Kryoptic PKCS#11 soft token (libkryoptic_pkcs11.so), a second
# software backend next to SoftHSMv2: it implements CKM_AES_GCM and HMAC, but
# is a different code base with its own quirks, so the proxy is tested against
# more than one token. Debian 12 does not package it.
#
# The source is the crates.io crate, fetched through cargo (so the registry
# and any mirror configuration are cargo's business) and checked against a
# pinned SHA-256; it builds with its own shipped Cargo.lock. The result lives
# in a cache outside the clone, keyed by version and checksum, so every clone
# and worktree shares one build and `cargo clean` does not throw it away.
#
# Features: no defaults (those want OpenSSL >= 3.2 for EdDSA; Debian 12 has
# 3.0). "dynamic" links the system libssl, "sqlitedb" is the token storage
# (and pulls in AES), "hash_all" gives SHA-2 and the HMAC mechanisms, "rsa"
# and "ecdsa" the key pairs the tests make to check that non-AES keys are
# described but never used.
#
# Usage: scripts/kryoptic.sh [DIR]
#   DIR defaults to ${XKS_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/xks-proxy}/kryoptic-<version>-<sha12>-<features hash>
# Prints the absolute path of libkryoptic_pkcs11.so, nothing else on stdout.
# Idempotent: does nothing when DIR is already built.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

version=1.5.4
sha256=21b64b7679ce821f19a7a48b7e40146f26fbb9daa64ee2acb6376788a26d7ae8
features="kryoptic-lib/dynamic kryoptic-lib/sqlitedb kryoptic-lib/hash_all kryoptic-lib/rsa kryoptic-lib/ecdsa"
cache="$(xks_cache_dir)"
# The features are part of the key: another set is another library.
fkey="$(printf '%s' "$features" | sha256sum | cut -c1-8)"
dir="$(realpath -m "${1:-$cache/kryoptic-$version-${sha256:0:12}-$fkey}")"
lib="$dir/libkryoptic_pkcs11.so"

if [ -f "$lib" ] && [ -f "$dir/.built" ]; then
  echo "$lib"
  exit 0
fi

# libclang: bindgen in ossl-sys; libssl-dev + pkg-config: the dynamic OpenSSL
# link; libsqlite3-dev: rusqlite without its "bundled" copy.
ensure_build_packages libclang-dev libssl-dev libsqlite3-dev pkg-config

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$dir"

# A throwaway manifest depending on the exact version makes cargo download
# the .crate into its registry cache; `cargo fetch` cannot fetch a crate alone.
mkdir -p "$work/fetch/src"
touch "$work/fetch/src/lib.rs"
cat >"$work/fetch/Cargo.toml" <<EOF
[package]
name = "kryoptic-fetch"
version = "0.0.0"
edition = "2021"

[dependencies]
kryoptic = { version = "=$version", default-features = false }
EOF
cargo fetch --quiet --manifest-path "$work/fetch/Cargo.toml" >&2
crate=""
for f in "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/"kryoptic-$version.crate"; do
  # Several registry caches (mirrors) may hold it; take the one that matches.
  if [ -f "$f" ] && echo "$sha256  $f" | sha256sum -c --quiet - >/dev/null 2>&1; then crate="$f"; fi
done
if [ -z "$crate" ]; then
  echo "kryoptic-$version.crate with SHA-256 $sha256 not found in the cargo cache:" >&2
  sha256sum "${CARGO_HOME:-$HOME/.cargo}"/registry/cache/*/"kryoptic-$version.crate" >&2 || true
  exit 1
fi

tar -C "$work" -xzf "$crate"
# The target dir is in the cache so a rebuild (new marker, lost .so) only
# recompiles the tiny top crate, not the ~100 dependencies.
echo "building kryoptic $version (log: $dir/build.log)" >&2
CARGO_TARGET_DIR="$dir/target" cargo build --release --locked \
  --manifest-path "$work/kryoptic-$version/Cargo.toml" \
  --no-default-features --features "$features" >"$dir/build.log" 2>&1 ||
  { tail -50 "$dir/build.log" >&2; exit 1; }
# A copy, not the target-dir file, so a later rebuild does not change a
# library some test has loaded.
cp "$dir/target/release/libkryoptic_pkcs11.so" "$lib.tmp"
mv "$lib.tmp" "$lib"
touch "$dir/.built"
echo "$lib"
