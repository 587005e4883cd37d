# Shared shell helpers for scripts/*.sh (sourced, not run).

# Installs the Debian packages the proxy and its tests need, when missing:
# SoftHSMv2 (the default PKCS#11 backend), OpenSSL (dev certificates) and
# curl >= 7.75 (an independent SigV4 signer used by the tests) and opensc
# (pkcs11-tool: tests change the token behind the proxy's back) and HAProxy
# (the load balancer in front of the fleet test).
ensure_packages() {
  local missing=()
  [ -e /usr/lib/softhsm/libsofthsm2.so ] && command -v softhsm2-util >/dev/null || missing+=(softhsm2)
  command -v openssl >/dev/null || missing+=(openssl)
  command -v curl >/dev/null || missing+=(curl)
  command -v pkcs11-tool >/dev/null || missing+=(opensc)
  command -v haproxy >/dev/null || missing+=(haproxy)
  # The real Prometheus of tests/prometheus.rs, and promtool.
  command -v prometheus >/dev/null && command -v promtool >/dev/null || missing+=(prometheus)
  apt_install "${missing[@]}"
}

# Installs the named Debian packages that dpkg does not list as installed.
ensure_build_packages() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  apt_install "${missing[@]}"
}

apt_install() {
  [ $# -gt 0 ] || return 0
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing: $*" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}
