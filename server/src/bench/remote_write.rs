//! `weir bench remote-write`: one window's rows of `--events` distinct series (or `--windows`
//! consecutive windows of them), written by the Prometheus remote-write sink to a receiver that
//! only decodes and counts.
//!
//! The receiver is a child process (`weir bench remote-write-receiver`), so the CPU-seconds
//! printed are the sender's alone: mapping rows to series, protobuf encoding, snappy, HTTP.
//! The rows are built before the clock starts, as the window operator would hand them over.
//! `--url` sends to a real receiver instead (e.g. Prometheus with
//! `--web.enable-remote-write-receiver`), to measure what it ingests.

use std::io::{BufRead, BufReader};
use std::process::{Child, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use arrow::array::{ArrayRef, Float64Array, StringArray, TimestampMillisecondArray};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use arrow::record_batch::RecordBatch;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use weir_connectors::prometheus::PrometheusSinkFactory;
use weir_connectors::prometheus::proto::decode_body;
use weir_runtime::Metrics;
use weir_runtime::connector::{SinkFactory, SinkSpec};
use weir_sql::Options;

use super::{BenchArgs, cpu_seconds, peak_rss_kib};

const ROWS_PER_BATCH: usize = 8192;
const REGIONS: [&str; 8] = [
    "eu-west", "eu-north", "us-east", "us-west", "ap-south", "ap-east", "sa-east", "af-south",
];

pub async fn run(args: &BenchArgs) -> Result<ExitCode, String> {
    let series = args.events as usize;
    let windows = args.windows.max(1) as usize;
    let samples = series * windows;
    let (url, receiver) = match &args.url {
        Some(url) => (url.clone(), None),
        None => {
            let child = Receiver::spawn()?;
            (
                format!("http://127.0.0.1:{}/api/v1/write", child.port),
                Some(child),
            )
        }
    };
    let batches = window_rows(series, windows);
    let schema = batches[0].schema();
    let options = Options::try_from_pairs(
        [
            ("connector", "prometheus_remote_write"),
            ("url", url.as_str()),
            ("metric_prefix", "bench"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .chain(args.with.iter().filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.to_string(), v.to_string()))
        })),
    )
    .map_err(|e| e.to_string())?;
    let spec = SinkSpec {
        name: "bench".into(),
        schema,
        restoring: false,
    };
    let factory = PrometheusSinkFactory::try_new(&spec, &options).map_err(|e| e.to_string())?;
    let metrics = Metrics::new();
    let mut sink = factory.create(&metrics).map_err(|e| e.to_string())?;

    let cpu_before = cpu_seconds();
    let started = Instant::now();
    for batch in batches {
        sink.write(batch).await.map_err(|e| e.to_string())?;
    }
    sink.finish().await.map_err(|e| e.to_string())?;
    let wall = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu_before;

    let text = metrics.encode();
    let sent = super::counter(&text, "weir_remote_write_samples_sent_total{");
    let dropped = super::counter(&text, "weir_remote_write_samples_dropped_total{");
    let retried = super::counter(&text, "weir_remote_write_samples_retried_total{");
    let requests = super::counter(&text, "weir_remote_write_requests_total{");
    println!(
        "benchmark: remote-write ({series} distinct series x {windows} window(s) of 1 minute -> {url})"
    );
    println!("samples:                {samples}");
    println!("wall seconds:           {wall:.2}");
    println!("sender cpu seconds:     {cpu:.2}");
    println!("samples/s:              {:.0}", samples as f64 / wall);
    println!(
        "samples per cpu-second: {:.0}",
        samples as f64 / cpu.max(1e-9)
    );
    println!("peak RSS (sender):      {} MiB", peak_rss_kib() / 1024);
    println!("requests:               {requests}");
    println!("samples sent:           {sent} (retried {retried}, dropped {dropped})");
    if let Some(receiver) = receiver {
        let (received, receiver_cpu) = receiver.stats().await?;
        println!("receiver decoded:       {received} samples in {receiver_cpu:.2} cpu seconds");
        if received != samples as u64 {
            return Err(format!(
                "the receiver decoded {received} samples, not {samples}"
            ));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `windows` consecutive windows' rows: `p99_ms` per `device` (all distinct) and `region`,
/// like a TUMBLE GROUP BY device, region would emit, the last window ending at the last
/// whole minute (so that a real Prometheus accepts the samples).
fn window_rows(series: usize, windows: usize) -> Vec<RecordBatch> {
    let schema = Arc::new(Schema::new(vec![
        Field::new(
            "window_start",
            DataType::Timestamp(TimeUnit::Millisecond, None),
            false,
        ),
        Field::new(
            "window_end",
            DataType::Timestamp(TimeUnit::Millisecond, None),
            false,
        ),
        Field::new("device", DataType::Utf8, false),
        Field::new("region", DataType::Utf8, false),
        Field::new("p99_ms", DataType::Float64, true),
    ]));
    let last_end = chrono::Utc::now().timestamp_millis() / 60_000 * 60_000;
    let ends = (0..windows as i64).rev().map(|w| last_end - w * 60_000);
    ends.flat_map(|end| {
        (0..series)
            .step_by(ROWS_PER_BATCH)
            .map(move |first| (end, first))
    })
    .map(|(end, first)| {
        let rows = first..(first + ROWS_PER_BATCH).min(series);
        let n = rows.len();
        let columns: Vec<ArrayRef> = vec![
            Arc::new(TimestampMillisecondArray::from(vec![end - 60_000; n])),
            Arc::new(TimestampMillisecondArray::from(vec![end; n])),
            Arc::new(StringArray::from_iter_values(
                rows.clone().map(|i| format!("dev-{i:08}")),
            )),
            Arc::new(StringArray::from_iter_values(
                rows.clone().map(|i| REGIONS[i % REGIONS.len()]),
            )),
            Arc::new(Float64Array::from_iter_values(
                rows.map(|i| 5.0 + (i % 1000) as f64 * 0.25),
            )),
        ];
        RecordBatch::try_new(schema.clone(), columns).expect("columns match the schema")
    })
    .collect()
}

/// The child process that decodes and counts.
pub(super) struct Receiver {
    child: Child,
    pub(super) port: u16,
}

impl Receiver {
    pub(super) fn spawn() -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut child = std::process::Command::new(exe)
            .args(["bench", "remote-write-receiver"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start the receiver: {e}"))?;
        let stdout = child.stdout.take().ok_or("the receiver has no stdout")?;
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        let port = line
            .trim()
            .strip_prefix("listening on port ")
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| format!("the receiver said {line:?}"))?;
        Ok(Self { child, port })
    }

    /// Samples decoded and CPU-seconds used, as the receiver reports them.
    pub(super) async fn stats(&self) -> Result<(u64, f64), String> {
        let body = reqwest::get(format!("http://127.0.0.1:{}/stats", self.port))
            .await
            .map_err(|e| e.to_string())?
            .text()
            .await
            .map_err(|e| e.to_string())?;
        let mut fields = body.split_whitespace();
        let samples = fields.next().and_then(|s| s.parse().ok());
        let cpu = fields.next().and_then(|s| s.parse().ok());
        samples
            .zip(cpu)
            .ok_or_else(|| format!("receiver stats {body:?}"))
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `weir bench remote-write-receiver`: accepts remote-write requests on a free port, decodes
/// them and counts their samples; `GET /stats` answers "<samples> <cpu seconds>". Exits when
/// its standard input closes (the parent ended).
pub async fn receiver() -> Result<ExitCode, String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    println!("listening on port {port}");
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        std::process::exit(0);
    });
    let samples = Arc::new(AtomicU64::new(0));
    let app = Router::new()
        .route("/api/v1/write", post(write))
        .route(
            "/stats",
            get(|State(samples): State<Arc<AtomicU64>>| async move {
                format!("{} {}\n", samples.load(Ordering::Relaxed), cpu_seconds())
            }),
        )
        .with_state(samples);
    axum::serve(listener, app)
        .await
        .map_err(|e| e.to_string())?;
    Ok(ExitCode::SUCCESS)
}

async fn write(State(samples): State<Arc<AtomicU64>>, body: Bytes) -> (StatusCode, String) {
    match decode_body(&body) {
        Ok(request) => {
            let n: usize = request.timeseries.iter().map(|s| s.samples.len()).sum();
            samples.fetch_add(n as u64, Ordering::Relaxed);
            (StatusCode::NO_CONTENT, String::new())
        }
        Err(e) => (StatusCode::BAD_REQUEST, e),
    }
}
