//! Running pipelines: start, stop, shut down.
//!
//! Starting and stopping are split around the engine's lock: what waits on the world (a
//! checkpoint read from the store, a job's last checkpoint at a stop, tasks ending) runs
//! without it, and the bookkeeping (the running pipelines, their jobs) under it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use weir_planner::catalog::Catalog;
use weir_planner::continuous::Partitioning;
use weir_planner::{PlanError, Result};
use weir_runtime::Message;
use weir_runtime::connector::SourceFactory;
use weir_runtime::coordinator::{CheckpointConfig, Coordinator};
use weir_runtime::exchange::{self, KeyRouter};
use weir_runtime::mv_store::MvSink;
use weir_runtime::operator::Stage;
use weir_runtime::pipeline::{
    self, Fanout, PipelineStatus, SinkTask, SourceTask, StatusCell, Worker,
};
use weir_runtime::{CancellationToken, Checkpoint, CommitLog, Snapshot};
use weir_sql::ObjectKind;

use super::{Engine, Job, PipelineRow, Running, State, cluster};

/// How long a stop waits for a job's last checkpoint before tearing it down.
const STOP_WAIT: Duration = Duration::from_secs(30);

/// A pipeline taken out of the engine's state by [`Engine::take_pipeline`], to be stopped
/// by [`Engine::stop_pipeline`] without the lock.
pub(super) struct Stopping {
    name: String,
    running: Running,
    /// The job it heads, if it heads one.
    job: Option<Job>,
}

impl State {
    /// One row per running pipeline, for `SHOW QUERIES`.
    pub(super) fn pipeline_rows(&self) -> Vec<PipelineRow> {
        self.running
            .iter()
            .map(|(n, r)| PipelineRow {
                name: n.clone(),
                kind: r.kind,
                input: r.input.clone(),
                status: r.status.get(),
                started: r.started,
                restarts: self
                    .restarts
                    .get(&r.job)
                    .map(|x| (x.total, x.last_failure.clone()))
                    .unwrap_or_default(),
                checkpoints: self
                    .jobs
                    .get(&r.job)
                    .map(|j| j.coordinator.info())
                    .unwrap_or_default(),
                // A sink following a view on a cluster runs in the view's instances.
                instances: r
                    .cluster
                    .as_ref()
                    .or_else(|| self.running.get(&r.job)?.cluster.as_ref())
                    .map(|c| c.instance_names())
                    .unwrap_or_default(),
            })
            .collect()
    }
}

impl Engine {
    /// Starts every pipeline defined so far, and the supervisor that restarts those that
    /// fail; from now on new ones start at CREATE.
    pub async fn start_all(self: &Arc<Self>) -> Result<()> {
        let names: Vec<String> = {
            let mut state = self.lock();
            state.started = true;
            state
                .catalog
                .in_order()
                .filter(|e| matches!(e.kind, ObjectKind::MaterializedView | ObjectKind::Sink))
                .map(|e| e.name.clone())
                .collect()
        };
        for name in names {
            // One pipeline that cannot start (its checkpoint unreadable, say) does not keep
            // the others from running; SHOW QUERIES says why.
            if let Err(e) = self.start_saved(&name).await {
                tracing::error!(pipeline = %name, error = %e, "pipeline cannot start");
            }
        }
        self.release.cancel();
        self.start_supervisor();
        Ok(())
    }

    /// Starts the pipeline of catalog object `name`, restored from its last checkpoint.
    async fn start_saved(&self, name: &str) -> Result<()> {
        let checkpoint = self.saved_checkpoint(name).await?;
        let mut state = self.lock();
        self.start_pipeline(&mut state, name, checkpoint, &self.release)
    }

    /// [`Engine::stored_checkpoint`] of catalog object `name`.
    pub(super) async fn saved_checkpoint(&self, name: &str) -> Result<Option<Arc<Checkpoint>>> {
        let input = self
            .lock()
            .catalog
            .get(name)
            .and_then(|e| e.depends_on.first().cloned())
            .ok_or_else(|| PlanError::Internal(format!("pipeline {name} reads nothing")))?;
        self.stored_checkpoint(name, &input).await
    }

    /// The last complete checkpoint of the job that pipeline `name` heads when it reads
    /// `input`, read from the store (which may be remote) without the lock. `None` when it
    /// joins the job of the view it reads, or has none.
    pub(super) async fn stored_checkpoint(
        &self,
        name: &str,
        input: &str,
    ) -> Result<Option<Arc<Checkpoint>>> {
        let Some(store) = &self.store else {
            return Ok(None);
        };
        let joins_view = self
            .lock()
            .running
            .get(input)
            .is_some_and(|r| r.output.is_some());
        if joins_view {
            return Ok(None);
        }
        match store.latest(name).await {
            Ok(checkpoint) => Ok(checkpoint.map(Arc::new)),
            Err(e) => Err(match PlanError::from(e) {
                PlanError::External { sqlstate, message } => PlanError::External {
                    sqlstate,
                    message: format!("cannot read the last checkpoint of {name}: {message}"),
                },
                other => other,
            }),
        }
    }

    /// Starts the pipeline of view or sink `name`: a job of its own when it reads a stream
    /// (restored from `stored`, its job's last checkpoint), or a part of the view's job when
    /// it reads a materialized view. Its sources begin once `release` is cancelled.
    pub(super) fn start_pipeline(
        &self,
        state: &mut State,
        name: &str,
        stored: Option<Arc<Checkpoint>>,
        release: &CancellationToken,
    ) -> Result<()> {
        let entry = state
            .catalog
            .get(name)
            .ok_or_else(|| PlanError::Internal(format!("starting unknown pipeline {name}")))?
            .clone();
        let restore_started = Instant::now();
        let stop = self.shutdown.child_token();
        let status = StatusCell::default();
        let mut tasks = Vec::new();
        let input_name = entry
            .depends_on
            .first()
            .cloned()
            .ok_or_else(|| PlanError::Internal(format!("pipeline {name} reads nothing")))?;
        let fingerprint = fingerprint(&state.catalog, name);
        let view_output = state
            .running
            .get(&input_name)
            .and_then(|r| r.output.clone().map(|o| (o, r.job.clone())));
        // The job's checkpoint, if it has one and this pipeline's plan is the one saved.
        let (job, restored) = match &view_output {
            Some((_, job)) => {
                let restored = state.jobs.get(job).and_then(|j| j.restored.clone());
                (job.clone(), restored)
            }
            None => (name.to_string(), stored),
        };
        let saved = restored.as_ref().and_then(|c| {
            match c.fingerprints.get(name) {
                Some(f) if *f == fingerprint => Some(c.clone()),
                Some(_) => {
                    tracing::warn!(pipeline = %name, epoch = c.epoch,
                        "the pipeline's query or inputs changed since its last checkpoint: it starts fresh");
                    None
                }
                None => None,
            }
        });
        let snapshot = |participant: &str| -> Option<Snapshot> {
            saved
                .as_ref()
                .and_then(|c| c.snapshots.get(participant).cloned())
        };
        if let Some(view) = state
            .running
            .get(&input_name)
            .and_then(|r| r.cluster.as_ref())
        {
            // On a cluster, a sink reading a view runs inside the view's instances.
            let not_here = |what: &str| {
                PlanError::NotSupported(format!(
                    "on a cluster, {name} cannot read materialized view {input_name}: {what}"
                ))
            };
            if entry.kind != ObjectKind::Sink {
                return Err(not_here(
                    "only sinks read views there; write the view's query in it",
                ));
            }
            if entry
                .plan
                .as_ref()
                .is_some_and(|p| !matches!(p.partitioning(), Partitioning::RowByRow))
            {
                return Err(not_here(
                    "a sink reading a view there works row by row; aggregate in the view",
                ));
            }
            view.follow(cluster::Follower {
                name: name.to_string(),
                fingerprint,
                plan: entry.plan.clone(),
                sink: entry
                    .sink
                    .clone()
                    .ok_or_else(|| PlanError::Internal(format!("sink {name} has no factory")))?,
                status: status.clone(),
            });
            let running = Running::new(entry.kind, &input_name, stop, status, &input_name);
            self.insert_running(state, name, running);
            return Ok(());
        }
        // The stream it reads, when it heads a job of its own, and how many workers read it.
        let source = match &view_output {
            Some(_) => None,
            None => {
                let source_entry = state.catalog.get_kind(&input_name, ObjectKind::Stream)?;
                let factory = source_entry.source.clone().ok_or_else(|| {
                    PlanError::Internal(format!("stream {input_name} has no source"))
                })?;
                Some(factory)
            }
        };
        // On a cluster, a pipeline over a partitioned input runs as instances per partition.
        if let (Some(cluster), Some(factory)) = (&self.cluster, &source)
            && let Some(input) = factory.partitioned()
        {
            let output =
                match entry.kind {
                    ObjectKind::MaterializedView => {
                        cluster::Output::View(entry.store.clone().ok_or_else(|| {
                            PlanError::Internal(format!("view {name} has no store"))
                        })?)
                    }
                    _ => cluster::Output::Sink(entry.sink.clone().ok_or_else(|| {
                        PlanError::Internal(format!("sink {name} has no factory"))
                    })?),
                };
            let pipeline = cluster::ClusterPipeline::start(cluster::Spec {
                cluster: cluster.clone(),
                pipeline: name.to_string(),
                input_name: input_name.clone(),
                fingerprint,
                plan: entry.plan.clone(),
                input,
                output,
                metrics: self.metrics.clone(),
                store: self.store.clone(),
                interval: entry
                    .checkpoint_interval
                    .unwrap_or(self.checkpoint_interval),
                status: status.clone(),
                instance_id: self.instance_id.clone(),
                release: release.clone(),
                peers: self.peers.clone(),
            });
            let mut running = Running::new(entry.kind, &input_name, stop, status, name);
            running.cluster = Some(pipeline);
            self.insert_running(state, name, running);
            return Ok(());
        }
        let workers = match &source {
            Some(factory) => self.workers_for(name, &entry, factory.as_ref(), saved.as_deref()),
            None => 1,
        };
        let mut worker_stages = Vec::with_capacity(workers);
        for index in 0..workers {
            let participant = Worker {
                index,
                count: workers,
            }
            .participant(name);
            let mut stages = match &entry.plan {
                Some(plan) => plan.stages(&self.metrics, name)?,
                None => Vec::new(),
            };
            for (i, stage) in stages.iter_mut().enumerate() {
                if let Stage::Sync(op) = stage
                    && let Some(state) = snapshot(&format!("{participant}/op{i}"))
                {
                    op.restore(state).map_err(|e| {
                        PlanError::Internal(format!(
                            "cannot restore operator {i} of {name} from its checkpoint: {e}"
                        ))
                    })?;
                }
            }
            worker_stages.push(stages);
        }
        let fanout = Fanout::new();
        let mut output = None;
        let (sink, label): (Box<dyn weir_runtime::Sink>, &str) = match entry.kind {
            ObjectKind::MaterializedView => {
                let store = entry
                    .store
                    .clone()
                    .ok_or_else(|| PlanError::Internal(format!("view {name} has no store")))?;
                output = Some(fanout.clone());
                (Box::new(MvSink(store)), "view")
            }
            ObjectKind::Sink => {
                let factory = entry
                    .sink
                    .clone()
                    .ok_or_else(|| PlanError::Internal(format!("sink {name} has no factory")))?;
                (factory.create(&self.metrics)?, factory.connector())
            }
            other => return Err(PlanError::Internal(format!("a {other} has no pipeline"))),
        };
        let position = match (&source, &saved) {
            (Some(factory), Some(checkpoint)) => {
                source_position(factory.as_ref(), checkpoint, name)?
            }
            _ => None,
        };
        // One source per worker (none when it reads a view).
        let sources = match &source {
            Some(factory) => (0..workers)
                .map(|_| factory.create())
                .collect::<std::result::Result<Vec<_>, _>>()?,
            None => Vec::new(),
        };
        // Only now, with everything that can fail created, start reading.
        // The rows entering this pipeline's operators: fresh sources, or a view's output.
        let mut source_metrics = None;
        let (inputs, committed) = match view_output {
            Some((view_output, job)) => {
                let coordinator = &state
                    .jobs
                    .get(&job)
                    .ok_or_else(|| PlanError::Internal(format!("no job {job}")))?
                    .coordinator;
                coordinator.set_fingerprint(name, fingerprint);
                (vec![view_output.subscribe()], coordinator.committed())
            }
            None => {
                let connector = source.as_ref().map_or("", |f| f.connector());
                let metrics = self.metrics.source(&input_name, name, connector);
                source_metrics = Some(metrics.clone());
                let config = CheckpointConfig {
                    status: Some(status.clone()),
                    interval: entry
                        .checkpoint_interval
                        .unwrap_or(self.checkpoint_interval),
                    store: self.store.clone(),
                };
                // Epochs go on from the last checkpoint even when its state is not restored
                // (the query changed): sinks' commit records refer to them.
                let (coordinator, checkpoints) = Coordinator::spawn_sources(
                    name,
                    config,
                    restored.as_ref().map_or(0, |c| c.epoch),
                    self.metrics.checkpoints(name),
                    workers,
                );
                coordinator.set_fingerprint(name, fingerprint);
                let committed = coordinator.committed();
                let mut inputs = Vec::with_capacity(workers);
                for (index, (source, checkpoints)) in
                    sources.into_iter().zip(checkpoints).enumerate()
                {
                    let (rx, task) = pipeline::spawn_source(
                        source,
                        SourceTask {
                            shutdown: stop.clone(),
                            release: release.clone(),
                            metrics: metrics.clone(),
                            status: status.clone(),
                            pipeline: name.to_string(),
                            checkpoints: Some(checkpoints),
                            restore: position.clone(),
                            instance_id: self.instance_id.clone(),
                            worker: Worker {
                                index,
                                count: workers,
                            },
                        },
                    );
                    tasks.push(task);
                    inputs.push(rx);
                }
                if let Some(c) = &saved {
                    coordinator.restored(c.epoch, restore_started.elapsed());
                    self.metrics
                        .checkpoints(name)
                        .restore_seconds
                        .set(restore_started.elapsed().as_secs_f64());
                    tracing::info!(pipeline = %name, epoch = c.epoch, workers,
                        ms = restore_started.elapsed().as_millis() as u64, "restored from checkpoint");
                }
                state.jobs.insert(
                    name.to_string(),
                    Job {
                        coordinator,
                        restored: saved.clone(),
                    },
                );
                (inputs, committed)
            }
        };
        tasks.push(pipeline::spawn_sink(
            sink,
            fanout.subscribe(),
            SinkTask {
                metrics: self.metrics.sink(name, label),
                status: status.clone(),
                pipeline: name.to_string(),
                committed: Some(committed),
                restore: snapshot(&format!("{name}/sink")),
                commit_log: self.store.clone().map(|store| CommitLog {
                    store,
                    job: job.clone(),
                }),
            },
        ));
        let partitioning = match &entry.plan {
            Some(plan) => plan.partitioning(),
            None => Partitioning::RowByRow,
        };
        let source_watermark = source_metrics.map(|m| m.watermark_ms());
        tasks.extend(self.spawn_workers(
            inputs,
            worker_stages,
            partitioning,
            fanout,
            name,
            &status,
            source_watermark,
        )?);
        let mut running = Running::new(entry.kind, &input_name, stop, status, &job);
        running.output = output;
        running.tasks = tasks;
        self.insert_running(state, name, running);
        Ok(())
    }

    /// Records `running` as pipeline `name`'s.
    fn insert_running(&self, state: &mut State, name: &str, running: Running) {
        self.metrics
            .pipelines_running(&running.kind.to_string())
            .inc();
        state.running.insert(name.to_string(), running);
    }

    /// How many workers run pipeline `name` over a source made by `factory` (see
    /// [`workers_to_run`]).
    fn workers_for(
        &self,
        name: &str,
        entry: &weir_planner::catalog::CatalogEntry,
        factory: &dyn SourceFactory,
        saved: Option<&Checkpoint>,
    ) -> usize {
        let partitioning = entry.plan.as_ref().map(|p| p.partitioning());
        let saved = saved.and_then(|c| saved_workers(c, name));
        let workers = workers_to_run(self.workers, factory.splittable(), partitioning, saved);
        if workers != self.workers && saved == Some(workers) {
            tracing::warn!(pipeline = %name, saved = workers, configured = self.workers,
                "the pipeline's window state was saved by {workers} workers: it keeps running on {workers}");
        }
        workers
    }

    /// Wires a pipeline's `inputs` (one per worker) through its stages into `output`. One
    /// worker: the stages in a row. Several (see `weir_runtime::exchange`): each worker's
    /// stages before the keyed step, a router per worker sending each row to the worker its
    /// key hashes to, a merge per worker in front of the keyed step and what follows, and
    /// one last merge into `output`.
    #[allow(clippy::too_many_arguments)]
    fn spawn_workers(
        &self,
        mut inputs: Vec<mpsc::Receiver<Message>>,
        mut stages: Vec<Vec<Stage>>,
        partitioning: Partitioning,
        output: Arc<Fanout>,
        name: &str,
        status: &StatusCell,
        source_watermark: Option<weir_runtime::metrics::Gauge>,
    ) -> Result<Vec<JoinHandle<()>>> {
        let n = inputs.len();
        let metrics = &self.metrics;
        let participant = |index| Worker { index, count: n }.participant(name);
        if n == 1 {
            let (input, stages) = (inputs.remove(0), stages.remove(0));
            return Ok(pipeline::spawn_stages(
                input, stages, 0, output, metrics, name, name, status,
            ));
        }
        // Worker `k`'s `stages` (the first numbered `first`) on `input`: their output, and
        // their tasks.
        let on_worker = |k: usize, input, stages, first| {
            let out = Fanout::new();
            let output = out.subscribe();
            let tasks = pipeline::spawn_stages(
                input,
                stages,
                first,
                out,
                metrics,
                name,
                &participant(k),
                status,
            );
            (output, tasks)
        };
        let mut tasks = Vec::new();
        // Each worker's output, before the last merge.
        let mut outputs = Vec::with_capacity(n);
        let partitioning_was_by_key = matches!(partitioning, Partitioning::ByKey { .. });
        match partitioning {
            Partitioning::ByKey { step, keys } => {
                let mut to_merge: Vec<Vec<mpsc::Receiver<Message>>> =
                    (0..n).map(|_| Vec::with_capacity(n)).collect();
                let mut keyed = Vec::with_capacity(n);
                for (k, (input, mut before)) in inputs.into_iter().zip(stages).enumerate() {
                    keyed.push(before.split_off(step));
                    let routed = if before.is_empty() {
                        input
                    } else {
                        let (routed, spawned) = on_worker(k, input, before, 0);
                        tasks.extend(spawned);
                        routed
                    };
                    let (senders, receivers) = exchange::channels(n);
                    for (j, receiver) in receivers.into_iter().enumerate() {
                        to_merge[j].push(receiver);
                    }
                    let router = KeyRouter::try_new(keys.clone(), n)?;
                    tasks.push(exchange::spawn_router(
                        routed, router, senders, status, name,
                    ));
                }
                for (j, (merge_inputs, after)) in to_merge.into_iter().zip(keyed).enumerate() {
                    let merged = Fanout::new();
                    let input = merged.subscribe();
                    tasks.push(exchange::spawn_merge(
                        merge_inputs,
                        merged,
                        status,
                        name,
                        source_watermark.clone(),
                    ));
                    let (output, spawned) = on_worker(j, input, after, step);
                    tasks.extend(spawned);
                    outputs.push(output);
                }
            }
            Partitioning::RowByRow | Partitioning::Single => {
                for (k, (input, stages)) in inputs.into_iter().zip(stages).enumerate() {
                    let (output, spawned) = on_worker(k, input, stages, 0);
                    tasks.extend(spawned);
                    outputs.push(output);
                }
            }
        }
        // After a keyed step the watermark is the windows', not the sources'.
        let watermark = if partitioning_was_by_key {
            None
        } else {
            source_watermark
        };
        tasks.push(exchange::spawn_merge(
            outputs, output, status, name, watermark,
        ));
        Ok(tasks)
    }

    /// Takes pipeline `name` out of the running ones. One reading a view leaves its job at
    /// once: the job's next checkpoint no longer has it.
    pub(super) fn take_pipeline(&self, state: &mut State, name: &str) -> Option<Stopping> {
        let running = state.running.remove(name)?;
        self.metrics
            .pipelines_running(&running.kind.to_string())
            .dec();
        let job = if running.job == name {
            state.jobs.remove(name)
        } else {
            if let Some(job) = state.jobs.get(&running.job) {
                job.coordinator.remove_pipeline(name);
            }
            if let Some(view) = state
                .running
                .get(&running.job)
                .and_then(|r| r.cluster.as_ref())
            {
                view.unfollow(name);
            }
            None
        };
        Some(Stopping {
            name: name.to_string(),
            running,
            job,
        })
    }

    /// Stops a pipeline [`Engine::take_pipeline`] took out. A job's pipeline takes a last
    /// checkpoint (its source stops where it is; nothing partial is emitted) and ends its
    /// job; with `delete_checkpoints` (a DROP) the job's checkpoints go too, so that a
    /// pipeline created again under the name starts fresh. A pipeline reading a view is
    /// torn down; the pipelines reading a view are stopped before it (DROP orders them so).
    pub(super) async fn stop_pipeline(&self, stopping: Stopping, delete_checkpoints: bool) {
        let Stopping {
            name,
            mut running,
            job,
        } = stopping;
        if running.job != name {
            for task in running.tasks.drain(..) {
                task.abort();
            }
            return;
        }
        let headed_job = job.is_some() || running.cluster.is_some();
        if let Some(cluster) = running.cluster.as_mut() {
            cluster.stop(STOP_WAIT).await;
        }
        if let Some(mut job) = job
            && !job.coordinator.stop(STOP_WAIT).await
        {
            tracing::warn!(pipeline = %name,
                "the last checkpoint did not complete in time; the pipeline resumes from the one before");
        }
        running.stop.cancel();
        end_tasks(&name, &mut running, Duration::from_secs(10)).await;
        if delete_checkpoints
            && headed_job
            && let Some(store) = &self.store
            && let Err(e) = store.delete_job(&name).await
        {
            tracing::warn!(pipeline = %name, error = %e, "cannot delete the checkpoints of a dropped pipeline");
        }
    }

    /// Tears a pipeline [`Engine::take_pipeline`] took out down without a last checkpoint,
    /// as a crash would (a restart after a failure): its source stops where it is, nothing
    /// more is committed, and a task still running after a few seconds is aborted.
    pub(super) async fn abort_pipeline(&self, stopping: Stopping) {
        let Stopping {
            name,
            mut running,
            job,
        } = stopping;
        // The coordinator's task ends with it: no checkpoint is taken or completed now.
        drop(job);
        if let Some(cluster) = running.cluster.as_mut() {
            cluster.abort().await;
        }
        running.stop.cancel();
        end_tasks(&name, &mut running, Duration::from_secs(5)).await;
    }

    /// Stops every pipeline: each job takes a last checkpoint (sources stop where they are,
    /// sinks publish what it covers, nothing partial is emitted), then its tasks end. A job
    /// whose checkpoint does not complete within `grace` is torn down; it resumes from its
    /// previous checkpoint.
    pub async fn shutdown(&self, grace: Duration) {
        let mut jobs: Vec<(String, Job)> = {
            let mut state = self.lock();
            // Nothing starts from now on: not a CREATE's pipeline, not a restart.
            state.started = false;
            state.jobs.drain().collect()
        };
        let mut clusters: Vec<cluster::ClusterPipeline> = self
            .lock()
            .running
            .values_mut()
            .filter_map(|r| r.cluster.take())
            .collect();
        let instances = clusters.iter_mut().map(|c| c.stop(grace));
        let stops = jobs.iter_mut().map(|(_, job)| job.coordinator.stop(grace));
        let (stopped, _) = futures::future::join(
            futures::future::join_all(stops),
            futures::future::join_all(instances),
        )
        .await;
        for ((name, _), ok) in jobs.iter().zip(stopped) {
            if !ok {
                tracing::warn!(pipeline = %name, ?grace,
                    "the last checkpoint did not complete in time; the pipeline resumes from the one before");
            }
        }
        let all = futures::future::join_all(self.take_tasks());
        if tokio::time::timeout(Duration::from_secs(10), all)
            .await
            .is_err()
        {
            tracing::warn!("some pipelines did not end after their last checkpoint");
        }
        self.shutdown.cancel();
    }

    /// Waits until every pipeline has finished by itself (all sources bounded and done).
    pub async fn wait_finished(&self) {
        futures::future::join_all(self.take_tasks()).await;
    }

    /// Every running pipeline's tasks, to wait for without the lock.
    fn take_tasks(&self) -> Vec<JoinHandle<()>> {
        self.lock()
            .running
            .values_mut()
            .flat_map(|r| r.tasks.drain(..))
            .collect()
    }

    /// Every running pipeline's row, as `SHOW QUERIES` and `/health` report them.
    pub fn pipelines(&self) -> Vec<PipelineRow> {
        self.lock().pipeline_rows()
    }

    /// Failures of pipelines, by name.
    pub async fn failures(&self) -> Vec<(String, String)> {
        self.lock()
            .running
            .iter()
            .map(|(n, r)| (n, &r.status))
            .filter_map(|(n, status)| match status.get() {
                PipelineStatus::Failed(e) => Some((n.clone(), e.cause)),
                _ => None,
            })
            .collect()
    }
}

/// What a pipeline's saved state depends on: its own statement and those of everything it
/// reads, transitively. State saved under another fingerprint is not restored.
/// How many workers run a pipeline: `configured` for a source that splits (Kafka), one
/// otherwise or for a plan with more than one keyed step. A plan whose window state was
/// saved by `saved` workers keeps that number, whatever is configured: each worker's state
/// holds the keys that hash to it, and moving keys between workers on restore is not built
/// yet.
fn workers_to_run(
    configured: usize,
    splittable: bool,
    partitioning: Option<Partitioning>,
    saved: Option<usize>,
) -> usize {
    if !splittable {
        return 1;
    }
    match partitioning {
        Some(Partitioning::Single) => 1,
        Some(Partitioning::ByKey { .. }) => saved.unwrap_or(configured),
        Some(Partitioning::RowByRow) | None => configured,
    }
}

/// How many workers saved window state for pipeline `name` in `checkpoint`: `None` if none
/// did (a stateless pipeline's workers save only source positions, which merge).
fn saved_workers(checkpoint: &Checkpoint, name: &str) -> Option<usize> {
    let mut count = None;
    for id in checkpoint.snapshots.keys() {
        let Some(rest) = id.strip_prefix(name).and_then(|r| r.strip_prefix('/')) else {
            continue;
        };
        let workers = match rest.split_once('/') {
            Some((worker, op)) if op.starts_with("op") => worker
                .strip_prefix('w')
                .and_then(|w| w.parse::<usize>().ok())
                .map(|w| w + 1),
            None if rest.starts_with("op") => Some(1),
            _ => None,
        };
        if let Some(workers) = workers {
            count = Some(count.map_or(workers, |c: usize| c.max(workers)));
        }
    }
    count
}

/// Where the sources of pipeline `name` resume: the position its source saved, or the one
/// merged from those its workers saved (`<name>/source`, `<name>/w<i>/source`).
fn source_position(
    factory: &dyn SourceFactory,
    checkpoint: &Checkpoint,
    name: &str,
) -> Result<Option<Snapshot>> {
    let positions: Vec<Snapshot> = checkpoint
        .snapshots
        .iter()
        .filter(|(id, _)| {
            id.strip_prefix(name)
                .and_then(|r| r.strip_prefix('/'))
                .and_then(|r| r.strip_suffix("source"))
                .is_some_and(|worker| {
                    worker.is_empty()
                        || worker
                            .strip_prefix('w')
                            .and_then(|w| w.strip_suffix('/'))
                            .is_some_and(|w| w.parse::<usize>().is_ok())
                })
        })
        .map(|(_, snapshot)| snapshot.clone())
        .collect();
    if positions.is_empty() {
        return Ok(None);
    }
    factory
        .merge_positions(positions)
        .map(Some)
        .map_err(|e| PlanError::Internal(format!("cannot restore the sources of {name}: {e}")))
}

pub(super) fn fingerprint(catalog: &Catalog, name: &str) -> String {
    let mut seen = Vec::new();
    let mut stack = vec![name.to_string()];
    while let Some(object) = stack.pop() {
        if seen.contains(&object) {
            continue;
        }
        if let Some(entry) = catalog.get(&object) {
            stack.extend(entry.depends_on.iter().cloned());
        }
        seen.push(object);
    }
    seen.sort();
    seen.iter()
        .filter_map(|o| catalog.get(o).map(|e| e.sql.trim().to_string()))
        .collect::<Vec<_>>()
        .join(";\n")
}

/// Waits up to `wait` for each of a pipeline's tasks to end, and aborts one that has not
/// (waiting for that to take effect: nothing of the old pipeline runs once this returns).
async fn end_tasks(name: &str, running: &mut Running, wait: Duration) {
    for mut task in running.tasks.drain(..) {
        if tokio::time::timeout(wait, &mut task).await.is_err() {
            tracing::warn!(pipeline = %name, ?wait, "pipeline did not stop in time; aborted");
            task.abort();
            let _ = task.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpoint(ids: &[&str]) -> Checkpoint {
        Checkpoint {
            epoch: 1,
            started_ms: 0,
            fingerprints: Default::default(),
            snapshots: ids
                .iter()
                .map(|id| (id.to_string(), Snapshot::meta(serde_json::json!({}))))
                .collect(),
        }
    }

    #[test]
    fn the_workers_that_saved_window_state_are_counted_from_its_ids() {
        let one = checkpoint(&["v/source", "v/op2", "v/sink", "lake/sink"]);
        assert_eq!(saved_workers(&one, "v"), Some(1));
        let three = checkpoint(&["v/w0/source", "v/w2/op2", "v/w1/op2", "v/sink"]);
        assert_eq!(saved_workers(&three, "v"), Some(3));
        // Positions alone (a pipeline that works row by row) bind no worker count.
        let stateless = checkpoint(&["v/w0/source", "v/w1/source", "v/sink"]);
        assert_eq!(saved_workers(&stateless, "v"), None);
        // Another pipeline of the job, whose name starts alike, is not counted.
        let other = checkpoint(&["v2/w3/op1"]);
        assert_eq!(saved_workers(&other, "v"), None);
    }

    #[test]
    fn window_state_keeps_the_workers_that_saved_it_whatever_is_configured() {
        let by_key = || {
            Some(Partitioning::ByKey {
                step: 0,
                keys: Vec::new(),
            })
        };
        assert_eq!(workers_to_run(4, true, by_key(), None), 4);
        assert_eq!(workers_to_run(1, true, by_key(), Some(2)), 2);
        assert_eq!(workers_to_run(4, true, by_key(), Some(2)), 2);
        assert_eq!(
            workers_to_run(4, true, Some(Partitioning::RowByRow), Some(2)),
            4
        );
        assert_eq!(workers_to_run(4, true, Some(Partitioning::Single), None), 1);
        assert_eq!(workers_to_run(4, false, by_key(), None), 1);
    }
}
