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
  # openCryptoki: the token without AES-GCM of tests/opencryptoki.rs
  # (scripts/opencryptoki.sh starts its daemon and prepares the token).
  command -v pkcsslotd >/dev/null || missing+=(opencryptoki)
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

# For the benchmark scripts: the dev token of scripts/dev-up.sh must exist
# and its ports be free (its proxy stopped); sets SOFTHSM2_CONF and `bench`,
# the load generator ($XKS_BENCH, or this tree's dist build).
bench_setup() {
  [ -f .dev/softhsm2.conf ] || { echo "run scripts/dev-up.sh once first" >&2; exit 2; }
  export SOFTHSM2_CONF=$PWD/.dev/softhsm2.conf
  if curl -s -o /dev/null http://127.0.0.1:8080/ping; then
    echo "something already serves the dev ports (a dev-up proxy?); stop it first" >&2
    exit 2
  fi
  bench=${XKS_BENCH:-}
  if [ -z "$bench" ]; then
    cargo build --profile dist --bin xks-bench
    bench=target/dist/xks-bench
  fi
}

# Waits (at most 10 s) until the dev proxy answers /ping.
wait_dev_ping() {
  for _ in $(seq 100); do
    curl -sf http://127.0.0.1:8080/ping >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  return 1
}
