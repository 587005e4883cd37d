#!/usr/bin/env bash
# The packaging phase of scripts/test.sh (the three ways to deploy of
# docs/deploy.md): builds the release binary once, then
#
#   scripts/image.sh        the production, test (SoftHSM) and evaluation images
#   scripts/test-image.sh   runs them: /ping, /metrics, SigV4 round trips,
#                           SIGTERM drain; the compliance client when
#                           XKS_COMPLIANCE_CLIENT names a clone of it
#   scripts/package-deb.sh  the .deb
#   scripts/test-deb.sh     installs, checks, removes and purges it (root)
#
# XKS_PACKAGE_BIN=/path/to/xks-proxy uses that binary instead of building
# one. Everything they build lands in target/package/ (XKS_PACKAGE_OUT);
# the Debian base of the images is cached in ~/.cache/xks-proxy.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
# Each step's start, in seconds since this script started (stderr).
step() { echo "== packages.sh ${SECONDS}s: $*" >&2; }
step "release binary"
XKS_PACKAGE_BIN="$(package_bin)"
export XKS_PACKAGE_BIN
step "images"
scripts/image.sh >/dev/null
step "image tests"
scripts/test-image.sh
step ".deb"
deb="$(scripts/package-deb.sh)"
step ".deb install, check-config, remove, purge"
scripts/test-deb.sh "$deb"
step "done"
