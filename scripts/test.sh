#!/usr/bin/env bash
# Runs every test: installs what the tests need, builds, then unit, SQL logic (.slt) and
# end-to-end tests. This is the command the README shows and CI runs (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-test-deps.sh

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
cargo fmt --all -- --check
cargo clippy -j2 --workspace --all-targets -- -D warnings
# The end-to-end tests drive the real binary.
cargo build -j2 --bin weir
cargo test -j2 --workspace -- --test-threads=2
