#!/usr/bin/env bash
# Runs every check and test of the repository; exits non-zero on the first failure.
#   SKIP_SETUP=1  skip scripts/setup.sh (packages, toolchain and KVM already checked)
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*" >&2; }

if [ "${SKIP_SETUP:-0}" != 1 ]; then
    step "setup"
    scripts/setup.sh
fi

# The test guest is a separate crate (not a workspace member) with its own profile and
# target dir; the harness finds it at target/testguest.
if [ -f runtime/testguest/Cargo.toml ]; then
    step "build the test guest"
    (cd runtime/testguest && cargo build --release --target-dir ../../target/testguest)
    step "cargo fmt (test guest)"
    cargo fmt --manifest-path runtime/testguest/Cargo.toml -- --check
else
    printf 'warning: runtime/testguest/Cargo.toml not found; tests that boot the test guest will fail\n' >&2
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

# The e2e tests run the release VMM; build it here so its progress is visible.
step "build the release VMM"
cargo build --release -p ferrovirt-runtime --bin ferrovirt-vmm

step "cargo test"
cargo test --workspace

# Tests against a real Kubernetes (tests/k8s/README.md): its binaries are built once into a
# cache outside the tree; cluster.sh starts a one-node cluster around the test binaries and
# removes it afterwards, also when they fail. Add a suite that needs the cluster here (a
# [[test]] of ferrovirt-tests with required-features = ["k8s"]).
K8S_TESTS=(k8s_harness k8s_controller k8s_device_plugin k8s_node)
step "build the test Kubernetes"
tests/k8s/build.sh
step "cargo clippy (k8s tests)"
cargo clippy -p ferrovirt-tests --all-targets --features k8s -- -D warnings
step "tests on the test Kubernetes: ${K8S_TESTS[*]}"
k8s_test_args=()
for suite in "${K8S_TESTS[@]}"; do k8s_test_args+=(--test "$suite"); done
tests/k8s/cluster.sh run -- cargo test -p ferrovirt-tests --features k8s "${k8s_test_args[@]}"

step "all checks passed"
