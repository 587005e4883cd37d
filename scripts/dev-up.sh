#!/usr/bin/env bash
# One command from a fresh Debian machine to a running proxy on SoftHSM:
# packages, build, SoftHSM token with demo keys, dev TLS material, start.
# Everything lives in the repo: .dev/ (token, PIN, secrets) and certs/.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
. scripts/lib.sh
ensure_packages

# Without Cedar policies (the `authorization` feature, on by default): it is
# most of a clean build's time, and the dev setup does not use it. For
# policies: cargo build --release (default features).
cargo build --release --no-default-features --bin xks-proxy
bin=$root/target/release/xks-proxy

umask 077
mkdir -p .dev/tokens .dev/secrets
cat > .dev/softhsm2.conf <<CONF
directories.tokendir = $root/.dev/tokens
objectstore.backend = file
log.level = ERROR
slots.removable = false
CONF
export SOFTHSM2_CONF=$root/.dev/softhsm2.conf

# Development-only secrets, published in the README. Never reuse them.
[ -f .dev/hsm-pin ] || printf '%s\n' 'xks-dev-pin' > .dev/hsm-pin
[ -f .dev/secrets/dev-a.secret ] || printf '%s\n' 'ZGV2LXNlY3JldC1hLWRvLW5vdC11c2UtaW4tcHJvZHVjdGlvbg==' > .dev/secrets/dev-a.secret
[ -f .dev/secrets/dev-b.secret ] || printf '%s\n' 'ZGV2LXNlY3JldC1iLWRvLW5vdC11c2UtaW4tcHJvZHVjdGlvbg==' > .dev/secrets/dev-b.secret

if ! softhsm2-util --show-slots 2>/dev/null | grep -q 'Label: *xks-dev *$'; then
  softhsm2-util --init-token --free --label xks-dev --so-pin xks-dev-so-pin --pin "$(cat .dev/hsm-pin)" >/dev/null
  echo "created SoftHSM token 'xks-dev' in .dev/tokens"
fi

scripts/dev-certs.sh certs >/dev/null

# Demo keys: one per usage combination.
"$bin" keys create -c config/dev.toml --label demo-key --usage encrypt,decrypt --if-missing
"$bin" keys create -c config/dev.toml --label demo-encrypt-only --usage encrypt --if-missing
"$bin" keys create -c config/dev.toml --label demo-decrypt-only --usage decrypt --if-missing
"$bin" keys create -c config/dev.toml --label demo-no-usage --usage none --if-missing

cat <<MSG

xks-proxy (dev) starting on https://localhost:8443, URI path /example/kms/xks/v1
Try, from another shell in $root:

  curl --cacert certs/ca.crt --aws-sigv4 "aws:amz:us-east-1:kms-xks-proxy" \\
    --user "XKSPROXYDEVEXAMPLEKEYA:$(cat .dev/secrets/dev-a.secret)" \\
    -H "Content-Type: application/json" \\
    -d '{"requestMetadata":{"awsPrincipalArn":"arn:aws:iam::123456789012:user/Alice","kmsKeyArn":"arn:aws:kms:us-east-1:123456789012:key/demo","kmsOperation":"Encrypt","kmsRequestId":"demo-1"},"plaintext":"SGVsbG8gV29ybGQh","encryptionAlgorithm":"AES_GCM","ciphertextDataIntegrityValueAlgorithm":"SHA_256"}' \\
    https://localhost:8443/example/kms/xks/v1/keys/demo-key/encrypt

MSG
exec "$bin" serve --config config/dev.toml
