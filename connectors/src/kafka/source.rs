//! The Kafka source: one consumer thread per pipeline, decoding each poll into one Arrow batch.
//!
//! The thread owns the consumer. It polls until a batch is full (or nothing more is queued),
//! decodes the payloads with arrow's JSON/CSV decoder in one pass (bad records isolated by
//! bisection), appends the hidden columns, tracks each partition's highest event time, and
//! hands `Data` and `Watermark` messages to the pipeline. Between two polls it injects the
//! checkpoint barrier the job's coordinator asked for, saving each partition's next offset
//! and highest event time in it. The checkpoint is the truth: on a restore, assigned
//! partitions start at the checkpoint's offsets. An epoch's offsets are committed to the
//! consumer group once its checkpoint is complete, for monitoring tools and for partitions
//! the checkpoint does not know.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arrow::array::{
    Array, ArrayRef, BinaryBuilder, Float64Array, Int32Array, Int64Array, RecordBatch,
    TimestampMillisecondArray,
};
use arrow::compute::cast;
use arrow::datatypes::{DataType, TimeUnit};
use async_trait::async_trait;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{BorrowedMessage, Message as _};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, TopicPartitionList as Tpl};
use tokio::sync::mpsc;
use weir_runtime::coordinator::SourceCheckpoints;
use weir_runtime::metrics::{PartitionMetrics, SourceMetrics};
use weir_runtime::pipeline::{RateLimitedLog, Worker};
use weir_runtime::{
    CheckpointBarrier, Error, Message, Result, Snapshot, Source, SourceContext, SourceExit,
    Watermark,
};

use super::shared::{PartitionReader, SharedConsumer};
use super::{ClientSettings, StartupMode, TimestampFormat};
use crate::decode::{BadRecord, BlockDecoder, Format};

/// Messages per batch at most.
const MAX_BATCH: usize = 8192;
/// How long a poll waits when nothing is queued.
const IDLE_POLL: Duration = Duration::from_millis(100);
/// How long a send waits for room in the pipeline before pausing the partitions (and from
/// then on, how often the paused consumer polls).
const PAUSE_AFTER: Duration = Duration::from_millis(500);
/// How long stopping waits for the last checkpoint to complete, to commit its offsets to
/// the group (the checkpoint itself is what a restart resumes from).
const FINAL_COMMIT_WAIT: Duration = Duration::from_secs(20);

/// The stream's event-time column and watermark delay.
#[derive(Debug, Clone, Copy)]
pub(super) struct EventTimeColumn {
    pub index: usize,
    pub delay_ms: i64,
}

/// Everything validated at CREATE time.
#[derive(Debug)]
pub(super) struct SourceConfig {
    pub stream: String,
    pub topic: String,
    pub client: ClientSettings,
    pub group_id: String,
    pub startup: StartupMode,
    pub format: Format,
    pub timestamp_format: TimestampFormat,
    pub decode_schema: arrow::datatypes::SchemaRef,
    pub schema: arrow::datatypes::SchemaRef,
    pub event_time: Option<EventTimeColumn>,
    pub idle_timeout: Duration,
    pub dead_letter_topic: Option<String>,
    /// How long every broker may be unreachable before the source fails (08006) and its
    /// pipeline is restarted from its last checkpoint.
    pub broker_timeout: Duration,
}

/// A pipeline's reader (in the consumer group, committing) or a live tail's (no group, no
/// commits, from the end of each partition).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    Group,
    Tail,
    /// One partition alone, assigned by a cluster's group (`weir serve --cluster`).
    Partition(i32),
}

/// The consumer a cluster's source instances of one pipeline share in a process, while
/// any runs (each reads its partition's queue of it).
pub(super) type PartitionConsumers = Mutex<HashMap<String, Weak<SharedConsumer<Callbacks>>>>;

pub(super) struct KafkaSource {
    config: Arc<SourceConfig>,
    mode: Mode,
    thread: Option<JoinHandle<Result<()>>>,
    /// Tells the consumer thread to stop; set when the source stops, and when it is
    /// dropped unstopped (its task aborted), so that no consumer outlives its pipeline.
    stop: Arc<std::sync::atomic::AtomicBool>,
    resume: Position,
    /// For [`Mode::Partition`]: where its pipeline's shared consumer is.
    consumers: Option<Arc<PartitionConsumers>>,
}

impl Drop for KafkaSource {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
    }
}

impl KafkaSource {
    pub fn new(config: Arc<SourceConfig>, mode: Mode) -> Self {
        Self {
            config,
            mode,
            thread: None,
            stop: Arc::default(),
            resume: Position::default(),
            consumers: None,
        }
    }

    /// A cluster's instance reading `partition` alone, through the consumer in
    /// `consumers` that its pipeline's instances in this process share.
    pub fn partition(
        config: Arc<SourceConfig>,
        partition: i32,
        consumers: Arc<PartitionConsumers>,
    ) -> Self {
        let mut source = Self::new(config, Mode::Partition(partition));
        source.consumers = Some(consumers);
        source
    }
}

/// Where a pipeline's reader is, as a checkpoint saves it: per partition, the next offset to
/// read and the highest event time seen (so that the watermark resumes where it was).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
struct Position {
    offsets: HashMap<i32, i64>,
    max_event_ms: HashMap<i32, i64>,
}

/// What the consumer thread needs to take part in checkpoints.
struct Checkpointing {
    requests: Option<SourceCheckpoints>,
    participant: String,
    /// The pipeline (its consumer group is `<group.id>.<pipeline>`) and the process's
    /// stable instance id (static membership), if known.
    pipeline: String,
    instance_id: Option<String>,
    resume: Position,
    /// The share of the partitions this source reads, when its pipeline has several workers.
    worker: Worker,
    /// A cluster instance's shared consumer.
    consumers: Option<Arc<PartitionConsumers>>,
}

#[async_trait]
impl Source for KafkaSource {
    async fn run(&mut self, ctx: &mut SourceContext) -> Result<SourceExit> {
        let (tx, mut rx) = mpsc::channel(2);
        let stop = self.stop.clone();
        let checkpointing = Checkpointing {
            requests: ctx.take_checkpoints(),
            participant: ctx.participant().to_string(),
            pipeline: ctx.pipeline().to_string(),
            instance_id: ctx.instance_id().map(str::to_string),
            resume: std::mem::take(&mut self.resume),
            worker: ctx.worker(),
            consumers: self.consumers.clone(),
        };
        let thread = {
            let config = self.config.clone();
            let mode = self.mode;
            let metrics = ctx.metrics.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("kafka-{}", config.stream))
                .spawn(move || {
                    let stream = config.stream.clone();
                    let result = ConsumerLoop::run(config, mode, metrics, tx, checkpointing, &stop);
                    if let Err(e) = &result {
                        tracing::error!(stream = %stream, error = %e, "Kafka consumer stopped");
                    }
                    result
                })
                .map_err(|e| Error::Internal(format!("cannot start the Kafka consumer: {e}")))?
        };
        self.thread = Some(thread);
        loop {
            tokio::select! {
                biased;
                () = ctx.stopping() => break,
                message = rx.recv() => match message {
                    Some(m) => {
                        let last = matches!(&m, Message::Barrier(b) if b.last);
                        if !ctx.emit(m).await || last {
                            break;
                        }
                    }
                    // The consumer thread ended by itself: its error is the source's.
                    None => return Err(self.consumer_error().await),
                },
            }
        }
        // The last barrier is on its way (or the pipeline is torn down): the thread commits
        // what the last checkpoint covers and closes the consumer.
        stop.store(true, std::sync::atomic::Ordering::Release);
        Ok(SourceExit::Stopped)
    }

    async fn restore(&mut self, position: Snapshot) -> Result<()> {
        self.resume = serde_json::from_value(position.meta).map_err(|e| {
            Error::Execution(format!(
                "Kafka position in the checkpoint is unreadable: {e}"
            ))
        })?;
        Ok(())
    }

    async fn close(&mut self) {
        self.join_consumer().await;
    }
}

impl KafkaSource {
    /// Why the consumer thread ended unasked.
    async fn consumer_error(&mut self) -> Error {
        match self.join_consumer().await {
            Some(Err(e)) => e,
            _ => Error::Internal(format!(
                "the Kafka consumer of stream {} ended",
                self.config.stream
            )),
        }
    }

    /// Waits for the consumer thread (which waits, bounded, for the last epoch, commits it
    /// and closes the consumer); its result, if it had not been joined yet.
    async fn join_consumer(&mut self) -> Option<Result<()>> {
        let thread = self.thread.take()?;
        match tokio::task::spawn_blocking(move || thread.join()).await {
            Ok(Ok(result)) => Some(result),
            _ => Some(Err(Error::Internal(format!(
                "the Kafka consumer of stream {} panicked",
                self.config.stream
            )))),
        }
    }
}

/// Consumer callbacks: rebalances, commit results, statistics (lag), client errors.
pub(super) struct Callbacks {
    topic: String,
    stream: String,
    metrics: SourceMetrics,
    rebalances: Mutex<Vec<RebalanceEvent>>,
    error_log: Mutex<RateLimitedLog>,
    /// Per partition, whether the last statistics showed nothing left to read: the broker's
    /// high watermark known and fetched up to, and no fetched record waiting.
    caught_up: Mutex<HashMap<i32, bool>>,
    /// Where partitions resume when assigned: the restored checkpoint's offsets.
    resume: Mutex<HashMap<i32, i64>>,
    /// Since when statistics have shown no broker up (`None` while one is), and the last
    /// client error: for a source whose brokers all stay unreachable. Statistics come with
    /// polls, so a consumer held back by a slow pipeline does not count as cut off.
    brokers_down: Mutex<(Option<Instant>, Option<String>)>,
}

enum RebalanceEvent {
    Assigned(Vec<i32>),
    Revoked(Vec<i32>),
}

impl Callbacks {
    fn partitions(&self, tpl: &Tpl) -> Vec<i32> {
        tpl.elements_for_topic(&self.topic)
            .iter()
            .map(|e| e.partition())
            .collect()
    }
}

impl ClientContext for Callbacks {
    fn stats(&self, statistics: Statistics) {
        {
            let mut down = self.brokers_down.lock().unwrap_or_else(|e| e.into_inner());
            if statistics.brokers.values().any(|b| b.state == "UP") {
                *down = (None, None);
            } else if down.0.is_none() {
                down.0 = Some(Instant::now());
            }
        }
        if let Some(topic) = statistics.topics.get(&self.topic) {
            for (id, partition) in &topic.partitions {
                if *id >= 0 && partition.consumer_lag >= 0 {
                    self.metrics.partition(*id).lag.set(partition.consumer_lag);
                }
            }
            let mut caught_up = self.caught_up.lock().unwrap_or_else(|e| e.into_inner());
            for (&id, p) in topic.partitions.iter().filter(|(id, _)| **id >= 0) {
                let done = p.hi_offset >= 0 && p.next_offset >= p.hi_offset && p.fetchq_cnt == 0;
                caught_up.insert(id, done);
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.metrics.client_errors().inc();
        self.brokers_down
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1 = Some(format!("{error} ({reason})"));
        let mut log = self.error_log.lock().unwrap_or_else(|e| e.into_inner());
        log.log(|suppressed| {
            tracing::warn!(stream = %self.stream, error = %error, reason, suppressed,
                "Kafka client error; retrying with backoff");
        });
    }
}

impl ConsumerContext for Callbacks {
    /// Assigns what the group gave, each partition the checkpoint knows starting at the
    /// checkpoint's offset (the others at the group's committed offset, or per
    /// `scan.startup.mode`).
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            rdkafka::consumer::RebalanceProtocol::Cooperative
        );
        let event = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let partitions = self.partitions(tpl);
                let resume = self.resume.lock().unwrap_or_else(|e| e.into_inner());
                for &p in &partitions {
                    if let Some(&offset) = resume.get(&p)
                        && let Err(e) =
                            tpl.set_partition_offset(&self.topic, p, Offset::Offset(offset))
                    {
                        tracing::warn!(stream = %self.stream, partition = p, error = %e,
                            "cannot resume a partition at its checkpointed offset");
                    }
                }
                drop(resume);
                let assigned = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                if let Err(e) = assigned {
                    tracing::warn!(stream = %self.stream, error = %e, "cannot assign Kafka partitions");
                }
                RebalanceEvent::Assigned(partitions)
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let revoked = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(e) = revoked {
                    tracing::warn!(stream = %self.stream, error = %e, "cannot revoke Kafka partitions");
                }
                RebalanceEvent::Revoked(self.partitions(tpl))
            }
            other => {
                tracing::warn!(stream = %self.stream, error = ?other, "Kafka rebalance error");
                // As librdkafka's default: drop the assignment, rejoin.
                let _ = consumer.unassign();
                return;
            }
        };
        self.metrics.rebalances().inc();
        self.rebalances
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(event);
    }
}

/// The partition numbers of `topic`, asked for in short attempts until `patience` has
/// passed: a broker slow to answer one request (a restart after a crash) is retried on a
/// fresh request instead of failing the pipeline after the first.
pub(super) fn topic_partitions<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    patience: Duration,
) -> Result<Vec<i32>> {
    let deadline = Instant::now() + patience;
    let metadata = loop {
        match consumer.fetch_metadata(Some(topic), Duration::from_secs(2)) {
            Ok(metadata) => break metadata,
            Err(e) if Instant::now() >= deadline => {
                return Err(super::kafka_error(&format!("cannot read topic {topic}"), e));
            }
            Err(e) => {
                tracing::debug!(topic, error = %e, "metadata not answered yet; asking again");
            }
        }
    };
    Ok(metadata
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect())
}

/// One position from those several workers saved: per partition, the furthest offset and
/// the highest event time. A worker saves the partitions it read and those it was restored
/// with, so a partition read by another worker since appears there too, behind.
pub(super) fn merge_positions(snapshots: Vec<Snapshot>) -> Result<Snapshot> {
    let mut merged = Position::default();
    for snapshot in snapshots {
        let position: Position = serde_json::from_value(snapshot.meta).map_err(|e| {
            Error::Execution(format!(
                "Kafka position in the checkpoint is unreadable: {e}"
            ))
        })?;
        for (p, offset) in position.offsets {
            let entry = merged.offsets.entry(p).or_insert(offset);
            *entry = (*entry).max(offset);
        }
        for (p, max) in position.max_event_ms {
            let entry = merged.max_event_ms.entry(p).or_insert(max);
            *entry = (*entry).max(max);
        }
    }
    let meta = serde_json::to_value(&merged)
        .map_err(|e| Error::Internal(format!("Kafka position: {e}")))?;
    Ok(Snapshot::meta(meta))
}

/// What the thread knows about one assigned partition.
struct PartitionState {
    /// Next offset to commit: one past the last record handed to the pipeline.
    next_offset: Option<i64>,
    /// Where a checkpoint (or a revoked share) resumes the partition, until its first
    /// records arrive: a first record further on, with the broker's log starting beyond
    /// this, means retention deleted records before the pipeline read them.
    resumed_at: Option<i64>,
    max_event_ms: Option<i64>,
    last_record: Instant,
    metrics: PartitionMetrics,
}

/// An epoch whose checkpoint is not complete yet, and the offsets it covers.
struct PendingEpoch {
    epoch: u64,
    offsets: Vec<(i32, i64)>,
}

/// Messages polled but not yet decoded: payloads separated by newlines, plus the hidden
/// columns' values (keys in one buffer, like the payloads: no allocation per message).
#[derive(Default)]
struct Pending {
    block: Vec<u8>,
    records: Vec<std::ops::Range<usize>>,
    key_bytes: Vec<u8>,
    keys: Vec<Option<std::ops::Range<usize>>>,
    partitions: Vec<i32>,
    offsets: Vec<i64>,
    timestamps: Vec<Option<i64>>,
}

impl Pending {
    fn push(&mut self, m: &BorrowedMessage<'_>) {
        let payload = m.payload().unwrap_or_default();
        let start = self.block.len();
        self.block.extend_from_slice(payload);
        self.records.push(start..self.block.len());
        self.block.push(b'\n');
        self.keys.push(m.key().map(|key| {
            let start = self.key_bytes.len();
            self.key_bytes.extend_from_slice(key);
            start..self.key_bytes.len()
        }));
        self.partitions.push(m.partition());
        self.offsets.push(m.offset());
        self.timestamps.push(m.timestamp().to_millis());
    }

    fn key(&self, record: usize) -> Option<&[u8]> {
        self.keys[record]
            .clone()
            .map(|range| &self.key_bytes[range])
    }

    /// Runs of consecutive records from one partition (librdkafka hands a fetched batch on
    /// in order): `(partition, records)`.
    fn partition_runs(&self) -> impl Iterator<Item = (i32, std::ops::Range<usize>)> + '_ {
        self.partitions
            .chunk_by(|a, b| a == b)
            .scan(0, |start, run| {
                let range = *start..*start + run.len();
                *start = range.end;
                Some((run[0], range))
            })
    }

    fn len(&self) -> usize {
        self.records.len()
    }

    fn clear(&mut self) {
        self.block.clear();
        self.records.clear();
        self.key_bytes.clear();
        self.keys.clear();
        self.partitions.clear();
        self.offsets.clear();
        self.timestamps.clear();
    }

    /// The hidden columns of records `range`.
    fn hidden(&self, range: std::ops::Range<usize>) -> Vec<ArrayRef> {
        let mut keys = BinaryBuilder::new();
        for record in range.clone() {
            keys.append_option(self.key(record));
        }
        vec![
            Arc::new(keys.finish()),
            Arc::new(Int32Array::from(self.partitions[range.clone()].to_vec())),
            Arc::new(Int64Array::from(self.offsets[range.clone()].to_vec())),
            Arc::new(TimestampMillisecondArray::from(
                self.timestamps[range].to_vec(),
            )),
        ]
    }
}

struct ConsumerLoop {
    config: Arc<SourceConfig>,
    reader: Reader,
    metrics: SourceMetrics,
    out: mpsc::Sender<Message>,
    decoder: BlockDecoder,
    output_schema: arrow::datatypes::SchemaRef,
    partitions: HashMap<i32, PartitionState>,
    pending: Pending,
    watermark: Option<i64>,
    watermark_gauge: weir_runtime::metrics::Gauge,
    epochs: VecDeque<PendingEpoch>,
    checkpoints: Option<SourceCheckpoints>,
    participant: String,
    /// Positions from the restored checkpoint, for partitions not assigned (yet): a
    /// checkpoint taken meanwhile must not forget them.
    resume: Position,
    /// Per partition (by id), the offset after the last record polled in this process: a
    /// partition assigned again after a revocation resumes at its committed (checkpointed)
    /// offset, and what it delivers below this was handed on already.
    polled: Vec<i64>,
    /// The group offsets were last committed for this epoch.
    committed_epoch: u64,
    /// One of several workers, given no partition (more workers than partitions): it never
    /// holds the pipeline's watermark back.
    empty_share: bool,
    /// One of several workers.
    split: bool,
    /// Commits offsets to the group after each checkpoint (not a cluster's instance: its
    /// position is its checkpoint's alone, and commits from many instances would load the
    /// broker for no reader).
    commits: bool,
    /// One of several workers, that has told the merge after them it is idle.
    aside: bool,
    dead_letters: Option<(
        ThreadedProducer<rdkafka::producer::DefaultProducerContext>,
        String,
    )>,
    bad_log: RateLimitedLog,
    poll_log: RateLimitedLog,
    /// Waits for room in the pipeline with a timeout (this thread is not in a runtime).
    runtime: tokio::runtime::Runtime,
}

impl ConsumerLoop {
    fn run(
        config: Arc<SourceConfig>,
        mode: Mode,
        metrics: SourceMetrics,
        out: mpsc::Sender<Message>,
        checkpointing: Checkpointing,
        stop: &std::sync::atomic::AtomicBool,
    ) -> Result<()> {
        let mut this = Self::new(config, mode, metrics, out, checkpointing)?;
        while !stop.load(std::sync::atomic::Ordering::Acquire) {
            match this.step()? {
                Step::Continue => {}
                // The pipeline is gone.
                Step::Gone => break,
                Step::LastBarrier(epoch) => {
                    this.finish(epoch);
                    break;
                }
            }
        }
        if let Some((producer, _)) = &this.dead_letters {
            let _ = producer.flush(Duration::from_secs(10));
        }
        Ok(())
    }

    fn new(
        config: Arc<SourceConfig>,
        mode: Mode,
        metrics: SourceMetrics,
        out: mpsc::Sender<Message>,
        checkpointing: Checkpointing,
    ) -> Result<Self> {
        let reset = match config.startup {
            StartupMode::Latest => "latest",
            StartupMode::Earliest | StartupMode::GroupOffsets => "earliest",
        };
        // Each pipeline reads the whole topic with a consumer group of its own, so that
        // two pipelines over one stream do not split its partitions.
        let group_id = match (mode, checkpointing.pipeline.as_str()) {
            (Mode::Tail, _) => format!("{}-tail-{}", config.group_id, std::process::id()),
            (Mode::Group, "") => config.group_id.clone(),
            (Mode::Group, pipeline) => format!("{}.{pipeline}", config.group_id),
            // A cluster's instance `<pipeline>/p<n>` commits to its pipeline's group.
            (Mode::Partition(_), pipeline) => {
                let pipeline = pipeline.rsplit_once('/').map_or(pipeline, |(p, _)| p);
                format!("{}.{pipeline}", config.group_id)
            }
        };
        // Static membership: a restarted process takes its partitions back at once instead
        // of waiting for the broker to time the old member out.
        let workers = checkpointing.worker;
        let instance_id = match (mode, &checkpointing.instance_id) {
            (Mode::Group, Some(instance)) if workers.count <= 1 => {
                Some(format!("{instance}.{group_id}"))
            }
            _ => None,
        };
        let callbacks = Callbacks {
            topic: config.topic.clone(),
            stream: config.stream.clone(),
            metrics: metrics.clone(),
            rebalances: Mutex::new(Vec::new()),
            error_log: Mutex::new(RateLimitedLog::new(Duration::from_secs(10))),
            caught_up: Mutex::new(HashMap::new()),
            resume: Mutex::new(checkpointing.resume.offsets.clone()),
            brokers_down: Mutex::new((None, None)),
        };
        let mut settings = vec![
            ("group.id", group_id.as_str()),
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "false"),
            ("enable.partition.eof", "false"),
            ("auto.offset.reset", reset),
            // Lag metrics, and whether a partition has anything left to read (idleness).
            ("statistics.interval.ms", "1000"),
            // librdkafka waits this long to fetch again for a partition whose prefetched
            // records reach `queued.min.messages`; its default, 1 s, starves a consumer
            // that decodes a full fetch in less (measured: 0.17 M instead of 1.3 M
            // records/s from the mock cluster).
            ("fetch.queue.backoff.ms", "50"),
        ];
        if let Some(instance) = &instance_id {
            settings.push(("group.instance.id", instance.as_str()));
        }
        let own = |callbacks: Callbacks| -> Result<BaseConsumer<Callbacks>> {
            config
                .client
                .config(&settings)
                .create_with_context(callbacks)
                .map_err(|e| super::kafka_error("cannot create the Kafka consumer", e))
        };
        let mut partitions = HashMap::new();
        // A partition this loop assigns itself: read from the checkpoint's offset, or the
        // group's.
        let mut take = |p: i32| {
            let mut state = new_partition(&metrics, p);
            state.next_offset = checkpointing.resume.offsets.get(&p).copied();
            state.resumed_at = state.next_offset;
            state.max_event_ms = checkpointing.resume.max_event_ms.get(&p).copied();
            let offset = state.next_offset.map_or(Offset::Stored, Offset::Offset);
            partitions.insert(p, state);
            offset
        };
        let reader = match mode {
            Mode::Group if workers.count <= 1 => {
                let consumer = own(callbacks)?;
                consumer.subscribe(&[&config.topic]).map_err(|e| {
                    super::kafka_error(&format!("cannot subscribe to {}", config.topic), e)
                })?;
                Reader::Own(consumer)
            }
            // One of several workers: its share of the partitions, assigned by this process
            // (a rebalance between workers would move a partition away from the state its
            // records went into).
            Mode::Group => {
                let consumer = own(callbacks)?;
                let mut tpl = TopicPartitionList::new();
                for p in topic_partitions(&consumer, &config.topic, config.broker_timeout)? {
                    if usize::try_from(p).is_ok_and(|p| p % workers.count == workers.index) {
                        tpl.add_partition_offset(&config.topic, p, take(p))
                            .map_err(|e| Error::Internal(e.to_string()))?;
                    }
                }
                tracing::info!(stream = %config.stream, worker = workers.index,
                    partitions = ?tpl.elements().iter().map(|e| e.partition()).collect::<Vec<_>>(),
                    "Kafka partitions assigned");
                consumer.assign(&tpl).map_err(|e| {
                    super::kafka_error(&format!("cannot assign {}", config.topic), e)
                })?;
                Reader::Own(consumer)
            }
            // A cluster's instance: its one partition, through the consumer its pipeline's
            // instances in this process share.
            Mode::Partition(p) => {
                let consumers = checkpointing.consumers.as_deref().ok_or_else(|| {
                    Error::Internal("a partition's source without its shared consumer".into())
                })?;
                let shared = SharedConsumer::get_or_create(consumers, &config.topic, || {
                    SharedConsumer::new(own(callbacks)?, &config.topic, "kafka source")
                })?;
                let offset = take(p);
                tracing::info!(stream = %config.stream, partition = p, "Kafka partition assigned");
                Reader::Shared(shared.attach(p, offset)?)
            }
            Mode::Tail => {
                // A tail joins no group: it reads every partition from its current end.
                let consumer = own(callbacks)?;
                let mut tpl = TopicPartitionList::new();
                for p in topic_partitions(&consumer, &config.topic, Duration::from_secs(10))? {
                    tpl.add_partition_offset(&config.topic, p, Offset::End)
                        .map_err(|e| Error::Internal(e.to_string()))?;
                    partitions.insert(p, new_partition(&metrics, p));
                }
                consumer.assign(&tpl).map_err(|e| {
                    super::kafka_error(&format!("cannot assign {}", config.topic), e)
                })?;
                Reader::Own(consumer)
            }
        };
        let dead_letters = match (&config.dead_letter_topic, mode) {
            (Some(topic), Mode::Group | Mode::Partition(_)) => {
                let producer = config
                    .client
                    .config(&[("linger.ms", "50")])
                    .create()
                    .map_err(|e| super::kafka_error("cannot create the dead-letter producer", e))?;
                Some((producer, topic.clone()))
            }
            _ => None,
        };
        let output_schema = Arc::new(arrow::datatypes::Schema::new(
            config
                .schema
                .fields()
                .iter()
                .cloned()
                .chain(super::hidden_columns())
                .collect::<Vec<_>>(),
        ));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(|e| Error::Internal(format!("cannot start the consumer's timer: {e}")))?;
        let empty_share = mode == Mode::Group && workers.count > 1 && partitions.is_empty();
        Ok(Self {
            decoder: BlockDecoder::new(config.decode_schema.clone(), config.format, MAX_BATCH),
            watermark_gauge: metrics.watermark_ms(),
            config,
            reader,
            metrics,
            out,
            output_schema,
            partitions,
            pending: Pending::default(),
            watermark: None,
            epochs: VecDeque::new(),
            checkpoints: checkpointing.requests,
            participant: checkpointing.participant,
            resume: checkpointing.resume,
            polled: Vec::new(),
            committed_epoch: 0,
            empty_share,
            split: (mode == Mode::Group && workers.count > 1) || matches!(mode, Mode::Partition(_)),
            commits: mode == Mode::Group,
            aside: false,
            dead_letters,
            bad_log: RateLimitedLog::new(Duration::from_secs(10)),
            poll_log: RateLimitedLog::new(Duration::from_secs(10)),
            runtime,
        })
    }

    /// Fails when no broker has been up for `broker.timeout`: the pipeline is restarted
    /// from its last checkpoint (with backoff) instead of waiting without a word.
    fn check_brokers(&self) -> Result<()> {
        let (down_since, last_error) = self
            .reader
            .consumer()
            .context()
            .brokers_down
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if down_since.is_none_or(|t| t.elapsed() <= self.config.broker_timeout) {
            return Ok(());
        }
        Err(Error::external(
            weir_runtime::error::External::Connection,
            format!(
                "no Kafka broker at '{}' has been reachable for {}{}",
                self.config.client.bootstrap,
                super::humantime(self.config.broker_timeout),
                last_error
                    .map(|e| format!(" (last error: {e})"))
                    .unwrap_or_default()
            ),
        ))
    }

    /// One round: poll a batch, hand it on, then watermark, barrier and commit housekeeping.
    fn step(&mut self) -> Result<Step> {
        loop {
            let timeout = if self.pending.len() == 0 {
                IDLE_POLL
            } else {
                Duration::ZERO
            };
            match self.reader.poll(timeout) {
                Some(Ok(message)) => {
                    if first_time(&mut self.polled, &message) {
                        self.pending.push(&message);
                    }
                    if self.pending.len() >= MAX_BATCH {
                        break;
                    }
                }
                Some(Err(e)) => {
                    self.poll_error(&e);
                    break;
                }
                None => break,
            }
        }
        self.check_brokers()?;
        self.apply_rebalances();
        if self.pending.len() > 0 && !self.flush()? {
            return Ok(Step::Gone);
        }
        if !self.advance_watermark() {
            return Ok(Step::Gone);
        }
        let requested = self
            .checkpoints
            .as_mut()
            .and_then(|c| c.barriers.try_recv().ok());
        if let Some(barrier) = requested {
            let (epoch, last) = (barrier.epoch, barrier.last);
            if !self.barrier(barrier)? {
                return Ok(Step::Gone);
            }
            if last {
                return Ok(Step::LastBarrier(epoch));
            }
        }
        self.commit_completed();
        Ok(Step::Continue)
    }

    fn apply_rebalances(&mut self) {
        let events = std::mem::take(
            &mut *self
                .reader
                .consumer()
                .context()
                .rebalances
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        for event in events {
            match event {
                RebalanceEvent::Assigned(ids) => {
                    tracing::info!(stream = %self.config.stream, partitions = ?ids, "Kafka partitions assigned");
                    for id in ids {
                        let resume = &self.resume;
                        self.partitions.entry(id).or_insert_with(|| {
                            let mut state = new_partition(&self.metrics, id);
                            state.next_offset = resume.offsets.get(&id).copied();
                            state.resumed_at = state.next_offset;
                            state.max_event_ms = resume.max_event_ms.get(&id).copied();
                            state
                        });
                    }
                }
                RebalanceEvent::Revoked(ids) => {
                    tracing::info!(stream = %self.config.stream, partitions = ?ids, "Kafka partitions revoked");
                    // Their positions stay: the next checkpoint saves them, and an
                    // assignment back to this process resumes there.
                    let mut assign_at = self
                        .reader
                        .consumer()
                        .context()
                        .resume
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
                    for id in ids {
                        let Some(state) = self.partitions.remove(&id) else {
                            continue;
                        };
                        if let Some(offset) = state.next_offset {
                            self.resume.offsets.insert(id, offset);
                            assign_at.insert(id, offset);
                        }
                        if let Some(max) = state.max_event_ms {
                            self.resume.max_event_ms.insert(id, max);
                        }
                    }
                }
            }
        }
    }

    /// The first records of `partition` since it resumed at `resumed` start at `first`. A
    /// gap is no loss in itself (compaction, transaction markers); records are lost when the
    /// broker's log now starts beyond `resumed`: retention deleted them before this
    /// pipeline read them (a job stopped, or behind, for longer than the topic keeps
    /// records). Counted and logged as an error, never passed over in silence.
    fn report_deleted(&self, partition: i32, resumed: i64, first: i64) {
        let consumer = self.reader.consumer();
        let log_start = match consumer.fetch_watermarks(
            &self.config.topic,
            partition,
            self.config.broker_timeout,
        ) {
            Ok((low, _)) => low,
            Err(e) => {
                tracing::warn!(stream = %self.config.stream, partition, resumed, first, error = %e,
                    "cannot tell whether the records before the first one read were deleted");
                return;
            }
        };
        if log_start <= resumed {
            return;
        }
        let skipped = u64::try_from(first - resumed).unwrap_or(0);
        if let Some(state) = self.partitions.get(&partition) {
            state.metrics.skipped.inc_by(skipped);
        }
        tracing::error!(stream = %self.config.stream, topic = %self.config.topic, partition,
            resumed, log_start, first, skipped,
            "records were deleted by the topic's retention before this pipeline read them: it resumed at offset {resumed}, the log starts at {log_start}; {skipped} records were not read");
    }

    /// Decodes the pending messages and sends one batch. False if the pipeline is gone.
    fn flush(&mut self) -> Result<bool> {
        let pending = std::mem::take(&mut self.pending);
        let decoded = self
            .decoder
            .decode_records(&pending.block, &pending.records)?;
        let mut bad = decoded.bad;
        let mut batches = Vec::with_capacity(decoded.batches.len());
        for (range, batch) in decoded.batches {
            let (mut columns, keep) = convert_timestamps(
                batch,
                &self.config.schema,
                self.config.timestamp_format,
                range.start,
                &pending,
                &mut bad,
            )?;
            columns.extend(pending.hidden(range));
            if let Some(keep) = keep {
                columns = columns
                    .iter()
                    .map(|c| arrow::compute::filter(c, &keep))
                    .collect::<Result<_, _>>()?;
            }
            batches.push(RecordBatch::try_new(self.output_schema.clone(), columns)?);
        }
        // Progress counts every record, good or bad: a bad one is never read again.
        let now = Instant::now();
        let mut jumped = Vec::new();
        for (partition, run) in pending.partition_runs() {
            let next = pending.offsets[run.end - 1] + 1;
            match self.partitions.get_mut(&partition) {
                Some(state) => {
                    if let Some(resumed) = state.resumed_at.take()
                        && pending.offsets[run.start] > resumed
                    {
                        jumped.push((partition, resumed, pending.offsets[run.start]));
                    }
                    state.next_offset = Some(next);
                    state.last_record = now;
                    state.metrics.records_in.inc_by(run.len() as u64);
                    let bytes: usize = pending.records[run].iter().map(|r| r.len()).sum();
                    state.metrics.bytes_in.inc_by(bytes as u64);
                }
                // Polled before its revocation: handed on all the same.
                None => {
                    self.resume.offsets.insert(partition, next);
                }
            }
        }
        for (partition, resumed, first) in jumped {
            self.report_deleted(partition, resumed, first);
        }
        if !bad.is_empty() {
            bad.sort_by_key(|b| b.line_in_block);
            self.report_bad(&bad, &pending);
        }
        let batch = match batches.len() {
            0 => None,
            1 => batches.pop(),
            _ => Some(arrow::compute::concat_batches(
                &self.output_schema,
                &batches,
            )?),
        };
        // Back in place before sending: a message polled while the pipeline is full waits
        // there for the next batch.
        self.pending = pending;
        self.pending.clear();
        match batch.filter(|b| b.num_rows() > 0) {
            Some(batch) => {
                self.track_event_time(&batch)?;
                Ok(self.send(Message::Data(batch)))
            }
            None => Ok(true),
        }
    }

    /// Hands a message to the pipeline. While it stays full for longer than `PAUSE_AFTER`,
    /// the assigned partitions are paused and the consumer goes on polling, so that the
    /// group does not evict it (`max.poll.interval.ms`) however long downstream takes; they
    /// resume, from the next undelivered offset, once there is room. False if the pipeline
    /// is gone.
    fn send(&mut self, message: Message) -> bool {
        // Room at once (the usual case): no timer.
        let message = match self.out.try_send(message) {
            Ok(()) => return true,
            Err(mpsc::error::TrySendError::Closed(_)) => return false,
            Err(mpsc::error::TrySendError::Full(message)) => message,
        };
        let mut paused: Option<TopicPartitionList> = None;
        let sent = loop {
            {
                // The timer is made inside block_on: it needs the runtime's context.
                let out = &self.out;
                let room = self
                    .runtime
                    .block_on(async { tokio::time::timeout(PAUSE_AFTER, out.reserve()).await });
                match room {
                    Ok(Ok(permit)) => {
                        permit.send(message);
                        break true;
                    }
                    Ok(Err(_closed)) => break false,
                    Err(_elapsed) => {}
                }
            }
            if paused.is_none() {
                paused = self.pause_assigned();
            }
            match self.reader.poll(Duration::ZERO) {
                // Paused partitions deliver nothing; a partition assigned meanwhile may.
                Some(Ok(m)) => {
                    if first_time(&mut self.polled, &m) {
                        self.pending.push(&m);
                    }
                    paused = None;
                }
                Some(Err(e)) => self.poll_error(&e),
                None => {}
            }
            self.apply_rebalances();
            self.commit_completed();
        };
        if let Some(tpl) = paused
            && let Err(e) = self.reader.consumer().resume(&tpl)
        {
            tracing::warn!(stream = %self.config.stream, error = %e, "cannot resume Kafka partitions");
        }
        sent
    }

    /// Pauses every partition assigned now; returns them (None if that failed).
    fn pause_assigned(&self) -> Option<TopicPartitionList> {
        let assigned = self.reader.assignment().ok()?;
        match self.reader.consumer().pause(&assigned) {
            Ok(()) => {
                tracing::debug!(stream = %self.config.stream, "pipeline full: Kafka partitions paused");
                Some(assigned)
            }
            Err(e) => {
                tracing::warn!(stream = %self.config.stream, error = %e, "cannot pause Kafka partitions");
                None
            }
        }
    }

    fn poll_error(&mut self, e: &KafkaError) {
        self.metrics.client_errors().inc();
        let stream = &self.config.stream;
        self.poll_log.log(|suppressed| {
            tracing::warn!(stream = %stream, error = %e, suppressed,
                "Kafka poll error; retrying");
        });
    }

    fn track_event_time(&mut self, batch: &RecordBatch) -> Result<()> {
        let Some(et) = self.config.event_time else {
            return Ok(());
        };
        let times = cast(
            batch.column(et.index),
            &DataType::Timestamp(TimeUnit::Millisecond, None),
        )?;
        let times = times
            .as_any()
            .downcast_ref::<TimestampMillisecondArray>()
            .ok_or_else(|| Error::Internal("event time is not a timestamp".into()))?;
        let partitions = batch
            .column(self.config.schema.fields().len() + 1)
            .as_any()
            .downcast_ref::<Int32Array>()
            .ok_or_else(|| Error::Internal("_partition is not INT".into()))?;
        let mut start = 0;
        for run in partitions.values().chunk_by(|a, b| a == b) {
            let run_times = times.slice(start, run.len());
            start += run.len();
            if let (Some(t), Some(state)) = (
                arrow::compute::max(&run_times),
                self.partitions.get_mut(&run[0]),
            ) {
                state.max_event_ms = Some(state.max_event_ms.map_or(t, |m| m.max(t)));
            }
        }
        Ok(())
    }

    /// The minimum over non-idle partitions of (max event time - delay); when every
    /// partition is idle, the maximum. Sent when it advances.
    ///
    /// A partition is idle when it has given no record for `idle_timeout` *and* has nothing
    /// left to read. The second half matters when the broker serves one partition's backlog
    /// before another's: the waiting partition is not idle, and its records are not late.
    fn advance_watermark(&mut self) -> bool {
        let Some(et) = self.config.event_time else {
            return true;
        };
        let timeout = self.config.idle_timeout;
        let quiet = |s: &PartitionState| s.last_record.elapsed() >= timeout;
        // Statistics are read only when some partition has been quiet that long.
        let caught_up = if self.partitions.values().any(quiet) {
            let callbacks = self.reader.consumer().context();
            let map = callbacks
                .caught_up
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            map.clone()
        } else {
            HashMap::new()
        };
        let is_idle =
            |id: &i32, state: &PartitionState| quiet(state) && caught_up.get(id) == Some(&true);
        let mut active_min: Option<i64> = None;
        let mut any_active = false;
        let mut blocked = false;
        let mut all_max: Option<i64> = None;
        for (id, state) in &self.partitions {
            let mark = state.max_event_ms.map(|m| m.saturating_sub(et.delay_ms));
            if let Some(mark) = mark {
                state.metrics.watermark_ms.set(mark);
                all_max = Some(all_max.map_or(mark, |m| m.max(mark)));
            }
            if !is_idle(id, state) {
                any_active = true;
                match mark {
                    Some(mark) => active_min = Some(active_min.map_or(mark, |m| m.min(mark))),
                    None => blocked = true,
                }
            }
        }
        if self.empty_share {
            return self.step_aside();
        }
        let candidate = if any_active {
            if blocked { None } else { active_min }
        } else {
            all_max
        };
        // One of several workers coming back from idle: its latest watermark again (the
        // merge after the workers reads the `i64::MAX` it stepped aside with as "idle").
        let back = self.aside && any_active;
        if back {
            self.aside = false;
        }
        let sent = match candidate {
            Some(mark) if self.watermark.is_none_or(|w| mark > w) => {
                self.watermark = Some(mark);
                // With several workers, the merge after them sets the pipeline's (the
                // minimum over workers).
                if !self.split {
                    self.watermark_gauge.set(mark);
                }
                self.send(Message::Watermark(Watermark(mark)))
            }
            _ if back => match self.watermark {
                Some(mark) => self.send(Message::Watermark(Watermark(mark))),
                None => true,
            },
            _ => true,
        };
        // One of several workers whose partitions are all idle: after its own watermark (the
        // highest over its partitions, as one source would send), it steps aside, so that
        // the merge takes the minimum over the other workers, as over active partitions.
        if sent && self.split && !any_active && !self.partitions.is_empty() {
            return self.step_aside();
        }
        sent
    }

    /// Tells the merge after a pipeline's workers that this one is idle (`i64::MAX`), once.
    fn step_aside(&mut self) -> bool {
        if self.aside {
            return true;
        }
        self.aside = true;
        self.send(Message::Watermark(Watermark(i64::MAX)))
    }

    /// Saves every partition's position in `barrier` (next offset, highest event time;
    /// the restored ones for partitions not assigned now) and hands it on. False if the
    /// pipeline is gone.
    fn barrier(&mut self, barrier: CheckpointBarrier) -> Result<bool> {
        let mut position = self.resume.clone();
        for (&p, state) in &self.partitions {
            if let Some(offset) = state.next_offset {
                position.offsets.insert(p, offset);
            }
            if let Some(max) = state.max_event_ms {
                position.max_event_ms.insert(p, max);
            }
        }
        let mut offsets: Vec<(i32, i64)> = position.offsets.iter().map(|(&p, &o)| (p, o)).collect();
        offsets.sort_unstable();
        self.epochs.push_back(PendingEpoch {
            epoch: barrier.epoch,
            offsets,
        });
        let meta = serde_json::to_value(&position)
            .map_err(|e| Error::Internal(format!("Kafka position: {e}")))?;
        barrier.save(self.participant.clone(), Snapshot::meta(meta));
        tracing::debug!(stream = %self.config.stream, epoch = barrier.epoch, "barrier");
        Ok(self.send(Message::Barrier(barrier)))
    }

    /// Commits to the group the offsets of the newest epoch whose checkpoint is complete.
    fn commit_completed(&mut self) {
        let Some(checkpoints) = self.checkpoints.as_mut() else {
            return;
        };
        let completed = *checkpoints.committed.borrow_and_update();
        if completed <= self.committed_epoch {
            return;
        }
        let mut newest = None;
        while self.epochs.front().is_some_and(|e| e.epoch <= completed) {
            newest = self.epochs.pop_front();
        }
        self.committed_epoch = completed;
        if let Some(epoch) = newest
            && self.commits
        {
            self.commit(&epoch.offsets);
        }
    }

    /// Commits synchronously (once per checkpoint at most), so that the result is known
    /// and counted.
    fn commit(&mut self, offsets: &[(i32, i64)]) {
        if let Some((producer, _)) = &self.dead_letters
            && let Err(e) = producer.flush(Duration::from_secs(10))
        {
            tracing::warn!(stream = %self.config.stream, error = %e,
                "dead letters not yet delivered; commit postponed");
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for &(p, o) in offsets {
            // Only partitions still ours: the new owner resumes from the last commit.
            if self.partitions.contains_key(&p)
                && tpl
                    .add_partition_offset(&self.config.topic, p, Offset::Offset(o))
                    .is_err()
            {
                return;
            }
        }
        if tpl.count() == 0 {
            return;
        }
        tracing::debug!(stream = %self.config.stream, offsets = ?offsets, "commit");
        let result = self.reader.consumer().commit(&tpl, CommitMode::Sync);
        self.metrics
            .commits(if result.is_ok() { "ok" } else { "failed" })
            .inc();
        if let Err(e) = result {
            tracing::warn!(stream = %self.config.stream, error = %e,
                "Kafka offset commit failed; a later commit covers it");
        }
    }

    /// After the last barrier: wait (bounded) for its checkpoint to complete and commit its
    /// offsets to the group, keeping the membership alive without reading more. The
    /// consumer then closes without leaving the group when it has a static instance id, so
    /// that a restart gets the same partitions at once.
    fn finish(&mut self, epoch: u64) {
        let _ = self.pause_assigned();
        let deadline = Instant::now() + FINAL_COMMIT_WAIT;
        loop {
            self.commit_completed();
            // The coordinator ends once it has announced its last epoch: nothing more comes.
            let gone = self
                .checkpoints
                .as_ref()
                .is_none_or(|c| c.committed.has_changed().is_err());
            if self.committed_epoch >= epoch || gone || Instant::now() >= deadline {
                break;
            }
            let _ = self.reader.poll(Duration::from_millis(50));
            self.apply_rebalances();
        }
    }

    fn report_bad(&mut self, bad: &[BadRecord], pending: &Pending) {
        let mut by_reason: HashMap<&str, u64> = HashMap::new();
        for b in bad {
            *by_reason.entry(b.reason).or_default() += 1;
        }
        for (reason, n) in by_reason {
            self.metrics.decode_errors(reason, n);
        }
        let first = &bad[0];
        let index = first.line_in_block as usize;
        let (stream, topic) = (&self.config.stream, &self.config.topic);
        self.bad_log.log(|suppressed| {
            tracing::warn!(stream = %stream, topic = %topic, partition = pending.partitions[index],
                offset = pending.offsets[index], reason = first.reason, error = %first.error,
                count = bad.len(), suppressed, "records that do not decode were skipped");
        });
        let Some((producer, dlq)) = &self.dead_letters else {
            return;
        };
        for b in bad {
            let i = b.line_in_block as usize;
            let letter = serde_json::json!({
                "stream": self.config.stream,
                "topic": self.config.topic,
                "partition": pending.partitions[i],
                "offset": pending.offsets[i],
                "reason": b.reason,
                "error": b.error,
                "record": String::from_utf8_lossy(&b.bytes),
            })
            .to_string();
            let key = pending.key(i).unwrap_or_default();
            let mut record = BaseRecord::to(dlq).payload(&letter).key(key);
            loop {
                match producer.send(record) {
                    Ok(()) => {
                        self.metrics.dead_letters().inc();
                        break;
                    }
                    Err((
                        KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull),
                        back,
                    )) => {
                        record = back;
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err((e, _)) => {
                        tracing::warn!(stream = %self.config.stream, error = %e,
                            "cannot write a dead letter");
                        break;
                    }
                }
            }
        }
    }
}

/// What a consumer loop polls: a consumer of its own, or its partition's queue of the one
/// its pipeline's instances in this process share.
enum Reader {
    Own(BaseConsumer<Callbacks>),
    Shared(PartitionReader<Callbacks>),
}

impl Reader {
    fn consumer(&self) -> &BaseConsumer<Callbacks> {
        match self {
            Reader::Own(consumer) => consumer,
            Reader::Shared(reader) => reader.consumer(),
        }
    }

    fn poll(&self, timeout: Duration) -> Option<KafkaResult<BorrowedMessage<'_>>> {
        match self {
            Reader::Own(consumer) => consumer.poll(timeout),
            Reader::Shared(reader) => reader.queue.poll(timeout),
        }
    }

    /// The partitions this reader reads now (of a shared consumer: its own alone).
    fn assignment(&self) -> KafkaResult<TopicPartitionList> {
        match self {
            Reader::Own(consumer) => consumer.assignment(),
            Reader::Shared(reader) => Ok(reader.partition_list()),
        }
    }
}

/// What one round of the consumer loop ended with.
enum Step {
    Continue,
    /// Nothing reads the output any more.
    Gone,
    /// The job's last barrier (of this epoch) was handed on: the pipeline stops.
    LastBarrier(u64),
}

/// Whether `m` comes after every record polled from its partition so far (recording it);
/// false for one delivered again after the partition was revoked and assigned back.
fn first_time(polled: &mut Vec<i64>, m: &BorrowedMessage<'_>) -> bool {
    let Ok(partition) = usize::try_from(m.partition()) else {
        return true;
    };
    if partition >= polled.len() {
        polled.resize(partition + 1, i64::MIN);
    }
    if m.offset() < polled[partition] {
        return false;
    }
    polled[partition] = m.offset() + 1;
    true
}

fn new_partition(metrics: &SourceMetrics, id: i32) -> PartitionState {
    PartitionState {
        next_offset: None,
        resumed_at: None,
        max_event_ms: None,
        last_record: Instant::now(),
        metrics: metrics.partition(id),
    }
}

/// Converts TIMESTAMP columns decoded as written (strings, epoch numbers) to their declared
/// type. A value that does not convert makes its record bad (reason `schema`); the returned
/// mask, if any, keeps the good rows (apply it before building a batch: a bad row may hold a
/// NULL in a NOT NULL column).
fn convert_timestamps(
    batch: RecordBatch,
    schema: &arrow::datatypes::SchemaRef,
    format: TimestampFormat,
    first_record: usize,
    pending: &Pending,
    bad: &mut Vec<BadRecord>,
) -> Result<(Vec<ArrayRef>, Option<arrow::array::BooleanArray>)> {
    if format == TimestampFormat::Any {
        return Ok((batch.columns().to_vec(), None));
    }
    let mut columns = batch.columns().to_vec();
    let mut keep = vec![true; batch.num_rows()];
    for (i, field) in schema.fields().iter().enumerate() {
        let DataType::Timestamp(unit, tz) = field.data_type() else {
            continue;
        };
        let written = &columns[i];
        let millis: ArrayRef = match format {
            TimestampFormat::EpochSeconds => {
                let secs = written
                    .as_any()
                    .downcast_ref::<Float64Array>()
                    .ok_or_else(|| Error::Internal("epoch seconds not decoded as DOUBLE".into()))?;
                Arc::new(TimestampMillisecondArray::from_iter(
                    secs.iter().map(|s| s.map(|s| (s * 1000.0).round() as i64)),
                ))
            }
            TimestampFormat::EpochMillis => {
                cast(written, &DataType::Timestamp(TimeUnit::Millisecond, None))?
            }
            _ => {
                let options = arrow::compute::CastOptions {
                    safe: true,
                    ..Default::default()
                };
                arrow::compute::cast_with_options(
                    written,
                    &DataType::Timestamp(TimeUnit::Millisecond, None),
                    &options,
                )?
            }
        };
        for (row, kept) in keep.iter_mut().enumerate() {
            if *kept && written.is_valid(row) && millis.is_null(row) {
                *kept = false;
                let record = first_record + row;
                bad.push(BadRecord {
                    line_in_block: record as u64,
                    reason: "schema",
                    error: format!("column {}: not a timestamp", field.name()),
                    bytes: pending.block[pending.records[record].clone()].to_vec(),
                });
            }
        }
        columns[i] = cast(&millis, &DataType::Timestamp(*unit, tz.clone()))?;
    }
    let mask = keep
        .iter()
        .any(|k| !k)
        .then(|| arrow::array::BooleanArray::from(keep));
    Ok((columns, mask))
}
