//! The repartition topic of a cluster pipeline (`weir serve --cluster`): the shuffle between
//! the tasks that read the source's partitions and those that own the keys.
//!
//! Exactly once without broker transactions (librdkafka's mock cluster has none, and Weir
//! already has a commit log: the checkpoint store). Each upstream writer (one per source
//! partition) runs the two-phase sink protocol:
//!
//! - **write:** rows (or partial window states) go to the repartition partition their key
//!   hashes to, tagged with the writer, its *generation* (random, new each time a task
//!   starts) and the epoch (the next checkpoint's);
//! - **pre-commit** (at the barrier): the writer waits until the broker has every record it
//!   sent, so every record of the epoch is in Kafka;
//! - the checkpoint (source offset and this sink's generation and epoch) is written to the
//!   store: *that* is the commit point;
//! - **commit:** a marker `(writer, generation, epoch, watermark)` goes to every repartition
//!   partition. A task restored from the checkpoint sends its markers again first (the one
//!   before it may have died between the commit point and the markers).
//!
//! [`RepartitionSource`] reads one repartition partition. It holds a writer's records back
//! until that writer's marker for their epoch comes; then it emits those of the marker's
//! generation and drops the others (a writer that died before its commit point, whose
//! successor replays the same source offsets under a new generation). Records of an epoch
//! already committed are dropped (a replay). Its watermark is the minimum over writers'
//! markers, an idle writer (`i64::MAX`) holding nothing back. Its checkpoint keeps the
//! offset of the oldest record still held back, so held records are read again after a
//! restore rather than saved.
//!
//! A process's writers of one topic share one producer ([`ShuffleProducer`]), which counts
//! each writer's records in flight and lost, so that a writer waits for its own only.
//!
//! A record's value: one byte of kind, then for rows the writer (i32), generation (u64) and
//! epoch (u64), big-endian, and an Arrow IPC stream; for a marker, JSON.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use arrow::datatypes::SchemaRef;
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use datafusion::physical_expr::PhysicalExpr;
use rdkafka::ClientContext;
use rdkafka::Offset;
use rdkafka::consumer::{BaseConsumer, DefaultConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::Message as _;
use rdkafka::producer::{BaseRecord, DeliveryResult, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use weir_runtime::exchange::KeyRouter;
use weir_runtime::{
    CheckpointBarrier, Error, Message, Result, Sink, Snapshot, Source, SourceContext, SourceExit,
    Watermark,
};

use super::ClientSettings;
use super::shared::SharedConsumer;

const DATA: u8 = b'D';
const MARKER: u8 = b'M';
/// Bytes before a data record's IPC stream: kind, writer, generation, epoch.
const HEADER: usize = 1 + 4 + 8 + 8;

/// Writer `writer` (a source partition) of `writers` committed every epoch up to `epoch`
/// of generation `generation`, and its watermark is `watermark` (`i64::MAX`: idle).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Marker {
    writer: i32,
    writers: usize,
    generation: u64,
    epoch: u64,
    watermark: i64,
}

/// Where the upstream side of one source partition writes.
#[derive(Debug, Clone)]
pub struct RepartitionTarget {
    pub client: ClientSettings,
    /// The repartition topic, and its partition count.
    pub topic: String,
    pub partitions: usize,
    /// The rows' key columns, over the rows written (the router hashes them).
    pub keys: Vec<Arc<dyn PhysicalExpr>>,
    /// The source partition this writer reads, and how many there are.
    pub writer: i32,
    pub writers: usize,
}

/// What a writer's checkpoint holds: the generation that wrote the epoch, and its
/// watermark, to send the epoch's markers again after a restore.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct WriterState {
    generation: u64,
    epoch: u64,
    watermark: Option<i64>,
}

/// Writes one source partition's share of a pipeline to the repartition topic (see the
/// module's docs).
pub struct RepartitionSink {
    target: RepartitionTarget,
    producer: Arc<ShuffleProducer>,
    /// This writer's records in flight and lost.
    tally: Arc<Tally>,
    router: KeyRouter,
    generation: u64,
    /// The epoch of the records being written (the next barrier's).
    epoch: u64,
    watermark: Option<i64>,
    /// Epochs pre-committed, not yet committed, with their watermark.
    pending: VecDeque<(u64, Option<i64>)>,
    /// The last epoch pre-committed (for the snapshot).
    last: Option<WriterState>,
    /// Bytes written to the topic (record values).
    bytes: weir_runtime::metrics::Counter,
}

/// How long a writer waits for the broker to take what it sent.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(60);

/// One producer for a process's writers of a repartition topic: one Kafka client, not one
/// per source partition.
pub struct ShuffleProducer {
    producer: ThreadedProducer<Deliveries>,
}

impl std::fmt::Debug for ShuffleProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ShuffleProducer")
    }
}

impl ShuffleProducer {
    pub fn new(client: &ClientSettings) -> Result<Self> {
        let producer = client
            .config(&[
                // In order and once per partition, across retries.
                ("enable.idempotence", "true"),
                ("acks", "all"),
                ("linger.ms", "20"),
                ("compression.type", "lz4"),
            ])
            .create_with_context(Deliveries)
            .map_err(|e| super::kafka_error("cannot create the repartition producer", e))?;
        Ok(Self { producer })
    }
}

/// One writer's records sent and not yet acknowledged, and those lost.
#[derive(Default)]
struct Tally {
    in_flight: AtomicU64,
    failed: AtomicU64,
    drained: tokio::sync::Notify,
}

/// Settles each record's [`Tally`] (its delivery opaque).
struct Deliveries;

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = Arc<Tally>;

    fn delivery(&self, result: &DeliveryResult<'_>, tally: Arc<Tally>) {
        if let Err((e, m)) = result {
            tally.failed.fetch_add(1, Ordering::AcqRel);
            tracing::warn!(topic = m.topic(), error = %e, "a repartition record was not delivered");
        }
        if tally.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            tally.drained.notify_waiters();
        }
    }
}

impl RepartitionSink {
    pub fn new(
        target: RepartitionTarget,
        producer: Arc<ShuffleProducer>,
        bytes: weir_runtime::metrics::Counter,
    ) -> Result<Self> {
        let router = KeyRouter::try_new(target.keys.clone(), target.partitions)?;
        Ok(Self {
            target,
            producer,
            tally: Arc::default(),
            router,
            generation: new_generation(),
            epoch: 1,
            watermark: None,
            pending: VecDeque::new(),
            last: None,
            bytes,
        })
    }

    /// Sends one record to partition `partition`, waiting while the producer's queue is full.
    async fn send(&mut self, partition: usize, value: Vec<u8>) -> Result<()> {
        self.bytes.inc_by(value.len() as u64);
        let partition = i32::try_from(partition).unwrap_or(i32::MAX);
        loop {
            let record =
                BaseRecord::<(), _, _>::with_opaque_to(&self.target.topic, self.tally.clone())
                    .partition(partition)
                    .payload(&value);
            self.tally.in_flight.fetch_add(1, Ordering::AcqRel);
            let Err((e, _)) = self.producer.producer.send(record) else {
                return Ok(());
            };
            self.tally.in_flight.fetch_sub(1, Ordering::AcqRel);
            match e {
                KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) => {
                    tokio::time::sleep(Duration::from_millis(5)).await
                }
                e => {
                    return Err(super::kafka_error(
                        &format!("cannot write to {}", self.target.topic),
                        e,
                    ));
                }
            }
        }
    }

    /// Waits until the broker has every record this writer sent; fails if any was lost.
    async fn flush(&mut self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + DELIVERY_TIMEOUT;
        loop {
            let drained = self.tally.drained.notified();
            tokio::pin!(drained);
            // Registered before the count is read: a delivery in between still wakes it.
            drained.as_mut().enable();
            if self.tally.in_flight.load(Ordering::Acquire) == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, drained).await.is_err() {
                return Err(Error::external(
                    weir_runtime::error::External::Connection,
                    format!(
                        "repartition writer: {} records to {} not acknowledged in {DELIVERY_TIMEOUT:?}",
                        self.tally.in_flight.load(Ordering::Acquire),
                        self.target.topic
                    ),
                ));
            }
        }
        let failed = self.tally.failed.swap(0, Ordering::AcqRel);
        if failed > 0 {
            return Err(Error::external(
                weir_runtime::error::External::Connection,
                format!(
                    "repartition writer: {failed} records were not delivered to {}",
                    self.target.topic
                ),
            ));
        }
        Ok(())
    }

    /// Sends `state`'s marker to every repartition partition.
    async fn mark(&mut self, state: WriterState) -> Result<()> {
        let Some(watermark) = state.watermark else {
            // No watermark yet: readers keep waiting for this writer, as they should.
            return Ok(());
        };
        let marker = Marker {
            writer: self.target.writer,
            writers: self.target.writers,
            generation: state.generation,
            epoch: state.epoch,
            watermark,
        };
        let mut value = vec![MARKER];
        serde_json::to_writer(&mut value, &marker)
            .map_err(|e| Error::Internal(format!("cannot encode a marker: {e}")))?;
        for partition in 0..self.target.partitions {
            self.send(partition, value.clone()).await?;
        }
        Ok(())
    }
}

/// A writer's generation: random, so that two tasks that ever wrote for one source
/// partition differ.
fn new_generation() -> u64 {
    use rand::{Rng, SeedableRng};
    rand::rngs::SmallRng::from_os_rng().random()
}

#[async_trait]
impl Sink for RepartitionSink {
    async fn write(&mut self, batch: RecordBatch) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        for (partition, part) in self.router.route(batch)? {
            let mut value = Vec::with_capacity(HEADER + part.get_array_memory_size());
            value.push(DATA);
            value.extend_from_slice(&self.target.writer.to_be_bytes());
            value.extend_from_slice(&self.generation.to_be_bytes());
            value.extend_from_slice(&self.epoch.to_be_bytes());
            let mut writer = StreamWriter::try_new(&mut value, &part.schema())?;
            writer.write(&part)?;
            writer.finish()?;
            drop(writer);
            self.send(partition, value).await?;
        }
        Ok(())
    }

    async fn on_watermark(&mut self, watermark: Watermark) -> Result<()> {
        self.watermark = Some(watermark.0);
        Ok(())
    }

    async fn pre_commit(&mut self, barrier: CheckpointBarrier) -> Result<()> {
        if let Err(e) = self.flush().await {
            barrier.fail();
            return Err(e);
        }
        self.pending.push_back((barrier.epoch, self.watermark));
        self.last = Some(WriterState {
            generation: self.generation,
            epoch: barrier.epoch,
            watermark: self.watermark,
        });
        self.epoch = barrier.epoch + 1;
        barrier.ack();
        Ok(())
    }

    fn snapshot(&mut self) -> Result<Option<Snapshot>> {
        let Some(state) = self.last else {
            return Ok(None);
        };
        let meta = serde_json::to_value(state).map_err(|e| Error::Internal(e.to_string()))?;
        Ok(Some(Snapshot::meta(meta)))
    }

    /// The checkpoint's epoch is committed: the writer that saved it may have died before
    /// its markers went out, so they go again (readers ignore a marker twice).
    async fn restore(&mut self, snapshot: Snapshot) -> Result<()> {
        let state: WriterState = serde_json::from_value(snapshot.meta).map_err(|e| {
            Error::Execution(format!("repartition writer state is unreadable: {e}"))
        })?;
        self.mark(state).await?;
        self.flush().await?;
        self.epoch = state.epoch + 1;
        self.watermark = state.watermark;
        Ok(())
    }

    /// Epochs up to `epoch` are in the store: their markers go out (the last one's covers
    /// the others: a reader takes every epoch up to a marker's).
    async fn commit(&mut self, epoch: u64) -> Result<()> {
        let mut committed = None;
        while let Some(&(e, watermark)) = self.pending.front()
            && e <= epoch
        {
            committed = Some(WriterState {
                generation: self.generation,
                epoch: e,
                watermark,
            });
            self.pending.pop_front();
        }
        match committed {
            Some(state) => self.mark(state).await,
            None => Ok(()),
        }
    }

    async fn finish(&mut self) -> Result<()> {
        self.flush().await
    }
}

/// What a downstream task saved: where to read again, and each upstream writer's last
/// marker.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct ReaderPosition {
    /// The offset of the oldest record held back, or the next to read.
    offset: Option<i64>,
    writers: BTreeMap<i32, WriterMark>,
    /// How many writers there are (from their markers).
    expected: usize,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
struct WriterMark {
    /// The last epoch committed, and by which generation.
    generation: u64,
    epoch: u64,
    /// The last marker's watermark (`i64::MAX`: idle).
    watermark: i64,
    /// The highest watermark that was not idle.
    real: Option<i64>,
}

/// Records held back until their writer's marker: (offset, writer, generation, epoch, rows).
type Held = VecDeque<(i64, i32, u64, u64, Vec<RecordBatch>)>;

impl ReaderPosition {
    /// Takes `marker`: `Some` with the records it releases from `held` (in order), and
    /// drops those it shows will never be committed; `None` for a marker already seen.
    fn mark(&mut self, marker: Marker, held: &mut Held) -> Option<Vec<RecordBatch>> {
        self.expected = self.expected.max(marker.writers);
        let writer = self.writers.entry(marker.writer).or_default();
        if marker.epoch <= writer.epoch && writer.epoch > 0 {
            return None;
        }
        writer.generation = marker.generation;
        writer.epoch = marker.epoch;
        writer.watermark = marker.watermark;
        if marker.watermark != i64::MAX {
            writer.real = Some(
                writer
                    .real
                    .map_or(marker.watermark, |r| r.max(marker.watermark)),
            );
        }
        let mut released = Vec::new();
        held.retain_mut(|(_, w, g, e, rows)| {
            if *w != marker.writer || *e > marker.epoch {
                return true;
            }
            if *g == marker.generation {
                released.append(rows);
            }
            false
        });
        Some(released)
    }

    /// Whether a record of `writer`'s `epoch` belongs to an epoch already committed.
    fn replayed(&self, writer: i32, epoch: u64) -> bool {
        self.writers
            .get(&writer)
            .is_some_and(|w| w.epoch > 0 && epoch <= w.epoch)
    }

    /// Why the watermark stands where it does while some writer is ahead of it, or while
    /// some writer has sent no marker; `None` when nothing holds it back.
    fn holdup(&self) -> Option<String> {
        if self.expected == 0 {
            return None;
        }
        if self.writers.len() < self.expected {
            let missing: Vec<i32> = (0..i32::try_from(self.expected).unwrap_or(i32::MAX))
                .filter(|w| !self.writers.contains_key(w))
                .collect();
            return Some(format!(
                "no marker yet from writers {missing:?} of {}",
                self.expected
            ));
        }
        let current = self.watermark()?;
        let ahead = self.writers.values().filter_map(|w| w.real).max()?;
        if ahead <= current {
            return None;
        }
        let slow: Vec<String> = self
            .writers
            .iter()
            .filter(|(_, w)| w.watermark == current)
            .map(|(id, w)| format!("{id} (generation {:x}, epoch {})", w.generation, w.epoch))
            .collect();
        Some(format!(
            "held at {current} by writers {} while another reached {ahead}",
            slow.join(", ")
        ))
    }

    /// The minimum over writers that are not idle once every writer has been heard from;
    /// when all are idle, the highest watermark any of them reached.
    fn watermark(&self) -> Option<i64> {
        if self.expected == 0 || self.writers.len() < self.expected {
            return None;
        }
        let active = self
            .writers
            .values()
            .filter(|w| w.watermark != i64::MAX)
            .map(|w| w.watermark)
            .min();
        active.or_else(|| self.writers.values().filter_map(|w| w.real).max())
    }
}

/// How long a reader's watermark stands still, while a writer is ahead of it, before it
/// logs which writers hold it (and again as often while it stays).
const STALL_LOG: Duration = Duration::from_secs(30);

/// Reads one partition of a repartition topic (see the module's docs).
pub struct RepartitionSource {
    /// The process's consumer of the topic, shared by its readers.
    consumer: Arc<ShuffleConsumer>,
    topic: String,
    partition: i32,
    schema: SchemaRef,
    resume: ReaderPosition,
}

/// The consumer a process's readers of a repartition topic share.
pub type ShuffleConsumer = SharedConsumer<DefaultConsumerContext>;

/// The consumer for a process's readers of repartition topic `topic`.
pub fn shuffle_consumer(client: &ClientSettings, topic: &str) -> Result<ShuffleConsumer> {
    let consumer: BaseConsumer = client
        .config(&[
            ("group.id", "weir-repartition-reader"),
            ("enable.auto.commit", "false"),
            ("enable.partition.eof", "false"),
            // Records deleted before they were read (retention, or a broker's size
            // limit) are an error, never skipped: they are the shuffle's data.
            ("auto.offset.reset", "error"),
            // A fetch that finds nothing waits this long for data. Kafka answers it as soon
            // as data arrives; tansu and the mock cluster wait it out, so with librdkafka's
            // 500 ms every hop of a marker through the shuffle could take that long.
            ("fetch.wait.max.ms", "50"),
        ])
        .create()
        .map_err(|e| super::kafka_error("cannot create the repartition reader", e))?;
    SharedConsumer::new(consumer, topic, "repartition reader")
}

impl RepartitionSource {
    /// A reader of `topic`'s partition `partition`, whose rows have `schema`.
    /// A reader taking its partition's queue of the process's `consumer` of the topic.
    pub fn new(consumer: Arc<ShuffleConsumer>, partition: i32, schema: SchemaRef) -> Self {
        Self {
            topic: consumer.topic().to_string(),
            consumer,
            partition,
            schema,
            resume: ReaderPosition::default(),
        }
    }

    /// A data record's writer, generation, epoch and rows.
    fn decode(&self, value: &[u8]) -> Result<(i32, u64, u64, Vec<RecordBatch>)> {
        let unreadable = || Error::Execution(format!("a record of {} is unreadable", self.topic));
        let header = value.get(1..HEADER).ok_or_else(unreadable)?;
        let writer = i32::from_be_bytes(header[0..4].try_into().map_err(|_| unreadable())?);
        let generation = u64::from_be_bytes(header[4..12].try_into().map_err(|_| unreadable())?);
        let epoch = u64::from_be_bytes(header[12..20].try_into().map_err(|_| unreadable())?);
        let reader = StreamReader::try_new(std::io::Cursor::new(&value[HEADER..]), None)?;
        let mut batches = Vec::new();
        for batch in reader {
            let batch = batch?;
            if batch.num_columns() != self.schema.fields().len() {
                return Err(Error::Execution(format!(
                    "a record of {} has {} columns where the query expects {}",
                    self.topic,
                    batch.num_columns(),
                    self.schema.fields().len()
                )));
            }
            batches.push(RecordBatch::try_new(
                self.schema.clone(),
                batch.columns().to_vec(),
            )?);
        }
        Ok((writer, generation, epoch, batches))
    }

    /// Starts the reading thread: it sends `(offset, value)` of each record.
    fn spawn_consumer(
        &self,
        tx: mpsc::Sender<(i64, Vec<u8>)>,
        stop: Arc<AtomicBool>,
    ) -> Result<std::thread::JoinHandle<Result<()>>> {
        let offset = self.resume.offset.map_or(Offset::Beginning, Offset::Offset);
        let (topic, partition) = (self.topic.clone(), self.partition);
        let consumer = self.consumer.clone();
        std::thread::Builder::new()
            .name(format!("repartition-{partition}"))
            .spawn(move || {
                // Here, not on the runtime: it waits for a reader before this one to let
                // the partition go.
                let reader = consumer.attach(partition, offset)?;
                while !stop.load(Ordering::Acquire) {
                    match reader.queue.poll(Duration::from_millis(100)) {
                        None => {}
                        Some(Ok(m)) => {
                            let value = m.payload().unwrap_or_default().to_vec();
                            if tx.blocking_send((m.offset(), value)).is_err() {
                                break;
                            }
                        }
                        Some(Err(KafkaError::MessageConsumption(
                            RDKafkaErrorCode::AutoOffsetReset,
                        ))) => {
                            return Err(Error::Execution(format!(
                                "records of {topic} [{partition}] were deleted before this reader read them (the topic's retention, or the broker's size limit): the shuffle cannot go on without losing them"
                            )));
                        }
                        Some(Err(e)) => {
                            tracing::warn!(topic = %topic, error = %e, "repartition reader");
                        }
                    }
                }
                Ok(())
            })
            .map_err(|e| Error::Internal(format!("cannot start the repartition reader: {e}")))
    }
}

#[async_trait]
impl Source for RepartitionSource {
    async fn run(&mut self, ctx: &mut SourceContext) -> Result<SourceExit> {
        let (tx, mut rx) = mpsc::channel(8);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = self.spawn_consumer(tx, stop.clone())?;
        let _stop_thread = StopOnDrop(stop);
        let mut position = self.resume.clone();
        let mut next = position.offset;
        let mut held: Held = VecDeque::new();
        let mut emitted = position.watermark();
        let mut checkpoints = ctx.take_checkpoints();
        let stopping = ctx.stopping_token();
        // When the watermark last moved, and when a stall was last logged.
        let mut moved = std::time::Instant::now();
        let mut logged = moved;
        loop {
            tokio::select! {
                biased;
                () = stopping.cancelled() => return Ok(SourceExit::Stopped),
                Some(barrier) = next_barrier(&mut checkpoints) => {
                    if moved.elapsed() >= STALL_LOG && logged.elapsed() >= STALL_LOG {
                        logged = std::time::Instant::now();
                        if let Some(why) = position.holdup() {
                            tracing::info!(topic = %self.topic, partition = self.partition,
                                held = held.len(), "the shuffle's watermark has not moved for {:?}: {why}",
                                moved.elapsed());
                        }
                    }
                    position.offset = held.front().map(|h| h.0).or(next);
                    let snapshot = Snapshot::meta(serde_json::to_value(&position)
                        .map_err(|e| Error::Internal(e.to_string()))?);
                    if !ctx.emit_barrier(barrier, snapshot).await {
                        return Ok(SourceExit::Stopped);
                    }
                }
                record = rx.recv() => {
                    let Some((offset, value)) = record else {
                        return match tokio::task::spawn_blocking(move || thread.join()).await {
                            Ok(Ok(Err(e))) => Err(e),
                            _ => Err(Error::Internal(format!("the reader of {} ended", self.topic))),
                        };
                    };
                    next = Some(offset + 1);
                    let released = match value.first() {
                        Some(&DATA) => {
                            let (writer, generation, epoch, rows) = self.decode(&value)?;
                            if !position.replayed(writer, epoch) {
                                held.push_back((offset, writer, generation, epoch, rows));
                            }
                            continue;
                        }
                        Some(&MARKER) => {
                            let marker: Marker = serde_json::from_slice(&value[1..]).map_err(|e| {
                                Error::Execution(format!("a marker in {} is unreadable: {e}", self.topic))
                            })?;
                            match position.mark(marker, &mut held) {
                                Some(released) => released,
                                None => continue,
                            }
                        }
                        _ => {
                            return Err(Error::Execution(format!(
                                "record {offset} of {} is not Weir's", self.topic
                            )));
                        }
                    };
                    for batch in released {
                        if !ctx.emit(Message::Data(batch)).await {
                            return Ok(SourceExit::Stopped);
                        }
                    }
                    if let Some(w) = position.watermark()
                        && emitted.is_none_or(|e| w > e)
                    {
                        emitted = Some(w);
                        moved = std::time::Instant::now();
                        ctx.metrics.watermark_ms().set(w);
                        if !ctx.emit(Message::Watermark(Watermark(w))).await {
                            return Ok(SourceExit::Stopped);
                        }
                    }
                }
            }
        }
    }

    async fn restore(&mut self, position: Snapshot) -> Result<()> {
        self.resume = serde_json::from_value(position.meta).map_err(|e| {
            Error::Execution(format!(
                "repartition position in the checkpoint is unreadable: {e}"
            ))
        })?;
        Ok(())
    }
}

/// The next barrier the coordinator asks for (never, without checkpoints).
async fn next_barrier(
    checkpoints: &mut Option<weir_runtime::coordinator::SourceCheckpoints>,
) -> Option<CheckpointBarrier> {
    match checkpoints {
        Some(c) => c.barriers.recv().await,
        None => std::future::pending().await,
    }
}

struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use arrow::array::{Array, Int64Array};
    use arrow::datatypes::{DataType, Field, Schema};
    use datafusion::physical_expr::expressions::col;
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::DefaultProducerContext;
    use weir_runtime::CancellationToken;
    use weir_runtime::metrics::SourceMetrics;

    use super::*;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![Field::new("k", DataType::Int64, false)]))
    }

    fn rows(keys: std::ops::Range<i64>) -> RecordBatch {
        RecordBatch::try_new(schema(), vec![Arc::new(Int64Array::from_iter_values(keys))])
            .expect("batch")
    }

    fn client(bootstrap: &str) -> ClientSettings {
        ClientSettings {
            bootstrap: bootstrap.to_string(),
            properties: Vec::new(),
        }
    }

    fn writer(producer: &Arc<ShuffleProducer>, bootstrap: &str, writer: i32) -> RepartitionSink {
        RepartitionSink::new(
            RepartitionTarget {
                client: client(bootstrap),
                topic: "rep".into(),
                partitions: 2,
                keys: vec![col("k", &schema()).expect("k")],
                writer,
                writers: 2,
            },
            producer.clone(),
            weir_runtime::metrics::Counter::default(),
        )
        .expect("sink")
    }

    /// Writes `keys` with `watermark` as epoch `epoch`, and pre-commits it: its snapshot.
    async fn epoch(
        sink: &mut RepartitionSink,
        epoch: u64,
        keys: std::ops::Range<i64>,
        watermark: i64,
    ) -> Snapshot {
        sink.write(rows(keys)).await.expect("write");
        sink.on_watermark(Watermark(watermark))
            .await
            .expect("watermark");
        let (tx, done) = std::sync::mpsc::channel();
        sink.pre_commit(CheckpointBarrier::tracked(epoch, tx))
            .await
            .expect("pre-commit");
        assert!(
            done.recv().expect("outcome").durable,
            "the barrier is acknowledged"
        );
        sink.snapshot()
            .expect("snapshot")
            .expect("a writer's state")
    }

    fn keys(batch: &RecordBatch) -> impl Iterator<Item = i64> + '_ {
        batch
            .column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .expect("k")
            .values()
            .iter()
            .copied()
    }

    /// Reads partition `partition` until watermark `watermark` has come, and for half a
    /// second more: the keys released.
    async fn read(bootstrap: &str, partition: i32, watermark: i64) -> Vec<i64> {
        read_from(reader(bootstrap, partition), watermark).await
    }

    /// A reader of `partition` of topic `rep` with a consumer of its own.
    fn reader(bootstrap: &str, partition: i32) -> RepartitionSource {
        let consumer = shuffle_consumer(&client(bootstrap), "rep").expect("consumer");
        RepartitionSource::new(Arc::new(consumer), partition, schema())
    }

    /// A mock cluster with the two-partition topic `rep`, its address, and the producer
    /// a process's writers share.
    fn shuffle() -> (
        MockCluster<'static, DefaultProducerContext>,
        String,
        Arc<ShuffleProducer>,
    ) {
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster.create_topic("rep", 2, 1).expect("topic");
        let bootstrap = cluster.bootstrap_servers();
        let producer = Arc::new(ShuffleProducer::new(&client(&bootstrap)).expect("producer"));
        (cluster, bootstrap, producer)
    }

    /// What `source` releases until watermark `watermark` has come, and for half a second
    /// more.
    async fn read_from(mut source: RepartitionSource, watermark: i64) -> Vec<i64> {
        let partition = source.partition;
        let (tx, mut rx) = mpsc::channel(16);
        let stop = CancellationToken::new();
        let mut ctx = SourceContext::new(tx, stop.clone(), SourceMetrics::detached());
        let task = tokio::spawn(async move { source.run(&mut ctx).await });
        let mut out = Vec::new();
        let mut mark = None;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while mark != Some(watermark) {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(Message::Data(b))) => out.extend(keys(&b)),
                Ok(Some(Message::Watermark(w))) => mark = Some(w.0),
                Ok(Some(_)) => {}
                Ok(None) => panic!("partition {partition}: the reader ended: {:?}", task.await),
                Err(_) => panic!(
                    "partition {partition}: {} rows, watermark {mark:?}",
                    out.len()
                ),
            }
        }
        while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
            if let Message::Data(b) = m {
                out.extend(keys(&b));
            }
        }
        stop.cancel();
        let _ = task.await;
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn readers_get_committed_epochs_once_and_nothing_a_dead_writer_did_not_commit() {
        // One producer for every writer, as in a process: each waits for its own records.
        let (_cluster, bootstrap, producer) = shuffle();

        // Writer 0 commits epoch 1 (keys 0..100)...
        let mut zero = writer(&producer, &bootstrap, 0);
        let saved = epoch(&mut zero, 1, 0..100, 100).await;
        zero.commit(1).await.expect("commit");
        // ...writes epoch 2 (keys 1000..1050) and dies before its checkpoint is stored.
        epoch(&mut zero, 2, 1000..1050, 120).await;
        zero.finish().await.expect("flush");
        drop(zero);
        // Its successor restores epoch 1 (sending its markers again) and replays the
        // source from there as epoch 2 (keys 2000..2010).
        let mut again = writer(&producer, &bootstrap, 0);
        again.restore(saved).await.expect("restore");
        epoch(&mut again, 2, 2000..2010, 150).await;
        again.commit(2).await.expect("commit");
        again.finish().await.expect("flush");
        // Writer 1 has no rows and an earlier watermark.
        let mut one = writer(&producer, &bootstrap, 1);
        one.on_watermark(Watermark(80)).await.expect("watermark");
        let (tx, _done) = std::sync::mpsc::channel();
        one.pre_commit(CheckpointBarrier::tracked(1, tx))
            .await
            .expect("pre-commit");
        one.commit(1).await.expect("commit");
        one.finish().await.expect("flush");

        let mut got = read(&bootstrap, 0, 80).await;
        assert!(!got.is_empty(), "each partition gets some of the keys");
        got.extend(read(&bootstrap, 1, 80).await);
        got.sort_unstable();
        let expected: Vec<i64> = (0..100).chain(2000..2010).collect();
        assert_eq!(
            got, expected,
            "committed epochs once; not the dead writer's epoch 2"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn readers_sharing_one_consumer_each_get_their_partition_and_again_after_a_restart() {
        let (_cluster, bootstrap, producer) = shuffle();
        for w in 0..2 {
            let mut sink = writer(&producer, &bootstrap, w);
            let first = i64::from(w) * 1000;
            epoch(&mut sink, 1, first..first + 200, 50).await;
            sink.commit(1).await.expect("commit");
            sink.finish().await.expect("flush");
        }
        let shared = Arc::new(shuffle_consumer(&client(&bootstrap), "rep").expect("consumer"));
        let reader = |p| RepartitionSource::new(shared.clone(), p, schema());
        let (zero, one) = tokio::join!(read_from(reader(0), 50), read_from(reader(1), 50));
        assert!(
            !zero.is_empty() && !one.is_empty(),
            "each partition has keys"
        );
        let mut got: Vec<i64> = zero.iter().chain(&one).copied().collect();
        got.sort_unstable();
        let expected: Vec<i64> = (0..200).chain(1000..1200).collect();
        assert_eq!(got, expected, "every key once, over the two partitions");
        // A reader of partition 0 started again (as after its instance restarts here)
        // reads it again from the start.
        assert_eq!(read_from(reader(0), 50).await, zero);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reader_whose_next_records_were_deleted_fails_instead_of_skipping_them() {
        let (_cluster, bootstrap, producer) = shuffle();
        // More than the mock broker keeps per partition (5 MB), in keys that do not
        // compress: its first records go.
        let mut zero = writer(&producer, &bootstrap, 0);
        let mut state = 42u64;
        let random: Vec<i64> = (0..2_000_000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as i64
            })
            .collect();
        for (e, chunk) in (1..).zip(random.chunks(100_000)) {
            let batch =
                RecordBatch::try_new(schema(), vec![Arc::new(Int64Array::from(chunk.to_vec()))])
                    .expect("batch");
            zero.write(batch).await.expect("write");
            let (tx, _done) = std::sync::mpsc::channel();
            zero.pre_commit(CheckpointBarrier::tracked(e, tx))
                .await
                .expect("pre-commit");
        }
        zero.finish().await.expect("flush");

        // A reader restored at offset 0, as after a long stop.
        let mut source = reader(&bootstrap, 0);
        let position = ReaderPosition {
            offset: Some(0),
            ..ReaderPosition::default()
        };
        source
            .restore(Snapshot::meta(
                serde_json::to_value(&position).expect("position"),
            ))
            .await
            .expect("restore");
        let (tx, _rx) = mpsc::channel(16);
        let mut ctx = SourceContext::new(tx, CancellationToken::new(), SourceMetrics::detached());
        let ended = tokio::time::timeout(Duration::from_secs(30), source.run(&mut ctx))
            .await
            .expect("the reader ends");
        let error = ended.expect_err("deleted records are an error").to_string();
        assert!(
            error.contains("were deleted before this reader read them"),
            "{error}"
        );
    }

    fn marker(writer: i32, generation: u64, epoch: u64, watermark: i64) -> Marker {
        Marker {
            writer,
            writers: 2,
            generation,
            epoch,
            watermark,
        }
    }

    #[test]
    fn the_watermark_waits_for_every_writer_and_skips_idle_ones() {
        let mut position = ReaderPosition::default();
        let mut held = Held::new();
        position.mark(marker(0, 7, 1, 100), &mut held);
        assert_eq!(position.watermark(), None, "writer 1 not heard from yet");
        position.mark(marker(1, 7, 1, 50), &mut held);
        assert_eq!(position.watermark(), Some(50));
        position.mark(marker(1, 7, 2, i64::MAX), &mut held);
        assert_eq!(
            position.watermark(),
            Some(100),
            "an idle writer holds nothing back"
        );
        position.mark(marker(0, 7, 2, i64::MAX), &mut held);
        assert_eq!(
            position.watermark(),
            Some(100),
            "all idle: the highest real one"
        );
        position.mark(marker(1, 7, 3, 70), &mut held);
        assert_eq!(position.watermark(), Some(70), "back from idle");
        assert_eq!(
            position.mark(marker(1, 7, 3, 70), &mut held),
            None,
            "seen already"
        );
    }

    #[test]
    fn a_marker_releases_its_generations_epochs_and_drops_other_generations() {
        let mut position = ReaderPosition::default();
        let mut held = Held::new();
        for (offset, generation, epoch, key) in
            [(0, 1, 1, 10), (1, 1, 2, 20), (2, 2, 2, 30), (3, 2, 3, 40)]
        {
            held.push_back((offset, 0, generation, epoch, vec![rows(key..key + 1)]));
        }
        held.push_back((4, 1, 9, 1, vec![rows(50..51)]));
        let released = position.mark(marker(0, 2, 2, 5), &mut held).expect("new");
        let released: Vec<i64> = released.iter().flat_map(keys).collect();
        assert_eq!(
            released,
            [30],
            "generation 2's epochs up to 2; generation 1's dropped"
        );
        let left: Vec<(i64, i32)> = held.iter().map(|h| (h.0, h.1)).collect();
        assert_eq!(
            left,
            [(3, 0), (4, 1)],
            "a later epoch and another writer wait"
        );
        assert!(position.replayed(0, 2) && !position.replayed(0, 3));
    }
}
