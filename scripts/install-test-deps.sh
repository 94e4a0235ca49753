#!/usr/bin/env bash
# Installs what the tests need, idempotently: psql (real client), Prometheus (Debian's 2.42, the
# remote-write receiver for the sink's end-to-end tests), DuckDB in a venv (an independent reader
# of the Parquet lake), and the tansu broker in .tools. Safe to run on a fresh machine or again.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_install() {
    if [ "$(id -u)" -eq 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
    else
        sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
    fi
}

missing=()
command -v psql >/dev/null 2>&1 || missing+=(postgresql-client)
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    apt_install "${missing[@]}"
fi

if ! .venv/bin/python -c 'import duckdb' >/dev/null 2>&1; then
    echo "installing DuckDB into .venv"
    python3 -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check 'duckdb>=1.1'
fi
# tansu: a Kafka-compatible broker in one process, for the Kafka end-to-end tests.
if ! .tools/bin/tansu --version >/dev/null 2>&1; then
    echo "installing tansu 0.6.0 into .tools (a Kafka-compatible broker; ~15 min the first time)"
    cargo install --quiet --locked tansu --version 0.6.0 --features dynostore,libsql --root .tools
fi
echo "test dependencies ready: $(psql --version), $(prometheus --version 2>&1 | head -1), duckdb $(.venv/bin/python -c 'import duckdb; print(duckdb.__version__)'), $(.tools/bin/tansu --version)"
