//! The sender against a scripted HTTP receiver: protocol details, retries and drops by the
//! spec's rules, back-pressure while the receiver is down.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::array::{Float64Array, StringArray, TimestampMillisecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::auth::Auth;
use super::mapping::Mapping;
use super::proto::{WriteRequest, decode_body};
use super::sender::{SenderConfig, Shards};
use weir_runtime::Metrics;

/// One request as the receiver saw it.
pub(super) struct Received {
    pub(super) headers: HeaderMap,
    request: WriteRequest,
    status: u16,
    at: Instant,
}

#[derive(Default)]
pub(super) struct Script {
    /// Answers for the next requests: status and optional Retry-After; 204 once empty.
    answers: VecDeque<(u16, Option<&'static str>)>,
    /// While set, every request gets 503.
    down: bool,
    pub(super) received: Vec<Received>,
}

#[derive(Clone, Default)]
pub(super) struct Receiver(Arc<Mutex<Script>>);

impl Receiver {
    pub(super) fn script(&self) -> std::sync::MutexGuard<'_, Script> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every sample accepted (2xx), as (series labels, timestamp, value), in arrival order.
    fn accepted(&self) -> Vec<(String, i64, f64)> {
        let script = self.script();
        script
            .received
            .iter()
            .filter(|r| r.status / 100 == 2)
            .flat_map(|r| r.request.timeseries.iter())
            .map(|t| {
                let labels: Vec<String> = t
                    .labels
                    .iter()
                    .map(|l| format!("{}={}", l.name, l.value))
                    .collect();
                (labels.join(","), t.samples[0].timestamp, t.samples[0].value)
            })
            .collect()
    }

    fn statuses(&self) -> Vec<u16> {
        self.script().received.iter().map(|r| r.status).collect()
    }
}

async fn receive(
    State(receiver): State<Receiver>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let Ok(request) = decode_body(&body) else {
        return (StatusCode::BAD_REQUEST, "undecodable body").into_response();
    };
    let mut script = receiver.script();
    let (status, retry_after) = if script.down {
        (503, None)
    } else {
        script.answers.pop_front().unwrap_or((204, None))
    };
    script.received.push(Received {
        headers,
        request,
        status,
        at: Instant::now(),
    });
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, format!("scripted {status}")).into_response();
    if let Some(after) = retry_after {
        response
            .headers_mut()
            .insert("retry-after", axum::http::HeaderValue::from_static(after));
    }
    response
}

/// Serves `receiver` on a free port; returns the write URL.
pub(super) async fn serve(receiver: Receiver) -> reqwest::Url {
    let app = axum::Router::new()
        .route("/api/v1/write", axum::routing::post(receive))
        .with_state(receiver);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    reqwest::Url::parse(&format!("http://127.0.0.1:{port}/api/v1/write")).expect("url")
}

fn config(url: reqwest::Url, shards: usize, per_send: usize, capacity: usize) -> SenderConfig {
    SenderConfig {
        url,
        client: reqwest::Client::builder()
            .user_agent("weir/test")
            .build()
            .expect("client"),
        headers: reqwest::header::HeaderMap::new(),
        auth: Auth::None,
        max_shards: shards,
        max_samples_per_send: per_send,
        batch_send_deadline: Duration::from_millis(50),
        capacity,
        min_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(100),
        max_retry_duration: None,
    }
}

pub(super) fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(
            "window_end",
            DataType::Timestamp(TimeUnit::Millisecond, None),
            false,
        ),
        Field::new("host", DataType::Utf8, false),
        Field::new("zone", DataType::Utf8, false),
        Field::new("v", DataType::Float64, false),
    ]))
}

/// `series` rows at time `t`: host h{i}, value i + t.
pub(super) fn rows(series: usize, t: i64) -> RecordBatch {
    RecordBatch::try_new(
        schema(),
        vec![
            Arc::new(TimestampMillisecondArray::from(vec![t; series])),
            Arc::new(StringArray::from_iter_values(
                (0..series).map(|i| format!("h{i}")),
            )),
            Arc::new(StringArray::from_iter_values(
                (0..series).map(|i| format!("z{}", i % 3)),
            )),
            Arc::new(Float64Array::from_iter_values(
                (0..series).map(|i| i as f64 + t as f64),
            )),
        ],
    )
    .expect("batch")
}

/// Encodes `batch` into `shards` and queues the full batches.
async fn write(mapping: &Mapping, shards: &mut Shards, batch: &RecordBatch) {
    mapping
        .encode(batch, 0, |s| shards.push(s.series, s.hash, s.timestamp_ms))
        .expect("encode");
    shards.send_ready().await.expect("send");
}

fn metric(metrics: &Metrics, line_start: &str) -> f64 {
    let text = metrics.encode();
    text.lines()
        .find_map(|l| l.strip_prefix(line_start)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_follow_the_protocol_and_each_series_arrives_in_order_over_four_shards() {
    let receiver = Receiver::default();
    let url = serve(receiver.clone()).await;
    let mapping = Mapping::try_new(&schema(), "app", None, vec![("env".into(), "prod".into())])
        .expect("mapping");
    let metrics = Metrics::new();
    let mut shards = Shards::start(config(url, 4, 37, 200), metrics.remote_write("s"));
    for t in 1..=30 {
        write(&mapping, &mut shards, &rows(100, t * 1000)).await;
    }
    shards.close().await.expect("close");

    let script = receiver.script();
    assert!(
        script.received.len() > 4 * 10,
        "{} requests",
        script.received.len()
    );
    for r in &script.received {
        assert_eq!(r.headers["content-encoding"], "snappy");
        assert_eq!(r.headers["content-type"], "application/x-protobuf");
        assert_eq!(r.headers["x-prometheus-remote-write-version"], "0.1.0");
        assert_eq!(r.headers["user-agent"], "weir/test");
        for series in &r.request.timeseries {
            let names: Vec<&str> = series.labels.iter().map(|l| l.name.as_str()).collect();
            assert!(
                names.windows(2).all(|w| w[0] < w[1]),
                "sorted, unique: {names:?}"
            );
            assert_eq!(names, ["__name__", "env", "host", "zone"]);
        }
    }
    drop(script);
    let accepted = receiver.accepted();
    assert_eq!(accepted.len(), 30 * 100, "every sample once");
    let mut per_series: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for (series, t, v) in &accepted {
        let host: f64 = series
            .split(',')
            .find_map(|l| l.strip_prefix("host=h"))
            .and_then(|h| h.parse().ok())
            .expect("host");
        assert_eq!(*v, host + *t as f64, "{series} at {t}");
        per_series.entry(series.clone()).or_default().push(*t);
    }
    assert_eq!(per_series.len(), 100);
    for (series, times) in &per_series {
        assert_eq!(
            times,
            &(1..=30).map(|t| t * 1000).collect::<Vec<_>>(),
            "{series} in order"
        );
    }
    assert_eq!(
        metric(&metrics, "weir_remote_write_samples_sent_total{sink=\"s\"}"),
        3000.0
    );
    assert_eq!(
        metric(&metrics, "weir_remote_write_queue_samples{sink=\"s\"}"),
        0.0
    );
    assert!(
        metric(
            &metrics,
            "weir_remote_write_shard_highest_timestamp_ms{sink=\"s\",shard=\"3\"}"
        ) == 30_000.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_and_429_are_retried_and_other_4xx_dropped_and_counted() {
    let receiver = Receiver::default();
    receiver.script().answers = VecDeque::from([
        (500, None),
        (429, Some("1")),
        (204, None),
        (400, None),
        (404, None),
        (503, None),
        (200, None),
    ]);
    let url = serve(receiver.clone()).await;
    let mapping = Mapping::try_new(&schema(), "app", None, vec![]).expect("mapping");
    let metrics = Metrics::new();
    // One shard, 10 samples a request: each write of 10 rows is one request.
    let mut shards = Shards::start(config(url, 1, 10, 100), metrics.remote_write("s"));
    for t in 1..=4 {
        write(&mapping, &mut shards, &rows(10, t)).await;
        shards.flush().await.expect("flush");
    }
    shards.close().await.expect("close");

    assert_eq!(receiver.statuses(), [500, 429, 204, 400, 404, 503, 200]);
    {
        let script = receiver.script();
        let waited = script.received[2].at - script.received[1].at;
        assert!(
            waited >= Duration::from_secs(1),
            "Retry-After honoured: {waited:?}"
        );
    }
    let accepted = receiver.accepted();
    let times: Vec<i64> = accepted.iter().map(|a| a.1).collect();
    assert_eq!(
        times,
        [[1; 10], [4; 10]].concat(),
        "t=2 and t=3 rejected, the rest sent once"
    );
    let m = |line: &str| metric(&metrics, line);
    assert_eq!(m("weir_remote_write_samples_sent_total{sink=\"s\"}"), 20.0);
    assert_eq!(
        m("weir_remote_write_samples_retried_total{sink=\"s\"}"),
        30.0
    );
    assert_eq!(
        m("weir_remote_write_samples_dropped_total{sink=\"s\",reason=\"bad_request\"}"),
        10.0
    );
    assert_eq!(
        m("weir_remote_write_samples_dropped_total{sink=\"s\",reason=\"client_error\"}"),
        10.0
    );
    for code in ["500", "429", "204", "400", "404", "503", "200"] {
        let line = format!("weir_remote_write_requests_total{{sink=\"s\",code=\"{code}\"}}");
        assert_eq!(m(&line), 1.0, "{code}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_receiver_is_down_the_writer_waits_with_bounded_memory_and_loses_nothing() {
    let receiver = Receiver::default();
    receiver.script().down = true;
    let url = serve(receiver.clone()).await;
    let mapping = Mapping::try_new(&schema(), "app", None, vec![]).expect("mapping");
    let metrics = Metrics::new();
    let mut shards = Shards::start(config(url, 2, 20, 40), metrics.remote_write("s"));
    let writer = tokio::spawn(async move {
        for t in 1..=50 {
            write(&mapping, &mut shards, &rows(20, t)).await;
        }
        shards.close().await.expect("close");
    });
    // Down: requests fail, the queues fill, and the writer waits.
    let mut retried = 0.0;
    for _ in 0..200 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        retried = metric(
            &metrics,
            "weir_remote_write_samples_retried_total{sink=\"s\"}",
        );
        if retried >= 200.0 {
            break;
        }
    }
    assert!(retried >= 200.0, "the shards kept retrying: {retried}");
    assert!(
        !writer.is_finished(),
        "the writer waits while nothing can be sent"
    );
    let queued = metric(&metrics, "weir_remote_write_queue_samples{sink=\"s\"}");
    // Per shard: `capacity` samples, and the batch the writer waits to queue.
    assert!(
        queued <= 2.0 * (40.0 + 20.0),
        "queues stay bounded by capacity: {queued}"
    );
    assert!(receiver.accepted().is_empty());
    receiver.script().down = false;
    writer.await.expect("writer");
    let accepted = receiver.accepted();
    assert_eq!(
        accepted.len(),
        50 * 20,
        "every sample arrives once the receiver is back"
    );
    let mut seen: Vec<(String, i64)> = accepted.iter().map(|a| (a.0.clone(), a.1)).collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 1000, "none twice");
    assert_eq!(
        metric(
            &metrics,
            "weir_remote_write_samples_dropped_total{sink=\"s\",reason=\"retry_timeout\"}"
        ),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_retry_duration_bounds_the_retries_and_counts_the_drop() {
    let receiver = Receiver::default();
    receiver.script().down = true;
    let url = serve(receiver.clone()).await;
    let mapping = Mapping::try_new(&schema(), "app", None, vec![]).expect("mapping");
    let metrics = Metrics::new();
    let mut config = config(url, 1, 10, 10);
    config.max_retry_duration = Some(Duration::from_millis(200));
    let mut shards = Shards::start(config, metrics.remote_write("s"));
    write(&mapping, &mut shards, &rows(10, 1)).await;
    shards.close().await.expect("close");
    assert!(receiver.statuses().len() >= 2, "{:?}", receiver.statuses());
    let dropped = metric(
        &metrics,
        "weir_remote_write_samples_dropped_total{sink=\"s\",reason=\"retry_timeout\"}",
    );
    assert_eq!(dropped, 10.0);
}

/// A sink on `url` with default options.
fn sink_on(url: &reqwest::Url) -> Box<dyn weir_runtime::Sink> {
    let spec = weir_runtime::connector::SinkSpec {
        name: "prom".into(),
        schema: schema(),
        restoring: false,
    };
    let options = weir_sql::Options::try_from_pairs([
        (
            "connector".to_string(),
            "prometheus_remote_write".to_string(),
        ),
        ("url".to_string(), url.to_string()),
    ])
    .expect("options");
    let factory = super::PrometheusSinkFactory::try_new(&spec, &options).expect("factory");
    weir_runtime::connector::SinkFactory::create(&factory, &Metrics::new()).expect("sink")
}

/// A receiver, and a sink on it holding 3 rows pre-committed at epoch 1, with its snapshot.
async fn holding_one_epoch() -> (
    Receiver,
    reqwest::Url,
    Box<dyn weir_runtime::Sink>,
    weir_runtime::Snapshot,
) {
    let receiver = Receiver::default();
    let url = serve(receiver.clone()).await;
    let mut sink = sink_on(&url);
    sink.write(rows(3, 1000)).await.expect("write");
    sink.pre_commit(weir_runtime::CheckpointBarrier::new(1))
        .await
        .expect("pre-commit");
    let held = sink.snapshot().expect("snapshot").expect("state");
    (receiver, url, sink, held)
}

/// Rows wait for their checkpoint to complete and stay in its snapshot until then, so a
/// restore sends them; at the last barrier (a stop) they are sent before it completes, and
/// the restart has nothing to send again: Prometheus refuses samples it has as out of order
/// once a later sample of their series has arrived.
#[tokio::test]
async fn rows_are_sent_at_commit_and_at_the_last_barrier_before_it() {
    let (receiver, _, mut sink, held) = holding_one_epoch().await;
    assert_eq!(
        held.batches
            .iter()
            .map(RecordBatch::num_rows)
            .sum::<usize>(),
        3
    );
    assert!(receiver.accepted().is_empty(), "nothing before the commit");
    sink.commit(1).await.expect("commit");
    assert_eq!(receiver.accepted().len(), 3);

    sink.write(rows(3, 2000)).await.expect("write");
    sink.pre_commit(weir_runtime::CheckpointBarrier::new(2).into_last())
        .await
        .expect("last pre-commit");
    assert_eq!(
        receiver.accepted().len(),
        6,
        "sent before the last checkpoint completes"
    );
    let left = sink.snapshot().expect("snapshot").expect("state");
    assert!(
        left.batches.is_empty(),
        "nothing for a restart to send again"
    );
    sink.commit(2).await.expect("commit");
    sink.finish().await.expect("finish");
    assert_eq!(receiver.accepted().len(), 6, "nothing twice");
}

/// A restore sends the checkpoint's rows again unless the sink had finished committing
/// that checkpoint before the restart (its commit record says so).
#[tokio::test]
async fn a_restore_sends_the_held_rows_only_if_their_commit_did_not_finish() {
    let (receiver, url, sink, held) = holding_one_epoch().await;
    drop(sink); // crashed before the commit

    let mut committed = held.clone();
    committed.committed = true;
    sink_on(&url).restore(committed).await.expect("restore");
    assert!(
        receiver.accepted().is_empty(),
        "delivered before: not sent again"
    );
    sink_on(&url).restore(held).await.expect("restore");
    assert_eq!(
        receiver.accepted().len(),
        3,
        "not known to be delivered: sent"
    );
}
