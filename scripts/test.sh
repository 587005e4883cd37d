#!/usr/bin/env bash
# Runs the whole test suite: unit tests and the integration tests, which start
# real proxy processes over TLS against fresh tokens in temp dirs: every
# suite on SoftHSM, the key-manager suites again on Kryoptic (a second,
# independent PKCS#11 implementation), and the refusal of a token without
# AES-GCM on openCryptoki. Installs the Debian packages the tests need when
# they are missing (openCryptoki's daemon needs root, as in CI).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_packages
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The build without Cedar (what scripts/dev-up.sh runs) must compile, lint
# clean and refuse policies with the reason. Only the crates above the
# guard are checked again (the feature is the guard crate's).
cargo clippy --workspace --all-targets --locked --no-default-features -- -D warnings
cargo test --locked --no-default-features -p xks-guard --lib authz
# Deployment artefacts, each with its own linter (promtool, cfn-lint,
# kubernetes-validate, the AWS CLI's argument model).
scripts/check-deploy.sh
scripts/p11-kit-rpc.sh >/dev/null
# Kryoptic, pinned and checked, built once into a cache outside the clone.
XKS_TEST_KRYOPTIC="$(scripts/kryoptic.sh)"
export XKS_TEST_KRYOPTIC
cargo test --workspace --locked --all-targets
# The suites that exercise the key manager, on Kryoptic. Two tests are
# SoftHSM's alone: they make a token lose its objects by moving SoftHSM's
# token directory away, which does nothing to Kryoptic (its sqlite database
# stays open), so there is no such fault to recover from.
XKS_TEST_PKCS11=kryoptic cargo test --locked \
  --test api --test hsm --test rotation --test audit --test audit_runs \
  --test lockdown --test operating --test operating_keys --test availability \
  --test fleet --test key_managers --test check --test auth --test security -- \
  --skip a_token_that_loses_its_objects_recovers_without_restart \
  --skip a_failed_token_does_not_disturb_its_neighbour_on_the_same_module
