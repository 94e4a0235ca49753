//! Supervision: every job's pipelines are watched; a job one of whose pipelines failed for
//! an external cause (a broker, a receiver, a database, an object store) is restarted from
//! its last checkpoint, with backoff. A failure inside Weir (a bug, a panic) is reported
//! and left as it is: restarting would fail the same way.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use weir_planner::Result;
use weir_runtime::pipeline::PipelineStatus;
use weir_sql::ObjectKind;

use super::{Busy, Engine, State};

/// How often the supervisor looks at the pipelines.
const PERIOD: Duration = Duration::from_millis(500);
/// The first restart's delay; each failed restart doubles it, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// A job that has run this long since its last restart starts again from
/// [`FIRST_BACKOFF`] at its next failure.
const HEALTHY_AFTER: Duration = Duration::from_secs(120);

/// One job's restarts.
#[derive(Debug, Clone)]
pub(super) struct Restarts {
    /// Restarts since the job last ran healthy for [`HEALTHY_AFTER`].
    attempts: u32,
    /// Restarts since the engine started.
    pub(super) total: u64,
    /// When the restart of a failed job is due.
    due: Option<Instant>,
    /// When the job was last (re)started.
    started: Instant,
    /// The last failure's cause.
    pub(super) last_failure: Option<String>,
}

impl Restarts {
    fn new() -> Self {
        Self {
            attempts: 0,
            total: 0,
            due: None,
            started: Instant::now(),
            last_failure: None,
        }
    }

    fn backoff(&self) -> Duration {
        FIRST_BACKOFF
            .saturating_mul(2u32.saturating_pow(self.attempts))
            .min(MAX_BACKOFF)
    }
}

/// Watches `engine`'s pipelines until it is shut down or dropped.
pub(super) async fn supervise(engine: Weak<Engine>) {
    let mut ticks = tokio::time::interval(PERIOD);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(engine) = engine.upgrade() else {
            return;
        };
        if engine.shutdown.is_cancelled() {
            return;
        }
        for job in engine.restarts_due() {
            if let Err(e) = engine.restart_job(&job).await {
                tracing::error!(pipeline = %job, error = %e, "cannot restart the pipeline; trying again later");
                engine.schedule_restart(&job, &e.to_string());
            }
        }
    }
}

impl Engine {
    /// Starts the supervisor (once, from `start_all`).
    pub(super) fn start_supervisor(self: &Arc<Self>) {
        tokio::spawn(supervise(Arc::downgrade(self)));
    }

    /// Notes new failures (scheduling the restart of their jobs when the cause is
    /// external) and returns the jobs whose restart is due now.
    fn restarts_due(&self) -> Vec<String> {
        let mut state = self.lock();
        if !state.started {
            // Shutting down.
            return Vec::new();
        }
        let now = Instant::now();
        let failed: Vec<(String, String, bool)> = state
            .running
            .values()
            .filter_map(|r| match r.status.get() {
                PipelineStatus::Failed(f) => Some((r.job.clone(), f.cause, f.external)),
                _ => None,
            })
            .collect();
        for (job, cause, external) in failed {
            let restarts = state
                .restarts
                .entry(job.clone())
                .or_insert_with(Restarts::new);
            let reported = restarts.last_failure.as_deref() == Some(cause.as_str());
            if restarts.due.is_some() || (reported && !external) {
                continue;
            }
            restarts.last_failure = Some(cause.clone());
            if external {
                let backoff = restarts.backoff();
                restarts.due = Some(now + backoff);
                tracing::warn!(pipeline = %job, cause = %cause, attempt = restarts.attempts + 1,
                    backoff_ms = backoff.as_millis() as u64,
                    "pipeline failed; restarting it from its last checkpoint");
            } else {
                tracing::error!(pipeline = %job, cause = %cause,
                    "pipeline failed inside Weir; it stays failed until dropped and created again");
            }
        }
        for restarts in state.restarts.values_mut() {
            if restarts.due.is_none()
                && restarts.attempts > 0
                && restarts.started.elapsed() >= HEALTHY_AFTER
            {
                restarts.attempts = 0;
            }
        }
        let State { restarts, busy, .. } = &*state;
        restarts
            .iter()
            .filter(|(job, r)| r.due.is_some_and(|due| due <= now) && !busy.contains_key(*job))
            .map(|(job, _)| job.clone())
            .collect()
    }

    /// Schedules another restart of `job` after a restart that failed with `cause`.
    fn schedule_restart(&self, job: &str, cause: &str) {
        let mut state = self.lock();
        let restarts = state
            .restarts
            .entry(job.to_string())
            .or_insert_with(Restarts::new);
        restarts.attempts = restarts.attempts.saturating_add(1);
        restarts.due = Some(Instant::now() + restarts.backoff());
        restarts.last_failure = Some(cause.to_string());
    }

    /// Restarts `job`: its pipelines (the one reading its source, then those reading its
    /// view) are torn down without a last checkpoint and started again from the job's last
    /// complete one, as after a crash.
    async fn restart_job(&self, job: &str) -> Result<()> {
        let mut reserved = Vec::new();
        let (names, stopping) = {
            let mut state = self.lock();
            let names = job_members(&state, job);
            let Some(restarts) = state.restarts.get_mut(job) else {
                return Ok(());
            };
            restarts.due = None;
            if names.first().map(String::as_str) != Some(job) {
                // Dropped meanwhile.
                state.restarts.remove(job);
                return Ok(());
            }
            for name in &names {
                reserved.push(self.reserve(&mut state, name, Busy::Restarting)?);
            }
            let stopping: Vec<_> = names
                .iter()
                .rev()
                .filter_map(|name| self.take_pipeline(&mut state, name))
                .collect();
            (names, stopping)
        };
        for pipeline in stopping {
            self.abort_pipeline(pipeline).await;
        }
        let checkpoint = self.saved_checkpoint(job).await?;
        let mut state = self.lock();
        if !state.started {
            // Shut down meanwhile.
            return Ok(());
        }
        let started = names.iter().try_for_each(|name| {
            let stored = if name == job {
                checkpoint.clone()
            } else {
                None
            };
            self.start_pipeline(&mut state, name, stored, &self.release)
        });
        let restarts = state
            .restarts
            .entry(job.to_string())
            .or_insert_with(Restarts::new);
        restarts.total += 1;
        restarts.attempts = restarts.attempts.saturating_add(1);
        restarts.started = Instant::now();
        let epoch = checkpoint.as_ref().map(|c| c.epoch);
        drop(state);
        drop(reserved);
        started?;
        tracing::info!(pipeline = %job, ?epoch, "pipeline restarted from its last checkpoint");
        Ok(())
    }
}

/// The pipelines of `job`, in catalog order: the one reading its source (named as the job),
/// then those reading its view, and those reading theirs. A reader whose start failed at
/// the last restart is among them too, though it is not running.
fn job_members(state: &State, job: &str) -> Vec<String> {
    let mut members: Vec<String> = Vec::new();
    for entry in state.catalog.in_order() {
        let member = entry.name == job
            || entry
                .depends_on
                .first()
                .is_some_and(|input| members.contains(input));
        if member && matches!(entry.kind, ObjectKind::MaterializedView | ObjectKind::Sink) {
            members.push(entry.name.clone());
        }
    }
    members
}
