//! The `parquet` sink: an exactly-once, Hive-partitioned data lake (zstd Parquet) in a local
//! directory or an object store (`s3://`, `gs://`, `az://`).
//!
//! Two-phase commit with the job's checkpoints:
//!
//! - Rows go to an open file per partition, named when it opens
//!   `part-<sink>-<run>-<epoch>-<n>.parquet`: `<run>` is fixed when the sink starts without
//!   a checkpoint and kept in its checkpoints, `<epoch>` is the epoch being written and `<n>`
//!   counts the files opened in it. A replay after a restore therefore writes the same rows
//!   to files of the same names, and a fresh start never reuses an earlier run's names.
//!   Locally the file is written in place, hidden as `.<name>.inprogress` (outside
//!   `**/*.parquet`); on an object store it is a multipart upload to its final key, which
//!   shows nothing until completed. A file rolls over when it reaches `target_file_size` or
//!   `rollover.interval`: it is finished (footer written; on an object store its last part
//!   sent) and waits, closed, for the next checkpoint.
//! - Pre-commit (at a barrier): closed files are tied to the epoch; each open file's row
//!   group is flushed (if it holds at least [`FLUSH_MIN_ROWS`] rows) and the file synced
//!   (locally) or its whole parts sent (object store). The snapshot records, per open file,
//!   its length, the footer that would make it a complete Parquet file at that length, the
//!   bytes not sent as parts yet (object store), and the rows of the row group not yet
//!   flushed: a checkpoint does not force a small file per partition, files span
//!   checkpoints.
//! - Commit (the checkpoint is complete): the epoch's closed files are published: renamed
//!   to their final name, or their upload completed.
//! - Restore: the checkpoint's closed files are published (if not already); each open file
//!   is cut back to its recorded length and given its recorded footer (on an object store:
//!   its unsent bytes and the footer go as the upload's last part), then published; its
//!   unflushed rows are written again. Every other in-progress file or upload of this sink
//!   (written after the checkpoint) is deleted or aborted: uploads are found through a
//!   marker per upload under `<lake>/_weir/uploads/<sink>/` (object stores cannot list
//!   uploads in progress; `_`-prefixed directories are hidden from Spark and Hive, and
//!   outside `**/*.parquet`).
//!
//! Partitions: `partition_by = 'date'` writes `dt=YYYY-MM-DD/hour=HH` directories from the
//! row's time column (`window_end` when present, else the first TIMESTAMP column);
//! `partition_by = 'a,b'` writes `a=<value>/b=<value>` and leaves those columns out of the
//! files, as Hive and Spark do. DuckDB reads the lake as one table with
//! `read_parquet('<path>/**/*.parquet', hive_partitioning = true)`.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{Array, ArrayRef, AsArray, BinaryArray, UInt32Array};
use arrow::compute::{cast, take};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit, TimestampMillisecondType};
use arrow::record_batch::RecordBatch;
use arrow::row::{RowConverter, SortField};
use async_trait::async_trait;
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::multipart::PartId;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::arrow::{ArrowSchemaConverter, ArrowWriter};
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::{
    FileMetaData, KeyValue, ParquetMetaDataBuilder, ParquetMetaDataWriter,
};
use parquet::file::properties::WriterProperties;
use parquet::schema::types::SchemaDescPtr;
use weir_runtime::connector::{ConnectorError, SinkFactory};
use weir_runtime::storage::{Location, RemoteStore, parse_location};
use weir_runtime::{CheckpointBarrier, Error, Result, Sink, Snapshot};
use weir_sql::Options;

/// Default `rollover.interval`.
const DEFAULT_ROLLOVER: Duration = Duration::from_secs(60);
/// Default `target_file_size`.
const DEFAULT_TARGET_FILE_SIZE: u64 = 128 << 20;
/// A row group is cut at a checkpoint only once it holds this many rows; fewer are kept in
/// the checkpoint instead, so that slow sinks do not write tiny row groups.
pub const FLUSH_MIN_ROWS: usize = 64 * 1024;
/// Rows per row group at most.
const MAX_ROW_GROUP_ROWS: usize = 1024 * 1024;
/// Bytes per part of an upload (the last one may be smaller): S3's and GCS's minimum, and
/// the same for every part, as R2 requires. A file of `target_file_size` 128 MiB takes 26.
const PART_SIZE: usize = 5 << 20;

/// How rows are split into directories.
#[derive(Debug, Clone)]
enum Partitioning {
    None,
    /// `dt=YYYY-MM-DD/hour=HH` from this TIMESTAMP column.
    Date {
        column: usize,
    },
    /// `name=value/...` from these columns, which the files leave out.
    Columns {
        columns: Vec<usize>,
    },
}

/// Where the lake is.
#[derive(Debug, Clone)]
enum Lake {
    /// A directory: files are written in place, hidden, and renamed to publish.
    Local(PathBuf),
    /// A prefix in an object store: files are multipart uploads to their final keys,
    /// completed to publish.
    Remote {
        store: Arc<dyn RemoteStore>,
        root: ObjectPath,
        /// Bytes per part ([`PART_SIZE`]; smaller in tests).
        part_size: usize,
    },
}

/// Validated `parquet` options.
#[derive(Debug, Clone)]
pub struct ParquetSinkFactory {
    name: String,
    /// The rows the sink receives.
    schema: SchemaRef,
    /// The rows in the files: `schema` without partition columns.
    file_schema: SchemaRef,
    lake: Lake,
    rollover: Duration,
    target_file_size: u64,
    partitioning: Partitioning,
}

impl ParquetSinkFactory {
    pub fn try_new(
        name: &str,
        schema: SchemaRef,
        options: &Options,
    ) -> Result<Self, ConnectorError> {
        let reader = options.reader();
        reader.string("connector");
        let path = reader.required("path")?;
        let rollover = reader
            .duration("rollover.interval")?
            .unwrap_or(DEFAULT_ROLLOVER);
        let target_file_size = reader
            .size("target_file_size")?
            .unwrap_or(DEFAULT_TARGET_FILE_SIZE);
        let partition_by = reader.string("partition_by").map(str::to_string);
        reader.finish()?;
        if rollover.is_zero() {
            return Err(ConnectorError::Invalid(
                "option 'rollover.interval' must be greater than zero".into(),
            ));
        }
        let partitioning = partitioning(&schema, partition_by.as_deref())?;
        let file_schema = match &partitioning {
            Partitioning::Columns { columns } => Arc::new(Schema::new(
                schema
                    .fields()
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| !columns.contains(i))
                    .map(|(_, f)| f.clone())
                    .collect::<Vec<_>>(),
            )),
            _ => schema.clone(),
        };
        let lake = match parse_location(path).map_err(|e| {
            ConnectorError::Option(weir_sql::options::OptionError::new(
                "path",
                format!("option 'path' = '{path}': {e}"),
            ))
        })? {
            Location::Local(dir) => {
                std::fs::create_dir_all(&dir).map_err(|e| {
                    ConnectorError::Invalid(format!(
                        "cannot create parquet directory '{}': {e}",
                        dir.display()
                    ))
                })?;
                Lake::Local(dir)
            }
            Location::Remote { store, root } => Lake::Remote {
                store,
                root,
                part_size: PART_SIZE,
            },
        };
        Ok(Self {
            name: name.to_string(),
            schema,
            file_schema,
            lake,
            rollover,
            target_file_size,
            partitioning,
        })
    }

    /// The same sink, writing to `store` in parts of `part_size` bytes.
    #[cfg(test)]
    fn in_store(mut self, store: Arc<dyn RemoteStore>, part_size: usize) -> Self {
        self.lake = Lake::Remote {
            store,
            root: ObjectPath::from("lake"),
            part_size,
        };
        self
    }

    fn config_columns(&self) -> Option<&[usize]> {
        match &self.partitioning {
            Partitioning::Columns { columns } => Some(columns),
            _ => None,
        }
    }
}

fn partitioning(schema: &Schema, by: Option<&str>) -> Result<Partitioning, ConnectorError> {
    let invalid =
        |m: String| ConnectorError::Option(weir_sql::options::OptionError::new("partition_by", m));
    match by.map(str::trim) {
        None | Some("") | Some("none") => Ok(Partitioning::None),
        Some("date") => {
            let is_time = |f: &Field| matches!(f.data_type(), DataType::Timestamp(..));
            let column = schema
                .index_of("window_end")
                .ok()
                .filter(|&i| is_time(schema.field(i)))
                .or_else(|| schema.fields().iter().position(|f| is_time(f)))
                .ok_or_else(|| {
                    invalid("partition_by = 'date' needs a TIMESTAMP column (window_end, or any other) in the sink's rows".into())
                })?;
            Ok(Partitioning::Date { column })
        }
        Some(list) => {
            let mut columns = Vec::new();
            for name in list.split(',').map(str::trim) {
                let index = schema.index_of(name).map_err(|_| {
                    invalid(format!(
                        "partition_by names column '{name}', which the sink's rows do not have (they have {})",
                        schema.fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>().join(", ")
                    ))
                })?;
                if columns.contains(&index) {
                    return Err(invalid(format!("partition_by names '{name}' twice")));
                }
                columns.push(index);
            }
            if columns.len() == schema.fields().len() {
                return Err(invalid(
                    "partition_by cannot take every column: the files would hold none".into(),
                ));
            }
            Ok(Partitioning::Columns { columns })
        }
    }
}

impl SinkFactory for ParquetSinkFactory {
    fn connector(&self) -> &'static str {
        "parquet"
    }

    /// Files named `part-<sink>.<instance>-...`: its in-progress files and uploads are its
    /// own, and a restore cleans up only those.
    fn create_instance(
        &self,
        metrics: &weir_runtime::Metrics,
        instance: &str,
    ) -> Result<Box<dyn Sink>> {
        let named = Self {
            name: format!("{}.{instance}", self.name),
            ..self.clone()
        };
        named.create(metrics)
    }

    fn create(&self, _metrics: &weir_runtime::Metrics) -> Result<Box<dyn Sink>> {
        let partition_rows = match &self.config_columns() {
            Some(columns) => Some(RowConverter::new(
                columns
                    .iter()
                    .map(|&i| SortField::new(self.schema.field(i).data_type().clone()))
                    .collect(),
            )?),
            None => None,
        };
        let schema_descr = Arc::new(
            ArrowSchemaConverter::new()
                .convert(&self.file_schema)
                .map_err(|e| {
                    Error::Execution(format!("cannot map the sink's rows to Parquet: {e}"))
                })?,
        );
        // A restore takes the checkpoint's run.
        let run = new_run_id();
        Ok(Box::new(ParquetSink {
            config: self.clone(),
            open: HashMap::new(),
            closed: Vec::new(),
            run,
            epoch: 1,
            seq: 0,
            partition_rows,
            schema_descr,
            arrow_schema_kv: KeyValue::new(
                parquet::arrow::ARROW_SCHEMA_META_KEY.to_string(),
                parquet::arrow::encode_arrow_schema(&self.file_schema),
            ),
            cleaned: false,
        }))
    }
}

/// Writes batches into Parquet files published at checkpoints.
pub struct ParquetSink {
    config: ParquetSinkFactory,
    /// Open files by partition directory (relative to the lake's root).
    open: HashMap<PathBuf, OpenFile>,
    /// Finished files not published yet; `epoch` is the checkpoint that publishes them
    /// (`None`: the next one).
    closed: Vec<ClosedFile>,
    /// Part of every file name: which run of the sink wrote it.
    run: String,
    /// The epoch rows are being written for: the last barrier's plus one.
    epoch: u64,
    /// Files opened in this epoch.
    seq: u32,
    /// Encodes `partition_by` columns to group rows by partition.
    partition_rows: Option<RowConverter>,
    schema_descr: SchemaDescPtr,
    arrow_schema_kv: KeyValue,
    /// Whether in-progress files left by an earlier run have been dealt with.
    cleaned: bool,
}

/// Where an open file's writer puts its bytes.
enum Output {
    File(File),
    /// An upload's bytes not sent yet: whole parts are sent as they fill.
    Memory(Vec<u8>),
}

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Output::File(file) => file.write(buf),
            Output::Memory(bytes) => bytes.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Output::File(file) => file.flush(),
            Output::Memory(_) => Ok(()),
        }
    }
}

/// A file not published yet, as checkpoints record it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
enum Pending {
    /// Written to `in_progress`, published by renaming it to `published`.
    Local {
        in_progress: PathBuf,
        published: PathBuf,
    },
    /// A multipart upload `id` to `key`, published by completing it with `parts` (the ids
    /// of the parts sent, in order).
    Upload {
        key: String,
        id: String,
        parts: Vec<String>,
    },
}

struct OpenFile {
    writer: ArrowWriter<Output>,
    pending: Pending,
    /// Bytes of the file sent as upload parts.
    sent: u64,
    opened: Instant,
    /// The rows of the row group not flushed yet (they are in the checkpoint, not the file).
    unflushed: Vec<RecordBatch>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct ClosedFile {
    #[serde(flatten)]
    pending: Pending,
    epoch: Option<u64>,
}

/// An open file as a checkpoint records it; its footer, unsent bytes and unflushed rows
/// are batches.
#[derive(serde::Serialize, serde::Deserialize)]
struct OpenRecord {
    partition: PathBuf,
    #[serde(flatten)]
    pending: Pending,
    len: u64,
    /// Batches of unflushed rows following its footer batch.
    unflushed: usize,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct SinkRecord {
    /// The epoch of the barrier the snapshot was taken at.
    epoch: u64,
    /// The run that wrote the files (absent in checkpoints of earlier versions).
    #[serde(default)]
    run: Option<String>,
    open: Vec<OpenRecord>,
    closed: Vec<ClosedFile>,
}

/// What a marker of an upload in progress holds.
#[derive(serde::Serialize, serde::Deserialize)]
struct UploadMarker {
    key: String,
    id: String,
}

/// The schema of the batch that leads an open file's state in a snapshot: its footer and,
/// on an object store, the bytes not sent as parts yet.
fn file_state_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("footer", DataType::Binary, false),
        Field::new("unsent", DataType::Binary, true),
    ]))
}

/// An object store failure, by cause (unreachable, refused, out of space), not a bug.
fn store_error(what: &str) -> impl Fn(object_store::Error) -> Error + '_ {
    move |e| {
        let message = format!("parquet lake: {what}: {e}");
        weir_runtime::storage::store_error(e, message)
    }
}

impl ParquetSink {
    fn writer_properties(&self) -> WriterProperties {
        WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::default()))
            .set_max_row_group_row_count(Some(MAX_ROW_GROUP_ROWS))
            .build()
    }

    /// Opens the next file of `partition`, named for the current epoch.
    async fn open(&mut self, partition: &Path) -> Result<OpenFile> {
        let name = format!(
            "part-{}-{}-{:010}-{:04}.parquet",
            self.config.name, self.run, self.epoch, self.seq
        );
        self.seq += 1;
        let (output, pending) = self
            .config
            .lake
            .start(&self.config.name, partition, &name)
            .await?;
        let writer = ArrowWriter::try_new(
            output,
            self.config.file_schema.clone(),
            Some(self.writer_properties()),
        )
        .map_err(|e| Error::Execution(format!("cannot start parquet file: {e}")))?;
        Ok(OpenFile {
            writer,
            pending,
            sent: 0,
            opened: Instant::now(),
            unflushed: Vec::new(),
        })
    }

    /// Deletes in-progress files, or aborts uploads, of this sink that no checkpoint refers
    /// to (a run that ended after its last checkpoint, or one with no checkpoint at all).
    async fn delete_unreferenced(&mut self) -> Result<()> {
        let referenced: Vec<Pending> = self
            .open
            .values()
            .map(|o| o.pending.clone())
            .chain(self.closed.iter().map(|c| c.pending.clone()))
            .collect();
        self.config
            .lake
            .delete_unreferenced(&self.config.name, &referenced)
            .await?;
        self.cleaned = true;
        Ok(())
    }

    /// The partition directory of each row of `batch`, and the rows of each.
    fn split(&mut self, batch: &RecordBatch) -> Result<Vec<(PathBuf, RecordBatch)>> {
        match &self.config.partitioning {
            Partitioning::None => Ok(vec![(PathBuf::new(), batch.clone())]),
            Partitioning::Date { column } => {
                let millis = cast(
                    batch.column(*column),
                    &DataType::Timestamp(TimeUnit::Millisecond, None),
                )?;
                let millis = millis.as_primitive::<TimestampMillisecondType>();
                let mut hours: std::collections::BTreeMap<Option<i64>, Vec<u32>> =
                    std::collections::BTreeMap::new();
                for (row, t) in millis.iter().enumerate() {
                    hours
                        .entry(t.map(|t| t.div_euclid(3_600_000)))
                        .or_default()
                        .push(row as u32);
                }
                let mut parts = Vec::with_capacity(hours.len());
                for (hour, rows) in hours {
                    let dir = match hour
                        .and_then(|h| chrono::DateTime::from_timestamp_millis(h * 3_600_000))
                    {
                        Some(t) => PathBuf::from(format!(
                            "dt={}/hour={}",
                            t.format("%Y-%m-%d"),
                            t.format("%H")
                        )),
                        None => PathBuf::from(format!("dt={HIVE_NULL}/hour={HIVE_NULL}")),
                    };
                    parts.push((dir, take_rows(batch, rows)?));
                }
                Ok(parts)
            }
            Partitioning::Columns { columns } => {
                let columns = columns.clone();
                let keys: Vec<ArrayRef> =
                    columns.iter().map(|&i| batch.column(i).clone()).collect();
                let converter = self
                    .partition_rows
                    .as_ref()
                    .ok_or_else(|| Error::Internal("no partition converter".into()))?;
                let encoded = converter.convert_columns(&keys)?;
                // Partitions in the order their first row arrives.
                let mut index: HashMap<&[u8], usize> = HashMap::new();
                let mut groups: Vec<(u32, Vec<u32>)> = Vec::new();
                for row in 0..batch.num_rows() {
                    let next = groups.len();
                    let group = *index.entry(encoded.row(row).data()).or_insert(next);
                    if group == next {
                        groups.push((row as u32, Vec::new()));
                    }
                    groups[group].1.push(row as u32);
                }
                let text: Vec<ArrayRef> = keys
                    .iter()
                    .map(|k| cast(k, &DataType::Utf8))
                    .collect::<std::result::Result<_, _>>()?;
                let mut parts = Vec::with_capacity(groups.len());
                for (first, rows) in groups {
                    let mut dir = PathBuf::new();
                    for (&c, values) in columns.iter().zip(&text) {
                        let values = values.as_string::<i32>();
                        let value = if values.is_null(first as usize) {
                            HIVE_NULL.to_string()
                        } else {
                            escape_partition_value(values.value(first as usize))
                        };
                        dir.push(format!("{}={value}", self.config.schema.field(c).name()));
                    }
                    let rows = take_rows(batch, rows)?;
                    // The files leave the partition columns out.
                    let kept: Vec<ArrayRef> = rows
                        .columns()
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| !columns.contains(i))
                        .map(|(_, c)| c.clone())
                        .collect();
                    parts.push((
                        dir,
                        RecordBatch::try_new(self.config.file_schema.clone(), kept)?,
                    ));
                }
                Ok(parts)
            }
        }
    }

    /// Writes rows of one partition, rolling the file over when it is large enough.
    async fn write_partition(&mut self, partition: PathBuf, rows: RecordBatch) -> Result<()> {
        if !self.open.contains_key(&partition) {
            let file = self.open(&partition).await?;
            self.open.insert(partition.clone(), file);
        }
        let Some(file) = self.open.get_mut(&partition) else {
            return Err(Error::Internal(
                "parquet file vanished after opening".into(),
            ));
        };
        file.writer
            .write(&rows)
            .map_err(|e| Error::Execution(format!("cannot write parquet: {e}")))?;
        file.unflushed.push(rows);
        keep_last_rows(&mut file.unflushed, file.writer.in_progress_rows());
        let written = file.writer.bytes_written() as u64;
        if let Lake::Remote { part_size, .. } = &self.config.lake
            && written - file.sent >= *part_size as u64
        {
            self.config.lake.sync(file, false).await?;
        }
        let size = written + file.writer.in_progress_size() as u64;
        if size >= self.config.target_file_size {
            self.finish_file(&partition).await?;
        }
        Ok(())
    }

    /// Finishes the open file of `partition` (footer written, synced or sent whole); it is
    /// published by the checkpoint after the next barrier.
    async fn finish_file(&mut self, partition: &Path) -> Result<()> {
        let Some(mut open) = self.open.remove(partition) else {
            return Ok(());
        };
        open.writer
            .finish()
            .map_err(|e| Error::Execution(format!("cannot finish parquet file: {e}")))?;
        self.config.lake.sync(&mut open, true).await?;
        self.closed.push(ClosedFile {
            pending: open.pending,
            epoch: None,
        });
        Ok(())
    }

    /// The footer that makes an open file, cut at its current length, a complete Parquet
    /// file of the row groups flushed so far.
    fn footer(&self, writer: &ArrowWriter<Output>) -> Result<Vec<u8>> {
        let row_groups = writer.flushed_row_groups().to_vec();
        let rows = row_groups.iter().map(|g| g.num_rows()).sum();
        let file = FileMetaData::new(
            1,
            rows,
            Some(format!("weir version {}", env!("CARGO_PKG_VERSION"))),
            Some(vec![self.arrow_schema_kv.clone()]),
            self.schema_descr.clone(),
            None,
        );
        let metadata = ParquetMetaDataBuilder::new(file)
            .set_row_groups(row_groups)
            .build();
        let mut footer = Vec::new();
        ParquetMetaDataWriter::new(&mut footer, &metadata)
            .finish()
            .map_err(|e| Error::Execution(format!("cannot encode a parquet footer: {e}")))?;
        Ok(footer)
    }
}

/// The storage side of the sink: where files start, how they are made durable, published,
/// sealed from a checkpoint, and cleaned up.
impl Lake {
    /// Where the markers of `sink`'s uploads in progress are.
    fn markers(root: &ObjectPath, sink: &str) -> ObjectPath {
        root.clone().join("_weir").join("uploads").join(sink)
    }

    /// The marker of the upload of file `name` (not `*.parquet`: a lake's glob skips it).
    fn marker(root: &ObjectPath, sink: &str, name: &str) -> ObjectPath {
        Self::markers(root, sink).join(format!("{name}.upload"))
    }

    /// Starts file `name` of `partition`: an in-progress file, or an upload and its marker.
    async fn start(&self, sink: &str, partition: &Path, name: &str) -> Result<(Output, Pending)> {
        match self {
            Lake::Local(root) => {
                let dir = root.join(partition);
                std::fs::create_dir_all(&dir).map_err(io_error(&dir))?;
                let in_progress = dir.join(format!(".{name}.inprogress"));
                let file = File::create(&in_progress).map_err(io_error(&in_progress))?;
                let pending = Pending::Local {
                    in_progress,
                    published: dir.join(name),
                };
                Ok((Output::File(file), pending))
            }
            Lake::Remote { store, root, .. } => {
                let key = object_key(root, partition, name)?;
                let id = store
                    .create_multipart(&key)
                    .await
                    .map_err(store_error("cannot start an upload"))?;
                let marker = UploadMarker {
                    key: key.to_string(),
                    id: id.clone(),
                };
                let body = serde_json::to_vec(&marker)
                    .map_err(|e| Error::Internal(format!("upload marker: {e}")))?;
                store
                    .put(&Self::marker(root, sink, name), body.into())
                    .await
                    .map_err(store_error("cannot record an upload"))?;
                let pending = Pending::Upload {
                    key: key.to_string(),
                    id,
                    parts: Vec::new(),
                };
                Ok((Output::Memory(Vec::new()), pending))
            }
        }
    }

    /// Makes what `file` has written so far durable where it can be: synced to disk, or sent
    /// as whole parts (with `last`, everything, the rest as the last part).
    async fn sync(&self, file: &mut OpenFile, last: bool) -> Result<()> {
        file.writer
            .sync()
            .map_err(|e| Error::Execution(format!("cannot write parquet: {e}")))?;
        let (store, part_size) = match self {
            Lake::Local(_) => {
                if let (Output::File(f), Pending::Local { in_progress, .. }) =
                    (file.writer.inner(), &file.pending)
                {
                    f.sync_data().map_err(io_error(in_progress))?;
                }
                return Ok(());
            }
            Lake::Remote {
                store, part_size, ..
            } => (store, *part_size),
        };
        let (Output::Memory(buffer), Pending::Upload { key, id, parts }) =
            (file.writer.inner_mut(), &mut file.pending)
        else {
            return Err(Error::Internal("an upload without its buffer".into()));
        };
        let whole = match last {
            true => buffer.len(),
            false => buffer.len() / part_size * part_size,
        };
        if whole == 0 {
            return Ok(());
        }
        let rest = buffer.split_off(whole);
        let ready = Bytes::from(std::mem::replace(buffer, rest));
        let key = key_path(key)?;
        for start in (0..ready.len()).step_by(part_size) {
            let part = ready.slice(start..(start + part_size).min(ready.len()));
            let part = store
                .put_part(&key, id, parts.len(), part.into())
                .await
                .map_err(store_error("cannot send a part"))?;
            parts.push(part.content_id);
        }
        file.sent += ready.len() as u64;
        Ok(())
    }

    /// Deletes `sink`'s in-progress files, or aborts its uploads, other than `referenced`.
    async fn delete_unreferenced(&self, sink: &str, referenced: &[Pending]) -> Result<()> {
        match self {
            Lake::Local(root) => {
                for path in in_progress_files(root, sink)? {
                    let known = referenced.iter().any(
                        |p| matches!(p, Pending::Local { in_progress, .. } if *in_progress == path),
                    );
                    if !known {
                        tracing::debug!(file = %path.display(), "deleting an in-progress file written after the last checkpoint");
                        std::fs::remove_file(&path).map_err(io_error(&path))?;
                    }
                }
            }
            Lake::Remote { store, root, .. } => {
                let markers: Vec<_> = store
                    .list(Some(&Self::markers(root, sink)))
                    .try_collect()
                    .await
                    .map_err(store_error("cannot list uploads in progress"))?;
                for marker in markers {
                    let body = match store.get(&marker.location).await {
                        Ok(found) => found.bytes().await,
                        Err(e) => Err(e),
                    }
                    .map_err(store_error("cannot read an upload marker"))?;
                    let Ok(upload) = serde_json::from_slice::<UploadMarker>(&body) else {
                        tracing::warn!(marker = %marker.location, "ignoring an unreadable upload marker");
                        continue;
                    };
                    let known = referenced
                        .iter()
                        .any(|p| matches!(p, Pending::Upload { id, .. } if *id == upload.id));
                    if known {
                        continue;
                    }
                    tracing::debug!(key = %upload.key, "aborting an upload started after the last checkpoint");
                    // Gone already (completed, aborted, or expired by a lifecycle rule) is fine.
                    let aborted = match key_path(&upload.key) {
                        Ok(key) => store.abort_multipart(&key, &upload.id).await,
                        Err(_) => Ok(()),
                    };
                    if let Err(e) = aborted {
                        tracing::debug!(key = %upload.key, error = %e, "upload not aborted");
                    }
                    store
                        .delete(&marker.location)
                        .await
                        .map_err(store_error("cannot delete an upload marker"))?;
                }
            }
        }
        Ok(())
    }

    /// Publishes a finished file under its final name. Already published is fine (a restore
    /// repeating a commit); missing both is a lost file.
    async fn publish(&self, sink: &str, pending: &Pending) -> Result<()> {
        match (pending, self) {
            (
                Pending::Local {
                    in_progress,
                    published,
                },
                _,
            ) => match std::fs::rename(in_progress, published) {
                Ok(()) => {
                    tracing::debug!(file = %published.display(), "parquet file published");
                    Ok(())
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && published.exists() => Ok(()),
                Err(e) => Err(Error::io(published.display().to_string(), e)),
            },
            (Pending::Upload { key, id, parts }, Lake::Remote { store, root, .. }) => {
                let path = key_path(key)?;
                let parts = parts
                    .iter()
                    .map(|p| PartId {
                        content_id: p.clone(),
                    })
                    .collect();
                if let Err(e) = store.complete_multipart(&path, id, parts).await {
                    // Completed before (by the run that crashed, or a restore)?
                    if store.head(&path).await.is_err() {
                        return Err(store_error("cannot complete an upload")(e));
                    }
                }
                tracing::debug!(key = %key, "parquet file published");
                if let Some(name) = path.filename() {
                    let marker = Self::marker(root, sink, name);
                    if let Err(e) = store.delete(&marker).await {
                        tracing::debug!(marker = %marker, error = %e, "upload marker not deleted");
                    }
                }
                Ok(())
            }
            (Pending::Upload { key, .. }, Lake::Local(_)) => Err(Error::Execution(format!(
                "the checkpoint has an upload to {key}, but the sink writes a local directory now"
            ))),
        }
    }

    /// Whether `pending` is published already.
    async fn is_published(&self, pending: &Pending) -> bool {
        match (pending, self) {
            (Pending::Local { published, .. }, _) => published.exists(),
            (Pending::Upload { key, .. }, Lake::Remote { store, .. }) => match key_path(key) {
                Ok(key) => store.head(&key).await.is_ok(),
                Err(_) => false,
            },
            (Pending::Upload { .. }, Lake::Local(_)) => false,
        }
    }

    /// Publishes an open file of a checkpoint: `len` bytes of it and `footer` (on an object
    /// store: the parts sent, then the `unsent` bytes and `footer` as the last part).
    async fn seal(
        &self,
        sink: &str,
        pending: Pending,
        len: u64,
        footer: &[u8],
        unsent: &[u8],
    ) -> Result<()> {
        if self.is_published(&pending).await {
            return Ok(());
        }
        let pending = match (pending, self) {
            (
                Pending::Local {
                    in_progress,
                    published,
                },
                _,
            ) => {
                seal_file(&in_progress, len, footer)?;
                Pending::Local {
                    in_progress,
                    published,
                }
            }
            (Pending::Upload { key, id, mut parts }, Lake::Remote { store, .. }) => {
                let mut last = Vec::with_capacity(unsent.len() + footer.len());
                last.extend_from_slice(unsent);
                last.extend_from_slice(footer);
                // Replaces any part with this index a dead run sent after the checkpoint.
                let part = store
                    .put_part(&key_path(&key)?, &id, parts.len(), last.into())
                    .await
                    .map_err(store_error("cannot send a part"))?;
                parts.push(part.content_id);
                Pending::Upload { key, id, parts }
            }
            (pending, Lake::Local(_)) => pending,
        };
        self.publish(sink, &pending).await
    }
}

/// Every in-progress file of `sink` in the local lake at `root`.
fn in_progress_files(root: &Path, sink: &str) -> Result<Vec<PathBuf>> {
    let prefix = format!(".part-{sink}-");
    let mut found = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io(dir.display().to_string(), e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(dir.display().to_string(), e))?;
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            if is_dir {
                dirs.push(path);
            } else if name
                .strip_prefix(&prefix)
                .and_then(|rest| rest.strip_suffix(".parquet.inprogress"))
                .is_some_and(is_file_counter)
            {
                found.push(path);
            }
        }
    }
    Ok(found)
}

/// A new run's id: its start in ms since the Unix epoch, as hex, and later than every
/// earlier run's of this process, so that no two sinks started in one millisecond share it.
fn new_run_id() -> String {
    use std::sync::atomic::{AtomicI64, Ordering};
    static LAST: AtomicI64 = AtomicI64::new(0);
    let now = chrono::Utc::now().timestamp_millis();
    let previous = LAST
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
            Some(now.max(last + 1))
        })
        .unwrap_or(now);
    format!("{:x}", now.max(previous + 1))
}

/// The key of file `name` in `partition` under `root`.
fn object_key(root: &ObjectPath, partition: &Path, name: &str) -> Result<ObjectPath> {
    let mut key = root.to_string();
    for part in partition.iter().chain(std::iter::once(name.as_ref())) {
        if !key.is_empty() {
            key.push('/');
        }
        key.push_str(&part.to_string_lossy());
    }
    ObjectPath::parse(&key)
        .map_err(|e| Error::Execution(format!("parquet lake: bad object key {key}: {e}")))
}

/// The path of `key`, as [`object_key`] made it (escaped partition values kept as they are).
fn key_path(key: &str) -> Result<ObjectPath> {
    ObjectPath::parse(key)
        .map_err(|e| Error::Execution(format!("parquet lake: bad object key {key}: {e}")))
}

/// Whether `rest` is what follows `part-<sink>-` in a file name: `<run>-<epoch>-<n>` (or
/// `<epoch>-<n>`, from earlier versions), so that sink `a` does not take sink `a-b`'s files.
fn is_file_counter(rest: &str) -> bool {
    let fields: Vec<&str> = rest.split('-').collect();
    (2..=3).contains(&fields.len())
        && fields
            .iter()
            .all(|f| !f.is_empty() && f.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Hive's name for a NULL partition value.
const HIVE_NULL: &str = "__HIVE_DEFAULT_PARTITION__";

/// A partition value safe as one path component (as Hive escapes them).
fn escape_partition_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if c.is_control()
            || matches!(
                c,
                '/' | '\\'
                    | '='
                    | '%'
                    | ':'
                    | '#'
                    | '?'
                    | '*'
                    | '"'
                    | '<'
                    | '>'
                    | '|'
                    | '\''
                    | '{'
                    | '['
                    | '^'
            )
        {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        } else {
            out.push(c);
        }
    }
    if out.is_empty() || out == "." || out == ".." {
        return format!(
            "%{}",
            out.bytes().map(|b| format!("{b:02X}")).collect::<String>()
        );
    }
    out
}

fn take_rows(batch: &RecordBatch, rows: Vec<u32>) -> Result<RecordBatch> {
    if rows.len() == batch.num_rows() {
        return Ok(batch.clone());
    }
    let indices = UInt32Array::from(rows);
    let columns = batch
        .columns()
        .iter()
        .map(|c| take(c, &indices, None))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(RecordBatch::try_new(batch.schema(), columns)?)
}

/// Keeps only the last `rows` rows of `batches` (the writer flushed the others).
fn keep_last_rows(batches: &mut Vec<RecordBatch>, rows: usize) {
    let mut total: usize = batches.iter().map(RecordBatch::num_rows).sum();
    while total > rows {
        let Some(first) = batches.first_mut() else {
            break;
        };
        let excess = total - rows;
        if first.num_rows() <= excess {
            total -= first.num_rows();
            batches.remove(0);
        } else {
            *first = first.slice(excess, first.num_rows() - excess);
            total -= excess;
        }
    }
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::io(path.display().to_string(), e)
}

#[async_trait]
impl Sink for ParquetSink {
    async fn write(&mut self, batch: RecordBatch) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        if !self.cleaned {
            self.delete_unreferenced().await?;
        }
        for (partition, rows) in self.split(&batch)? {
            self.write_partition(partition, rows).await?;
        }
        Ok(())
    }

    async fn pre_commit(&mut self, barrier: CheckpointBarrier) -> Result<()> {
        if !self.cleaned {
            self.delete_unreferenced().await?;
        }
        let partitions: Vec<PathBuf> = self.open.keys().cloned().collect();
        for partition in partitions {
            if barrier.last {
                // The pipeline ends here: everything is published by this checkpoint.
                self.finish_file(&partition).await?;
                continue;
            }
            let Some(file) = self.open.get_mut(&partition) else {
                continue;
            };
            if file.writer.in_progress_rows() >= FLUSH_MIN_ROWS {
                file.writer
                    .flush()
                    .map_err(|e| Error::Execution(format!("cannot write parquet: {e}")))?;
                file.unflushed.clear();
            }
            self.config.lake.sync(file, false).await?;
        }
        for closed in self.closed.iter_mut().filter(|c| c.epoch.is_none()) {
            closed.epoch = Some(barrier.epoch);
        }
        self.epoch = barrier.epoch + 1;
        self.seq = 0;
        barrier.ack();
        Ok(())
    }

    fn snapshot(&mut self) -> Result<Option<Snapshot>> {
        let mut open = Vec::with_capacity(self.open.len());
        let mut batches = Vec::new();
        for (partition, file) in &self.open {
            let footer = self.footer(&file.writer)?;
            // Pre-commit synced the file: what is not sent is what the buffer holds.
            let unsent = match file.writer.inner() {
                Output::Memory(bytes) => Some(bytes.as_slice()),
                Output::File(_) => None,
            };
            batches.push(RecordBatch::try_new(
                file_state_schema(),
                vec![
                    Arc::new(BinaryArray::from_vec(vec![footer.as_slice()])),
                    Arc::new(BinaryArray::from_opt_vec(vec![unsent])),
                ],
            )?);
            batches.extend(file.unflushed.iter().cloned());
            open.push(OpenRecord {
                partition: partition.clone(),
                pending: file.pending.clone(),
                len: file.writer.bytes_written() as u64,
                unflushed: file.unflushed.len(),
            });
        }
        let record = SinkRecord {
            epoch: self.epoch - 1,
            run: Some(self.run.clone()),
            open,
            closed: self.closed.clone(),
        };
        let meta = serde_json::to_value(record)
            .map_err(|e| Error::Internal(format!("parquet sink state: {e}")))?;
        Ok(Some(Snapshot::new(meta, batches)))
    }

    async fn restore(&mut self, snapshot: Snapshot) -> Result<()> {
        let record: SinkRecord = serde_json::from_value(snapshot.meta)
            .map_err(|e| Error::Execution(format!("parquet sink state is unreadable: {e}")))?;
        // What the checkpoint pre-committed is published now: the checkpoint is complete.
        for closed in &record.closed {
            self.config
                .lake
                .publish(&self.config.name, &closed.pending)
                .await?;
        }
        let unreadable = |what: &str| Error::Execution(format!("parquet sink state: {what}"));
        let mut batches = snapshot.batches.into_iter();
        let mut rewrite = Vec::new();
        for open in record.open {
            let state = batches
                .next()
                .ok_or_else(|| unreadable("a footer is missing"))?;
            let unflushed: Vec<RecordBatch> = batches.by_ref().take(open.unflushed).collect();
            let bytes = |name: &str| {
                state
                    .column_by_name(name)
                    .and_then(|c| c.as_binary_opt::<i32>())
                    .filter(|c| c.len() == 1 && c.is_valid(0))
                    .map(|c| c.value(0))
            };
            let footer = bytes("footer").ok_or_else(|| unreadable("bad footer"))?;
            let unsent = bytes("unsent").unwrap_or_default();
            self.config
                .lake
                .seal(&self.config.name, open.pending, open.len, footer, unsent)
                .await?;
            rewrite.push((open.partition, unflushed));
        }
        if let Some(run) = record.run {
            self.run = run;
        }
        self.epoch = record.epoch + 1;
        self.seq = 0;
        // Anything else in progress was written after the checkpoint.
        self.delete_unreferenced().await?;
        for (partition, rows) in rewrite {
            for batch in rows {
                self.write_partition(partition.clone(), batch).await?;
            }
        }
        Ok(())
    }

    async fn commit(&mut self, epoch: u64) -> Result<()> {
        let (due, kept) = std::mem::take(&mut self.closed)
            .into_iter()
            .partition::<Vec<_>, _>(|f| f.epoch.is_some_and(|e| e <= epoch));
        self.closed = kept;
        // On a failure the pipeline restarts from its checkpoint, which publishes them.
        for file in &due {
            self.config
                .lake
                .publish(&self.config.name, &file.pending)
                .await?;
        }
        Ok(())
    }

    fn tick_interval(&self) -> Option<Duration> {
        Some(self.config.rollover.min(Duration::from_secs(1)))
    }

    async fn on_tick(&mut self) -> Result<()> {
        let due: Vec<PathBuf> = self
            .open
            .iter()
            .filter(|(_, f)| f.opened.elapsed() >= self.config.rollover)
            .map(|(p, _)| p.clone())
            .collect();
        for partition in due {
            self.finish_file(&partition).await?;
        }
        Ok(())
    }

    async fn finish(&mut self) -> Result<()> {
        // Open files stay in progress: the last checkpoint knows how much of each is
        // durable, and a restart publishes exactly that.
        self.open.clear();
        Ok(())
    }
}

/// Cuts an in-progress file back to `len` bytes and appends `footer`, making it a complete
/// Parquet file of the row groups before `len`.
fn seal_file(path: &Path, len: u64, footer: &[u8]) -> Result<()> {
    use std::io::Seek;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_error(path))?;
    let actual = file.metadata().map_err(io_error(path))?.len();
    if actual < len {
        return Err(Error::Execution(format!(
            "in-progress parquet file {} is shorter ({actual} bytes) than the checkpoint recorded ({len}): the lake's disk lost data",
            path.display()
        )));
    }
    file.set_len(len).map_err(io_error(path))?;
    file.seek(std::io::SeekFrom::End(0))
        .map_err(io_error(path))?;
    file.write_all(footer).map_err(io_error(path))?;
    file.sync_all().map_err(io_error(path))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray, TimestampMillisecondArray};
    use arrow::datatypes::Int64Type;
    use object_store::multipart::MultipartStore;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use weir_runtime::CheckpointBarrier;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("region", DataType::Utf8, true),
            Field::new("n", DataType::Int64, false),
            Field::new(
                "window_end",
                DataType::Timestamp(TimeUnit::Millisecond, None),
                false,
            ),
        ]))
    }

    fn rows(values: std::ops::Range<i64>) -> RecordBatch {
        let regions: Vec<Option<&str>> = values
            .clone()
            .map(|v| Some(if v % 2 == 0 { "north" } else { "south/east" }))
            .collect();
        RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(StringArray::from(regions)),
                Arc::new(Int64Array::from_iter_values(values.clone())),
                // One hour per 100 values.
                Arc::new(TimestampMillisecondArray::from_iter_values(
                    values.map(|v| 1_767_225_600_000 + (v / 100) * 3_600_000),
                )),
            ],
        )
        .expect("batch")
    }

    /// A lake of each kind: a local directory, and an object store (in memory) written in
    /// parts of 1 KiB, so that files take several.
    enum TestLake {
        Dir(tempfile::TempDir),
        Store(Arc<object_store::memory::InMemory>),
    }

    impl TestLake {
        fn both() -> [TestLake; 2] {
            [
                TestLake::Dir(tempfile::tempdir().expect("tempdir")),
                TestLake::Store(Arc::new(object_store::memory::InMemory::new())),
            ]
        }

        fn kind(&self) -> &'static str {
            match self {
                TestLake::Dir(_) => "directory",
                TestLake::Store(_) => "object store",
            }
        }

        fn factory(&self, extra: &[(&str, &str)]) -> ParquetSinkFactory {
            let scratch = tempfile::tempdir().expect("tempdir");
            let dir = match self {
                TestLake::Dir(dir) => dir.path(),
                TestLake::Store(_) => scratch.path(),
            };
            let mut pairs = vec![
                ("connector".to_string(), "parquet".to_string()),
                ("path".to_string(), format!("file://{}", dir.display())),
            ];
            pairs.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            let options = Options::try_from_pairs(pairs).expect("options");
            let factory = ParquetSinkFactory::try_new("lake", schema(), &options).expect("valid");
            match self {
                TestLake::Dir(_) => factory,
                TestLake::Store(store) => factory.in_store(store.clone(), 1024),
            }
        }

        /// Every published file (relative path, the run's id replaced by `<run>`) and the
        /// `n` values the lake holds, sorted.
        async fn published(&self) -> (Vec<String>, Vec<i64>) {
            let mut files = Vec::new();
            let mut contents: Vec<Bytes> = Vec::new();
            match self {
                TestLake::Dir(dir) => {
                    let mut dirs = vec![dir.path().to_path_buf()];
                    while let Some(d) = dirs.pop() {
                        for entry in std::fs::read_dir(&d).expect("ls") {
                            let path = entry.expect("entry").path();
                            if path.is_dir() {
                                dirs.push(path);
                            } else if path.extension().is_some_and(|e| e == "parquet") {
                                let name = path.strip_prefix(dir.path()).expect("inside");
                                files.push(name.display().to_string());
                                contents.push(std::fs::read(&path).expect("read").into());
                            }
                        }
                    }
                }
                TestLake::Store(store) => {
                    let objects: Vec<_> = store
                        .list(Some(&ObjectPath::from("lake")))
                        .try_collect()
                        .await
                        .expect("list");
                    for object in objects {
                        let key = object.location.to_string();
                        let key = key.strip_prefix("lake/").expect("inside");
                        if key.ends_with(".parquet") {
                            files.push(key.to_string());
                            let body = store.get(&object.location).await.expect("get");
                            contents.push(body.bytes().await.expect("bytes"));
                        }
                    }
                }
            }
            let mut values = Vec::new();
            for content in contents {
                let reader = ParquetRecordBatchReaderBuilder::try_new(content)
                    .expect("a complete parquet file")
                    .build()
                    .expect("reader");
                for batch in reader {
                    let batch = batch.expect("batch");
                    let n = batch
                        .column_by_name("n")
                        .expect("n")
                        .as_primitive::<Int64Type>();
                    values.extend(n.values().iter());
                }
            }
            let mut files: Vec<String> = files.iter().map(|f| without_run(f)).collect();
            files.sort();
            values.sort_unstable();
            (files, values)
        }

        /// Files or uploads in progress (an upload counts by its marker).
        async fn in_progress(&self) -> usize {
            match self {
                TestLake::Dir(dir) => {
                    let mut found = 0;
                    let mut dirs = vec![dir.path().to_path_buf()];
                    while let Some(d) = dirs.pop() {
                        for entry in std::fs::read_dir(&d).expect("ls") {
                            let path = entry.expect("entry").path();
                            if path.is_dir() {
                                dirs.push(path);
                            } else if path.to_string_lossy().ends_with(".inprogress") {
                                found += 1;
                            }
                        }
                    }
                    found
                }
                TestLake::Store(store) => {
                    let markers: Vec<_> = store
                        .list(Some(&ObjectPath::from("lake/_weir/uploads/lake")))
                        .try_collect()
                        .await
                        .expect("list");
                    markers.len()
                }
            }
        }
    }

    /// `name` with the run's id (`part-lake-<run>-...`) replaced by `<run>`.
    fn without_run(name: &str) -> String {
        let (dir, file) = name.rsplit_once('/').unwrap_or(("", name));
        let fields: Vec<&str> = file.splitn(4, '-').collect();
        let file = match fields.as_slice() {
            ["part", sink, _run, rest] => format!("part-{sink}-<run>-{rest}"),
            _ => file.to_string(),
        };
        match dir {
            "" => file,
            dir => format!("{dir}/{file}"),
        }
    }

    fn sink(factory: &ParquetSinkFactory) -> Box<dyn Sink> {
        factory.create(&weir_runtime::Metrics::new()).expect("sink")
    }

    /// Takes checkpoint `epoch`: pre-commit and snapshot, as the sink runner does.
    async fn checkpoint(sink: &mut dyn Sink, epoch: u64) -> Snapshot {
        let (tx, rx) = std::sync::mpsc::channel();
        let barrier = CheckpointBarrier::tracked(epoch, tx);
        sink.pre_commit(barrier).await.expect("pre-commit");
        assert!(rx.try_recv().expect("acknowledged").durable);
        let snapshot = sink.snapshot().expect("snapshot").expect("state");
        // Through the store's JSON, as a restore reads it.
        let meta = serde_json::from_str(&snapshot.meta.to_string()).expect("json");
        Snapshot::new(meta, snapshot.batches)
    }

    /// The pipeline's last checkpoint `epoch` (pre-commit with `last`, then its commit):
    /// everything written is published.
    async fn last_checkpoint(sink: &mut dyn Sink, epoch: u64) {
        let (tx, _rx) = std::sync::mpsc::channel();
        sink.pre_commit(CheckpointBarrier::tracked(epoch, tx).into_last())
            .await
            .expect("last pre-commit");
        sink.commit(epoch).await.expect("commit");
    }

    #[tokio::test]
    async fn files_are_published_only_when_their_checkpoint_commits() {
        for lake in TestLake::both() {
            let factory = lake.factory(&[]);
            let mut sink = sink(&factory);
            sink.write(rows(0..10)).await.expect("write");
            // A rollover finishes the file, but only a checkpoint publishes it.
            sink.on_tick().await.expect("tick");
            let _ = checkpoint(sink.as_mut(), 1).await;
            assert!(
                lake.published().await.0.is_empty(),
                "{}: nothing before the commit",
                lake.kind()
            );
            sink.commit(1).await.expect("commit");
            sink.write(rows(10..15)).await.expect("write");
            last_checkpoint(sink.as_mut(), 2).await;
            sink.finish().await.expect("finish");
            let (files, values) = lake.published().await;
            assert_eq!(values, (0..15).collect::<Vec<_>>(), "{}", lake.kind());
            assert_eq!(
                files.len(),
                1,
                "{}: {files:?}: the open file spans checkpoints",
                lake.kind()
            );
            assert_eq!(lake.in_progress().await, 0, "{}", lake.kind());
        }
    }

    #[tokio::test]
    async fn a_crash_before_pre_commit_publishes_nothing_and_leaves_nothing() {
        for lake in TestLake::both() {
            let factory = lake.factory(&[]);
            let mut first = sink(&factory);
            first.write(rows(0..10)).await.expect("write");
            drop(first); // killed before any checkpoint
            assert_eq!(lake.in_progress().await, 1, "{}", lake.kind());
            let mut second = sink(&factory);
            second.write(rows(100..101)).await.expect("write");
            assert!(lake.published().await.0.is_empty());
            assert_eq!(
                lake.in_progress().await,
                1,
                "{}: the dead run's file is gone, the second's is there",
                lake.kind()
            );
        }
    }

    /// An upload the dead run started after its checkpoint is aborted, not only forgotten.
    #[tokio::test]
    async fn a_restore_aborts_uploads_started_after_the_checkpoint() {
        let store = Arc::new(object_store::memory::InMemory::new());
        let lake = TestLake::Store(store.clone());
        let factory = lake.factory(&[]);
        let mut first = sink(&factory);
        first.write(rows(0..10)).await.expect("write");
        let saved = checkpoint(first.as_mut(), 1).await;
        first.on_tick().await.expect("tick");
        // After the checkpoint: a new partition's file, whose upload only its marker names.
        first.write(rows(100..110)).await.expect("write");
        let markers: Vec<_> = store
            .list(Some(&ObjectPath::from("lake/_weir/uploads/lake")))
            .try_collect()
            .await
            .expect("list");
        assert_eq!(markers.len(), 1, "one upload in progress: {markers:?}");
        let marker: UploadMarker = serde_json::from_slice(
            &store
                .get(&markers[0].location)
                .await
                .expect("get")
                .bytes()
                .await
                .expect("bytes"),
        )
        .expect("marker");
        drop(first);

        let mut second = sink(&factory);
        second.restore(saved).await.expect("restore");
        let key = ObjectPath::parse(&marker.key).expect("key");
        let late = store
            .put_part(&key, &marker.id, 0, Bytes::from_static(b"x").into())
            .await;
        assert!(late.is_err(), "the orphan upload was aborted");
        last_checkpoint(second.as_mut(), 2).await;
        assert_eq!(lake.published().await.1, (0..10).collect::<Vec<_>>());
        assert_eq!(lake.in_progress().await, 0, "no marker left");
    }

    #[tokio::test]
    async fn a_crash_between_pre_commit_and_commit_publishes_exactly_the_checkpointed_rows() {
        for partition_by in ["none", "date", "region"] {
            for lake in TestLake::both() {
                let what = format!("{partition_by}, {}", lake.kind());
                let factory = lake.factory(&[("partition_by", partition_by)]);
                let mut first = sink(&factory);
                first.write(rows(0..150)).await.expect("write");
                first.on_tick().await.expect("tick"); // nothing is old enough: stays open
                first.write(rows(150..250)).await.expect("write");
                let saved = checkpoint(first.as_mut(), 1).await;
                // Rows after the checkpoint, then the process dies before the commit.
                first.write(rows(250..300)).await.expect("write");
                drop(first);

                let mut second = sink(&factory);
                second.restore(saved.clone()).await.expect("restore");
                // The restored rows that were not yet in a row group are written again into
                // a new file, published by the next checkpoint.
                let _ = checkpoint(second.as_mut(), 2).await;
                second.commit(2).await.expect("commit");
                last_checkpoint(second.as_mut(), 3).await;
                let (files, values) = lake.published().await;
                assert_eq!(
                    values,
                    (0..250).collect::<Vec<_>>(),
                    "{what}: exactly the rows before the checkpoint, once ({files:?})"
                );
                assert_eq!(
                    lake.in_progress().await,
                    0,
                    "{what}: nothing left in progress"
                );
                // A second restore from the same checkpoint (a crash during the first one's
                // commit) publishes nothing twice.
                let mut third = sink(&factory);
                third.restore(saved).await.expect("restore again");
                last_checkpoint(third.as_mut(), 2).await;
                let (again, values) = lake.published().await;
                assert_eq!(values, (0..250).collect::<Vec<_>>(), "{what}: {again:?}");
                assert_eq!(again, files, "{what}: the replay writes the same files");
            }
        }
    }

    /// A file large enough to flush row groups at checkpoints: on an object store its parts
    /// are sent as they fill, the checkpoint keeps only the unsent tail, and a restore
    /// completes the upload with exactly the checkpointed row groups.
    #[tokio::test]
    async fn a_file_spanning_checkpoints_is_sealed_at_its_checkpointed_length() {
        for lake in TestLake::both() {
            let factory = lake.factory(&[]);
            let mut first = sink(&factory);
            let big = FLUSH_MIN_ROWS as i64 + 5_000;
            first.write(rows(0..big)).await.expect("write");
            let _ = checkpoint(first.as_mut(), 1).await; // flushes a row group
            first.commit(1).await.expect("commit");
            first.write(rows(big..big + 100)).await.expect("write");
            let saved = checkpoint(first.as_mut(), 2).await; // 100 rows stay unflushed
            let meta: SinkRecord = serde_json::from_value(saved.meta.clone()).expect("record");
            if let Pending::Upload { parts, .. } = &meta.open[0].pending {
                assert!(
                    parts.len() > 10,
                    "{} parts of 1 KiB sent before the checkpoint",
                    parts.len()
                );
            }
            first
                .write(rows(big + 100..2 * big + 100))
                .await
                .expect("write");
            // The pre-commit of a checkpoint that never completes: parts sent (a row group
            // flushed) after the one restored.
            let _ = checkpoint(first.as_mut(), 3).await;
            drop(first);

            let mut second = sink(&factory);
            second.restore(saved).await.expect("restore");
            last_checkpoint(second.as_mut(), 3).await;
            let (files, values) = lake.published().await;
            assert_eq!(
                values,
                (0..big + 100).collect::<Vec<_>>(),
                "{}: {files:?}",
                lake.kind()
            );
            assert_eq!(
                files.len(),
                2,
                "{}: the sealed file and the rewritten rows' file",
                lake.kind()
            );
            assert_eq!(lake.in_progress().await, 0, "{}", lake.kind());
        }
    }

    /// A sink started without a checkpoint (its query changed, or it was dropped and
    /// created again) names its files for a new run: it never replaces an earlier run's.
    #[tokio::test]
    async fn a_fresh_start_keeps_the_files_of_earlier_runs() {
        for lake in TestLake::both() {
            let factory = lake.factory(&[]);
            for _ in 0..2 {
                let mut sink = sink(&factory);
                sink.write(rows(0..10)).await.expect("write");
                last_checkpoint(sink.as_mut(), 1).await;
            }
            let (files, values) = lake.published().await;
            assert_eq!(files.len(), 2, "{}: {files:?}", lake.kind());
            let mut want: Vec<i64> = (0..10).chain(0..10).collect();
            want.sort_unstable();
            assert_eq!(values, want, "{}", lake.kind());
        }
    }

    #[tokio::test]
    async fn partitions_are_hive_directories_and_partition_columns_leave_the_files() {
        for lake in TestLake::both() {
            let factory = lake.factory(&[("partition_by", "region")]);
            let mut sink = sink(&factory);
            sink.write(rows(0..4)).await.expect("write");
            last_checkpoint(sink.as_mut(), 1).await;
            let (files, _) = lake.published().await;
            assert_eq!(
                files,
                vec![
                    "region=north/part-lake-<run>-0000000001-0000.parquet".to_string(),
                    "region=south%2Feast/part-lake-<run>-0000000001-0001.parquet".to_string(),
                ],
                "{}",
                lake.kind()
            );
            if let TestLake::Dir(dir) = &lake {
                let dir = dir.path().join("region=north");
                let file = std::fs::read_dir(&dir).expect("ls").next().expect("a file");
                let file = File::open(file.expect("entry").path()).expect("open");
                let reader = ParquetRecordBatchReaderBuilder::try_new(file).expect("parquet");
                let names: Vec<String> = reader
                    .schema()
                    .fields()
                    .iter()
                    .map(|f| f.name().clone())
                    .collect();
                assert_eq!(names, vec!["n", "window_end"]);
            }
        }
        for lake in TestLake::both() {
            let factory = lake.factory(&[("partition_by", "date")]);
            let mut sink = sink(&factory);
            sink.write(rows(99..101)).await.expect("write");
            last_checkpoint(sink.as_mut(), 1).await;
            let (files, _) = lake.published().await;
            assert_eq!(
                files,
                vec![
                    "dt=2026-01-01/hour=00/part-lake-<run>-0000000001-0000.parquet".to_string(),
                    "dt=2026-01-01/hour=01/part-lake-<run>-0000000001-0001.parquet".to_string(),
                ],
                "{}",
                lake.kind()
            );
        }
    }

    #[test]
    fn partition_by_names_columns_the_rows_have() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pairs = vec![
            ("connector".to_string(), "parquet".to_string()),
            ("path".to_string(), dir.path().display().to_string()),
            ("partition_by".to_string(), "nope".to_string()),
        ];
        let options = Options::try_from_pairs(pairs).expect("options");
        let err = ParquetSinkFactory::try_new("lake", schema(), &options).expect_err("nope");
        assert!(err.to_string().contains("column 'nope'"), "{err}");
    }

    #[test]
    fn paths_name_a_directory_or_an_object_store() {
        let factory = |path: &str| {
            let options = Options::try_from_pairs(vec![
                ("connector".into(), "parquet".into()),
                ("path".into(), path.into()),
            ])
            .expect("options");
            ParquetSinkFactory::try_new("lake", schema(), &options)
        };
        let s3 = factory("s3://bucket/x").expect("s3");
        assert!(matches!(s3.lake, Lake::Remote { ref root, .. } if root.as_ref() == "x"));
        let err = factory("ftp://host/x").expect_err("ftp");
        assert!(matches!(err, ConnectorError::Option(_)), "{err}");
        assert!(
            err.to_string().contains("unsupported scheme ftp://"),
            "{err}"
        );
    }

    #[test]
    fn files_of_a_sink_are_told_from_a_similarly_named_sinks() {
        assert!(is_file_counter("19b2f3c4d5e-0000000001-0000"));
        assert!(is_file_counter("0000000001-0000"));
        assert!(!is_file_counter("b-19b2f3c4d5e-0000000001-0000"));
        assert!(!is_file_counter("x-0000000001"));
    }
}
