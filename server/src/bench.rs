//! `weir bench`: the benchmarks named in the issues. Not tests: they print figures.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::{Args, ValueEnum};
use weir_connectors::Connectors;
use weir_server::engine::{Engine, EngineConfig};

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
}

#[derive(Clone, Copy, ValueEnum)]
enum Which {
    /// NDJSON `{k, v, ts}` (100k distinct k) → file source → filter → blackhole.
    FileFilter,
}

pub async fn run(args: BenchArgs) -> Result<ExitCode, String> {
    match args.which {
        Which::FileFilter => file_filter(&args).await,
    }
}

async fn file_filter(args: &BenchArgs) -> Result<ExitCode, String> {
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
    let sql = format!(
        "CREATE STREAM events (k BIGINT, v DOUBLE, ts TIMESTAMP(3)) WITH (connector = 'file', path = '{}', format = 'json');
         CREATE SINK out WITH (connector = 'blackhole') AS SELECT k, v, ts FROM events WHERE v > 10;",
        input.display()
    );
    let engine = Engine::open(EngineConfig::default(), Arc::new(Connectors))
        .await
        .map_err(|e| e.to_string())?;
    for result in engine.execute(&sql).await {
        result.map_err(|e| e.to_string())?;
    }
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    engine.start_all().await.map_err(|e| e.to_string())?;
    engine.wait_finished().await;
    let wall = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu_before;
    let events = args.events as f64;
    println!("benchmark: file-filter (NDJSON file source -> filter v > 10 -> blackhole)");
    println!("events:                {}", args.events);
    println!("wall seconds:          {wall:.2}");
    println!("cpu seconds:           {cpu:.2}");
    println!("events/s:              {:.0}", events / wall);
    println!("events per cpu-second: {:.0}", events / cpu.max(1e-9));
    println!("peak RSS:              {} MiB", peak_rss_kib() / 1024);
    // Proof of work: what the source read and the sink received, from Weir's own metrics.
    let metrics = engine.metrics().encode();
    let counter = |prefix: &str| -> u64 {
        metrics
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    println!(
        "source records read:   {}",
        counter("weir_records_out_total{pipeline=\"out\",operator=\"source_file\"}")
    );
    println!(
        "sink rows received:    {}",
        counter("weir_sink_rows_written_total{pipeline=\"out\"")
    );
    Ok(ExitCode::SUCCESS)
}

/// `{k, v, ts}` with 100k distinct keys and 10 events per ms of event time.
fn write_events(path: &PathBuf, events: u64) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let base_ms: i64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z
    let mut state: u64 = 42;
    for i in 0..events {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let k = state % 100_000;
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
        )?;
    }
    out.flush()
}

/// User + system CPU seconds of this process so far.
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
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
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}
