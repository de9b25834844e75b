#!/usr/bin/env bash
# The whole test suite: formatting, lints, dependency hygiene (cargo-deny), unit tests, openraft's storage suite on RocksDB, the
# integration tests in tests/ that start real `berth master` processes, and the quick chaos suite
# (berth-chaos suite --quick: real clusters under kill -9, pauses, partitions and agent cut-offs,
# and service churn with agents killed mid-stop, checked for linearizability, lost writes, watch
# gaps, double runs and orphaned task processes).
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/prereqs.sh
source deploy/chaos-prereqs.sh
source deploy/storage-prereqs.sh
source deploy/sandbox-prereqs.sh
source deploy/edge-prereqs.sh
source deploy/console-prereqs.sh
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
# Licences, banned crates, duplicate versions and sources (deny.toml). cargo-deny is built once
# per machine (about 3 minutes), into its own target dir so it never touches berth's.
if ! command -v cargo-deny >/dev/null 2>&1; then
  CARGO_TARGET_DIR="${HOME:-/root}/.cache/berth/cargo-deny-target" cargo install --locked --quiet cargo-deny@0.20.2
fi
cargo deny --log-level error check licenses bans sources
# The integration tests and the chaos suite drive the real binaries.
cargo build -p berth-cli --bin berth -p berth-chaos --bin berth-chaos
cargo test --workspace -- --test-threads 2
target="${CARGO_TARGET_DIR:-target}"
"$target/debug/berth-chaos" suite --quick --out "$target/chaos-ci"
