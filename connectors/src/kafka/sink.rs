//! The Kafka sink: each row as one JSON message, optionally keyed by some of its columns.
//!
//! Rows are encoded with arrow-json's writer (one pass per batch) and handed to librdkafka's
//! producer. At each barrier the sink waits for every message to be acknowledged by the
//! broker before the barrier is released, so upstream offsets are committed only for rows
//! Kafka has: at-least-once end to end.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arrow::datatypes::SchemaRef;
use arrow::json::LineDelimitedWriter;
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Message as _};
use weir_runtime::connector::{ConnectorError, SinkFactory, SinkSpec};
use weir_runtime::{CheckpointBarrier, Error, Result, Sink};
use weir_sql::Options;

use super::ClientSettings;

/// How long a barrier or the end of input waits for the broker to acknowledge every message.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(60);

/// A validated Kafka sink.
#[derive(Debug)]
pub struct KafkaSinkFactory {
    name: String,
    topic: String,
    client: ClientSettings,
    /// Indices of the `key.fields` columns.
    key: Vec<usize>,
    schema: SchemaRef,
}

impl KafkaSinkFactory {
    pub fn try_new(spec: &SinkSpec, options: &Options) -> Result<Self, ConnectorError> {
        let reader = options.reader();
        reader.string("connector");
        let topic = reader.required("topic")?.to_string();
        let client = ClientSettings::read(&reader)?;
        reader.one_of("format", &["json"])?;
        let key = match reader.string("key.fields") {
            None => Vec::new(),
            Some(list) => list
                .split(',')
                .map(|name| {
                    let name = name.trim().to_lowercase();
                    spec.schema.index_of(&name).map_err(|_| {
                        super::option_error(
                            "key.fields",
                            format!("invalid value for option 'key.fields': no column '{name}'"),
                        )
                    })
                })
                .collect::<Result<_, _>>()?,
        };
        let connect_timeout = reader
            .duration("connect.timeout")?
            .unwrap_or(Duration::from_secs(10));
        reader.finish()?;
        client
            .config(&[])
            .create_with_context::<_, ThreadedProducer<Acks>>(Acks::default())
            .map(drop)
            .map_err(|e| ConnectorError::Invalid(format!("invalid Kafka client settings: {e}")))?;
        if !spec.restoring {
            client.check_topic(&topic, connect_timeout)?;
        }
        Ok(Self {
            name: spec.name.clone(),
            topic,
            client,
            key,
            schema: spec.schema.clone(),
        })
    }
}

impl SinkFactory for KafkaSinkFactory {
    fn connector(&self) -> &'static str {
        "kafka"
    }

    fn create(&self, _metrics: &weir_runtime::Metrics) -> Result<Box<dyn Sink>> {
        let acks = Acks::default();
        let producer: ThreadedProducer<Acks> = self
            .client
            .config(&[("linger.ms", "20"), ("compression.type", "zstd")])
            .create_with_context(acks.clone())
            .map_err(|e| super::kafka_error("cannot create the Kafka producer", e))?;
        let key_schema = Arc::new(self.schema.project(&self.key)?);
        Ok(Box::new(KafkaSink {
            name: self.name.clone(),
            topic: self.topic.clone(),
            producer: Arc::new(producer),
            key: self.key.clone(),
            key_schema,
            acks,
        }))
    }
}

/// Delivery failures, counted by the producer's callback.
#[derive(Clone, Default)]
pub(super) struct Acks {
    pub(super) failed: Arc<AtomicU64>,
}

impl ClientContext for Acks {}

impl ProducerContext for Acks {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, m)) = result {
            self.failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(topic = m.topic(), error = %e, "Kafka sink: a message was not delivered");
        }
    }
}

struct KafkaSink {
    name: String,
    topic: String,
    producer: Arc<ThreadedProducer<Acks>>,
    key: Vec<usize>,
    key_schema: SchemaRef,
    acks: Acks,
}

fn json_lines(batch: &RecordBatch) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(batch.num_rows() * 64);
    let mut writer = LineDelimitedWriter::new(&mut out);
    writer.write(batch)?;
    writer.finish()?;
    Ok(out)
}

impl KafkaSink {
    /// Waits until the broker has every message; fails if any was not delivered.
    async fn flush(&mut self) -> Result<()> {
        flush(
            &self.producer,
            &self.acks,
            &format!("Kafka sink {}", self.name),
            &self.topic,
        )
        .await
    }
}

/// Waits until the broker has every message `producer` was given; fails (naming `who` and
/// `topic`) if any was not delivered since the last flush.
pub(super) async fn flush(
    producer: &Arc<ThreadedProducer<Acks>>,
    acks: &Acks,
    who: &str,
    topic: &str,
) -> Result<()> {
    let producer = producer.clone();
    tokio::task::spawn_blocking(move || producer.flush(FLUSH_TIMEOUT))
        .await
        .map_err(|e| Error::Internal(e.to_string()))?
        .map_err(|e| super::kafka_error(&format!("{who}: flush failed"), e))?;
    let failed = acks.failed.swap(0, Ordering::Relaxed);
    if failed > 0 {
        return Err(Error::external(
            weir_runtime::error::External::Connection,
            format!("{who}: {failed} messages were not delivered to {topic}"),
        ));
    }
    Ok(())
}

#[async_trait]
impl Sink for KafkaSink {
    async fn write(&mut self, batch: RecordBatch) -> Result<()> {
        let values = json_lines(&batch)?;
        let keys = if self.key.is_empty() {
            None
        } else {
            let projected = batch.project(&self.key)?;
            debug_assert_eq!(projected.schema().fields(), self.key_schema.fields());
            Some(json_lines(&projected)?)
        };
        let mut key_lines = keys.as_deref().map(|k| k.split(|&b| b == b'\n'));
        for value in values.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let key = key_lines.as_mut().and_then(Iterator::next);
            let mut record = BaseRecord::to(&self.topic).payload(value);
            if let Some(key) = key {
                record = record.key(key);
            }
            loop {
                match self.producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        // The local queue is full: wait for the broker (back-pressure).
                        record = back;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((e, _)) => {
                        return Err(Error::Internal(format!(
                            "Kafka sink {}: cannot produce to {}: {e}",
                            self.name, self.topic
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    async fn pre_commit(&mut self, barrier: CheckpointBarrier) -> Result<()> {
        self.flush().await?;
        barrier.ack();
        Ok(())
    }

    async fn finish(&mut self) -> Result<()> {
        self.flush().await
    }
}
