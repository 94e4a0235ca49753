//! One Kafka consumer for the readers of several partitions of a topic in one process: each
//! reader takes its partition's own queue of it (`split_partition_queue`), so that a
//! process fetches the topic through one client (one set of threads, one fetch request per
//! broker, one prefetch buffer), not one per partition it reads. A cluster's source
//! instances of a pipeline share one, and its shuffle readers another.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};
use weir_runtime::{Error, Result};

/// How long a new reader of a partition waits for the one before it to let it go.
const TAKEOVER_WAIT: Duration = Duration::from_secs(10);

/// A consumer whose partitions are read through queues of their own (see the module's docs).
pub struct SharedConsumer<C: ConsumerContext + 'static> {
    consumer: Arc<BaseConsumer<C>>,
    topic: String,
    /// The reader that has each assigned partition now (a number per reader).
    owners: Mutex<HashMap<i32, u64>>,
    /// Signalled when a reader lets its partition go.
    released: std::sync::Condvar,
    readers: AtomicU64,
    /// Stops the thread that serves the consumer's main queue.
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl<C: ConsumerContext + 'static> std::fmt::Debug for SharedConsumer<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedConsumer")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

impl<C: ConsumerContext + 'static> SharedConsumer<C> {
    /// Shares `consumer` (assigned nothing yet) for `topic`'s partitions; `role` names its
    /// thread and its log lines.
    pub fn new(consumer: BaseConsumer<C>, topic: &str, role: &'static str) -> Result<Self> {
        let consumer = Arc::new(consumer);
        let stop = Arc::new(AtomicBool::new(false));
        // The main queue serves the client's callbacks (statistics, errors); each
        // partition's records go to its reader's queue.
        let thread = {
            let (consumer, stop, topic) = (consumer.clone(), stop.clone(), topic.to_string());
            std::thread::Builder::new()
                .name(role.into())
                .spawn(move || {
                    while !stop.load(Ordering::Acquire) {
                        match consumer.poll(Duration::from_millis(100)) {
                            Some(Err(e)) => tracing::warn!(topic = %topic, error = %e, "{role}"),
                            Some(Ok(m)) => {
                                tracing::debug!(topic = %topic, partition = m.partition(),
                                    "{role}: a record outside its reader's queue");
                            }
                            None => {}
                        }
                    }
                })
                .map_err(|e| Error::Internal(format!("cannot start the {role}: {e}")))?
        };
        Ok(Self {
            consumer,
            topic: topic.to_string(),
            owners: Mutex::new(HashMap::new()),
            released: std::sync::Condvar::new(),
            readers: AtomicU64::new(0),
            stop,
            thread: Some(thread),
        })
    }

    /// The one in `slot` while any reader holds it, or a new one made by `create`.
    pub fn get_or_create(
        slot: &Mutex<HashMap<String, Weak<Self>>>,
        key: &str,
        create: impl FnOnce() -> Result<Self>,
    ) -> Result<Arc<Self>> {
        let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(shared) = slot.get(key).and_then(Weak::upgrade) {
            return Ok(shared);
        }
        let shared = Arc::new(create()?);
        slot.insert(key.to_string(), Arc::downgrade(&shared));
        Ok(shared)
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    pub fn consumer(&self) -> &BaseConsumer<C> {
        &self.consumer
    }

    /// Starts fetching `partition` from `offset` into a queue of its own, until the
    /// reader it returns is dropped. Blocks while a reader before this one (its instance
    /// stopped, or was torn down, in this process) still has the partition: call it off
    /// the runtime's threads.
    pub fn attach(self: &Arc<Self>, partition: i32, offset: Offset) -> Result<PartitionReader<C>> {
        let mut owners = self.owners.lock().unwrap_or_else(|e| e.into_inner());
        // The partition's queue is one in the client, whoever holds it: a record the
        // reader before this one polls now (it notices it was stopped within a poll) would
        // be lost to this one. So wait for it to let go; take the partition from it only
        // if it does not.
        let deadline = Instant::now() + TAKEOVER_WAIT;
        while owners.contains_key(&partition) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!(topic = %self.topic, partition,
                    "the partition's previous reader did not let it go in {TAKEOVER_WAIT:?}; taken from it");
                owners.remove(&partition);
                self.unassign(partition);
                break;
            }
            owners = self
                .released
                .wait_timeout(owners, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        // Split before the partition is assigned, so that no record of it reaches the
        // main queue.
        let queue = self
            .consumer
            .split_partition_queue(&self.topic, partition)
            .ok_or_else(|| Error::Internal(format!("no queue for {} [{partition}]", self.topic)))?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, partition, offset)
            .map_err(|e| Error::Internal(e.to_string()))?;
        // A pause stays with the partition in the client: a reader before this one may
        // have left it paused.
        let _ = self.consumer.resume(&tpl);
        self.consumer
            .incremental_assign(&tpl)
            .map_err(|e| super::kafka_error(&format!("cannot assign {}", self.topic), e))?;
        let reader = self.readers.fetch_add(1, Ordering::Relaxed);
        owners.insert(partition, reader);
        Ok(PartitionReader {
            queue,
            shared: self.clone(),
            partition,
            reader,
        })
    }

    /// Stops fetching `partition`.
    fn unassign(&self, partition: i32) {
        let mut tpl = TopicPartitionList::new();
        if tpl
            .add_partition_offset(&self.topic, partition, Offset::Invalid)
            .is_ok()
            && let Err(e) = self.consumer.incremental_unassign(&tpl)
        {
            tracing::warn!(topic = %self.topic, partition, error = %e,
                "cannot stop reading a partition");
        }
    }
}

impl<C: ConsumerContext + 'static> Drop for SharedConsumer<C> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One partition of a [`SharedConsumer`], fetched while this lives.
pub struct PartitionReader<C: ConsumerContext + 'static> {
    pub queue: PartitionQueue<C>,
    shared: Arc<SharedConsumer<C>>,
    partition: i32,
    reader: u64,
}

impl<C: ConsumerContext + 'static> PartitionReader<C> {
    pub fn consumer(&self) -> &BaseConsumer<C> {
        self.shared.consumer()
    }

    /// This reader's partition, as a list for pause and resume.
    pub fn partition_list(&self) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.shared.topic, self.partition);
        tpl
    }
}

impl<C: ConsumerContext + 'static> Drop for PartitionReader<C> {
    fn drop(&mut self) {
        // Unassigned while the queue still exists (nothing more of it is fetched), unless
        // a later reader has the partition now.
        let mut owners = self.shared.owners.lock().unwrap_or_else(|e| e.into_inner());
        if owners.get(&self.partition) == Some(&self.reader) {
            owners.remove(&self.partition);
            self.shared.unassign(self.partition);
            self.shared.released.notify_all();
        }
    }
}
