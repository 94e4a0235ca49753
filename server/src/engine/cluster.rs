//! Pipelines on a cluster (`weir serve --cluster NAME`): processes started with the same
//! name and SQL share each Kafka-sourced pipeline through Kafka's groups.
//!
//! A pipeline runs as *instances*, each a small pipeline of its own with its own
//! coordinator and checkpoints in the shared store:
//!
//! - `<pipeline>/p<n>` per source partition `n` the group `weir-<cluster>-<pipeline>` gives
//!   this process: the source partition, the row-by-row steps, then either the sink (a
//!   query without a window) or the shuffle writer (a window's partial phase first, when
//!   pre-aggregating);
//! - `<pipeline>/r<q>` per partition `q` of the shuffle topic the group
//!   `weir-<cluster>-<pipeline>-repartition-<hash>` gives it: the shuffle reader, the window
//!   (its final phase) and what follows, and the sink.
//!
//! A sink reading a materialized view on a cluster (`CREATE SINK s FROM v`) is a
//! *follower* of the view: it runs inside each of the view's instances that write the view
//! (the `r<q>`, or the `p<n>` of a view without a window), fed the rows the instance writes,
//! and is checkpointed with it. So a view and the sinks reading it are one job on the
//! cluster as in one process: the same rows reach the view, the lake and Prometheus, and
//! each source record is read once for all of them.
//!
//! A revoked partition's instance stops with a last checkpoint before the group hands it
//! on; an assigned one restores its last checkpoint. A process killed takes no last
//! checkpoint: the next owner resumes from the one before, and the shuffle's protocol
//! (`weir_connectors::kafka` repartition) drops what the dead instance had not committed.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use weir_planner::continuous::{ContinuousPlan, Partitioning};
use weir_runtime::connector::{MembershipEvent, PartitionedSource, SinkFactory};
use weir_runtime::coordinator::{CheckpointConfig, Coordinator};
use weir_runtime::mv_store::{MvSink, MvStore};
use weir_runtime::operator::Stage;
use weir_runtime::pipeline::{
    self, Failure, Fanout, PipelineStatus, SinkTask, SourceTask, StatusCell, Worker,
};
use weir_runtime::{CancellationToken, CheckpointStore, CommitLog, Metrics, Snapshot};

use super::peers::{Peers, ViewGather};

/// How long an instance's last checkpoint may take when it stops.
const STOP_WAIT: Duration = Duration::from_secs(30);
/// How long a change of a view's followers settles before its instances restart.
const FOLLOWERS_SETTLE: Duration = Duration::from_millis(500);

/// How this process takes part in a cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub name: String,
    /// Send partial window aggregates through the shuffle, not rows (default).
    pub pre_aggregate: bool,
    /// Where the other processes reach this one's HTTP port, to gather a view's rows;
    /// `None` without an HTTP server (`weir run`).
    pub advertise: Option<String>,
    /// How often the instances writing the repartition topic commit, if more often than
    /// the pipeline's checkpoint interval. Their checkpoints hold offsets and the writer's
    /// epoch, no state, and each commit releases what they sent: it bounds the time from
    /// an event to its window's result.
    pub commit_interval: Option<Duration>,
}

/// Where an instance's rows go.
#[derive(Clone)]
pub(super) enum Output {
    View(Arc<MvStore>),
    Sink(Arc<dyn SinkFactory>),
}

/// What a cluster pipeline's instances are built from.
pub(super) struct Spec {
    pub cluster: ClusterConfig,
    pub pipeline: String,
    /// The stream read, for metrics.
    pub input_name: String,
    pub fingerprint: String,
    pub plan: Option<Arc<ContinuousPlan>>,
    pub input: Arc<dyn PartitionedSource>,
    pub output: Output,
    pub metrics: Metrics,
    pub store: Option<CheckpointStore>,
    pub interval: Duration,
    pub status: StatusCell,
    pub instance_id: Option<String>,
    pub release: CancellationToken,
    pub peers: Option<Arc<Peers>>,
}

/// A sink reading the view a cluster pipeline writes: it runs in each instance that
/// writes the view (see the module's documentation).
pub(super) struct Follower {
    pub name: String,
    pub fingerprint: String,
    /// Row-by-row steps over the view's rows, if any.
    pub plan: Option<Arc<ContinuousPlan>>,
    pub sink: Arc<dyn SinkFactory>,
    /// The follower's own status: its tasks' failures restart the view's job.
    pub status: StatusCell,
}

/// The followers a pipeline's instances run; a change restarts the instances that write
/// the view (each with a last checkpoint) so that they run the new set.
type Followers = watch::Sender<Vec<Arc<Follower>>>;

/// A running cluster pipeline: its instances in this process, and the tasks managing
/// them.
pub(super) struct ClusterPipeline {
    /// Stops every instance with a last checkpoint, then leaves the groups.
    stop: CancellationToken,
    /// Tears every instance down without one.
    abort: CancellationToken,
    task: Option<JoinHandle<()>>,
    /// Names of the instances running here, for `SHOW QUERIES`.
    instances: Arc<Mutex<BTreeMap<String, ()>>>,
    followers: Arc<Followers>,
}

impl ClusterPipeline {
    /// Starts pipeline `spec.pipeline` on the cluster: its groups are joined (and the
    /// shuffle topic created) on a task, off the engine's lock.
    pub fn start(spec: Spec) -> Self {
        let stop = CancellationToken::new();
        let abort = CancellationToken::new();
        let instances = Arc::new(Mutex::new(BTreeMap::new()));
        let followers = Arc::new(watch::Sender::new(Vec::new()));
        let task = {
            let (stop, abort, instances) = (stop.clone(), abort.clone(), instances.clone());
            let followers = followers.clone();
            let status = spec.status.clone();
            let pipeline = spec.pipeline.clone();
            pipeline::spawn_task(status.clone(), pipeline.clone(), "cluster", async move {
                let run = run(Arc::new(spec), stop, abort, instances, followers);
                if let Err(e) = run.await {
                    tracing::error!(pipeline = %pipeline, error = %e, "cluster pipeline failed");
                    status.set(PipelineStatus::Failed(Failure::of(&e)));
                }
            })
        };
        Self {
            stop,
            abort,
            task: Some(task),
            instances,
            followers,
        }
    }

    /// Runs `follower` in every instance that writes the view, from now on (replacing
    /// one of the same name).
    pub fn follow(&self, follower: Follower) {
        self.followers.send_modify(|all| {
            all.retain(|f| f.name != follower.name);
            all.push(Arc::new(follower));
        });
    }

    /// Stops running follower `name`.
    pub fn unfollow(&self, name: &str) {
        self.followers.send_if_modified(|all| {
            let before = all.len();
            all.retain(|f| f.name != name);
            all.len() != before
        });
    }

    /// The instances running in this process, by partition (`p3`, `r0`).
    pub fn instance_names(&self) -> Vec<String> {
        let instances = self.instances.lock().unwrap_or_else(|e| e.into_inner());
        instances
            .keys()
            .map(|n| partition_of(n).to_string())
            .collect()
    }

    /// Stops every instance with a last checkpoint (each within `wait`) and leaves the
    /// groups.
    pub async fn stop(&mut self, wait: Duration) {
        self.stop.cancel();
        if let Some(mut task) = self.task.take()
            && tokio::time::timeout(wait + Duration::from_secs(10), &mut task)
                .await
                .is_err()
        {
            self.abort.cancel();
            task.abort();
        }
    }

    /// Tears every instance down without a last checkpoint (a restart after a failure).
    pub async fn abort(&mut self) {
        self.abort.cancel();
        if let Some(mut task) = self.task.take()
            && tokio::time::timeout(Duration::from_secs(10), &mut task)
                .await
                .is_err()
        {
            task.abort();
        }
    }
}

/// The names a pipeline's groups and shuffle topic carry.
fn names(spec: &Spec) -> (String, String) {
    names_of(&spec.cluster, &spec.pipeline, &spec.fingerprint)
}

/// The group and shuffle topic names of `pipeline`, whose query (with its inputs') is
/// `fingerprint`, on `cluster`.
pub(super) fn names_of(
    cluster: &ClusterConfig,
    pipeline: &str,
    fingerprint: &str,
) -> (String, String) {
    // FNV-1a over the query and whether it pre-aggregates (what the shuffle's rows are):
    // stable across builds and processes, unlike `DefaultHasher`.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let what = [u8::from(cluster.pre_aggregate)];
    for &b in fingerprint.as_bytes().iter().chain(&what) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let hash = format!("{:08x}", h as u32);
    let base = format!("weir-{}-{pipeline}", cluster.name);
    let shuffle = format!("{base}-repartition-{hash}");
    (base, shuffle)
}

/// Which half of a split pipeline an instance runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// A source partition.
    Upstream,
    /// A shuffle partition.
    Downstream,
}

/// The shuffle of a pipeline with a window: its topic and partition count.
struct Shuffle {
    topic: String,
    partitions: usize,
    writers: usize,
}

async fn run(
    spec: Arc<Spec>,
    stop: CancellationToken,
    abort: CancellationToken,
    instances: Arc<Mutex<BTreeMap<String, ()>>>,
    followers: Arc<Followers>,
) -> weir_runtime::Result<()> {
    tokio::select! {
        () = spec.release.cancelled() => {}
        () = stop.cancelled() => return Ok(()),
        () = abort.cancelled() => return Ok(()),
    }
    let partitioning = spec
        .plan
        .as_ref()
        .map_or(Partitioning::RowByRow, |p| p.partitioning());
    let (group, shuffle_topic) = names(&spec);
    let input = spec.input.clone();
    let writers = tokio::task::spawn_blocking(move || input.partition_count())
        .await
        .map_err(|e| weir_runtime::Error::Internal(e.to_string()))??;
    let shuffle = match partitioning {
        Partitioning::RowByRow => None,
        Partitioning::ByKey { .. } => {
            let (input, topic) = (spec.input.clone(), shuffle_topic.clone());
            let partitions =
                tokio::task::spawn_blocking(move || input.create_shuffle(&topic, writers))
                    .await
                    .map_err(|e| weir_runtime::Error::Internal(e.to_string()))??;
            tracing::info!(pipeline = %spec.pipeline, topic = %shuffle_topic, partitions,
                "the pipeline's keys go through its repartition topic");
            Some(Arc::new(Shuffle {
                topic: shuffle_topic.clone(),
                partitions,
                writers,
            }))
        }
        Partitioning::Single => {
            return Err(weir_runtime::Error::Execution(format!(
                "pipeline {} has two window aggregations: a cluster runs queries with at most one",
                spec.pipeline
            )));
        }
    };
    if let (Output::View(store), Some(peers)) = (&spec.output, &spec.peers) {
        let (prefix, count) = match &shuffle {
            Some(shuffle) => ("r", shuffle.partitions),
            None => ("p", writers),
        };
        if let Err(e) = peers.announce(spec.input.clone()).await {
            tracing::warn!(pipeline = %spec.pipeline, error = %e,
                "cannot record this process in the cluster's directory: the other processes cannot gather this view's rows from it");
        }
        store.set_gather(Some(Arc::new(ViewGather {
            peers: peers.clone(),
            view: spec.pipeline.clone(),
            input: spec.input.clone(),
            parts: (0..count).map(|i| format!("{prefix}{i}")).collect(),
        })));
    }
    let halves = Halves {
        stop,
        abort,
        instances,
        followers,
    };
    let result = run_managers(&spec, group, shuffle_topic, shuffle, halves).await;
    if let Output::View(store) = &spec.output {
        store.set_gather(None);
    }
    result
}

/// What the managers of a pipeline's halves share.
#[derive(Clone)]
struct Halves {
    stop: CancellationToken,
    abort: CancellationToken,
    instances: Arc<Mutex<BTreeMap<String, ()>>>,
    followers: Arc<Followers>,
}

/// Runs the group managers of the pipeline's halves until they end.
async fn run_managers(
    spec: &Arc<Spec>,
    group: String,
    shuffle_topic: String,
    shuffle: Option<Arc<Shuffle>>,
    halves: Halves,
) -> weir_runtime::Result<()> {
    let mut managers = vec![tokio::spawn(manage(
        spec.clone(),
        Role::Upstream,
        group,
        None,
        shuffle.clone(),
        halves.clone(),
    ))];
    if shuffle.is_some() {
        managers.push(tokio::spawn(manage(
            spec.clone(),
            Role::Downstream,
            shuffle_topic.clone(),
            Some(shuffle_topic),
            shuffle,
            halves,
        )));
    }
    for result in futures::future::join_all(managers).await {
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(e) => return Err(weir_runtime::Error::Internal(e.to_string())),
        }
    }
    Ok(())
}

/// Runs the instances of one group's partitions: joins it, starts an instance per
/// partition assigned, stops one revoked (with a last checkpoint) before letting it go.
/// The half that writes the pipeline's output restarts its instances when the view's
/// followers change.
async fn manage(
    spec: Arc<Spec>,
    role: Role,
    group: String,
    topic: Option<String>,
    shuffle: Option<Arc<Shuffle>>,
    halves: Halves,
) -> weir_runtime::Result<()> {
    let Halves {
        stop,
        abort,
        instances,
        followers,
    } = halves;
    let writes_output = role == Role::Downstream || shuffle.is_none();
    let mut followers = followers.subscribe();
    let input = spec.input.clone();
    let (g, t) = (group.clone(), topic.clone());
    let mut membership = tokio::task::spawn_blocking(move || input.join(&g, t.as_deref()))
        .await
        .map_err(|e| weir_runtime::Error::Internal(e.to_string()))??;
    let mut running: BTreeMap<i32, Instance> = BTreeMap::new();
    let start = |p: i32, followers: Vec<Arc<Follower>>| {
        let spec = spec.clone();
        let shuffle = shuffle.clone();
        async move {
            let followers = if writes_output { followers } else { Vec::new() };
            start_instance(&spec, role, p, shuffle.as_deref(), &followers).await
        }
    };
    let result = loop {
        tokio::select! {
            biased;
            () = abort.cancelled() => {
                for instance in running.values_mut() {
                    instance.tear_down();
                }
                break Ok(());
            }
            () = stop.cancelled() => {
                for (_, instance) in std::mem::take(&mut running) {
                    instance.stop().await;
                }
                break Ok(());
            }
            Ok(()) = followers.changed(), if writes_output => {
                // A moment for more changes (the sinks of one DDL batch, or the
                // teardown of the whole job on a restart) before restarting anything.
                tokio::select! {
                    () = abort.cancelled() => continue,
                    () = stop.cancelled() => continue,
                    () = tokio::time::sleep(FOLLOWERS_SETTLE) => {}
                }
                let current = followers.borrow_and_update().clone();
                for (p, instance) in std::mem::take(&mut running) {
                    instance.stop().await;
                    running.insert(p, start(p, current.clone()).await?);
                }
            }
            event = membership.events.recv() => match event {
                None => break Err(weir_runtime::Error::Internal(format!("group {group} ended"))),
                Some(MembershipEvent::Assigned(partitions)) => {
                    for p in partitions {
                        let current = followers.borrow().clone();
                        let instance = start(p, current).await?;
                        instances.lock().unwrap_or_else(|e| e.into_inner()).insert(instance.name.clone(), ());
                        running.insert(p, instance);
                    }
                }
                Some(MembershipEvent::Revoked(partitions, done)) => {
                    for p in partitions {
                        if let Some(instance) = running.remove(&p) {
                            instances.lock().unwrap_or_else(|e| e.into_inner()).remove(&instance.name);
                            instance.stop().await;
                        }
                    }
                    let _ = done.send(());
                }
            }
        }
    };
    drop(membership);
    result
}

/// One partition's pipeline in this process.
struct Instance {
    name: String,
    /// The view part it writes, dropped when it stops here.
    part: Option<(Arc<MvStore>, String)>,
    coordinator: Option<Coordinator>,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Instance {
    /// Takes a last checkpoint, then ends the tasks.
    async fn stop(mut self) {
        tracing::info!(instance = %self.name, "instance stopping");
        if let Some(mut coordinator) = self.coordinator.take()
            && !coordinator.stop(STOP_WAIT).await
        {
            tracing::warn!(instance = %self.name,
                "the last checkpoint did not complete in time; the next owner resumes from the one before");
        }
        self.shutdown.cancel();
        for mut task in self.tasks.drain(..) {
            if tokio::time::timeout(Duration::from_secs(10), &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
        self.drop_part();
        tracing::info!(instance = %self.name, "instance stopped");
    }

    fn tear_down(&mut self) {
        self.coordinator = None;
        self.shutdown.cancel();
        for task in &self.tasks {
            task.abort();
        }
        self.drop_part();
    }

    fn drop_part(&mut self) {
        if let Some((view, part)) = self.part.take() {
            view.remove_part(&part);
        }
    }
}

/// Starts the instance of partition `p` in role `role`, restored from its last checkpoint,
/// with `followers` reading what it writes.
async fn start_instance(
    spec: &Spec,
    role: Role,
    p: i32,
    shuffle: Option<&Shuffle>,
    followers: &[Arc<Follower>],
) -> weir_runtime::Result<Instance> {
    let name = match role {
        Role::Upstream => format!("{}/p{p}", spec.pipeline),
        Role::Downstream => format!("{}/r{p}", spec.pipeline),
    };
    tracing::info!(instance = %name, "instance starting");
    let restored = match &spec.store {
        Some(store) => store.latest(&name).await?,
        None => None,
    };
    let epoch = restored.as_ref().map_or(0, |c| c.epoch);
    // A follower whose query changed since the checkpoint starts fresh; the others restore.
    let fresh_followers: Vec<&str> = followers
        .iter()
        .filter(|f| {
            restored.as_ref().is_some_and(|c| {
                c.fingerprints
                    .get(&f.name)
                    .is_some_and(|saved| *saved != f.fingerprint)
            })
        })
        .map(|f| f.name.as_str())
        .collect();
    let saved = restored.filter(|c| match c.fingerprints.get(&spec.pipeline) {
        Some(f) if *f == spec.fingerprint => true,
        Some(_) => {
            tracing::warn!(instance = %name, epoch = c.epoch,
                "the pipeline's query or inputs changed since its last checkpoint: the instance starts fresh");
            false
        }
        None => false,
    });
    let snapshot = |participant: &str| -> Option<Snapshot> {
        saved
            .as_ref()
            .and_then(|c| c.snapshots.get(&format!("{name}/{participant}")).cloned())
    };
    let follower_snapshot = |follower: &Follower, participant: &str| {
        if fresh_followers.contains(&follower.name.as_str()) {
            return None;
        }
        snapshot(&format!("{}/{participant}", follower.name))
    };
    let metrics = &spec.metrics;
    let pre_aggregate = spec.cluster.pre_aggregate;
    let plan = spec.plan.as_deref();
    let (source, mut stages, sink, label): (_, Vec<Stage>, Box<dyn weir_runtime::Sink>, &str) =
        match (role, shuffle, plan) {
            (Role::Upstream, Some(shuffle), Some(plan)) => {
                let half = plan
                    .upstream(metrics, &spec.pipeline, pre_aggregate)
                    .map_err(plan_error)?;
                let sink = spec.input.shuffle_writer(
                    &shuffle.topic,
                    shuffle.partitions,
                    half.keys,
                    p,
                    shuffle.writers,
                    metrics.shuffle_bytes(&spec.pipeline),
                )?;
                (
                    spec.input.create_partition(p)?,
                    half.stages,
                    sink,
                    "shuffle",
                )
            }
            (Role::Downstream, Some(shuffle), Some(plan)) => {
                let half = plan
                    .upstream(metrics, &spec.pipeline, pre_aggregate)
                    .map_err(plan_error)?;
                let source = spec.input.shuffle_reader(&shuffle.topic, p, half.schema)?;
                let stages = plan
                    .downstream(metrics, &spec.pipeline, pre_aggregate)
                    .map_err(plan_error)?;
                let (sink, label) = output(spec, &name)?;
                (source, stages, sink, label)
            }
            (Role::Upstream, None, plan) => {
                let stages = match plan {
                    Some(plan) => plan.stages(metrics, &spec.pipeline).map_err(plan_error)?,
                    None => Vec::new(),
                };
                let (sink, label) = output(spec, &name)?;
                (spec.input.create_partition(p)?, stages, sink, label)
            }
            _ => {
                return Err(weir_runtime::Error::Internal(format!(
                    "instance {name} has no half to run"
                )));
            }
        };
    // The view part `output` made, which the instance drops when it stops.
    let part = match &spec.output {
        Output::View(view) if role == Role::Downstream || shuffle.is_none() => {
            Some((view.clone(), partition_of(&name).to_string()))
        }
        _ => None,
    };
    for (i, stage) in stages.iter_mut().enumerate() {
        if let Stage::Sync(op) = stage
            && let Some(state) = snapshot(&format!("op{i}"))
            && let Err(e) = op.restore(state)
        {
            if let Some((view, part)) = &part {
                view.remove_part(part);
            }
            return Err(e);
        }
    }
    let interval = checkpoint_interval(role, shuffle.is_some(), &spec.cluster, spec.interval);
    let (coordinator, checkpoints) = Coordinator::spawn(
        &name,
        CheckpointConfig {
            status: Some(spec.status.clone()),
            interval,
            store: spec.store.clone(),
        },
        epoch,
        metrics.checkpoints(&spec.pipeline),
    );
    coordinator.set_fingerprint(&spec.pipeline, spec.fingerprint.clone());
    for follower in followers {
        coordinator.set_fingerprint(&follower.name, follower.fingerprint.clone());
    }
    // Followers first (they subscribe before the first row is sent): what fails here
    // leaves nothing running.
    let fanout = Fanout::new();
    let mut follower_tasks = Vec::new();
    for follower in followers {
        let started = start_follower(spec, follower, &name, &fanout, &coordinator, |p| {
            follower_snapshot(follower, p)
        });
        match started {
            Ok(mut more) => follower_tasks.append(&mut more),
            Err(e) => {
                for task in &follower_tasks {
                    task.abort();
                }
                if let Some((view, part)) = &part {
                    view.remove_part(part);
                }
                return Err(e);
            }
        }
    }
    let shutdown = CancellationToken::new();
    let connector = match role {
        Role::Upstream => "kafka",
        Role::Downstream => "shuffle",
    };
    let (rx, source_task) = pipeline::spawn_source(
        source,
        SourceTask {
            shutdown: shutdown.clone(),
            release: spec.release.clone(),
            metrics: metrics.source(&spec.input_name, &spec.pipeline, connector),
            status: spec.status.clone(),
            pipeline: name.clone(),
            checkpoints: Some(checkpoints),
            restore: snapshot("source"),
            instance_id: spec.instance_id.clone(),
            worker: Worker::ONLY,
        },
    );
    let mut tasks = vec![source_task];
    tasks.append(&mut follower_tasks);
    tasks.push(pipeline::spawn_sink(
        sink,
        fanout.subscribe(),
        SinkTask {
            metrics: metrics.sink(&spec.pipeline, label),
            status: spec.status.clone(),
            pipeline: name.clone(),
            committed: Some(coordinator.committed()),
            restore: snapshot("sink"),
            commit_log: spec.store.clone().map(|store| CommitLog {
                store,
                job: name.clone(),
            }),
        },
    ));
    tasks.extend(pipeline::spawn_stages(
        rx,
        stages,
        0,
        fanout,
        metrics,
        &spec.pipeline,
        &name,
        &spec.status,
    ));
    tracing::info!(instance = %name, restored = saved.as_ref().map(|c| c.epoch), "instance started");
    Ok(Instance {
        name,
        part,
        coordinator: Some(coordinator),
        shutdown,
        tasks,
    })
}

/// How often an instance checkpoints: a writer of the repartition topic checkpoints no
/// state, so it commits at the cluster's commit interval when that is shorter.
fn checkpoint_interval(
    role: Role,
    writes_shuffle: bool,
    cluster: &ClusterConfig,
    pipeline: Duration,
) -> Duration {
    match (role, writes_shuffle, cluster.commit_interval) {
        (Role::Upstream, true, Some(commit)) => commit.min(pipeline),
        _ => pipeline,
    }
}

/// Starts `follower` in instance `instance`, reading what `output` carries: its steps and
/// its sink (files named for the instance's partition), checkpointed by `coordinator` as
/// `<instance>/<follower>/...`.
fn start_follower(
    spec: &Spec,
    follower: &Follower,
    instance: &str,
    output: &Arc<Fanout>,
    coordinator: &Coordinator,
    snapshot: impl Fn(&str) -> Option<Snapshot>,
) -> weir_runtime::Result<Vec<JoinHandle<()>>> {
    let metrics = &spec.metrics;
    let participant = format!("{instance}/{}", follower.name);
    let mut stages = match &follower.plan {
        Some(plan) => plan.stages(metrics, &follower.name).map_err(plan_error)?,
        None => Vec::new(),
    };
    for (i, stage) in stages.iter_mut().enumerate() {
        if let Stage::Sync(op) = stage
            && let Some(state) = snapshot(&format!("op{i}"))
        {
            op.restore(state)?;
        }
    }
    let sink = follower
        .sink
        .create_instance(metrics, partition_of(instance))?;
    let fanout = Fanout::new();
    let mut tasks = vec![pipeline::spawn_sink(
        sink,
        fanout.subscribe(),
        SinkTask {
            metrics: metrics.sink(&follower.name, follower.sink.connector()),
            status: follower.status.clone(),
            pipeline: participant.clone(),
            committed: Some(coordinator.committed()),
            restore: snapshot("sink"),
            commit_log: spec.store.clone().map(|store| CommitLog {
                store,
                job: instance.to_string(),
            }),
        },
    )];
    tasks.extend(pipeline::spawn_stages(
        output.subscribe(),
        stages,
        0,
        fanout,
        metrics,
        &follower.name,
        &participant,
        &follower.status,
    ));
    Ok(tasks)
}

/// A fresh sink for instance `name`'s output (`<pipeline>/r3`): its files are named for
/// `r3`, so that the instance's next owner (in this process or another) finds and cleans up
/// what it left, and no other instance's.
fn output(
    spec: &Spec,
    name: &str,
) -> weir_runtime::Result<(Box<dyn weir_runtime::Sink>, &'static str)> {
    let partition = partition_of(name);
    Ok(match &spec.output {
        Output::View(view) => (Box::new(MvSink(view.part(partition))), "view"),
        Output::Sink(factory) => (
            factory.create_instance(&spec.metrics, partition)?,
            factory.connector(),
        ),
    })
}

/// `r3` of instance `v/r3`.
fn partition_of(instance: &str) -> &str {
    instance.rsplit_once('/').map_or(instance, |(_, p)| p)
}

fn plan_error(e: weir_planner::PlanError) -> weir_runtime::Error {
    weir_runtime::Error::Execution(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_writers_of_the_shuffle_commit_at_the_commit_interval_and_never_less_often() {
        let cluster = |commit: Option<u64>| ClusterConfig {
            name: "c".into(),
            pre_aggregate: true,
            advertise: None,
            commit_interval: commit.map(Duration::from_millis),
        };
        let second = Duration::from_secs(1);
        let at =
            |role, shuffle, commit| checkpoint_interval(role, shuffle, &cluster(commit), second);
        assert_eq!(
            at(Role::Upstream, true, Some(200)),
            Duration::from_millis(200)
        );
        // Never longer than the pipeline's checkpoint interval.
        assert_eq!(at(Role::Upstream, true, Some(5_000)), second);
        assert_eq!(at(Role::Upstream, true, None), second);
        // The windows, and a query without a shuffle (its sink is in the instance), keep it.
        assert_eq!(at(Role::Downstream, true, Some(200)), second);
        assert_eq!(at(Role::Upstream, false, Some(200)), second);
    }
}
