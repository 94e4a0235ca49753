//! `weir bench`: the benchmarks named in the issues. Not tests: they print figures.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::{Args, ValueEnum};
use weir_connectors::Connectors;
use weir_server::engine::{Engine, EngineConfig};

mod cluster;
mod console;
mod front_door;
mod pipeline;
mod remote_write;

#[derive(Args)]
pub struct BenchArgs {
    /// Which benchmark.
    #[arg(value_enum, default_value = "file-filter")]
    which: Which,
    /// Events to generate.
    #[arg(long, default_value_t = 10_000_000)]
    events: u64,
    /// Where the input file is kept (generated once, reused).
    #[arg(long, default_value = "./weir-data/bench")]
    dir: PathBuf,
    /// kafka: a broker to use (e.g. a tansu on 127.0.0.1:9092) instead of librdkafka's
    /// in-process mock cluster.
    #[arg(long)]
    bootstrap: Option<String>,
    /// kafka, remote-write: an extra option of the stream's or sink's WITH clause,
    /// `key=value` (repeatable), e.g. `properties.fetch.queue.backoff.ms=10` or `max_shards=8`.
    #[arg(long = "with", value_name = "KEY=VALUE")]
    with: Vec<String>,
    /// remote-write: send to this remote-write URL (e.g. a Prometheus started with
    /// `--web.enable-remote-write-receiver`) instead of a child process that decodes and counts.
    /// lookup-postgres: the Postgres to create the table in (`postgres://user@host:port/db`).
    #[arg(long)]
    url: Option<String>,
    /// remote-write: consecutive 1-minute windows of the same `--events` series (the first
    /// creates the series in the receiver, the later ones append to them).
    #[arg(long, default_value_t = 1)]
    windows: u32,
    /// How often jobs checkpoint (into a temporary data directory), e.g. `10s`, or `none`.
    /// Default: `10s` for pipeline and checkpoint, `1s` for the `cluster` processes (each commit
    /// releases what crossed the repartition topic), `none` for the others.
    #[arg(long)]
    checkpoint_interval: Option<String>,
    /// Workers per pipeline over Kafka (`kafka`, `pipeline`, `checkpoint`, `cluster-run`).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// cluster-run: the topic to read (produced by `cluster`).
    #[arg(long, hide = true)]
    topic: Option<String>,
    /// cluster-run: window rows to wait for.
    #[arg(long, hide = true, default_value_t = 0)]
    window_rows: u64,
    /// cluster-run: join this cluster (with --store and --progress) instead of running alone.
    #[arg(long, hide = true)]
    cluster_name: Option<String>,
    /// cluster-run: the cluster's checkpoint store.
    #[arg(long, hide = true)]
    store: Option<PathBuf>,
    /// cluster-run: where to write progress (JSON) for the parent; it stops when
    /// `<progress>.stop` appears.
    #[arg(long, hide = true)]
    progress: Option<PathBuf>,
    /// cluster-run: send rows through the repartition topic, not partial aggregates.
    #[arg(long, hide = true)]
    no_pre_aggregate: bool,
    /// cluster: how often the cluster processes' instances reading the events commit what
    /// they sent through the repartition topic (`weir serve --cluster-commit-interval`).
    #[arg(long, default_value = "200ms", value_parser = crate::parse_duration)]
    commit_interval: std::time::Duration,
    /// cluster: how many distinct keys `k` the events have (the more often a key repeats
    /// within a checkpoint interval, the more pre-aggregation saves).
    #[arg(long, default_value_t = KEYS)]
    keys: u64,
    /// cluster: partitions of the events' topic. Default: the fewest the mock broker holds
    /// the events in (its 5 MB per partition), lz4-compressed as a producer would send them,
    /// rounded up to an even count (two workers or processes get the same share).
    #[arg(long)]
    partitions: Option<i32>,
}

/// Distinct keys `k` in the generated events.
const KEYS: u64 = 100_000;

#[derive(Clone, Copy, ValueEnum)]
enum Which {
    /// NDJSON `{k, v, ts}` (100k distinct k) → file source → filter → blackhole.
    FileFilter,
    /// The same events as Kafka messages on a 4-partition topic → Kafka source → blackhole.
    Kafka,
    /// The file-filter events → `TUMBLE(1 minute)` with count, sum, max GROUP BY k → blackhole.
    Tumble,
    /// The same through `HOP(2 seconds, 10 seconds)`.
    Hop,
    /// The same through `SESSION(10 ms)`: a key's events are about 10 ms apart, so sessions
    /// both run on and split.
    Session,
    /// `--events` distinct series in one window's rows -> Prometheus remote-write sink -> a
    /// receiver (child process) that decodes and counts; `--url` for a real one.
    RemoteWrite,
    /// The receiver `remote-write` starts.
    #[value(hide = true)]
    RemoteWriteReceiver,
    /// `--events` NDJSON events joined against a 1 M-row in-memory (file) table, then
    /// `TUMBLE(1 minute)` count, sum, max GROUP BY an enriched column, against the same
    /// aggregation by the same column carried in the events (no join). Each run in a process
    /// of its own, so that each peak RSS is its own.
    Lookup,
    /// One run of `lookup`: `--with mode=join` or `--with mode=baseline`.
    #[value(hide = true)]
    LookupRun,
    /// `--events` NDJSON events (100 k distinct keys) LEFT JOINed against a Postgres table
    /// (`--url`) holding 90 % of them, through the partial cache at its defaults -> blackhole.
    LookupPostgres,
    /// The seed job: Kafka (mock cluster) -> JOIN a 1 M-row table -> TUMBLE 1 minute GROUP BY
    /// an enriched column -> Parquet lake and Prometheus remote-write (a decode-and-count
    /// receiver), checkpoints every 10 s.
    Pipeline,
    /// 1 M keys of TUMBLE state (Kafka mock cluster): a checkpoint's duration and size, then
    /// the restore in a new engine on the same data directory.
    Checkpoint,
    /// TUMBLE(1 minute) count, sum, max GROUP BY k over Kafka (the mock cluster in this
    /// process, k not the message key): one worker pinned to one core against one process
    /// with two workers, and against two `--cluster` processes pinned to a core each (with
    /// and without pre-aggregation); each run in child processes.
    Cluster,
    /// One run of `cluster`.
    #[value(hide = true)]
    ClusterRun,
    /// A `weir serve` child with SCRAM-SHA-256 and TLS required: connections per second
    /// (handshake, login, one query), then SELECTs on a 100 k-row materialized view from 32
    /// concurrent clients (queries/s, p50 and p99 latency).
    FrontDoor,
    /// A `weir serve` child with a 10 k rows/s stream: a live tail streamed to an HTTP
    /// client (rows/s, the server's CPU and memory), read at full speed and at 1 000 rows/s,
    /// then the pipelines page's cost at one read a second.
    Console,
}

pub async fn run(args: BenchArgs) -> Result<ExitCode, String> {
    match args.which {
        Which::FileFilter => file_filter(&args).await,
        Which::Kafka => kafka(&args).await,
        Which::Tumble => window(&args, "TUMBLE(events, ts, INTERVAL '1' MINUTE)").await,
        Which::Hop => {
            window(
                &args,
                "HOP(events, ts, INTERVAL '2' SECOND, INTERVAL '10' SECOND)",
            )
            .await
        }
        Which::Session => window(&args, "SESSION(events, ts, INTERVAL '10' MILLISECOND)").await,
        Which::RemoteWrite => remote_write::run(&args).await,
        Which::RemoteWriteReceiver => remote_write::receiver().await,
        Which::Lookup => lookup(&args).await,
        Which::LookupRun => lookup_run(&args).await,
        Which::LookupPostgres => lookup_postgres(&args).await,
        Which::Pipeline => pipeline::pipeline(&args).await,
        Which::Checkpoint => pipeline::checkpoint(&args).await,
        Which::FrontDoor => front_door::run(&args).await,
        Which::Console => console::run(&args).await,
        Which::Cluster => cluster::cluster(&args).await,
        Which::ClusterRun => cluster::cluster_run(&args).await,
    }
}

/// Rows of the `lookup` benchmark's table.
const LOOKUP_TABLE_ROWS: u64 = 1_000_000;
/// Distinct values of the column the `lookup` benchmark groups by.
const LOOKUP_GROUPS: u64 = 1000;

/// Runs `lookup-run` twice, without and with the join, and prints both and what the join adds.
async fn lookup(args: &BenchArgs) -> Result<ExitCode, String> {
    // Inputs are generated here, once, so neither run pays for them.
    lookup_inputs(args)?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut cpu_per_event = Vec::new();
    for mode in ["baseline", "join"] {
        let out = std::process::Command::new(&exe)
            .args(["bench", "lookup-run", "--events", &args.events.to_string()])
            .arg("--dir")
            .arg(&args.dir)
            .args(["--with", &format!("mode={mode}")])
            .args(
                args.checkpoint_interval
                    .iter()
                    .flat_map(|i| ["--checkpoint-interval", i.as_str()]),
            )
            .output()
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if !out.status.success() {
            return Err(format!(
                "lookup-run {mode} failed: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        print!("{text}");
        let cpu = text
            .lines()
            .find_map(|l| l.strip_prefix("cpu seconds:"))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .ok_or_else(|| format!("lookup-run {mode} printed no cpu seconds"))?;
        cpu_per_event.push(cpu / args.events as f64);
    }
    println!(
        "the join adds {:.0} % CPU per event to the aggregation (target: at most 30 %)",
        (cpu_per_event[1] / cpu_per_event[0] - 1.0) * 100.0
    );
    Ok(ExitCode::SUCCESS)
}

/// The events `{k, g, v, ts}` (k over the table's 1 M keys, g = the group the table gives k)
/// and the table `k,g,name` as CSV; generated once into `--dir`.
fn lookup_inputs(args: &BenchArgs) -> Result<(PathBuf, PathBuf), String> {
    let table = lookup_table(args)?;
    let events = args
        .dir
        .join(format!("lookup-events-{}.ndjson", args.events));
    if !events.exists() {
        eprintln!(
            "generating {} events into {} ...",
            args.events,
            events.display()
        );
        let mut out = std::io::BufWriter::with_capacity(
            1 << 20,
            std::fs::File::create(&events).map_err(|e| e.to_string())?,
        );
        let mut state: u64 = 42;
        let base_ms: i64 = 1_767_225_600_000;
        for i in 0..args.events {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let k = state % LOOKUP_TABLE_ROWS;
            let ts = chrono::DateTime::from_timestamp_millis(base_ms + (i / 10) as i64)
                .unwrap_or_default()
                .format("%Y-%m-%dT%H:%M:%S%.3fZ");
            writeln!(
                out,
                "{{\"k\":{k},\"g\":{},\"v\":{}.0,\"ts\":\"{ts}\"}}",
                lookup_group(k),
                (state >> 20) % 10_000
            )
            .map_err(|e| e.to_string())?;
        }
        out.flush().map_err(|e| e.to_string())?;
    }
    Ok((events, table))
}

/// The group column of the lookup table's key `k`.
fn lookup_group(k: u64) -> u64 {
    (k.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) % LOOKUP_GROUPS
}

/// The lookup benchmarks' table `k,g,name` as CSV, generated once into `--dir`.
fn lookup_table(args: &BenchArgs) -> Result<PathBuf, String> {
    std::fs::create_dir_all(&args.dir).map_err(|e| e.to_string())?;
    let table = args
        .dir
        .join(format!("lookup-table-{LOOKUP_TABLE_ROWS}.csv"));
    if !table.exists() {
        eprintln!(
            "generating a {LOOKUP_TABLE_ROWS}-row table into {} ...",
            table.display()
        );
        let mut out =
            std::io::BufWriter::new(std::fs::File::create(&table).map_err(|e| e.to_string())?);
        writeln!(out, "k,g,name").map_err(|e| e.to_string())?;
        for k in 0..LOOKUP_TABLE_ROWS {
            writeln!(out, "{k},{},vehicle-{k}", lookup_group(k)).map_err(|e| e.to_string())?;
        }
        out.flush().map_err(|e| e.to_string())?;
    }
    Ok(table)
}

/// Distinct keys of the Postgres lookup benchmark's events; the table holds 90 % of them.
const POSTGRES_KEYS: u64 = 100_000;

/// See [`Which::LookupPostgres`].
async fn lookup_postgres(args: &BenchArgs) -> Result<ExitCode, String> {
    let url = args
        .url
        .as_deref()
        .ok_or("lookup-postgres needs --url postgres://user@host:port/database")?;
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("cannot connect to {url}: {e}"))?;
    tokio::spawn(connection);
    let known = POSTGRES_KEYS * 9 / 10;
    client
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS weir_bench_vehicles;
             CREATE TABLE weir_bench_vehicles (vehicle_id bigint PRIMARY KEY, region text);
             INSERT INTO weir_bench_vehicles SELECT i, 'region-' || (i % 50) FROM generate_series(0, {}) AS i;
             ANALYZE weir_bench_vehicles;",
            known - 1
        ))
        .await
        .map_err(|e| format!("cannot create the table: {e}"))?;
    std::fs::create_dir_all(&args.dir).map_err(|e| e.to_string())?;
    let events = args
        .dir
        .join(format!("lookup-pg-events-{}.ndjson", args.events));
    if !events.exists() {
        let mut out =
            std::io::BufWriter::new(std::fs::File::create(&events).map_err(|e| e.to_string())?);
        let mut state: u64 = 42;
        for i in 0..args.events {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            writeln!(
                out,
                "{{\"k\":{},\"v\":{}.0,\"n\":{i}}}",
                state % POSTGRES_KEYS,
                (state >> 20) % 1000
            )
            .map_err(|e| e.to_string())?;
        }
        out.flush().map_err(|e| e.to_string())?;
    }
    let sql = format!(
        "CREATE STREAM events (k BIGINT, v DOUBLE, n BIGINT) WITH (connector = 'file', path = '{}', format = 'json');
         CREATE TABLE vehicles (vehicle_id BIGINT PRIMARY KEY, region TEXT)
           WITH (connector = 'postgres', url = '{url}', table = 'weir_bench_vehicles');
         CREATE SINK out WITH (connector = 'blackhole') AS
           SELECT e.k, e.v, t.region FROM events e LEFT JOIN vehicles t ON e.k = t.vehicle_id;",
        events.display()
    );
    let title = format!(
        "lookup-postgres (NDJSON file source, {POSTGRES_KEYS} distinct keys, 10 % unknown -> LEFT JOIN a Postgres table through the partial cache (defaults) -> blackhole)"
    );
    run_to_end(args, &sql, &title, "sink rows received").await
}

/// One run of the lookup benchmark (see [`Which::Lookup`]).
async fn lookup_run(args: &BenchArgs) -> Result<ExitCode, String> {
    let (events, table) = lookup_inputs(args)?;
    let join = match args.with.as_slice() {
        [mode] if mode == "mode=join" => true,
        [mode] if mode == "mode=baseline" => false,
        _ => return Err("lookup-run takes --with mode=join or --with mode=baseline".into()),
    };
    let stream = format!(
        "CREATE STREAM events (k BIGINT, g BIGINT, v DOUBLE, ts TIMESTAMP(3), WATERMARK FOR ts AS ts - INTERVAL '1' SECOND) \
           WITH (connector = 'file', path = '{}', format = 'json');",
        events.display()
    );
    let (sql, title) = if join {
        (
            format!(
                "{stream}
                 CREATE TABLE vehicles (k BIGINT PRIMARY KEY, g BIGINT, name TEXT)
                   WITH (connector = 'file', path = '{}', format = 'csv');
                 CREATE SINK out WITH (connector = 'blackhole') AS
                   SELECT window_start, window_end, t.g, count(*) AS n, sum(e.v) AS total, max(e.v) AS top
                   FROM TUMBLE(events, ts, INTERVAL '1' MINUTE) AS e JOIN vehicles t ON e.k = t.k
                   GROUP BY window_start, window_end, t.g;",
                table.display()
            ),
            format!(
                "lookup join (NDJSON file source -> JOIN a {LOOKUP_TABLE_ROWS}-row file table -> TUMBLE 1 min count, sum, max GROUP BY the table's g -> blackhole)"
            ),
        )
    } else {
        (
            format!(
                "{stream}
                 CREATE SINK out WITH (connector = 'blackhole') AS
                   SELECT window_start, window_end, g, count(*) AS n, sum(v) AS total, max(v) AS top
                   FROM TUMBLE(events, ts, INTERVAL '1' MINUTE)
                   GROUP BY window_start, window_end, g;"
            ),
            "baseline (NDJSON file source -> TUMBLE 1 min count, sum, max GROUP BY the events' g -> blackhole)".to_string(),
        )
    };
    run_to_end(args, &sql, &title, "window rows emitted").await
}

async fn kafka(args: &BenchArgs) -> Result<ExitCode, String> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};

    let topic = format!("bench-{}-{}", args.events, std::process::id());
    // The mock cluster lives in this process: its CPU and memory count in the figures.
    let mock = match &args.bootstrap {
        Some(_) => None,
        None => Some(rdkafka::mocking::MockCluster::new(1).map_err(|e| e.to_string())?),
    };
    let bootstrap = match (&mock, &args.bootstrap) {
        (Some(mock), _) => mock.bootstrap_servers(),
        (None, Some(b)) => b.clone(),
        (None, None) => unreachable!("one of them is set"),
    };
    let partitions = if mock.is_some() { MOCK_PARTITIONS } else { 4 };
    match &mock {
        Some(mock) => mock
            .create_topic(&topic, partitions, 1)
            .map_err(|e| e.to_string())?,
        None => {
            let admin: AdminClient<_> = rdkafka::ClientConfig::new()
                .set("bootstrap.servers", &bootstrap)
                .create()
                .map_err(|e| e.to_string())?;
            let new = NewTopic::new(&topic, partitions, TopicReplication::Fixed(1));
            admin
                .create_topics([&new], &AdminOptions::new())
                .await
                .map_err(|e| e.to_string())?;
        }
    }
    // Every event is produced first, so that only consuming is measured. Events go to the
    // partitions in runs of PRODUCER_RUN, as with the sticky partitioner. librdkafka's mock
    // broker keeps at most 5 MB per partition, so there the topic has MOCK_PARTITIONS
    // partitions (the mock broker serves fetches on a thread of this process: its CPU counts).
    let sink_rows = "weir_sink_rows_written_total{pipeline=\"out\"";
    eprintln!(
        "producing {} events into {topic} at {bootstrap} ...",
        args.events
    );
    {
        let (bootstrap, topic, events) = (bootstrap.clone(), topic.clone(), args.events);
        tokio::task::spawn_blocking(move || produce_events(&bootstrap, &topic, events, partitions))
            .await
            .map_err(|e| e.to_string())??;
    }
    let (engine, _scratch, interval) = bench_engine(args, None).await?;
    let mut extra = String::new();
    for option in &args.with {
        let (key, value) = option
            .split_once('=')
            .ok_or_else(|| format!("--with {option}: expected KEY=VALUE"))?;
        extra.push_str(&format!(", '{key}' = '{value}'"));
    }
    let sql = format!(
        "CREATE STREAM events (k BIGINT, v DOUBLE, ts TIMESTAMP(3), WATERMARK FOR ts AS ts - INTERVAL '1' SECOND) \
         WITH (connector = 'kafka', topic = '{topic}', 'bootstrap.servers' = '{bootstrap}', 'scan.startup.mode' = 'earliest'{extra});
         CREATE SINK out FROM events WITH (connector = 'blackhole');"
    );
    for result in engine.execute(&sql).await {
        result.map_err(|e| e.to_string())?;
    }
    let rss_before = peak_rss_kib();
    let joined = Instant::now();
    engine.start_all().await.map_err(|e| e.to_string())?;
    // Time from the first row on: joining the consumer group (seconds) is not throughput.
    let mut first = None;
    let mut progress = (0, Instant::now());
    loop {
        let metrics = engine.metrics().encode();
        let rows = counter(&metrics, sink_rows);
        if rows > 0 && first.is_none() {
            first = Some((rows, Instant::now(), cpu_seconds()));
        }
        if rows >= args.events {
            break;
        }
        if rows > progress.0 {
            progress = (rows, Instant::now());
        } else if progress.1.elapsed() > std::time::Duration::from_secs(30) {
            return Err(format!("stalled: {rows} of {} rows arrived", args.events));
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let consumed = Consumed::now(args.events, joined, first, rss_before);
    let broker = if mock.is_some() {
        "librdkafka mock cluster in this process"
    } else {
        "external broker"
    };
    println!(
        "benchmark: kafka ({partitions}-partition topic, {broker}, produced beforehand -> Kafka source -> blackhole); {}",
        checkpoints_text(interval)
    );
    consumed.print();
    let metrics = engine.metrics().encode();
    println!(
        "source records read:   {}",
        counter(
            &metrics,
            "weir_records_out_total{pipeline=\"out\",operator=\"source_kafka\"}"
        )
    );
    println!("sink rows received:    {}", counter(&metrics, sink_rows));
    engine.shutdown(std::time::Duration::from_secs(30)).await;
    Ok(ExitCode::SUCCESS)
}

/// Produces the benchmark's events to `topic`, spread evenly over its partitions.
fn produce_events(
    bootstrap: &str,
    topic: &str,
    events: u64,
    partitions: i32,
) -> Result<(), String> {
    let mut state = 42;
    let line = move |i, out: &mut Vec<u8>| {
        // write_event ends the line with a newline; a message has none.
        let _ = write_event(out, i, &mut state, KEYS);
        out.pop();
    };
    produce_with(bootstrap, topic, events, partitions, "none", line, None)
}

/// Produces `events` messages made by `line` (event number, buffer) to `topic`, in runs of
/// `PRODUCER_RUN` per partition, then `closer` once to every partition; `compression` is
/// the producer's `compression.type`.
fn produce_with(
    bootstrap: &str,
    topic: &str,
    events: u64,
    partitions: i32,
    compression: &str,
    mut line: impl FnMut(u64, &mut Vec<u8>),
    closer: Option<Vec<u8>>,
) -> Result<(), String> {
    use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
    let delivered = Delivered::default();
    let producer: ThreadedProducer<Delivered> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "20")
        .set("compression.type", compression)
        .create_with_context(delivered.clone())
        .map_err(|e| e.to_string())?;
    let mut payload = Vec::with_capacity(64);
    let send = |payload: &[u8], partition: i32| {
        let mut record = BaseRecord::<(), _>::to(topic)
            .payload(payload)
            .partition(partition);
        while let Err((_, back)) = producer.send(record) {
            record = back;
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    };
    for i in 0..events {
        payload.clear();
        line(i, &mut payload);
        send(&payload, ((i / PRODUCER_RUN) % partitions as u64) as i32);
    }
    if let Some(closer) = &closer {
        for partition in 0..partitions {
            send(closer, partition);
        }
    }
    producer
        .flush(std::time::Duration::from_secs(600))
        .map_err(|e| e.to_string())?;
    match delivered.0.load(std::sync::atomic::Ordering::Relaxed) {
        0 => Ok(()),
        failed => Err(format!("{failed} events were not delivered to the broker")),
    }
}

/// Consecutive events sent to one partition before moving to the next, as Kafka's sticky
/// partitioner does for unkeyed records: each produce batch then fills up (librdkafka's
/// `batch.num.messages` is 10 000) instead of holding a few events per partition.
const PRODUCER_RUN: u64 = 10_000;

/// Partitions of the mock cluster's topic: it keeps at most 100 000 messages or 5 MB per
/// partition, so 10 M events of ~60 bytes need well over 120.
const MOCK_PARTITIONS: i32 = 160;

/// Counts messages the broker did not take.
#[derive(Clone, Default)]
struct Delivered(Arc<std::sync::atomic::AtomicU64>);

impl rdkafka::ClientContext for Delivered {}

impl rdkafka::producer::ProducerContext for Delivered {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &rdkafka::producer::DeliveryResult<'_>, _: ()) {
        if result.is_err() {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// The sum of every series starting with `prefix` in the text format.
fn counter(metrics: &str, prefix: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// The benchmark's NDJSON file of `args.events` events, generated once.
fn input_file(args: &BenchArgs) -> Result<PathBuf, String> {
    std::fs::create_dir_all(&args.dir).map_err(|e| e.to_string())?;
    let input = args.dir.join(format!("events-{}.ndjson", args.events));
    if !input.exists() {
        eprintln!(
            "generating {} events into {} ...",
            args.events,
            input.display()
        );
        write_events(&input, args.events).map_err(|e| e.to_string())?;
    }
    Ok(input)
}

/// `window` over the file's events: count, sum and max of v per k and window, watermark
/// 1 s behind the event time, into the blackhole sink.
async fn window(args: &BenchArgs, window: &str) -> Result<ExitCode, String> {
    let input = input_file(args)?;
    let sql = format!(
        "CREATE STREAM events (k BIGINT, v DOUBLE, ts TIMESTAMP(3), WATERMARK FOR ts AS ts - INTERVAL '1' SECOND) \
           WITH (connector = 'file', path = '{}', format = 'json');
         CREATE SINK out WITH (connector = 'blackhole') AS
           SELECT window_start, window_end, k, count(*) AS n, sum(v) AS total, max(v) AS top
           FROM {window} GROUP BY window_start, window_end, k;",
        input.display()
    );
    let title = format!("{window} (NDJSON file source -> count, sum, max GROUP BY k -> blackhole)");
    run_to_end(args, &sql, &title, "window rows emitted").await
}

async fn file_filter(args: &BenchArgs) -> Result<ExitCode, String> {
    let input = input_file(args)?;
    let sql = format!(
        "CREATE STREAM events (k BIGINT, v DOUBLE, ts TIMESTAMP(3)) WITH (connector = 'file', path = '{}', format = 'json');
         CREATE SINK out WITH (connector = 'blackhole') AS SELECT k, v, ts FROM events WHERE v > 10;",
        input.display()
    );
    let title = "file-filter (NDJSON file source -> filter v > 10 -> blackhole)";
    run_to_end(args, &sql, title, "sink rows received").await
}

/// `--checkpoint-interval`, or `default` when it is not given; `None` for `none`.
fn checkpoint_interval(
    args: &BenchArgs,
    default: Option<std::time::Duration>,
) -> Result<Option<std::time::Duration>, String> {
    match args.checkpoint_interval.as_deref() {
        None => Ok(default),
        Some("none") => Ok(None),
        Some(text) => weir_sql::options::parse_duration(text)
            .map(Some)
            .ok_or_else(|| {
                format!("--checkpoint-interval {text}: expected e.g. 10s, 500ms or none")
            }),
    }
}

/// A benchmark's scratch data directory (checkpoints and lake), removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(args: &BenchArgs) -> Result<Self, String> {
        let dir = args.dir.join(format!("run-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        Ok(Self(dir))
    }

    /// Leaves the directory in place (a failed run's logs and checkpoints), and says where.
    fn keep(self) -> String {
        let dir = self.0.clone();
        std::mem::forget(self);
        format!("(logs and checkpoints kept in {})", dir.display())
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An engine that checkpoints every `interval` into `data_dir`; with `None`, never (an
/// interval of a day, no store).
fn engine_config(
    data_dir: Option<&std::path::Path>,
    interval: Option<std::time::Duration>,
) -> EngineConfig {
    let day = std::time::Duration::from_secs(86_400);
    EngineConfig {
        data_dir: interval.and(data_dir).map(std::path::Path::to_path_buf),
        checkpoint_interval: Some(interval.unwrap_or(day)),
        ..EngineConfig::default()
    }
}

/// An engine on a scratch data directory that checkpoints every `--checkpoint-interval`
/// (`default` when not given); the directory, and the interval for the title.
async fn bench_engine(
    args: &BenchArgs,
    default: Option<std::time::Duration>,
) -> Result<(Arc<Engine>, Scratch, Option<std::time::Duration>), String> {
    let interval = checkpoint_interval(args, default)?;
    let scratch = Scratch::new(args)?;
    let engine = Engine::open(
        EngineConfig {
            workers: Some(args.workers),
            ..engine_config(Some(&scratch.0.join("data")), interval)
        },
        Arc::new(Connectors::default()),
    )
    .await
    .map_err(|e| e.to_string())?;
    Ok((engine, scratch, interval))
}

/// Figures of a run that consumed a topic produced beforehand, timed from the first record
/// read (joining the consumer group is not throughput).
struct Consumed {
    events: u64,
    /// Records read before the clock started.
    measured: f64,
    join_seconds: f64,
    wall: f64,
    cpu: f64,
    rss_before_kib: u64,
}

impl Consumed {
    /// The run as of now. `first`: records read, time and CPU seconds at the first record.
    fn now(
        events: u64,
        joined: Instant,
        first: Option<(u64, Instant, f64)>,
        rss_before_kib: u64,
    ) -> Self {
        let (first_records, started, cpu_before) = first.unwrap_or((0, joined, 0.0));
        Self {
            events,
            measured: (events - first_records.min(events)) as f64,
            join_seconds: (started - joined).as_secs_f64(),
            wall: started.elapsed().as_secs_f64(),
            cpu: cpu_seconds() - cpu_before,
            rss_before_kib,
        }
    }

    /// Prints events, the group join, wall and CPU seconds, rates and peak RSS.
    fn print(&self) {
        let (measured, wall, cpu) = (self.measured, self.wall, self.cpu);
        println!("events:                {}", self.events);
        println!(
            "group join:            {:.2} s (not measured)",
            self.join_seconds
        );
        println!("wall seconds:          {wall:.2} (the last {measured} events)");
        println!("cpu seconds:           {cpu:.2}");
        println!("events/s:              {:.0}", measured / wall);
        println!("events per cpu-second: {:.0}", measured / cpu.max(1e-9));
        println!(
            "peak RSS:              {} MiB ({} MiB before consuming)",
            peak_rss_kib() / 1024,
            self.rss_before_kib / 1024
        );
    }
}

/// How a benchmark checkpoints, for its title.
fn checkpoints_text(interval: Option<std::time::Duration>) -> String {
    match interval {
        Some(every) => format!("checkpoints every {every:?} to a local directory"),
        None => "no checkpoints".to_string(),
    }
}

/// Runs `sql` (a file stream `events` and a sink `out`) until the file is read, then prints
/// the figures and, as proof of work, what the source read and the sink received.
async fn run_to_end(
    args: &BenchArgs,
    sql: &str,
    title: &str,
    sink_rows: &str,
) -> Result<ExitCode, String> {
    let (engine, _scratch, interval) = bench_engine(args, None).await?;
    for result in engine.execute(sql).await {
        result.map_err(|e| e.to_string())?;
    }
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    engine.start_all().await.map_err(|e| e.to_string())?;
    // Window state, sampled while the job runs: the largest seen, and its bytes per group.
    let mut peak = (0u64, 0u64);
    let finished = engine.wait_finished();
    tokio::pin!(finished);
    loop {
        tokio::select! {
            () = &mut finished => break,
            () = tokio::time::sleep(std::time::Duration::from_millis(20)) => {
                let metrics = engine.metrics().encode();
                let bytes = counter(&metrics, "weir_operator_state_bytes{");
                let groups = counter(&metrics, "weir_operator_keys_in_state{");
                if bytes > peak.0 {
                    peak = (bytes, groups);
                }
            }
        }
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu_before;
    let events = args.events as f64;
    println!("benchmark: {title}; {}", checkpoints_text(interval));
    println!("events:                {}", args.events);
    println!("wall seconds:          {wall:.2}");
    println!("cpu seconds:           {cpu:.2}");
    println!("events/s:              {:.0}", events / wall);
    println!("events per cpu-second: {:.0}", events / cpu.max(1e-9));
    println!("peak RSS:              {} MiB", peak_rss_kib() / 1024);
    if peak.1 > 0 {
        println!(
            "window state at peak:  {:.1} MiB, {} groups (window panes x keys), {} bytes per group",
            peak.0 as f64 / (1 << 20) as f64,
            peak.1,
            peak.0 / peak.1
        );
    }
    let metrics = engine.metrics().encode();
    println!(
        "source records read:   {}",
        counter(
            &metrics,
            "weir_records_out_total{pipeline=\"out\",operator=\"source_file\"}"
        )
    );
    let checkpoints = counter(&metrics, "weir_checkpoints_completed_total{");
    if checkpoints > 0 {
        println!("checkpoints completed: {checkpoints}");
    }
    println!(
        "{:<23}{}",
        format!("{sink_rows}:"),
        counter(&metrics, "weir_sink_rows_written_total{pipeline=\"out\"")
    );
    let lookups = counter(&metrics, "weir_lookups_total{");
    if lookups > 0 {
        println!(
            "lookups:               {lookups} ({} found, {} not found)",
            counter(&metrics, "weir_lookup_hits_total{"),
            counter(&metrics, "weir_lookup_misses_total{")
        );
    }
    let (cache_hits, cache_misses) = (
        counter(&metrics, "weir_lookup_cache_hits_total{"),
        counter(&metrics, "weir_lookup_cache_misses_total{"),
    );
    if cache_hits + cache_misses > 0 {
        println!(
            "cache hit ratio:       {:.4} ({cache_hits} records from the cache, {cache_misses} sent to the database)",
            cache_hits as f64 / (cache_hits + cache_misses) as f64
        );
        println!(
            "queries to postgres:   {}",
            counter(&metrics, "weir_lookup_table_queries_total{")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `{k, v, ts}` with 100k distinct keys and 10 events per ms of event time.
fn write_events(path: &PathBuf, events: u64) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut state = 42;
    for i in 0..events {
        write_event(&mut out, i, &mut state, KEYS)?;
    }
    out.flush()
}

/// Event `i` as one NDJSON line, its key one of `keys`; `state` is the xorshift generator,
/// 42 before event 0.
fn write_event(out: &mut impl Write, i: u64, state: &mut u64, keys: u64) -> std::io::Result<()> {
    let base_ms: i64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    let state = *state;
    let k = state % keys.max(1);
    let v = (state >> 20) % 10_000;
    let ts = base_ms + (i / 10) as i64;
    let secs = ts.div_euclid(1000);
    let millis = ts.rem_euclid(1000);
    let time = chrono::DateTime::from_timestamp(secs, 0)
        .unwrap_or_default()
        .format("%Y-%m-%dT%H:%M:%S");
    writeln!(
        out,
        "{{\"k\":{k},\"v\":{}.{:02},\"ts\":\"{time}.{millis:03}Z\"}}",
        v / 100,
        v % 100
    )
}

/// User + system CPU seconds of this process so far.
fn cpu_seconds() -> f64 {
    process_cpu_seconds("self")
}

/// User + system CPU seconds of process `pid` (or `self`) so far.
fn process_cpu_seconds(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which is in parentheses and may contain spaces).
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of /proc/self/stat; here 11 and 12 (0-based, after ')').
    (ticks(11) + ticks(12)) / 100.0
}

/// Peak resident set size (VmHWM), KiB.
fn peak_rss_kib() -> u64 {
    process_peak_rss_kib("self")
}

/// Peak resident set size (VmHWM) of process `pid` (or `self`), KiB.
fn process_peak_rss_kib(pid: &str) -> u64 {
    process_status_kib(pid, "VmHWM:")
}

/// A `/proc/<pid>/status` field in KiB (`VmHWM:`, `VmRSS:`); 0 if unreadable.
fn process_status_kib(pid: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}
