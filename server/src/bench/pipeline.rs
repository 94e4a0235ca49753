//! `weir bench pipeline` (the seed job end to end) and `weir bench checkpoint` (the cost of
//! checkpointing and restoring 1 M keys of window state). Both read from librdkafka's mock
//! cluster in this process, so the broker's CPU counts in the figures, and checkpoint into a
//! local directory, as `weir serve` does by default.

use std::collections::HashSet;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use weir_connectors::Connectors;
use weir_server::engine::Engine;

use super::remote_write::Receiver;
use super::{
    BenchArgs, Consumed, LOOKUP_TABLE_ROWS, Scratch, bench_engine, checkpoint_interval,
    checkpoints_text, counter, cpu_seconds, engine_config, lookup_group, lookup_table,
    peak_rss_kib,
};

/// Event-time start of the generated events: 2026-01-01T00:00:00Z.
const BASE_MS: i64 = 1_767_225_600_000;

/// A topic on a mock cluster with `events` records from `line`, and `closers` (one record per
/// partition, after the rest) so that every window closes.
pub(super) struct Topic {
    cluster: rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    pub(super) name: String,
    pub(super) partitions: i32,
}

impl Topic {
    pub(super) fn produce(
        events: u64,
        line: impl FnMut(u64, &mut Vec<u8>) + Send + 'static,
        closer: Option<Vec<u8>>,
    ) -> Result<Topic, String> {
        // The mock broker keeps at most 5 MB of produce batches per partition (and at most
        // 100 000 batches): uncompressed, about 75 000 of these events.
        let partitions = (events / 60_000 + 1).max(4) as i32;
        Self::produce_as(events, partitions, "none", line, closer)
    }

    /// As [`Topic::produce`], into `partitions` partitions, the producer compressing its
    /// batches with `compression` (what the mock broker keeps, and consumers decompress).
    pub(super) fn produce_as(
        events: u64,
        partitions: i32,
        compression: &str,
        line: impl FnMut(u64, &mut Vec<u8>) + Send + 'static,
        closer: Option<Vec<u8>>,
    ) -> Result<Topic, String> {
        let cluster = rdkafka::mocking::MockCluster::new(1).map_err(|e| e.to_string())?;
        let name = format!("bench-{}", std::process::id());
        cluster
            .create_topic(&name, partitions, 1)
            .map_err(|e| e.to_string())?;
        eprintln!(
            "producing {events} events into a {partitions}-partition topic ({compression} compression) ..."
        );
        super::produce_with(
            &cluster.bootstrap_servers(),
            &name,
            events,
            partitions,
            compression,
            line,
            closer,
        )?;
        Ok(Topic {
            cluster,
            name,
            partitions,
        })
    }

    pub(super) fn bootstrap(&self) -> String {
        self.cluster.bootstrap_servers()
    }

    /// Creates topic `name` with this topic's partition count on the same mock cluster.
    pub(super) fn create_sibling(&self, name: &str) -> Result<(), String> {
        self.cluster
            .create_topic(name, self.partitions, 1)
            .map_err(|e| format!("cannot create {name}: {e}"))
    }
}

async fn execute(engine: &Engine, sql: &str) -> Result<(), String> {
    for result in engine.execute(sql).await {
        result.map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Kafka (mock cluster) → lookup join against a 1 M-row table → TUMBLE 1 minute GROUP BY the
/// table's group column → Parquet lake (`partition_by = 'date'`) and Prometheus remote-write
/// (a child process that decodes and counts), checkpoints every 10 s (`--checkpoint-interval
/// none` to compare). Timed until every window row has reached both sinks; what they hold
/// is delivered at the next checkpoint, or the last one at shutdown, which is timed apart.
pub async fn pipeline(args: &BenchArgs) -> Result<ExitCode, String> {
    let table = lookup_table(args)?;
    let group = lookup_group;
    // The (minute, group) rows the job emits, counted as the events are made.
    let windows = {
        let mut state: u64 = 42;
        let mut seen = HashSet::new();
        for i in 0..args.events {
            state = xorshift(state);
            seen.insert(((i / 10) / 60_000, group(state % LOOKUP_TABLE_ROWS)));
        }
        seen.len() as u64
    };
    let mut state: u64 = 42;
    let topic = Topic::produce(
        args.events,
        move |i, out| {
            state = xorshift(state);
            let ts = BASE_MS + (i / 10) as i64;
            write_json(out, state % LOOKUP_TABLE_ROWS, (state >> 20) % 10_000, ts);
        },
        // A key the table does not have, an hour later: it closes every window.
        Some(format!(r#"{{"k":-1,"v":0,"ts":{}}}"#, BASE_MS + 86_400_000).into_bytes()),
    )?;
    let receiver = Receiver::spawn()?;
    let (engine, work, every) = bench_engine(args, Some(Duration::from_secs(10))).await?;
    execute(
        &engine,
        &format!(
            "CREATE STREAM events (k BIGINT, v BIGINT, ts TIMESTAMP(3), WATERMARK FOR ts AS ts - INTERVAL '1' SECOND)
               WITH (connector = 'kafka', topic = '{topic}', 'bootstrap.servers' = '{bootstrap}', 'scan.startup.mode' = 'earliest');
             CREATE TABLE vehicles (k BIGINT PRIMARY KEY, g BIGINT, name TEXT)
               WITH (connector = 'file', path = '{table}', format = 'csv');
             CREATE MATERIALIZED VIEW per_group AS
               SELECT window_start, window_end, t.g, count(*) AS n, sum(e.v) AS total, max(e.v) AS top
               FROM TUMBLE(events, ts, INTERVAL '1' MINUTE) AS e JOIN vehicles t ON e.k = t.k
               GROUP BY window_start, window_end, t.g;
             CREATE SINK lake FROM per_group WITH (connector = 'parquet', path = '{lake}', partition_by = 'date');
             CREATE SINK prom FROM per_group WITH (connector = 'prometheus_remote_write',
               url = 'http://127.0.0.1:{port}/api/v1/write', metric_prefix = 'bench');",
            topic = topic.name,
            bootstrap = topic.bootstrap(),
            table = table.display(),
            lake = work.0.join("lake").display(),
            port = receiver.port,
        ),
    )
    .await?;
    let rss_before = peak_rss_kib();
    let joined = Instant::now();
    engine.start_all().await.map_err(|e| e.to_string())?;
    let read = "weir_source_partition_records_in_total{source=\"events\"";
    let written = |metrics: &str, sink: &str| {
        counter(
            metrics,
            &format!("weir_sink_rows_written_total{{pipeline=\"{sink}\""),
        )
    };
    let mut first = None;
    let mut progress = (0, Instant::now());
    loop {
        let metrics = engine.metrics().encode();
        let records = counter(&metrics, read);
        if records > 0 && first.is_none() {
            first = Some((records, Instant::now(), cpu_seconds()));
        }
        let rows = written(&metrics, "lake").min(written(&metrics, "prom"));
        if rows >= windows {
            break;
        }
        if records + rows > progress.0 {
            progress = (records + rows, Instant::now());
        } else if progress.1.elapsed() > Duration::from_secs(60) {
            return Err(format!(
                "stalled: {records} of {} events read, {rows} of {windows} window rows written",
                args.events
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let consumed = Consumed::now(args.events, joined, first, rss_before);
    let metrics = engine.metrics().encode();
    println!(
        "benchmark: pipeline (Kafka mock cluster in this process -> JOIN a {LOOKUP_TABLE_ROWS}-row file table -> TUMBLE 1 min count, sum, max GROUP BY the table's g -> Parquet lake + Prometheus remote-write to a decode-and-count receiver); {}",
        checkpoints_text(every)
    );
    consumed.print();
    println!("source records read:   {}", counter(&metrics, read));
    println!(
        "window rows written:   {} to the lake, {} to Prometheus (expected {windows} each)",
        written(&metrics, "lake"),
        written(&metrics, "prom")
    );
    println!(
        "checkpoints completed: {}",
        counter(&metrics, "weir_checkpoints_completed_total{")
    );
    // Delivery: the last checkpoint at shutdown publishes the lake's files and sends the
    // samples Prometheus has not had yet.
    let stopping = Instant::now();
    engine.shutdown(Duration::from_secs(60)).await;
    let metrics = engine.metrics().encode();
    let sent = counter(&metrics, "weir_remote_write_samples_sent_total{");
    let (received, receiver_cpu) = receiver.stats().await?;
    let files = published_files(&work.0.join("lake"));
    println!(
        "stop and deliver:      {:.2} s (last checkpoint; {files} Parquet files published, {sent} samples sent)",
        stopping.elapsed().as_secs_f64()
    );
    println!("receiver decoded:      {received} samples in {receiver_cpu:.2} cpu seconds");
    if received != sent || sent == 0 || files == 0 {
        return Err(format!(
            "not delivered: {files} files, {sent} samples sent, {received} received"
        ));
    }
    Ok(ExitCode::SUCCESS)
}

/// Published (not in-progress) Parquet files under `dir`.
fn published_files(dir: &std::path::Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| e.path())
        .map(|path| {
            if path.is_dir() {
                published_files(&path)
            } else {
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                usize::from(name.ends_with(".parquet") && !name.starts_with('.'))
            }
        })
        .sum()
}

/// `--events` events over 1 M keys, all in one hour-long TUMBLE window (count, sum, max per
/// key), so that 1 M keys of state are open: the duration and size of a checkpoint taken
/// after the last event, then the time a new engine on the same data directory takes to
/// restore it.
pub async fn checkpoint(args: &BenchArgs) -> Result<ExitCode, String> {
    const KEYS: u64 = 1_000_000;
    let events = args.events.max(KEYS);
    let topic = Topic::produce(
        events,
        move |i, out| write_json(out, i % KEYS, i % 1000, BASE_MS + (i / 1000) as i64),
        None,
    )?;
    let work = Scratch::new(args)?;
    let data = work.0.join("data");
    let interval = checkpoint_interval(args, Some(Duration::from_secs(10)))?
        .ok_or("the checkpoint benchmark needs checkpoints")?;
    let sql = format!(
        "CREATE STREAM events (k BIGINT, v BIGINT, ts TIMESTAMP(3), WATERMARK FOR ts AS ts - INTERVAL '1' SECOND)
           WITH (connector = 'kafka', topic = '{}', 'bootstrap.servers' = '{}', 'scan.startup.mode' = 'earliest');
         CREATE SINK out WITH (connector = 'blackhole') AS
           SELECT window_start, window_end, k, count(*) AS n, sum(v) AS total, max(v) AS top
           FROM TUMBLE(events, ts, INTERVAL '1' HOUR) GROUP BY window_start, window_end, k;",
        topic.name,
        topic.bootstrap()
    );
    let engine = Engine::open(
        weir_server::engine::EngineConfig {
            workers: Some(args.workers),
            ..engine_config(Some(&data), Some(interval))
        },
        Arc::new(Connectors::default()),
    )
    .await
    .map_err(|e| e.to_string())?;
    execute(&engine, &sql).await?;
    let started = Instant::now();
    engine.start_all().await.map_err(|e| e.to_string())?;
    let job = "{job=\"out\"}";
    let completed = |m: &str| counter(m, &format!("weir_checkpoints_completed_total{job}"));
    // Every event in state, then the next checkpoint that completes.
    let (before, sum_before) = loop {
        let m = engine.metrics().encode();
        if counter(
            &m,
            "weir_source_partition_records_in_total{source=\"events\"",
        ) >= events
        {
            break (
                completed(&m),
                histogram_sum(&m, "weir_checkpoint_seconds_sum", job),
            );
        }
        if started.elapsed() > Duration::from_secs(600) {
            return Err("the events were not read in 10 minutes".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let deadline = Instant::now() + interval * 3 + Duration::from_secs(30);
    let (took, bytes, keys) = loop {
        let m = engine.metrics().encode();
        if completed(&m) > before {
            break (
                histogram_sum(&m, "weir_checkpoint_seconds_sum", job) - sum_before,
                counter(&m, &format!("weir_checkpoint_bytes{job}")),
                counter(&m, "weir_operator_keys_in_state{"),
            );
        }
        if Instant::now() > deadline {
            return Err("no checkpoint completed after the last event".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    engine.shutdown(Duration::from_secs(60)).await;
    drop(engine);

    let cpu_before = cpu_seconds();
    let reopened = Instant::now();
    let engine = Engine::open(
        weir_server::engine::EngineConfig {
            workers: Some(args.workers),
            ..engine_config(Some(&data), Some(interval))
        },
        Arc::new(Connectors::default()),
    )
    .await
    .map_err(|e| e.to_string())?;
    engine.start_all().await.map_err(|e| e.to_string())?;
    let restore = "weir_checkpoint_restore_seconds{job=\"out\"}";
    let restored = loop {
        let m = engine.metrics().encode();
        let seconds = m
            .lines()
            .find_map(|l| l.strip_prefix(restore))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| *s > 0.0);
        if let Some(seconds) = seconds {
            break seconds;
        }
        if reopened.elapsed() > Duration::from_secs(120) {
            return Err("the job did not restore in 2 minutes".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    println!(
        "benchmark: checkpoint ({events} events over {KEYS} keys -> TUMBLE 1 hour count, sum, max GROUP BY k, all in one open window; local checkpoint store)"
    );
    println!("keys in window state:  {keys}");
    println!("checkpoint seconds:    {took:.3} (barrier injected -> checkpoint written)");
    println!(
        "checkpoint size:       {:.1} MiB ({bytes} bytes)",
        bytes as f64 / (1 << 20) as f64
    );
    println!("restore seconds:       {restored:.3} (read the checkpoint, restore every operator)");
    println!(
        "reopen to restored:    {:.3} s, {:.2} cpu seconds (engine open, catalog, Kafka client, restore)",
        reopened.elapsed().as_secs_f64(),
        cpu_seconds() - cpu_before
    );
    println!("peak RSS:              {} MiB", peak_rss_kib() / 1024);
    engine.shutdown(Duration::from_secs(60)).await;
    Ok(ExitCode::SUCCESS)
}

fn histogram_sum(metrics: &str, name: &str, labels: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}{labels}")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

pub(super) fn xorshift(mut state: u64) -> u64 {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    state
}

fn write_json(out: &mut Vec<u8>, k: u64, v: u64, ts: i64) {
    use std::io::Write;
    let _ = write!(out, r#"{{"k":{k},"v":{v},"ts":{ts}}}"#);
}
