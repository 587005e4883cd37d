# Shared shell helpers for scripts/*.sh (sourced, not run).

# Installs the Debian packages the proxy and its tests need, when missing:
# SoftHSMv2 (the default PKCS#11 backend), OpenSSL (dev certificates) and
# curl >= 7.75 (an independent SigV4 signer used by the tests) and opensc
# (pkcs11-tool: tests change the token behind the proxy's back).
ensure_packages() {
  local missing=()
  [ -e /usr/lib/softhsm/libsofthsm2.so ] && command -v softhsm2-util >/dev/null || missing+=(softhsm2)
  command -v openssl >/dev/null || missing+=(openssl)
  command -v curl >/dev/null || missing+=(curl)
  command -v pkcs11-tool >/dev/null || missing+=(opensc)
  if [ ${#missing[@]} -gt 0 ]; then
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "installing: ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}
