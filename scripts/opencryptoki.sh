#!/usr/bin/env bash
# Prepares Debian's openCryptoki soft token as a third PKCS#11 backend. Its
# point is what it lacks: openCryptoki 3.8 (Debian 12) has no CKM_AES_GCM,
# and its C_GetTokenInfo utcTime is not YYYYMMDDhhmmss00 ("hh:mm:ss", a NUL,
# then whatever the caller's buffer held). The proxy must cope with both.
#
# Unlike SoftHSM or Kryoptic it is one system-wide token: a root daemon
# (pkcsslotd) and state under /var/lib/opencryptoki/swtok, so this needs root.
#
# Usage: scripts/opencryptoki.sh LABEL SO_PIN USER_PIN    (PINs: 4-8 chars)
# Prints OPENCRYPTOKI_MODULE=<library> and OPENCRYPTOKI_SLOT=<id>.
# Idempotent: a token with LABEL on which USER_PIN logs in is left alone;
# otherwise the token is wiped and initialized afresh (its keys are lost).
set -euo pipefail
[ $# -eq 3 ] || { echo "usage: $0 LABEL SO_PIN USER_PIN" >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || exec sudo "$0" "$@"
label=$1 so_pin=$2 user_pin=$3
for pin in "$so_pin" "$user_pin"; do
  # The soft token's C_SetPIN/C_InitPIN range; checked here for a clear error.
  if [ ${#pin} -lt 4 ] || [ ${#pin} -gt 8 ]; then echo "openCryptoki PINs are 4 to 8 characters" >&2; exit 2; fi
done
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_build_packages opencryptoki opensc

# The PKCS#11 API library (it talks to pkcsslotd and loads the token's STDLL).
module="$(dpkg -L opencryptoki | grep '/pkcs11/libopencryptoki\.so$')"
tokdir=/var/lib/opencryptoki/swtok

# Without the daemon every C_Initialize fails (CKR_FUNCTION_FAILED, or
# CKR_HOST_MEMORY once a daemon has gone), so a real call is the liveness
# test: pgrep also sees an unreaped zombie. No systemd here, so start it by
# hand; its lock directories live in /run/lock, which a reboot empties
# (systemd-tmpfiles or the init script make them).
if ! pkcs11-tool --module "$module" -I >/dev/null 2>&1; then
  for d in "" /swtok; do install -d -m 0770 -g pkcs11 "/var/lock/opencryptoki$d"; done
  /usr/sbin/pkcsslotd # forks into the background
fi

# The slot of the soft token ("IBM SoftTok"): 3 in Debian's opencryptoki.conf.
slot="$(pkcsconf -t | awk '/^Token #/ { n = $2; sub(/#/, "", n) } /Model: IBM SoftTok/ { print n; exit }')"
[ -n "$slot" ] || { echo "no openCryptoki soft token (pkcsconf -t)" >&2; exit 1; }
p11() { pkcs11-tool --module "$module" --slot "$slot" "$@"; }

info="$(p11 -T)"
current="$(sed -n 's/^ *token label *: //p' <<<"$info")"
# A token someone initialized for something else is never wiped without
# being told to: this is the machine's one openCryptoki soft token.
if grep -q "token initialized" <<<"$info" && [ "$current" != "$label" ] &&
  [ "${XKS_TEST_OPENCRYPTOKI_WIPE:-}" != 1 ]; then
  echo "the openCryptoki soft token is labelled '$current', not '$label': left alone; set XKS_TEST_OPENCRYPTOKI_WIPE=1 to let the tests re-initialize it (its keys are lost)" >&2
  exit 1
fi
if [ "$current" != "$label" ] || ! p11 --login --pin "$user_pin" -O >/dev/null 2>&1; then
  # Why wipe instead of C_InitToken with the old SO PIN: 3.8 resets the SO PIN
  # hash but not its master key on re-initialization, so the next SO login
  # fails (CKR_FUNCTION_FAILED). A fresh token has the default SO PIN. The
  # files are the ones openCryptoki's maintainers name for a reset; the shared
  # memory segment caches the token data between processes.
  rm -f "$tokdir/MK_SO" "$tokdir/MK_USER" "$tokdir/NVTOK.DAT" "$tokdir"/TOK_OBJ/* \
    /dev/shm/var.lib.opencryptoki.swtok
  log="$(mktemp)"
  trap 'rm -f "$log"' EXIT
  run() { "$@" >>"$log" 2>&1 || { cat "$log" >&2; exit 1; }; }
  # pkcs11-tool, not pkcsconf: pkcsconf exits 0 even when a call fails.
  run p11 --init-token --label "$label" --so-pin 87654321
  # C_SetPIN refuses the same PIN (CKR_PIN_INVALID); the default then stays,
  # flagged "SO PIN to be changed", which does not stop C_InitPIN.
  if [ "$so_pin" != 87654321 ]; then
    run p11 --login --login-type so --so-pin 87654321 --change-pin --new-pin "$so_pin"
  fi
  run p11 --init-pin --login --login-type so --so-pin "$so_pin" --new-pin "$user_pin"
  run p11 --login --pin "$user_pin" -O
fi

echo "OPENCRYPTOKI_MODULE=$module"
echo "OPENCRYPTOKI_SLOT=$slot"
