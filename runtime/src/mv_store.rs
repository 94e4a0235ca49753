//! [`MvStore`]: the rows of a materialized view, in memory, bounded by age and count.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Debug;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;

use crate::checkpoint::Snapshot;
use crate::error::{Error, Result};
use crate::operator::Sink;

/// Default `retention` of a materialized view.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(3600);
/// Default `max_rows` of a materialized view.
pub const DEFAULT_MAX_ROWS: usize = 1_000_000;

/// Batches in arrival order; the oldest are dropped once older than `retention` or once the
/// view holds more than `max_rows`, so memory never grows without limit.
///
/// On a cluster, each instance feeding the view in this process writes its own *part*
/// (`r3`), bounded alone, which moves with the instance; the view's rows are every part's,
/// in every process, and a [`Gather`] collects them.
#[derive(Debug)]
pub struct MvStore {
    schema: SchemaRef,
    retention: Duration,
    max_rows: usize,
    batches: RwLock<Inner>,
    parts: RwLock<BTreeMap<String, Arc<MvStore>>>,
    gather: RwLock<Option<Arc<dyn Gather>>>,
}

/// Collects a view's rows from the processes of a cluster.
#[async_trait]
pub trait Gather: Send + Sync + Debug {
    /// Every row of `view`: its parts in this process ([`MvStore::local_parts`]) and every
    /// other process's.
    async fn gather(&self, view: &MvStore) -> Result<Vec<RecordBatch>>;
}

#[derive(Debug, Default)]
struct Inner {
    batches: VecDeque<(Instant, RecordBatch)>,
    rows: usize,
}

impl MvStore {
    pub fn new(schema: SchemaRef, retention: Duration, max_rows: usize) -> Arc<Self> {
        Arc::new(Self {
            schema,
            retention,
            max_rows,
            batches: RwLock::default(),
            parts: RwLock::default(),
            gather: RwLock::default(),
        })
    }

    /// A new, empty part `name` (replacing one of that name), for an instance on a cluster.
    pub fn part(&self, name: &str) -> Arc<MvStore> {
        let part = Self::new(self.schema.clone(), self.retention, self.max_rows);
        let mut parts = self.parts.write().unwrap_or_else(|e| e.into_inner());
        parts.insert(name.to_string(), part.clone());
        part
    }

    /// Drops part `name`: its instance stopped here (and runs elsewhere next).
    pub fn remove_part(&self, name: &str) {
        let mut parts = self.parts.write().unwrap_or_else(|e| e.into_inner());
        parts.remove(name);
    }

    /// The parts in this process and their rows.
    pub fn local_parts(&self) -> Vec<(String, Vec<RecordBatch>)> {
        let parts = self.parts.read().unwrap_or_else(|e| e.into_inner());
        parts
            .iter()
            .map(|(name, part)| (name.clone(), part.snapshot()))
            .collect()
    }

    /// Sets (or clears) how the view's rows are gathered from a cluster.
    pub fn set_gather(&self, gather: Option<Arc<dyn Gather>>) {
        *self.gather.write().unwrap_or_else(|e| e.into_inner()) = gather;
    }

    /// Every row of the view: [`MvStore::snapshot`], or on a cluster, the rows gathered
    /// from every process.
    pub async fn rows(&self) -> Result<Vec<RecordBatch>> {
        let gather = self
            .gather
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match gather {
            Some(gather) => gather.gather(self).await,
            None => Ok(self.snapshot()),
        }
    }

    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// Appends a batch, evicting what falls out of retention or over `max_rows`.
    pub fn append(&self, batch: RecordBatch) {
        if batch.num_rows() == 0 {
            return;
        }
        let now = Instant::now();
        let mut inner = self.batches.write().unwrap_or_else(|e| e.into_inner());
        inner.rows += batch.num_rows();
        inner.batches.push_back((now, batch));
        Self::evict(&mut inner, now, self.retention, self.max_rows);
    }

    fn evict(inner: &mut Inner, now: Instant, retention: Duration, max_rows: usize) {
        while let Some((at, front)) = inner.batches.front() {
            let expired = now.duration_since(*at) > retention;
            let over = inner.rows > max_rows;
            if !expired && !over {
                break;
            }
            if !expired && inner.rows - front.num_rows() < max_rows {
                // Trim the oldest batch instead of dropping it whole.
                let excess = inner.rows - max_rows;
                let kept = front.slice(excess, front.num_rows() - excess);
                inner.rows -= excess;
                inner.batches[0].1 = kept;
                break;
            }
            inner.rows -= front.num_rows();
            inner.batches.pop_front();
        }
    }

    /// A consistent copy (cheap: batches are reference-counted) of the current rows, and
    /// of every part's in this process.
    pub fn snapshot(&self) -> Vec<RecordBatch> {
        let now = Instant::now();
        let mut inner = self.batches.write().unwrap_or_else(|e| e.into_inner());
        Self::evict(&mut inner, now, self.retention, self.max_rows);
        let mut rows: Vec<RecordBatch> = inner.batches.iter().map(|(_, b)| b.clone()).collect();
        drop(inner);
        for (_, part) in self.local_parts() {
            rows.extend(part);
        }
        rows
    }

    /// The rows with the wall-clock time each batch arrived (ms since the epoch), for a
    /// checkpoint: retention keeps counting across a restart.
    pub fn saved(&self) -> (Vec<RecordBatch>, Vec<i64>) {
        let now = Instant::now();
        let wall = now_ms();
        let mut inner = self.batches.write().unwrap_or_else(|e| e.into_inner());
        Self::evict(&mut inner, now, self.retention, self.max_rows);
        inner
            .batches
            .iter()
            .map(|(at, b)| {
                let age = i64::try_from(now.duration_since(*at).as_millis()).unwrap_or(i64::MAX);
                (b.clone(), wall.saturating_sub(age))
            })
            .unzip()
    }

    /// Replaces the rows with those [`MvStore::saved`] returned.
    pub fn restore(&self, batches: Vec<RecordBatch>, arrived_ms: &[i64]) {
        let now = Instant::now();
        let wall = now_ms();
        let mut inner = self.batches.write().unwrap_or_else(|e| e.into_inner());
        inner.batches.clear();
        inner.rows = 0;
        for (batch, &arrived) in batches.into_iter().zip(arrived_ms) {
            let age =
                Duration::from_millis(u64::try_from(wall.saturating_sub(arrived)).unwrap_or(0));
            let at = now.checked_sub(age).unwrap_or(now);
            inner.rows += batch.num_rows();
            inner.batches.push_back((at, batch));
        }
        Self::evict(&mut inner, now, self.retention, self.max_rows);
    }

    /// The rows held in this process (every part's, on a cluster).
    pub fn row_count(&self) -> usize {
        let own = self.batches.read().unwrap_or_else(|e| e.into_inner()).rows;
        let parts = self.parts.read().unwrap_or_else(|e| e.into_inner());
        own + parts.values().map(|p| p.row_count()).sum::<usize>()
    }
}

/// Feeds a pipeline's output into an [`MvStore`].
#[derive(Debug)]
pub struct MvSink(pub Arc<MvStore>);

#[async_trait]
impl Sink for MvSink {
    async fn write(&mut self, batch: RecordBatch) -> Result<()> {
        self.0.append(batch);
        Ok(())
    }

    /// The view's rows: a restarted view keeps its contents.
    fn snapshot(&mut self) -> Result<Option<Snapshot>> {
        let (batches, arrived) = self.0.saved();
        Ok(Some(Snapshot::new(
            serde_json::json!({ "arrived_ms": arrived }),
            batches,
        )))
    }

    async fn restore(&mut self, snapshot: Snapshot) -> Result<()> {
        let arrived: Vec<i64> = snapshot
            .meta
            .get("arrived_ms")
            .cloned()
            .map(serde_json::from_value)
            .transpose()
            .map_err(|e| Error::Execution(format!("view state is unreadable: {e}")))?
            .unwrap_or_default();
        if arrived.len() != snapshot.batches.len() {
            return Err(Error::Execution(
                "view state is unreadable: batches and arrival times differ".into(),
            ));
        }
        self.0.restore(snapshot.batches, &arrived);
        Ok(())
    }

    async fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};

    fn batch(schema: &SchemaRef, values: Vec<i64>) -> RecordBatch {
        RecordBatch::try_new(schema.clone(), vec![Arc::new(Int64Array::from(values))])
            .expect("batch")
    }

    #[test]
    fn keeps_the_newest_max_rows() {
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
        let store = MvStore::new(schema.clone(), DEFAULT_RETENTION, 5);
        store.append(batch(&schema, vec![1, 2, 3]));
        store.append(batch(&schema, vec![4, 5, 6]));
        store.append(batch(&schema, vec![7]));
        assert_eq!(values(&store.snapshot()), vec![3, 4, 5, 6, 7]);
        assert_eq!(store.row_count(), 5);
    }

    #[test]
    fn drops_rows_older_than_retention() {
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
        let store = MvStore::new(schema.clone(), Duration::ZERO, 100);
        store.append(batch(&schema, vec![1]));
        std::thread::sleep(Duration::from_millis(2));
        assert!(store.snapshot().is_empty());
    }

    fn values(batches: &[RecordBatch]) -> Vec<i64> {
        let mut v: Vec<i64> = batches
            .iter()
            .flat_map(|b| {
                b.column(0)
                    .as_any()
                    .downcast_ref::<Int64Array>()
                    .expect("i64")
                    .values()
                    .to_vec()
            })
            .collect();
        v.sort_unstable();
        v
    }

    /// Restoring one instance's part leaves the other instances' rows alone (one store
    /// shared by every instance lost them).
    #[tokio::test]
    async fn parts_restore_and_leave_alone() {
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
        let view = MvStore::new(schema.clone(), DEFAULT_RETENTION, 100);
        let mut r0 = MvSink(view.part("r0"));
        let mut r1 = MvSink(view.part("r1"));
        r0.write(batch(&schema, vec![1, 2])).await.expect("write");
        r1.write(batch(&schema, vec![3])).await.expect("write");
        let saved = r0.snapshot().expect("snapshot").expect("some");

        // r0 moves: dropped here, restored (in another process) from its checkpoint.
        view.remove_part("r0");
        assert_eq!(values(&view.snapshot()), vec![3]);
        let mut moved = MvSink(view.part("r0"));
        moved.restore(saved).await.expect("restore");
        assert_eq!(values(&view.snapshot()), vec![1, 2, 3]);
        assert_eq!(view.row_count(), 3);
        let parts: Vec<String> = view.local_parts().into_iter().map(|(n, _)| n).collect();
        assert_eq!(parts, vec!["r0", "r1"]);
        assert_eq!(values(&view.rows().await.expect("rows")), vec![1, 2, 3]);
    }
}
