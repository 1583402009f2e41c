#!/usr/bin/env bash
# Installs what is missing, then runs every check CI runs: formatting, lints, all tests.
# The integration tests create network namespaces and run etcd: run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
