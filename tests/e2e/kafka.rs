//! Kafka end to end: a real broker process (tansu), `weir serve`, the Parquet lake read by
//! DuckDB, and the dead-letter topic read back with a Kafka consumer.

use std::path::Path;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use crate::harness::{Record, Tansu, Weir, duckdb, eventually, produce};

/// Event `i`: `{"id", "device", "v", "ts"}`, partitioned by id.
fn event(i: u64) -> String {
    format!(
        r#"{{"id":{i},"device":"d{}","v":{}.5,"ts":{}}}"#,
        i % 100,
        i % 1000,
        1_700_000_000_000 + i
    )
}

/// A record keyed by `key`.
fn keyed(key: u64, payload: String) -> Record {
    Record {
        key: Some(key.to_string()),
        payload,
        ..Record::default()
    }
}

fn create_stream_and_lake(weir: &Weir, bootstrap: &str, lake: &Path, extra: &str) {
    let sql = format!(
        "CREATE STREAM ev (id BIGINT NOT NULL, device TEXT, v DOUBLE, ts TIMESTAMP(3) NOT NULL, \
           WATERMARK FOR ts AS ts - INTERVAL '5' SECOND) \
         WITH (connector = 'kafka', topic = 'ev', 'bootstrap.servers' = '{bootstrap}', \
               'scan.startup.mode' = 'earliest'{extra}); \
         CREATE SINK ev_lake FROM ev WITH (connector = 'parquet', path = '{}', 'rollover.interval' = '1s');",
        lake.display()
    );
    let (ok, out, err) = weir.psql_c(&sql);
    assert!(ok, "{out}{err}\n{}", weir.log_text());
}

/// `(rows, distinct ids, sum of ids, sum of v)` in the lake, per DuckDB.
fn lake_totals(lake: &Path) -> Option<(u64, u64, u64, f64)> {
    let has_files = std::fs::read_dir(lake)
        .ok()?
        .flatten()
        .any(|e| e.path().extension().is_some_and(|x| x == "parquet"));
    if !has_files {
        return None;
    }
    let rows = duckdb(&format!(
        "SELECT count(*), count(DISTINCT id), coalesce(sum(id), 0), coalesce(sum(v), 0) FROM '{}/*.parquet'",
        lake.display()
    ));
    let f: Vec<&str> = rows.first()?.split('\t').collect();
    Some((
        f[0].parse().ok()?,
        f[1].parse().ok()?,
        f[2].parse().ok()?,
        f[3].parse().ok()?,
    ))
}

#[test]
fn a_million_events_arrive_once_each_with_their_sums() {
    const N: u64 = 1_000_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let tansu = Tansu::start(dir.path());
    tansu.create_topic("ev", 4);
    produce(&tansu.bootstrap(), "ev", (0..N).map(|i| keyed(i, event(i))));

    let weir = Weir::start(dir.path(), None);
    let lake = dir.path().join("lake");
    create_stream_and_lake(&weir, &tansu.bootstrap(), &lake, "");
    let totals = eventually(Duration::from_secs(300), || {
        lake_totals(&lake).filter(|t| t.0 >= N)
    });
    let expected_v: f64 = (0..N).map(|i| (i % 1000) as f64 + 0.5).sum();
    let (rows, distinct, sum_id, sum_v) =
        totals.unwrap_or_else(|| panic!("lake: {:?}\n{}", lake_totals(&lake), weir.log_text()));
    assert_eq!((rows, distinct), (N, N), "every event once");
    assert_eq!(sum_id, N * (N - 1) / 2);
    assert!((sum_v - expected_v).abs() < 1e-3, "{sum_v} vs {expected_v}");
    let metrics = weir.http_get("/metrics");
    assert!(
        metrics.contains("weir_source_partition_records_in_total{source=\"ev\",pipeline=\"ev_lake\",partition=\"3\"}"),
        "per-partition metrics: {metrics}"
    );
    assert!(
        metrics.contains(
            "weir_source_commits_total{source=\"ev\",pipeline=\"ev_lake\",result=\"ok\"}"
        ),
        "{metrics}\n{}",
        weir.log_text()
    );
    assert!(
        metrics.contains("weir_source_watermark_ms{source=\"ev\",pipeline=\"ev_lake\"} 1700000")
    );
}

#[test]
fn malformed_messages_go_to_the_dead_letter_topic_and_the_rest_arrives() {
    const N: u64 = 20_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let tansu = Tansu::start(dir.path());
    tansu.create_topic("ev", 4);
    tansu.create_topic("ev-dlq", 1);
    // Every 100th message is bad, three ways: not JSON, a wrong type, a missing NOT NULL id.
    let bad = |i: u64| i % 100 == 7;
    produce(
        &tansu.bootstrap(),
        "ev",
        (0..N).map(|i| {
            let payload = match (bad(i), i % 3) {
                (false, _) => event(i),
                (true, 0) => format!("{{not json {i}"),
                (true, 1) => format!(r#"{{"id":{i},"v":"fast","ts":1}}"#),
                (true, _) => r#"{"device":"x","ts":1}"#.to_string(),
            };
            keyed(i, payload)
        }),
    );
    let weir = Weir::start(dir.path(), None);
    let lake = dir.path().join("lake");
    create_stream_and_lake(
        &weir,
        &tansu.bootstrap(),
        &lake,
        ", 'dead_letter.topic' = 'ev-dlq'",
    );
    let good = (0..N).filter(|&i| !bad(i)).count() as u64;
    let totals = eventually(Duration::from_secs(120), || {
        lake_totals(&lake).filter(|t| t.0 >= good)
    });
    let (rows, distinct, sum_id, _) =
        totals.unwrap_or_else(|| panic!("lake: {:?}\n{}", lake_totals(&lake), weir.log_text()));
    assert_eq!((rows, distinct), (good, good));
    assert_eq!(sum_id, (0..N).filter(|&i| !bad(i)).sum::<u64>());

    // The dead letters: one per bad message, with its error and coordinates.
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", tansu.bootstrap())
        .set("group.id", "dlq-reader")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset("ev-dlq", 0, Offset::Beginning)
        .expect("tpl");
    consumer.assign(&tpl).expect("assign");
    let expected_bad = (0..N).filter(|&i| bad(i)).count();
    let mut letters = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while letters.len() < expected_bad && std::time::Instant::now() < deadline {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            let letter: serde_json::Value =
                serde_json::from_slice(m.payload().expect("payload")).expect("JSON letter");
            letters.push(letter);
        }
    }
    assert_eq!(letters.len(), expected_bad);
    for letter in &letters {
        assert_eq!(letter["stream"], "ev");
        assert_eq!(letter["topic"], "ev");
        assert!(
            letter["partition"]
                .as_i64()
                .is_some_and(|p| (0..4).contains(&p))
        );
        assert!(letter["offset"].as_i64().is_some());
        assert!(
            ["json", "schema"].contains(&letter["reason"].as_str().unwrap_or("")),
            "{letter}"
        );
        assert!(
            !letter["error"].as_str().unwrap_or("").is_empty(),
            "{letter}"
        );
    }
    let records: Vec<&str> = letters
        .iter()
        .filter_map(|l| l["record"].as_str())
        .collect();
    assert!(records.iter().any(|r| r.starts_with("{not json")));
    assert!(records.iter().any(|r| r.contains("\"fast\"")));
    let metrics = weir.http_get("/metrics");
    assert!(
        metrics.contains(&format!(
            "weir_dead_letters_written_total{{source=\"ev\",pipeline=\"ev_lake\"}} {expected_bad}"
        )),
        "{metrics}"
    );
}

#[test]
fn the_pipeline_rides_out_a_broker_restart_and_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut tansu = Tansu::start(dir.path());
    tansu.create_topic("ev", 4);
    produce(
        &tansu.bootstrap(),
        "ev",
        (0..50_000).map(|i| keyed(i, event(i))),
    );
    let mut weir = Weir::start(dir.path(), None);
    let lake = dir.path().join("lake");
    create_stream_and_lake(&weir, &tansu.bootstrap(), &lake, "");
    let some = eventually(Duration::from_secs(120), || {
        lake_totals(&lake).filter(|t| t.0 > 0)
    });
    assert!(some.is_some(), "{}", weir.log_text());

    tansu.kill();
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        weir.is_running(),
        "weir survives the outage:\n{}",
        weir.log_text()
    );
    tansu.restart();
    produce(
        &tansu.bootstrap(),
        "ev",
        (50_000..100_000).map(|i| keyed(i, event(i))),
    );
    let totals = eventually(Duration::from_secs(180), || {
        lake_totals(&lake).filter(|t| t.1 >= 100_000)
    });
    let (_, distinct, _, _) =
        totals.unwrap_or_else(|| panic!("lake: {:?}\n{}", lake_totals(&lake), weir.log_text()));
    assert_eq!(distinct, 100_000, "nothing lost across the outage");
    assert!(weir.is_running());
    let metrics = weir.http_get("/metrics");
    assert!(
        metrics.contains("weir_source_client_errors_total{source=\"ev\",pipeline=\"ev_lake\"}"),
        "the outage is visible in metrics: {metrics}"
    );
    assert!(weir.stop(), "{}", weir.log_text());
}

#[test]
fn a_psql_live_tail_over_a_kafka_stream_returns_fresh_records() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tansu = Tansu::start(dir.path());
    tansu.create_topic("ev", 4);
    // Old records: a tail must not return these.
    produce(
        &tansu.bootstrap(),
        "ev",
        (0..1000).map(|i| keyed(i, event(i))),
    );
    let weir = Weir::start(dir.path(), None);
    let (ok, out, err) = weir.psql_c(&format!(
        "CREATE STREAM ev (id BIGINT NOT NULL, device TEXT, v DOUBLE, ts TIMESTAMP(3)) \
         WITH (connector = 'kafka', topic = 'ev', 'bootstrap.servers' = '{}')",
        tansu.bootstrap()
    ));
    assert!(ok, "{out}{err}");
    let bootstrap = tansu.bootstrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let feeder = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut i = 1_000_000;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                produce(&bootstrap, "ev", (i..i + 50).map(|i| keyed(i, event(i))));
                i += 50;
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let (ok, out, err) =
        weir.psql_c("SELECT id, device, _partition, _offset FROM ev WHERE id % 2 = 0 LIMIT 10");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    feeder.join().expect("feeder");
    assert!(ok, "{err}\n{}", weir.log_text());
    assert!(out.contains("(10 rows)"), "{out}");
    let ids: Vec<u64> = out
        .lines()
        .skip(1)
        .filter_map(|l| l.split('|').next()?.parse().ok())
        .collect();
    assert_eq!(ids.len(), 10, "{out}");
    assert!(
        ids.iter().all(|&id| id >= 1_000_000 && id % 2 == 0),
        "only fresh, matching records: {ids:?}"
    );
}

#[test]
fn a_pipeline_whose_broker_dies_fails_with_the_cause_and_recovers_when_it_returns() {
    const N: u64 = 20_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut tansu = Tansu::start(dir.path());
    tansu.create_topic("ev", 4);
    produce(&tansu.bootstrap(), "ev", (0..N).map(|i| keyed(i, event(i))));
    let weir = Weir::start(dir.path(), None);
    let lake = dir.path().join("lake");
    create_stream_and_lake(
        &weir,
        &tansu.bootstrap(),
        &lake,
        ", 'broker.timeout' = '3s'",
    );
    let first = eventually(Duration::from_secs(120), || {
        lake_totals(&lake).filter(|t| t.0 >= N)
    });
    assert!(first.is_some(), "{}", weir.log_text());

    tansu.kill();
    // SHOW QUERIES and /health say the pipeline failed, and why.
    let failed = eventually(Duration::from_secs(60), || {
        let (ok, out, _) = weir.psql_c("SHOW QUERIES");
        (ok && out.contains("failed: no Kafka broker")).then_some(out)
    });
    assert!(
        failed.is_some(),
        "SHOW QUERIES shows the failure\n{}",
        weir.log_text()
    );
    let health = eventually(Duration::from_secs(60), || {
        let health = weir.health();
        (health["status"] == "failing").then_some(health)
    })
    .expect("/health shows the failure");
    let pipeline = &health["pipelines"][0];
    assert_eq!(pipeline["name"], "ev_lake", "{health}");
    assert_eq!(pipeline["status"], "failed", "{health}");
    assert!(
        pipeline["cause"]
            .as_str()
            .is_some_and(|c| c.contains(&tansu.bootstrap())),
        "the cause names the broker: {health}"
    );

    // The broker returns: a restart from the last checkpoint picks up where it was, and
    // the lake holds every event exactly once.
    tansu.restart();
    produce(
        &tansu.bootstrap(),
        "ev",
        (N..2 * N).map(|i| keyed(i, event(i))),
    );
    let totals = eventually(Duration::from_secs(180), || {
        lake_totals(&lake).filter(|t| t.1 >= 2 * N)
    });
    let (rows, distinct, sum_id, _) =
        totals.unwrap_or_else(|| panic!("lake: {:?}\n{}", lake_totals(&lake), weir.log_text()));
    assert_eq!(
        (rows, distinct),
        (2 * N, 2 * N),
        "nothing lost, nothing twice"
    );
    assert_eq!(sum_id, 2 * N * (2 * N - 1) / 2);
    let recovered = eventually(Duration::from_secs(60), || {
        let (ok, out, _) = weir.psql_c("SHOW QUERIES");
        (ok && out.contains("running") && out.contains("(last failure: no Kafka broker"))
            .then_some(out)
    });
    assert!(
        recovered.is_some(),
        "SHOW QUERIES counts the restart\n{}",
        weir.log_text()
    );
    let health = weir.health();
    assert_eq!(health["status"], "ok", "{health}");
    assert!(
        health["pipelines"][0]["restarts"].as_u64() >= Some(1),
        "{health}"
    );
}
