//! The `kafka` table: a compacted topic read as a changelog and held in memory.
//!
//! A record's key is the row's primary key (a JSON object of the key columns, or a bare JSON
//! value when the key is one column); its value, a JSON object, is the row (key columns in the
//! value are overwritten by the key's); a null value (a tombstone) deletes the key. Every
//! partition is read from its beginning, without a consumer group (nothing is committed: like
//! a Kafka Streams global table, the table is rebuilt from the topic at each start).
//!
//! [`KafkaTableFactory::open`], CREATE TABLE, returns only once every partition has been read
//! up to the end offset it had when the table was opened: the first record joined already
//! sees the whole table (ksqlDB joins records against a table still loading, and its users
//! get NULL enrichments). A thread then keeps applying what is produced, in batches; a
//! lookup holds a read lock for its batch, so it sees the table between two batches of
//! changes, never inside one.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, UInt32Array};
use arrow::compute::{cast, take};
use arrow::datatypes::{Field, Schema, SchemaRef};
use arrow::record_batch::{RecordBatch, RecordBatchOptions};
use arrow::row::{OwnedRow, RowConverter, SortField};
use async_trait::async_trait;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};
use weir_runtime::connector::{ConnectorError, TableFactory, TableSpec};
use weir_runtime::lookup::{CacheMode, LookupRows, LookupTable};
use weir_runtime::metrics::LookupTableMetrics;
use weir_runtime::pipeline::RateLimitedLog;
use weir_runtime::{Error, Metrics, Result};
use weir_sql::Options;

use super::ClientSettings;
use crate::decode::{BlockDecoder, Format};

/// Messages applied per batch of changes at most.
const POLL_BATCH: usize = 8192;
/// How often the lag behind the topic's end is measured.
const LAG_EVERY: Duration = Duration::from_secs(5);

/// Validated `kafka` table options.
#[derive(Debug, Clone)]
pub struct KafkaTableFactory {
    spec: TableSpec,
    topic: String,
    client: ClientSettings,
    connect_timeout: Duration,
}

impl KafkaTableFactory {
    pub fn try_new(spec: &TableSpec, options: &Options) -> Result<Self, ConnectorError> {
        let reader = options.reader();
        reader.string("connector");
        let topic = reader.required("topic")?.to_string();
        let client = ClientSettings::read(&reader)?;
        reader.one_of("format", &["json"])?;
        let connect_timeout = reader
            .duration("connect.timeout")?
            .unwrap_or(Duration::from_secs(10));
        reader.finish()?;
        client
            .config(&[])
            .create::<BaseConsumer>()
            .map_err(|e| ConnectorError::Invalid(format!("invalid Kafka client settings: {e}")))?;
        if !spec.restoring {
            client.check_topic(&topic, connect_timeout)?;
        }
        Ok(Self {
            spec: spec.clone(),
            topic,
            client,
            connect_timeout,
        })
    }
}

/// The table's rows by key (both in arrow's row format).
struct State {
    rows: HashMap<Box<[u8]>, OwnedRow, ahash::RandomState>,
    bytes: usize,
}

/// A compacted topic as a lookup table.
pub struct KafkaTable {
    name: String,
    schema: SchemaRef,
    key_columns: Vec<usize>,
    key_types: Vec<arrow::datatypes::DataType>,
    /// Keys and rows in arrow's row format: one converter each for the table, since rows
    /// from one converter can only be read back by it.
    key_converter: RowConverter,
    row_converter: RowConverter,
    state: RwLock<State>,
    metrics: LookupTableMetrics,
}

impl std::fmt::Debug for KafkaTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KafkaTable({})", self.name)
    }
}

#[async_trait]
impl TableFactory for KafkaTableFactory {
    fn connector(&self) -> &'static str {
        "kafka"
    }

    async fn open(&self, metrics: &Metrics) -> Result<Arc<dyn LookupTable>> {
        let schema = self.spec.schema.clone();
        let table = Arc::new(KafkaTable {
            name: self.spec.name.clone(),
            key_types: self
                .spec
                .key_columns
                .iter()
                .map(|&k| schema.field(k).data_type().clone())
                .collect(),
            key_converter: RowConverter::new(
                self.spec
                    .key_columns
                    .iter()
                    .map(|&k| SortField::new(schema.field(k).data_type().clone()))
                    .collect(),
            )?,
            row_converter: RowConverter::new(
                schema
                    .fields()
                    .iter()
                    .map(|f| SortField::new(f.data_type().clone()))
                    .collect(),
            )?,
            key_columns: self.spec.key_columns.clone(),
            schema,
            state: RwLock::new(State {
                rows: HashMap::with_hasher(ahash::RandomState::new()),
                bytes: 0,
            }),
            metrics: metrics.lookup_table(&self.spec.name),
        });
        let (loaded_tx, loaded_rx) = tokio::sync::oneshot::channel();
        let follower = Follower::new(self.clone(), Arc::downgrade(&table))?;
        std::thread::Builder::new()
            .name(format!("weir-table-{}", self.spec.name))
            .spawn(move || follower.run(loaded_tx))
            .map_err(|e| Error::Internal(format!("cannot start the table's thread: {e}")))?;
        match loaded_rx.await {
            Ok(Ok(())) => Ok(table),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::Internal(
                "the table's thread ended while loading".into(),
            )),
        }
    }
}

/// The thread that reads the topic into the table.
struct Follower {
    config: KafkaTableFactory,
    table: Weak<KafkaTable>,
    consumer: BaseConsumer,
    keys: BlockDecoder,
    values: BlockDecoder,
    key_schema: SchemaRef,
    log: RateLimitedLog,
}

impl Follower {
    fn new(config: KafkaTableFactory, table: Weak<KafkaTable>) -> Result<Self> {
        let consumer: BaseConsumer = config
            .client
            .config(&[
                ("group.id", &format!("weir-table-{}", config.spec.name)),
                ("enable.auto.commit", "false"),
                ("enable.auto.offset.store", "false"),
                ("auto.offset.reset", "earliest"),
                ("fetch.queue.backoff.ms", "50"),
            ])
            .create()
            .map_err(|e| Error::Execution(format!("invalid Kafka client settings: {e}")))?;
        // Keys hold the key columns; values the rest (every column nullable while decoding:
        // a value may leave out the key columns).
        let key_schema = Arc::new(Schema::new(
            config
                .spec
                .key_columns
                .iter()
                .map(|&k| config.spec.schema.field(k).clone().with_nullable(true))
                .collect::<Vec<Field>>(),
        ));
        let value_schema = Arc::new(Schema::new(
            config
                .spec
                .schema
                .fields()
                .iter()
                .map(|f| f.as_ref().clone().with_nullable(true))
                .collect::<Vec<Field>>(),
        ));
        Ok(Self {
            keys: BlockDecoder::new(key_schema.clone(), Format::Json, POLL_BATCH),
            values: BlockDecoder::new(value_schema, Format::Json, POLL_BATCH),
            key_schema,
            consumer,
            config,
            table,
            log: RateLimitedLog::new(Duration::from_secs(10)),
        })
    }

    /// Assigns every partition from its beginning, reads up to the end offsets they have now
    /// (then says so on `loaded`), and goes on applying changes until the table is dropped.
    fn run(mut self, loaded: tokio::sync::oneshot::Sender<Result<()>>) {
        let ends = match self.assign() {
            Ok(ends) => ends,
            Err(e) => {
                let _ = loaded.send(Err(e));
                return;
            }
        };
        let mut loaded = Some((loaded, ends, Instant::now()));
        let mut positions: HashMap<i32, i64> = HashMap::new();
        let mut last_lag = Instant::now();
        let mut progress = Instant::now();
        loop {
            if self.table.strong_count() == 0 {
                return;
            }
            let messages = self.poll();
            if !messages.is_empty() {
                progress = Instant::now();
                for m in &messages {
                    positions.insert(m.partition, m.offset + 1);
                }
                if let Err(e) = self.apply(&messages) {
                    self.log.log(|suppressed| {
                        tracing::warn!(table = %self.config.spec.name, error = %e, suppressed,
                            "changelog records skipped");
                    });
                }
            }
            if let Some((_, ends, started)) = &loaded {
                let done = ends
                    .iter()
                    .all(|(p, end)| positions.get(p).copied().unwrap_or(0) >= *end);
                if done {
                    if let Some((tx, _, started)) = loaded.take() {
                        if let Some(table) = self.table.upgrade() {
                            let rows = table.state.read().map(|s| s.rows.len()).unwrap_or(0);
                            tracing::info!(table = %self.config.spec.name, rows,
                                seconds = started.elapsed().as_secs_f64(),
                                "table loaded from its topic");
                        }
                        let _ = tx.send(Ok(()));
                    }
                } else if progress.elapsed()
                    > self.config.connect_timeout.max(Duration::from_secs(30))
                    && started.elapsed() > self.config.connect_timeout
                {
                    if let Some((tx, ..)) = loaded.take() {
                        let _ = tx.send(Err(Error::Execution(format!(
                            "kafka table '{}': no progress reading topic '{}' for {:?} while loading it",
                            self.config.spec.name,
                            self.config.topic,
                            progress.elapsed()
                        ))));
                    }
                    return;
                }
            }
            if last_lag.elapsed() >= LAG_EVERY {
                last_lag = Instant::now();
                self.record_lag(&positions);
            }
        }
    }

    /// Every partition of the topic, from the beginning; returns their end offsets now.
    fn assign(&self) -> Result<Vec<(i32, i64)>> {
        let topic = &self.config.topic;
        let timeout = self.config.connect_timeout;
        let metadata = self
            .consumer
            .fetch_metadata(Some(topic), timeout)
            .map_err(|e| {
                Error::Execution(format!("kafka table '{}': {e}", self.config.spec.name))
            })?;
        let partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .map(|t| t.partitions().iter().map(|p| p.id()).collect())
            .unwrap_or_default();
        if partitions.is_empty() {
            return Err(Error::Execution(format!(
                "kafka table '{}': topic '{topic}' has no partitions",
                self.config.spec.name
            )));
        }
        let mut ends = Vec::with_capacity(partitions.len());
        let mut list = TopicPartitionList::new();
        for &p in &partitions {
            let (low, high) = self
                .consumer
                .fetch_watermarks(topic, p, timeout)
                .map_err(|e| {
                    Error::Execution(format!("kafka table '{}': {e}", self.config.spec.name))
                })?;
            if high > low {
                ends.push((p, high));
            }
            list.add_partition_offset(topic, p, Offset::Beginning)
                .map_err(|e| Error::Internal(format!("partition list: {e}")))?;
        }
        self.consumer.assign(&list).map_err(|e| {
            Error::Execution(format!("kafka table '{}': {e}", self.config.spec.name))
        })?;
        Ok(ends)
    }

    /// Up to [`POLL_BATCH`] messages, waiting at most 100 ms for the first.
    fn poll(&mut self) -> Vec<Change> {
        let mut out = Vec::new();
        let mut wait = Duration::from_millis(100);
        while out.len() < POLL_BATCH {
            match self.consumer.poll(wait) {
                None => break,
                Some(Err(e)) => {
                    self.log.log(|suppressed| {
                        tracing::warn!(table = %self.config.spec.name, error = %e, suppressed,
                            "kafka table: client error (retrying)");
                    });
                    break;
                }
                Some(Ok(m)) => {
                    out.push(Change {
                        partition: m.partition(),
                        offset: m.offset(),
                        key: m.key().map(<[u8]>::to_vec),
                        value: m.payload().map(<[u8]>::to_vec),
                    });
                    wait = Duration::ZERO;
                }
            }
        }
        out
    }

    /// Applies a batch of changes, in order, under one write lock.
    fn apply(&mut self, changes: &[Change]) -> Result<()> {
        let Some(table) = self.table.upgrade() else {
            return Ok(());
        };
        // Keys: a JSON object of the key columns, or a bare value for a one-column key.
        let key_column =
            (self.key_schema.fields().len() == 1).then(|| self.key_schema.field(0).name().clone());
        let mut key_block = Vec::new();
        let mut key_ranges: Vec<Range<usize>> = Vec::new();
        let mut keyed: Vec<usize> = Vec::new();
        for (i, change) in changes.iter().enumerate() {
            let Some(key) = change.key.as_deref() else {
                continue;
            };
            let start = key_block.len();
            let object = key.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
            match (&key_column, object) {
                (Some(column), false) => {
                    key_block.extend_from_slice(
                        format!("{{{}:", serde_json::Value::String(column.clone())).as_bytes(),
                    );
                    key_block.extend_from_slice(key);
                    key_block.push(b'}');
                }
                _ => key_block.extend_from_slice(key),
            }
            key_ranges.push(start..key_block.len());
            key_block.push(b'\n');
            keyed.push(i);
        }
        let decoded_keys = self.keys.decode_records(&key_block, &key_ranges)?;
        // The key row of each change (None: no key, or one that does not decode).
        let mut key_arrays: Vec<Option<(usize, usize)>> = vec![None; changes.len()];
        let mut key_batches = Vec::new();
        for (run, batch) in decoded_keys.batches {
            for (row, record) in run.enumerate() {
                key_arrays[keyed[record]] = Some((key_batches.len(), row));
            }
            key_batches.push(batch);
        }
        let skipped_keys = changes.len() - key_arrays.iter().flatten().count();
        let keys = concat_or_empty(&self.key_schema, &key_batches)?;
        // Offsets of each batch in `keys`.
        let mut base = Vec::with_capacity(key_batches.len());
        let mut total = 0;
        for b in &key_batches {
            base.push(total);
            total += b.num_rows();
        }
        let key_row = |i: usize| key_arrays[i].map(|(b, r)| (base[b] + r) as u32);
        // Values of the keyed changes that are not tombstones.
        let mut value_block = Vec::new();
        let mut value_ranges = Vec::new();
        let mut valued = Vec::new();
        for (i, change) in changes.iter().enumerate() {
            if let (Some(value), Some(_)) = (change.value.as_deref(), key_row(i)) {
                let start = value_block.len();
                value_block.extend_from_slice(value);
                value_ranges.push(start..value_block.len());
                value_block.push(b'\n');
                valued.push(i);
            }
        }
        let decoded_values = self.values.decode_records(&value_block, &value_ranges)?;
        let bad_values = decoded_values.bad.len();
        // Full rows: the value's columns, the key columns from the key.
        let mut value_rows: Vec<Option<(usize, usize)>> = vec![None; changes.len()];
        let mut full_batches = Vec::new();
        for (run, batch) in decoded_values.batches {
            let changes_of_run: Vec<usize> = run.map(|r| valued[r]).collect();
            let picks: UInt32Array = changes_of_run.iter().map(|&i| key_row(i)).collect();
            let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
            for (k, &column) in table.key_columns.iter().enumerate() {
                columns[column] = take(keys.column(k).as_ref(), &picks, None)?;
            }
            let columns = columns
                .into_iter()
                .zip(table.schema.fields())
                .map(|(c, f)| {
                    if c.data_type() == f.data_type() {
                        Ok(c)
                    } else {
                        cast(&c, f.data_type())
                    }
                })
                .collect::<Result<Vec<_>, _>>()?;
            for (row, &i) in changes_of_run.iter().enumerate() {
                value_rows[i] = Some((full_batches.len(), row));
            }
            full_batches.push(columns);
        }
        let key_converter = &table.key_converter;
        let row_converter = &table.row_converter;
        let key_columns = weir_runtime::lookup::cast_all(keys.columns(), &table.key_types)?;
        let encoded_keys = key_converter.convert_columns(&key_columns)?;
        let encoded_rows = full_batches
            .iter()
            .map(|columns| row_converter.convert_columns(columns))
            .collect::<Result<Vec<_>, _>>()?;
        let mut state = table.state.write().unwrap_or_else(|p| p.into_inner());
        for (i, change) in changes.iter().enumerate() {
            let Some(k) = key_row(i) else { continue };
            let key = encoded_keys.row(k as usize);
            if key_columns.iter().any(|c| c.is_null(k as usize)) {
                continue;
            }
            let key: Box<[u8]> = key.data().into();
            let old = match (&change.value, value_rows[i]) {
                (None, _) => state.rows.remove(&key).map(|old| (key.len(), old)),
                (Some(_), Some((b, r))) => {
                    let row = encoded_rows[b].row(r).owned();
                    let size = key.len() + row.row().data().len();
                    state.bytes += size;
                    state
                        .rows
                        .insert(key.clone(), row)
                        .map(|old| (key.len(), old))
                }
                // A value that did not decode: the key keeps its row.
                (Some(_), None) => None,
            };
            if let Some((key_len, old)) = old {
                state.bytes = state.bytes.saturating_sub(key_len + old.row().data().len());
            }
        }
        let gauge = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        table.metrics.rows.set(gauge(state.rows.len()));
        table.metrics.bytes.set(gauge(state.bytes));
        drop(state);
        if skipped_keys + bad_values > 0 {
            return Err(Error::Execution(format!(
                "{skipped_keys} records without a key that decodes, {bad_values} values that do not decode"
            )));
        }
        Ok(())
    }

    /// Records not yet applied, over every partition.
    fn record_lag(&self, positions: &HashMap<i32, i64>) {
        let Some(table) = self.table.upgrade() else {
            return;
        };
        let mut lag = 0;
        for (&p, &position) in positions {
            if let Ok((_, high)) =
                self.consumer
                    .fetch_watermarks(&self.config.topic, p, Duration::from_secs(1))
            {
                lag += (high - position).max(0);
            }
        }
        table.metrics.changelog_lag.set(lag);
    }
}

/// One record of the changelog.
struct Change {
    partition: i32,
    offset: i64,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
}

fn concat_or_empty(schema: &SchemaRef, batches: &[RecordBatch]) -> Result<RecordBatch> {
    Ok(match batches {
        [] => RecordBatch::new_empty(schema.clone()),
        [one] => one.clone(),
        many => arrow::compute::concat_batches(schema, many)?,
    })
}

#[async_trait]
impl LookupTable for KafkaTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn key_columns(&self) -> &[usize] {
        &self.key_columns
    }

    fn cache_mode(&self) -> CacheMode {
        CacheMode::Full
    }

    async fn lookup(&self, keys: &[ArrayRef]) -> Result<LookupRows> {
        let keys = weir_runtime::lookup::cast_all(keys, &self.key_types)?;
        let len = keys.first().map_or(0, |k| k.len());
        let encoded = self.key_converter.convert_columns(&keys)?;
        let any_null = keys.iter().any(|k| k.null_count() > 0);
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        let mut found = Vec::new();
        let mut seen: HashMap<&[u8], u32, ahash::RandomState> =
            HashMap::with_hasher(ahash::RandomState::new());
        let mut indices = Vec::with_capacity(len);
        for i in 0..len {
            if any_null && keys.iter().any(|k| k.is_null(i)) {
                indices.push(None);
                continue;
            }
            let key = encoded.row(i).data();
            if let Some(&n) = seen.get(key) {
                indices.push(Some(n));
                continue;
            }
            match state.rows.get(key) {
                Some(row) => {
                    found.push(row.row());
                    let n = found.len() as u32 - 1;
                    seen.insert(key, n);
                    indices.push(Some(n));
                }
                None => indices.push(None),
            }
        }
        let columns = self.row_converter.convert_rows(found.iter().copied())?;
        let rows = RecordBatch::try_new_with_options(
            self.schema.clone(),
            columns,
            &RecordBatchOptions::new().with_row_count(Some(found.len())),
        )?;
        Ok(LookupRows {
            rows,
            indices: UInt32Array::from(indices),
        })
    }

    async fn scan(&self) -> Result<Vec<RecordBatch>> {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        let columns = self
            .row_converter
            .convert_rows(state.rows.values().map(|r| r.row()))?;
        Ok(vec![RecordBatch::try_new_with_options(
            self.schema.clone(),
            columns,
            &RecordBatchOptions::new().with_row_count(Some(state.rows.len())),
        )?])
    }
}
