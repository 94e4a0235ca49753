//! The `parquet` sink: a local data lake, one zstd Parquet file per rollover interval.
//!
//! A file is written as `<name>.parquet.inprogress` and renamed to `<name>.parquet` when it is
//! closed (rollover interval reached, `target_file_size` reached, or the pipeline ends), so a
//! reader listing `*.parquet` never sees a partial file.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use weir_runtime::connector::{ConnectorError, SinkFactory};
use weir_runtime::{CheckpointBarrier, Error, Result, Sink};
use weir_sql::Options;

/// Default `rollover.interval`.
const DEFAULT_ROLLOVER: Duration = Duration::from_secs(60);
/// Default `target_file_size`.
const DEFAULT_TARGET_FILE_SIZE: u64 = 128 << 20;

/// Tells apart files opened by different sinks in the same millisecond.
static FILE_SEQUENCE: AtomicU64 = AtomicU64::new(0);

/// Validated `parquet` options.
#[derive(Debug, Clone)]
pub struct ParquetSinkFactory {
    name: String,
    schema: SchemaRef,
    dir: PathBuf,
    rollover: Duration,
    target_file_size: u64,
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
        let partition_by = reader.one_of("partition_by", &["none", "date"])?;
        reader.finish()?;
        if partition_by.as_deref() == Some("date") {
            return Err(ConnectorError::NotSupported(
                "parquet partition_by = 'date'".into(),
            ));
        }
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
        std::fs::create_dir_all(&dir).map_err(|e| {
            ConnectorError::Invalid(format!(
                "cannot create parquet directory '{}': {e}",
                dir.display()
            ))
        })?;
        Ok(Self {
            name: name.to_string(),
            schema,
            dir,
            rollover,
            target_file_size,
        })
    }
}

impl SinkFactory for ParquetSinkFactory {
    fn connector(&self) -> &'static str {
        "parquet"
    }

    fn create(&self, _metrics: &weir_runtime::Metrics) -> Result<Box<dyn Sink>> {
        Ok(Box::new(ParquetSink {
            config: self.clone(),
            open: None,
            held: Vec::new(),
        }))
    }
}

/// Writes batches into rolling Parquet files.
pub struct ParquetSink {
    config: ParquetSinkFactory,
    open: Option<OpenFile>,
    /// Barriers whose rows are in the open file: released when it is published.
    held: Vec<CheckpointBarrier>,
}

struct OpenFile {
    writer: ArrowWriter<File>,
    in_progress: PathBuf,
    opened: Instant,
}

impl ParquetSink {
    fn open(&self) -> Result<OpenFile> {
        let millis = chrono::Utc::now().timestamp_millis();
        let seq = FILE_SEQUENCE.fetch_add(1, Ordering::Relaxed);
        let in_progress = self.config.dir.join(format!(
            "{}-{millis}-{seq:06}.parquet.inprogress",
            self.config.name
        ));
        let file = File::create(&in_progress)
            .map_err(|e| Error::io(in_progress.display().to_string(), e))?;
        let properties = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::default()))
            .build();
        let writer = ArrowWriter::try_new(file, self.config.schema.clone(), Some(properties))
            .map_err(|e| Error::Execution(format!("cannot start parquet file: {e}")))?;
        Ok(OpenFile {
            writer,
            in_progress,
            opened: Instant::now(),
        })
    }

    /// Closes the open file, if any, and publishes it under its final name.
    fn close(&mut self) -> Result<()> {
        let result = self.publish();
        if result.is_err() {
            self.held.iter().for_each(CheckpointBarrier::fail);
        }
        self.held.clear();
        result
    }

    fn publish(&mut self) -> Result<()> {
        let Some(open) = self.open.take() else {
            return Ok(());
        };
        open.writer
            .close()
            .map_err(|e| Error::Execution(format!("cannot finish parquet file: {e}")))?;
        let done = final_name(&open.in_progress);
        std::fs::rename(&open.in_progress, &done)
            .map_err(|e| Error::io(done.display().to_string(), e))?;
        tracing::debug!(file = %done.display(), "parquet file published");
        Ok(())
    }
}

fn final_name(in_progress: &Path) -> PathBuf {
    in_progress.with_extension("")
}

#[async_trait]
impl Sink for ParquetSink {
    async fn write(&mut self, batch: RecordBatch) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        if self.open.is_none() {
            self.open = Some(self.open()?);
        }
        let Some(open) = self.open.as_mut() else {
            return Err(Error::Internal(
                "parquet file vanished after opening".into(),
            ));
        };
        open.writer
            .write(&batch)
            .map_err(|e| Error::Execution(format!("cannot write parquet: {e}")))?;
        if open.writer.bytes_written() as u64 + open.writer.in_progress_size() as u64
            >= self.config.target_file_size
        {
            self.close()?;
        }
        Ok(())
    }

    async fn pre_commit(&mut self, barrier: CheckpointBarrier) -> Result<()> {
        // Rows before the barrier are durable once the open file is published.
        if self.open.is_some() {
            self.held.push(barrier);
        }
        Ok(())
    }

    fn tick_interval(&self) -> Option<Duration> {
        Some(self.config.rollover.min(Duration::from_secs(1)))
    }

    async fn on_tick(&mut self) -> Result<()> {
        if self
            .open
            .as_ref()
            .is_some_and(|o| o.opened.elapsed() >= self.config.rollover)
        {
            self.close()?;
        }
        Ok(())
    }

    async fn finish(&mut self) -> Result<()> {
        self.close()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use std::sync::Arc;

    #[tokio::test]
    async fn files_appear_only_when_closed_and_hold_every_row() {
        let dir = tempfile::tempdir().expect("tempdir");
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
        let options = Options::try_from_pairs(vec![
            ("connector".into(), "parquet".into()),
            ("path".into(), format!("file://{}", dir.path().display())),
        ])
        .expect("options");
        let factory = ParquetSinkFactory::try_new("lake", schema.clone(), &options).expect("valid");
        let mut sink = factory.create(&weir_runtime::Metrics::new()).expect("sink");
        for chunk in [vec![1, 2], vec![3]] {
            let batch =
                RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from(chunk))])
                    .expect("b");
            sink.write(batch).await.expect("write");
        }
        let published = |dir: &Path| -> Vec<PathBuf> {
            let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
                .expect("ls")
                .map(|e| e.expect("entry").path())
                .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
                .collect();
            v.sort();
            v
        };
        assert!(
            published(dir.path()).is_empty(),
            "nothing published before close"
        );
        sink.finish().await.expect("finish");
        let files = published(dir.path());
        assert_eq!(files.len(), 1);
        let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(&files[0]).expect("open"))
            .expect("parquet")
            .build()
            .expect("reader");
        let total: usize = reader.map(|b| b.expect("batch").num_rows()).sum();
        assert_eq!(total, 3);
    }

    #[test]
    fn object_store_urls_are_not_supported_yet() {
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
        let options = Options::try_from_pairs(vec![
            ("connector".into(), "parquet".into()),
            ("path".into(), "s3://bucket/x".into()),
        ])
        .expect("options");
        let err = ParquetSinkFactory::try_new("lake", schema, &options).expect_err("s3");
        assert!(matches!(err, ConnectorError::NotSupported(_)), "{err}");
    }
}
