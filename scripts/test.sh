#!/usr/bin/env bash
# Runs the whole test suite: unit tests and the integration tests, which start
# real proxy processes over TLS against fresh SoftHSM tokens in temp dirs.
# Installs the Debian packages the tests need when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_packages
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
# The build without Cedar (what scripts/dev-up.sh runs) must compile, lint
# clean and refuse policies with the reason.
cargo clippy --all-targets --locked --no-default-features -- -D warnings
cargo test --locked --no-default-features --lib guard::authz
# Deployment artefacts, each with its own linter (promtool, cfn-lint,
# kubernetes-validate, the AWS CLI's argument model).
scripts/check-deploy.sh
scripts/p11-kit-rpc.sh >/dev/null
cargo test --locked --all-targets
