//! Lookup tables: the keyed side of a lookup join.
//!
//! A [`LookupTable`] answers one batch's keys at once with [`LookupRows`]: a batch of table
//! rows and, per key, the index of its row there (null for a miss). The join then builds its
//! output with arrow's `take`, so neither side is ever turned into rows.
//!
//! Tables held in memory (a file, a fully cached Postgres table, a compacted Kafka topic) keep
//! an immutable [`TableVersion`] behind a [`VersionCell`]: a reload builds a new version and
//! swaps it in whole, and a lookup reads one version for its whole batch, so no batch ever sees
//! half of a reload.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, RwLock};

use arrow::array::{Array, ArrayRef, AsArray, UInt32Array};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Int64Type, SchemaRef};
use arrow::record_batch::RecordBatch;
use arrow::row::{RowConverter, SortField};
use async_trait::async_trait;

use crate::error::{Error, Result};

/// What a lookup found for a batch of keys.
#[derive(Debug, Clone)]
pub struct LookupRows {
    /// Table rows, in the table's schema (for an in-memory table: the whole version, shared).
    pub rows: RecordBatch,
    /// One entry per key: the row of `rows` it matches, or null for a miss.
    pub indices: UInt32Array,
}

/// How a table answers lookups, for `EXPLAIN` and `SHOW TABLES`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheMode {
    /// The whole table is held in memory.
    Full,
    /// Keys are looked up in the external system, with a bounded cache in front.
    Partial,
}

impl std::fmt::Display for CacheMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CacheMode::Full => "full",
            CacheMode::Partial => "partial",
        })
    }
}

/// The keyed side of a lookup join, shared by every pipeline that joins it.
#[async_trait]
pub trait LookupTable: Send + Sync + Debug {
    /// The declared columns.
    fn schema(&self) -> SchemaRef;

    /// The primary key's columns (indices into [`LookupTable::schema`]), in key order.
    fn key_columns(&self) -> &[usize];

    fn cache_mode(&self) -> CacheMode;

    /// Batches a join may have in flight at once against this table (a table that waits on
    /// I/O gains from several; one in memory answers at once).
    fn max_concurrency(&self) -> usize {
        crate::operators::DEFAULT_MAX_IN_FLIGHT
    }

    /// Looks up one batch's keys: one array per key column, of the key columns' types, all of
    /// the same length. A null in any key column is a miss. Waits (retrying) while the
    /// external system is unreachable rather than failing the batch.
    async fn lookup(&self, keys: &[ArrayRef]) -> Result<LookupRows>;

    /// The current contents, for `SELECT * FROM table`.
    async fn scan(&self) -> Result<Vec<RecordBatch>>;
}

/// One immutable version of an in-memory table: its rows and an index from key to row.
#[derive(Debug)]
pub struct TableVersion {
    rows: RecordBatch,
    index: KeyIndex,
}

/// From key to row. Integer keys (the usual ids) are hashed as `i64` directly; any other key
/// (text, composite) in arrow's row format, whose bytes compare equal exactly when the keys do.
#[derive(Debug)]
enum KeyIndex {
    Int64(HashMap<i64, u32, ahash::RandomState>),
    Rows {
        fields: Vec<SortField>,
        /// The key columns' types (what lookups' keys are cast to).
        types: Vec<DataType>,
        rows: HashMap<Box<[u8]>, u32, ahash::RandomState>,
    },
}

/// Integer key types indexed as `i64` (every value fits).
fn is_small_integer(data_type: &DataType) -> bool {
    matches!(
        data_type,
        DataType::Int8
            | DataType::Int16
            | DataType::Int32
            | DataType::Int64
            | DataType::UInt8
            | DataType::UInt16
            | DataType::UInt32
    )
}

impl TableVersion {
    /// Indexes `rows` by the columns `key_columns`. Rows with a null key can never match and
    /// are left out of the index; of two rows with the same key the later one wins. Returns
    /// the version and how many rows were shadowed that way.
    pub fn try_new(rows: RecordBatch, key_columns: &[usize]) -> Result<(Self, usize)> {
        if rows.num_rows() > u32::MAX as usize {
            return Err(Error::Execution(format!(
                "a lookup table holds at most {} rows, got {}",
                u32::MAX,
                rows.num_rows()
            )));
        }
        let keys: Vec<ArrayRef> = key_columns
            .iter()
            .map(|&i| {
                rows.columns().get(i).cloned().ok_or_else(|| {
                    Error::Internal(format!(
                        "key column {i} of a {}-column table",
                        rows.num_columns()
                    ))
                })
            })
            .collect::<Result<_>>()?;
        let mut duplicates = 0;
        let index = match keys.as_slice() {
            [key] if is_small_integer(key.data_type()) => {
                let key = cast(key, &DataType::Int64)?;
                let key = key.as_primitive::<Int64Type>();
                let mut map =
                    HashMap::with_capacity_and_hasher(key.len(), ahash::RandomState::new());
                for (row, value) in key.iter().enumerate() {
                    if let Some(value) = value
                        && map.insert(value, row as u32).is_some()
                    {
                        duplicates += 1;
                    }
                }
                KeyIndex::Int64(map)
            }
            _ => {
                let types: Vec<DataType> = keys.iter().map(|k| k.data_type().clone()).collect();
                let fields: Vec<SortField> = types.iter().cloned().map(SortField::new).collect();
                let converter = RowConverter::new(fields.clone())?;
                let encoded = converter.convert_columns(&keys)?;
                let mut map =
                    HashMap::with_capacity_and_hasher(keys[0].len(), ahash::RandomState::new());
                for row in 0..rows.num_rows() {
                    if keys.iter().any(|k| k.is_null(row)) {
                        continue;
                    }
                    let bytes: Box<[u8]> = encoded.row(row).as_ref().into();
                    if map.insert(bytes, row as u32).is_some() {
                        duplicates += 1;
                    }
                }
                KeyIndex::Rows {
                    fields,
                    types,
                    rows: map,
                }
            }
        };
        Ok((Self { rows, index }, duplicates))
    }

    /// All rows, including any shadowed by a later row with the same key.
    pub fn rows(&self) -> &RecordBatch {
        &self.rows
    }

    /// Rows a key can find (distinct, non-null keys).
    pub fn len(&self) -> usize {
        match &self.index {
            KeyIndex::Int64(map) => map.len(),
            KeyIndex::Rows { rows, .. } => rows.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Estimated bytes held: the rows and the index.
    pub fn memory_size(&self) -> usize {
        let index = match &self.index {
            KeyIndex::Int64(map) => map.capacity() * (8 + 4 + 1),
            KeyIndex::Rows { rows, .. } => {
                rows.capacity() * (16 + 4 + 1) + rows.keys().map(|k| k.len()).sum::<usize>()
            }
        };
        self.rows.get_array_memory_size() + index
    }

    /// The row of each key (one array per key column, of the key columns' types).
    pub fn find(&self, keys: &[ArrayRef]) -> Result<UInt32Array> {
        let len = keys.first().map_or(0, |k| k.len());
        Ok(match &self.index {
            KeyIndex::Int64(map) => {
                let [key] = keys else {
                    return Err(Error::Internal(format!(
                        "an integer-keyed table looked up with {} key columns",
                        keys.len()
                    )));
                };
                let key = cast(key, &DataType::Int64)?;
                let key = key.as_primitive::<Int64Type>();
                if key.null_count() == 0 {
                    key.values().iter().map(|v| map.get(v).copied()).collect()
                } else {
                    key.iter()
                        .map(|v| v.and_then(|v| map.get(&v).copied()))
                        .collect()
                }
            }
            KeyIndex::Rows {
                fields,
                types,
                rows,
            } => {
                let keys = cast_all(keys, types)?;
                let encoded = RowConverter::new(fields.clone())?.convert_columns(&keys)?;
                let any_null = keys.iter().any(|k| k.null_count() > 0);
                (0..len)
                    .map(|i| {
                        if any_null && keys.iter().any(|k| k.is_null(i)) {
                            return None;
                        }
                        rows.get(encoded.row(i).as_ref()).copied()
                    })
                    .collect()
            }
        })
    }

    /// The rows a key can find, in row order (what `SELECT * FROM table` shows).
    pub fn current_rows(&self) -> Result<RecordBatch> {
        let mut live: Vec<u32> = match &self.index {
            KeyIndex::Int64(map) => map.values().copied().collect(),
            KeyIndex::Rows { rows, .. } => rows.values().copied().collect(),
        };
        if live.len() == self.rows.num_rows() {
            return Ok(self.rows.clone());
        }
        live.sort_unstable();
        let indices = UInt32Array::from(live);
        Ok(arrow::compute::take_record_batch(&self.rows, &indices)?)
    }
}

/// `keys` cast to `types` where they differ (a lookup's keys to the key columns' types).
pub fn cast_all(keys: &[ArrayRef], types: &[DataType]) -> Result<Vec<ArrayRef>> {
    keys.iter()
        .zip(types)
        .map(|(k, t)| {
            if k.data_type() == t {
                Ok(k.clone())
            } else {
                Ok(cast(k, t)?)
            }
        })
        .collect()
}

/// The current version of an in-memory table, swapped whole by a reload. Readers clone the
/// `Arc` (one atomic increment) and use that version for their whole batch.
#[derive(Debug)]
pub struct VersionCell(RwLock<Arc<TableVersion>>);

impl VersionCell {
    pub fn new(version: TableVersion) -> Self {
        Self(RwLock::new(Arc::new(version)))
    }

    pub fn current(&self) -> Arc<TableVersion> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn replace(&self, version: TableVersion) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(version);
    }
}

/// A table held whole in memory (a file, a fully cached Postgres table, a compacted topic):
/// lookups read the current [`TableVersion`]; the connector's refresh task builds new ones
/// with [`MemoryTable::publish`]. The task should hold a `Weak` reference and end when the
/// table is gone (dropped with the last plan and catalog entry that used it).
#[derive(Debug)]
pub struct MemoryTable {
    name: String,
    schema: SchemaRef,
    key_columns: Vec<usize>,
    current: VersionCell,
    metrics: crate::metrics::LookupTableMetrics,
}

impl MemoryTable {
    /// A table whose first version is `rows`.
    pub fn try_new(
        name: &str,
        schema: SchemaRef,
        key_columns: Vec<usize>,
        rows: RecordBatch,
        metrics: crate::metrics::LookupTableMetrics,
    ) -> Result<Arc<Self>> {
        let version = Self::index(name, &key_columns, rows)?;
        let table = Self {
            name: name.to_string(),
            schema,
            key_columns,
            current: VersionCell::new(version),
            metrics,
        };
        table.record(&table.current.current());
        table.metrics.reloads_ok.inc();
        Ok(Arc::new(table))
    }

    fn index(name: &str, key_columns: &[usize], rows: RecordBatch) -> Result<TableVersion> {
        let (version, shadowed) = TableVersion::try_new(rows, key_columns)?;
        if shadowed > 0 {
            tracing::warn!(table = %name, shadowed,
                "rows with a PRIMARY KEY seen before in the same load; the last one wins");
        }
        Ok(version)
    }

    fn record(&self, version: &TableVersion) {
        let gauge = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        self.metrics.rows.set(gauge(version.len()));
        self.metrics.bytes.set(gauge(version.memory_size()));
    }

    /// Replaces the contents with `rows` (of the table's schema) at once: lookups already
    /// under way finish on the version they started with.
    pub fn publish(&self, rows: RecordBatch) -> Result<()> {
        let version = Self::index(&self.name, &self.key_columns, rows)?;
        self.record(&version);
        self.current.replace(version);
        self.metrics.reloads_ok.inc();
        Ok(())
    }

    /// Counts and logs a refresh that failed; the current version stays.
    pub fn refresh_failed(&self, error: &dyn std::fmt::Display) {
        self.metrics.reloads_failed.inc();
        tracing::warn!(table = %self.name, error = %error,
            "reloading the table failed; lookups keep using the previous version");
    }

    pub fn metrics(&self) -> &crate::metrics::LookupTableMetrics {
        &self.metrics
    }

    pub fn current(&self) -> Arc<TableVersion> {
        self.current.current()
    }
}

#[async_trait]
impl LookupTable for MemoryTable {
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
        lookup_in(&self.current.current(), keys)
    }

    async fn scan(&self) -> Result<Vec<RecordBatch>> {
        Ok(vec![self.current.current().current_rows()?])
    }
}

/// Looks `keys` up in one version of an in-memory table.
pub fn lookup_in(version: &TableVersion, keys: &[ArrayRef]) -> Result<LookupRows> {
    Ok(LookupRows {
        rows: version.rows().clone(),
        indices: version.find(keys)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int32Array, Int64Array, StringArray};
    use arrow::datatypes::{Field, Schema};

    fn table() -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int32, true),
            Field::new("site", DataType::Utf8, true),
            Field::new("region", DataType::Utf8, true),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int32Array::from(vec![Some(1), Some(2), None, Some(2)])),
                Arc::new(StringArray::from(vec!["a", "b", "c", "d"])),
                Arc::new(StringArray::from(vec!["eu", "us", "ap", "us2"])),
            ],
        )
        .expect("batch")
    }

    #[test]
    fn integer_keys_find_rows_later_duplicates_win_and_nulls_miss() {
        let (version, duplicates) = TableVersion::try_new(table(), &[0]).expect("index");
        assert_eq!(duplicates, 1);
        assert_eq!(version.len(), 2);
        let keys: ArrayRef = Arc::new(Int64Array::from(vec![Some(2), None, Some(1), Some(9)]));
        let found = version.find(&[keys]).expect("find");
        assert_eq!(found, UInt32Array::from(vec![Some(3), None, Some(0), None]));
        let current = version.current_rows().expect("rows");
        assert_eq!(current.num_rows(), 2);
    }

    #[test]
    fn composite_text_keys_find_rows() {
        let (version, duplicates) = TableVersion::try_new(table(), &[0, 1]).expect("index");
        assert_eq!(duplicates, 0);
        assert_eq!(version.len(), 3, "the row with a null key cannot be found");
        let ids: ArrayRef = Arc::new(Int32Array::from(vec![2, 2, 1, 1]));
        let sites: ArrayRef = Arc::new(StringArray::from(vec![
            Some("d"),
            Some("b"),
            None,
            Some("a"),
        ]));
        let found = version.find(&[ids, sites]).expect("find");
        assert_eq!(
            found,
            UInt32Array::from(vec![Some(3), Some(1), None, Some(0)])
        );
    }
}
