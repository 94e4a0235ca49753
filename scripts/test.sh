#!/usr/bin/env bash
# Runs every test: installs what the tests need, builds, then unit, SQL logic (.slt) and
# end-to-end tests. This is the command the README shows and CI runs (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-test-deps.sh

export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
cargo fmt --all -- --check
cargo clippy -j2 --workspace --all-targets -- -D warnings
# One build of every target (the `weir` binary the end-to-end tests drive included), so that
# features resolve once: building the binary alone would resolve them without the
# dev-dependencies, and `cargo test` would then compile DataFusion a second time.
cargo build -j2 --workspace --all-targets
cargo test -j2 --workspace -- --test-threads=2
