#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests, openraft's storage suite on RocksDB, and
# the integration tests in tests/ that start real `berth master` processes.
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/prereqs.sh
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
# The integration tests drive the real binary.
cargo build -p berth-cli --bin berth
cargo test --workspace -- --test-threads 2
