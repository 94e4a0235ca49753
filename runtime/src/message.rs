//! [`Message`]: what flows on every channel between tasks.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use arrow::record_batch::RecordBatch;

use crate::checkpoint::Snapshot;

/// Event time, in milliseconds since the Unix epoch, below which no more records are expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Watermark(pub i64);

/// A checkpoint barrier: everything before it belongs to `epoch`.
///
/// A [`CheckpointBarrier::tracked`] barrier reports back when every copy of it has been
/// accounted for. Copies travel to every sink of every pipeline downstream (a fan-out sends
/// one to each consumer). On the way, each stateful participant saves its state into the
/// barrier ([`CheckpointBarrier::save`]) and passes it on; each sink calls
/// [`CheckpointBarrier::ack`] once what it received before the barrier is durable (or
/// pre-committed), or [`CheckpointBarrier::fail`] if it never will be. A copy dropped without
/// `ack` (a task that panicked or was aborted, a consumer that went away) fails the epoch:
/// durability is only ever claimed explicitly. When the last copy is gone, the tracker hears
/// [`EpochDone`] with everything saved.
#[derive(Debug)]
pub struct CheckpointBarrier {
    pub epoch: u64,
    /// The pipeline stops after this barrier (a stop's final checkpoint, or the one after a
    /// bounded input ended): the source injects it and ends, and [`Message::Stop`] follows.
    pub last: bool,
    tracker: Option<Arc<Tracker>>,
    acked: bool,
}

/// What the tracker of a barrier hears when its last copy is gone.
#[derive(Debug, Clone)]
pub struct EpochDone {
    pub epoch: u64,
    /// False if a copy failed or was dropped unacknowledged: do not commit past this epoch.
    pub durable: bool,
    /// What the participants saved, by participant id.
    pub snapshots: BTreeMap<String, Snapshot>,
}

/// Called once with the outcome of a tracked barrier.
type OnDone = Box<dyn FnOnce(EpochDone) + Send>;

struct Tracker {
    epoch: u64,
    failed: AtomicBool,
    snapshots: Mutex<BTreeMap<String, Snapshot>>,
    done: Mutex<Option<OnDone>>,
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracker")
            .field("epoch", &self.epoch)
            .finish()
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        let snapshots = std::mem::take(self.snapshots.get_mut().unwrap_or_else(|e| e.into_inner()));
        let done = self
            .done
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(done) = done {
            done(EpochDone {
                epoch: self.epoch,
                durable: !self.failed.load(Ordering::Acquire),
                snapshots,
            });
        }
    }
}

impl CheckpointBarrier {
    /// A barrier nobody waits on (acknowledging or dropping it does nothing).
    pub fn new(epoch: u64) -> Self {
        Self {
            epoch,
            last: false,
            tracker: None,
            acked: false,
        }
    }

    /// A barrier whose outcome is reported on `done` once every copy is acknowledged,
    /// failed or dropped.
    pub fn tracked(epoch: u64, done: std::sync::mpsc::Sender<EpochDone>) -> Self {
        Self::on_done(epoch, move |outcome| {
            let _ = done.send(outcome);
        })
    }

    /// A barrier whose outcome is passed to `done` once every copy is acknowledged, failed
    /// or dropped.
    pub fn on_done(epoch: u64, done: impl FnOnce(EpochDone) + Send + 'static) -> Self {
        Self {
            epoch,
            last: false,
            tracker: Some(Arc::new(Tracker {
                epoch,
                failed: AtomicBool::new(false),
                snapshots: Mutex::default(),
                done: Mutex::new(Some(Box::new(done))),
            })),
            acked: false,
        }
    }

    /// This barrier, marked as the pipeline's last.
    pub fn into_last(mut self) -> Self {
        self.last = true;
        self
    }

    /// Saves `snapshot` as participant `id`'s state for this epoch. Ids are unique per job
    /// (`<pipeline>/op<i>`, `<pipeline>/sink`); a second save under one id replaces the first.
    pub fn save(&self, id: impl Into<String>, snapshot: Snapshot) {
        if let Some(tracker) = &self.tracker {
            tracker
                .snapshots
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id.into(), snapshot);
        }
    }

    /// What participant `id` saved for this epoch so far (a sink that commits the source's
    /// positions with its own output reads them here: the source saves them as it injects
    /// the barrier, before anything downstream sees it).
    pub fn saved(&self, id: &str) -> Option<Snapshot> {
        let tracker = self.tracker.as_ref()?;
        let snapshots = tracker.snapshots.lock().unwrap_or_else(|e| e.into_inner());
        snapshots.get(id).cloned()
    }

    /// This copy's rows are durable (or pre-committed): the epoch may complete.
    pub fn ack(mut self) {
        self.acked = true;
    }

    /// Marks the epoch as not durable: a sink lost rows it received before this barrier.
    pub fn fail(self) {
        // Dropping unacknowledged fails it.
        drop(self);
    }
}

impl Clone for CheckpointBarrier {
    /// Another copy, which must be acknowledged too.
    fn clone(&self) -> Self {
        Self {
            epoch: self.epoch,
            last: self.last,
            tracker: self.tracker.clone(),
            acked: false,
        }
    }
}

impl Drop for CheckpointBarrier {
    fn drop(&mut self) {
        if !self.acked
            && let Some(tracker) = &self.tracker
        {
            tracker.failed.store(true, Ordering::Release);
        }
    }
}

/// One message on a channel. Batches are Arrow all the way: never rows on the hot path.
#[derive(Debug, Clone)]
pub enum Message {
    Data(RecordBatch),
    Watermark(Watermark),
    Barrier(CheckpointBarrier),
    /// A bounded input is finished: every operator emits what it holds (every window
    /// closes). A last barrier and [`Message::Stop`] follow.
    End,
    /// The pipeline stops: nothing more comes and nothing partial is emitted (open windows
    /// stay in the last checkpoint). Tasks end on it.
    Stop,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tracked_epoch_is_done_when_every_copy_is_acknowledged() {
        let (tx, rx) = std::sync::mpsc::channel();
        let barrier = CheckpointBarrier::tracked(7, tx);
        let copies = [barrier.clone(), barrier.clone()];
        barrier.save("p/op1", Snapshot::meta(serde_json::json!({"watermark": 5})));
        barrier.ack();
        assert!(rx.try_recv().is_err(), "two copies are still held");
        let [a, b] = copies;
        a.ack();
        assert!(rx.try_recv().is_err());
        b.ack();
        let done = rx.try_recv().expect("done");
        assert_eq!((done.epoch, done.durable), (7, true));
        assert_eq!(
            done.snapshots["p/op1"].meta,
            serde_json::json!({"watermark": 5})
        );
    }

    #[test]
    fn a_copy_failed_or_dropped_unacknowledged_fails_the_epoch() {
        for lose in [CheckpointBarrier::fail, drop::<CheckpointBarrier>] {
            let (tx, rx) = std::sync::mpsc::channel();
            let barrier = CheckpointBarrier::tracked(3, tx);
            let copy = barrier.clone();
            barrier.ack();
            lose(copy);
            let done = rx.try_recv().expect("done");
            assert!(!done.durable);
        }
    }

    #[test]
    fn a_barrier_moved_along_a_chain_is_not_a_loss() {
        let (tx, rx) = std::sync::mpsc::channel();
        let barrier = CheckpointBarrier::tracked(1, tx);
        let forwarded = vec![Message::Barrier(barrier)];
        let Some(Message::Barrier(b)) = forwarded.into_iter().next() else {
            unreachable!("one barrier")
        };
        b.ack();
        assert!(rx.try_recv().expect("done").durable);
    }
}
