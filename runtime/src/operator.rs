//! The traits every operator, source and sink implements.

use std::time::Duration;

use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::checkpoint::Snapshot;
use crate::coordinator::SourceCheckpoints;
use crate::error::Result;
use crate::message::{CheckpointBarrier, Message, Watermark};
use crate::metrics::SourceMetrics;

/// A step of a pipeline. Only [`Operator::process_batch`] is required: watermarks, barriers
/// and end-of-input are forwarded unchanged by default, so a stateless operator is a page.
pub trait Operator: Send {
    /// A short name for metrics and EXPLAIN, e.g. `filter`.
    fn name(&self) -> &'static str;

    /// Processes one batch, pushing any output onto `out`.
    fn process_batch(&mut self, batch: RecordBatch, out: &mut Vec<Message>) -> Result<()>;

    fn on_watermark(&mut self, watermark: Watermark, out: &mut Vec<Message>) -> Result<()> {
        out.push(Message::Watermark(watermark));
        Ok(())
    }

    /// Forwards a checkpoint barrier. The runner has already saved [`Operator::snapshot`]
    /// into it; an operator only overrides this to emit something before the barrier.
    fn on_barrier(&mut self, barrier: CheckpointBarrier, out: &mut Vec<Message>) -> Result<()> {
        out.push(Message::Barrier(barrier));
        Ok(())
    }

    /// The state a checkpoint must hold to resume this operator exactly where it is (open
    /// windows, watermark, counters), or `None` for a stateless operator. Called at each
    /// barrier, after every record before it; the operator goes on as if nothing happened.
    fn snapshot(&mut self) -> Result<Option<Snapshot>> {
        Ok(None)
    }

    /// Takes back a state [`Operator::snapshot`] saved (by an operator of the same plan),
    /// before any input.
    fn restore(&mut self, _snapshot: Snapshot) -> Result<()> {
        Err(crate::Error::Internal(format!(
            "operator {} has no state to restore",
            self.name()
        )))
    }

    /// The checkpoint `epoch` is complete.
    fn on_commit(&mut self, _epoch: u64) -> Result<()> {
        Ok(())
    }

    /// The input has ended: emit what is left. `End` itself is forwarded by the runner.
    fn on_end(&mut self, _out: &mut Vec<Message>) -> Result<()> {
        Ok(())
    }

    /// How often [`Operator::on_tick`] should be called, if at all (processing-time windows
    /// close on the wall clock, whether or not records arrive).
    fn tick_interval(&self) -> Option<Duration> {
        None
    }

    fn on_tick(&mut self, _out: &mut Vec<Message>) -> Result<()> {
        Ok(())
    }

    /// What a stateful operator holds, for metrics; read after each watermark and at the end.
    fn state_report(&self) -> Option<StateReport> {
        None
    }
}

/// What an [`AsyncOperator`] hands back for one batch: a future of its output, which may wait
/// on I/O (a lookup in an external table). It owns what it needs (`'static`), so that several
/// batches can be in flight at once.
pub type BatchFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Option<RecordBatch>>> + Send>>;

/// A step of a pipeline that waits on I/O per batch without blocking the others: it runs on
/// a task of its own, with up to [`AsyncOperator::max_in_flight`] batches in flight, and
/// emits their outputs in input order. Watermarks, barriers and the end keep their place in
/// that order (each waits for the batches before it), so the stage is transparent to time
/// and to checkpoints. When the limit is reached it stops reading its input, and the wait
/// reaches the source like any slow consumer.
pub trait AsyncOperator: Send {
    /// A short name for metrics and EXPLAIN, e.g. `lookup_join`.
    fn name(&self) -> &'static str;

    /// Batches that may be in flight at once (at least 1).
    fn max_in_flight(&self) -> usize;

    /// Starts one batch. Work that needs no waiting (evaluating expressions) is done here;
    /// the future does the rest. An error drops the batch (counted and logged), like an
    /// [`Operator`]'s.
    fn process_batch(&mut self, batch: RecordBatch) -> Result<BatchFuture>;
}

/// One step of a pipeline's chain, as the runner schedules it: synchronous operators run
/// together on one task; each asynchronous one gets a task of its own.
pub enum Stage {
    Sync(Box<dyn Operator>),
    Async(Box<dyn AsyncOperator>),
}

impl Stage {
    pub fn name(&self) -> &'static str {
        match self {
            Stage::Sync(op) => op.name(),
            Stage::Async(op) => op.name(),
        }
    }
}

impl std::fmt::Debug for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Stage({})", self.name())
    }
}

/// The state of a stateful operator (a window aggregation), as exported to `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StateReport {
    pub open_windows: usize,
    /// Groups held: keys per pane, summed over panes.
    pub keys: usize,
    /// Estimated bytes of the state.
    pub bytes: usize,
    /// Records dropped so far because their window had closed.
    pub late_dropped: u64,
    /// Event time from the end of the last window emitted to the watermark that emitted it.
    pub emit_lag_ms: Option<i64>,
}

/// How a source's `run` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceExit {
    /// A bounded input was read to its end.
    Finished,
    /// The pipeline was asked to stop (or nothing consumes the output any more).
    Stopped,
}

/// What a source writes to, and how it learns to stop.
pub struct SourceContext {
    out: mpsc::Sender<Message>,
    shutdown: CancellationToken,
    /// Counters for this source, labelled with its pipeline.
    pub metrics: SourceMetrics,
    event_time: Option<EventTimeTracker>,
    /// The job's barrier requests, if it checkpoints (and the source has not taken them).
    checkpoints: Option<SourceCheckpoints>,
    /// The source's participant id in checkpoints: `<pipeline>/source`.
    id: String,
    pipeline: String,
    instance_id: Option<String>,
    worker: crate::pipeline::Worker,
}

/// The watermark of a source that reads in event-time order per batch (a file, datagen):
/// the highest event time seen minus the delay.
struct EventTimeTracker {
    column: usize,
    delay_ms: i64,
    watermark: Option<i64>,
}

impl EventTimeTracker {
    /// The new watermark, if `batch` advances it.
    fn observe(&mut self, batch: &RecordBatch) -> Option<Watermark> {
        let column = batch.columns().get(self.column)?;
        let millis = arrow::compute::cast(
            column,
            &arrow::datatypes::DataType::Timestamp(arrow::datatypes::TimeUnit::Millisecond, None),
        )
        .ok()?;
        let millis = millis
            .as_any()
            .downcast_ref::<arrow::array::TimestampMillisecondArray>()?;
        let mark = arrow::compute::max(millis)?.saturating_sub(self.delay_ms);
        if self.watermark.is_some_and(|w| mark <= w) {
            return None;
        }
        self.watermark = Some(mark);
        Some(Watermark(mark))
    }
}

impl SourceContext {
    pub fn new(
        out: mpsc::Sender<Message>,
        shutdown: CancellationToken,
        metrics: SourceMetrics,
    ) -> Self {
        Self {
            out,
            shutdown,
            metrics,
            event_time: None,
            checkpoints: None,
            id: "source".to_string(),
            pipeline: String::new(),
            instance_id: None,
            worker: crate::pipeline::Worker::ONLY,
        }
    }

    /// The source of pipeline `pipeline` (participant `<pipeline>/source` in checkpoints),
    /// with the job's barriers if it checkpoints, in the process whose stable id (kept in
    /// its data directory) is `instance_id`.
    pub fn for_pipeline(
        mut self,
        pipeline: &str,
        checkpoints: Option<SourceCheckpoints>,
        instance_id: Option<String>,
    ) -> Self {
        self.id = format!("{pipeline}/source");
        self.pipeline = pipeline.to_string();
        self.checkpoints = checkpoints;
        self.instance_id = instance_id;
        self
    }

    /// The source of worker `worker` of its pipeline: it saves its state as
    /// `<pipeline>/w<i>/source` when there are several, and reads its share of the input.
    pub fn for_worker(mut self, worker: crate::pipeline::Worker) -> Self {
        self.id = format!("{}/source", worker.participant(&self.pipeline));
        self.worker = worker;
        self
    }

    /// Which share of the input this source reads (a Kafka source: the partitions whose
    /// number modulo the count is its index).
    pub fn worker(&self) -> crate::pipeline::Worker {
        self.worker
    }

    /// The source's participant id in checkpoints.
    pub fn participant(&self) -> &str {
        &self.id
    }

    /// The pipeline this source feeds (empty outside a pipeline: tests, tools).
    pub fn pipeline(&self) -> &str {
        &self.pipeline
    }

    /// The process's stable id, if it has a data directory (Kafka static membership).
    pub fn instance_id(&self) -> Option<&str> {
        self.instance_id.as_deref()
    }

    /// The barrier the job's coordinator asked for, if one is waiting: inject it with
    /// [`SourceContext::emit_barrier`] between two batches.
    pub fn barrier_due(&mut self) -> Option<CheckpointBarrier> {
        self.checkpoints.as_mut()?.barriers.try_recv().ok()
    }

    /// Waits for the next barrier the coordinator asks for (forever, without one).
    pub async fn barrier_requested(&mut self) -> CheckpointBarrier {
        match self.checkpoints.as_mut() {
            Some(c) => match c.barriers.recv().await {
                Some(barrier) => barrier,
                None => std::future::pending().await,
            },
            None => std::future::pending().await,
        }
    }

    /// Saves `position` (where the source resumes from: everything emitted so far is
    /// before it) in `barrier` and sends it on. Returns `false` once the pipeline is
    /// stopping — after its last barrier, too: the source should then return
    /// [`SourceExit::Stopped`].
    pub async fn emit_barrier(&mut self, barrier: CheckpointBarrier, position: Snapshot) -> bool {
        let last = barrier.last;
        barrier.save(self.id.clone(), position);
        self.send(Message::Barrier(barrier)).await && !last
    }

    /// Hands over the barrier requests, to a source that injects barriers from a thread of
    /// its own (Kafka's consumer). It saves its state under [`SourceContext::participant`].
    pub fn take_checkpoints(&mut self) -> Option<SourceCheckpoints> {
        self.checkpoints.take()
    }

    /// After a bounded input's `End`: asks for the job's last barrier and injects it, with
    /// the source's state saying the input is finished (a restart then reads nothing).
    pub(crate) async fn last_checkpoint_after_end(&mut self) {
        let Some(checkpoints) = self.checkpoints.as_mut() else {
            return;
        };
        checkpoints.finished().await;
        loop {
            let barrier = tokio::select! {
                barrier = checkpoints.barriers.recv() => barrier,
                () = self.shutdown.cancelled() => None,
            };
            let Some(barrier) = barrier else { return };
            let last = barrier.last;
            barrier.save(
                self.id.clone(),
                Snapshot::meta(serde_json::json!({"finished": true})),
            );
            if self.out.send(Message::Barrier(barrier)).await.is_err() || last {
                return;
            }
        }
    }

    /// From now on, every batch emitted whose event times (column `column`) pass the
    /// watermark is followed by the new watermark: the highest event time seen minus
    /// `delay_ms`. For sources with one ordered input; Kafka tracks partitions itself.
    pub fn track_event_time(&mut self, column: usize, delay_ms: i64) {
        self.event_time = Some(EventTimeTracker {
            column,
            delay_ms,
            watermark: None,
        });
    }

    /// Sends a message downstream, waiting while the channel is full (back-pressure).
    /// Returns `false` once the pipeline is stopping: the source should return.
    pub async fn emit(&mut self, message: Message) -> bool {
        let mut watermark = None;
        if let Message::Data(batch) = &message {
            self.metrics.records_out.inc_by(batch.num_rows() as u64);
            watermark = self.event_time.as_mut().and_then(|t| t.observe(batch));
        }
        if !self.send(message).await {
            return false;
        }
        match watermark {
            Some(mark) => self.send(Message::Watermark(mark)).await,
            None => true,
        }
    }

    async fn send(&mut self, message: Message) -> bool {
        tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => false,
            sent = self.out.send(message) => sent.is_ok(),
        }
    }

    /// Sends a last message (a final barrier) while stopping, when [`SourceContext::emit`]
    /// no longer does. Returns `false` if nothing consumes the output any more.
    pub async fn emit_final(&mut self, message: Message) -> bool {
        self.out.send(message).await.is_ok()
    }

    /// Cancelled when the pipeline is asked to stop, for a source that waits on the stop
    /// while it borrows the context otherwise.
    pub fn stopping_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Resolves when the pipeline is asked to stop.
    pub async fn stopping(&self) {
        self.shutdown.cancelled().await;
    }

    /// Sleeps for `duration` unless the pipeline stops first; returns `false` if it stopped.
    pub async fn sleep(&self, duration: Duration) -> bool {
        tokio::select! {
            _ = self.shutdown.cancelled() => false,
            _ = self.out.closed() => false,
            _ = tokio::time::sleep(duration) => true,
        }
    }
}

/// Produces the messages of one stream (per pipeline that reads it).
#[async_trait]
pub trait Source: Send {
    /// Runs until a bounded input is exhausted or the context says stop. The runner sends
    /// [`Message::End`] afterwards.
    async fn run(&mut self, ctx: &mut SourceContext) -> Result<SourceExit>;

    /// Resumes from a position it saved in a checkpoint ([`SourceContext::emit_barrier`]),
    /// before `run`.
    async fn restore(&mut self, _position: Snapshot) -> Result<()> {
        Err(crate::Error::Internal(
            "this source keeps no position in checkpoints".into(),
        ))
    }

    /// Called once the source's last message has been sent: release connections.
    async fn close(&mut self) {}
}

/// Receives a pipeline's output. Two-phase (`pre_commit`, `commit`) so that later checkpoints
/// can publish output only for completed epochs.
#[async_trait]
pub trait Sink: Send {
    async fn write(&mut self, batch: RecordBatch) -> Result<()>;

    async fn on_watermark(&mut self, _watermark: Watermark) -> Result<()> {
        Ok(())
    }

    /// Everything written before `barrier` must become durable. A sink that writes
    /// synchronously acknowledges the barrier at once (the default); one that buffers (a
    /// Parquet file still open) keeps it until the rows are durable, then calls
    /// [`CheckpointBarrier::ack`], or [`CheckpointBarrier::fail`] if they never will be.
    /// Dropping it unacknowledged fails the epoch.
    async fn pre_commit(&mut self, barrier: CheckpointBarrier) -> Result<()> {
        barrier.ack();
        Ok(())
    }

    /// What a checkpoint must hold to resume this sink (files pre-committed but not yet
    /// published, a view's rows), read right after `pre_commit`.
    fn snapshot(&mut self) -> Result<Option<Snapshot>> {
        Ok(None)
    }

    /// Takes back what [`Sink::snapshot`] saved, before any input: publishes what the
    /// restored checkpoint pre-committed and discards what came after it.
    async fn restore(&mut self, _snapshot: Snapshot) -> Result<()> {
        Err(crate::Error::Internal(
            "this sink keeps no state in checkpoints".into(),
        ))
    }

    /// Every epoch up to `epoch` is complete (its checkpoint written): publish what was
    /// pre-committed for them. Called once per completed checkpoint, in order.
    async fn commit(&mut self, _epoch: u64) -> Result<()> {
        Ok(())
    }

    /// Whether a restore must be told that this sink had finished committing the restored
    /// checkpoint ([`Snapshot::committed`]). The pipeline then records each of its commits
    /// in the checkpoint store: one more write per checkpoint, so only a sink whose commit
    /// sends to a receiver that refuses repeats (Prometheus) asks for it.
    fn reads_commit_records(&self) -> bool {
        false
    }

    /// How often [`Sink::on_tick`] should be called, if at all (e.g. file rollover).
    fn tick_interval(&self) -> Option<Duration> {
        None
    }

    async fn on_tick(&mut self) -> Result<()> {
        Ok(())
    }

    /// The pipeline has stopped (after its last commit): release what the sink holds. Rows
    /// after the last committed epoch need not be made durable: a restart replays them.
    async fn finish(&mut self) -> Result<()>;
}
