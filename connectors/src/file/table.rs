//! The `file` table: a CSV, NDJSON or Parquet file held in memory as a lookup table.
//!
//! The whole file is loaded into one [`MemoryTable`] version at CREATE (a failure is the
//! CREATE's error). A refresh task then reloads it when the file changes (its size or
//! modification time, checked every second) and at least every `reload.interval`. A reload
//! builds a new version and swaps it in whole; one that fails (the file is gone, a row does
//! not decode, the file changed while it was read) keeps the previous version, and is counted
//! and logged. Writing the new file beside the old one and renaming it over is the way to
//! replace it; an in-place rewrite is caught by the size/time check and read again.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime};

use arrow::compute::concat_batches;
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use weir_runtime::connector::{ConnectorError, TableFactory, TableSpec};
use weir_runtime::lookup::{LookupTable, MemoryTable};
use weir_runtime::{Error, Metrics, Result};
use weir_sql::Options;
use weir_sql::options::OptionError;

use super::strip_file_scheme;

/// How often the file's size and modification time are compared with the loaded ones.
const CHANGE_CHECK: Duration = Duration::from_secs(1);
/// The longest a loaded version is kept without reading the file again.
const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(60);

/// The formats a table file can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TableFormat {
    Csv { header: bool, delimiter: u8 },
    Json,
    Parquet,
}

/// Validated `file` table options.
#[derive(Debug, Clone)]
pub struct FileTableFactory {
    spec: TableSpec,
    path: PathBuf,
    format: TableFormat,
    reload_interval: Duration,
}

impl FileTableFactory {
    pub fn try_new(spec: &TableSpec, options: &Options) -> Result<Self, ConnectorError> {
        let reader = options.reader();
        reader.string("connector");
        let path = PathBuf::from(strip_file_scheme(reader.required("path")?));
        let format = match reader
            .one_of("format", &["csv", "json", "ndjson", "parquet"])?
            .as_deref()
        {
            Some("json" | "ndjson") => TableFormat::Json,
            Some("parquet") => TableFormat::Parquet,
            Some(_) => TableFormat::Csv {
                header: reader.bool("csv.header")?.unwrap_or(true),
                delimiter: match reader.string("csv.delimiter") {
                    None => b',',
                    Some(d) if d.len() == 1 => d.as_bytes()[0],
                    Some(d) => {
                        return Err(ConnectorError::Option(OptionError::new(
                            "csv.delimiter",
                            format!(
                                "invalid value '{d}' for option 'csv.delimiter': expected one character"
                            ),
                        )));
                    }
                },
            },
            None => match path.extension().and_then(|e| e.to_str()) {
                Some("parquet") => TableFormat::Parquet,
                Some("json" | "ndjson" | "jsonl") => TableFormat::Json,
                Some("csv") => TableFormat::Csv {
                    header: true,
                    delimiter: b',',
                },
                _ => {
                    return Err(ConnectorError::Option(OptionError::new(
                        "format",
                        "option 'format' is required for a file table whose name does not end in .csv, .ndjson or .parquet: expected csv, json or parquet",
                    )));
                }
            },
        };
        let reload_interval = match reader.duration("reload.interval")? {
            Some(d) if d.is_zero() => {
                return Err(ConnectorError::Option(OptionError::new(
                    "reload.interval",
                    "invalid value for option 'reload.interval': expected a positive duration",
                )));
            }
            Some(d) => d,
            None => DEFAULT_RELOAD_INTERVAL,
        };
        reader.finish()?;
        if !path.is_file() {
            return Err(ConnectorError::MissingFile(format!(
                "file table '{}': path '{}' is not a file",
                spec.name,
                path.display()
            )));
        }
        Ok(Self {
            spec: spec.clone(),
            path,
            format,
            reload_interval,
        })
    }
}

#[async_trait]
impl TableFactory for FileTableFactory {
    fn connector(&self) -> &'static str {
        "file"
    }

    async fn open(&self, metrics: &Metrics) -> Result<Arc<dyn LookupTable>> {
        let (rows, stamp) = load(self.clone()).await?;
        let table = MemoryTable::try_new(
            &self.spec.name,
            self.spec.schema.clone(),
            self.spec.key_columns.clone(),
            rows,
            metrics.lookup_table(&self.spec.name),
        )?;
        tokio::spawn(refresh(self.clone(), Arc::downgrade(&table), stamp));
        Ok(table)
    }
}

/// What identifies one state of the file: its size and modification time.
type Stamp = (u64, Option<SystemTime>);

fn stamp(path: &Path) -> std::io::Result<Stamp> {
    let meta = std::fs::metadata(path)?;
    Ok((meta.len(), meta.modified().ok()))
}

/// Reloads the file when it changes, and every `reload_interval`, until the table is gone.
async fn refresh(config: FileTableFactory, table: Weak<MemoryTable>, loaded: Stamp) {
    // `None`: the file was missing at the last look.
    let mut loaded = Some(loaded);
    let mut last_load = Instant::now();
    loop {
        tokio::time::sleep(CHANGE_CHECK.min(config.reload_interval)).await;
        if table.strong_count() == 0 {
            return;
        }
        let changed = stamp(&config.path).ok() != loaded;
        if !changed && last_load.elapsed() < config.reload_interval {
            continue;
        }
        let result = load(config.clone()).await;
        let Some(table) = table.upgrade() else {
            return;
        };
        last_load = Instant::now();
        match result.and_then(|(rows, stamp)| table.publish(rows).map(|()| stamp)) {
            Ok(stamp) => {
                tracing::info!(table = %config.spec.name, rows = table.current().len(),
                    "table reloaded");
                loaded = Some(stamp);
            }
            Err(e) => {
                table.refresh_failed(&e);
                // Try again when the file changes again or the interval passes: a broken
                // or missing file is not re-read every second.
                loaded = stamp(&config.path).ok();
            }
        }
    }
}

/// Reads the whole file into one batch of the table's schema, off the runtime's threads.
async fn load(config: FileTableFactory) -> Result<(RecordBatch, Stamp)> {
    tokio::task::spawn_blocking(move || {
        let path = config.path.display().to_string();
        let before = stamp(&config.path).map_err(|e| Error::io(&path, e))?;
        let batches = read(&config.path, config.format, &config.spec.schema)
            .map_err(|e| Error::Execution(format!("file table '{}': {path}: {e}", config.spec.name)))?;
        let after = stamp(&config.path).map_err(|e| Error::io(&path, e))?;
        if before != after {
            return Err(Error::Execution(format!(
                "file table '{}': {path} changed while it was read; it is read again at the next check",
                config.spec.name
            )));
        }
        let rows = concat_batches(&config.spec.schema, &batches)?;
        Ok((rows, after))
    })
    .await
    .map_err(|e| Error::Internal(format!("file table load panicked: {e}")))?
}

fn read(path: &Path, format: TableFormat, schema: &SchemaRef) -> Result<Vec<RecordBatch>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path.display().to_string(), e))?;
    let reader = std::io::BufReader::with_capacity(1 << 20, file);
    match format {
        TableFormat::Csv { header, delimiter } => {
            Ok(arrow::csv::ReaderBuilder::new(schema.clone())
                .with_header(header)
                .with_delimiter(delimiter)
                .with_batch_size(65_536)
                .build(reader)?
                .collect::<Result<Vec<_>, _>>()?)
        }
        TableFormat::Json => Ok(arrow::json::ReaderBuilder::new(schema.clone())
            .with_batch_size(65_536)
            .build(reader)?
            .collect::<Result<Vec<_>, _>>()?),
        TableFormat::Parquet => read_parquet(path, schema),
    }
}

/// A Parquet file's columns, by name, cast to the declared types.
fn read_parquet(path: &Path, schema: &SchemaRef) -> Result<Vec<RecordBatch>> {
    use parquet::arrow::ProjectionMask;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    let file = std::fs::File::open(path).map_err(|e| Error::io(path.display().to_string(), e))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| Error::Execution(format!("not a Parquet file: {e}")))?;
    let file_schema = builder.schema().clone();
    let mut indices = Vec::with_capacity(schema.fields().len());
    for field in schema.fields() {
        let index = file_schema.index_of(field.name()).map_err(|_| {
            Error::Execution(format!(
                "the file has no column \"{}\" (it has {})",
                field.name(),
                file_schema
                    .fields()
                    .iter()
                    .map(|f| f.name().as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        indices.push(index);
    }
    let mask = ProjectionMask::roots(builder.parquet_schema(), indices.iter().copied());
    let reader = builder
        .with_projection(mask)
        .with_batch_size(65_536)
        .build()
        .map_err(|e| Error::Execution(format!("cannot read the Parquet file: {e}")))?;
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch?;
        // The projection keeps the file's column order; put them in the declared order.
        let columns = schema
            .fields()
            .iter()
            .map(|field| {
                let column = batch.column_by_name(field.name()).ok_or_else(|| {
                    Error::Internal(format!("projected column {} missing", field.name()))
                })?;
                if column.data_type() == field.data_type() {
                    Ok(column.clone())
                } else {
                    arrow::compute::cast(column, field.data_type()).map_err(Error::from)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        out.push(RecordBatch::try_new(schema.clone(), columns)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{ArrayRef, Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};

    fn spec() -> TableSpec {
        TableSpec {
            name: "vehicles".into(),
            schema: Arc::new(Schema::new(vec![
                Field::new("vehicle_id", DataType::Int64, false),
                Field::new("region", DataType::Utf8, true),
            ])),
            key_columns: vec![0],
            restoring: false,
        }
    }

    fn options(path: &Path, extra: &[(&str, &str)]) -> Options {
        let mut pairs = vec![
            ("connector".to_string(), "file".to_string()),
            ("path".to_string(), path.display().to_string()),
        ];
        pairs.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Options::try_from_pairs(pairs).expect("options")
    }

    async fn region_of(table: &dyn LookupTable, id: i64) -> Option<String> {
        let keys: ArrayRef = Arc::new(Int64Array::from(vec![id]));
        let found = table.lookup(&[keys]).await.expect("lookup");
        let row = found.indices.iter().next().flatten()? as usize;
        let regions = found
            .rows
            .column(1)
            .as_any()
            .downcast_ref::<StringArray>()?;
        Some(regions.value(row).to_string())
    }

    #[tokio::test]
    async fn a_changed_file_is_reloaded_and_a_broken_one_keeps_the_last_version() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("vehicles.csv");
        std::fs::write(&path, "vehicle_id,region\n1,north\n2,south\n").expect("write");
        let factory = FileTableFactory::try_new(&spec(), &options(&path, &[])).expect("valid");
        let metrics = Metrics::new();
        let table = factory.open(&metrics).await.expect("open");
        assert_eq!(region_of(table.as_ref(), 2).await.as_deref(), Some("south"));
        assert_eq!(region_of(table.as_ref(), 3).await, None);

        // Replaced by rename, as a writer should.
        let next = dir.path().join("next.csv");
        std::fs::write(&next, "vehicle_id,region\n2,east\n3,west\n4,up\n").expect("write");
        std::fs::rename(&next, &path).expect("rename");
        let deadline = Instant::now() + Duration::from_secs(10);
        while region_of(table.as_ref(), 3).await.is_none() {
            assert!(Instant::now() < deadline, "the new file was not loaded");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(region_of(table.as_ref(), 2).await.as_deref(), Some("east"));
        assert_eq!(region_of(table.as_ref(), 1).await, None);

        // A row that does not decode: the previous version stays, the failure is counted.
        std::fs::write(&next, "vehicle_id,region\nnot-a-number,x\n").expect("write");
        std::fs::rename(&next, &path).expect("rename");
        let failures = metrics.lookup_table("vehicles").reloads_failed;
        let deadline = Instant::now() + Duration::from_secs(10);
        while failures.get() == 0 {
            assert!(Instant::now() < deadline, "the broken file was not tried");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(region_of(table.as_ref(), 4).await.as_deref(), Some("up"));
        assert_eq!(metrics.lookup_table("vehicles").rows.get(), 3);
    }

    #[tokio::test]
    async fn parquet_and_ndjson_files_load_by_column_name() {
        let dir = tempfile::tempdir().expect("dir");
        let ndjson = dir.path().join("v.ndjson");
        std::fs::write(
            &ndjson,
            "{\"region\":\"north\",\"vehicle_id\":7}\n{\"vehicle_id\":8,\"region\":null}\n",
        )
        .expect("write");
        let metrics = Metrics::new();
        let table = FileTableFactory::try_new(&spec(), &options(&ndjson, &[]))
            .expect("valid")
            .open(&metrics)
            .await
            .expect("open");
        assert_eq!(region_of(table.as_ref(), 7).await.as_deref(), Some("north"));

        // Parquet with the columns in another order and a narrower id type.
        let file_schema = Arc::new(Schema::new(vec![
            Field::new("region", DataType::Utf8, true),
            Field::new("vehicle_id", DataType::Int32, false),
            Field::new("unused", DataType::Utf8, true),
        ]));
        let batch = RecordBatch::try_new(
            file_schema.clone(),
            vec![
                Arc::new(StringArray::from(vec!["south"])),
                Arc::new(arrow::array::Int32Array::from(vec![9])),
                Arc::new(StringArray::from(vec!["x"])),
            ],
        )
        .expect("batch");
        let parquet_path = dir.path().join("v.parquet");
        let file = std::fs::File::create(&parquet_path).expect("create");
        let mut writer =
            parquet::arrow::ArrowWriter::try_new(file, file_schema, None).expect("writer");
        writer.write(&batch).expect("write");
        writer.close().expect("close");
        let table = FileTableFactory::try_new(&spec(), &options(&parquet_path, &[]))
            .expect("valid")
            .open(&metrics)
            .await
            .expect("open");
        assert_eq!(region_of(table.as_ref(), 9).await.as_deref(), Some("south"));
    }

    #[tokio::test]
    async fn a_file_that_does_not_load_is_a_create_error() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("bad.csv");
        std::fs::write(&path, "vehicle_id,region\nx,y\n").expect("write");
        let error = FileTableFactory::try_new(&spec(), &options(&path, &[]))
            .expect("valid options")
            .open(&Metrics::new())
            .await
            .expect_err("bad row");
        assert!(error.to_string().contains("bad.csv"), "{error}");
        let missing =
            FileTableFactory::try_new(&spec(), &options(&dir.path().join("none.csv"), &[]));
        assert!(matches!(missing, Err(ConnectorError::MissingFile(_))));
    }
}
