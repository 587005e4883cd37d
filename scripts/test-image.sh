#!/usr/bin/env bash
# Runs the images of scripts/image.sh the way an operator would, on
# 127.0.0.1 with the host's network, every wait bounded:
#
# 1. The production image as built: labels, non-root user, health check,
#    ports, stop signal; no SoftHSM, no toolchain, no curl inside; the
#    Kubernetes manifest's init container and preStop commands work in it.
# 2. The production image with a PKCS#11 library: localhost/xks-proxy-softhsm
#    (deploy/container/Containerfile.pkcs11 with softhsm2, exactly the docs'
#    vendor example: the production image has no PKCS#11 library, and
#    mounting the host's libsofthsm2.so would also mean mounting libcrypto and
#    libstdc++ that the base may not match). Its config and token are mounted
#    from the host, as a Kubernetes Secret and volume would be; read-only
#    root, all capabilities dropped, no-new-privileges (the manifest's
#    securityContext). Then /ping, /metrics, the HEALTHCHECK, GetHealthStatus,
#    GetKeyMetadata, Encrypt + Decrypt and a wrongly signed request (curl's
#    SigV4 signer), the official compliance client when XKS_COMPLIANCE_CLIENT
#    names a clone of aws-samples/aws-kms-xksproxy-test-client (docs/compliance.md:
#    not part of this repository, not reachable from CI), and SIGTERM with a
#    request in flight: that request is answered, the drain is logged, the
#    proxy exits 0 within server.shutdown_grace_secs.
# 3. The evaluation image alone (its own token, keys, certificate and
#    credentials): one signed Encrypt + Decrypt round trip, and a clean stop.
#    Its listeners are moved off 8443/8080/9464 on the command line (serve
#    --listen ...), which a development proxy on this machine may be using;
#    otherwise it runs as `podman run --network=host IMAGE` does.
#
# Ports: 18443/18080/19464 and 28443/28080/29464 (must be free).
# Containers are removed on every exit.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

podman_setup
# curl >= 7.75 for --aws-sigv4; openssl for the certificate; jq for JSON.
ensure_build_packages curl openssl jq
version="$(package_version "$(package_bin)")"
prod=localhost/xks-proxy:$version
softhsm=localhost/xks-proxy-softhsm:$version
eval_image=localhost/xks-proxy-evaluation:$version
for image in "$prod" "$softhsm" "$eval_image"; do
  podman image exists "$image" || { echo "test-image.sh: no $image: run scripts/image.sh first" >&2; exit 1; }
done

tmp="$(mktemp -d)"
prod_ctr=xks-image-test-$$
eval_ctr=xks-image-eval-$$
cleanup() {
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    for c in "$prod_ctr" "$eval_ctr"; do
      podman container exists "$c" 2>/dev/null || continue
      echo "--- last lines of $c's log:" >&2
      podman logs --tail 30 "$c" >&2 2>&1 || true
    done
  fi
  podman rm --force --ignore --time 0 "$prod_ctr" "$eval_ctr" >/dev/null 2>&1 || true
  rm -rf "$tmp"
  exit "$rc"
}
trap cleanup EXIT
fail() { echo "test-image.sh: FAILED: $*" >&2; exit 1; }
ok() { echo "test-image.sh: ok: $*" >&2; }

for port in 18443 18080 19464 28443 28080 29464; do
  [ -z "$(ss -Hltn "sport = :$port")" ] || fail "port $port is in use (a container of an interrupted run? podman ps -a)"
done

# Waits (at most 30 s) until URL answers 200, failing early when the
# container has stopped.
wait_ping() {
  local ctr=$1 url=$2
  for _ in $(seq 150); do
    curl -sf --max-time 1 -o /dev/null "$url" && return 0
    [ "$(podman inspect --format '{{.State.Running}}' "$ctr")" = true ] || fail "$ctr stopped"
    sleep 0.2
  done
  fail "$ctr: no /ping answer on $url within 30 s"
}
label() { podman image inspect --format "{{index .Config.Labels \"org.opencontainers.image.$2\"}}" "$1"; }

# --- 1. The production image as built ------------------------------------------
[ "$(label "$prod" version)" = "$version" ] || fail "label version is not $version"
for l in revision source created licenses title description; do
  [ -n "$(label "$prod" "$l")" ] || fail "label org.opencontainers.image.$l is empty"
done
[ "$(podman image inspect --format '{{.Config.User}}' "$prod")" = 10001:10001 ] || fail "user is not 10001:10001"
[ "$(podman image inspect --format '{{.Config.StopSignal}}' "$prod")" = SIGTERM ] || fail "stop signal"
podman image inspect --format '{{json .Config.Healthcheck.Test}}' "$prod" | grep -q xks-proxy-healthcheck ||
  fail "no HEALTHCHECK"
for p in 8443 8080 9464; do
  podman image inspect --format '{{json .Config.ExposedPorts}}' "$prod" | grep -q "\"$p/tcp\"" || fail "port $p not exposed"
done
podman run --rm --network=none --entrypoint /bin/sh "$prod" -c '
  set -e
  [ "$(id -u):$(id -g)" = 10001:10001 ]
  ! dpkg-query -W softhsm2 libsofthsm2 >/dev/null 2>&1
  ! ls /usr/lib/softhsm >/dev/null 2>&1
  ! command -v cargo rustc curl >/dev/null
  xks-proxy --version
' >"$tmp/inspect.log" 2>&1 || { cat "$tmp/inspect.log" >&2; fail "production image contents"; }
grep -q "^xks-proxy $version$" "$tmp/inspect.log" || fail "xks-proxy --version in the image"
ok "$prod: labels, user 10001, HEALTHCHECK, ports, SIGTERM; no SoftHSM, toolchain or curl; $(podman image inspect --format '{{.Size}}' "$prod" | awk '{printf "%.1f MB", $1 / 1e6}')"

# The Kubernetes manifest's init container (its command, read from the
# manifest) in this image: group-readable Secret files (fsGroup 10001,
# defaultMode 0440) become private copies (0400: cp keeps the mode, the
# umask takes the group's bit), owned by the proxy's user.
# And its preStop hook's command exists.
mapfile -t init_cmd < <(sed -n 's/^ *command: \(\[.*\]\)$/\1/p' deploy/kubernetes/xks-proxy.yaml | head -1 | jq -r '.[]')
[ "${#init_cmd[@]}" -gt 0 ] || fail "no init container command in deploy/kubernetes/xks-proxy.yaml"
mkdir -p "$tmp/k8s/src" "$tmp/k8s/dst"
printf 'pin\n' >"$tmp/k8s/src/hsm-pin"
chown -R 0:10001 "$tmp/k8s/src" && chmod 0440 "$tmp/k8s/src/hsm-pin"
chown 10001:10001 "$tmp/k8s/dst"
podman run --rm --network=none --read-only --cap-drop=all -v "$tmp/k8s/src:/mnt/secrets:ro" \
  -v "$tmp/k8s/dst:/etc/xks-proxy/secrets" --entrypoint "${init_cmd[0]}" "$prod" "${init_cmd[@]:1}" ||
  fail "the manifest's init container command in $prod"
check=$(stat -c '%u %a' "$tmp/k8s/dst/hsm-pin")
[ "$check" = "10001 400" ] || fail "the init container's copy is '$check', not '10001 400'"
prestop=$(sed -n 's/^ *exec: {command: \["\([^"]*\)".*/\1/p' deploy/kubernetes/xks-proxy.yaml | head -1)
podman run --rm --network=none --entrypoint "$prestop" "$prod" 0 || fail "the preStop command $prestop in $prod"
ok "the Kubernetes manifest's init container and preStop commands work in $prod"

# --- 2. The production image with a PKCS#11 library, config and token mounted --
etc=$tmp/etc
mkdir -p "$etc/tls" "$etc/secrets" "$tmp/tokens"
scripts/dev-certs.sh "$tmp/certs" >/dev/null
cp "$tmp/certs/server.crt" "$tmp/certs/server.key" "$etc/tls/"
ca=$tmp/certs/ca.crt
openssl rand -hex 16 >"$etc/secrets/hsm-pin"
secret=$(openssl rand -base64 32)
akid=XKSPROXYIMAGETESTKEYAAAA
printf '%s\n' "$secret" >"$etc/secrets/test-a.secret"
grace=10
cat >"$etc/config.toml" <<EOF
[server]
listen = "127.0.0.1:18443"
ping_listen = "127.0.0.1:18080"
fleet_size = 1
shutdown_grace_secs = $grace

[tls]
cert = "tls/server.crt"
key = "tls/server.key"

[hsm]
module = "/usr/lib/softhsm/libsofthsm2.so"
token_label = "xks-image-test"
pin_file = "secrets/hsm-pin"
sessions = 2

[logging]
format = "text"
level = "info"

[admin]
listen = "127.0.0.1:19464"

[[key_stores]]
name = "image-test"
uri_path = "/example/kms/xks/v1"
keys = ["*"]

[[key_stores.credentials]]
access_key_id = "$akid"
secret_file = "secrets/test-a.secret"
EOF
cat >"$etc/softhsm2.conf" <<EOF
directories.tokendir = /var/lib/xks-proxy/tokens
objectstore.backend = file
log.level = ERROR
EOF
# The proxy refuses secret files that group or others can read; the
# container's user owns what it reads and the token it writes.
chmod 0600 "$etc/tls/server.key" "$etc"/secrets/*
chown -R 10001:10001 "$etc" "$tmp/tokens"
mounts=(-v "$etc:/etc/xks-proxy:ro" -v "$tmp/tokens:/var/lib/xks-proxy/tokens"
  -e SOFTHSM2_CONF=/etc/xks-proxy/softhsm2.conf)

# The token and the compliance client's four keys, with the image's own tools.
podman run --rm --network=none "${mounts[@]}" --entrypoint /bin/sh "$softhsm" -c '
  set -e
  softhsm2-util --init-token --free --label xks-image-test --so-pin "$(cat /etc/xks-proxy/secrets/hsm-pin)-so" \
    --pin "$(cat /etc/xks-proxy/secrets/hsm-pin)" >/dev/null
  for k in demo-key:encrypt,decrypt demo-encrypt-only:encrypt demo-decrypt-only:decrypt demo-no-usage:none; do
    xks-proxy keys create -c /etc/xks-proxy/config.toml --label "${k%%:*}" --usage "${k#*:}"
  done
' >"$tmp/keys.log" 2>&1 || { cat "$tmp/keys.log" >&2; fail "token and keys"; }

# podman logs an error about systemd timers for the health check when systemd
# is not running (the check itself runs through `podman healthcheck run`).
podman run -d --name "$prod_ctr" --network=host --read-only --cap-drop=all \
  --security-opt=no-new-privileges -e XKS_PING_ADDR=127.0.0.1:18080 "${mounts[@]}" \
  "$softhsm" >"$tmp/run.log" 2>&1 || { cat "$tmp/run.log" >&2; fail "podman run $softhsm"; }
wait_ping "$prod_ctr" http://127.0.0.1:18080/ping
ok "$softhsm serving (read-only root, no capabilities): /ping on the ping listener"
curl -sf --max-time 5 http://127.0.0.1:19464/ping >/dev/null || fail "admin /ping"
podman healthcheck run "$prod_ctr" >/dev/null 2>&1 || fail "HEALTHCHECK (podman healthcheck run) is not healthy"
ok "HEALTHCHECK healthy"

base=https://127.0.0.1:18443/example/kms/xks/v1
md='"requestMetadata":{"awsPrincipalArn":"arn:aws:iam::123456789012:user/ci","kmsKeyArn":"arn:aws:kms:us-east-1:123456789012:key/ci","kmsRequestId":"image-test-'
status=$(xks_request "$base/health" "$ca" "$akid" "$secret" \
  '{"requestMetadata":{"kmsRequestId":"image-test-1","kmsOperation":"CreateCustomKeyStore"}}' "$tmp/health.json")
[ "$status" = 200 ] && jq -e '.xksProxyFleetSize == 1 and (.ekmFleetDetails | length) == 1' "$tmp/health.json" >/dev/null ||
  fail "GetHealthStatus: $status $(cat "$tmp/health.json")"
status=$(xks_request "$base/keys/demo-key/metadata" "$ca" "$akid" "$secret" \
  "{${md}2\",\"kmsOperation\":\"CreateKey\"}}" "$tmp/metadata.json")
[ "$status" = 200 ] && jq -e '.keySpec == "AES_256" and .keyStatus == "ENABLED"' "$tmp/metadata.json" >/dev/null ||
  fail "GetKeyMetadata: $status $(cat "$tmp/metadata.json")"
plaintext=$(head -c 64 /dev/urandom | base64 -w0)
aad=$(printf 'image-test' | base64 -w0)
status=$(xks_request "$base/keys/demo-key/encrypt" "$ca" "$akid" "$secret" \
  "{${md}3\",\"kmsOperation\":\"Encrypt\"},\"plaintext\":\"$plaintext\",\"encryptionAlgorithm\":\"AES_GCM\",\"additionalAuthenticatedData\":\"$aad\",\"ciphertextDataIntegrityValueAlgorithm\":\"SHA_256\"}" \
  "$tmp/encrypt.json")
[ "$status" = 200 ] || fail "Encrypt: $status $(cat "$tmp/encrypt.json")"
decrypt=$(jq -c --arg aad "$aad" --argjson md "{${md}4\",\"kmsOperation\":\"Decrypt\"}}" \
  '$md + {ciphertext, initializationVector, authenticationTag, encryptionAlgorithm: "AES_GCM",
   additionalAuthenticatedData: $aad} + (if .ciphertextMetadata then {ciphertextMetadata} else {} end)' "$tmp/encrypt.json")
status=$(xks_request "$base/keys/demo-key/decrypt" "$ca" "$akid" "$secret" "$decrypt" "$tmp/decrypt.json")
[ "$status" = 200 ] && [ "$(jq -r .plaintext "$tmp/decrypt.json")" = "$plaintext" ] ||
  fail "Decrypt: $status $(cat "$tmp/decrypt.json")"
status=$(xks_request "$base/health" "$ca" "$akid" "$(openssl rand -base64 32)" \
  '{"requestMetadata":{"kmsRequestId":"image-test-5","kmsOperation":"CreateCustomKeyStore"}}' "$tmp/bad.json")
[ "$status" = 401 ] && jq -e '.errorName == "AuthenticationFailedException"' "$tmp/bad.json" >/dev/null ||
  fail "a wrongly signed request: $status $(cat "$tmp/bad.json")"
ok "SigV4: GetHealthStatus, GetKeyMetadata, Encrypt + Decrypt round trip, wrong secret 401"

curl -sf --max-time 5 http://127.0.0.1:19464/metrics >"$tmp/metrics.txt" || fail "/metrics"
grep -q '^xks_requests_total{.*} [1-9]' "$tmp/metrics.txt" || fail "/metrics has no xks_requests_total"
ok "/metrics: $(grep -c '^xks_' "$tmp/metrics.txt") xks_ samples"

if [ -n "${XKS_COMPLIANCE_CLIENT:-}" ]; then
  # docs/compliance.md's invocation, against the container.
  (
    cd "$XKS_COMPLIANCE_CLIENT"
    XKS_PROXY_HOST=localhost:18443 URI_PREFIX=example SIGV4_ACCESS_KEY_ID=$akid \
      SIGV4_SECRET_ACCESS_KEY=$secret KEY_ID=demo-key ENCRYPT_ONLY_KEY_ID=demo-encrypt-only \
      DECRYPT_ONLY_KEY_ID=demo-decrypt-only IMPOTENT_KEY_ID=demo-no-usage \
      SECURE="--cacert $ca" ANSI_ESCAPE=0 timeout 120 ./test-xks-proxy -a
  ) >"$tmp/compliance.log" 2>&1 || true
  # Its last line, e.g. "All 49 tests PASSED." (after padding spaces).
  last=$(tail -1 "$tmp/compliance.log" | tr -d '\r' | sed 's/^ *//')
  [[ "$last" =~ ^All\ [0-9]+\ tests\ PASSED\.$ ]] || { tail -30 "$tmp/compliance.log" >&2; fail "compliance client: $last"; }
  ok "official compliance client: $last"
else
  echo "test-image.sh: XKS_COMPLIANCE_CLIENT not set: the official compliance client is not run" >&2
fi

# SIGTERM with a request in flight: an Encrypt whose 4 KiB body curl uploads
# at 1 KiB/s (a kilobyte a second), so the signal arrives mid-body. The drain
# must answer it, and the log shows it answered after the signal.
big=$(head -c 3000 /dev/urandom | base64 -w0)
xks_request "$base/keys/demo-key/encrypt" "$ca" "$akid" "$secret" \
  "{${md}6\",\"kmsOperation\":\"Encrypt\"},\"plaintext\":\"$big\",\"encryptionAlgorithm\":\"AES_GCM\"}" \
  "$tmp/inflight.json" --limit-rate 1K >"$tmp/inflight.status" 2>&1 &
inflight=$!
sleep 1
start=$SECONDS
podman kill --signal TERM "$prod_ctr" >/dev/null
code=$(timeout $((grace + 10)) podman wait "$prod_ctr") || fail "no exit within $((grace + 10)) s of SIGTERM"
took=$((SECONDS - start))
wait "$inflight" || true
[ "$code" = 0 ] || fail "exit code $code after SIGTERM"
[ "$took" -le "$grace" ] || fail "exit took $took s, more than shutdown_grace_secs = $grace"
[ "$(cat "$tmp/inflight.status")" = 200 ] || fail "the in-flight request: $(cat "$tmp/inflight.status") $(cat "$tmp/inflight.json" 2>/dev/null)"
podman logs "$prod_ctr" >"$tmp/prod.log" 2>&1
drain_line=$(grep -n "shutdown requested: no new connections, draining" "$tmp/prod.log" | cut -d: -f1)
[ -n "$drain_line" ] || fail "no drain line in the log"
answered_line=$(grep -n 'kms_request_id="image-test-6".*status=200' "$tmp/prod.log" | cut -d: -f1)
[ -n "$answered_line" ] && [ "$answered_line" -gt "$drain_line" ] ||
  fail "the in-flight request was not answered during the drain (log lines: drain $drain_line, answer ${answered_line:-none})"
grep -q "all connections closed" "$tmp/prod.log" || fail "the drain did not close every connection in time"
ok "SIGTERM: drain logged, the Encrypt in flight answered 200 after it, exit 0 after ${took} s (grace $grace s)"

# --- 3. The evaluation image alone ---------------------------------------------
podman run -d --name "$eval_ctr" --network=host -e XKS_PING_ADDR=127.0.0.1:28080 "$eval_image" \
  serve --config /etc/xks-proxy/config.toml --listen 127.0.0.1:28443 \
  --ping-listen 127.0.0.1:28080 --admin-listen 127.0.0.1:29464 >"$tmp/run.log" 2>&1 ||
  { cat "$tmp/run.log" >&2; fail "podman run $eval_image"; }
wait_ping "$eval_ctr" http://127.0.0.1:28080/ping
podman cp "$eval_ctr:/etc/xks-proxy/tls/ca.crt" "$tmp/eval-ca.crt"
ebase=https://127.0.0.1:28443/example/kms/xks/v1
# The published development credential A (README, "The development proxy").
dev_secret=ZGV2LXNlY3JldC1hLWRvLW5vdC11c2UtaW4tcHJvZHVjdGlvbg==
status=$(xks_request "$ebase/keys/demo-key/encrypt" "$tmp/eval-ca.crt" XKSPROXYDEVEXAMPLEKEYA "$dev_secret" \
  "{${md}7\",\"kmsOperation\":\"Encrypt\"},\"plaintext\":\"$plaintext\",\"encryptionAlgorithm\":\"AES_GCM\"}" \
  "$tmp/eval-encrypt.json")
[ "$status" = 200 ] || fail "evaluation Encrypt: $status $(cat "$tmp/eval-encrypt.json")"
decrypt=$(jq -c --argjson md "{${md}8\",\"kmsOperation\":\"Decrypt\"}}" \
  '$md + {ciphertext, initializationVector, authenticationTag, encryptionAlgorithm: "AES_GCM"}
   + (if .ciphertextMetadata then {ciphertextMetadata} else {} end)' "$tmp/eval-encrypt.json")
status=$(xks_request "$ebase/keys/demo-key/decrypt" "$tmp/eval-ca.crt" XKSPROXYDEVEXAMPLEKEYA "$dev_secret" \
  "$decrypt" "$tmp/eval-decrypt.json")
[ "$status" = 200 ] && [ "$(jq -r .plaintext "$tmp/eval-decrypt.json")" = "$plaintext" ] ||
  fail "evaluation Decrypt: $status $(cat "$tmp/eval-decrypt.json")"
podman stop -t 15 "$eval_ctr" >"$tmp/stop.log" 2>&1 || { cat "$tmp/stop.log" >&2; fail "podman stop"; }
[ "$(podman inspect --format '{{.State.ExitCode}}' "$eval_ctr")" = 0 ] || fail "evaluation image: exit code after stop"
ok "$eval_image alone: Encrypt + Decrypt round trip with the dev credential, clean stop"
echo "test-image.sh: all image tests passed" >&2
