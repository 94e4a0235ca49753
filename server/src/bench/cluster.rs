//! `weir bench cluster`: the windows benchmark over Kafka on one worker pinned to one core,
//! against one process with two workers. Each run is a child process (`cluster-run`) reading
//! a topic produced beforehand to librdkafka's mock cluster in this process, so the figures
//! are the child's alone; the broker's CPU (serving fetches, here) is printed beside them.

use std::collections::HashSet;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use super::pipeline::{Topic, xorshift};
use super::{BenchArgs, Consumed, counter, cpu_seconds, peak_rss_kib, write_event};

/// One minute in the events' time: 10 events per millisecond.
const EVENTS_PER_MINUTE: u64 = 600_000;

pub async fn cluster(args: &BenchArgs) -> Result<ExitCode, String> {
    // The (minute, k) rows the windows emit, counted as the events are made.
    let windows = {
        let mut state: u64 = 42;
        let mut seen = HashSet::new();
        for i in 0..args.events {
            state = xorshift(state);
            seen.insert((i / EVENTS_PER_MINUTE, state % 100_000));
        }
        seen.len() as u64
    };
    let mut state: u64 = 42;
    let topic = Topic::produce(
        args.events,
        move |i, out| {
            // write_event ends the line with a newline; a message has none.
            let _ = write_event(out, i, &mut state);
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
    println!(
        "benchmark: cluster (TUMBLE 1 minute count, sum, max GROUP BY k over Kafka: {} events, 100 000 keys, k not the message key; mock cluster in the parent process)",
        args.events
    );
    for (title, core, workers) in runs {
        let mut command = match core {
            Some(core) => {
                let mut c = std::process::Command::new("taskset");
                c.args(["-c", core]).arg(&exe);
                c
            }
            None => std::process::Command::new(&exe),
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
            "--window-rows",
            &windows.to_string(),
            "--workers",
            &workers.to_string(),
        ]);
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
    println!(
        "\n2 workers against 1 pinned: {:.2}x the events/s",
        rates[1] / rates[0]
    );
    println!("2 processes, 1 core each: needs `weir serve --cluster`, not built yet (issue 15)");
    Ok(ExitCode::SUCCESS)
}

/// One run of `cluster`: `--workers` workers read `--topic` through the windows until
/// `--windows` rows are out.
pub async fn cluster_run(args: &BenchArgs) -> Result<ExitCode, String> {
    let (Some(bootstrap), Some(topic)) = (&args.bootstrap, &args.topic) else {
        return Err("cluster-run needs --bootstrap and --topic".into());
    };
    let engine = weir_server::engine::Engine::open(
        weir_server::engine::EngineConfig {
            // No checkpoints: the cost of one is measured by `weir bench checkpoint`.
            checkpoint_interval: Some(Duration::from_secs(86_400)),
            workers: Some(args.workers),
            ..weir_server::engine::EngineConfig::default()
        },
        std::sync::Arc::new(weir_connectors::Connectors::default()),
    )
    .await
    .map_err(|e| e.to_string())?;
    let sql = format!(
        "CREATE STREAM events (k BIGINT, v DOUBLE, ts TIMESTAMP(3), WATERMARK FOR ts AS ts - INTERVAL '1' SECOND)
           WITH (connector = 'kafka', topic = '{topic}', 'bootstrap.servers' = '{bootstrap}', 'scan.startup.mode' = 'earliest',
                 'group.id' = 'bench-{pid}');
         CREATE SINK out WITH (connector = 'blackhole') AS
           SELECT window_start, window_end, k, count(*) AS n, sum(v) AS total, max(v) AS top
           FROM TUMBLE(events, ts, INTERVAL '1' MINUTE) GROUP BY window_start, window_end, k;",
        // Each run reads the topic from the start: a group of its own (the previous run
        // committed its offsets at its end).
        pid = std::process::id()
    );
    for result in engine.execute(&sql).await {
        result.map_err(|e| e.to_string())?;
    }
    let rss_before = peak_rss_kib();
    let joined = Instant::now();
    engine.start_all().await.map_err(|e| e.to_string())?;
    let read = "weir_source_partition_records_in_total{source=\"events\"";
    let written = "weir_sink_rows_written_total{pipeline=\"out\"";
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
