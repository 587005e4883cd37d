#!/usr/bin/env bash
# Creates a Kryoptic token (scripts/kryoptic.sh builds the library) in DIR:
# a config file naming one sqlite-backed slot (id 42) and a token initialized
# with LABEL, SO_PIN and USER_PIN. Kryoptic has no global state like
# /var/lib/softhsm: everything lives in the file that the environment
# variable KRYOPTIC_CONF names, so every test can own a fresh token.
#
# Before printing, it checks through OpenSC's pkcs11-tool (an independent
# PKCS#11 client) that the mechanisms the proxy needs are there and that an
# AES-256 key works. pkcs11-tool 0.23 (Debian 12) cannot drive AES-GCM (no
# --aad/--tag-bits) and marks --usage-sign secret keys verify-only, so the
# key check is an AES-CBC-PAD round trip; GCM and HMAC are exercised by the
# Rust tests themselves.
#
# Usage: scripts/kryoptic-token.sh DIR LABEL SO_PIN USER_PIN
# Prints KRYOPTIC_CONF=<absolute path>. The slot id is 42.
# Idempotent: a DIR whose token already has LABEL is left as it is.
set -euo pipefail
[ $# -eq 4 ] || { echo "usage: $0 DIR LABEL SO_PIN USER_PIN" >&2; exit 2; }
dir="$(realpath -m "$1")"
label=$2 so_pin=$3 user_pin=$4
slot=42
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_build_packages opensc

lib="$(scripts/kryoptic.sh)"
conf="$dir/kryoptic.conf"
export KRYOPTIC_CONF="$conf"
p11() { pkcs11-tool --module "$lib" --slot "$slot" "$@"; }

token_field() { p11 -T 2>/dev/null | sed -n "s/^ *token $1 *: //p"; }
if [ -f "$conf" ] && [ "$(token_field label)" = "$label" ] &&
  token_field flags | grep -q "PIN initialized"; then
  echo "KRYOPTIC_CONF=$conf"
  exit 0
fi

mkdir -p "$dir"
cat >"$conf" <<EOF
[[slots]]
slot = $slot
dbtype = "sqlite"
dbargs = "$dir/kryoptic.sql"
EOF
# A half-made token (an interrupted run) would demand its old SO PIN for
# C_InitToken; start from an empty database instead.
rm -f "$dir/kryoptic.sql"

log="$dir/kryoptic-token.log"
run() { "$@" >>"$log" 2>&1 || { cat "$log" >&2; exit 1; }; }
: >"$log"
run p11 --init-token --label "$label" --so-pin "$so_pin"
run p11 --init-pin --login --login-type so --so-pin "$so_pin" --new-pin "$user_pin"

# The mechanisms and flags the proxy relies on (pkcs11-tool's names).
mechs="$(p11 -M 2>>"$log")"
for want in "AES-GCM,.* encrypt, decrypt" "AES-KEY-GEN,.* generate" \
  "SHA256-HMAC,.* sign, verify" "GENERIC-SECRET-KEY-GEN,.* generate"; do
  grep -qE "^  $want" <<<"$mechs" || { echo "kryoptic: no '$want' in:" >&2; echo "$mechs" >&2; exit 1; }
done

# A real key, used both ways, then removed so the token starts empty.
u=(--login --pin "$user_pin")
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "kryoptic self-test" >"$tmp/pt"
iv=000102030405060708090a0b0c0d0e0f
run p11 "${u[@]}" --keygen --key-type AES:32 --label xks-selftest
run p11 "${u[@]}" --encrypt -m AES-CBC-PAD --iv $iv --label xks-selftest -i "$tmp/pt" -o "$tmp/ct"
run p11 "${u[@]}" --decrypt -m AES-CBC-PAD --iv $iv --label xks-selftest -i "$tmp/ct" -o "$tmp/out"
cmp -s "$tmp/pt" "$tmp/out" || { echo "kryoptic: AES round trip differs" >&2; exit 1; }
run p11 "${u[@]}" --delete-object --type secrkey --label xks-selftest

echo "KRYOPTIC_CONF=$conf"
