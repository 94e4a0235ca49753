//! `weir bench console`: the web console's server side. A `weir serve --auth trust` child
//! with a 10 k rows/s datagen stream and three pipelines whose state does not grow (a view
//! kept 10 s, two blackhole sinks); the load comes from this process
//! over loopback, as a browser's would, so the server's CPU and memory are its own.
//!
//! 1. A live tail (`POST /api/run`, server-sent events) read as fast as it comes, for
//!    `TAIL_SECONDS`: rows/s delivered, the server's CPU per row, and its resident memory
//!    sampled every second (it must not grow).
//! 2. The same tail read by a client that takes only 1 000 rows/s: back-pressure holds the
//!    server's memory flat while the stream is throttled.
//! 3. The same tail in a notebook in headless Chromium (`tests/browser/tail-bench.mjs`, when
//!    `scripts/install-test-deps.sh` has installed Chromium and playwright-core): the rows the
//!    page received, and the server's memory.
//! 4. The pipelines page: the server's CPU over `PAGE_SECONDS` with `GET /api/pipelines` once
//!    a second, against the same time without it; the difference is the page's cost.

use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use super::front_door::{Server, free_port, serve_command};
use super::{BenchArgs, process_cpu_seconds, process_status_kib};

const RATE: u64 = 10_000;
const TAIL_SECONDS: u64 = 30;
const SLOW_SECONDS: u64 = 20;
const SLOW_RATE: u64 = 1_000;
const PAGE_SECONDS: u64 = 30;

/// Resident memory of process `pid` now (VmRSS), KiB.
fn rss_kib(pid: &str) -> u64 {
    process_status_kib(pid, "VmRSS:")
}

pub async fn run(args: &BenchArgs) -> Result<ExitCode, String> {
    let dir = args.dir.join("console");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    std::fs::write(
        dir.join("bench.md"),
        "# Bench\n\n```sql\nSELECT * FROM events LIMIT 1000000000;\n```\n",
    )
    .map_err(|e| e.to_string())?;
    let pg_port = free_port()?;
    let http_port = free_port()?;
    let server = Server(
        serve_command(&dir, pg_port, http_port)?
            .args(["--auth", "trust"])
            .arg("--notebooks")
            .arg(&dir)
            .spawn()
            .map_err(|e| format!("cannot start weir serve: {e}"))?,
    );
    let pid = server.0.id().to_string();
    let conninfo = format!("host=127.0.0.1 port={pg_port} user=weir dbname=weir");
    let ready = Instant::now();
    let sql = loop {
        match tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await {
            Ok((client, connection)) => {
                tokio::spawn(connection);
                break client;
            }
            Err(e) if ready.elapsed() > Duration::from_secs(30) => {
                return Err(format!("weir serve did not start within 30 s: {e}"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    sql.batch_execute(&format!(
        "CREATE STREAM events (vehicle_id BIGINT, ts TIMESTAMP(3), speed_kmh DOUBLE, status TEXT, \
           WATERMARK FOR ts AS ts - INTERVAL '1' SECOND) \
         WITH (connector = 'datagen', rows_per_second = {RATE}, cardinality = 1000, seed = 1);
         CREATE MATERIALIZED VIEW per_second WITH (retention = '10s') AS \
           SELECT window_start, window_end, status, count(*) AS n \
           FROM TUMBLE(events, ts, INTERVAL '1' SECOND) GROUP BY window_start, window_end, status;
         CREATE SINK fast WITH (connector = 'blackhole') AS \
           SELECT vehicle_id, ts, speed_kmh FROM events WHERE speed_kmh > 150;
         CREATE SINK dropped WITH (connector = 'blackhole') AS SELECT * FROM events WHERE status = 'idle';"
    ))
    .await
    .map_err(|e| format!("setup: {e}"))?;

    let base = format!("http://127.0.0.1:{http_port}");
    let http = reqwest::Client::new();
    // Under --auth trust, the first request opens a session.
    let session = http
        .get(format!("{base}/api/session"))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let cookie = session
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .ok_or("no session cookie")?
        .to_string();
    let body = session.text().await.map_err(|e| e.to_string())?;
    let body: serde_json::Value =
        serde_json::from_str(&body).map_err(|e| format!("not JSON: {e}: {body}"))?;
    let csrf = body["csrf"].as_str().ok_or("no csrf token")?.to_string();

    println!("console: a weir serve child, a {RATE} rows/s datagen stream, 3 pipelines, loopback");
    for (label, seconds, limit) in [
        ("tail read at full speed", TAIL_SECONDS, None),
        ("tail read at 1 000 rows/s", SLOW_SECONDS, Some(SLOW_RATE)),
    ] {
        let mut response = http
            .post(format!("{base}/api/run"))
            .header("Cookie", &cookie)
            .header("X-Weir-CSRF", &csrf)
            .body(r#"{"sql": "SELECT * FROM events LIMIT 1000000000"}"#)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let cpu_before = process_cpu_seconds(&pid);
        let started = Instant::now();
        let mut rows = 0u64;
        let mut buffer = String::new();
        let mut samples = Vec::new();
        let mut next_sample = Duration::from_secs(1);
        while started.elapsed() < Duration::from_secs(seconds) {
            let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? else {
                return Err("the tail ended early".into());
            };
            buffer.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(at) = buffer.find("\n\n") {
                let event: String = buffer.drain(..at + 2).collect();
                if let Some(data) = event.strip_prefix("event: rows\ndata: ").map(str::trim_end) {
                    let data: serde_json::Value =
                        serde_json::from_str(data).map_err(|e| e.to_string())?;
                    rows += data["rows"].as_array().map_or(0, |r| r.len() as u64);
                }
            }
            if let Some(limit) = limit {
                // Read no faster than `limit` rows/s: the server must hold back.
                let due = Duration::from_secs_f64(rows as f64 / limit as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
            if started.elapsed() >= next_sample {
                samples.push(rss_kib(&pid));
                next_sample += Duration::from_secs(1);
            }
        }
        drop(response);
        let wall = started.elapsed().as_secs_f64();
        let cpu = process_cpu_seconds(&pid) - cpu_before;
        let settled = &samples[samples.len().min(5)..];
        let (low, high) = (
            settled.iter().min().copied().unwrap_or(0),
            settled.iter().max().copied().unwrap_or(0),
        );
        println!(
            "  {label}: {rows} rows in {wall:.1} s = {:.0} rows/s",
            rows as f64 / wall
        );
        println!(
            "    server CPU {cpu:.2} s ({:.1} % of a core; {:.2} µs per row delivered, the 3 pipelines and the generator included)",
            cpu * 100.0 / wall,
            cpu * 1e6 / rows.max(1) as f64
        );
        println!(
            "    server RSS after the first 5 s: {:.1} – {:.1} MiB (first {:.1}, last {:.1})",
            low as f64 / 1024.0,
            high as f64 / 1024.0,
            settled.first().copied().unwrap_or(0) as f64 / 1024.0,
            settled.last().copied().unwrap_or(0) as f64 / 1024.0
        );
        // Let the tail's pipeline stop before the next phase.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    browser_tail(&base, &pid).await?;

    // The pipelines page: the server's CPU with and without a reader once a second.
    let mut cpu = [0.0; 2];
    let mut bytes = 0usize;
    for (i, polling) in [false, true].into_iter().enumerate() {
        let before = process_cpu_seconds(&pid);
        let started = Instant::now();
        for second in 0..PAGE_SECONDS {
            if polling {
                bytes = pipelines_page(&http, &base, &cookie).await?.len();
            }
            let due = Duration::from_secs(second + 1);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
        cpu[i] = (process_cpu_seconds(&pid) - before) / started.elapsed().as_secs_f64();
    }
    // And per request, from a burst: the baseline's share of the burst's time taken out.
    const BURST: u32 = 300;
    let before = process_cpu_seconds(&pid);
    let started = Instant::now();
    for _ in 0..BURST {
        pipelines_page(&http, &base, &cookie).await?;
    }
    let burst_cpu = process_cpu_seconds(&pid) - before - cpu[0] * started.elapsed().as_secs_f64();
    println!(
        "  pipelines page, {BURST} reads back to back: {:.2} ms of server CPU each, so {:.2} % of a core at one a second",
        burst_cpu * 1000.0 / f64::from(BURST),
        burst_cpu * 100.0 / f64::from(BURST)
    );
    println!(
        "  pipelines page, read once a second for {PAGE_SECONDS} s ({bytes} bytes each): server {:.2} % of a core, against {:.2} % without it: {:.2} % of a core for the page",
        cpu[1] * 100.0,
        cpu[0] * 100.0,
        (cpu[1] - cpu[0]) * 100.0
    );
    Ok(ExitCode::SUCCESS)
}

/// The tail in a notebook in headless Chromium: what the page received, and the server's
/// memory, once a second.
async fn browser_tail(base: &str, pid: &str) -> Result<(), String> {
    let here = std::env::current_dir().map_err(|e| e.to_string())?;
    let script = here.join("tests/browser/tail-bench.mjs");
    let modules = here.join(".tools/node/node_modules");
    if !script.exists() || !modules.join("playwright-core").exists() {
        println!(
            "  tail in Chromium: skipped (run from the repository root after scripts/install-test-deps.sh)"
        );
        return Ok(());
    }
    let cpu_before = process_cpu_seconds(pid);
    let started = Instant::now();
    let mut child = tokio::process::Command::new("node")
        .arg(&script)
        .env("NODE_PATH", &modules)
        .env("WEIR_URL", format!("{base}/"))
        .env("NOTEBOOK", "bench.md")
        .env("SECONDS", TAIL_SECONDS.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start node: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut samples = Vec::new();
    let mut last = serde_json::Value::Null;
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    while let Some(line) = lines.next_line().await.map_err(|e| e.to_string())? {
        if let Ok(value) = serde_json::from_str::<serde_json::Value>(&line) {
            samples.push(rss_kib(pid));
            last = value;
        }
    }
    let status = child.wait().await.map_err(|e| e.to_string())?;
    if !status.success() {
        return Err(format!("the browser run failed: {status}"));
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu = process_cpu_seconds(pid) - cpu_before;
    let rows = last["rows"].as_u64().unwrap_or(0);
    let settled = &samples[samples.len().min(5)..];
    println!(
        "  tail in a Chromium notebook: {rows} rows received in {TAIL_SECONDS} s = {:.0} rows/s ({} shown, newest first)",
        rows as f64 / TAIL_SECONDS as f64,
        last["shown"]
    );
    println!(
        "    server CPU {:.1} % of a core over the run (the browser's start included); server RSS after the first 5 s: {:.1} – {:.1} MiB",
        cpu * 100.0 / wall,
        settled.iter().min().copied().unwrap_or(0) as f64 / 1024.0,
        settled.iter().max().copied().unwrap_or(0) as f64 / 1024.0
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(())
}

/// `GET /api/pipelines`'s body.
async fn pipelines_page(
    http: &reqwest::Client,
    base: &str,
    cookie: &str,
) -> Result<String, String> {
    http.get(format!("{base}/api/pipelines"))
        .header("Cookie", cookie)
        .send()
        .await
        .map_err(|e| e.to_string())?
        .text()
        .await
        .map_err(|e| e.to_string())
}
