#!/usr/bin/env bash
# Builds p11-kit 0.25.5 (server + p11-kit-client.so) into a private prefix for
# the network-HSM fault test (tests/fleet.rs).
#
# Why not Debian 12's own p11-kit? Its RPC layer (0.24.1) forwards only
# mechanisms without parameters, so CKM_AES_GCM fails with
# CKR_MECHANISM_INVALID through p11-kit-client.so. GCM parameters reached the
# RPC protocol in 0.25.0. The source is Debian's own upstream tarball (the one
# Debian 13 ships), checked against a pinned SHA-256; nothing is installed
# system-wide.
#
# Usage: scripts/p11-kit-rpc.sh [PREFIX]
#   (default: ${XKS_CACHE_DIR:-~/.cache/xks-proxy}/p11-kit-<version>-<sha256 prefix>, outside
#   the clone, so every clone and CI run shares one build keyed by version and
#   checksum, as scripts/kryoptic.sh does)
# Prints the prefix. Idempotent: does nothing when PREFIX is already built.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

version=0.25.5
sha256=04d0a86450cdb1be018f26af6699857171a188ac6d5b8c90786a60854e1198e5
url="http://deb.debian.org/debian/pool/main/p/p11-kit/p11-kit_${version}.orig.tar.xz"
prefix="$(realpath -m "${1:-$(xks_cache_dir)/p11-kit-$version-${sha256:0:12}}")"

if [ -x "$prefix/libexec/p11-kit/p11-kit-server" ] && [ -f "$prefix/.version-$version" ]; then
  echo "$prefix"
  exit 0
fi

ensure_build_packages meson ninja-build libffi-dev pkg-config curl xz-utils

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
curl -sSf -o "$work/src.tar.xz" "$url"
echo "$sha256  $work/src.tar.xz" | sha256sum -c --quiet -
tar -C "$work" -xf "$work/src.tar.xz"
(
  cd "$work/p11-kit-$version"
  meson setup build --prefix="$prefix" --libdir=lib \
    -Dtrust_module=disabled -Dsystemd=disabled -Dbash_completion=disabled \
    -Dnls=false -Dgtk_doc=false -Dman=false -Dtest=false >"$work/setup.log" 2>&1 ||
    { cat "$work/setup.log" >&2; exit 1; }
  ninja -C build >"$work/build.log" 2>&1 || { tail -50 "$work/build.log" >&2; exit 1; }
  ninja -C build install >/dev/null
)
touch "$prefix/.version-$version"
echo "$prefix"
