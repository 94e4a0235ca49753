//! Exchanges between a pipeline's workers: [`spawn_router`] sends each row to the worker its
//! key hashes to, [`spawn_merge`] joins several inputs into one with aligned barriers.
//!
//! A pipeline with `W` workers runs `W` copies of its source and of the operators before its
//! keyed operator (a window `GROUP BY`), each on a share of the input (Kafka partitions). Each
//! copy's output goes through a router to `W` merges, one in front of each copy of the keyed
//! operator and what follows it, so every key lives in exactly one worker. The workers'
//! outputs meet in one last merge in front of the pipeline's sink:
//!
//! ```text
//!  source 0 → ops → router ─┬─► merge 0 → window → ops ─┐
//!                           ╳                           ├─► merge → sink
//!  source 1 → ops → router ─┴─► merge 1 → window → ops ─┘
//! ```
//!
//! A merge keeps the guarantees a single input has:
//!
//! - **Barriers are aligned.** An input that delivers the barrier of an epoch is not read
//!   again until every other input has delivered it too (Flink's aligned checkpoints); then
//!   one copy goes on and the others are acknowledged. Every operator downstream therefore
//!   snapshots a state that holds exactly the records before the barrier on every input,
//!   and every source saved the position of exactly those records.
//! - **The watermark is the minimum** over the inputs' latest, sent when it advances. An
//!   input that has sent none holds it back, as a Kafka partition that has sent nothing
//!   does; one whose partitions are all idle sends `i64::MAX` and so steps aside until it
//!   sends its real watermark again.
//! - **`End`** goes on once every input has ended (a bounded input is read by all workers),
//!   **`Stop`** once every input has stopped or gone.

use std::sync::Arc;
use std::task::Poll;

use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::Partitioning;
use datafusion::physical_plan::metrics::Time;
use datafusion::physical_plan::repartition::BatchPartitioner;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::CHANNEL_CAPACITY;
use crate::error::Result;
use crate::message::{CheckpointBarrier, Message, Watermark};
use crate::metrics::Gauge;
use crate::pipeline::{Fanout, StatusCell, spawn_task};

/// `n` bounded channels: the senders for the routers, the receivers for the merges.
pub fn channels(n: usize) -> (Vec<mpsc::Sender<Message>>, Vec<mpsc::Receiver<Message>>) {
    (0..n).map(|_| mpsc::channel(CHANNEL_CAPACITY)).unzip()
}

/// Which of `n` workers each row's key goes to: DataFusion's hash repartitioning (a fixed
/// seed, so the same key goes to the same worker in every process and every run). No keys
/// send every row to worker 0.
pub struct KeyRouter {
    partitioner: Option<BatchPartitioner>,
}

impl KeyRouter {
    pub fn try_new(keys: Vec<Arc<dyn PhysicalExpr>>, n: usize) -> Result<Self> {
        let partitioner = if keys.is_empty() || n < 2 {
            None
        } else {
            Some(BatchPartitioner::try_new(
                Partitioning::Hash(keys, n),
                Time::new(),
                0,
                1,
            )?)
        };
        Ok(Self { partitioner })
    }

    /// The non-empty parts of `batch`, each with the worker it goes to.
    pub fn route(
        &mut self,
        batch: arrow::record_batch::RecordBatch,
    ) -> Result<Vec<(usize, arrow::record_batch::RecordBatch)>> {
        let Some(partitioner) = &mut self.partitioner else {
            return Ok(vec![(0, batch)]);
        };
        let mut parts = Vec::new();
        partitioner.partition(batch, |worker, part| {
            if part.num_rows() > 0 {
                parts.push((worker, part));
            }
            Ok(())
        })?;
        Ok(parts)
    }
}

/// Sends every batch of `input` in parts to `outputs` by [`KeyRouter`]; watermarks,
/// barriers (a copy each), `End` and `Stop` go to every output.
pub fn spawn_router(
    mut input: mpsc::Receiver<Message>,
    mut router: KeyRouter,
    outputs: Vec<mpsc::Sender<Message>>,
    status: &StatusCell,
    pipeline: &str,
) -> JoinHandle<()> {
    let log_pipeline = pipeline.to_string();
    spawn_task(status.clone(), pipeline.to_string(), "router", async move {
        let mut errors = crate::pipeline::RateLimitedLog::new(std::time::Duration::from_secs(10));
        loop {
            let message = input.recv().await.unwrap_or(Message::Stop);
            let stop = matches!(message, Message::Stop);
            match message {
                Message::Data(batch) => match router.route(batch) {
                    Ok(parts) => {
                        for (worker, part) in parts {
                            let _ = outputs[worker].send(Message::Data(part)).await;
                        }
                    }
                    // As an operator's failure on a batch: counted in the log, dropped.
                    Err(e) => errors.log(|suppressed| {
                        tracing::warn!(pipeline = %log_pipeline, error = %e, suppressed,
                            "cannot route a batch to its workers; batch dropped");
                    }),
                },
                other => broadcast(&outputs, other).await,
            }
            if stop {
                return;
            }
        }
    })
}

/// Sends `message` to every output; the last gets the original (a barrier is never dropped
/// here unacknowledged), the others a copy each.
async fn broadcast(outputs: &[mpsc::Sender<Message>], message: Message) {
    let Some((last, others)) = outputs.split_last() else {
        return;
    };
    for output in others {
        let _ = output.send(message.clone()).await;
    }
    let _ = last.send(message).await;
}

/// Joins `inputs` into `output` with aligned barriers, the minimum watermark, one `End` and
/// one `Stop` (see the module's documentation). The watermark sent on is also set on
/// `watermark_gauge`, if given (the pipeline's source watermark, when the inputs are its
/// workers' sources' rows).
pub fn spawn_merge(
    inputs: Vec<mpsc::Receiver<Message>>,
    output: Arc<Fanout>,
    status: &StatusCell,
    pipeline: &str,
    watermark_gauge: Option<Gauge>,
) -> JoinHandle<()> {
    spawn_task(status.clone(), pipeline.to_string(), "merge", async move {
        let mut merge = Merge::new(inputs.len());
        let mut inputs = inputs;
        let mut next = 0;
        while !merge.all_stopped() {
            let (i, message) = std::future::poll_fn(|cx| {
                let n = inputs.len();
                for k in 0..n {
                    let i = (next + k) % n;
                    if !merge.readable(i) {
                        continue;
                    }
                    if let Poll::Ready(message) = inputs[i].poll_recv(cx) {
                        // The next poll starts after this input: none is starved.
                        next = i + 1;
                        return Poll::Ready((i, message.unwrap_or(Message::Stop)));
                    }
                }
                Poll::Pending
            })
            .await;
            for message in merge.receive(i, message) {
                if let (Message::Watermark(Watermark(mark)), Some(gauge)) =
                    (&message, &watermark_gauge)
                {
                    gauge.set(*mark);
                }
                output.send(message).await;
            }
        }
        output.send(Message::Stop).await;
    })
}

/// What a merge knows of its inputs; [`Merge::receive`] says what to send on.
struct Merge {
    /// Each input's latest watermark (`i64::MAX`: the input is idle).
    watermarks: Vec<Option<i64>>,
    /// Each input's latest watermark other than `i64::MAX`.
    real: Vec<Option<i64>>,
    /// The barrier each input delivered for the epoch being aligned (it is not read until
    /// every input has delivered one).
    held: Vec<Option<CheckpointBarrier>>,
    ended: Vec<bool>,
    stopped: Vec<bool>,
    sent_watermark: Option<i64>,
    sent_end: bool,
}

impl Merge {
    fn new(n: usize) -> Self {
        Self {
            watermarks: vec![None; n],
            real: vec![None; n],
            held: (0..n).map(|_| None).collect(),
            ended: vec![false; n],
            stopped: vec![false; n],
            sent_watermark: None,
            sent_end: false,
        }
    }

    fn all_stopped(&self) -> bool {
        self.stopped.iter().all(|&s| s)
    }

    /// Whether input `i` may be read: not stopped, and not holding a barrier.
    fn readable(&self, i: usize) -> bool {
        !self.stopped[i] && self.held[i].is_none()
    }

    /// Takes `message` from input `i`; what goes on, in order.
    fn receive(&mut self, i: usize, message: Message) -> Vec<Message> {
        let mut out = Vec::new();
        match message {
            Message::Data(batch) => out.push(Message::Data(batch)),
            Message::Watermark(Watermark(mark)) => {
                // The latest, not the highest: a worker whose partitions are all idle sends
                // `i64::MAX` to step aside, and comes back with its real watermark.
                self.watermarks[i] = Some(mark);
                if mark < i64::MAX {
                    self.real[i] = Some(mark);
                }
                self.push_watermark(&mut out);
            }
            Message::Barrier(barrier) => {
                self.held[i] = Some(barrier);
                self.release_aligned(&mut out);
            }
            Message::End => {
                self.ended[i] = true;
                self.push_end(&mut out);
            }
            Message::Stop => {
                self.stopped[i] = true;
                // A stopped input no longer holds back the watermark, the alignment or the end.
                self.push_watermark(&mut out);
                self.release_aligned(&mut out);
                self.push_end(&mut out);
            }
        }
        out
    }

    /// The minimum over the inputs that are not idle; when every one is idle, the highest
    /// of their real watermarks (as one source with only idle partitions sends).
    fn push_watermark(&mut self, out: &mut Vec<Message>) {
        let mut min: Option<i64> = None;
        let mut all_idle_max: Option<i64> = None;
        for ((mark, real), stopped) in self.watermarks.iter().zip(&self.real).zip(&self.stopped) {
            if *stopped {
                continue;
            }
            match mark {
                Some(i64::MAX) => {
                    if let Some(real) = real {
                        all_idle_max = Some(all_idle_max.map_or(*real, |m| m.max(*real)));
                    }
                }
                Some(mark) => min = Some(min.map_or(*mark, |m| m.min(*mark))),
                None => return,
            }
        }
        let min = min.or(all_idle_max);
        if let Some(min) = min
            && self.sent_watermark.is_none_or(|sent| min > sent)
        {
            self.sent_watermark = Some(min);
            out.push(Message::Watermark(Watermark(min)));
        }
    }

    /// Once every running input holds its barrier: one copy goes on, the others are
    /// acknowledged (the one sent on carries their claim downstream).
    fn release_aligned(&mut self, out: &mut Vec<Message>) {
        let aligned = self
            .held
            .iter()
            .zip(&self.stopped)
            .all(|(held, stopped)| held.is_some() || *stopped);
        if !aligned || self.held.iter().all(Option::is_none) {
            return;
        }
        let mut barriers = self.held.iter_mut().filter_map(Option::take);
        let Some(first) = barriers.next() else {
            return;
        };
        for other in barriers {
            other.ack();
        }
        out.push(Message::Barrier(first));
    }

    fn push_end(&mut self, out: &mut Vec<Message>) {
        let all_ended = self
            .ended
            .iter()
            .zip(&self.stopped)
            .all(|(ended, stopped)| *ended || *stopped);
        if all_ended && !self.sent_end && self.ended.iter().any(|&e| e) {
            self.sent_end = true;
            out.push(Message::End);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, RecordBatch};
    use arrow::datatypes::{DataType, Field, Schema};
    use datafusion::physical_expr::expressions::col;

    fn batch(values: &[i64]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("k", DataType::Int64, false)]));
        RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(values.to_vec()))])
            .expect("test")
    }

    fn values(message: &Message) -> Vec<i64> {
        match message {
            Message::Data(b) => b
                .column(0)
                .as_any()
                .downcast_ref::<Int64Array>()
                .expect("test")
                .values()
                .to_vec(),
            _ => Vec::new(),
        }
    }

    #[test]
    fn a_key_goes_to_the_same_worker_every_time_and_every_row_goes_somewhere() {
        let b = batch(&(0..1000).collect::<Vec<_>>());
        let keys = vec![col("k", &b.schema()).expect("test")];
        let mut router = KeyRouter::try_new(keys.clone(), 3).expect("test");
        let mut owner = std::collections::HashMap::new();
        let mut rows = 0;
        for _ in 0..2 {
            for (worker, part) in router.route(b.clone()).expect("test") {
                rows += part.num_rows();
                for k in values(&Message::Data(part)) {
                    assert_eq!(*owner.entry(k).or_insert(worker), worker, "key {k}");
                }
            }
        }
        assert_eq!(rows, 2000);
        let per_worker: Vec<usize> = (0..3)
            .map(|w| owner.values().filter(|&&o| o == w).count())
            .collect();
        assert!(
            per_worker.iter().all(|&n| n > 250),
            "spread: {per_worker:?}"
        );
        // A second router (another worker, another process) agrees.
        let mut other = KeyRouter::try_new(keys, 3).expect("test");
        for (worker, part) in other.route(b).expect("test") {
            for k in values(&Message::Data(part)) {
                assert_eq!(owner[&k], worker);
            }
        }
    }

    #[test]
    fn barriers_are_aligned_and_the_watermark_is_the_minimum() {
        let (tx, rx) = std::sync::mpsc::channel();
        let barrier = CheckpointBarrier::tracked(1, tx);
        let copy = barrier.clone();
        let mut merge = Merge::new(2);
        assert!(
            merge
                .receive(0, Message::Watermark(Watermark(10)))
                .is_empty(),
            "input 1 has none"
        );
        let out = merge.receive(1, Message::Watermark(Watermark(5)));
        assert!(matches!(out[..], [Message::Watermark(Watermark(5))]));
        assert!(merge.receive(0, Message::Barrier(barrier)).is_empty());
        assert!(!merge.readable(0), "an input holding a barrier waits");
        let out = merge.receive(1, Message::Data(batch(&[1])));
        assert_eq!(
            values(&out[0]),
            vec![1],
            "the other input goes on meanwhile"
        );
        let out = merge.receive(1, Message::Barrier(copy));
        let Ok([Message::Barrier(aligned)]) = <[Message; 1]>::try_from(out) else {
            panic!("one barrier goes on");
        };
        assert!(merge.readable(0) && merge.readable(1));
        assert!(
            rx.try_recv().is_err(),
            "the copy sent on is not acknowledged yet"
        );
        aligned.ack();
        assert!(rx.try_recv().expect("test").durable);
        assert!(
            merge
                .receive(1, Message::Watermark(Watermark(20)))
                .iter()
                .any(|m| matches!(m, Message::Watermark(Watermark(10))))
        );
    }

    #[test]
    fn an_input_that_steps_aside_lets_the_others_through_until_it_comes_back() {
        let mut merge = Merge::new(2);
        merge.receive(0, Message::Watermark(Watermark(10)));
        merge.receive(1, Message::Watermark(Watermark(20)));
        let out = merge.receive(0, Message::Watermark(Watermark(i64::MAX)));
        assert!(matches!(out[..], [Message::Watermark(Watermark(20))]));
        let out = merge.receive(1, Message::Watermark(Watermark(30)));
        assert!(matches!(out[..], [Message::Watermark(Watermark(30))]));
        // Back from idle at 25: nothing lower than 30 goes on, and 25 holds the next one.
        assert!(
            merge
                .receive(0, Message::Watermark(Watermark(25)))
                .is_empty()
        );
        assert!(
            merge
                .receive(1, Message::Watermark(Watermark(40)))
                .is_empty()
        );
        let out = merge.receive(0, Message::Watermark(Watermark(35)));
        assert!(matches!(out[..], [Message::Watermark(Watermark(35))]));
        // Every input idle: the highest real watermark (40), as one source with only idle
        // partitions sends, never i64::MAX (which would close every window).
        let out = merge.receive(0, Message::Watermark(Watermark(i64::MAX)));
        assert!(matches!(out[..], [Message::Watermark(Watermark(40))]));
        assert!(
            merge
                .receive(1, Message::Watermark(Watermark(i64::MAX)))
                .is_empty()
        );
        let mut fresh = Merge::new(2);
        fresh.receive(0, Message::Watermark(Watermark(50)));
        let out = fresh.receive(1, Message::Watermark(Watermark(45)));
        assert!(matches!(out[..], [Message::Watermark(Watermark(45))]));
        assert!(
            fresh
                .receive(0, Message::Watermark(Watermark(i64::MAX)))
                .is_empty()
        );
        let out = fresh.receive(1, Message::Watermark(Watermark(i64::MAX)));
        assert!(
            matches!(out[..], [Message::Watermark(Watermark(50))]),
            "{out:?}"
        );
    }

    #[test]
    fn a_stopped_input_no_longer_holds_back_the_others() {
        let mut merge = Merge::new(2);
        merge.receive(0, Message::Watermark(Watermark(7)));
        let (tx, _rx) = std::sync::mpsc::channel();
        assert!(
            merge
                .receive(0, Message::Barrier(CheckpointBarrier::tracked(1, tx)))
                .is_empty()
        );
        assert!(merge.receive(0, Message::End).is_empty());
        let out = merge.receive(1, Message::Stop);
        assert!(matches!(
            out[..],
            [
                Message::Watermark(Watermark(7)),
                Message::Barrier(_),
                Message::End
            ]
        ));
        assert!(!merge.all_stopped());
        assert!(merge.receive(0, Message::Stop).is_empty());
        assert!(merge.all_stopped());
    }

    #[tokio::test]
    async fn routed_and_merged_every_row_arrives_once_before_the_barrier() {
        let b = batch(&(0..100).collect::<Vec<_>>());
        let keys = vec![col("k", &b.schema()).expect("test")];
        let status = StatusCell::default();
        let (up_tx, up_rx): (Vec<_>, Vec<_>) = (0..2).map(|_| mpsc::channel(4)).unzip();
        // Two upstream workers, each routing to both downstream merges.
        let mut to_merge: Vec<Vec<mpsc::Receiver<Message>>> = vec![Vec::new(), Vec::new()];
        for rx in up_rx {
            let (senders, receivers) = channels(2);
            for (w, r) in receivers.into_iter().enumerate() {
                to_merge[w].push(r);
            }
            spawn_router(
                rx,
                KeyRouter::try_new(keys.clone(), 2).expect("test"),
                senders,
                &status,
                "p",
            );
        }
        let outputs: Vec<_> = to_merge
            .into_iter()
            .map(|inputs| {
                let out = Fanout::new();
                let rx = out.subscribe();
                spawn_merge(inputs, out, &status, "p", None);
                rx
            })
            .collect();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let barrier = CheckpointBarrier::tracked(1, done_tx);
        for (i, tx) in up_tx.iter().enumerate() {
            let half: Vec<i64> = (0..100).filter(|k| k % 2 == i as i64).collect();
            tx.send(Message::Data(batch(&half))).await.expect("test");
            tx.send(Message::Barrier(barrier.clone()))
                .await
                .expect("test");
            tx.send(Message::Stop).await.expect("test");
        }
        barrier.ack();
        let mut seen = Vec::new();
        for mut rx in outputs {
            let mut barriers = 0;
            while let Some(message) = rx.recv().await {
                match message {
                    Message::Data(_) => {
                        assert_eq!(barriers, 0, "data after the barrier");
                        seen.extend(values(&message));
                    }
                    Message::Barrier(b) => {
                        barriers += 1;
                        b.ack();
                    }
                    Message::Stop => break,
                    _ => {}
                }
            }
            assert_eq!(barriers, 1, "one aligned barrier per merge");
        }
        seen.sort_unstable();
        assert_eq!(seen, (0..100).collect::<Vec<_>>());
        assert!(done_rx.recv().expect("test").durable);
    }
}
