#!/usr/bin/env bash
# Installs what the tests need, idempotently: psql (real client), Prometheus (Debian's 2.42, the
# remote-write receiver for the sink's end-to-end tests), PostgreSQL (lookup tables), the JDK
# with Debian's PostgreSQL JDBC driver and Node.js with node-postgres (client tests), Chromium
# with playwright-core (the console's browser tests), DuckDB,
# moto and psycopg in a venv (an independent reader of the Parquet lake; an S3-compatible server;
# the Python driver), sccache and mold (cheaper builds), and the
# tansu broker in .tools. Safe to run on a fresh machine or again.
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
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
command -v sccache >/dev/null 2>&1 || missing+=(sccache)
command -v mold >/dev/null 2>&1 || missing+=(mold)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
command -v javac >/dev/null 2>&1 || missing+=(openjdk-17-jdk-headless)
ls /usr/share/java/postgresql.jar >/dev/null 2>&1 || missing+=(libpostgresql-jdbc-java)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    apt_install "${missing[@]}"
fi

if ! .venv/bin/python -c 'import duckdb' >/dev/null 2>&1; then
    echo "installing DuckDB into .venv"
    python3 -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check 'duckdb>=1.1'
fi
# moto: an S3-compatible server in one process, for checkpoints to s3:// in the end-to-end tests.
if ! .venv/bin/python -c 'import moto.server' >/dev/null 2>&1; then
    echo "installing moto (S3-compatible test server) into .venv"
    .venv/bin/pip install --quiet --disable-pip-version-check 'moto[server]>=5,<6'
fi
# psycopg 3: the Python driver the front-door tests log in with (SCRAM, TLS, SQLSTATEs).
if ! .venv/bin/python -c 'import psycopg' >/dev/null 2>&1; then
    echo "installing psycopg 3 into .venv"
    .venv/bin/pip install --quiet --disable-pip-version-check 'psycopg[binary]>=3.2,<4'
fi
# node-postgres (npm `pg`): the Node.js driver the client-compatibility tests use.
if [ ! -f .tools/node/node_modules/pg/package.json ]; then
    echo "installing node-postgres into .tools/node"
    mkdir -p .tools/node
    npm install --silent --no-audit --no-fund --prefix .tools/node 'pg@^8.13'
fi
# playwright-core drives Debian's Chromium in the console's browser tests (it never downloads
# a browser of its own).
if [ ! -f .tools/node/node_modules/playwright-core/package.json ]; then
    echo "installing playwright-core into .tools/node"
    mkdir -p .tools/node
    npm install --silent --no-audit --no-fund --prefix .tools/node 'playwright-core@^1.50'
fi
# tansu: a Kafka-compatible broker in one process, for the Kafka end-to-end tests. Built once per
# machine into a cache outside the checkout (every CI run is a fresh clone), linked into .tools.
tansu_cache="${WEIR_TOOLS_CACHE:-$HOME/.cache/weir-tools}/tansu-0.6.0"
if ! "$tansu_cache/bin/tansu" --version >/dev/null 2>&1; then
    echo "installing tansu 0.6.0 into $tansu_cache (a Kafka-compatible broker; ~15 min the first time)"
    cargo install --quiet --locked tansu --version 0.6.0 --features dynostore,libsql --root "$tansu_cache"
fi
mkdir -p .tools/bin
ln -sf "$tansu_cache/bin/tansu" .tools/bin/tansu
echo "test dependencies ready: $(psql --version), $(ls -d /usr/lib/postgresql/*/bin | head -1), $(prometheus --version 2>&1 | head -1), duckdb $(.venv/bin/python -c 'import duckdb; print(duckdb.__version__)'), moto $(.venv/bin/python -c 'import moto; print(moto.__version__)'), psycopg $(.venv/bin/python -c 'import psycopg; print(psycopg.__version__)'), node-postgres $(node -p "require('./.tools/node/node_modules/pg/package.json').version"), playwright-core $(node -p "require('./.tools/node/node_modules/playwright-core/package.json').version"), $(chromium --version 2>/dev/null), $(javac -version 2>&1), $(.tools/bin/tansu --version)"
