//! [`Coordinator`]: takes a job's checkpoints.
//!
//! A job is one source and every pipeline downstream of it (a view, and the sinks reading
//! the view). Every `interval` the coordinator hands the source a tracked barrier for the
//! next epoch. The source injects it after the records it has emitted, saving its
//! positions; each operator saves its state as the barrier passes; each sink pre-commits and
//! acknowledges. When every copy is acknowledged the coordinator writes the snapshots to the
//! [`CheckpointStore`] (if the job has one) and only then announces the epoch committed:
//! sinks publish what they pre-committed, the Kafka source commits the offsets to its group.
//! One checkpoint is in flight at a time; an epoch a participant failed or lost is abandoned
//! (counted) and the next one tries again.
//!
//! Stopping and finishing end the same way: a last barrier (`last`), after which the source
//! ends and [`crate::Message::Stop`] follows. On a stop the source injects it where it is, so
//! nothing partial is emitted; after a bounded input ended, the source runner injects it
//! after [`crate::Message::End`] has flushed every window.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::checkpoint::{Checkpoint, CheckpointStore};
use crate::message::{CheckpointBarrier, EpochDone};
use crate::metrics::CheckpointMetrics;

/// How a job checkpoints.
#[derive(Debug, Clone)]
pub struct CheckpointConfig {
    pub interval: Duration,
    /// Where checkpoints are written; `None` runs the protocol (sinks still commit per
    /// epoch) without keeping state across restarts.
    pub store: Option<CheckpointStore>,
    /// Failed when another process commits one of the job's epochs (the job stops
    /// committing: see [`CheckpointStore::write_new`]).
    pub status: Option<crate::pipeline::StatusCell>,
}

/// The last checkpoint and restore of a job, for `SHOW QUERIES`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CheckpointInfo {
    /// The last completed checkpoint: epoch, wall-clock start (ms), duration, bytes.
    pub last: Option<(u64, i64, Duration, u64)>,
    /// The checkpoint this run restored (epoch) and how long restoring took.
    pub restored: Option<(u64, Duration)>,
    pub failed: u64,
}

/// What the source of a job gets: the barriers to inject, and the epochs committed.
#[derive(Debug)]
pub struct SourceCheckpoints {
    pub barriers: mpsc::Receiver<CheckpointBarrier>,
    pub committed: watch::Receiver<u64>,
    finished: mpsc::Sender<Control>,
}

impl SourceCheckpoints {
    /// A bounded input has ended: ask for the last barrier (the runner injects it).
    pub async fn finished(&self) {
        let _ = self.finished.send(Control::Finished).await;
    }
}

#[derive(Debug)]
enum Control {
    Finished,
    Stop(oneshot::Sender<()>),
}

/// The handle of a running coordinator.
#[derive(Debug)]
pub struct Coordinator {
    control: mpsc::Sender<Control>,
    committed: watch::Receiver<u64>,
    info: Arc<Mutex<CheckpointInfo>>,
    fingerprints: Arc<Mutex<BTreeMap<String, String>>>,
    task: Option<JoinHandle<()>>,
}

impl Coordinator {
    /// Starts the coordinator of `job`, whose epochs continue after `restored` (the epoch
    /// of the checkpoint restored, or 0).
    pub fn spawn(
        job: &str,
        config: CheckpointConfig,
        restored: u64,
        metrics: CheckpointMetrics,
    ) -> (Self, SourceCheckpoints) {
        let (coordinator, mut sources) = Self::spawn_sources(job, config, restored, metrics, 1);
        let source = sources.pop().expect("one source");
        (coordinator, source)
    }

    /// As [`Coordinator::spawn`], for a job read by `sources` sources (a pipeline's workers):
    /// each gets a copy of every barrier, and the last checkpoint after a bounded input waits
    /// until every one of them has finished.
    pub fn spawn_sources(
        job: &str,
        config: CheckpointConfig,
        restored: u64,
        metrics: CheckpointMetrics,
        sources: usize,
    ) -> (Self, Vec<SourceCheckpoints>) {
        let (committed_tx, committed_rx) = watch::channel(restored);
        let (control_tx, control_rx) = mpsc::channel(4 + sources);
        let (barriers_tx, barriers_rx): (Vec<_>, Vec<_>) =
            (0..sources.max(1)).map(|_| mpsc::channel(1)).unzip();
        let info = Arc::new(Mutex::new(CheckpointInfo::default()));
        let fingerprints = Arc::new(Mutex::new(BTreeMap::new()));
        let task = Task {
            job: job.to_string(),
            config,
            epoch: restored,
            barriers: barriers_tx,
            unfinished: sources.max(1),
            committed: committed_tx,
            control: control_rx,
            info: info.clone(),
            fingerprints: fingerprints.clone(),
            metrics,
        };
        let handle = tokio::spawn(task.run());
        let sources = barriers_rx
            .into_iter()
            .map(|barriers| SourceCheckpoints {
                barriers,
                committed: committed_rx.clone(),
                finished: control_tx.clone(),
            })
            .collect();
        (
            Self {
                control: control_tx,
                committed: committed_rx,
                info,
                fingerprints,
                task: Some(handle),
            },
            sources,
        )
    }

    /// The epochs committed (for sinks: publish what was pre-committed up to it).
    pub fn committed(&self) -> watch::Receiver<u64> {
        self.committed.clone()
    }

    /// Records the plan fingerprint of a pipeline of the job, saved with each checkpoint.
    pub fn set_fingerprint(&self, pipeline: &str, fingerprint: String) {
        self.fingerprints
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(pipeline.to_string(), fingerprint);
    }

    /// A pipeline left the job (a sink reading the view was dropped).
    pub fn remove_pipeline(&self, pipeline: &str) {
        self.fingerprints
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(pipeline);
    }

    pub fn info(&self) -> CheckpointInfo {
        self.info.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Records a restore, for `SHOW QUERIES`.
    pub fn restored(&self, epoch: u64, took: Duration) {
        self.info.lock().unwrap_or_else(|e| e.into_inner()).restored = Some((epoch, took));
    }

    /// Takes a last checkpoint and ends the job's source: returns once that checkpoint is
    /// committed (or abandoned), or after `timeout`. False if it timed out.
    pub async fn stop(&mut self, timeout: Duration) -> bool {
        let (done_tx, done_rx) = oneshot::channel();
        let deadline = tokio::time::Instant::now() + timeout;
        match tokio::time::timeout_at(deadline, self.control.send(Control::Stop(done_tx))).await {
            // The coordinator takes no requests (busy writing a checkpoint past the deadline).
            Err(_) => return false,
            Ok(Ok(())) => {
                if tokio::time::timeout_at(deadline, done_rx).await.is_err() {
                    return false;
                }
            }
            // A closed channel means the coordinator ended already (the input finished).
            Ok(Err(_)) => {}
        }
        match self.task.take() {
            Some(task) => tokio::time::timeout_at(deadline, task).await.is_ok(),
            None => true,
        }
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

struct Task {
    job: String,
    config: CheckpointConfig,
    epoch: u64,
    /// One per source.
    barriers: Vec<mpsc::Sender<CheckpointBarrier>>,
    /// Sources whose bounded input has not ended yet.
    unfinished: usize,
    committed: watch::Sender<u64>,
    control: mpsc::Receiver<Control>,
    info: Arc<Mutex<CheckpointInfo>>,
    fingerprints: Arc<Mutex<BTreeMap<String, String>>>,
    metrics: CheckpointMetrics,
}

impl Task {
    async fn run(mut self) {
        let mut ticks = tokio::time::interval_at(
            tokio::time::Instant::now() + self.config.interval,
            self.config.interval,
        );
        // A checkpoint slower than the interval delays the next one; none pile up.
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let stopping = tokio::select! {
                _ = ticks.tick() => None,
                control = self.control.recv() => match control {
                    Some(Control::Finished) => {
                        self.unfinished = self.unfinished.saturating_sub(1);
                        if self.unfinished > 0 {
                            continue;
                        }
                        Some(None)
                    }
                    Some(Control::Stop(done)) => Some(Some(done)),
                    None => return,
                },
            };
            let last = stopping.is_some();
            if !self.checkpoint(last).await {
                // The source is gone: nothing more to checkpoint.
                return;
            }
            if let Some(done) = stopping {
                if let Some(done) = done {
                    let _ = done.send(());
                }
                return;
            }
        }
    }

    /// Takes one checkpoint. False if the source no longer takes barriers.
    async fn checkpoint(&mut self, last: bool) -> bool {
        let epoch = self.epoch + 1;
        let started = Instant::now();
        let started_ms = chrono_now_ms();
        let (done_tx, done_rx) = oneshot::channel::<EpochDone>();
        let mut barrier = CheckpointBarrier::on_done(epoch, move |done| {
            let _ = done_tx.send(done);
        });
        if last {
            barrier = barrier.into_last();
        }
        // Every source gets a copy; the last one the original, so that none is dropped
        // here unacknowledged.
        if let Some((last, others)) = self.barriers.split_last() {
            for source in others {
                if source.send(barrier.clone()).await.is_err() {
                    return false;
                }
            }
            if last.send(barrier).await.is_err() {
                return false;
            }
        }
        self.epoch = epoch;
        let Ok(done) = done_rx.await else {
            return false;
        };
        self.metrics
            .alignment_seconds
            .observe(started.elapsed().as_secs_f64());
        if !done.durable {
            self.failed(epoch, "a participant failed or lost its barrier");
            return true;
        }
        let checkpoint = Checkpoint {
            epoch,
            started_ms,
            fingerprints: self
                .fingerprints
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            snapshots: done.snapshots,
        };
        let bytes = match &self.config.store {
            Some(store) => match store.write_new(&self.job, &checkpoint).await {
                Ok(Some(stats)) => stats.bytes,
                Ok(None) => {
                    // Another process committed this epoch: it owns the job now (a
                    // cluster's partition moved while this process still ran it). Nothing
                    // more is committed here; the pipeline fails, and a restart restores
                    // what the other committed.
                    // A process running another query for the pipeline (a cluster's
                    // processes started with different SQL) takes the same checkpoints.
                    let theirs = store
                        .fingerprints(&self.job, epoch)
                        .await
                        .unwrap_or_default();
                    let other_query = checkpoint
                        .fingerprints
                        .iter()
                        .any(|(k, v)| theirs.get(k).is_some_and(|t| t != v));
                    let message = if other_query {
                        format!(
                            "checkpoint {epoch} of {} was committed by another process that runs a different query for it: the processes of a cluster must run the same SQL",
                            self.job
                        )
                    } else {
                        format!(
                            "checkpoint {epoch} of {} was committed by another process: this one no longer owns it",
                            self.job
                        )
                    };
                    tracing::error!(job = %self.job, epoch, "{message}");
                    if let Some(status) = &self.config.status {
                        status.set(crate::pipeline::PipelineStatus::Failed(
                            crate::pipeline::Failure {
                                cause: message,
                                external: true,
                            },
                        ));
                    }
                    return false;
                }
                Err(e) => {
                    self.failed(epoch, &e.to_string());
                    return true;
                }
            },
            None => 0,
        };
        let took = started.elapsed();
        tracing::debug!(job = %self.job, epoch, bytes, ms = took.as_millis() as u64, "checkpoint complete");
        self.metrics.completed.inc();
        self.metrics.seconds.observe(took.as_secs_f64());
        self.metrics
            .bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        self.metrics
            .epoch
            .set(i64::try_from(epoch).unwrap_or(i64::MAX));
        self.info.lock().unwrap_or_else(|e| e.into_inner()).last =
            Some((epoch, started_ms, took, bytes));
        self.committed.send_replace(epoch);
        true
    }

    fn failed(&self, epoch: u64, why: &str) {
        tracing::warn!(job = %self.job, epoch, reason = why, "checkpoint abandoned; the next one retries");
        self.metrics.failed.inc();
        self.info.lock().unwrap_or_else(|e| e.into_inner()).failed += 1;
    }
}

fn chrono_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::record_batch::RecordBatch;
    use async_trait::async_trait;

    use super::*;
    use crate::Result;
    use crate::checkpoint::Snapshot;
    use crate::message::{Message, Watermark};
    use crate::metrics::Metrics;
    use crate::operator::{Sink, Source, SourceContext, SourceExit, Stage};
    use crate::operators::test_support::{batch, input_schema, spec};
    use crate::operators::{WindowAggregate, WindowKind};
    use crate::pipeline::{self, Fanout, SinkTask, SourceTask, StatusCell, Worker};
    use tokio_util::sync::CancellationToken;

    /// `batches` batches of 10 records, 100 ms of event time each, a watermark after each;
    /// its position is the next batch.
    struct Numbered {
        next: u64,
        batches: u64,
    }

    #[async_trait]
    impl Source for Numbered {
        async fn run(&mut self, ctx: &mut SourceContext) -> Result<SourceExit> {
            while self.next < self.batches {
                if let Some(barrier) = ctx.barrier_due() {
                    let position = Snapshot::meta(serde_json::json!({ "next": self.next }));
                    if !ctx.emit_barrier(barrier, position).await {
                        return Ok(SourceExit::Stopped);
                    }
                }
                let i = self.next as i64;
                let rows: Vec<(i64, f64, i64)> = (0..10)
                    .map(|r| (r % 3, (i * 10 + r) as f64, i * 100 + r * 10))
                    .collect();
                if !ctx.emit(Message::Data(batch(&rows))).await
                    || !ctx.emit(Message::Watermark(Watermark(i * 100))).await
                {
                    return Ok(SourceExit::Stopped);
                }
                self.next += 1;
                // Slow enough for several checkpoints.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Ok(SourceExit::Finished)
        }

        async fn restore(&mut self, position: Snapshot) -> Result<()> {
            self.next = position.meta["next"].as_u64().unwrap_or(0);
            Ok(())
        }
    }

    /// What a transactional sink published, by epoch: publishing an epoch twice (a restore
    /// repeating a commit that had happened) keeps the first, as renaming a file under a
    /// name fixed by its epoch does.
    type Published = Arc<Mutex<std::collections::BTreeMap<u64, Vec<RecordBatch>>>>;

    /// A transactional sink: rows become visible in `out` only when their epoch commits;
    /// pre-committed rows are its checkpoint state.
    struct Transactional {
        open: Vec<RecordBatch>,
        pending: Vec<(u64, Vec<RecordBatch>)>,
        out: Published,
    }

    #[async_trait]
    impl Sink for Transactional {
        async fn write(&mut self, batch: RecordBatch) -> Result<()> {
            self.open.push(batch);
            Ok(())
        }
        async fn pre_commit(&mut self, barrier: CheckpointBarrier) -> Result<()> {
            self.pending
                .push((barrier.epoch, std::mem::take(&mut self.open)));
            barrier.ack();
            Ok(())
        }
        fn snapshot(&mut self) -> Result<Option<Snapshot>> {
            let epochs: Vec<(u64, usize)> =
                self.pending.iter().map(|(e, b)| (*e, b.len())).collect();
            let batches = self.pending.iter().flat_map(|(_, b)| b.clone()).collect();
            Ok(Some(Snapshot::new(serde_json::json!(epochs), batches)))
        }
        async fn restore(&mut self, snapshot: Snapshot) -> Result<()> {
            // Everything the restored checkpoint pre-committed is committed by it.
            let epochs: Vec<(u64, usize)> = serde_json::from_value(snapshot.meta).expect("epochs");
            let mut batches = snapshot.batches.into_iter();
            let mut out = self.out.lock().expect("lock");
            for (epoch, n) in epochs {
                let rows: Vec<RecordBatch> = batches.by_ref().take(n).collect();
                out.entry(epoch).or_insert(rows);
            }
            Ok(())
        }
        async fn commit(&mut self, epoch: u64) -> Result<()> {
            let mut out = self.out.lock().expect("lock");
            self.pending.retain(|(e, batches)| {
                if *e <= epoch {
                    out.entry(*e).or_insert_with(|| batches.clone());
                    false
                } else {
                    true
                }
            });
            Ok(())
        }
        async fn finish(&mut self) -> Result<()> {
            Ok(())
        }
    }

    struct Run {
        tasks: Vec<tokio::task::JoinHandle<()>>,
        coordinator: Coordinator,
    }

    /// Starts source → tumbling window → transactional sink, restored from `store`'s last
    /// checkpoint if it has one.
    async fn start(store: &CheckpointStore, out: &Published) -> Run {
        let restored = store.latest("job").await.expect("read");
        let snapshot = |id: &str| restored.as_ref().and_then(|c| c.snapshots.get(id).cloned());
        let mut window =
            WindowAggregate::try_new(spec(WindowKind::Tumble { size: 1000 }, 0), &input_schema())
                .expect("window");
        if let Some(state) = snapshot("p/op0") {
            crate::operator::Operator::restore(&mut window, state).expect("restore");
        }
        let (coordinator, checkpoints) = Coordinator::spawn(
            "job",
            CheckpointConfig {
                status: None,
                interval: Duration::from_millis(20),
                store: Some(store.clone()),
            },
            restored.as_ref().map_or(0, |c| c.epoch),
            Metrics::new().checkpoints("job"),
        );
        let released = CancellationToken::new();
        released.cancel();
        let (rx, source) = pipeline::spawn_source(
            Box::new(Numbered {
                next: 0,
                batches: 200,
            }),
            SourceTask {
                shutdown: CancellationToken::new(),
                release: released,
                metrics: crate::metrics::SourceMetrics::detached(),
                status: StatusCell::default(),
                pipeline: "p".into(),
                checkpoints: Some(checkpoints),
                restore: snapshot("p/source"),
                instance_id: None,
                worker: Worker::ONLY,
            },
        );
        let fanout = Fanout::new();
        let sink = pipeline::spawn_sink(
            Box::new(Transactional {
                open: Vec::new(),
                pending: Vec::new(),
                out: out.clone(),
            }),
            fanout.subscribe(),
            SinkTask {
                metrics: crate::metrics::SinkMetrics::default(),
                status: StatusCell::default(),
                pipeline: "p".into(),
                committed: Some(coordinator.committed()),
                restore: snapshot("p/sink"),
                commit_log: None,
            },
        );
        let mut tasks = vec![source, sink];
        tasks.extend(pipeline::spawn_stages(
            rx,
            vec![Stage::Sync(Box::new(window))],
            0,
            fanout,
            &Metrics::new(),
            "p",
            "p",
            &StatusCell::default(),
        ));
        Run { tasks, coordinator }
    }

    fn rows(out: &Published) -> Vec<String> {
        let batches: Vec<RecordBatch> = out
            .lock()
            .expect("lock")
            .values()
            .flatten()
            .cloned()
            .collect();
        let mut lines: Vec<String> = arrow::util::pretty::pretty_format_batches(&batches)
            .expect("format")
            .to_string()
            .lines()
            .filter(|l| l.starts_with("| 19"))
            .map(str::to_string)
            .collect();
        lines.sort();
        lines
    }

    /// Runs a coordinator for `job` (query fingerprint `ours`) whose epoch 1 another process
    /// committed first (with `theirs`): it commits nothing, takes no further checkpoint, and
    /// fails its pipeline (external, so that a restart restores what the other committed).
    async fn fenced(ours: &str, theirs: &str) -> crate::pipeline::Failure {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = CheckpointStore::local(dir.path(), 3).expect("store");
        let other = Checkpoint {
            epoch: 1,
            fingerprints: BTreeMap::from([("job".to_string(), theirs.to_string())]),
            ..Checkpoint::default()
        };
        store.write("job", &other).await.expect("the other process");
        let status = StatusCell::default();
        let (coordinator, mut checkpoints) = Coordinator::spawn(
            "job",
            CheckpointConfig {
                status: Some(status.clone()),
                interval: Duration::from_millis(20),
                store: Some(store.clone()),
            },
            0,
            Metrics::new().checkpoints("job"),
        );
        coordinator.set_fingerprint("job", ours.to_string());
        let barrier = tokio::time::timeout(Duration::from_secs(5), checkpoints.barriers.recv())
            .await
            .expect("a barrier")
            .expect("open");
        assert_eq!(barrier.epoch, 1);
        barrier.ack();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let failure = loop {
            if let crate::pipeline::PipelineStatus::Failed(f) = status.get()
                && f.external
            {
                break f;
            }
            assert!(tokio::time::Instant::now() < deadline, "the pipeline fails");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!(
            *coordinator.committed().borrow(),
            0,
            "nothing committed here"
        );
        let next =
            tokio::time::timeout(Duration::from_millis(300), checkpoints.barriers.recv()).await;
        assert!(
            next.is_err() || next.is_ok_and(|b| b.is_none()),
            "no further checkpoint"
        );
        failure
    }

    /// A cluster's partition moved while this process still ran it (the new owner
    /// committed epoch 1 first), or a process started with other SQL took its checkpoint:
    /// the error says which.
    #[tokio::test]
    async fn a_coordinator_whose_epoch_another_process_committed_stops_and_fails_the_pipeline() {
        let moved = fenced("q1", "q1").await;
        assert!(moved.cause.contains("no longer owns it"), "{}", moved.cause);
        let other_sql = fenced("q2", "q1").await;
        assert!(
            other_sql.cause.contains("runs a different query"),
            "{}",
            other_sql.cause
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_job_killed_and_restored_emits_every_window_once() {
        // Uninterrupted.
        let dir = tempfile::tempdir().expect("tempdir");
        let store = CheckpointStore::local(dir.path(), 3).expect("store");
        let expected = Published::default();
        let run = start(&store, &expected).await;
        for task in run.tasks {
            task.await.expect("task");
        }
        let expected = rows(&expected);
        assert_eq!(expected.len(), 20 * 3, "20 windows of 3 keys");

        // Killed twice mid-run (tasks aborted: no last checkpoint), then run to the end.
        let dir = tempfile::tempdir().expect("tempdir");
        let store = CheckpointStore::local(dir.path(), 3).expect("store");
        let out = Published::default();
        for _ in 0..2 {
            let run = start(&store, &out).await;
            tokio::time::sleep(Duration::from_millis(150)).await;
            for task in &run.tasks {
                task.abort();
            }
            drop(run.coordinator);
            for task in run.tasks {
                let _ = task.await;
            }
        }
        let run = start(&store, &out).await;
        for task in run.tasks {
            task.await.expect("task");
        }
        assert_eq!(
            rows(&out),
            expected,
            "no window lost, none twice, none partial"
        );
        let last = store
            .latest("job")
            .await
            .expect("read")
            .expect("a checkpoint");
        assert!(last.epoch > 3, "checkpoints were taken: {}", last.epoch);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stop_takes_a_last_checkpoint_and_emits_nothing_partial() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = CheckpointStore::local(dir.path(), 3).expect("store");
        let expected = Published::default();
        for task in start(&store, &expected).await.tasks {
            task.await.expect("task");
        }
        let expected = rows(&expected);

        let dir = tempfile::tempdir().expect("tempdir");
        let store = CheckpointStore::local(dir.path(), 3).expect("store");
        let out = Published::default();
        let mut run = start(&store, &out).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(
            run.coordinator.stop(Duration::from_secs(10)).await,
            "stopped in time"
        );
        for task in run.tasks {
            task.await.expect("task");
        }
        let partial = rows(&out);
        assert!(partial.len() < expected.len(), "stopped before the end");
        for line in &partial {
            assert!(
                expected.contains(line),
                "a partial window was emitted: {line}"
            );
        }
        for task in start(&store, &out).await.tasks {
            task.await.expect("task");
        }
        assert_eq!(rows(&out), expected, "the rest after the restart, once");
    }
}
