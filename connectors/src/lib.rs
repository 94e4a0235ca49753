//! Weir's connectors: where streams come from and where results go.
//!
//! # Layout
//!
//! - [`Connectors`]: the registry, turning `WITH (connector = '...', ...)` into validated
//!   factories at CREATE time (unknown options are errors).
//! - [`datagen`]: the built-in generator (vehicle telemetry), deterministic per `seed`.
//! - [`file`]: NDJSON and CSV files or directories, read once or followed; bad records are
//!   counted, skipped and optionally written to a dead-letter file; and file tables (CSV,
//!   NDJSON, Parquet held in memory, reloaded when the file changes).
//! - [`kafka`]: Kafka topics (consumer groups, per-partition watermarks, commits once every
//!   sink has the rows, dead-letter topic) and the Kafka sink.
//! - [`decode`]: JSON/CSV records to Arrow batches, isolating the records that do not decode.
//! - [`parquet`]: the local Parquet lake sink, one zstd file per rollover interval.
//! - [`prometheus`]: the Prometheus remote-write sink (sharded, ordered, retried).
//! - [`postgres`]: Postgres tables for lookup joins (whole table in memory, or a partial
//!   cache in front of batched key queries).
//! - [`secret`]: passwords and tokens in options (`${ENV}`, `*_file`), never printed.
//! - [`paths`]: the local paths options may name, confined to roots by `weir serve`.
//! - [`blackhole`]: counts and discards (benchmarks).

pub mod blackhole;
pub mod datagen;
pub mod decode;
pub mod file;
pub mod kafka;
pub mod parquet;
pub mod paths;
pub mod postgres;
pub mod prometheus;
pub mod secret;

use std::sync::Arc;

use weir_runtime::connector::{
    ConnectorError, ConnectorRegistry, SinkFactory, SinkSpec, SourceFactory, SourceSpec,
    TableFactory, TableSpec,
};
use weir_sql::Options;

use crate::paths::AllowedPaths;

/// Every connector this build knows. Before a connector sees its options, every path they
/// name is checked against the [`AllowedPaths`].
#[derive(Debug, Default)]
pub struct Connectors {
    paths: AllowedPaths,
}

impl Connectors {
    /// Connectors whose options may only name paths that `paths` allows.
    pub fn confined(paths: AllowedPaths) -> Self {
        Self { paths }
    }
}

fn connector_name(options: &Options) -> Result<String, ConnectorError> {
    let reader = options.reader();
    let name = reader.required("connector")?;
    Ok(name.to_ascii_lowercase())
}

impl ConnectorRegistry for Connectors {
    fn source(
        &self,
        spec: &SourceSpec,
        options: &Options,
    ) -> Result<Arc<dyn SourceFactory>, ConnectorError> {
        self.paths.check_options(options)?;
        let schema = spec.schema.clone();
        // Sources with one ordered input follow each batch with the watermark it reaches.
        let event_time = spec.event_time.as_ref().and_then(|et| {
            let column = schema.index_of(&et.column).ok()?;
            Some((
                column,
                i64::try_from(et.delay.as_millis()).unwrap_or(i64::MAX),
            ))
        });
        match connector_name(options)?.as_str() {
            "datagen" => Ok(Arc::new(
                datagen::DatagenFactory::try_new(schema, options)?.with_event_time(event_time),
            )),
            "file" => Ok(Arc::new(
                file::FileSourceFactory::try_new(&spec.name, schema, options)?
                    .with_event_time(event_time),
            )),
            "kafka" => Ok(Arc::new(kafka::KafkaSourceFactory::try_new(spec, options)?)),
            "postgres" => Err(ConnectorError::NotSupported(
                "the 'postgres' source connector for a STREAM (it serves tables: CREATE TABLE ... WITH (connector = 'postgres'), the lookup side of a join)".into(),
            )),
            other => Err(ConnectorError::Option(weir_sql::options::OptionError::new(
                "connector",
                format!("unknown source connector '{other}': expected datagen, file or kafka"),
            ))),
        }
    }

    fn table(
        &self,
        spec: &TableSpec,
        options: &Options,
    ) -> Result<Arc<dyn TableFactory>, ConnectorError> {
        self.paths.check_options(options)?;
        match connector_name(options)?.as_str() {
            "file" => Ok(Arc::new(file::FileTableFactory::try_new(spec, options)?)),
            "postgres" => Ok(Arc::new(postgres::PostgresTableFactory::try_new(
                spec, options,
            )?)),
            "kafka" => Ok(Arc::new(kafka::KafkaTableFactory::try_new(spec, options)?)),
            other => Err(ConnectorError::Option(weir_sql::options::OptionError::new(
                "connector",
                format!("unknown table connector '{other}': expected file, postgres or kafka"),
            ))),
        }
    }

    fn sink(
        &self,
        spec: &SinkSpec,
        options: &Options,
    ) -> Result<Arc<dyn SinkFactory>, ConnectorError> {
        self.paths.check_options(options)?;
        match connector_name(options)?.as_str() {
            "parquet" => Ok(Arc::new(parquet::ParquetSinkFactory::try_new(
                &spec.name,
                spec.schema.clone(),
                options,
            )?)),
            "kafka" => Ok(Arc::new(kafka::KafkaSinkFactory::try_new(spec, options)?)),
            "prometheus_remote_write" => Ok(Arc::new(prometheus::PrometheusSinkFactory::try_new(
                spec, options,
            )?)),
            "blackhole" => Ok(Arc::new(blackhole::BlackholeFactory::try_new(options)?)),
            other => Err(ConnectorError::Option(weir_sql::options::OptionError::new(
                "connector",
                format!(
                    "unknown sink connector '{other}': expected parquet, kafka, prometheus_remote_write or blackhole"
                ),
            ))),
        }
    }
}
