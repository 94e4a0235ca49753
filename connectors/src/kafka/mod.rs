//! Kafka: the source (consumer groups, batched Arrow decoding, per-partition watermarks,
//! commits once every sink has the rows, dead letters), the JSON sink, and tables read from
//! compacted topics.
//!
//! Options are checked at CREATE time, and so is the broker: an unreachable broker or a
//! missing topic is a SQL error naming it, after `connect.timeout` (default 10 s), not a hang.
//! When a catalog is restored the broker is not checked: a broker that is down then is an
//! outage the source rides out (retries with backoff), not a reason to drop the stream.

mod cluster;
mod repartition;
mod shared;
mod sink;
mod source;
mod table;

use std::sync::Arc;
use std::time::Duration;

use arrow::datatypes::{DataType, Field, FieldRef, Schema, SchemaRef, TimeUnit};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaRespErr;
use weir_runtime::connector::{ConnectorError, SourceFactory, SourceSpec};
use weir_runtime::{Result, Source};
use weir_sql::Options;
use weir_sql::options::{OptionError, OptionReader};

use crate::decode::Format;

pub use repartition::{RepartitionSink, RepartitionSource, RepartitionTarget};
pub use sink::KafkaSinkFactory;
pub use table::KafkaTableFactory;

/// The hidden columns every Kafka stream has, after the declared ones.
pub fn hidden_columns() -> Vec<FieldRef> {
    vec![
        Arc::new(Field::new("_key", DataType::Binary, true)),
        Arc::new(Field::new("_partition", DataType::Int32, false)),
        Arc::new(Field::new("_offset", DataType::Int64, false)),
        Arc::new(Field::new(
            "_timestamp",
            DataType::Timestamp(TimeUnit::Millisecond, None),
            true,
        )),
    ]
}

/// How JSON/CSV values of TIMESTAMP columns are written in the messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestampFormat {
    /// RFC 3339 strings or epoch milliseconds (the default).
    Any,
    Rfc3339,
    EpochMillis,
    EpochSeconds,
}

/// Where a partition starts when the group has no committed offset for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartupMode {
    Earliest,
    Latest,
    GroupOffsets,
}

/// The client settings shared by consumers and producers: `bootstrap.servers` and every
/// `properties.*` option, passed to librdkafka as written.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    pub bootstrap: String,
    pub properties: Vec<(String, String)>,
}

impl ClientSettings {
    fn read(reader: &OptionReader<'_>) -> Result<Self, ConnectorError> {
        let bootstrap = reader.required("bootstrap.servers")?.to_string();
        let properties = reader
            .prefixed("properties.")
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Ok(Self {
            bootstrap,
            properties,
        })
    }

    /// A librdkafka configuration: ours first, then the user's `properties.*` on top.
    pub fn config(&self, ours: &[(&str, &str)]) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.bootstrap);
        for (k, v) in ours {
            config.set(*k, *v);
        }
        for (k, v) in &self.properties {
            config.set(k, v);
        }
        config
    }

    /// Checks that the broker answers and `topic` exists, within `timeout`.
    fn check_topic(&self, topic: &str, timeout: Duration) -> Result<usize, ConnectorError> {
        let consumer: BaseConsumer = self
            .config(&[])
            .create()
            .map_err(|e| ConnectorError::Invalid(format!("invalid Kafka client settings: {e}")))?;
        let metadata = consumer.fetch_metadata(Some(topic), timeout).map_err(|e| {
            ConnectorError::Unreachable(format!(
                "cannot reach Kafka at '{}' within {}: {e}",
                self.bootstrap,
                humantime(timeout)
            ))
        })?;
        let missing = || {
            ConnectorError::MissingObject(format!(
                "Kafka topic '{topic}' does not exist at '{}'",
                self.bootstrap
            ))
        };
        let found = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .ok_or_else(missing)?;
        match found.error() {
            Some(RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART) => Err(missing()),
            Some(e) => Err(ConnectorError::Unreachable(format!(
                "Kafka at '{}' refused topic '{topic}': {e:?}",
                self.bootstrap
            ))),
            None if found.partitions().is_empty() => Err(missing()),
            None => Ok(found.partitions().len()),
        }
    }
}

/// A librdkafka error by cause: a configuration the user can fix, or the broker (which
/// cannot be reached, or refused).
pub(crate) fn kafka_error(context: &str, e: rdkafka::error::KafkaError) -> weir_runtime::Error {
    use rdkafka::error::KafkaError;
    match e {
        KafkaError::ClientConfig(..) | KafkaError::ClientCreation(_) => {
            weir_runtime::Error::Execution(format!("{context}: {e}"))
        }
        other => weir_runtime::Error::external(
            weir_runtime::error::External::Connection,
            format!("{context}: {other}"),
        ),
    }
}

fn humantime(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

fn option_error(key: &str, message: String) -> ConnectorError {
    ConnectorError::Option(OptionError::new(key, message))
}

fn read_format(reader: &OptionReader<'_>) -> Result<Format, ConnectorError> {
    Ok(
        match reader.one_of("format", &["json", "csv"])?.as_deref() {
            Some("csv") => Format::Csv {
                header: false,
                delimiter: match reader.string("csv.delimiter") {
                    None => b',',
                    Some(d) if d.len() == 1 => d.as_bytes()[0],
                    Some(d) => {
                        return Err(option_error(
                            "csv.delimiter",
                            format!(
                                "invalid value '{d}' for option 'csv.delimiter': expected one character"
                            ),
                        ));
                    }
                },
            },
            _ => Format::Json,
        },
    )
}

/// A validated Kafka source (`CREATE STREAM ... WITH (connector = 'kafka', ...)`).
#[derive(Debug, Clone)]
pub struct KafkaSourceFactory {
    config: Arc<source::SourceConfig>,
}

impl KafkaSourceFactory {
    /// Validates the options; checks the broker and topic unless `spec.restoring`.
    pub fn try_new(spec: &SourceSpec, options: &Options) -> Result<Self, ConnectorError> {
        let reader = options.reader();
        reader.string("connector");
        let topic = reader.required("topic")?.to_string();
        let client = ClientSettings::read(&reader)?;
        let group_id = reader
            .string("group.id")
            .map_or_else(|| format!("weir-{}", spec.name), str::to_string);
        let startup = match reader
            .one_of(
                "scan.startup.mode",
                &["earliest", "latest", "group-offsets"],
            )?
            .as_deref()
        {
            Some("earliest") => StartupMode::Earliest,
            Some("latest") => StartupMode::Latest,
            _ => StartupMode::GroupOffsets,
        };
        let format = read_format(&reader)?;
        let timestamp_format = match reader
            .one_of(
                "timestamp.format",
                &["rfc3339", "epoch_millis", "epoch_seconds"],
            )?
            .as_deref()
        {
            Some("rfc3339") => TimestampFormat::Rfc3339,
            Some("epoch_millis") => TimestampFormat::EpochMillis,
            Some("epoch_seconds") => TimestampFormat::EpochSeconds,
            _ => TimestampFormat::Any,
        };
        let idle_timeout = reader
            .duration("watermark.idle_timeout")?
            .unwrap_or(Duration::from_secs(30));
        if reader.string("commit.interval").is_some() {
            return Err(option_error(
                "commit.interval",
                "option 'commit.interval' was removed: offsets are committed after each checkpoint (set 'checkpoint.interval' on the view or sink)".into(),
            ));
        }
        let connect_timeout = reader
            .duration("connect.timeout")?
            .unwrap_or(Duration::from_secs(10));
        let dead_letter_topic = reader.string("dead_letter.topic").map(str::to_string);
        let broker_timeout = reader
            .duration("broker.timeout")?
            .unwrap_or(Duration::from_secs(60));
        reader.finish()?;

        // librdkafka rejects unknown or invalid properties when a client is created.
        client
            .config(&[("group.id", &group_id)])
            .create::<BaseConsumer>()
            .map_err(|e| ConnectorError::Invalid(format!("invalid Kafka client settings: {e}")))?;
        if !spec.restoring {
            client.check_topic(&topic, connect_timeout)?;
            if let Some(dlq) = &dead_letter_topic {
                client.check_topic(dlq, connect_timeout)?;
            }
        }
        let event_time = match &spec.event_time {
            Some(et) => Some(source::EventTimeColumn {
                index: spec.schema.index_of(&et.column).map_err(|_| {
                    ConnectorError::Invalid(format!("no event-time column '{}'", et.column))
                })?,
                delay_ms: i64::try_from(et.delay.as_millis()).unwrap_or(i64::MAX),
            }),
            None => None,
        };
        Ok(Self {
            config: Arc::new(source::SourceConfig {
                stream: spec.name.clone(),
                topic,
                client,
                group_id,
                startup,
                format,
                timestamp_format,
                decode_schema: decode_schema(&spec.schema, timestamp_format),
                schema: spec.schema.clone(),
                event_time,
                idle_timeout,
                broker_timeout,
                dead_letter_topic,
            }),
        })
    }
}

/// The schema the decoder reads: TIMESTAMP columns as the messages write them, converted
/// afterwards (see [`TimestampFormat`]).
fn decode_schema(schema: &SchemaRef, format: TimestampFormat) -> SchemaRef {
    let as_written = match format {
        TimestampFormat::Any => return schema.clone(),
        TimestampFormat::Rfc3339 => DataType::Utf8,
        TimestampFormat::EpochMillis => DataType::Int64,
        TimestampFormat::EpochSeconds => DataType::Float64,
    };
    Arc::new(Schema::new(
        schema
            .fields()
            .iter()
            .map(|f| match f.data_type() {
                DataType::Timestamp(..) => {
                    Arc::new(f.as_ref().clone().with_data_type(as_written.clone()))
                }
                _ => f.clone(),
            })
            .collect::<Vec<_>>(),
    ))
}

impl SourceFactory for KafkaSourceFactory {
    fn connector(&self) -> &'static str {
        "kafka"
    }

    fn is_bounded(&self) -> bool {
        false
    }

    fn create(&self) -> Result<Box<dyn Source>> {
        Ok(Box::new(source::KafkaSource::new(
            self.config.clone(),
            source::Mode::Group,
        )))
    }

    fn create_tail(&self) -> Result<Box<dyn Source>> {
        Ok(Box::new(source::KafkaSource::new(
            self.config.clone(),
            source::Mode::Tail,
        )))
    }

    fn hidden_columns(&self) -> Vec<FieldRef> {
        hidden_columns()
    }

    fn splittable(&self) -> bool {
        true
    }

    fn merge_positions(
        &self,
        positions: Vec<weir_runtime::Snapshot>,
    ) -> Result<weir_runtime::Snapshot> {
        source::merge_positions(positions)
    }

    fn partitioned(&self) -> Option<Arc<dyn weir_runtime::connector::PartitionedSource>> {
        Some(Arc::new(cluster::KafkaPartitions {
            config: self.config.clone(),
            producers: std::sync::Mutex::default(),
            consumers: std::sync::Mutex::default(),
            sources: Arc::default(),
        }))
    }
}

#[cfg(test)]
mod tests;
