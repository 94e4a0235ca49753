//! [`Message`]: what flows on every channel between tasks.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arrow::record_batch::RecordBatch;

/// Event time, in milliseconds since the Unix epoch, below which no more records are expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Watermark(pub i64);

/// A checkpoint barrier: everything before it belongs to `epoch`.
///
/// A source that wants to know when the epoch is durable everywhere (to commit its input
/// offsets, say) makes a [`CheckpointBarrier::tracked`] one. Copies travel to every sink of
/// every pipeline downstream; each sink drops its copy once what it received before the
/// barrier is durable (a Parquet sink, when the file holding those rows is closed), or marks
/// the epoch failed. When the last copy is gone, the source hears [`EpochDone`].
#[derive(Debug, Clone)]
pub struct CheckpointBarrier {
    pub epoch: u64,
    tracker: Option<Arc<Tracker>>,
}

/// What the source of a tracked barrier hears when its last copy is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochDone {
    pub epoch: u64,
    /// False if a sink could not make its rows durable: do not commit past this epoch.
    pub durable: bool,
}

#[derive(Debug)]
struct Tracker {
    epoch: u64,
    failed: AtomicBool,
    done: std::sync::mpsc::Sender<EpochDone>,
}

impl Drop for Tracker {
    fn drop(&mut self) {
        let _ = self.done.send(EpochDone {
            epoch: self.epoch,
            durable: !self.failed.load(Ordering::Acquire),
        });
    }
}

impl CheckpointBarrier {
    /// A barrier nobody waits on.
    pub fn new(epoch: u64) -> Self {
        Self {
            epoch,
            tracker: None,
        }
    }

    /// A barrier whose completion is reported on `done` when every copy has been dropped.
    pub fn tracked(epoch: u64, done: std::sync::mpsc::Sender<EpochDone>) -> Self {
        Self {
            epoch,
            tracker: Some(Arc::new(Tracker {
                epoch,
                failed: AtomicBool::new(false),
                done,
            })),
        }
    }

    /// Marks the epoch as not durable: a sink lost rows it received before this barrier.
    pub fn fail(&self) {
        if let Some(tracker) = &self.tracker {
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
    /// The input is finished (bounded source done, or the pipeline is stopping): flush and end.
    End,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tracked_epoch_is_done_when_the_last_copy_is_dropped() {
        let (tx, rx) = std::sync::mpsc::channel();
        let barrier = CheckpointBarrier::tracked(7, tx);
        let copies = [barrier.clone(), barrier.clone()];
        drop(barrier);
        assert!(rx.try_recv().is_err(), "two copies are still held");
        let [a, b] = copies;
        drop(a);
        assert!(rx.try_recv().is_err());
        b.fail();
        drop(b);
        assert_eq!(
            rx.try_recv(),
            Ok(EpochDone {
                epoch: 7,
                durable: false
            })
        );
    }
}
