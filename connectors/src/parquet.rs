//! The `parquet` sink: an exactly-once, Hive-partitioned local data lake (zstd Parquet).
//!
//! Two-phase commit with the job's checkpoints:
//!
//! - Rows go to an open file per partition, `.part-<sink>-<epoch>-<n>.parquet.inprogress` in
//!   the partition's directory (hidden from `**/*.parquet`). A file rolls over when it
//!   reaches `target_file_size` or `rollover.interval`: it is finished (footer written) and
//!   waits, closed, for the next checkpoint.
//! - Pre-commit (at a barrier): closed files are synced and tied to the epoch; each open
//!   file's row group is flushed (if it holds at least [`FLUSH_MIN_ROWS`] rows) and the file
//!   synced. The snapshot records, per open file, its length, the footer that would make it
//!   a complete Parquet file at that length, and the rows of the row group not yet flushed
//!   (a checkpoint does not force a small file per partition: files span checkpoints).
//! - Commit (the checkpoint is complete): the epoch's closed files are renamed to
//!   `part-<sink>-<epoch>-<n>.parquet`. Names are fixed when a file opens, from the epoch and
//!   a counter that restarts every epoch, so a replay after a restore writes the same rows
//!   to files of the same names, and never publishes anything twice.
//! - Restore: the checkpoint's closed files are published (if not already); each open file
//!   is cut back to its recorded length and given its recorded footer, then published; its
//!   unflushed rows are written again; every other in-progress file of this sink (written
//!   after the checkpoint) is deleted.
//!
//! Partitions: `partition_by = 'date'` writes `dt=YYYY-MM-DD/hour=HH` directories from the
//! row's time column (`window_end` when present, else the first TIMESTAMP column);
//! `partition_by = 'a,b'` writes `a=<value>/b=<value>` and leaves those columns out of the
//! files, as Hive and Spark do. DuckDB reads the lake as one table with
//! `read_parquet('<path>/**/*.parquet', hive_partitioning = true)`.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{Array, ArrayRef, AsArray, BinaryArray, UInt32Array};
use arrow::compute::{cast, take};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit, TimestampMillisecondType};
use arrow::record_batch::RecordBatch;
use arrow::row::{RowConverter, SortField};
use async_trait::async_trait;
use parquet::arrow::{ArrowSchemaConverter, ArrowWriter};
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::{
    FileMetaData, KeyValue, ParquetMetaDataBuilder, ParquetMetaDataWriter,
};
use parquet::file::properties::WriterProperties;
use parquet::schema::types::SchemaDescPtr;
use weir_runtime::connector::{ConnectorError, SinkFactory};
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

/// Validated `parquet` options.
#[derive(Debug, Clone)]
pub struct ParquetSinkFactory {
    name: String,
    /// The rows the sink receives.
    schema: SchemaRef,
    /// The rows in the files: `schema` without partition columns.
    file_schema: SchemaRef,
    dir: PathBuf,
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
        let dir = match path.split_once("://") {
            None => PathBuf::from(path),
            Some(("file", rest)) => PathBuf::from(rest),
            Some((scheme, _)) => {
                return Err(ConnectorError::NotSupported(format!(
                    "parquet paths with the {scheme}:// scheme"
                )));
            }
        };
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
        std::fs::create_dir_all(&dir).map_err(|e| {
            ConnectorError::Invalid(format!(
                "cannot create parquet directory '{}': {e}",
                dir.display()
            ))
        })?;
        Ok(Self {
            name: name.to_string(),
            schema,
            file_schema,
            dir,
            rollover,
            target_file_size,
            partitioning,
        })
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
        Ok(Box::new(ParquetSink {
            config: self.clone(),
            open: HashMap::new(),
            closed: Vec::new(),
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

impl ParquetSinkFactory {
    fn config_columns(&self) -> Option<&[usize]> {
        match &self.partitioning {
            Partitioning::Columns { columns } => Some(columns),
            _ => None,
        }
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

struct OpenFile {
    writer: ArrowWriter<File>,
    in_progress: PathBuf,
    published: PathBuf,
    opened: Instant,
    /// The rows of the row group not flushed yet (they are in the checkpoint, not the file).
    unflushed: Vec<RecordBatch>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct ClosedFile {
    in_progress: PathBuf,
    published: PathBuf,
    epoch: Option<u64>,
}

/// An open file as a checkpoint records it; its footer and unflushed rows are batches.
#[derive(serde::Serialize, serde::Deserialize)]
struct OpenRecord {
    partition: PathBuf,
    in_progress: PathBuf,
    published: PathBuf,
    len: u64,
    /// Batches of unflushed rows following its footer batch.
    unflushed: usize,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct SinkRecord {
    /// The epoch of the barrier the snapshot was taken at.
    epoch: u64,
    open: Vec<OpenRecord>,
    closed: Vec<ClosedFile>,
}

impl ParquetSink {
    fn writer_properties(&self) -> WriterProperties {
        WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::default()))
            .set_max_row_group_row_count(Some(MAX_ROW_GROUP_ROWS))
            .build()
    }

    /// Opens the next file of `partition`, named for the current epoch.
    fn open(&mut self, partition: &Path) -> Result<OpenFile> {
        let name = format!(
            "part-{}-{:010}-{:04}.parquet",
            self.config.name, self.epoch, self.seq
        );
        self.seq += 1;
        let dir = self.config.dir.join(partition);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(dir.display().to_string(), e))?;
        let in_progress = dir.join(format!(".{name}.inprogress"));
        let file = File::create(&in_progress)
            .map_err(|e| Error::io(in_progress.display().to_string(), e))?;
        let writer = ArrowWriter::try_new(
            file,
            self.config.file_schema.clone(),
            Some(self.writer_properties()),
        )
        .map_err(|e| Error::Execution(format!("cannot start parquet file: {e}")))?;
        Ok(OpenFile {
            writer,
            in_progress,
            published: dir.join(name),
            opened: Instant::now(),
            unflushed: Vec::new(),
        })
    }

    /// Every partition directory with an in-progress file of this sink, and those files.
    fn in_progress_files(&self) -> Result<Vec<PathBuf>> {
        let prefix = format!(".part-{}-", self.config.name);
        let mut found = Vec::new();
        let mut dirs = vec![self.config.dir.clone()];
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
                } else if name.starts_with(&prefix) && name.ends_with(".inprogress") {
                    found.push(path);
                }
            }
        }
        Ok(found)
    }

    /// Deletes in-progress files of this sink that no checkpoint refers to (a run that
    /// ended after its last checkpoint, or one with no checkpoint at all).
    fn delete_unreferenced(&mut self) -> Result<()> {
        for path in self.in_progress_files()? {
            let referenced = self.open.values().any(|o| o.in_progress == path)
                || self.closed.iter().any(|c| c.in_progress == path);
            if !referenced {
                tracing::debug!(file = %path.display(), "deleting an in-progress file written after the last checkpoint");
                std::fs::remove_file(&path)
                    .map_err(|e| Error::io(path.display().to_string(), e))?;
            }
        }
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
    fn write_partition(&mut self, partition: PathBuf, rows: RecordBatch) -> Result<()> {
        if !self.open.contains_key(&partition) {
            let file = self.open(&partition)?;
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
        let size = file.writer.bytes_written() as u64 + file.writer.in_progress_size() as u64;
        if size >= self.config.target_file_size {
            self.finish_file(&partition)?;
        }
        Ok(())
    }

    /// Finishes the open file of `partition` (footer written, synced); it is published by
    /// the checkpoint after the next barrier.
    fn finish_file(&mut self, partition: &Path) -> Result<()> {
        let Some(mut open) = self.open.remove(partition) else {
            return Ok(());
        };
        open.writer
            .finish()
            .map_err(|e| Error::Execution(format!("cannot finish parquet file: {e}")))?;
        open.writer
            .inner()
            .sync_data()
            .map_err(|e| Error::io(open.in_progress.display().to_string(), e))?;
        self.closed.push(ClosedFile {
            in_progress: open.in_progress,
            published: open.published,
            epoch: None,
        });
        Ok(())
    }

    /// The footer that makes an open file, cut at its current length, a complete Parquet
    /// file of the row groups flushed so far.
    fn footer(&self, writer: &ArrowWriter<File>) -> Result<Vec<u8>> {
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

/// Publishes a finished file under its final name; already published is fine (a restore
/// repeating a commit). Missing both is a lost file.
fn publish(file: &ClosedFile) -> Result<()> {
    match std::fs::rename(&file.in_progress, &file.published) {
        Ok(()) => {
            tracing::debug!(file = %file.published.display(), "parquet file published");
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && file.published.exists() => Ok(()),
        Err(e) => Err(Error::io(file.published.display().to_string(), e)),
    }
}

#[async_trait]
impl Sink for ParquetSink {
    async fn write(&mut self, batch: RecordBatch) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        if !self.cleaned {
            self.delete_unreferenced()?;
        }
        for (partition, rows) in self.split(&batch)? {
            self.write_partition(partition, rows)?;
        }
        Ok(())
    }

    async fn pre_commit(&mut self, barrier: CheckpointBarrier) -> Result<()> {
        if !self.cleaned {
            self.delete_unreferenced()?;
        }
        let partitions: Vec<PathBuf> = self.open.keys().cloned().collect();
        for partition in partitions {
            if barrier.last {
                // The pipeline ends here: everything is published by this checkpoint.
                self.finish_file(&partition)?;
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
            file.writer
                .sync()
                .and_then(|()| file.writer.inner().sync_data())
                .map_err(io_error(&file.in_progress))?;
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
        let footer_schema = Arc::new(Schema::new(vec![Field::new(
            "footer",
            DataType::Binary,
            false,
        )]));
        for (partition, file) in &self.open {
            let footer = self.footer(&file.writer)?;
            batches.push(RecordBatch::try_new(
                footer_schema.clone(),
                vec![Arc::new(BinaryArray::from_vec(vec![footer.as_slice()]))],
            )?);
            batches.extend(file.unflushed.iter().cloned());
            open.push(OpenRecord {
                partition: partition.clone(),
                in_progress: file.in_progress.clone(),
                published: file.published.clone(),
                len: file.writer.bytes_written() as u64,
                unflushed: file.unflushed.len(),
            });
        }
        let record = SinkRecord {
            epoch: self.epoch - 1,
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
            publish(closed)?;
        }
        let mut batches = snapshot.batches.into_iter();
        let mut rewrite = Vec::new();
        for open in record.open {
            let footer = batches.next().ok_or_else(|| {
                Error::Execution("parquet sink state is unreadable: a footer is missing".into())
            })?;
            let unflushed: Vec<RecordBatch> = batches.by_ref().take(open.unflushed).collect();
            if !open.published.exists() {
                let footer = footer
                    .column(0)
                    .as_binary_opt::<i32>()
                    .filter(|f| f.len() == 1)
                    .map(|f| f.value(0).to_vec())
                    .ok_or_else(|| Error::Execution("parquet sink state: bad footer".into()))?;
                seal(&open.in_progress, open.len, &footer)?;
                publish(&ClosedFile {
                    in_progress: open.in_progress,
                    published: open.published,
                    epoch: None,
                })?;
            }
            rewrite.push((open.partition, unflushed));
        }
        self.epoch = record.epoch + 1;
        self.seq = 0;
        // Anything else in progress was written after the checkpoint.
        self.delete_unreferenced()?;
        for (partition, rows) in rewrite {
            for batch in rows {
                self.write_partition(partition.clone(), batch)?;
            }
        }
        Ok(())
    }

    async fn commit(&mut self, epoch: u64) -> Result<()> {
        let mut kept = Vec::with_capacity(self.closed.len());
        for file in std::mem::take(&mut self.closed) {
            if file.epoch.is_some_and(|e| e <= epoch) {
                publish(&file)?;
            } else {
                kept.push(file);
            }
        }
        self.closed = kept;
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
            self.finish_file(&partition)?;
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
fn seal(path: &Path, len: u64, footer: &[u8]) -> Result<()> {
    use std::io::Write;
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
    use std::io::Seek;
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

    fn factory(dir: &Path, extra: &[(&str, &str)]) -> ParquetSinkFactory {
        let mut pairs = vec![
            ("connector".to_string(), "parquet".to_string()),
            ("path".to_string(), format!("file://{}", dir.display())),
        ];
        pairs.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let options = Options::try_from_pairs(pairs).expect("options");
        ParquetSinkFactory::try_new("lake", schema(), &options).expect("valid")
    }

    fn sink(factory: &ParquetSinkFactory) -> Box<dyn Sink> {
        factory.create(&weir_runtime::Metrics::new()).expect("sink")
    }

    /// Every published file (relative path) and the `n` values the lake holds, sorted.
    fn lake(dir: &Path) -> (Vec<String>, Vec<i64>) {
        let mut files = Vec::new();
        let mut values = Vec::new();
        let mut dirs = vec![dir.to_path_buf()];
        while let Some(d) = dirs.pop() {
            for entry in std::fs::read_dir(&d).expect("ls") {
                let path = entry.expect("entry").path();
                if path.is_dir() {
                    dirs.push(path);
                } else if path.extension().is_some_and(|e| e == "parquet") {
                    files.push(
                        path.strip_prefix(dir)
                            .expect("inside")
                            .display()
                            .to_string(),
                    );
                    let reader =
                        ParquetRecordBatchReaderBuilder::try_new(File::open(&path).expect("open"))
                            .expect("a complete parquet file")
                            .build()
                            .expect("reader");
                    for batch in reader {
                        let batch = batch.expect("batch");
                        let n = batch
                            .column_by_name("n")
                            .expect("n")
                            .as_any()
                            .downcast_ref::<Int64Array>()
                            .expect("i64")
                            .clone();
                        values.extend(n.values().iter());
                    }
                }
            }
        }
        files.sort();
        values.sort_unstable();
        (files, values)
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
        let dir = tempfile::tempdir().expect("tempdir");
        let factory = factory(dir.path(), &[]);
        let mut sink = sink(&factory);
        sink.write(rows(0..10)).await.expect("write");
        // A rollover finishes the file, but only a checkpoint publishes it.
        sink.on_tick().await.expect("tick");
        let _ = checkpoint(sink.as_mut(), 1).await;
        assert!(lake(dir.path()).0.is_empty(), "nothing before the commit");
        sink.commit(1).await.expect("commit");
        sink.write(rows(10..15)).await.expect("write");
        last_checkpoint(sink.as_mut(), 2).await;
        sink.finish().await.expect("finish");
        let (files, values) = lake(dir.path());
        assert_eq!(values, (0..15).collect::<Vec<_>>());
        assert_eq!(files.len(), 1, "{files:?}: the open file spans checkpoints");
    }

    #[tokio::test]
    async fn a_crash_before_pre_commit_publishes_nothing_and_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let factory = factory(dir.path(), &[]);
        let mut first = sink(&factory);
        first.write(rows(0..10)).await.expect("write");
        drop(first); // killed before any checkpoint
        let mut second = sink(&factory);
        second.write(rows(100..101)).await.expect("write");
        assert!(lake(dir.path()).0.is_empty());
        let in_progress = second_in_progress(dir.path());
        assert_eq!(
            in_progress.len(),
            1,
            "the dead run's file is gone: {in_progress:?}"
        );
    }

    fn second_in_progress(dir: &Path) -> Vec<PathBuf> {
        let mut found = Vec::new();
        let mut dirs = vec![dir.to_path_buf()];
        while let Some(d) = dirs.pop() {
            for entry in std::fs::read_dir(&d).expect("ls") {
                let path = entry.expect("entry").path();
                if path.is_dir() {
                    dirs.push(path);
                } else if path.to_string_lossy().ends_with(".inprogress") {
                    found.push(path);
                }
            }
        }
        found
    }

    #[tokio::test]
    async fn a_crash_between_pre_commit_and_commit_publishes_exactly_the_checkpointed_rows() {
        for partition_by in ["none", "date", "region"] {
            let dir = tempfile::tempdir().expect("tempdir");
            let factory = factory(dir.path(), &[("partition_by", partition_by)]);
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
            // The restored rows that were not yet in a row group are written again into a
            // new file, published by the next checkpoint.
            let _ = checkpoint(second.as_mut(), 2).await;
            second.commit(2).await.expect("commit");
            last_checkpoint(second.as_mut(), 3).await;
            let (files, values) = lake(dir.path());
            assert_eq!(
                values,
                (0..250).collect::<Vec<_>>(),
                "{partition_by}: exactly the rows before the checkpoint, once ({files:?})"
            );
            assert!(
                second_in_progress(dir.path()).is_empty(),
                "{partition_by}: nothing left in progress"
            );
            // A second restore from the same checkpoint (a crash during the first one's
            // commit) publishes nothing twice.
            let mut third = sink(&factory);
            third.restore(saved).await.expect("restore again");
            last_checkpoint(third.as_mut(), 2).await;
            let (again, values) = lake(dir.path());
            assert_eq!(
                values,
                (0..250).collect::<Vec<_>>(),
                "{partition_by}: {again:?}"
            );
            assert_eq!(
                again, files,
                "{partition_by}: the replay writes the same files"
            );
        }
    }

    #[tokio::test]
    async fn partitions_are_hive_directories_and_partition_columns_leave_the_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let factory = factory(dir.path(), &[("partition_by", "region")]);
        let mut sink = sink(&factory);
        sink.write(rows(0..4)).await.expect("write");
        last_checkpoint(sink.as_mut(), 1).await;
        let (files, _) = lake(dir.path());
        assert_eq!(
            files,
            vec![
                "region=north/part-lake-0000000001-0000.parquet".to_string(),
                "region=south%2Feast/part-lake-0000000001-0001.parquet".to_string(),
            ]
        );
        let file = File::open(dir.path().join(&files[0])).expect("open");
        let reader = ParquetRecordBatchReaderBuilder::try_new(file).expect("parquet");
        let names: Vec<String> = reader
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        assert_eq!(names, vec!["n", "window_end"]);

        let dated = tempfile::tempdir().expect("tempdir");
        let factory = super::tests::factory(dated.path(), &[("partition_by", "date")]);
        let mut sink = super::tests::sink(&factory);
        sink.write(rows(99..101)).await.expect("write");
        last_checkpoint(sink.as_mut(), 1).await;
        let (files, _) = lake(dated.path());
        assert_eq!(
            files,
            vec![
                "dt=2026-01-01/hour=00/part-lake-0000000001-0000.parquet".to_string(),
                "dt=2026-01-01/hour=01/part-lake-0000000001-0001.parquet".to_string(),
            ]
        );
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
    fn object_store_urls_are_not_supported_yet() {
        let options = Options::try_from_pairs(vec![
            ("connector".into(), "parquet".into()),
            ("path".into(), "s3://bucket/x".into()),
        ])
        .expect("options");
        let err = ParquetSinkFactory::try_new("lake", schema(), &options).expect_err("s3");
        assert!(matches!(err, ConnectorError::NotSupported(_)), "{err}");
    }
}
