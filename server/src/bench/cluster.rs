//! `weir bench cluster`: the windows benchmark over Kafka on one worker pinned to one core,
//! against one process with two workers, and against two `--cluster` processes pinned to a
//! core each (with pre-aggregation, then without, for the repartition topic's bytes per
//! event). Each run is one or two child processes (`cluster-run`) reading a topic produced
//! beforehand to librdkafka's mock cluster in this process, so the figures are the
//! children's alone; the broker's CPU (serving fetches and the repartition topic) is
//! printed beside them.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::pipeline::{Topic, xorshift};
use super::{BenchArgs, Consumed, Scratch, counter, cpu_seconds, peak_rss_kib, write_event};

/// One minute in the events' time: 10 events per millisecond.
const EVENTS_PER_MINUTE: u64 = 600_000;
/// The window rows the blackhole sink wrote.
const WINDOW_ROWS: &str = "weir_sink_rows_written_total{pipeline=\"out\",sink=\"blackhole\"}";
/// How often a cluster process checkpoints: each commit releases what crossed the
/// repartition topic, so it bounds the latency from the source to the window.
const CLUSTER_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);
/// How often a two-process run is tried when a late group join spoils it.
const LATE_JOIN_ATTEMPTS: usize = 3;

pub async fn cluster(args: &BenchArgs) -> Result<ExitCode, String> {
    // The (minute, k) rows the windows emit, counted as the events are made.
    let windows = {
        let mut state: u64 = 42;
        let mut seen = HashSet::new();
        for i in 0..args.events {
            state = xorshift(state);
            seen.insert((i / EVENTS_PER_MINUTE, state % args.keys.max(1)));
        }
        seen.len() as u64
    };
    let mut state: u64 = 42;
    let keys = args.keys;
    // lz4 keeps the events in about 18 bytes each (3.8 times smaller than the JSON):
    // 200 000 per partition stay well inside the mock broker's 5 MB. An even count, so
    // that two workers or processes get the same share (21 split 11 and 10).
    let partitions = args
        .partitions
        .unwrap_or(((args.events / 200_000 + 1).max(4) as i32 + 1) / 2 * 2);
    let topic = Topic::produce_as(
        args.events,
        partitions,
        "lz4",
        move |i, out| {
            // write_event ends the line with a newline; a message has none.
            let _ = write_event(out, i, &mut state, keys);
            out.pop();
        },
        // A day later: every partition's watermark passes every window.
        Some(br#"{"k":-1,"v":0,"ts":"2026-01-02T00:00:00.000Z"}"#.to_vec()),
    )?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let runs: [(&str, Option<&str>, usize); 2] = [
        (
            "1 process, 1 worker, pinned to one core (taskset -c 0)",
            Some("0"),
            1,
        ),
        ("1 process, 2 workers, unpinned", None, 2),
    ];
    let mut rates = Vec::new();
    let checkpoints = super::checkpoint_interval(args, Some(CLUSTER_CHECKPOINT_INTERVAL))?
        .ok_or("a cluster checkpoints: --checkpoint-interval cannot be none")?;
    println!(
        "benchmark: cluster (TUMBLE 1 minute count, sum, max GROUP BY k over Kafka: {} events, {} keys, k not the message key, {partitions} partitions (lz4); mock cluster in the parent process; cluster processes checkpoint every {checkpoints:?} and commit the repartition topic's writes every {:?})",
        args.events, args.keys, args.commit_interval
    );
    for (title, core, workers) in runs {
        let mut command = run_command(&exe, core, args, &topic, workers);
        command.args(["--window-rows", &windows.to_string()]);
        let broker_cpu = cpu_seconds();
        let output = tokio::task::spawn_blocking(move || command.output())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot run {}: {e}", exe.display()))?;
        let broker_cpu = cpu_seconds() - broker_cpu;
        let text = String::from_utf8_lossy(&output.stdout).to_string();
        if !output.status.success() {
            return Err(format!(
                "{title}: {}\n{text}{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        println!("\n{title}:");
        print!("{text}");
        println!("broker cpu seconds:    {broker_cpu:.2} (the mock cluster, in the parent)");
        let rate = text
            .lines()
            .find_map(|l| l.strip_prefix("events/s:"))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .ok_or_else(|| format!("{title}: no events/s in\n{text}"))?;
        rates.push(rate);
    }
    let one = rates[0];
    println!(
        "\n2 workers against 1 pinned: {:.2}x the events/s",
        rates[1] / one
    );
    for pre_aggregate in [true, false] {
        let title = if pre_aggregate {
            "2 processes (--cluster), 1 core each (taskset -c 0, -c 1), partial aggregates through the repartition topic"
        } else {
            "2 processes (--cluster), 1 core each, rows through the repartition topic (--no-pre-aggregate)"
        };
        // A run whose group join overlapped most of the reading (one process got its share
        // of a group seconds late) measures the join, not the processes: run again.
        let mut attempt = 1;
        let (run, broker_cpu) = loop {
            let broker_cpu = cpu_seconds();
            let run = two_processes(args, &topic, windows, pre_aggregate, attempt).await?;
            let broker_cpu = cpu_seconds() - broker_cpu;
            if run.before <= args.events / 10 || attempt == LATE_JOIN_ATTEMPTS {
                break (run, broker_cpu);
            }
            println!(
                "\n({title}: {} of {} events were read before both processes owned partitions of both groups; run again)",
                run.before, args.events
            );
            attempt += 1;
        };
        println!("\n{title}:");
        run.print(args.events);
        println!("broker cpu seconds:    {broker_cpu:.2} (the mock cluster, in the parent)");
        println!(
            "against 1 pinned:      {:.2}x the events/s",
            run.events_per_second(args.events) / one
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// What a `cluster-run` child in a cluster reports, rewritten as it goes.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Progress {
    /// Window rows this process wrote.
    rows: u64,
    /// Bytes this process wrote to the repartition topic.
    shuffled: u64,
    /// Records the window dropped as late (none, when the watermark is right).
    late: u64,
    /// Records read from the events' topic.
    read: u64,
    /// Instances running here: source partitions, and repartition partitions.
    sources: usize,
    shuffles: usize,
    /// Unix ms and CPU seconds when it read its first record.
    first_ms: Option<u64>,
    cpu_at_first: f64,
    cpu: f64,
    peak_rss_kib: u64,
}

/// The two processes' run, summed, from the moment both owned partitions of both groups.
struct ClusterRun {
    wall: f64,
    cpu: f64,
    /// Events read before that moment, left out of the figures.
    before: u64,
    shuffled: u64,
    peak_rss_kib: u64,
    join_seconds: f64,
    late: u64,
    /// Per process: seconds from the first record read (in either) to its own first, its
    /// window rows, CPU seconds.
    processes: Vec<(f64, u64, f64)>,
    /// Per process: how many warnings and errors it logged, and the first (a restart or
    /// a rebalance mid-run shows in the figures; this says which).
    trouble: Vec<(usize, Option<String>)>,
}

impl ClusterRun {
    /// The events the figures cover.
    fn measured(&self, events: u64) -> u64 {
        events.saturating_sub(self.before)
    }

    fn events_per_second(&self, events: u64) -> f64 {
        self.measured(events) as f64 / self.wall
    }

    fn print(&self, events: u64) {
        let measured = self.measured(events);
        println!(
            "events:                {measured} ({} read before both processes owned partitions of both groups are left out)",
            self.before
        );
        println!(
            "group join:            {:.2} s (start until both processes own partitions of both groups; not measured)",
            self.join_seconds
        );
        println!(
            "wall seconds:          {:.2} (from then to the last window row)",
            self.wall
        );
        println!("cpu seconds:           {:.2} (both processes)", self.cpu);
        println!(
            "events/s:              {:.0}",
            self.events_per_second(events)
        );
        println!(
            "events per cpu-second: {:.0}",
            measured as f64 / self.cpu.max(1e-9)
        );
        println!(
            "repartition traffic:   {} bytes, {:.1} bytes per event",
            self.shuffled,
            self.shuffled as f64 / events as f64
        );
        println!(
            "peak RSS:              {} MiB (the larger process)",
            self.peak_rss_kib / 1024
        );
        println!("late records dropped:  {}", self.late);
        for (i, (first, rows, cpu)) in self.processes.iter().enumerate() {
            println!(
                "process {i}:             first record at +{first:.2} s, {rows} window rows, {cpu:.2} cpu seconds"
            );
            if let Some((count, Some(line))) = self.trouble.get(i) {
                println!("  {count} warnings or errors logged, the first: {line}");
            }
        }
    }
}

/// Two `cluster-run --cluster-name` children, pinned to cores 0 and 1, until their window
/// rows add up to `windows`. Each `attempt` is a cluster of its own (groups, repartition
/// topic).
async fn two_processes(
    args: &BenchArgs,
    topic: &Topic,
    windows: u64,
    pre_aggregate: bool,
    attempt: usize,
) -> Result<ClusterRun, String> {
    let scratch = Scratch::new(args)?;
    let dir = scratch.0.as_path();
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let name = format!(
        "bench-{}-{}-{attempt}",
        std::process::id(),
        if pre_aggregate { "partial" } else { "rows" }
    );
    let progress: Vec<PathBuf> = (0..2).map(|i| dir.join(format!("p{i}.json"))).collect();
    let started = Instant::now();
    let mut children = Vec::new();
    for (core, progress) in progress.iter().enumerate() {
        let mut command = run_command(&exe, Some(&core.to_string()), args, topic, 1);
        command.args(["--cluster-name", &name]);
        if let Some(interval) = &args.checkpoint_interval {
            command.args(["--checkpoint-interval", interval]);
        }
        command
            .arg("--store")
            .arg(dir.join("checkpoints"))
            .arg("--progress")
            .arg(progress);
        if !pre_aggregate {
            command.arg("--no-pre-aggregate");
        }
        command.args([
            "--commit-interval",
            &format!("{}ms", args.commit_interval.as_millis()),
        ]);
        command.stdout(std::process::Stdio::null()).stderr(
            std::fs::File::create(progress.with_extension("log")).map_err(|e| e.to_string())?,
        );
        children.push(
            command
                .spawn()
                .map_err(|e| format!("cannot run {}: {e}", exe.display()))?,
        );
    }
    // The mock cluster has no CreateTopics, and makes a topic asked for with its default
    // of 4 partitions, each keeping at most 5 MB: a reader lagging further would lose
    // records (and fail, as it must). So the repartition topic is made here, as an operator
    // makes it for a broker that lets applications not create topics: with the source's
    // partition count, under the name the processes report (the same in both).
    let topics: Vec<PathBuf> = progress.iter().map(|p| p.with_extension("topic")).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let shuffle = loop {
        if let Some(name) = topics.iter().find_map(|t| std::fs::read_to_string(t).ok()) {
            break name;
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "no process named its repartition topic in 60 s:\n{}",
                logs(&progress)
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    topic.create_sibling(shuffle.trim())?;
    for t in &topics {
        std::fs::write(t.with_extension("go"), b"").map_err(|e| e.to_string())?;
    }
    let mut last = (0, Instant::now());
    // The clock starts once both processes own partitions of both groups: a group join
    // that hands one process its share late (the mock cluster does, now and then, by about
    // 9 s) is not what this measures, nor what one process reads alone meanwhile.
    let mut settled: Option<(u64, Vec<Progress>)> = None;
    let reports = loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let reports: Vec<Progress> = progress.iter().map(|p| read_progress(p)).collect();
        if settled.is_none() && reports.iter().all(|r| r.sources > 0 && r.shuffles > 0) {
            settled = Some((unix_ms(), reports.clone()));
        }
        let rows: u64 = reports.iter().map(|r| r.rows).sum();
        if rows >= windows && settled.is_some() {
            break reports;
        }
        for child in &mut children {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "a cluster process ended early ({status}):\n{}",
                    logs(&progress)
                ));
            }
        }
        if rows > last.0 {
            last = (rows, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(120) {
            for child in &mut children {
                let _ = child.kill();
            }
            let late: u64 = reports.iter().map(|r| r.late).sum();
            let logs = logs(&progress);
            return Err(format!(
                "stalled at {rows} of {windows} window rows ({late} records dropped as late) {}:\n{logs}",
                scratch.keep()
            ));
        }
    };
    let ended_ms = unix_ms();
    for p in &progress {
        std::fs::write(p.with_extension("stop"), b"").map_err(|e| e.to_string())?;
    }
    for mut child in children {
        let waited = tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                if Instant::now() >= deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        waited.await.map_err(|e| e.to_string())?;
    }
    let first_ms = reports
        .iter()
        .filter_map(|r| r.first_ms)
        .min()
        .unwrap_or(ended_ms);
    let started_ms = ended_ms.saturating_sub(started.elapsed().as_millis() as u64);
    let (settled_ms, at_settled) = settled.unwrap_or((first_ms, Vec::new()));
    // Before the first record, the processes were joining: nothing to leave out yet.
    let (clock_ms, cpu_before, before): (u64, Vec<f64>, u64) = if settled_ms > first_ms {
        (
            settled_ms,
            at_settled.iter().map(|r| r.cpu).collect(),
            at_settled.iter().map(|r| r.read).sum(),
        )
    } else {
        (
            first_ms,
            reports.iter().map(|r| r.cpu_at_first).collect(),
            0,
        )
    };
    Ok(ClusterRun {
        wall: ended_ms.saturating_sub(clock_ms) as f64 / 1000.0,
        cpu: reports
            .iter()
            .zip(&cpu_before)
            .map(|(r, c)| r.cpu - c)
            .sum(),
        before,
        shuffled: reports.iter().map(|r| r.shuffled).sum(),
        peak_rss_kib: reports.iter().map(|r| r.peak_rss_kib).max().unwrap_or(0),
        join_seconds: clock_ms.saturating_sub(started_ms) as f64 / 1000.0,
        late: reports.iter().map(|r| r.late).sum(),
        processes: reports
            .iter()
            .map(|r| {
                let first = r.first_ms.unwrap_or(ended_ms).saturating_sub(first_ms);
                (first as f64 / 1000.0, r.rows, r.cpu - r.cpu_at_first)
            })
            .collect(),
        trouble: progress
            .iter()
            .map(|p| {
                let log = std::fs::read_to_string(p.with_extension("log")).unwrap_or_default();
                let mut trouble = log
                    .lines()
                    .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "));
                let first = trouble.next().map(str::to_string);
                (first.iter().count() + trouble.count(), first)
            })
            .collect(),
    })
}

/// `weir bench cluster-run` over `topic` with `workers` workers, pinned to `core` if given.
fn run_command(
    exe: &Path,
    core: Option<&str>,
    args: &BenchArgs,
    topic: &Topic,
    workers: usize,
) -> std::process::Command {
    let mut command = match core {
        Some(core) => {
            let mut c = std::process::Command::new("taskset");
            c.args(["-c", core]).arg(exe);
            c
        }
        None => std::process::Command::new(exe),
    };
    command.args([
        "bench",
        "cluster-run",
        "--events",
        &args.events.to_string(),
        "--bootstrap",
        &topic.bootstrap(),
        "--topic",
        &topic.name,
        "--workers",
        &workers.to_string(),
    ]);
    command
}

fn read_progress(path: &Path) -> Progress {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// The last lines each process logged.
fn logs(progress: &[PathBuf]) -> String {
    progress
        .iter()
        .map(|p| {
            let log = std::fs::read_to_string(p.with_extension("log")).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            lines[lines.len().saturating_sub(20)..].join("\n")
        })
        .collect::<Vec<_>>()
        .join("\n-----\n")
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One run of `cluster`: `--workers` workers read `--topic` through the windows until
/// `--windows` rows are out.
pub async fn cluster_run(args: &BenchArgs) -> Result<ExitCode, String> {
    let (Some(bootstrap), Some(topic)) = (&args.bootstrap, &args.topic) else {
        return Err("cluster-run needs --bootstrap and --topic".into());
    };
    // The repartition topic's records are released at each checkpoint's commit.
    let interval = super::checkpoint_interval(args, Some(CLUSTER_CHECKPOINT_INTERVAL))?
        .ok_or("a cluster checkpoints: --checkpoint-interval cannot be none")?;
    let config = match (&args.cluster_name, &args.store) {
        (Some(name), Some(store)) => weir_server::engine::EngineConfig {
            checkpoint_interval: Some(interval),
            checkpoint_store: Some(store.display().to_string()),
            workers: Some(1),
            cluster: Some(weir_server::engine::ClusterConfig {
                name: name.clone(),
                pre_aggregate: !args.no_pre_aggregate,
                advertise: None,
                commit_interval: Some(args.commit_interval),
            }),
            ..weir_server::engine::EngineConfig::default()
        },
        _ => weir_server::engine::EngineConfig {
            // No checkpoints: the cost of one is measured by `weir bench checkpoint`.
            checkpoint_interval: Some(Duration::from_secs(86_400)),
            workers: Some(args.workers),
            ..weir_server::engine::EngineConfig::default()
        },
    };
    let engine = weir_server::engine::Engine::open(
        config,
        std::sync::Arc::new(weir_connectors::Connectors::default()),
    )
    .await
    .map_err(|e| e.to_string())?;
    let sql = format!(
        "CREATE STREAM events (k BIGINT, v DOUBLE, ts TIMESTAMP(3), WATERMARK FOR ts AS ts - INTERVAL '1' SECOND)
           WITH (connector = 'kafka', topic = '{topic}', 'bootstrap.servers' = '{bootstrap}', 'scan.startup.mode' = 'earliest',
                 'group.id' = '{group}');
         CREATE SINK out WITH (connector = 'blackhole') AS
           SELECT window_start, window_end, k, count(*) AS n, sum(v) AS total, max(v) AS top
           FROM TUMBLE(events, ts, INTERVAL '1' MINUTE) GROUP BY window_start, window_end, k;",
        // Each run reads the topic from the start: a group of its own (the previous run
        // committed its offsets at its end). A cluster's processes run the same SQL: a
        // different query in each would give each its own repartition topic.
        group = match &args.cluster_name {
            Some(name) => name.clone(),
            None => format!("bench-{}", std::process::id()),
        }
    );
    for result in engine.execute(&sql).await {
        result.map_err(|e| e.to_string())?;
    }
    if let Some(progress) = &args.progress {
        // Name the repartition topic for the parent to create, and wait until it has.
        if let Some(shuffle) = engine.shuffle_topic("out") {
            std::fs::write(progress.with_extension("topic"), shuffle).map_err(|e| e.to_string())?;
            let go = progress.with_extension("go");
            let deadline = Instant::now() + Duration::from_secs(60);
            while !go.exists() {
                if Instant::now() >= deadline {
                    return Err("the parent did not create the repartition topic in 60 s".into());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        engine.start_all().await.map_err(|e| e.to_string())?;
        report_progress(&engine, progress).await?;
        engine.shutdown(Duration::from_secs(30)).await;
        return Ok(ExitCode::SUCCESS);
    }
    let rss_before = peak_rss_kib();
    let joined = Instant::now();
    engine.start_all().await.map_err(|e| e.to_string())?;
    let read = "weir_source_partition_records_in_total{source=\"events\"";
    let written = WINDOW_ROWS;
    let mut first = None;
    let mut progress = (0, Instant::now());
    loop {
        let metrics = engine.metrics().encode();
        let (records, rows) = (counter(&metrics, read), counter(&metrics, written));
        if records > 0 && first.is_none() {
            first = Some((records, Instant::now(), cpu_seconds()));
        }
        if rows >= args.window_rows {
            break;
        }
        if records + rows > progress.0 {
            progress = (records + rows, Instant::now());
        } else if progress.1.elapsed() > Duration::from_secs(60) {
            return Err(format!(
                "stalled: {records} of {} events read, {rows} of {} window rows",
                args.events, args.window_rows
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let consumed = Consumed::now(args.events, joined, first, rss_before);
    consumed.print();
    let metrics = engine.metrics().encode();
    println!(
        "window rows:           {} (expected {})",
        counter(&metrics, written),
        args.window_rows
    );
    engine.shutdown(Duration::from_secs(30)).await;
    Ok(ExitCode::SUCCESS)
}

/// A cluster process's share: rewrites `progress` (JSON) every 20 ms until
/// `<progress>.stop` appears.
async fn report_progress(
    engine: &weir_server::engine::Engine,
    progress: &Path,
) -> Result<(), String> {
    let read = "weir_source_partition_records_in_total{source=\"events\"";
    let mut report = Progress::default();
    let stop = progress.with_extension("stop");
    let temp = progress.with_extension("tmp");
    while !stop.exists() {
        let metrics = engine.metrics().encode();
        if report.first_ms.is_none() && counter(&metrics, read) > 0 {
            report.first_ms = Some(unix_ms());
            report.cpu_at_first = cpu_seconds();
        }
        // The blackhole's rows only: the repartition writer's are counted as a sink's too.
        report.rows = counter(&metrics, WINDOW_ROWS);
        report.read = counter(&metrics, read);
        let instances = engine
            .pipelines()
            .into_iter()
            .find(|p| p.name == "out")
            .map(|p| p.instances)
            .unwrap_or_default();
        report.sources = instances.iter().filter(|i| i.starts_with('p')).count();
        report.shuffles = instances.iter().filter(|i| i.starts_with('r')).count();
        report.late = counter(&metrics, "weir_late_records_dropped_total");
        report.shuffled = counter(
            &metrics,
            "weir_shuffle_bytes_written_total{pipeline=\"out\"",
        );
        report.cpu = cpu_seconds();
        report.peak_rss_kib = peak_rss_kib();
        let json = serde_json::to_vec(&report).map_err(|e| e.to_string())?;
        std::fs::write(&temp, json).map_err(|e| e.to_string())?;
        std::fs::rename(&temp, progress).map_err(|e| e.to_string())?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
