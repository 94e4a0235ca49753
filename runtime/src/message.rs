//! [`Message`]: what flows on every channel between tasks.

use arrow::record_batch::RecordBatch;

/// Event time, in milliseconds since the Unix epoch, below which no more records are expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Watermark(pub i64);

/// A checkpoint barrier: everything before it belongs to `epoch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointBarrier {
    pub epoch: u64,
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
