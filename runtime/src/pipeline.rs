//! Running a pipeline: source task → operator chain task → [`Fanout`] → consumer tasks.
//!
//! Every arrow is a bounded channel of [`CHANNEL_CAPACITY`] messages, so a slow consumer
//! slows its producer down to the source (back-pressure) instead of buffering without limit.
//! A bounded input that ends sends [`Message::End`] (operators flush), then the job's last
//! checkpoint barrier, then [`Message::Stop`]; a stop sends the last barrier where the source
//! is, then `Stop`, so nothing partial is emitted. Tasks end on `Stop`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::CHANNEL_CAPACITY;
use crate::checkpoint::{CommitLog, Snapshot};
use crate::coordinator::SourceCheckpoints;
use crate::error::{Error, Result};
use crate::message::{CheckpointBarrier, Message};
use crate::metrics::{Metrics, OperatorMetrics, SinkMetrics, SourceMetrics};
use crate::operator::{AsyncOperator, Operator, Sink, Source, SourceContext, SourceExit, Stage};

/// Where a pipeline is in its life, as `SHOW QUERIES` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PipelineStatus {
    Running,
    /// A bounded input was fully processed.
    Finished,
    Stopped,
    Failed(Failure),
}

/// Why a pipeline failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub cause: String,
    /// The cause is outside Weir (a broker, a receiver, a database, an object store): it
    /// may pass, so the pipeline is worth restarting.
    pub external: bool,
}

impl Failure {
    /// The failure an error stands for; only [`Error::External`] is external.
    pub fn of(error: &Error) -> Self {
        Self {
            cause: error.to_string(),
            external: matches!(error, Error::External { .. }),
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.cause)
    }
}

impl std::fmt::Display for PipelineStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PipelineStatus::Running => f.write_str("running"),
            PipelineStatus::Finished => f.write_str("finished"),
            PipelineStatus::Stopped => f.write_str("stopped"),
            PipelineStatus::Failed(e) => write!(f, "failed: {e}"),
        }
    }
}

/// Shared, updatable status of a pipeline.
#[derive(Debug, Clone)]
pub struct StatusCell(Arc<Mutex<PipelineStatus>>);

impl Default for StatusCell {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(PipelineStatus::Running)))
    }
}

impl StatusCell {
    pub fn get(&self) -> PipelineStatus {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set(&self, status: PipelineStatus) {
        let mut current = self.0.lock().unwrap_or_else(|e| e.into_inner());
        // A failure is sticky: later "stopped" must not hide it.
        if !matches!(*current, PipelineStatus::Failed(_)) {
            *current = status;
        }
    }
}

/// Delivers each message to every subscriber; subscribers can come and go while it runs.
/// Sending waits for the slowest subscriber, which is what back-pressure means here.
#[derive(Debug, Default)]
pub struct Fanout {
    state: Mutex<FanoutState>,
}

#[derive(Debug, Default)]
struct FanoutState {
    subscribers: Vec<mpsc::Sender<Message>>,
    ended: bool,
}

impl Fanout {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A new consumer of everything sent from now on (just `Stop` if the output has ended).
    pub fn subscribe(&self) -> mpsc::Receiver<Message> {
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.ended {
            let _ = tx.try_send(Message::Stop);
        } else {
            state.subscribers.push(tx);
        }
        rx
    }

    /// Sends to every live subscriber, dropping those that have gone away.
    pub async fn send(&self, message: Message) {
        let subscribers = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            state.subscribers.retain(|s| !s.is_closed());
            if matches!(message, Message::Stop) {
                state.ended = true;
                std::mem::take(&mut state.subscribers)
            } else {
                state.subscribers.clone()
            }
        };
        // Each subscriber gets its own copy; the last one gets the original, so that a
        // barrier is never dropped here unacknowledged (which would fail its epoch). A
        // subscriber that hung up drops its copy (failing a barrier: its rows are lost) and
        // is removed on the next send.
        let Some((last, others)) = subscribers.split_last() else {
            return;
        };
        for subscriber in others {
            let _ = subscriber.send(message.clone()).await;
        }
        let _ = last.send(message).await;
    }
}

/// One of a pipeline's workers (see [`crate::exchange`]): which, and how many there are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Worker {
    pub index: usize,
    pub count: usize,
}

impl Worker {
    /// A pipeline that runs on one worker.
    pub const ONLY: Worker = Worker { index: 0, count: 1 };

    /// The prefix of this worker's participant ids in checkpoints: `<pipeline>` with one
    /// worker (as before workers existed), `<pipeline>/w<index>` with several.
    pub fn participant(&self, pipeline: &str) -> String {
        if self.count <= 1 {
            pipeline.to_string()
        } else {
            format!("{pipeline}/w{}", self.index)
        }
    }
}

/// How a source task runs.
pub struct SourceTask {
    /// Cancelled to stop at once (no last checkpoint): a live tail, or a stop that timed out.
    pub shutdown: CancellationToken,
    /// The source starts reading once this is cancelled (so that every consumer can
    /// subscribe first).
    pub release: CancellationToken,
    pub metrics: SourceMetrics,
    pub status: StatusCell,
    /// The pipeline, for logs and the source's participant id (`<pipeline>/source`).
    pub pipeline: String,
    /// The job's barriers, if it checkpoints.
    pub checkpoints: Option<SourceCheckpoints>,
    /// The source's state in the checkpoint restored.
    pub restore: Option<Snapshot>,
    /// The process's stable id (Kafka static membership), if it has a data directory.
    pub instance_id: Option<String>,
    /// Which share of the input this source reads.
    pub worker: Worker,
}

/// Spawns one of a pipeline's tasks. A panic in it (a bug) fails the pipeline, with the
/// panic's message as the cause, instead of ending the task unseen; the server goes on.
pub fn spawn_task(
    status: StatusCell,
    pipeline: String,
    task: &'static str,
    future: impl std::future::Future<Output = ()> + Send + 'static,
) -> JoinHandle<()> {
    use futures::FutureExt;
    tokio::spawn(async move {
        if let Err(panic) = std::panic::AssertUnwindSafe(future).catch_unwind().await {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(no message)".into());
            tracing::error!(pipeline = %pipeline, task, panic = %message,
                "a pipeline task panicked (a bug in Weir); the pipeline is failed");
            status.set(PipelineStatus::Failed(Failure {
                cause: format!(
                    "internal error (this is a bug in Weir): the {task} panicked: {message}"
                ),
                external: false,
            }));
        }
    })
}

/// Runs `source` on its own task; returns the channel it writes to. A bounded input that
/// ends is followed by `End`, the job's last barrier (after `End` has flushed everything
/// downstream) and `Stop`; a stopped one by `Stop`.
pub fn spawn_source(
    mut source: Box<dyn Source>,
    task: SourceTask,
) -> (mpsc::Receiver<Message>, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
    let (status, pipeline) = (task.status.clone(), task.pipeline.clone());
    let handle = spawn_task(status, pipeline, "source", async move {
        let SourceTask {
            shutdown,
            release,
            metrics,
            status,
            pipeline,
            checkpoints,
            restore,
            instance_id,
            worker,
        } = task;
        // Wait until every consumer is subscribed, so none misses the first rows.
        tokio::select! {
            () = release.cancelled() => {}
            () = shutdown.cancelled() => {}
        }
        let finished_before = restore.as_ref().is_some_and(is_finished);
        let mut ctx = SourceContext::new(tx, shutdown, metrics)
            .for_pipeline(&pipeline, checkpoints, instance_id)
            .for_worker(worker);
        let exit = match restore {
            // The input was read to its end before the checkpoint: nothing more to read.
            _ if finished_before => Ok(SourceExit::Finished),
            Some(snapshot) => match source.restore(snapshot).await {
                Ok(()) => source.run(&mut ctx).await,
                Err(e) => Err(e),
            },
            None => source.run(&mut ctx).await,
        };
        match exit {
            Ok(SourceExit::Finished) => {
                status.set(PipelineStatus::Finished);
                if ctx.emit_final(Message::End).await {
                    ctx.last_checkpoint_after_end().await;
                }
            }
            Ok(SourceExit::Stopped) => status.set(PipelineStatus::Stopped),
            Err(e) => {
                tracing::error!(pipeline = %pipeline, error = %e, "source failed; pipeline stops");
                status.set(PipelineStatus::Failed(Failure::of(&e)));
            }
        }
        ctx.emit_final(Message::Stop).await;
        drop(ctx);
        source.close().await;
    });
    (rx, handle)
}

/// Whether a source's saved state says its input had been read to the end.
fn is_finished(snapshot: &Snapshot) -> bool {
    snapshot.meta.get("finished") == Some(&serde_json::Value::Bool(true))
}

/// Runs `operators` in order on every message of `input`, sending the result to `output`.
/// A batch an operator fails on is counted, logged and dropped: one bad batch (say, a cast
/// that fails on some value) never stops the pipeline. Operators that ask for a tick
/// (processing-time windows) get one at their interval, input or not.
pub fn spawn_chain(
    input: mpsc::Receiver<Message>,
    operators: Vec<Box<dyn Operator>>,
    output: Arc<Fanout>,
    metrics: &Metrics,
    pipeline: &str,
    status: &StatusCell,
) -> JoinHandle<()> {
    let participant = pipeline.to_string();
    spawn_chain_at(
        input,
        operators,
        0,
        output,
        metrics,
        pipeline,
        &participant,
        status,
    )
}

/// Runs a pipeline's stages: each run of synchronous operators on one task (as
/// [`spawn_chain`]), each [`AsyncOperator`] on a task of its own, connected by bounded
/// channels, the last one sending to `output`. Operators save their state as
/// `<participant>/op<i>`, `i` counting from `first_index` (see [`Worker::participant`]).
#[allow(clippy::too_many_arguments)]
pub fn spawn_stages(
    input: mpsc::Receiver<Message>,
    stages: Vec<Stage>,
    first_index: usize,
    output: Arc<Fanout>,
    metrics: &Metrics,
    pipeline: &str,
    participant: &str,
    status: &StatusCell,
) -> Vec<JoinHandle<()>> {
    // Group consecutive synchronous operators; remember each group's first index (metrics
    // label operators by their position in the whole chain).
    enum Group {
        Sync(usize, Vec<Box<dyn Operator>>),
        Async(usize, Box<dyn AsyncOperator>),
    }
    let mut groups: Vec<Group> = Vec::new();
    for (i, stage) in stages.into_iter().enumerate() {
        let i = first_index + i;
        match stage {
            Stage::Sync(op) => match groups.last_mut() {
                Some(Group::Sync(_, ops)) => ops.push(op),
                _ => groups.push(Group::Sync(i, vec![op])),
            },
            Stage::Async(op) => groups.push(Group::Async(i, op)),
        }
    }
    if groups.is_empty() {
        groups.push(Group::Sync(first_index, Vec::new()));
    }
    let last = groups.len() - 1;
    let mut input = input;
    let mut tasks = Vec::with_capacity(groups.len());
    for (g, group) in groups.into_iter().enumerate() {
        let out = if g == last {
            output.clone()
        } else {
            Fanout::new()
        };
        let next = (g != last).then(|| out.subscribe());
        tasks.push(match group {
            Group::Sync(first, ops) => spawn_chain_at(
                input,
                ops,
                first,
                out,
                metrics,
                pipeline,
                participant,
                status,
            ),
            Group::Async(index, op) => {
                let m = metrics.operator(pipeline, op.name(), index, false);
                spawn_async_stage(input, op, out, m, pipeline.to_string(), index, status)
            }
        });
        match next {
            Some(rx) => input = rx,
            None => break,
        }
    }
    tasks
}

#[allow(clippy::too_many_arguments)]
fn spawn_chain_at(
    mut input: mpsc::Receiver<Message>,
    operators: Vec<Box<dyn Operator>>,
    first_index: usize,
    output: Arc<Fanout>,
    metrics: &Metrics,
    pipeline: &str,
    participant: &str,
    status: &StatusCell,
) -> JoinHandle<()> {
    let op_metrics: Vec<OperatorMetrics> = operators
        .iter()
        .enumerate()
        .map(|(i, op)| {
            metrics.operator(
                pipeline,
                op.name(),
                first_index + i,
                op.state_report().is_some(),
            )
        })
        .collect();
    let mut chain = Chain {
        tick_every: operators.iter().filter_map(|op| op.tick_interval()).min(),
        operators,
        first_index,
        metrics: op_metrics,
        pipeline: pipeline.to_string(),
        participant: participant.to_string(),
        error_log: RateLimitedLog::new(Duration::from_secs(10)),
    };
    spawn_task(
        status.clone(),
        pipeline.to_string(),
        "operators",
        async move {
            let mut ticks = chain.tick_every.map(|every| {
                let mut interval = tokio::time::interval(every);
                interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                interval
            });
            loop {
                let message = match ticks.as_mut() {
                    Some(ticks) => tokio::select! {
                        message = input.recv() => message,
                        _ = ticks.tick() => {
                            for message in chain.run(None) {
                                output.send(message).await;
                            }
                            continue;
                        }
                    },
                    None => input.recv().await,
                };
                let Some(message) = message else { break };
                let stop = matches!(message, Message::Stop);
                for message in chain.run(Some(message)) {
                    output.send(message).await;
                }
                if stop {
                    return;
                }
            }
            // The input closed without Stop (upstream task died): still end the output.
            output.send(Message::Stop).await;
        },
    )
}

/// Runs one [`AsyncOperator`]: up to its `max_in_flight` batches at once, outputs (and the
/// watermarks, barriers and end between them) in input order.
fn spawn_async_stage(
    mut input: mpsc::Receiver<Message>,
    mut op: Box<dyn AsyncOperator>,
    output: Arc<Fanout>,
    metrics: OperatorMetrics,
    pipeline: String,
    index: usize,
    status: &StatusCell,
) -> JoinHandle<()> {
    use futures::StreamExt;
    use futures::stream::FuturesOrdered;

    /// A place in the output order: a batch being processed, or a message that waits for
    /// the batches before it.
    type Slot =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<Option<Message>>> + Send>>;

    let max_in_flight = op.max_in_flight().max(1);
    spawn_task(
        status.clone(),
        pipeline.clone(),
        "lookup stage",
        async move {
            let mut error_log = RateLimitedLog::new(Duration::from_secs(10));
            let mut in_flight: FuturesOrdered<Slot> = FuturesOrdered::new();
            let mut input_done = false;
            loop {
                tokio::select! {
                    biased;
                    Some(done) = in_flight.next(), if !in_flight.is_empty() => match done {
                        Ok(Some(message)) => {
                            let stop = matches!(message, Message::Stop);
                            if let Message::Data(batch) = &message {
                                metrics.records_out.inc_by(batch.num_rows() as u64);
                            }
                            output.send(message).await;
                            if stop {
                                return;
                            }
                        }
                        Ok(None) => {}
                        Err(e) => {
                            metrics.errors.inc();
                            error_log.log(|suppressed| {
                                tracing::warn!(pipeline = %pipeline, operator = index, error = %e,
                                    suppressed, "operator failed on a batch; batch dropped");
                            });
                        }
                    },
                    message = input.recv(), if !input_done && in_flight.len() < max_in_flight => {
                        let message = message.unwrap_or(Message::Stop);
                        input_done = matches!(message, Message::Stop);
                        let slot: Slot = match message {
                            Message::Data(batch) => {
                                metrics.records_in.inc_by(batch.num_rows() as u64);
                                match op.process_batch(batch) {
                                    // A panic is a bug: it drops the batch like an error (counted,
                                    // logged) instead of ending the stage and the pipeline with it.
                                    Ok(future) => Box::pin(async move {
                                        use futures::FutureExt;
                                        match std::panic::AssertUnwindSafe(future).catch_unwind().await {
                                            Ok(output) => Ok(output?.map(Message::Data)),
                                            Err(_) => Err(Error::Internal(
                                                "an operator panicked on a batch".into(),
                                            )),
                                        }
                                    }),
                                    Err(e) => Box::pin(std::future::ready(Err(e))),
                                }
                            }
                            other => Box::pin(std::future::ready(Ok(Some(other)))),
                        };
                        in_flight.push_back(slot);
                    }
                    else => return,
                }
            }
        },
    )
}

/// A pipeline's operators and their counters.
struct Chain {
    operators: Vec<Box<dyn Operator>>,
    /// The position of the first operator in the pipeline's whole chain (for logs).
    first_index: usize,
    metrics: Vec<OperatorMetrics>,
    pipeline: String,
    /// The prefix of the operators' participant ids (`<participant>/op<i>`).
    participant: String,
    error_log: RateLimitedLog,
    tick_every: Option<Duration>,
}

impl Chain {
    /// Passes `message` through every operator; `None` is a tick, which every operator
    /// that asks for ticks receives before its input.
    fn run(&mut self, message: Option<Message>) -> Vec<Message> {
        let tick = message.is_none();
        let mut current: Vec<Message> = message.into_iter().collect();
        let mut next = Vec::new();
        for (i, (op, m)) in self.operators.iter_mut().zip(&self.metrics).enumerate() {
            let i = self.first_index + i;
            if tick
                && op.tick_interval().is_some()
                && let Err(e) = op.on_tick(&mut next)
            {
                m.errors.inc();
                let pipeline = &self.pipeline;
                self.error_log.log(|suppressed| {
                    tracing::warn!(pipeline = %pipeline, operator = i, error = %e,
                        suppressed, "operator failed on a tick");
                });
            }
            // State is reported after watermarks, ticks and the end, not after every batch.
            let report = tick || current.iter().any(|m| !matches!(m, Message::Data(_)));
            for message in current.drain(..) {
                let result = match message {
                    Message::Data(batch) => {
                        m.records_in.inc_by(batch.num_rows() as u64);
                        op.process_batch(batch, &mut next)
                    }
                    Message::Watermark(w) => {
                        m.watermark_ms.set(w.0);
                        op.on_watermark(w, &mut next)
                    }
                    Message::Barrier(b) => match op.snapshot() {
                        Ok(snapshot) => {
                            if let Some(snapshot) = snapshot {
                                b.save(format!("{}/op{i}", self.participant), snapshot);
                            }
                            op.on_barrier(b, &mut next)
                        }
                        // The barrier is dropped unacknowledged: its epoch fails.
                        Err(e) => Err(e),
                    },
                    Message::End => {
                        let r = op.on_end(&mut next);
                        next.push(Message::End);
                        r
                    }
                    // Nothing partial is emitted: the state stays in the last checkpoint.
                    Message::Stop => {
                        next.push(Message::Stop);
                        Ok(())
                    }
                };
                if let Err(e) = result {
                    m.errors.inc();
                    let pipeline = &self.pipeline;
                    self.error_log.log(|suppressed| {
                        tracing::warn!(pipeline = %pipeline, operator = i, error = %e,
                            suppressed, "operator failed on a batch; batch dropped");
                    });
                }
            }
            if report
                && let Some(state) = &m.state
                && let Some(report) = op.state_report()
            {
                state.record(&report);
            }
            for message in &next {
                if let Message::Data(b) = message {
                    m.records_out.inc_by(b.num_rows() as u64);
                }
            }
            std::mem::swap(&mut current, &mut next);
        }
        current
    }
}

/// How a sink task runs.
pub struct SinkTask {
    pub metrics: SinkMetrics,
    pub status: StatusCell,
    /// The pipeline, for logs and the sink's participant id (`<pipeline>/sink`).
    pub pipeline: String,
    /// The job's committed epochs; without a coordinator each barrier commits at once.
    pub committed: Option<watch::Receiver<u64>>,
    /// The sink's state in the checkpoint restored.
    pub restore: Option<Snapshot>,
    /// Where to record each epoch the sink has committed (a job with a checkpoint store).
    pub commit_log: Option<CommitLog>,
}

/// How long a stopping sink waits for its last epoch to be committed.
const LAST_COMMIT_WAIT: Duration = Duration::from_secs(30);

/// Feeds `input` to `sink` until `Stop`, committing epochs as the coordinator completes
/// them, then finishes it. Failures are logged, counted and reported in `status`; the task
/// itself never panics.
pub fn spawn_sink(
    mut sink: Box<dyn Sink>,
    mut input: mpsc::Receiver<Message>,
    task: SinkTask,
) -> JoinHandle<()> {
    let (status, pipeline) = (task.status.clone(), task.pipeline.clone());
    spawn_task(status, pipeline, "sink", async move {
        let SinkTask {
            metrics,
            status,
            pipeline,
            committed,
            restore,
            commit_log,
        } = task;
        let commit_log = commit_log.filter(|_| sink.reads_commit_records());
        let restored = match restore {
            Some(snapshot) => sink.restore(snapshot).await,
            None => Ok(()),
        };
        let result = match restored {
            Ok(()) => {
                let mut run = SinkRun {
                    sink: sink.as_mut(),
                    id: format!("{pipeline}/sink"),
                    metrics: &metrics,
                    committed,
                    pre_committed: None,
                    commit_done: 0,
                    commit_log,
                };
                run.run(&mut input).await
            }
            Err(e) => Err(e),
        };
        let finished = sink.finish().await;
        if let Err(e) = result.and(finished) {
            metrics.errors.inc();
            tracing::error!(pipeline = %pipeline, error = %e, "sink failed");
            status.set(PipelineStatus::Failed(Failure::of(&e)));
            // Rows are lost here: no epoch still to come may count as durable, or the
            // source would commit offsets past them. (Dropping a barrier fails it.)
            while let Some(message) = input.recv().await {
                if matches!(message, Message::Stop) {
                    break;
                }
            }
        }
    })
}

struct SinkRun<'a> {
    sink: &'a mut dyn Sink,
    id: String,
    metrics: &'a SinkMetrics,
    committed: Option<watch::Receiver<u64>>,
    /// The newest epoch pre-committed.
    pre_committed: Option<u64>,
    /// The newest epoch committed.
    commit_done: u64,
    commit_log: Option<CommitLog>,
}

impl SinkRun<'_> {
    async fn run(&mut self, input: &mut mpsc::Receiver<Message>) -> Result<()> {
        let mut tick = self.sink.tick_interval().map(|period| {
            let mut interval = tokio::time::interval(period);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            interval
        });
        enum Event {
            Message(Option<Message>),
            Tick,
            Committed,
        }
        loop {
            let event = tokio::select! {
                m = input.recv() => Event::Message(m),
                () = next_tick(&mut tick) => Event::Tick,
                () = next_commit(&mut self.committed) => Event::Committed,
            };
            let message = match event {
                Event::Message(message) => message,
                Event::Tick => {
                    self.sink.on_tick().await?;
                    continue;
                }
                Event::Committed => {
                    self.commit_up_to_latest().await?;
                    continue;
                }
            };
            match message {
                Some(Message::Data(batch)) => {
                    let rows = batch.num_rows() as u64;
                    let started = std::time::Instant::now();
                    self.sink.write(batch).await?;
                    self.metrics
                        .write_seconds
                        .inc_by(started.elapsed().as_secs_f64());
                    self.metrics.rows_written.inc_by(rows);
                }
                Some(Message::Watermark(w)) => self.sink.on_watermark(w).await?,
                Some(Message::Barrier(barrier)) => self.pre_commit(barrier).await?,
                // A bounded input ended; its last barrier and Stop follow.
                Some(Message::End) => {}
                Some(Message::Stop) | None => break,
            }
        }
        self.wait_last_commit().await
    }

    async fn pre_commit(&mut self, barrier: CheckpointBarrier) -> Result<()> {
        let epoch = barrier.epoch;
        // A copy that fails the epoch if pre-commit does; the sink acknowledges or holds
        // its own.
        let held = barrier.clone();
        if let Err(e) = self.sink.pre_commit(barrier).await {
            held.fail();
            return Err(e);
        }
        match self.sink.snapshot() {
            Ok(Some(snapshot)) => held.save(self.id.clone(), snapshot),
            Ok(None) => {}
            Err(e) => {
                held.fail();
                return Err(e);
            }
        }
        held.ack();
        self.pre_committed = Some(epoch);
        if self.committed.is_none() {
            // No coordinator (a pipeline that does not checkpoint): commit at once.
            self.commit(epoch).await?;
        }
        Ok(())
    }

    async fn commit_up_to_latest(&mut self) -> Result<()> {
        let latest = self
            .committed
            .as_mut()
            .map_or(0, |c| *c.borrow_and_update());
        self.commit(latest).await
    }

    async fn commit(&mut self, epoch: u64) -> Result<()> {
        if epoch > self.commit_done {
            self.sink.commit(epoch).await?;
            self.commit_done = epoch;
            if let Some(log) = &self.commit_log
                && let Err(e) = log.store.record_commit(&log.job, &self.id, epoch).await
            {
                // Only costs a repeat after a crash: the restart sends the epoch again.
                tracing::warn!(sink = %self.id, epoch, error = %e, "cannot record a commit");
            }
        }
        Ok(())
    }
}

/// The next tick of `interval`; never, without one.
async fn next_tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// Waits for the next committed epoch. Once the coordinator has gone (its job stopped)
/// this waits forever; the receiver keeps the last value for the wait at `Stop`.
async fn next_commit(committed: &mut Option<watch::Receiver<u64>>) {
    if let Some(rx) = committed
        && rx.changed().await.is_ok()
    {
        return;
    }
    std::future::pending().await
}

impl SinkRun<'_> {
    /// Stopping: the coordinator writes the last epoch's checkpoint and then commits it;
    /// publish what that epoch pre-committed once it does (bounded).
    async fn wait_last_commit(&mut self) -> Result<()> {
        let (Some(epoch), Some(committed)) = (self.pre_committed, self.committed.as_mut()) else {
            return Ok(());
        };
        let reached =
            tokio::time::timeout(LAST_COMMIT_WAIT, committed.wait_for(|&done| done >= epoch))
                .await
                .is_ok_and(|r| r.is_ok());
        match reached {
            true => self.commit_up_to_latest().await,
            false => {
                tracing::warn!(sink = %self.id, epoch,
                    "the last checkpoint did not complete; its rows are written again after a restart");
                Ok(())
            }
        }
    }
}

/// Logs at most once per period, reporting how many were suppressed in between.
pub struct RateLimitedLog {
    period: Duration,
    last: Option<std::time::Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    pub fn new(period: Duration) -> Self {
        Self {
            period,
            last: None,
            suppressed: 0,
        }
    }

    pub fn log(&mut self, emit: impl FnOnce(u64)) {
        let now = std::time::Instant::now();
        if self
            .last
            .is_none_or(|last| now.duration_since(last) >= self.period)
        {
            emit(self.suppressed);
            self.suppressed = 0;
            self.last = Some(now);
        } else {
            self.suppressed += 1;
        }
    }
}

/// Waits for `handle`, turning a panic in the task into an error.
pub async fn join(handle: JoinHandle<()>) -> Result<()> {
    handle
        .await
        .map_err(|e| Error::Internal(format!("pipeline task panicked: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};
    use arrow::record_batch::RecordBatch;
    use async_trait::async_trait;

    fn source_task(
        shutdown: CancellationToken,
        release: CancellationToken,
        metrics: SourceMetrics,
        status: StatusCell,
    ) -> SourceTask {
        SourceTask {
            shutdown,
            release,
            metrics,
            status,
            pipeline: "p".into(),
            checkpoints: None,
            restore: None,
            instance_id: None,
            worker: Worker::ONLY,
        }
    }

    fn sink_task(metrics: SinkMetrics, status: StatusCell) -> SinkTask {
        SinkTask {
            metrics,
            status,
            pipeline: "p".into(),
            committed: None,
            restore: None,
            commit_log: None,
        }
    }

    struct Numbers(Vec<i64>);

    #[async_trait]
    impl Source for Numbers {
        async fn run(&mut self, ctx: &mut SourceContext) -> Result<SourceExit> {
            let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
            for n in self.0.drain(..) {
                let batch = RecordBatch::try_new(
                    schema.clone(),
                    vec![Arc::new(Int64Array::from(vec![n]))],
                )?;
                if !ctx.emit(Message::Data(batch)).await {
                    return Ok(SourceExit::Stopped);
                }
            }
            Ok(SourceExit::Finished)
        }
    }

    #[derive(Clone, Default)]
    struct Collect(Arc<Mutex<Vec<i64>>>, Arc<Mutex<bool>>);

    #[async_trait]
    impl Sink for Collect {
        async fn write(&mut self, batch: RecordBatch) -> Result<()> {
            let col = batch
                .column(0)
                .as_any()
                .downcast_ref::<Int64Array>()
                .expect("i64");
            self.0.lock().expect("lock").extend(col.values().iter());
            Ok(())
        }
        async fn finish(&mut self) -> Result<()> {
            *self.1.lock().expect("lock") = true;
            Ok(())
        }
    }

    #[tokio::test]
    async fn every_subscriber_sees_every_batch_then_the_sinks_finish() {
        let metrics = Metrics::new();
        let status = StatusCell::default();
        let release = CancellationToken::new();
        let (rx, source_task) = spawn_source(
            Box::new(Numbers((0..100).collect())),
            source_task(
                CancellationToken::new(),
                release.clone(),
                metrics.source("numbers", "p", "numbers"),
                status.clone(),
            ),
        );
        let fanout = Fanout::new();
        let (a, b) = (Collect::default(), Collect::default());
        let sink_a = spawn_sink(
            Box::new(a.clone()),
            fanout.subscribe(),
            sink_task(metrics.sink("p", "a"), status.clone()),
        );
        let sink_b = spawn_sink(
            Box::new(b.clone()),
            fanout.subscribe(),
            sink_task(metrics.sink("p", "b"), status.clone()),
        );
        let chain = spawn_chain(rx, vec![], fanout, &metrics, "p", &status);
        // Subscribers wired after the source task was spawned still see the first batch.
        tokio::task::yield_now().await;
        release.cancel();
        for task in [source_task, chain, sink_a, sink_b] {
            join(task).await.expect("no panic");
        }
        let expected: Vec<i64> = (0..100).collect();
        assert_eq!(*a.0.lock().expect("lock"), expected);
        assert_eq!(*b.0.lock().expect("lock"), expected);
        assert!(*a.1.lock().expect("lock") && *b.1.lock().expect("lock"));
        assert_eq!(status.get(), PipelineStatus::Finished);
    }

    #[tokio::test]
    async fn cancelling_stops_an_endless_source() {
        struct Endless;
        #[async_trait]
        impl Source for Endless {
            async fn run(&mut self, ctx: &mut SourceContext) -> Result<SourceExit> {
                let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
                loop {
                    let batch = RecordBatch::try_new(
                        schema.clone(),
                        vec![Arc::new(Int64Array::from(vec![1]))],
                    )?;
                    if !ctx.emit(Message::Data(batch)).await {
                        return Ok(SourceExit::Stopped);
                    }
                }
            }
        }
        let token = CancellationToken::new();
        let status = StatusCell::default();
        let released = CancellationToken::new();
        released.cancel();
        let (mut rx, task) = spawn_source(
            Box::new(Endless),
            source_task(
                token.clone(),
                released,
                SourceMetrics::detached(),
                status.clone(),
            ),
        );
        assert!(matches!(rx.recv().await, Some(Message::Data(_))));
        token.cancel();
        let mut saw_stop = false;
        while let Some(m) = rx.recv().await {
            assert!(!matches!(m, Message::End), "a stopped input has not ended");
            saw_stop |= matches!(m, Message::Stop);
        }
        join(task).await.expect("no panic");
        assert!(saw_stop);
        assert_eq!(status.get(), PipelineStatus::Stopped);
    }

    #[tokio::test]
    async fn a_panicking_operator_fails_the_pipeline_as_a_bug_and_its_task_ends() {
        struct Panics;
        impl Operator for Panics {
            fn name(&self) -> &'static str {
                "panics"
            }
            fn process_batch(&mut self, _: RecordBatch, _: &mut Vec<Message>) -> Result<()> {
                panic!("index out of bounds");
            }
        }
        let metrics = Metrics::new();
        let status = StatusCell::default();
        let released = CancellationToken::new();
        released.cancel();
        let (rx, source) = spawn_source(
            Box::new(Numbers(vec![1, 2, 3])),
            source_task(
                CancellationToken::new(),
                released,
                metrics.source("numbers", "p", "numbers"),
                status.clone(),
            ),
        );
        let chain = spawn_chain(
            rx,
            vec![Box::new(Panics)],
            Fanout::new(),
            &metrics,
            "p",
            &status,
        );
        join(chain).await.expect("the panic is caught in the task");
        let _ = join(source).await;
        match status.get() {
            PipelineStatus::Failed(failure) => {
                assert!(!failure.external, "a panic is a bug, not an outage");
                assert!(
                    failure.cause.contains("bug in Weir")
                        && failure.cause.contains("index out of bounds"),
                    "{failure}"
                );
            }
            other => panic!("expected a failure, got {other}"),
        }
    }

    #[test]
    fn only_external_errors_are_external_failures() {
        use crate::error::External;
        assert!(Failure::of(&Error::external(External::Connection, "broker gone")).external);
        assert!(!Failure::of(&Error::Execution("bad option".into())).external);
        assert!(!Failure::of(&Error::Internal("bug".into())).external);
    }
}
