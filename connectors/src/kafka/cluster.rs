//! A Kafka stream as the input of a cluster (`weir serve --cluster`): a seat in a group that
//! only hands out partitions (the tasks that read them share another consumer, each
//! through its partition's queue), a source per partition, and the repartition topic.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arrow::datatypes::SchemaRef;
use datafusion::physical_expr::PhysicalExpr;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::message::Message as _;
use rdkafka::producer::{BaseRecord, Producer as _, ThreadedProducer};
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;
use weir_runtime::connector::{Membership, MembershipEvent, PartitionedSource};
use weir_runtime::{Error, Result, Sink, Source};

use super::repartition::{
    RepartitionSink, RepartitionSource, RepartitionTarget, ShuffleConsumer, ShuffleProducer,
    shuffle_consumer,
};
use super::sink::Acks;
use super::source::{KafkaSource, PartitionConsumers, SourceConfig, topic_partitions};

/// How long a revoked partition's tasks may take to stop (with a last checkpoint) before
/// the group goes on without them; below librdkafka's `max.poll.interval.ms` (5 min).
const REVOKE_WAIT: Duration = Duration::from_secs(60);
/// How long the group waits for a member that stopped heartbeating (a killed process)
/// before its partitions move.
const SESSION_TIMEOUT: &str = "10000";
/// How long the shuffle's records are kept: a reader down for longer loses them.
const SHUFFLE_RETENTION_MS: &str = "604800000";

/// A Kafka stream's partitions, for a cluster.
#[derive(Debug)]
pub(super) struct KafkaPartitions {
    pub(super) config: Arc<SourceConfig>,
    /// The producer this process's writers of each repartition topic share, while any runs.
    pub(super) producers: Mutex<HashMap<String, Weak<ShuffleProducer>>>,
    /// The consumer this process's readers of each repartition topic share, while any runs.
    pub(super) consumers: Mutex<HashMap<String, Weak<ShuffleConsumer>>>,
    /// The consumer this process's instances share to read their input partitions.
    pub(super) sources: Arc<PartitionConsumers>,
}

impl KafkaPartitions {
    /// A client to read topics' metadata with; `auto_create`: a topic asked for that does
    /// not exist is made (by a broker that allows it).
    fn metadata_client(&self, auto_create: bool) -> Result<BaseConsumer> {
        self.config
            .client
            .config(&[(
                "allow.auto.create.topics",
                if auto_create { "true" } else { "false" },
            )])
            .create()
            .map_err(|e| super::kafka_error("cannot create a Kafka client", e))
    }

    /// Creates `topic` with `partitions` partitions kept `retention_ms` (-1: forever),
    /// unless it exists; returns how many partitions it has (a broker that cannot create
    /// topics on request may have made it with its default count).
    fn create_topic(&self, topic: &str, partitions: usize, retention_ms: &str) -> Result<usize> {
        // A topic made beforehand (by an operator, where the broker lets applications not
        // create topics) is used as it is.
        let found = topic_partitions(
            &self.metadata_client(false)?,
            topic,
            self.config.broker_timeout,
        )?
        .len();
        if found > 0 {
            return Ok(found);
        }
        let admin: AdminClient<_> = self
            .config
            .client
            .config(&[])
            .create()
            .map_err(|e| super::kafka_error("cannot create a Kafka admin client", e))?;
        let count = i32::try_from(partitions).unwrap_or(i32::MAX);
        let new = NewTopic::new(topic, count, TopicReplication::Fixed(-1))
            .set("retention.ms", retention_ms);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Internal(e.to_string()))?;
        let options = AdminOptions::new()
            .operation_timeout(Some(Duration::from_secs(10)))
            .request_timeout(Some(Duration::from_secs(10)));
        match runtime.block_on(admin.create_topics([&new], &options)) {
            Ok(results) => {
                for result in results {
                    match result {
                        Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                        Err((name, code)) => {
                            return Err(Error::external(
                                weir_runtime::error::External::Connection,
                                format!("cannot create topic {name}: {code}"),
                            ));
                        }
                    }
                }
            }
            // A broker without CreateTopics (librdkafka's mock cluster) creates a topic
            // when its metadata is asked for, with its default partition count.
            Err(e) => {
                tracing::warn!(topic, error = %e,
                    "the broker did not create the topic; relying on its automatic topic creation");
            }
        }
        let consumer = self.metadata_client(true)?;
        let deadline = std::time::Instant::now() + self.config.broker_timeout;
        loop {
            let found = topic_partitions(&consumer, topic, self.config.broker_timeout)?.len();
            if found > 0 {
                return Ok(found);
            }
            if std::time::Instant::now() >= deadline {
                return Err(Error::external(
                    weir_runtime::error::External::Connection,
                    format!("topic {topic} has no partitions"),
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl PartitionedSource for KafkaPartitions {
    fn partition_count(&self) -> Result<usize> {
        let consumer: BaseConsumer = self
            .config
            .client
            .config(&[])
            .create()
            .map_err(|e| super::kafka_error("cannot create a Kafka client", e))?;
        Ok(topic_partitions(&consumer, &self.config.topic, self.config.broker_timeout)?.len())
    }

    fn create_partition(&self, partition: i32) -> Result<Box<dyn Source>> {
        Ok(Box::new(KafkaSource::partition(
            self.config.clone(),
            partition,
            self.sources.clone(),
        )))
    }

    fn join(&self, group: &str, topic: Option<&str>) -> Result<Membership> {
        let topic = topic.unwrap_or(&self.config.topic).to_string();
        let (tx, events) = mpsc::channel(16);
        let consumer: BaseConsumer<Seat> = self
            .config
            .client
            .config(&[
                ("group.id", group),
                ("partition.assignment.strategy", "cooperative-sticky"),
                ("session.timeout.ms", SESSION_TIMEOUT),
                ("enable.auto.commit", "false"),
                ("enable.partition.eof", "false"),
                ("auto.offset.reset", "latest"),
            ])
            .create_with_context(Seat {
                events: tx,
                group: group.to_string(),
            })
            .map_err(|e| super::kafka_error("cannot create the group's consumer", e))?;
        consumer
            .subscribe(&[&topic])
            .map_err(|e| super::kafka_error(&format!("cannot join group {group}"), e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("group-{group}"))
                .spawn(move || {
                    while !stop.load(Ordering::Acquire) {
                        // Every partition is paused: polls only serve the group's protocol.
                        if let Some(Err(e)) = consumer.poll(Duration::from_millis(200)) {
                            tracing::debug!(error = %e, "group seat");
                        }
                    }
                    consumer.unsubscribe();
                    // Give the revocation a chance to run before the consumer closes.
                    for _ in 0..10 {
                        let _ = consumer.poll(Duration::from_millis(50));
                    }
                })
                .map_err(|e| Error::Internal(format!("cannot start the group's thread: {e}")))?
        };
        Ok(Membership {
            events,
            seat: Box::new(SeatGuard {
                stop,
                thread: Some(thread),
            }),
        })
    }

    fn create_shuffle(&self, topic: &str, partitions: usize) -> Result<usize> {
        self.create_topic(topic, partitions, SHUFFLE_RETENTION_MS)
    }

    fn publish(&self, topic: &str, key: &str, record: &[u8]) -> Result<()> {
        self.create_topic(topic, 1, "-1")?;
        let acks = Acks::default();
        let producer: ThreadedProducer<Acks> = self
            .config
            .client
            .config(&[("acks", "all")])
            .create_with_context(acks.clone())
            .map_err(|e| super::kafka_error("cannot create a Kafka producer", e))?;
        producer
            // Partition 0 even where the broker made the topic with more.
            .send(BaseRecord::to(topic).partition(0).key(key).payload(record))
            .map_err(|(e, _)| super::kafka_error(&format!("cannot write to {topic}"), e))?;
        producer
            .flush(self.config.broker_timeout)
            .map_err(|e| super::kafka_error(&format!("cannot write to {topic}"), e))?;
        if acks.failed.load(Ordering::Relaxed) > 0 {
            return Err(Error::external(
                weir_runtime::error::External::Connection,
                format!("a record was not delivered to {topic}"),
            ));
        }
        Ok(())
    }

    fn read_all(&self, topic: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let consumer: BaseConsumer = self
            .config
            .client
            .config(&[
                ("group.id", "weir-directory-reader"),
                ("enable.auto.commit", "false"),
                ("enable.partition.eof", "false"),
            ])
            .create()
            .map_err(|e| super::kafka_error("cannot create a Kafka client", e))?;
        let timeout = self.config.broker_timeout;
        if topic_partitions(&consumer, topic, timeout)?.is_empty() {
            return Ok(Vec::new());
        }
        let (low, high) = consumer
            .fetch_watermarks(topic, 0, timeout)
            .map_err(|e| super::kafka_error(&format!("cannot read {topic}"), e))?;
        let mut records = Vec::new();
        if high <= low {
            return Ok(records);
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, 0, Offset::Offset(low))
            .map_err(|e| Error::Internal(e.to_string()))?;
        consumer
            .assign(&tpl)
            .map_err(|e| super::kafka_error(&format!("cannot read {topic}"), e))?;
        let deadline = std::time::Instant::now() + timeout;
        let mut next = low;
        while next < high {
            if std::time::Instant::now() >= deadline {
                return Err(Error::external(
                    weir_runtime::error::External::Connection,
                    format!("{topic} was not read to its end in {timeout:?}"),
                ));
            }
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(message)) => {
                    next = message.offset() + 1;
                    let key = String::from_utf8_lossy(message.key().unwrap_or_default());
                    records.push((
                        key.into_owned(),
                        message.payload().unwrap_or_default().to_vec(),
                    ));
                }
                Some(Err(e)) => {
                    return Err(super::kafka_error(&format!("cannot read {topic}"), e));
                }
                None => {}
            }
        }
        Ok(records)
    }

    fn shuffle_writer(
        &self,
        topic: &str,
        partitions: usize,
        keys: Vec<Arc<dyn PhysicalExpr>>,
        writer: i32,
        writers: usize,
        bytes: weir_runtime::metrics::Counter,
    ) -> Result<Box<dyn Sink>> {
        let producer = {
            let mut producers = self.producers.lock().unwrap_or_else(|e| e.into_inner());
            match producers.get(topic).and_then(Weak::upgrade) {
                Some(producer) => producer,
                None => {
                    let producer = Arc::new(ShuffleProducer::new(&self.config.client)?);
                    producers.insert(topic.to_string(), Arc::downgrade(&producer));
                    producer
                }
            }
        };
        Ok(Box::new(RepartitionSink::new(
            RepartitionTarget {
                client: self.config.client.clone(),
                topic: topic.to_string(),
                partitions,
                keys,
                writer,
                writers,
            },
            producer,
            bytes,
        )?))
    }

    fn shuffle_reader(
        &self,
        topic: &str,
        partition: i32,
        schema: SchemaRef,
    ) -> Result<Box<dyn Source>> {
        let consumer = ShuffleConsumer::get_or_create(&self.consumers, topic, || {
            shuffle_consumer(&self.config.client, topic)
        })?;
        Ok(Box::new(RepartitionSource::new(
            consumer, partition, schema,
        )))
    }
}

/// Stops the seat's thread (leaving the group) when dropped.
struct SeatGuard {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for SeatGuard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Not joined: the thread may be waiting for a revocation's tasks, which the
        // runtime dropping this is about to stop.
        drop(self.thread.take());
    }
}

/// The group consumer's callbacks: assignments paused and reported, revocations reported
/// and waited for.
struct Seat {
    events: mpsc::Sender<MembershipEvent>,
    group: String,
}

impl ClientContext for Seat {}

impl ConsumerContext for Seat {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                // Read nothing: the partition's task reads it through another consumer.
                let mut at_end = TopicPartitionList::new();
                for e in tpl.elements() {
                    let _ = at_end.add_partition_offset(e.topic(), e.partition(), Offset::End);
                }
                if let Err(e) = consumer.incremental_assign(&at_end) {
                    tracing::warn!(group = %self.group, error = %e, "cannot take assigned partitions");
                    return;
                }
                if let Err(e) = consumer.pause(&at_end) {
                    tracing::warn!(group = %self.group, error = %e, "cannot pause assigned partitions");
                }
                tracing::info!(group = %self.group, ?partitions, "partitions assigned");
                let _ = self
                    .events
                    .blocking_send(MembershipEvent::Assigned(partitions));
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                tracing::info!(group = %self.group, ?partitions, "partitions revoked");
                let (done, stopped) = std::sync::mpsc::channel();
                if self
                    .events
                    .blocking_send(MembershipEvent::Revoked(partitions, done))
                    .is_ok()
                {
                    // The tasks take a last checkpoint, so that the next owner resumes
                    // from it.
                    let _ = stopped.recv_timeout(REVOKE_WAIT);
                }
                if let Err(e) = consumer.incremental_unassign(tpl) {
                    tracing::warn!(group = %self.group, error = %e, "cannot give partitions back");
                }
            }
            other => {
                tracing::warn!(group = %self.group, error = ?other, "group rebalance error");
            }
        }
    }
}
