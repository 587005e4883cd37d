#!/usr/bin/env bash
# Installs the .deb of scripts/package-deb.sh on this machine, checks it, and
# removes it again, leaving the machine as it found it:
#
# 1. dpkg -i: the system user xks-proxy, the directories' owners and modes,
#    the conffile, the binary, the unit.
# 2. The files the default config names (certificate, key, PIN, SigV4
#    secret) and a SoftHSM token with its label, all owned by xks-proxy;
#    then `xks-proxy check-config` on the installed config, unmodified, as
#    the service's user.
# 3. systemd-analyze verify on the installed unit, and its exposure
#    (systemd-analyze security --offline=true) at most 2.0.
# 4. The proxy started as the unit starts it (user xks-proxy, umask 0077,
#    no new privileges, only CAP_NET_BIND_SERVICE; systemd is not PID 1 here,
#    so setpriv stands in), a signed GetHealthStatus; then dpkg -r: its prerm
#    stops the proxy (SIGTERM: it drains and exits 0), the binary and the
#    unit go, the conffile stays.
# 5. dpkg --purge: the configuration, the state directory, the statoverrides
#    and systemd's records go; the system user stays, as Debian packages
#    leave theirs (deploy/debian/postrm says why).
#
# Refuses to run when xks-proxy is installed already. Afterwards (also on
# failure) the package is purged, and the user and group are deleted when
# this script created them. Ports 18543/18580/19564 must be free.
#
# Usage: scripts/test-deb.sh [DEB]   (default: the one in target/package)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

[ "$(id -u)" -eq 0 ] || { echo "test-deb.sh: installs a package: run as root" >&2; exit 2; }
# softhsm2 for the token; curl, openssl, jq for the request.
ensure_build_packages softhsm2 curl openssl jq
deb=${1:-$(ls "$(package_out)"/xks-proxy_*.deb 2>/dev/null | head -1)}
[ -f "$deb" ] || { echo "test-deb.sh: no .deb: run scripts/package-deb.sh first" >&2; exit 1; }
version=$(dpkg-deb -f "$deb" Version)

if dpkg-query -W -f='${Status}' xks-proxy 2>/dev/null | grep -qv '^unknown\|not-installed'; then
  echo "test-deb.sh: xks-proxy is installed on this machine; not touching it" >&2
  echo "(left by an interrupted run? dpkg --purge xks-proxy, then try again)" >&2
  exit 1
fi
user_existed=no
getent passwd xks-proxy >/dev/null && user_existed=yes

tmp="$(mktemp -d)"
# The service's user reaches the SoftHSM token below.
chmod 0711 "$tmp"
proxy=""
cleanup() {
  local rc=$?
  if [ -n "$proxy" ] && kill -0 "$proxy" 2>/dev/null; then
    kill "$proxy" 2>/dev/null || true
    wait "$proxy" 2>/dev/null || true
  fi
  [ "$rc" -eq 0 ] || [ ! -f "$tmp/proxy.log" ] || { echo "--- proxy log:" >&2; tail -20 "$tmp/proxy.log" >&2; }
  dpkg --purge xks-proxy >/dev/null 2>&1 || true
  if [ "$user_existed" = no ]; then
    userdel xks-proxy >/dev/null 2>&1 || true
    groupdel xks-proxy >/dev/null 2>&1 || true
  fi
  rm -rf "$tmp"
  exit "$rc"
}
trap cleanup EXIT
fail() { echo "test-deb.sh: FAILED: $*" >&2; exit 1; }
ok() { echo "test-deb.sh: ok: $*" >&2; }
# owner:group mode of PATH must be WANT.
check_stat() {
  local got
  got=$(stat -c '%U:%G %a' "$1") || fail "$1 missing"
  [ "$got" = "$2" ] || fail "$1 is $got, not $2"
}
for port in 18543 18580 19564; do
  [ -z "$(ss -Hltn "sport = :$port")" ] || fail "port $port is in use"
done

# --- 1. Install -----------------------------------------------------------------
dpkg -i "$deb" >"$tmp/dpkg.log" 2>&1 || { cat "$tmp/dpkg.log" >&2; fail "dpkg -i"; }
IFS=: read -r _ _ uid gid _ home shell < <(getent passwd xks-proxy) || fail "no user xks-proxy"
[ "$uid" -lt 1000 ] || fail "xks-proxy is not a system user (uid $uid)"
[ "$shell" = /usr/sbin/nologin ] && [ "$home" = /var/lib/xks-proxy ] || fail "xks-proxy: shell $shell, home $home"
[ "$(getent group xks-proxy | cut -d: -f3)" = "$gid" ] || fail "xks-proxy's primary group is not xks-proxy"
check_stat /etc/xks-proxy "root:xks-proxy 750"
check_stat /etc/xks-proxy/config.toml "root:xks-proxy 640"
check_stat /etc/xks-proxy/secrets "root:xks-proxy 750"
check_stat /etc/xks-proxy/tls "root:xks-proxy 750"
check_stat /var/lib/xks-proxy "xks-proxy:xks-proxy 700"
check_stat /usr/bin/xks-proxy "root:root 755"
check_stat /lib/systemd/system/xks-proxy.service "root:root 644"
dpkg-query -W -f='${Conffiles}\n' xks-proxy | grep -q '^ /etc/xks-proxy/config.toml [0-9a-f]\{32\}$' ||
  fail "config.toml is not a conffile"
[ "$(/usr/bin/xks-proxy --version)" = "xks-proxy ${version%-*}" ] || fail "xks-proxy --version"
ok "dpkg -i $(basename "$deb"): system user xks-proxy (uid $uid), modes, conffile, binary, unit"

# --- 2. The files the default config names, and check-config --------------------
# (deploy/debian/config.toml's header lists them.)
scripts/dev-certs.sh "$tmp/certs" >/dev/null
pin=$(openssl rand -hex 16)
install -o xks-proxy -g xks-proxy -m 0644 "$tmp/certs/server.crt" /etc/xks-proxy/tls/fullchain.pem
install -o xks-proxy -g xks-proxy -m 0600 "$tmp/certs/server.key" /etc/xks-proxy/tls/privkey.pem
printf '%s\n' "$pin" | install -o xks-proxy -g xks-proxy -m 0600 /dev/stdin /etc/xks-proxy/secrets/hsm-pin
secret=$(openssl rand -base64 32)
printf '%s\n' "$secret" | install -o xks-proxy -g xks-proxy -m 0600 /dev/stdin /etc/xks-proxy/secrets/main-a
# A SoftHSM token with the config's label, in a directory of its own.
install -d -o xks-proxy -g xks-proxy -m 0700 "$tmp/softhsm" "$tmp/softhsm/tokens"
printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' "$tmp/softhsm/tokens" |
  install -o xks-proxy -g xks-proxy -m 0600 /dev/stdin "$tmp/softhsm/softhsm2.conf"
as_service() { runuser -u xks-proxy -- env SOFTHSM2_CONF="$tmp/softhsm/softhsm2.conf" "$@"; }
as_service softhsm2-util --init-token --free --label xks-proxy --so-pin "$pin-so" --pin "$pin" >/dev/null
as_service /usr/bin/xks-proxy check-config --config /etc/xks-proxy/config.toml >"$tmp/check.log" 2>&1 ||
  { cat "$tmp/check.log" >&2; fail "check-config on the installed /etc/xks-proxy/config.toml"; }
dpkg --verify xks-proxy || fail "dpkg --verify: the installed files differ from the package"
ok "check-config on the installed config (unmodified), as xks-proxy"

# --- 3. The unit ------------------------------------------------------------------
unit=/lib/systemd/system/xks-proxy.service
systemd-analyze verify "$unit" >"$tmp/verify.log" 2>&1 || { cat "$tmp/verify.log" >&2; fail "systemd-analyze verify"; }
[ ! -s "$tmp/verify.log" ] || { cat "$tmp/verify.log" >&2; fail "systemd-analyze verify has warnings"; }
systemd-analyze security --offline=true --no-pager "$unit" >"$tmp/security.log" 2>&1 || true
exposure=$(sed -n 's/.*Overall exposure level for xks-proxy.service: \([0-9.]*\).*/\1/p' "$tmp/security.log")
[ -n "$exposure" ] || { cat "$tmp/security.log" >&2; fail "no exposure level from systemd-analyze security"; }
awk -v e="$exposure" 'BEGIN { exit !(e <= 2.0) }' || fail "the unit's exposure is $exposure, above 2.0"
ok "systemd-analyze verify clean; exposure $(grep -o 'Overall exposure level.*' "$tmp/security.log")"

# --- 4. Run as the unit would, then dpkg -r --------------------------------------
# The unit's User=, UMask=, NoNewPrivileges= and capabilities; its listeners
# moved to test ports (serve --listen ...), the config file unchanged.
(
  umask 0077
  exec setpriv --reuid=xks-proxy --regid=xks-proxy --init-groups --no-new-privs \
    --inh-caps=-all,+net_bind_service --ambient-caps=-all,+net_bind_service \
    --bounding-set=-all,+net_bind_service \
    env SOFTHSM2_CONF="$tmp/softhsm/softhsm2.conf" /usr/bin/xks-proxy serve \
    --config /etc/xks-proxy/config.toml --listen 127.0.0.1:18543 \
    --ping-listen 127.0.0.1:18580 --admin-listen 127.0.0.1:19564
) >"$tmp/proxy.log" 2>&1 &
proxy=$!
for _ in $(seq 150); do
  curl -sf --max-time 1 -o /dev/null http://127.0.0.1:18580/ping && break
  kill -0 "$proxy" 2>/dev/null || fail "the proxy stopped"
  sleep 0.2
done
[ "$(stat -c %U /proc/$proxy)" = xks-proxy ] || fail "the proxy does not run as xks-proxy"
status=$(xks_request https://127.0.0.1:18543/kms/xks/v1/health "$tmp/certs/ca.crt" \
  XKSPROXYREPLACEMEACCESSKEY "$secret" \
  '{"requestMetadata":{"kmsRequestId":"deb-test-1","kmsOperation":"CreateCustomKeyStore"}}' "$tmp/health.json")
[ "$status" = 200 ] || fail "GetHealthStatus: $status $(cat "$tmp/health.json")"
ok "the installed proxy serves as xks-proxy: signed GetHealthStatus 200"

dpkg -r xks-proxy >"$tmp/dpkg.log" 2>&1 || { cat "$tmp/dpkg.log" >&2; fail "dpkg -r"; }
# The prerm stopped it; give the exit a moment to be reaped.
for _ in $(seq 50); do kill -0 "$proxy" 2>/dev/null || break; sleep 0.1; done
kill -0 "$proxy" 2>/dev/null && fail "the proxy still runs after dpkg -r"
code=0
wait "$proxy" || code=$?
proxy=""
[ "$code" = 0 ] || fail "the proxy exited $code when dpkg -r stopped it"
grep -q "shutdown requested: no new connections, draining" "$tmp/proxy.log" || fail "no drain in the proxy's log"
! pgrep -u xks-proxy >/dev/null || fail "processes of xks-proxy remain: $(pgrep -u xks-proxy -a)"
[ ! -e /usr/bin/xks-proxy ] && [ ! -e "$unit" ] || fail "the binary or the unit survived dpkg -r"
[ -f /etc/xks-proxy/config.toml ] || fail "dpkg -r removed the conffile (only purge may)"
dpkg-query -W -f='${Status}' xks-proxy | grep -q 'config-files' || fail "status after dpkg -r"
ok "dpkg -r: the proxy stopped by the prerm (drained, exit 0), nothing of xks-proxy runs, binary and unit gone, config kept"

# --- 5. Purge ---------------------------------------------------------------------
dpkg --purge xks-proxy >"$tmp/dpkg.log" 2>&1 || { cat "$tmp/dpkg.log" >&2; fail "dpkg --purge"; }
[ ! -e /etc/xks-proxy ] || fail "/etc/xks-proxy survived the purge"
[ ! -e /var/lib/xks-proxy ] || fail "/var/lib/xks-proxy (empty) survived the purge"
! dpkg-statoverride --list | grep -q xks-proxy || fail "statoverrides survived the purge"
! ls /etc/systemd/system/xks-proxy.service /etc/systemd/system/*/xks-proxy.service \
  /var/lib/systemd/deb-systemd-helper-*/xks-proxy.service* >/dev/null 2>&1 ||
  fail "systemd records of the unit survived the purge"
! dpkg-query -W -f='${Status}' xks-proxy 2>/dev/null | grep -q installed || fail "dpkg still knows xks-proxy"
getent passwd xks-proxy >/dev/null || fail "the purge removed the system user (Debian packages keep theirs)"
ok "dpkg --purge: configuration, state directory, statoverrides and systemd records gone; the user stays"
echo "test-deb.sh: all package tests passed" >&2
