//! The Kafka source: one consumer thread per stream, decoding each poll into one Arrow batch.
//!
//! The thread owns the consumer. It polls until a batch is full (or nothing more is queued),
//! decodes the payloads with arrow's JSON/CSV decoder in one pass (bad records isolated by
//! bisection), appends the hidden columns, tracks each partition's highest event time, and
//! hands `Data`, `Watermark` and tracked `Barrier` messages to the pipeline. An epoch's
//! offsets are committed to the group only when every sink downstream has dropped the
//! epoch's barrier (its rows are durable): at-least-once, with no record skipped.

use std::collections::{HashMap, VecDeque};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arrow::array::{
    Array, ArrayRef, BinaryBuilder, Float64Array, Int32Array, Int64Array, RecordBatch,
    TimestampMillisecondArray,
};
use arrow::compute::cast;
use arrow::datatypes::{DataType, TimeUnit};
use async_trait::async_trait;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message as _};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::{ClientContext, TopicPartitionList as Tpl};
use tokio::sync::mpsc;
use weir_runtime::metrics::{PartitionMetrics, SourceMetrics};
use weir_runtime::pipeline::RateLimitedLog;
use weir_runtime::{
    CheckpointBarrier, EpochDone, Error, Message, Result, Source, SourceContext, SourceExit,
    Watermark,
};

use super::{ClientSettings, StartupMode, TimestampFormat};
use crate::decode::{BadRecord, BlockDecoder, Format};

/// Messages per batch at most.
const MAX_BATCH: usize = 8192;
/// How long a poll waits when nothing is queued.
const IDLE_POLL: Duration = Duration::from_millis(100);
/// How long a send waits for room in the pipeline before pausing the partitions (and from
/// then on, how often the paused consumer polls).
const PAUSE_AFTER: Duration = Duration::from_millis(500);
/// How long stopping waits for the last epoch to become durable before giving up on it
/// (its records are then read again after a restart: at-least-once).
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
    pub commit_interval: Duration,
    pub dead_letter_topic: Option<String>,
}

/// A pipeline's reader (in the consumer group, committing) or a live tail's (no group, no
/// commits, from the end of each partition).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    Group,
    Tail,
}

pub(super) struct KafkaSource {
    config: Arc<SourceConfig>,
    mode: Mode,
    thread: Option<JoinHandle<()>>,
}

impl KafkaSource {
    pub fn new(config: Arc<SourceConfig>, mode: Mode) -> Self {
        Self {
            config,
            mode,
            thread: None,
        }
    }
}

#[async_trait]
impl Source for KafkaSource {
    async fn run(&mut self, ctx: &mut SourceContext) -> Result<SourceExit> {
        let (tx, mut rx) = mpsc::channel(2);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = {
            let config = self.config.clone();
            let mode = self.mode;
            let metrics = ctx.metrics.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("kafka-{}", config.stream))
                .spawn(move || {
                    if let Err(e) = ConsumerLoop::run(config.clone(), mode, metrics, tx, &stop) {
                        tracing::error!(stream = %config.stream, error = %e, "Kafka consumer stopped");
                    }
                })
                .map_err(|e| Error::Internal(format!("cannot start the Kafka consumer: {e}")))?
        };
        self.thread = Some(thread);
        loop {
            tokio::select! {
                biased;
                () = ctx.stopping() => break,
                message = rx.recv() => match message {
                    Some(m) => if !ctx.emit(m).await { break },
                    None => return Err(Error::Internal(format!(
                        "the Kafka consumer of stream {} ended", self.config.stream))),
                },
            }
        }
        // Stopping: the thread sends a final barrier and closes the channel; pass the rest on.
        stop.store(true, std::sync::atomic::Ordering::Release);
        while let Some(message) = rx.recv().await {
            if !ctx.emit_final(message).await {
                break;
            }
        }
        Ok(SourceExit::Stopped)
    }

    async fn close(&mut self) {
        if let Some(thread) = self.thread.take() {
            // The thread waits (bounded) for the last epoch, commits it and closes the consumer.
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

/// Consumer callbacks: rebalances, commit results, statistics (lag), client errors.
struct Callbacks {
    topic: String,
    stream: String,
    metrics: SourceMetrics,
    rebalances: Mutex<Vec<RebalanceEvent>>,
    error_log: Mutex<RateLimitedLog>,
    /// Per partition, whether the last statistics showed nothing left to read: the broker's
    /// high watermark known and fetched up to, and no fetched record waiting.
    caught_up: Mutex<HashMap<i32, bool>>,
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
        let mut log = self.error_log.lock().unwrap_or_else(|e| e.into_inner());
        log.log(|suppressed| {
            tracing::warn!(stream = %self.stream, error = %error, reason, suppressed,
                "Kafka client error; retrying with backoff");
        });
    }
}

impl ConsumerContext for Callbacks {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let event = match rebalance {
            Rebalance::Assign(tpl) => RebalanceEvent::Assigned(self.partitions(tpl)),
            Rebalance::Revoke(tpl) => RebalanceEvent::Revoked(self.partitions(tpl)),
            Rebalance::Error(e) => {
                tracing::warn!(stream = %self.stream, error = %e, "Kafka rebalance error");
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

/// What the thread knows about one assigned partition.
struct PartitionState {
    /// Next offset to commit: one past the last record handed to the pipeline.
    next_offset: Option<i64>,
    max_event_ms: Option<i64>,
    last_record: Instant,
    metrics: PartitionMetrics,
}

/// An epoch whose barrier is travelling: the offsets it covers, and whether it is done.
struct PendingEpoch {
    epoch: u64,
    offsets: Vec<(i32, i64)>,
    done: Option<bool>,
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
    mode: Mode,
    consumer: BaseConsumer<Callbacks>,
    metrics: SourceMetrics,
    out: mpsc::Sender<Message>,
    decoder: BlockDecoder,
    output_schema: arrow::datatypes::SchemaRef,
    partitions: HashMap<i32, PartitionState>,
    pending: Pending,
    watermark: Option<i64>,
    watermark_gauge: weir_runtime::metrics::Gauge,
    epoch: u64,
    epochs: VecDeque<PendingEpoch>,
    epoch_tx: std_mpsc::Sender<EpochDone>,
    epoch_rx: std_mpsc::Receiver<EpochDone>,
    last_barrier: Instant,
    last_barrier_offsets: Vec<(i32, i64)>,
    /// Set when a sink lost rows: from then on nothing is committed (at-least-once).
    commits_poisoned: bool,
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
        stop: &std::sync::atomic::AtomicBool,
    ) -> Result<()> {
        let mut this = Self::new(config, mode, metrics, out)?;
        while !stop.load(std::sync::atomic::Ordering::Acquire) {
            if !this.step()? {
                return Ok(()); // the pipeline is gone
            }
        }
        this.finish();
        Ok(())
    }

    fn new(
        config: Arc<SourceConfig>,
        mode: Mode,
        metrics: SourceMetrics,
        out: mpsc::Sender<Message>,
    ) -> Result<Self> {
        let reset = match config.startup {
            StartupMode::Latest => "latest",
            StartupMode::Earliest | StartupMode::GroupOffsets => "earliest",
        };
        let group_id = match mode {
            Mode::Group => config.group_id.clone(),
            Mode::Tail => format!("{}-tail-{}", config.group_id, std::process::id()),
        };
        let callbacks = Callbacks {
            topic: config.topic.clone(),
            stream: config.stream.clone(),
            metrics: metrics.clone(),
            rebalances: Mutex::new(Vec::new()),
            error_log: Mutex::new(RateLimitedLog::new(Duration::from_secs(10))),
            caught_up: Mutex::new(HashMap::new()),
        };
        let consumer: BaseConsumer<Callbacks> = config
            .client
            .config(&[
                ("group.id", &group_id),
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
            ])
            .create_with_context(callbacks)
            .map_err(|e| Error::Internal(format!("cannot create the Kafka consumer: {e}")))?;
        let mut partitions = HashMap::new();
        match mode {
            Mode::Group => consumer.subscribe(&[&config.topic]).map_err(|e| {
                Error::Internal(format!("cannot subscribe to {}: {e}", config.topic))
            })?,
            Mode::Tail => {
                // A tail joins no group: it reads every partition from its current end.
                let metadata = consumer
                    .fetch_metadata(Some(&config.topic), Duration::from_secs(10))
                    .map_err(|e| {
                        Error::Internal(format!("cannot read topic {}: {e}", config.topic))
                    })?;
                let mut tpl = TopicPartitionList::new();
                for topic in metadata.topics() {
                    for p in topic.partitions() {
                        tpl.add_partition_offset(&config.topic, p.id(), Offset::End)
                            .map_err(|e| Error::Internal(e.to_string()))?;
                        partitions.insert(p.id(), new_partition(&metrics, p.id()));
                    }
                }
                consumer
                    .assign(&tpl)
                    .map_err(|e| Error::Internal(format!("cannot assign {}: {e}", config.topic)))?;
            }
        }
        let dead_letters = match (&config.dead_letter_topic, mode) {
            (Some(topic), Mode::Group) => {
                let producer = config
                    .client
                    .config(&[("linger.ms", "50")])
                    .create()
                    .map_err(|e| {
                        Error::Internal(format!("cannot create the dead-letter producer: {e}"))
                    })?;
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
        let (epoch_tx, epoch_rx) = std_mpsc::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(|e| Error::Internal(format!("cannot start the consumer's timer: {e}")))?;
        Ok(Self {
            decoder: BlockDecoder::new(config.decode_schema.clone(), config.format, MAX_BATCH),
            watermark_gauge: metrics.watermark_ms(),
            config,
            mode,
            consumer,
            metrics,
            out,
            output_schema,
            partitions,
            pending: Pending::default(),
            watermark: None,
            epoch: 0,
            epochs: VecDeque::new(),
            epoch_tx,
            epoch_rx,
            last_barrier: Instant::now(),
            last_barrier_offsets: Vec::new(),
            commits_poisoned: false,
            dead_letters,
            bad_log: RateLimitedLog::new(Duration::from_secs(10)),
            poll_log: RateLimitedLog::new(Duration::from_secs(10)),
            runtime,
        })
    }

    /// One round: poll a batch, hand it on, then watermark, barrier and commit housekeeping.
    /// Returns false when the pipeline no longer reads.
    fn step(&mut self) -> Result<bool> {
        loop {
            let timeout = if self.pending.len() == 0 {
                IDLE_POLL
            } else {
                Duration::ZERO
            };
            match self.consumer.poll(timeout) {
                Some(Ok(message)) => {
                    self.pending.push(&message);
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
        self.apply_rebalances();
        if self.pending.len() > 0 && !self.flush()? {
            return Ok(false);
        }
        if !self.advance_watermark() {
            return Ok(false);
        }
        if self.mode == Mode::Group {
            if self.last_barrier.elapsed() >= self.config.commit_interval && !self.barrier() {
                return Ok(false);
            }
            self.commit_done();
        }
        Ok(true)
    }

    fn apply_rebalances(&mut self) {
        let events = std::mem::take(
            &mut *self
                .consumer
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
                        self.partitions
                            .entry(id)
                            .or_insert_with(|| new_partition(&self.metrics, id));
                    }
                }
                RebalanceEvent::Revoked(ids) => {
                    tracing::info!(stream = %self.config.stream, partitions = ?ids, "Kafka partitions revoked");
                    for id in ids {
                        self.partitions.remove(&id);
                    }
                }
            }
        }
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
        for (partition, run) in pending.partition_runs() {
            if let Some(state) = self.partitions.get_mut(&partition) {
                state.next_offset = Some(pending.offsets[run.end - 1] + 1);
                state.last_record = now;
                state.metrics.records_in.inc_by(run.len() as u64);
                let bytes: usize = pending.records[run].iter().map(|r| r.len()).sum();
                state.metrics.bytes_in.inc_by(bytes as u64);
            }
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
            match self.consumer.poll(Duration::ZERO) {
                // Paused partitions deliver nothing; a partition assigned meanwhile may.
                Some(Ok(m)) => {
                    self.pending.push(&m);
                    paused = None;
                }
                Some(Err(e)) => self.poll_error(&e),
                None => {}
            }
            self.apply_rebalances();
            if self.mode == Mode::Group {
                self.commit_done();
            }
        };
        if let Some(tpl) = paused
            && let Err(e) = self.consumer.resume(&tpl)
        {
            tracing::warn!(stream = %self.config.stream, error = %e, "cannot resume Kafka partitions");
        }
        sent
    }

    /// Pauses every partition assigned now; returns them (None if that failed).
    fn pause_assigned(&self) -> Option<TopicPartitionList> {
        let assigned = self.consumer.assignment().ok()?;
        match self.consumer.pause(&assigned) {
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
            let callbacks = self.consumer.context();
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
        let candidate = if any_active {
            if blocked { None } else { active_min }
        } else {
            all_max
        };
        match candidate {
            Some(mark) if self.watermark.is_none_or(|w| mark > w) => {
                self.watermark = Some(mark);
                self.watermark_gauge.set(mark);
                self.send(Message::Watermark(Watermark(mark)))
            }
            _ => true,
        }
    }

    /// Sends a tracked barrier covering everything handed on so far (if anything moved).
    fn barrier(&mut self) -> bool {
        self.last_barrier = Instant::now();
        let mut offsets: Vec<(i32, i64)> = self
            .partitions
            .iter()
            .filter_map(|(&p, s)| s.next_offset.map(|o| (p, o)))
            .collect();
        offsets.sort_unstable();
        if offsets.is_empty() || offsets == self.last_barrier_offsets {
            return true;
        }
        self.last_barrier_offsets.clone_from(&offsets);
        self.epoch += 1;
        self.epochs.push_back(PendingEpoch {
            epoch: self.epoch,
            offsets,
            done: None,
        });
        tracing::debug!(stream = %self.config.stream, epoch = self.epoch, "barrier");
        let barrier = CheckpointBarrier::tracked(self.epoch, self.epoch_tx.clone());
        self.send(Message::Barrier(barrier))
    }

    /// Commits the newest epoch whose predecessors are all durable.
    fn commit_done(&mut self) {
        while let Ok(done) = self.epoch_rx.try_recv() {
            self.mark_done(done);
        }
        let mut newest = None;
        while let Some(front) = self.epochs.front() {
            match front.done {
                Some(true) => newest = self.epochs.pop_front(),
                Some(false) => {
                    if !self.commits_poisoned {
                        tracing::error!(stream = %self.config.stream, epoch = front.epoch,
                            "a sink lost rows; offsets are no longer committed, so a restart reads them again");
                    }
                    self.commits_poisoned = true;
                    self.epochs.pop_front();
                }
                None => break,
            }
        }
        if let Some(epoch) = newest
            && !self.commits_poisoned
        {
            self.commit(&epoch.offsets);
        }
    }

    fn mark_done(&mut self, done: EpochDone) {
        tracing::debug!(stream = %self.config.stream, epoch = done.epoch, durable = done.durable, "epoch done");
        if let Some(e) = self.epochs.iter_mut().find(|e| e.epoch == done.epoch) {
            e.done = Some(done.durable);
        }
    }

    /// Commits synchronously (once per `commit.interval` at most), so that the result is
    /// known and counted.
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
        let result = self.consumer.commit(&tpl, CommitMode::Sync);
        self.metrics
            .commits(if result.is_ok() { "ok" } else { "failed" })
            .inc();
        if let Err(e) = result {
            tracing::warn!(stream = %self.config.stream, error = %e,
                "Kafka offset commit failed; a later commit covers it");
        }
    }

    /// Stopping: a last barrier, then wait (bounded) for it and commit synchronously.
    fn finish(&mut self) {
        if self.mode == Mode::Group {
            // A last barrier covering everything handed on (if the pipeline still reads).
            self.barrier();
            // Closing the channel lets the pipeline send End, after which sinks finish and
            // drop their barriers.
            let (closed, _) = mpsc::channel(1);
            drop(std::mem::replace(&mut self.out, closed));
            let deadline = Instant::now() + FINAL_COMMIT_WAIT;
            while self.epochs.iter().any(|e| e.done.is_none()) && Instant::now() < deadline {
                if let Ok(done) = self.epoch_rx.recv_timeout(Duration::from_millis(50)) {
                    self.mark_done(done);
                }
                // Keep the group membership alive while waiting.
                let _ = self.consumer.poll(Duration::ZERO);
                self.apply_rebalances();
            }
            // The newest epoch whose predecessors are all durable; later ones are read again.
            self.commit_done();
            // Leave the group now, so that the others get these partitions at once rather
            // than after the session timeout.
            self.consumer.unsubscribe();
        }
        if let Some((producer, _)) = &self.dead_letters {
            let _ = producer.flush(Duration::from_secs(10));
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

fn new_partition(metrics: &SourceMetrics, id: i32) -> PartitionState {
    PartitionState {
        next_offset: None,
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
