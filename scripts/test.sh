#!/usr/bin/env bash
# Runs every test: installs what the tests need, builds, then unit, SQL logic (.slt) and
# end-to-end tests. This is the command the README shows and CI runs (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-test-deps.sh

# Compiled dependencies are cached across checkouts on this machine (CI clones afresh), and
# mold links the large test binaries in a fraction of ld's time. No CARGO_* variable is set
# here (cargo colours nothing when its output is not a terminal anyway): sccache hashes every
# CARGO_* variable into a compile's key, so a build with CARGO_TERM_COLOR=never shared no
# cache entry with the same build without it (measured: a miss, then a hit without it).
if [ -z "${RUSTC_WRAPPER:-}" ] && command -v sccache >/dev/null 2>&1; then
    export RUSTC_WRAPPER=sccache
fi
if [ -z "${RUSTFLAGS:-}" ] && command -v mold >/dev/null 2>&1; then
    export RUSTFLAGS="-C link-arg=-fuse-ld=mold"
fi
cargo fmt --all -- --check
cargo clippy -j2 --workspace --all-targets -- -D warnings
# One build of every target (the `weir` binary the end-to-end tests drive included), so that
# features resolve once: building the binary alone would resolve them without the
# dev-dependencies, and `cargo test` would then compile DataFusion a second time.
cargo build -j2 --workspace --all-targets
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test -j2 --workspace --all-targets -- --test-threads=2 2>&1 | tee "$log"
# One closing line over every test binary (cargo prints a summary per binary; the .slt
# runner prints "N passed, N failed"). Any failure has already stopped the script above.
awk '/test result: ok\./ { n += $4 } /^[0-9]+ passed, 0 failed$/ { n += $1 } END { printf "all tests: %d passed, 0 failed\n", n }' "$log"
