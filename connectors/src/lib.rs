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

/// Generated `WITH` clauses for every connector: known keys with values at the edges of their
/// types (durations past any clock, sizes past u64, negative counts, paths out of the roots),
/// unknown keys and `properties.*`. Each is a factory or a [`ConnectorError`] (which the
/// planner maps to a SQLSTATE), never a panic. 100 000 clauses per run.
#[cfg(test)]
mod generated_options {
    use std::sync::Arc;

    use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};
    use weir_runtime::connector::{ConnectorRegistry, EventTime, SinkSpec, SourceSpec, TableSpec};
    use weir_sql::Options;

    use super::Connectors;
    use crate::paths::AllowedPaths;

    const CLAUSES: usize = 100_000;

    /// (kind, connector): kind 0 a stream, 1 a sink, 2 a table.
    const CONNECTORS: &[(u8, &str)] = &[
        (0, "datagen"),
        (0, "file"),
        (0, "kafka"),
        (1, "blackhole"),
        (1, "parquet"),
        (1, "prometheus_remote_write"),
        (1, "kafka"),
        (2, "file"),
        (2, "postgres"),
        (2, "kafka"),
        (0, "nope"),
    ];
    const KEYS: &[&str] = &[
        "rows_per_second",
        "cardinality",
        "seed",
        "max_rows",
        "start_time",
        "path",
        "format",
        "follow",
        "follow.interval",
        "batch.rows",
        "csv.header",
        "csv.delimiter",
        "dead_letter.path",
        "topic",
        "bootstrap.servers",
        "group.id",
        "scan.startup.mode",
        "timestamp.format",
        "watermark.idle_timeout",
        "connect.timeout",
        "broker.timeout",
        "dead_letter.topic",
        "properties.security.protocol",
        "properties.bogus.setting",
        "properties.plugin.library.paths",
        "url",
        "metric_prefix",
        "timestamp",
        "labels.env",
        "labels.__name__",
        "headers.X-Scope-OrgID",
        "max_retry_duration",
        "tls.ca_file",
        "bearer_token_file",
        "password_file",
        "rollover.interval",
        "target_file_size",
        "partition_by",
        "query",
        "table",
        "lookup.cache",
        "cache.max_rows",
        "cache.ttl",
        "cache.missing_keys",
        "reload.interval",
        "lookup.max_concurrency",
        "key.fields",
        "commit.interval",
        "colour",
        "",
    ];
    const VALUES: &[&str] = &[
        "0",
        "-1",
        "1",
        "10",
        "18446744073709551615",
        "18446744073709551616",
        "1e308",
        "NaN",
        "007",
        "",
        " ",
        "true",
        "false",
        "yes",
        "2",
        "1s",
        "0s",
        "-5s",
        "1.5h",
        "500ms",
        "100000000000000000000s",
        "36501 days",
        "1e400s",
        "5 fortnights",
        "1 month",
        "64KB",
        "99999999999GB",
        "1GB",
        "json",
        "csv",
        "earliest",
        "latest",
        "group-offsets",
        "rfc3339",
        "epoch_millis",
        "full",
        "partial",
        "none",
        "2026-01-01T00:00:00Z",
        "99999-01-01T00:00:00Z",
        "not a time",
        "/etc/passwd",
        "../outside",
        "data/in.ndjson",
        "file:///tmp/x",
        "s3://bucket/lake",
        "gs://bucket/x",
        "az://c/x",
        "ftp://x",
        "127.0.0.1:1",
        "http://127.0.0.1:1/api/v1/write",
        "https://[::1",
        "not a url",
        "é",
        "window_end",
        "k",
        "v",
        "SSL",
        "plaintext",
        "weird,,list",
        "\u{0}",
        ";",
        "'",
    ];

    fn schema() -> Arc<Schema> {
        Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, false),
            Field::new("v", DataType::Float64, true),
            Field::new("s", DataType::Utf8, true),
            Field::new(
                "window_end",
                DataType::Timestamp(TimeUnit::Millisecond, None),
                true,
            ),
        ]))
    }

    #[test]
    fn generated_with_clauses_are_factories_or_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("data")).expect("dir");
        std::fs::write(dir.path().join("data/in.ndjson"), "{\"k\":1}\n").expect("file");
        let registry =
            Connectors::confined(AllowedPaths::under([dir.path().to_path_buf()]).expect("roots"));
        let mut rng = SmallRng::seed_from_u64(31);
        let (mut accepted, mut refused) = (0, 0);
        while accepted + refused < CLAUSES {
            let (kind, connector) = CONNECTORS[rng.random_range(0..CONNECTORS.len())];
            // librdkafka clients are costly to create: a Kafka clause in 50.
            if connector == "kafka" && rng.random_range(0..50) != 0 {
                continue;
            }
            let mut pairs = vec![("connector".to_string(), connector.to_string())];
            for _ in 0..rng.random_range(0..6) {
                let key = KEYS[rng.random_range(0..KEYS.len())];
                let value = VALUES[rng.random_range(0..VALUES.len())];
                let value = value.replace("data/", &format!("{}/data/", dir.path().display()));
                pairs.push((key.to_string(), value));
            }
            let Ok(options) = Options::try_from_pairs(pairs.clone()) else {
                refused += 1;
                continue;
            };
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match kind {
                0 => registry
                    .source(
                        &SourceSpec {
                            name: "s".into(),
                            schema: schema(),
                            event_time: Some(EventTime {
                                column: "window_end".into(),
                                delay: std::time::Duration::from_secs(1),
                            }),
                            // No broker is dialled: a restored stream rides out an outage.
                            restoring: true,
                        },
                        &options,
                    )
                    .map(|_| ()),
                1 => registry
                    .sink(
                        &SinkSpec {
                            name: "o".into(),
                            schema: schema(),
                            restoring: true,
                        },
                        &options,
                    )
                    .map(|_| ()),
                _ => registry
                    .table(
                        &TableSpec {
                            name: "t".into(),
                            schema: schema(),
                            key_columns: vec![0],
                            restoring: true,
                        },
                        &options,
                    )
                    .map(|_| ()),
            }));
            match result {
                Ok(Ok(())) => accepted += 1,
                Ok(Err(e)) => {
                    assert!(!e.to_string().is_empty(), "{pairs:?}");
                    refused += 1;
                }
                Err(_) => panic!("a connector panicked on WITH {pairs:?}"),
            }
        }
        println!("generated WITH clauses: {accepted} accepted, {refused} refused");
        assert!(accepted > 0 && refused > 0);
    }
}
