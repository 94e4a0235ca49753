//! Semantics on librdkafka's mock cluster: commits, resumption, rebalances, watermarks.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use arrow::array::{Array, Int32Array, Int64Array};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use rdkafka::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, DefaultProducerContext, Producer};
use tokio::sync::mpsc;
use weir_runtime::connector::{EventTime, SourceFactory, SourceSpec};
use weir_runtime::coordinator::{CheckpointConfig, Coordinator};
use weir_runtime::metrics::SourceMetrics;
use weir_runtime::pipeline::{SourceTask, StatusCell, Worker, spawn_source};
use weir_runtime::{CancellationToken, Message};
use weir_sql::Options;

use super::KafkaSourceFactory;

const WAIT: Duration = Duration::from_secs(60);

fn cluster(topic: &str, partitions: i32) -> MockCluster<'static, DefaultProducerContext> {
    let cluster = MockCluster::new(1).expect("mock cluster");
    cluster.create_topic(topic, partitions, 1).expect("topic");
    cluster
}

fn produce(bootstrap: &str, topic: &str, records: impl IntoIterator<Item = (i32, String)>) {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("producer");
    for (partition, payload) in records {
        producer
            .send(
                BaseRecord::<(), _>::to(topic)
                    .partition(partition)
                    .payload(&payload),
            )
            .expect("enqueue");
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(30)).expect("flush");
}

fn factory(
    bootstrap: &str,
    topic: &str,
    extra: &[(&str, &str)],
    event_time: Option<EventTime>,
) -> KafkaSourceFactory {
    let schema = std::sync::Arc::new(Schema::new(vec![
        Field::new("k", DataType::Int64, false),
        Field::new("ts", DataType::Timestamp(TimeUnit::Millisecond, None), true),
    ]));
    let mut pairs = vec![
        ("connector".to_string(), "kafka".to_string()),
        ("topic".to_string(), topic.to_string()),
        ("bootstrap.servers".to_string(), bootstrap.to_string()),
    ];
    pairs.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let spec = SourceSpec {
        name: "s".into(),
        schema,
        event_time,
        restoring: false,
    };
    KafkaSourceFactory::try_new(&spec, &Options::from_pairs_as_written(pairs)).expect("factory")
}

/// A running source checkpointing every 100 ms (no store), whose barriers are acknowledged
/// at once (an always-durable sink): each checkpoint commits the offsets it covers.
struct Reader {
    coordinator: Option<Coordinator>,
    rx: mpsc::Receiver<Message>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    keys: Vec<i64>,
    partitions: BTreeSet<i32>,
    watermarks: Vec<i64>,
}

impl Reader {
    fn start(factory: &KafkaSourceFactory) -> Self {
        Self::start_worker(factory, Worker::ONLY)
    }

    fn start_worker(factory: &KafkaSourceFactory, worker: Worker) -> Self {
        Self::start_source(factory.create().expect("source"), worker)
    }

    fn start_source(source: Box<dyn weir_runtime::Source>, worker: Worker) -> Self {
        Self::start_restored(source, worker, None, SourceMetrics::detached())
    }

    /// A source restored from `restore` (a checkpoint's position), counting into `metrics`.
    fn start_restored(
        source: Box<dyn weir_runtime::Source>,
        worker: Worker,
        restore: Option<weir_runtime::Snapshot>,
        metrics: SourceMetrics,
    ) -> Self {
        let stop = CancellationToken::new();
        let released = CancellationToken::new();
        released.cancel();
        let (coordinator, checkpoints) = Coordinator::spawn(
            "test",
            CheckpointConfig {
                status: None,
                interval: Duration::from_millis(100),
                store: None,
            },
            0,
            weir_runtime::Metrics::new().checkpoints("test"),
        );
        let (rx, task) = spawn_source(
            source,
            SourceTask {
                shutdown: stop.clone(),
                release: released,
                metrics,
                status: StatusCell::default(),
                // No pipeline: the consumer group is the stream's `group.id` as given.
                pipeline: String::new(),
                checkpoints: Some(checkpoints),
                restore,
                instance_id: None,
                worker,
            },
        );
        Self {
            coordinator: Some(coordinator),
            rx,
            stop,
            task,
            keys: Vec::new(),
            partitions: BTreeSet::new(),
            watermarks: Vec::new(),
        }
    }

    fn take(&mut self, message: Message) -> bool {
        match message {
            Message::Data(batch) => {
                let k = batch
                    .column(0)
                    .as_any()
                    .downcast_ref::<Int64Array>()
                    .expect("k");
                self.keys.extend(k.values().iter());
                let p = batch
                    .column_by_name("_partition")
                    .expect("_partition")
                    .as_any()
                    .downcast_ref::<Int32Array>()
                    .expect("int")
                    .clone();
                self.partitions.extend(p.values().iter());
            }
            Message::Watermark(w) => self.watermarks.push(w.0),
            Message::Barrier(b) => b.ack(),
            Message::End => {}
            Message::Stop => return false,
        }
        true
    }

    /// Reads until `done` holds (or the wait runs out).
    async fn read_until(&mut self, done: impl Fn(&Self) -> bool) {
        self.read_for(WAIT, done).await;
    }

    async fn read_for(&mut self, wait: Duration, done: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + wait;
        while !done(self) && Instant::now() < deadline {
            if let Ok(Some(m)) =
                tokio::time::timeout(Duration::from_millis(200), self.rx.recv()).await
            {
                self.take(m);
            }
        }
    }

    /// Stops with a last checkpoint, reading to the end (its barrier is acknowledged here,
    /// then its offsets are committed).
    async fn stop(mut self) -> Self {
        let mut coordinator = self.coordinator.take().expect("a running reader");
        let stopping = tokio::spawn(async move { coordinator.stop(WAIT).await });
        while let Some(m) = self.rx.recv().await {
            if !self.take(m) {
                break;
            }
        }
        assert!(
            stopping.await.expect("stop"),
            "the last checkpoint completes"
        );
        (&mut self.task).await.expect("source task");
        self.stop.cancel();
        self
    }
}

fn json(k: i64, ts: i64) -> String {
    format!(r#"{{"k":{k},"ts":{ts}}}"#)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_read_disjoint_shares_and_one_without_partitions_never_holds_the_watermark() {
    let cluster = cluster("shares", 3);
    let bootstrap = cluster.bootstrap_servers();
    produce(
        &bootstrap,
        "shares",
        (0..3000).map(|k| ((k % 3) as i32, json(k, k))),
    );
    let event_time = EventTime {
        column: "ts".into(),
        delay: Duration::ZERO,
    };
    let factory = factory(
        &bootstrap,
        "shares",
        &[("group.id", "g-shares"), ("scan.startup.mode", "earliest")],
        Some(event_time),
    );
    let mut readers: Vec<Reader> = (0..4)
        .map(|index| Reader::start_worker(&factory, Worker { index, count: 4 }))
        .collect();
    for (index, reader) in readers.iter_mut().enumerate() {
        // Worker i reads the partitions p with p % 4 == i: 1000 records each, none for 3.
        let expected = if index < 3 { 1000 } else { 0 };
        reader
            .read_until(|r| r.keys.len() >= expected && !r.watermarks.is_empty())
            .await;
        assert_eq!(reader.keys.len(), expected, "worker {index}");
        let partitions: Vec<i32> = reader.partitions.iter().copied().collect();
        let own: Vec<i32> = (0..3).filter(|p| *p as usize % 4 == index).collect();
        assert_eq!(partitions, own, "worker {index}");
    }
    assert_eq!(
        readers[3].watermarks,
        vec![i64::MAX],
        "a worker without partitions lets the others' watermark through"
    );
    assert!(readers[..3].iter().all(|r| r.watermarks[0] < i64::MAX));
    let mut all: Vec<i64> = readers.iter().flat_map(|r| r.keys.clone()).collect();
    all.sort_unstable();
    assert_eq!(all, (0..3000).collect::<Vec<_>>());
    for reader in readers {
        reader.stop().await;
    }
}

#[test]
fn positions_saved_by_workers_merge_to_the_furthest_of_each_partition() {
    let position = |offsets: &[(i32, i64)]| {
        let offsets: std::collections::HashMap<String, i64> =
            offsets.iter().map(|(p, o)| (p.to_string(), *o)).collect();
        weir_runtime::Snapshot::meta(serde_json::json!({"offsets": offsets, "max_event_ms": {}}))
    };
    let merged = super::source::merge_positions(vec![
        position(&[(0, 10), (1, 5)]),
        position(&[(1, 7), (2, 3)]),
    ])
    .expect("merge");
    assert_eq!(merged.meta["offsets"]["0"], 10);
    assert_eq!(merged.meta["offsets"]["1"], 7);
    assert_eq!(merged.meta["offsets"]["2"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_resumes_exactly_where_its_last_commit_left_off() {
    let cluster = cluster("events", 4);
    let bootstrap = cluster.bootstrap_servers();
    produce(
        &bootstrap,
        "events",
        (0..2000).map(|k| ((k % 4) as i32, json(k, k))),
    );
    let factory = factory(&bootstrap, "events", &[("group.id", "g1")], None);

    let mut first = Reader::start(&factory);
    first.read_until(|r| r.keys.len() >= 2000).await;
    let first = first.stop().await;
    assert_eq!(
        first.keys.len(),
        2000,
        "the first run reads everything produced"
    );

    produce(
        &bootstrap,
        "events",
        (2000..3000).map(|k| ((k % 4) as i32, json(k, k))),
    );
    let mut second = Reader::start(&factory);
    second.read_until(|r| r.keys.len() >= 1000).await;
    // Give a duplicate time to show up.
    second
        .read_for(Duration::from_secs(3), |r| r.keys.len() > 1000)
        .await;
    let second = second.stop().await;
    let mut got = second.keys.clone();
    got.sort_unstable();
    assert_eq!(
        got,
        (2000..3000).collect::<Vec<_>>(),
        "the second run reads exactly the records after the commit: none lost, none twice"
    );
}

/// A pipeline that stops reading for longer than `max.poll.interval.ms` does not cost the
/// consumer its place in the group: its partitions are paused, not abandoned, and every
/// record arrives exactly once after the stall.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_pipeline_pauses_the_partitions_and_keeps_the_group() {
    let records = 100_000;
    let cluster = cluster("stall", 4);
    let bootstrap = cluster.bootstrap_servers();
    produce(
        &bootstrap,
        "stall",
        (0..records).map(|k| ((k % 4) as i32, json(k, k))),
    );
    let factory = factory(
        &bootstrap,
        "stall",
        &[
            ("group.id", "g-stall"),
            // The smallest the mock group coordinator accepts (Kafka's
            // group.min.session.timeout.ms); librdkafka wants max.poll >= session.
            ("properties.max.poll.interval.ms", "6000"),
            ("properties.session.timeout.ms", "6000"),
        ],
        None,
    );
    let mut reader = Reader::start(&factory);
    reader.read_until(|r| !r.keys.is_empty()).await;
    // Far more than the pipeline's channels hold is queued: the consumer is blocked for
    // longer than the poll interval.
    tokio::time::sleep(Duration::from_secs(10)).await;
    reader
        .read_until(|r| r.keys.len() >= records as usize)
        .await;
    // Give a duplicate (records read again after losing the group) time to show up.
    reader
        .read_for(Duration::from_secs(2), |r| r.keys.len() > records as usize)
        .await;
    let reader = reader.stop().await;
    let mut got = reader.keys.clone();
    got.sort_unstable();
    assert_eq!(got.len(), records as usize, "every record once, none twice");
    assert_eq!(got, (0..records).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_readers_in_one_group_split_the_partitions_and_rebalance() {
    let cluster = cluster("split", 4);
    let bootstrap = cluster.bootstrap_servers();
    // The mock group coordinator waits a session timeout (less a second) for the members
    // to rejoin when one joins: with Kafka's default of 45 s the first rebalance alone took
    // most of the wait on a loaded machine. The smallest session it accepts keeps it short.
    let factory = factory(
        &bootstrap,
        "split",
        &[
            ("group.id", "g2"),
            ("properties.session.timeout.ms", "6000"),
        ],
        None,
    );
    let mut a = Reader::start(&factory);
    let mut b = Reader::start(&factory);
    // Keep producing to every partition until both readers have data.
    let mut next = 0i64;
    let deadline = Instant::now() + WAIT;
    while (a.keys.is_empty() || b.keys.is_empty()) && Instant::now() < deadline {
        produce(
            &bootstrap,
            "split",
            (next..next + 40).map(|k| ((k % 4) as i32, json(k, k))),
        );
        next += 40;
        // Short reads, so that production goes on while the group rebalances.
        a.read_for(Duration::from_secs(1), |r| !r.keys.is_empty())
            .await;
        b.read_for(Duration::from_secs(1), |r| !r.keys.is_empty())
            .await;
    }
    assert!(
        !a.keys.is_empty() && !b.keys.is_empty(),
        "both readers get partitions"
    );
    assert!(
        a.partitions.is_disjoint(&b.partitions),
        "no partition is read by both: {:?} {:?}",
        a.partitions,
        b.partitions
    );

    let b = b.stop().await;
    assert!(!b.keys.is_empty());
    a.partitions.clear();
    let before = a.keys.len();
    let deadline = Instant::now() + WAIT;
    while a.partitions.len() < 4 && Instant::now() < deadline {
        produce(
            &bootstrap,
            "split",
            (next..next + 40).map(|k| ((k % 4) as i32, json(k, k))),
        );
        next += 40;
        a.read_for(Duration::from_secs(1), |r| r.partitions.len() == 4)
            .await;
    }
    assert_eq!(
        a.partitions.len(),
        4,
        "after the other reader stops, the remaining one reads every partition"
    );
    assert!(a.keys.len() > before);
    let a = a.stop().await;
    // Across both readers, every key produced arrived at least once (at-least-once).
    let seen: BTreeSet<i64> = a.keys.iter().chain(&b.keys).copied().collect();
    let produced_and_read = seen.range(..next).count();
    assert!(produced_and_read > 0);
}

/// Partitions taken away by a rebalance and given back resume where this reader left off,
/// not at the group's committed (checkpointed) offset: nothing is handed on twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_assigned_back_after_a_rebalance_deliver_nothing_twice() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let cluster = cluster("back", 4);
    let bootstrap = cluster.bootstrap_servers();
    // The mock group waits a session timeout (less a second) for members to rejoin after
    // one joins or leaves: short sessions keep the test short.
    let factory = factory(
        &bootstrap,
        "back",
        &[
            ("group.id", "g3"),
            ("properties.session.timeout.ms", "6000"),
        ],
        None,
    );
    let mut reader = Reader::start(&factory);
    let mut next = 0i64;
    let batch = |next: &mut i64| {
        produce(
            &bootstrap,
            "back",
            (*next..*next + 100).map(|k| ((k % 4) as i32, json(k, k))),
        );
        *next += 100;
    };
    batch(&mut next);
    reader.read_until(|r| r.keys.len() == 100).await;
    // Another member joins: every partition is revoked from the reader, some come back.
    let other: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", "g3")
        .set("session.timeout.ms", "6000")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    other.subscribe(&["back"]).expect("subscribe");
    let deadline = Instant::now() + WAIT;
    while other.assignment().map_or(0, |a| a.count()) == 0 && Instant::now() < deadline {
        other.poll(Duration::from_millis(100));
        batch(&mut next);
        reader.read_for(Duration::from_millis(300), |_| false).await;
    }
    assert!(other.assignment().expect("assignment").count() > 0);
    // It leaves without committing: its partitions go back to the reader.
    other.unsubscribe();
    drop(other);
    batch(&mut next);
    let produced = next as usize;
    reader.read_until(|r| r.keys.len() >= produced).await;
    reader.read_for(Duration::from_secs(2), |_| false).await;
    let mut keys = reader.stop().await.keys;
    keys.sort_unstable();
    let twice = keys.windows(2).filter(|w| w[0] == w[1]).count();
    assert_eq!(twice, 0, "no record handed on twice");
    assert_eq!(keys, (0..next).collect::<Vec<_>>(), "every record once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watermark_advances_past_an_idle_partition_after_the_timeout() {
    let cluster = cluster("idle", 2);
    let bootstrap = cluster.bootstrap_servers();
    // Partition 1 gets one old record and then nothing; partition 0 moves on.
    produce(&bootstrap, "idle", [(1, json(0, 1_000))]);
    produce(
        &bootstrap,
        "idle",
        (1..=100).map(|k| (0, json(k, 1_000 + k * 100))),
    );
    let factory = factory(
        &bootstrap,
        "idle",
        &[("group.id", "g3"), ("watermark.idle_timeout", "2s")],
        Some(EventTime {
            column: "ts".into(),
            delay: Duration::from_millis(500),
        }),
    );
    let mut reader = Reader::start(&factory);
    reader
        .read_until(|r| r.keys.len() >= 101 && !r.watermarks.is_empty())
        .await;
    assert_eq!(reader.keys.len(), 101);
    assert_eq!(
        reader.watermarks.first(),
        Some(&500),
        "while partition 1 is active it holds the watermark at its 1000 ms - 500 ms"
    );
    reader
        .read_until(|r| r.watermarks.last() == Some(&(11_000 - 500)))
        .await;
    assert_eq!(
        reader.watermarks.last(),
        Some(&10_500),
        "once partition 1 is idle, partition 0's event time (11 000 ms - 500 ms) is the watermark"
    );
    assert!(
        reader.watermarks.windows(2).all(|w| w[0] < w[1]),
        "watermarks only advance: {:?}",
        reader.watermarks
    );
    reader.stop().await;
}

/// With several workers, one whose partitions are all idle steps aside (`i64::MAX`) instead
/// of holding the pipeline at its partitions' old event time, and comes back with its real
/// watermark when one of them has records again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_partitions_are_all_idle_steps_aside_and_comes_back() {
    let cluster = cluster("idle-share", 2);
    let bootstrap = cluster.bootstrap_servers();
    produce(&bootstrap, "idle-share", [(0, json(0, 1_000))]);
    let factory = factory(
        &bootstrap,
        "idle-share",
        &[
            ("group.id", "g-idle-share"),
            ("watermark.idle_timeout", "1s"),
        ],
        Some(EventTime {
            column: "ts".into(),
            delay: Duration::ZERO,
        }),
    );
    // Worker 0 of 2 reads partition 0 only.
    let mut reader = Reader::start_worker(&factory, Worker { index: 0, count: 2 });
    reader
        .read_until(|r| r.watermarks.contains(&i64::MAX))
        .await;
    assert_eq!(
        reader.watermarks,
        vec![1_000, i64::MAX],
        "its one partition's watermark, then aside once the partition is idle"
    );
    produce(&bootstrap, "idle-share", [(0, json(1, 5_000))]);
    reader
        .read_until(|r| r.watermarks.last() == Some(&5_000))
        .await;
    assert_eq!(
        reader.watermarks,
        vec![1_000, i64::MAX, 5_000],
        "back with its new watermark"
    );
    reader.stop().await;
}

#[test]
fn create_names_an_unreachable_broker_and_a_missing_topic() {
    let spec = SourceSpec {
        name: "s".into(),
        schema: std::sync::Arc::new(Schema::new(vec![Field::new("k", DataType::Int64, true)])),
        event_time: None,
        restoring: false,
    };
    let options = |bootstrap: &str, topic: &str| {
        Options::from_pairs_as_written([
            ("connector".to_string(), "kafka".to_string()),
            ("topic".to_string(), topic.to_string()),
            ("bootstrap.servers".to_string(), bootstrap.to_string()),
            ("connect.timeout".to_string(), "2s".to_string()),
        ])
    };
    // Nothing listens on port 1.
    let err =
        KafkaSourceFactory::try_new(&spec, &options("127.0.0.1:1", "t")).expect_err("unreachable");
    assert!(
        matches!(&err, weir_runtime::connector::ConnectorError::Unreachable(m) if m.contains("127.0.0.1:1")),
        "{err}"
    );
    let cluster = cluster("present", 1);
    let err = KafkaSourceFactory::try_new(&spec, &options(&cluster.bootstrap_servers(), "absent"))
        .expect_err("missing topic");
    assert!(
        matches!(&err, weir_runtime::connector::ConnectorError::MissingObject(m) if m.contains("absent")),
        "{err}"
    );
    let restoring = SourceSpec {
        restoring: true,
        ..spec
    };
    assert!(
        KafkaSourceFactory::try_new(&restoring, &options("127.0.0.1:1", "t")).is_ok(),
        "a restored stream is not checked against the broker"
    );
    let bad = Options::from_pairs_as_written([
        ("connector".to_string(), "kafka".to_string()),
        ("topic".to_string(), "t".to_string()),
        ("bootstrap.servers".to_string(), "x:1".to_string()),
        ("scan.startup.mode".to_string(), "sometimes".to_string()),
    ]);
    let err = KafkaSourceFactory::try_new(&restoring, &bad).expect_err("bad option");
    assert!(err.to_string().contains("scan.startup.mode"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timestamp_formats_convert_and_values_in_another_form_are_bad_records() {
    let cluster = cluster("times", 1);
    let bootstrap = cluster.bootstrap_servers();
    produce(
        &bootstrap,
        "times",
        [
            (0, r#"{"k":1,"ts":"2026-01-01T00:00:01Z"}"#.to_string()),
            (0, r#"{"k":2,"ts":1767225602000}"#.to_string()),
            (0, r#"{"k":3,"ts":"yesterday"}"#.to_string()),
            (0, r#"{"k":4,"ts":"2026-01-01T00:00:04.500Z"}"#.to_string()),
        ],
    );
    let factory = factory(
        &bootstrap,
        "times",
        &[("group.id", "g4"), ("timestamp.format", "rfc3339")],
        None,
    );
    let mut reader = Reader::start(&factory);
    let mut times = Vec::new();
    let deadline = Instant::now() + WAIT;
    while times.len() < 2 && Instant::now() < deadline {
        if let Ok(Some(Message::Data(batch))) =
            tokio::time::timeout(Duration::from_millis(200), reader.rx.recv()).await
        {
            let ts = arrow::compute::cast(
                batch.column(1),
                &DataType::Timestamp(TimeUnit::Millisecond, None),
            )
            .expect("cast");
            let ts = ts
                .as_any()
                .downcast_ref::<arrow::array::TimestampMillisecondArray>()
                .expect("ms");
            let k = batch
                .column(0)
                .as_any()
                .downcast_ref::<Int64Array>()
                .expect("k");
            times.extend(k.values().iter().copied().zip(ts.values().iter().copied()));
        }
    }
    assert_eq!(
        times,
        vec![(1, 1_767_225_601_000), (4, 1_767_225_604_500)],
        "RFC 3339 strings convert; an epoch number and an unparsable string are bad records"
    );
    reader.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kafka_sink_writes_json_rows_keyed_by_columns_before_releasing_a_barrier() {
    use arrow::array::{RecordBatch, StringArray};
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message as _;
    use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
    use weir_runtime::CheckpointBarrier;
    use weir_runtime::connector::{SinkFactory, SinkSpec};

    let cluster = cluster("out", 1);
    let bootstrap = cluster.bootstrap_servers();
    let schema = std::sync::Arc::new(Schema::new(vec![
        Field::new("device", DataType::Utf8, false),
        Field::new("n", DataType::Int64, true),
    ]));
    let spec = SinkSpec {
        name: "out_sink".into(),
        schema: schema.clone(),
        restoring: false,
    };
    let options = Options::from_pairs_as_written(
        [
            ("connector", "kafka"),
            ("topic", "out"),
            ("bootstrap.servers", bootstrap.as_str()),
            ("key.fields", "device"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let factory = super::KafkaSinkFactory::try_new(&spec, &options).expect("sink factory");
    let mut sink = factory.create(&weir_runtime::Metrics::new()).expect("sink");
    let batch = RecordBatch::try_new(
        schema,
        vec![
            std::sync::Arc::new(StringArray::from(vec!["a", "b", "a"])),
            std::sync::Arc::new(Int64Array::from(vec![Some(1), None, Some(3)])),
        ],
    )
    .expect("batch");
    sink.write(batch).await.expect("write");
    let (tx, rx) = std::sync::mpsc::channel();
    sink.pre_commit(CheckpointBarrier::tracked(1, tx))
        .await
        .expect("pre_commit");
    assert_eq!(
        rx.try_recv().map(|d| d.durable),
        Ok(true),
        "the barrier is released once the broker has every message"
    );
    sink.finish().await.expect("finish");

    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", "check")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset("out", 0, Offset::Beginning)
        .expect("tpl");
    consumer.assign(&tpl).expect("assign");
    let mut got = Vec::new();
    let deadline = Instant::now() + WAIT;
    while got.len() < 3 && Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            got.push((
                String::from_utf8_lossy(m.key().unwrap_or_default()).to_string(),
                String::from_utf8_lossy(m.payload().unwrap_or_default()).to_string(),
            ));
        }
    }
    assert_eq!(
        got,
        vec![
            (r#"{"device":"a"}"#.into(), r#"{"device":"a","n":1}"#.into()),
            (r#"{"device":"b"}"#.into(), r#"{"device":"b"}"#.into()),
            (r#"{"device":"a"}"#.into(), r#"{"device":"a","n":3}"#.into()),
        ]
    );
}

/// Produces keyed records (a `None` value is a tombstone).
fn produce_keyed(bootstrap: &str, topic: &str, records: &[(i32, &str, Option<&str>)]) {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("producer");
    for (partition, key, value) in records {
        let mut record = BaseRecord::<str, str>::to(topic)
            .partition(*partition)
            .key(key);
        if let Some(value) = value {
            record = record.payload(value);
        }
        producer.send(record).expect("enqueue");
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(30)).expect("flush");
}

/// The region a lookup finds for `id`.
async fn region_of(table: &dyn weir_runtime::lookup::LookupTable, id: i64) -> Option<String> {
    let keys: arrow::array::ArrayRef = std::sync::Arc::new(Int64Array::from(vec![id]));
    let found = table.lookup(&[keys]).await.expect("lookup");
    let row = found.indices.iter().next().flatten()? as usize;
    let regions = found
        .rows
        .column(1)
        .as_any()
        .downcast_ref::<arrow::array::StringArray>()?;
    regions
        .is_valid(row)
        .then(|| regions.value(row).to_string())
}

/// A compacted topic as a table: loaded to the end before CREATE returns (so the first
/// lookup already sees every key), then kept current: a later value replaces a key's row,
/// a tombstone deletes it. Keys are JSON objects or bare values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_table_loads_to_the_end_then_follows_updates_and_tombstones() {
    let topic = "vehicles";
    let cluster = cluster(topic, 3);
    let bootstrap = cluster.bootstrap_servers();
    let mut initial: Vec<(i32, String, Option<String>)> = (0..3000)
        .map(|id| {
            (
                id % 3,
                id.to_string(),
                Some(format!(r#"{{"region":"r{}"}}"#, id % 7)),
            )
        })
        .collect();
    // An earlier value of a key, replaced before the table starts; one key as an object.
    initial.insert(0, (5 % 3, "5".into(), Some(r#"{"region":"stale"}"#.into())));
    initial.push((
        1,
        r#"{"vehicle_id": 3001}"#.into(),
        Some(r#"{"region":"obj"}"#.into()),
    ));
    let borrowed: Vec<(i32, &str, Option<&str>)> = initial
        .iter()
        .map(|(p, k, v)| (*p, k.as_str(), v.as_deref()))
        .collect();
    produce_keyed(&bootstrap, topic, &borrowed);

    let schema = std::sync::Arc::new(Schema::new(vec![
        Field::new("vehicle_id", DataType::Int64, false),
        Field::new("region", DataType::Utf8, true),
    ]));
    let spec = weir_runtime::connector::TableSpec {
        name: "vehicles".into(),
        schema,
        key_columns: vec![0],
        restoring: false,
    };
    let options = Options::from_pairs_as_written([
        ("connector".to_string(), "kafka".to_string()),
        ("topic".to_string(), topic.to_string()),
        ("bootstrap.servers".to_string(), bootstrap.clone()),
    ]);
    let factory = super::KafkaTableFactory::try_new(&spec, &options).expect("factory");
    let metrics = weir_runtime::Metrics::new();
    let table = weir_runtime::connector::TableFactory::open(&factory, &metrics)
        .await
        .expect("open");
    // Loaded before the first lookup: every key is there, with its latest value.
    assert_eq!(region_of(table.as_ref(), 2999).await.as_deref(), Some("r3"));
    assert_eq!(region_of(table.as_ref(), 5).await.as_deref(), Some("r5"));
    assert_eq!(
        region_of(table.as_ref(), 3001).await.as_deref(),
        Some("obj")
    );
    assert_eq!(metrics.lookup_table("vehicles").rows.get(), 3001);

    produce_keyed(
        &bootstrap,
        topic,
        &[(1, "7", Some(r#"{"region":"moved"}"#)), (2, "8", None)],
    );
    let deadline = Instant::now() + WAIT;
    loop {
        let moved = region_of(table.as_ref(), 7).await;
        let deleted = region_of(table.as_ref(), 8).await;
        if moved.as_deref() == Some("moved") && deleted.is_none() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "update {moved:?}, tombstone {deleted:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(metrics.lookup_table("vehicles").rows.get(), 3000);
    let scanned = table.scan().await.expect("scan");
    assert_eq!(scanned.iter().map(|b| b.num_rows()).sum::<usize>(), 3000);
}

#[test]
fn broker_failures_are_external_and_configuration_the_users() {
    use rdkafka::error::KafkaError;
    let config = super::kafka_error("create", KafkaError::ClientCreation("bad".into()));
    assert!(
        matches!(config, weir_runtime::Error::Execution(_)),
        "{config}"
    );
    let broker = super::kafka_error("subscribe", KafkaError::Subscription("no broker".into()));
    assert!(
        matches!(
            broker,
            weir_runtime::Error::External {
                kind: weir_runtime::error::External::Connection,
                ..
            }
        ),
        "{broker}"
    );
    let text = broker.to_string();
    assert!(
        text.starts_with("subscribe: ") && text.contains("no broker"),
        "{text}"
    );
}

/// A repartition topic an operator made beforehand (for a broker that lets applications not
/// create topics) is used with the partitions it has.
#[test]
fn a_shuffle_topic_made_beforehand_is_used_as_it_is() {
    let cluster = cluster("events", 3);
    cluster
        .create_topic("made-beforehand", 7, 1)
        .expect("topic");
    let partitions = factory(&cluster.bootstrap_servers(), "events", &[], None)
        .partitioned()
        .expect("a Kafka stream splits by partition")
        .create_shuffle("made-beforehand", 3)
        .expect("the topic is there");
    assert_eq!(partitions, 7, "the topic's own partition count");
}

/// A source resumed at an offset the broker has deleted since (retention: the mock broker
/// keeps 5 MB of a partition) says so: it counts the records it never read and logs an
/// error, rather than going on from the log's start in silence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_below_the_log_start_counts_the_records_deleted_unread() {
    let cluster = cluster("gone", 1);
    let bootstrap = cluster.bootstrap_servers();
    // 8 MB in records of 1 KB: the first few thousand are gone.
    let pad = "x".repeat(1000);
    produce(
        &bootstrap,
        "gone",
        (0..8000).map(|k| (0, format!(r#"{{"k":{k},"ts":{k},"pad":"{pad}"}}"#))),
    );
    let factory = factory(
        &bootstrap,
        "gone",
        &[("scan.startup.mode", "earliest"), ("group.id", "resumed")],
        None,
    );
    let registry = weir_runtime::Metrics::new();
    let position =
        weir_runtime::Snapshot::meta(serde_json::json!({"offsets": {"0": 0}, "max_event_ms": {}}));
    let mut reader = Reader::start_restored(
        factory.create().expect("source"),
        Worker::ONLY,
        Some(position),
        registry.source("gone", "p", "kafka"),
    );
    reader.read_until(|r| r.keys.last() == Some(&7999)).await;
    let first = *reader.keys.first().expect("records read");
    assert!(first > 0, "the broker deleted the first records");
    assert_eq!(reader.keys, (first..8000).collect::<Vec<i64>>());
    let metrics = registry.encode();
    let skipped = metrics
        .lines()
        .find(|l| l.starts_with("weir_source_partition_records_skipped_total{"))
        .unwrap_or_else(|| panic!("no skipped records counted:\n{metrics}"));
    assert!(
        skipped.ends_with(&format!(" {first}")) && skipped.contains("partition=\"0\""),
        "{first} records skipped: {skipped}"
    );
    reader.stop().await;
}

/// A cluster's partition sources of `topic` (read from the earliest offset) sharing one
/// process's consumers, and how to start the reader of one partition.
fn partition_sources(
    bootstrap: &str,
    topic: &str,
) -> (
    std::sync::Arc<super::source::PartitionConsumers>,
    impl Fn(i32) -> Reader,
) {
    let config = factory(bootstrap, topic, &[("scan.startup.mode", "earliest")], None).config;
    let shared = std::sync::Arc::new(super::source::PartitionConsumers::default());
    let consumers = shared.clone();
    let start = move |p: i32| {
        Reader::start_source(
            Box::new(super::source::KafkaSource::partition(
                config.clone(),
                p,
                consumers.clone(),
            )),
            Worker::ONLY,
        )
    };
    (shared, start)
}

/// A cluster's instances of one pipeline in a process read their partitions through one
/// consumer: each gets its own partition's records alone, and a partition whose reader
/// stopped (pausing it) is read again by the next one while the others go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clusters_partition_sources_share_one_consumer_and_each_reads_its_partition() {
    let cluster = cluster("parts", 3);
    let bootstrap = cluster.bootstrap_servers();
    produce(
        &bootstrap,
        "parts",
        (0..3000).map(|k| ((k % 3) as i32, json(k, k))),
    );
    let (shared, start) = partition_sources(&bootstrap, "parts");
    let mut readers: Vec<Reader> = (0..3).map(&start).collect();
    for (p, reader) in readers.iter_mut().enumerate() {
        reader.read_until(|r| r.keys.len() >= 1000).await;
        let own: Vec<i64> = (0..3000).filter(|k| k % 3 == p as i64).collect();
        assert_eq!(reader.keys, own, "partition {p}");
    }
    let consumer = || {
        shared
            .lock()
            .expect("slot")
            .get("parts")
            .and_then(std::sync::Weak::upgrade)
    };
    assert_eq!(
        consumer().map(|c| std::sync::Arc::strong_count(&c)),
        Some(4),
        "the three readers (and this check) hold one consumer"
    );
    let first = readers.remove(0);
    first.stop().await;
    produce(
        &bootstrap,
        "parts",
        (3000..3300).map(|k| ((k % 3) as i32, json(k, k))),
    );
    // No checkpoint to resume from and no offsets committed: from the beginning again.
    let mut again = start(0);
    again.read_until(|r| r.keys.len() >= 1100).await;
    let own: Vec<i64> = (0..3300).filter(|k| k % 3 == 0).collect();
    assert_eq!(
        again.keys, own,
        "partition 0, read again after its reader stopped"
    );
    for (p, reader) in readers.iter_mut().enumerate() {
        let p = p as i64 + 1;
        reader.read_until(|r| r.keys.len() >= 1100).await;
        let own: Vec<i64> = (0..3300).filter(|k| k % 3 == p).collect();
        assert_eq!(reader.keys, own, "partition {p}");
    }
    readers.push(again);
    for reader in readers {
        reader.stop().await;
    }
    assert!(
        consumer().is_none(),
        "the consumer closes with its last reader"
    );
}

/// One instance whose pipeline stops taking records pauses its own partition only: the
/// other instances sharing its consumer go on reading theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_instance_pauses_only_its_own_partition_of_the_shared_consumer() {
    let cluster = cluster("stall", 2);
    let bootstrap = cluster.bootstrap_servers();
    // Far more than the stalled instance's pipeline holds (two batches of 8 192).
    produce(&bootstrap, "stall", (0..60_000).map(|k| (0, json(k, k))));
    produce(&bootstrap, "stall", (0..5_000).map(|k| (1, json(k, k))));
    let (_, start) = partition_sources(&bootstrap, "stall");
    let stalled = start(0);
    let mut other = start(1);
    other.read_until(|r| r.keys.len() >= 5_000).await;
    // Long enough for the stalled instance to pause (after 500 ms without room).
    tokio::time::sleep(Duration::from_secs(2)).await;
    produce(&bootstrap, "stall", (5_000..6_000).map(|k| (1, json(k, k))));
    other.read_until(|r| r.keys.len() >= 6_000).await;
    assert_eq!(other.keys, (0..6_000).collect::<Vec<i64>>());
    other.stop().await;
    stalled.stop().await;
}
