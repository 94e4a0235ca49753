//! Weir's connectors: where streams come from and where results go.
//!
//! # Layout
//!
//! - [`Connectors`]: the registry, turning `WITH (connector = '...', ...)` into validated
//!   factories at CREATE time (unknown options are errors).
//! - [`datagen`]: the built-in generator (vehicle telemetry), deterministic per `seed`.
//! - [`file`]: NDJSON and CSV files or directories, read once or followed; bad records are
//!   counted, skipped and optionally written to a dead-letter file.
//! - [`parquet`]: the local Parquet lake sink, one zstd file per rollover interval.
//! - [`blackhole`]: counts and discards (benchmarks).

pub mod blackhole;
pub mod datagen;
pub mod file;
pub mod parquet;

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use weir_runtime::connector::{ConnectorError, ConnectorRegistry, SinkFactory, SourceFactory};
use weir_sql::Options;

/// Every connector this build knows.
#[derive(Debug, Default)]
pub struct Connectors;

/// Source connectors a later version implements.
const LATER_SOURCES: &[&str] = &["kafka", "postgres"];
/// Sink connectors a later version implements.
const LATER_SINKS: &[&str] = &["kafka", "prometheus_remote_write"];

fn connector_name(options: &Options) -> Result<String, ConnectorError> {
    let reader = options.reader();
    let name = reader.required("connector")?;
    Ok(name.to_ascii_lowercase())
}

impl ConnectorRegistry for Connectors {
    fn source(
        &self,
        name: &str,
        schema: SchemaRef,
        options: &Options,
    ) -> Result<Arc<dyn SourceFactory>, ConnectorError> {
        match connector_name(options)?.as_str() {
            "datagen" => Ok(Arc::new(datagen::DatagenFactory::try_new(schema, options)?)),
            "file" => Ok(Arc::new(file::FileSourceFactory::try_new(
                name, schema, options,
            )?)),
            later if LATER_SOURCES.contains(&later) => Err(ConnectorError::NotSupported(format!(
                "the '{later}' source connector"
            ))),
            other => Err(ConnectorError::Option(weir_sql::options::OptionError::new(
                "connector",
                format!("unknown source connector '{other}': expected datagen or file"),
            ))),
        }
    }

    fn sink(
        &self,
        name: &str,
        schema: SchemaRef,
        options: &Options,
    ) -> Result<Arc<dyn SinkFactory>, ConnectorError> {
        match connector_name(options)?.as_str() {
            "parquet" => Ok(Arc::new(parquet::ParquetSinkFactory::try_new(
                name, schema, options,
            )?)),
            "blackhole" => Ok(Arc::new(blackhole::BlackholeFactory::try_new(options)?)),
            later if LATER_SINKS.contains(&later) => Err(ConnectorError::NotSupported(format!(
                "the '{later}' sink connector"
            ))),
            other => Err(ConnectorError::Option(weir_sql::options::OptionError::new(
                "connector",
                format!("unknown sink connector '{other}': expected parquet or blackhole"),
            ))),
        }
    }
}
