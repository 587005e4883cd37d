#!/usr/bin/env bash
# Runs the whole test suite: unit tests and the integration tests, which start
# real proxy processes over TLS against fresh tokens in temp dirs: every
# suite on SoftHSM, the key-manager suites again on Kryoptic (a second,
# independent PKCS#11 implementation), and the refusal of a token without
# AES-GCM on openCryptoki. Then the release build's container images and
# Debian package, built and run as an operator would (scripts/packages.sh).
# Installs the Debian packages the tests need when they are missing
# (openCryptoki's daemon and dpkg -i need root, as in CI).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
# Each phase's start, in seconds since this script started (stderr).
phase() { echo "== test.sh ${SECONDS}s: $*" >&2; }
phase packages
ensure_packages
phase "fmt, clippy (default features, then without Cedar)"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The build without Cedar (what scripts/dev-up.sh runs) must compile, lint
# clean and refuse policies with the reason. Only the crates above the
# guard are checked again (the feature is the guard crate's).
cargo clippy --workspace --all-targets --locked --no-default-features -- -D warnings
cargo test --locked --no-default-features -p xks-guard --lib authz
# Deployment artefacts, each with its own linter (promtool, cfn-lint,
# kubernetes-validate, the AWS CLI's argument model).
phase "deployment artefacts"
scripts/check-deploy.sh
# p11-kit and Kryoptic: pinned third-party builds, each built once into a
# cache outside the clone, keyed by version and checksum.
phase "p11-kit, Kryoptic"
XKS_P11_KIT_PREFIX="$(scripts/p11-kit-rpc.sh)"
export XKS_P11_KIT_PREFIX
XKS_TEST_KRYOPTIC="$(scripts/kryoptic.sh)"
export XKS_TEST_KRYOPTIC
phase "tests on SoftHSM"
cargo test --workspace --locked --all-targets
phase "key-manager suites on Kryoptic"
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
# The images and the .deb of docs/deploy.md, built from a release build and
# tested as an operator runs them (podman; dpkg -i/-r/--purge as root).
phase "packages: images and .deb"
scripts/packages.sh
phase "all passed"
