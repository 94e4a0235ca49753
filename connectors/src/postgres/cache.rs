//! [`PartialTable`]: keys looked up in Postgres per batch, behind an LRU cache.
//!
//! Per batch: the keys are encoded in arrow's row format; each distinct key is answered from
//! the cache if it holds a fresh entry (a row, or "no such key"), and all the others in one
//! query, `SELECT ... WHERE (key) = ANY($1::type[])`. What the query finds is cached as rows in
//! arrow's row format (compact, and turned back into columns in one call), and so are the keys
//! it did not find, unless `cache.missing_keys` is off: without that, a stream of unknown ids
//! would send every one of them to the database, again and again.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, UInt32Array};
use arrow::compute::take;
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use arrow::row::{OwnedRow, RowConverter, SortField};
use async_trait::async_trait;
use lru::LruCache;
use tokio_postgres::types::ToSql;
use weir_runtime::Result;
use weir_runtime::lookup::{CacheMode, LookupRows, LookupTable};
use weir_runtime::metrics::LookupTableMetrics;
use weir_runtime::pipeline::RateLimitedLog;

use super::{PgConfig, convert, pg_error, quote_ident};

/// Backoff between attempts while Postgres cannot answer.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A cached answer for one key.
struct Entry {
    /// The table row (all columns), or `None`: Postgres has no row for the key.
    row: Option<OwnedRow>,
    at: Instant,
}

/// The cache and its size in bytes (estimated: key and row bytes).
struct Cache {
    entries: LruCache<Box<[u8]>, Entry, ahash::RandomState>,
    bytes: usize,
}

/// A connection and the key query prepared on it.
struct Connection {
    client: tokio_postgres::Client,
    lookup: tokio_postgres::Statement,
}

/// A `postgres` table in `partial` mode.
pub struct PartialTable {
    config: Arc<PgConfig>,
    /// `SELECT ... WHERE (keys) IN (SELECT * FROM unnest($1::t1[], ...))` (or `= ANY` for one
    /// key): built at the first connection, from the key columns' Postgres types.
    lookup_sql: tokio::sync::OnceCell<String>,
    /// The key columns' Arrow types (keys are cast to them before encoding).
    key_types: Vec<arrow::datatypes::DataType>,
    /// The keys in arrow's row format (one converter for the table: rows from one converter
    /// can only be read back by it).
    key_converter: RowConverter,
    /// Every column, to keep rows in the cache.
    row_converter: RowConverter,
    cache: Mutex<Cache>,
    connection: tokio::sync::Mutex<Option<Arc<Connection>>>,
    metrics: LookupTableMetrics,
    log: Mutex<RateLimitedLog>,
}

impl std::fmt::Debug for PartialTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PartialTable({})", self.config.spec.name)
    }
}

impl PartialTable {
    /// Connects and prepares the queries, so that an error in the user's `table` or `query`
    /// is the CREATE's error. While a saved catalog is restored (`restoring`), Postgres may be
    /// down: the table then connects at its first lookup.
    pub(crate) async fn open(
        config: Arc<PgConfig>,
        metrics: LookupTableMetrics,
        restoring: bool,
    ) -> Result<Self> {
        let schema = super::schema(&config);
        let key_types: Vec<arrow::datatypes::DataType> = config
            .spec
            .key_columns
            .iter()
            .map(|&k| schema.field(k).data_type().clone())
            .collect();
        let key_fields: Vec<SortField> = key_types.iter().cloned().map(SortField::new).collect();
        let row_fields: Vec<SortField> = schema
            .fields()
            .iter()
            .map(|f| SortField::new(f.data_type().clone()))
            .collect();
        let table = Self {
            lookup_sql: tokio::sync::OnceCell::new(),
            key_types,
            key_converter: RowConverter::new(key_fields)?,
            row_converter: RowConverter::new(row_fields)?,
            cache: Mutex::new(Cache {
                entries: LruCache::with_hasher(
                    NonZeroUsize::new(config.max_rows).unwrap_or(NonZeroUsize::MIN),
                    ahash::RandomState::new(),
                ),
                bytes: 0,
            }),
            connection: tokio::sync::Mutex::new(None),
            metrics,
            log: Mutex::new(RateLimitedLog::new(Duration::from_secs(10))),
            config,
        };
        match table.config.connect().await {
            Ok(client) => {
                table.connect_with(client).await?;
            }
            Err(e) if restoring => {
                tracing::warn!(table = %table.config.spec.name, error = %e,
                    "postgres is not reachable while the catalog is restored; lookups will connect when they need it");
            }
            Err(e) => return Err(e),
        }
        Ok(table)
    }

    /// The key query, with the key columns' Postgres types (learned from the plain select).
    async fn prepare_lookup_sql(&self, client: &tokio_postgres::Client) -> Result<String> {
        let config = &self.config;
        let select = client
            .prepare(&config.select())
            .await
            .map_err(|e| pg_error(&config.spec.name, &e))?;
        convert::check_columns(config, select.columns())?;
        let schema = super::schema(config);
        let keys: Vec<(String, String)> = config
            .spec
            .key_columns
            .iter()
            .map(|&k| {
                (
                    quote_ident(schema.field(k).name()),
                    select.columns()[k].type_().name().to_string(),
                )
            })
            .collect();
        let select = config.select();
        Ok(match keys.as_slice() {
            [(column, ty)] => format!("{select} WHERE {column} = ANY($1::{ty}[])"),
            _ => {
                let columns: Vec<&str> = keys.iter().map(|(c, _)| c.as_str()).collect();
                let arrays: Vec<String> = keys
                    .iter()
                    .enumerate()
                    .map(|(i, (_, ty))| format!("${}::{ty}[]", i + 1))
                    .collect();
                format!(
                    "{select} WHERE ({}) IN (SELECT * FROM unnest({}))",
                    columns.join(", "),
                    arrays.join(", ")
                )
            }
        })
    }

    async fn connect_with(&self, client: tokio_postgres::Client) -> Result<Arc<Connection>> {
        let sql = self
            .lookup_sql
            .get_or_try_init(|| self.prepare_lookup_sql(&client))
            .await?;
        let lookup = client
            .prepare(sql)
            .await
            .map_err(|e| pg_error(&self.config.spec.name, &e))?;
        let connection = Arc::new(Connection { client, lookup });
        *self.connection.lock().await = Some(connection.clone());
        Ok(connection)
    }

    /// The open connection, or a new one.
    async fn connection(&self) -> Result<Arc<Connection>> {
        if let Some(c) = self.connection.lock().await.as_ref()
            && !c.client.is_closed()
        {
            return Ok(c.clone());
        }
        let client = self.config.connect().await?;
        self.connect_with(client).await
    }

    /// The rows Postgres has for `keys` (one array per key column), retried with backoff
    /// until it answers: an outage makes the pipeline wait, it never loses records.
    async fn fetch(&self, keys: &[ArrayRef]) -> Result<RecordBatch> {
        let mut backoff = MIN_BACKOFF;
        loop {
            let attempt = async {
                let connection = self.connection().await?;
                let params: Vec<Box<dyn ToSql + Sync + Send>> = keys
                    .iter()
                    .zip(connection.lookup.params())
                    .map(|(k, ty)| convert::key_param(k, ty))
                    .collect::<Result<_>>()?;
                let refs: Vec<&(dyn ToSql + Sync)> = params
                    .iter()
                    .map(|p| p.as_ref() as &(dyn ToSql + Sync))
                    .collect();
                self.metrics.queries.inc();
                let rows = connection
                    .client
                    .query(&connection.lookup, &refs)
                    .await
                    .map_err(|e| pg_error(&self.config.spec.name, &e))?;
                convert::rows_to_batch(&super::schema(&self.config), &rows)
            };
            match attempt.await {
                Ok(batch) => return Ok(batch),
                Err(e) => {
                    self.metrics.retries.inc();
                    self.log
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .log(|suppressed| {
                            tracing::warn!(table = %self.config.spec.name, error = %e, suppressed,
                                retry_in = ?backoff, "postgres lookup failed; retrying (the pipeline waits)");
                        });
                    *self.connection.lock().await = None;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    fn record_cache(&self, cache: &Cache) {
        let gauge = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        self.metrics.cache_rows.set(gauge(cache.entries.len()));
        self.metrics.cache_bytes.set(gauge(cache.bytes));
    }
}

/// Where a distinct key's row is.
#[derive(Clone, Copy)]
enum Answer {
    /// Row `n` of the rows returned.
    Row(u32),
    Missing,
    /// Not cached: to fetch.
    Fetch,
}

#[async_trait]
impl LookupTable for PartialTable {
    fn schema(&self) -> SchemaRef {
        super::schema(&self.config)
    }

    fn key_columns(&self) -> &[usize] {
        &self.config.spec.key_columns
    }

    fn cache_mode(&self) -> CacheMode {
        CacheMode::Partial
    }

    fn max_concurrency(&self) -> usize {
        self.config.max_concurrency
    }

    async fn lookup(&self, keys: &[ArrayRef]) -> Result<LookupRows> {
        let keys = weir_runtime::lookup::cast_all(keys, &self.key_types)?;
        let len = keys.first().map_or(0, |k| k.len());
        let encoded = self.key_converter.convert_columns(&keys)?;
        let row_converter = &self.row_converter;
        let any_null = keys.iter().any(|k| k.null_count() > 0);

        // Distinct keys: answered by the cache, or to fetch (by the first row that has them).
        let mut rows: Vec<OwnedRow> = Vec::new();
        let mut answers: std::collections::HashMap<&[u8], Answer, ahash::RandomState> =
            std::collections::HashMap::with_hasher(ahash::RandomState::new());
        let mut per_row: Vec<Option<&[u8]>> = Vec::with_capacity(len);
        let mut to_fetch: Vec<u32> = Vec::new();
        // Keys of this batch that the cache did not answer.
        let mut answers_fetched: std::collections::HashSet<&[u8], ahash::RandomState> =
            std::collections::HashSet::with_hasher(ahash::RandomState::new());
        {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            let ttl = self.config.ttl;
            for i in 0..len {
                if any_null && keys.iter().any(|k| k.is_null(i)) {
                    per_row.push(None);
                    continue;
                }
                let key = encoded.row(i).data();
                per_row.push(Some(key));
                if answers.contains_key(key) {
                    continue;
                }
                let cached = cache
                    .entries
                    .get(key)
                    .filter(|e| ttl.is_none_or(|ttl| e.at.elapsed() < ttl))
                    .map(|e| e.row.clone());
                let answer = match cached {
                    Some(Some(row)) => {
                        rows.push(row);
                        Answer::Row(rows.len() as u32 - 1)
                    }
                    Some(None) => Answer::Missing,
                    None => {
                        to_fetch.push(i as u32);
                        answers_fetched.insert(key);
                        Answer::Fetch
                    }
                };
                answers.insert(key, answer);
            }
        }

        if !to_fetch.is_empty() {
            let picks = UInt32Array::from(to_fetch.clone());
            let fetch_keys: Vec<ArrayRef> = keys
                .iter()
                .map(|k| take(k.as_ref(), &picks, None))
                .collect::<Result<_, _>>()?;
            let fetched = self.fetch(&fetch_keys).await?;
            // Fetched rows by their key bytes (a query that returns a key twice: last wins).
            let fetched_keys: Vec<ArrayRef> = self
                .config
                .spec
                .key_columns
                .iter()
                .map(|&c| fetched.column(c).clone())
                .collect();
            let fetched_keys = weir_runtime::lookup::cast_all(&fetched_keys, &self.key_types)?;
            let fetched_encoded = self.key_converter.convert_columns(&fetched_keys)?;
            let fetched_rows = row_converter.convert_columns(fetched.columns())?;
            let mut found: std::collections::HashMap<&[u8], usize, ahash::RandomState> =
                std::collections::HashMap::with_hasher(ahash::RandomState::new());
            for j in 0..fetched.num_rows() {
                found.insert(fetched_encoded.row(j).data(), j);
            }
            let now = Instant::now();
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            for &i in &to_fetch {
                let key = encoded.row(i as usize).data();
                let (answer, row) = match found.get(key) {
                    Some(&j) => {
                        let row = fetched_rows.row(j).owned();
                        rows.push(row.clone());
                        (Answer::Row(rows.len() as u32 - 1), Some(row))
                    }
                    None => (Answer::Missing, None),
                };
                answers.insert(key, answer);
                if row.is_some() || self.config.cache_missing {
                    let size = key.len() + row.as_ref().map_or(0, |r| r.row().data().len()) + 64;
                    cache.bytes += size;
                    let evicted = cache.entries.push(key.into(), Entry { row, at: now });
                    if let Some((k, old)) = evicted {
                        let freed =
                            k.len() + old.row.as_ref().map_or(0, |r| r.row().data().len()) + 64;
                        cache.bytes = cache.bytes.saturating_sub(freed);
                    }
                }
            }
            self.record_cache(&cache);
        }

        let fetched_records = per_row
            .iter()
            .filter(|k| k.and_then(|k| answers_fetched.get(k)).is_some())
            .count();
        let keyed = per_row.iter().flatten().count();
        self.metrics.cache_misses.inc_by(fetched_records as u64);
        self.metrics
            .cache_hits
            .inc_by((keyed - fetched_records) as u64);
        let indices: UInt32Array = per_row
            .iter()
            .map(|key| match key.and_then(|k| answers.get(k)) {
                Some(Answer::Row(n)) => Some(*n),
                _ => None,
            })
            .collect();
        let columns = row_converter.convert_rows(rows.iter().map(|r| r.row()))?;
        let rows = RecordBatch::try_new_with_options(
            self.schema(),
            columns,
            &arrow::record_batch::RecordBatchOptions::new().with_row_count(Some(rows.len())),
        )?;
        Ok(LookupRows { rows, indices })
    }

    /// Reads the whole table through to Postgres (a one-off `SELECT`; not cached).
    async fn scan(&self) -> Result<Vec<RecordBatch>> {
        let connection = self.connection().await?;
        let rows = connection
            .client
            .query(&self.config.select(), &[])
            .await
            .map_err(|e| pg_error(&self.config.spec.name, &e))?;
        Ok(vec![convert::rows_to_batch(&self.schema(), &rows)?])
    }
}
