//! The `postgres` table: a Postgres table (or query) as the lookup side of joins.
//!
//! Two modes, by `lookup.cache`:
//! - `full`: the whole result of the query is loaded into a [`MemoryTable`] at CREATE and
//!   reloaded every `reload.interval` (a reload that fails keeps the previous version).
//! - `partial` (the default): each batch's distinct keys that are not in the cache are looked
//!   up in one query (`WHERE key = ANY($1)`), several batches in flight at once over one
//!   pipelined connection; found rows and, by default, missing keys are cached in an LRU
//!   bounded by `cache.max_rows` and `cache.ttl` ([`cache::PartialTable`]).
//!
//! Postgres being unreachable is an outage to ride out: lookups retry with backoff and the
//! pipeline waits (back-pressure), records are neither dropped nor joined with NULLs.

mod cache;
mod convert;

use std::str::FromStr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use tokio_postgres::config::SslMode;
use weir_runtime::connector::{ConnectorError, TableFactory, TableSpec};
use weir_runtime::lookup::{LookupTable, MemoryTable};
use weir_runtime::{Error, Metrics, Result};
use weir_sql::Options;
use weir_sql::options::OptionError;

use crate::secret::Secret;

pub use cache::PartialTable;

/// Keys (found or missing) a partial cache holds by default.
const DEFAULT_CACHE_ROWS: u64 = 100_000;
/// How long a cached key is trusted by default.
const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(600);
const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(60);
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Validated `postgres` table options.
#[derive(Clone)]
pub struct PostgresTableFactory {
    config: Arc<PgConfig>,
}

impl std::fmt::Debug for PostgresTableFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PostgresTableFactory({})", self.config.spec.name)
    }
}

/// Everything a `postgres` table needs to connect and query.
pub(crate) struct PgConfig {
    pub spec: TableSpec,
    /// Host, port, user, database; the password is set at each connect from `password`.
    pg: tokio_postgres::Config,
    password: Option<Secret>,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    /// What rows come from: `"schema"."table"` or `(query) AS weir_source`.
    from: String,
    full: bool,
    reload_interval: Duration,
    pub max_rows: usize,
    pub ttl: Option<Duration>,
    pub cache_missing: bool,
    pub max_concurrency: usize,
    connect_timeout: Duration,
}

impl PgConfig {
    /// `SELECT "a", "b" FROM <from>`: the declared columns, in order.
    pub fn select(&self) -> String {
        let columns: Vec<String> = self
            .spec
            .schema
            .fields()
            .iter()
            .map(|f| quote_ident(f.name()))
            .collect();
        format!("SELECT {} FROM {}", columns.join(", "), self.from)
    }

    /// A new connection (its driver runs on a task of its own until the client is dropped).
    pub async fn connect(&self) -> Result<tokio_postgres::Client> {
        let mut pg = self.pg.clone();
        if let Some(password) = &self.password {
            pg.password(password.resolve().map_err(Error::Execution)?);
        }
        let connect = async {
            match &self.tls {
                None => {
                    let (client, connection) = pg.connect(tokio_postgres::NoTls).await?;
                    tokio::spawn(async move {
                        let _ = connection.await;
                    });
                    Ok::<_, tokio_postgres::Error>(client)
                }
                Some(tls) => {
                    let (client, connection) = pg.connect(tls.clone()).await?;
                    tokio::spawn(async move {
                        let _ = connection.await;
                    });
                    Ok(client)
                }
            }
        };
        match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(client)) => Ok(client),
            Ok(Err(e)) => Err(pg_error(&self.spec.name, &e)),
            Err(_) => Err(Error::external(
                weir_runtime::error::External::Connection,
                format!(
                    "postgres table '{}': no connection within {:?}",
                    self.spec.name, self.connect_timeout
                ),
            )),
        }
    }
}

/// A Postgres error as the user should read it: the server's message (with its SQLSTATE)
/// when there is one, never the connection's password.
///
/// By cause: the server's errors of classes 08 (connection), 53 (resources) and 57
/// (operator intervention: shutting down, too many connections...) and any failure without
/// a server error (refused, reset, TLS) are the database's; the rest (a missing table, a
/// wrong password, a bad query) are the user's to fix.
pub(crate) fn pg_error(table: &str, e: &tokio_postgres::Error) -> Error {
    use weir_runtime::error::External;
    match e.as_db_error() {
        Some(db) => {
            let message = format!(
                "postgres table '{table}': {} (SQLSTATE {}){}",
                db.message(),
                db.code().code(),
                db.hint()
                    .map(|h| format!("; hint: {h}"))
                    .unwrap_or_default()
            );
            match db.code().code().get(..2) {
                Some("08") => Error::external(External::Connection, message),
                Some("53") => Error::external(External::Resources, message),
                Some("57") => Error::external(External::Refused, message),
                _ => Error::Execution(message),
            }
        }
        None => Error::external(
            External::Connection,
            format!("postgres table '{table}': {e}"),
        ),
    }
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn option_error(key: &str, message: impl Into<String>) -> ConnectorError {
    ConnectorError::Option(OptionError::new(key, message))
}

impl PostgresTableFactory {
    pub fn try_new(spec: &TableSpec, options: &Options) -> Result<Self, ConnectorError> {
        let reader = options.reader();
        reader.string("connector");
        let url = reader.required("url")?;
        // libpq's verify-ca / verify-full: rustls always verifies the server's certificate
        // and name, so they mean what `require` does here.
        let url = match url.split_once("sslmode=") {
            Some((before, after)) => {
                let (mode, rest) = after.split_once('&').unwrap_or((after, ""));
                let mode = match mode {
                    "verify-full" | "verify-ca" => "require",
                    other => other,
                };
                let rest = if rest.is_empty() {
                    String::new()
                } else {
                    format!("&{rest}")
                };
                format!("{before}sslmode={mode}{rest}")
            }
            None => url.to_string(),
        };
        let pg = tokio_postgres::Config::from_str(&url).map_err(|e| {
            option_error(
                "url",
                format!("invalid value for option 'url': {e} (expected postgres://user@host:port/database)"),
            )
        })?;
        if pg.get_password().is_some() {
            return Err(option_error(
                "url",
                "option 'url' must not hold a password: use 'password' (a value or ${ENV_VAR}) or 'password_file'",
            ));
        }
        let password = Secret::read(&reader, "password")?;
        let tls = match pg.get_ssl_mode() {
            SslMode::Disable => None,
            _ => Some(tls_connector(reader.string("tls.ca_file"))?),
        };
        let from = match (reader.string("table"), reader.string("query")) {
            (Some(table), None) => table
                .split('.')
                .map(|part| quote_ident(part.trim_matches('"')))
                .collect::<Vec<_>>()
                .join("."),
            (None, Some(query)) => format!("({query}) AS weir_source"),
            _ => {
                return Err(option_error(
                    "table",
                    "a postgres table needs exactly one of 'table' and 'query'",
                ));
            }
        };
        let full = reader
            .one_of("lookup.cache", &["full", "partial"])?
            .as_deref()
            == Some("full");
        let reload_interval = reader
            .duration("reload.interval")?
            .unwrap_or(DEFAULT_RELOAD_INTERVAL);
        if reload_interval.is_zero() {
            return Err(option_error(
                "reload.interval",
                "invalid value for option 'reload.interval': expected a positive duration",
            ));
        }
        let max_rows = reader.u64("cache.max_rows")?.unwrap_or(DEFAULT_CACHE_ROWS);
        if max_rows == 0 {
            return Err(option_error(
                "cache.max_rows",
                "invalid value for option 'cache.max_rows': expected at least 1",
            ));
        }
        let ttl = match reader.duration("cache.ttl")? {
            Some(d) if d.is_zero() => None,
            Some(d) => Some(d),
            None => Some(DEFAULT_CACHE_TTL),
        };
        let cache_missing = reader.bool("cache.missing_keys")?.unwrap_or(true);
        let max_concurrency = match reader.u64("lookup.max_concurrency")? {
            None => weir_runtime::operators::DEFAULT_MAX_IN_FLIGHT,
            Some(n @ 1..=64) => n as usize,
            Some(_) => {
                return Err(option_error(
                    "lookup.max_concurrency",
                    "invalid value for option 'lookup.max_concurrency': expected 1 to 64",
                ));
            }
        };
        let connect_timeout = reader
            .duration("connect.timeout")?
            .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        reader.finish()?;
        Ok(Self {
            config: Arc::new(PgConfig {
                spec: spec.clone(),
                pg,
                password,
                tls,
                from,
                full,
                reload_interval,
                max_rows: max_rows as usize,
                ttl,
                cache_missing,
                max_concurrency,
                connect_timeout,
            }),
        })
    }
}

/// rustls with the Mozilla roots and the PEM certificates of `ca_file`.
fn tls_connector(
    ca_file: Option<&str>,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, ConnectorError> {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::CertificateDer;
    use tokio_rustls::rustls::pki_types::pem::PemObject;

    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let pem = std::fs::read(path).map_err(|e| {
            option_error(
                "tls.ca_file",
                format!("option 'tls.ca_file': cannot read {path}: {e}"),
            )
        })?;
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| {
                option_error("tls.ca_file", format!("option 'tls.ca_file': {path}: {e}"))
            })?;
            roots
                .add(cert)
                .map_err(|e| option_error("tls.ca_file", format!("option 'tls.ca_file': {e}")))?;
            added += 1;
        }
        if added == 0 {
            return Err(option_error(
                "tls.ca_file",
                format!("option 'tls.ca_file': no PEM certificates in {path}"),
            ));
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| ConnectorError::Invalid(format!("TLS: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

#[async_trait]
impl TableFactory for PostgresTableFactory {
    fn connector(&self) -> &'static str {
        "postgres"
    }

    async fn open(&self, metrics: &Metrics) -> Result<Arc<dyn LookupTable>> {
        let config = self.config.clone();
        let table_metrics = metrics.lookup_table(&config.spec.name);
        if config.full {
            let client = config.connect().await?;
            let rows = convert::load(&config, &client).await?;
            let table = MemoryTable::try_new(
                &config.spec.name,
                config.spec.schema.clone(),
                config.spec.key_columns.clone(),
                rows,
                table_metrics,
            )?;
            tokio::spawn(refresh(config, Arc::downgrade(&table)));
            return Ok(table);
        }
        Ok(Arc::new(
            PartialTable::open(config, table_metrics, self.config.spec.restoring).await?,
        ))
    }
}

/// Reloads a full-cache table every `reload_interval` until the table is gone.
async fn refresh(config: Arc<PgConfig>, table: Weak<MemoryTable>) {
    loop {
        tokio::time::sleep(config.reload_interval).await;
        if table.strong_count() == 0 {
            return;
        }
        let loaded = async {
            let client = config.connect().await?;
            convert::load(&config, &client).await
        }
        .await;
        let Some(table) = table.upgrade() else {
            return;
        };
        match loaded.and_then(|rows| table.publish(rows)) {
            Ok(()) => tracing::debug!(table = %config.spec.name, "postgres table reloaded"),
            Err(e) => table.refresh_failed(&e),
        }
    }
}

/// The table's schema, for the submodules.
pub(crate) fn schema(config: &PgConfig) -> SchemaRef {
    config.spec.schema.clone()
}
