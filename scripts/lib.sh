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

# For the comparisons with the AWS sample (scripts/bench-vs-sample.sh,
# scripts/bench-rate.sh): `bench_servers OUT SAMPLE_BIN PROXY_BIN` writes the
# sample's settings into OUT (its own defaults: a pool of 30 sessions, INFO
# logging to a file, like this proxy's access log; the dev token, key and
# certificate) and defines `start_server proxy|sample` (waits for /ping;
# the pid in $server) and `stop_server`. SAMPLE_BIN may be empty.
bench_servers() {
  local out=$1 secret
  sample=$2
  proxy_bin=$3
  server=
  secret=$(cat .dev/secrets/dev-a.secret)
  cat >"$out/sample.toml" <<EOF
[server]
ip = "127.0.0.1"
port = 8443
port_http_ping = 8080
region = "us-east-1"
service = "kms-xks-proxy"
[server.tcp_keepalive]
tcp_keepalive_secs = 60
tcp_keepalive_retries = 3
tcp_keepalive_interval_secs = 1
[tracing]
is_stdout_writer_enabled = false
is_file_writer_enabled = true
level = "INFO"
directory = "$out/sample-logs"
file_prefix = "xks-proxy.log"
rotation_kind = "NEVER"
[security]
is_sigv4_auth_enabled = true
is_tls_enabled = true
is_mtls_enabled = false
[tls]
tls_cert_pem = "$PWD/certs/server.crt"
tls_key_pem = "$PWD/certs/server.key"
[[external_key_stores]]
uri_path_prefix = "/example"
sigv4_access_key_id = "XKSPROXYDEVEXAMPLEKEYA"
sigv4_secret_access_key = "$secret"
xks_key_id_set = ["demo-key"]
[pkcs11]
session_pool_max_size = 30
session_pool_timeout_milli = 0
session_eager_close = false
user_pin = "$(cat .dev/hsm-pin)"
PKCS11_HSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
context_read_timeout_milli = 10
[limits]
max_plaintext_in_base64 = 8192
max_aad_in_base64 = 16384
[hsm_capabilities]
can_generate_iv = false
is_zero_iv_required = false
EOF
}

start_server() {
  case $1 in
    proxy) "$proxy_bin" serve --config config/dev.toml 2>"$out/proxy.log" & ;;
    sample) XKS_PROXY_SETTINGS_TOML=$out/sample.toml "$sample" >"$out/sample.out" 2>&1 & ;;
  esac
  server=$!
  for _ in $(seq 100); do
    curl -sf --cacert certs/ca.crt -o /dev/null https://localhost:8443/ping 2>/dev/null && return
    curl -sf -o /dev/null http://127.0.0.1:8080/ping 2>/dev/null && return
    sleep 0.1
  done
  echo "$1 did not start" >&2
  exit 1
}

stop_server() {
  [ -n "${server:-}" ] || return 0
  kill "$server" 2>/dev/null || true
  wait "$server" 2>/dev/null || true
  server=
}

# The cache outside the clone that scripts/kryoptic.sh, scripts/p11-kit-rpc.sh
# and the packaging scripts share.
xks_cache_dir() {
  echo "${XKS_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/xks-proxy}"
}

# For the packaging scripts (scripts/packages.sh and the scripts it runs):
# the release binary that the images and the .deb carry. $XKS_PACKAGE_BIN
# when set (a binary built elsewhere; no cargo run), else this tree's
# `cargo build --release --locked --bin xks-proxy` (default features, Cedar
# included, as release artefacts have them). Prints its absolute path.
package_bin() {
  if [ -n "${XKS_PACKAGE_BIN:-}" ]; then
    [ -x "$XKS_PACKAGE_BIN" ] || { echo "XKS_PACKAGE_BIN=$XKS_PACKAGE_BIN is not an executable" >&2; return 1; }
    realpath "$XKS_PACKAGE_BIN"
    return 0
  fi
  cargo build --release --locked --bin xks-proxy >&2
  realpath "${CARGO_TARGET_DIR:-target}/release/xks-proxy"
}

# The version the binary reports (`xks-proxy --version`: "xks-proxy 0.1.0"),
# which names the images and the package.
package_version() {
  "$1" --version | awk '{print $2}'
}

# Where the packaging scripts put what they build (images as OCI archives,
# the .deb): $XKS_PACKAGE_OUT, else target/package in the clone (ignored by
# git; .ci/run moves cargo's target dir elsewhere, this stays per clone).
package_out() {
  local out=${XKS_PACKAGE_OUT:-$PWD/target/package}
  mkdir -p "$out"
  realpath "$out"
}

# Podman for scripts/image.sh and scripts/test-image.sh: installs podman,
# runc and mmdebstrap when missing, and points CONTAINERS_CONF at a
# containers.conf in the cache with only the settings this machine needs
# (/etc is left alone; without any, CONTAINERS_CONF stays unset):
#   runtime = "runc"          on cgroup v1 or hybrid hierarchies, where crun
#                             (which podman prefers when both are installed)
#                             fails to create containers;
#   cgroup_manager = cgroupfs when systemd is not PID 1 (no systemd to ask);
#   default_ulimits = []      when the hard open-files limit is below the
#                             1048576 podman sets in every container by
#                             default: runc cannot raise it ("error setting
#                             rlimit type 7"), so containers inherit ours.
podman_setup() {
  ensure_build_packages podman runc mmdebstrap
  local conf settings engine="" containers=""
  if [ "$(stat -fc %T /sys/fs/cgroup)" != cgroup2fs ]; then
    engine+='runtime = "runc"'$'\n'
  fi
  if [ ! -d /run/systemd/system ]; then
    engine+='cgroup_manager = "cgroupfs"'$'\n'
  fi
  if [ "$(ulimit -Hn)" != unlimited ] && [ "$(ulimit -Hn)" -lt 1048576 ]; then
    containers+='default_ulimits = []'$'\n'
  fi
  [ -n "$engine$containers" ] || return 0
  settings="# Written by scripts/lib.sh (podman_setup) for this machine; see there."$'\n'
  [ -z "$containers" ] || settings+="[containers]"$'\n'"$containers"
  [ -z "$engine" ] || settings+="[engine]"$'\n'"$engine"
  conf="$(xks_cache_dir)/containers.conf"
  mkdir -p "$(dirname "$conf")"
  if [ "$(cat "$conf" 2>/dev/null)" != "${settings%$'\n'}" ]; then
    printf '%s' "$settings" >"$conf.tmp"
    mv "$conf.tmp" "$conf"
  fi
  export CONTAINERS_CONF=$conf
}

# For the packaging tests: one signed XKS request with curl's own SigV4
# signer (as tests/auth.rs uses it). `xks_request URL CACERT ACCESS_KEY_ID
# SECRET BODY OUT [CURL OPTION...]` writes the answer's body to OUT and
# prints the HTTP status.
xks_request() {
  local url=$1 ca=$2 id=$3 secret=$4 body=$5 out=$6
  shift 6
  curl -sS --max-time 10 --cacert "$ca" --aws-sigv4 "aws:amz:us-east-1:kms-xks-proxy" \
    --user "$id:$secret" -H "Content-Type: application/json" --data-binary "$body" \
    -o "$out" -w '%{http_code}' "$@" "$url"
}
