//! The live tail: `SELECT ... FROM stream [WHERE ...] LIMIT n` returns the next n records.

use std::io::Write;
use std::time::Duration;

use crate::harness::Weir;

#[test]
fn psql_live_tail_returns_matching_records() {
    let dir = tempfile::tempdir().expect("tempdir");
    let weir = Weir::start(dir.path(), None);
    let (ok, _, err) = weir.psql_c(
        "CREATE STREAM ev (vehicle_id BIGINT, speed_kmh DOUBLE, status TEXT) WITH (connector = 'datagen', rows_per_second = 500)",
    );
    assert!(ok, "{err}");
    let (ok, out, err) =
        weir.psql_c("SELECT vehicle_id, speed_kmh FROM ev WHERE speed_kmh > 100 LIMIT 7");
    assert!(ok, "{err}");
    let rows: Vec<&str> = out
        .lines()
        .filter(|l| l.contains('|') && !l.starts_with("vehicle_id"))
        .collect();
    assert_eq!(rows.len(), 7, "{out}");
    for row in rows {
        let speed: f64 = row
            .split('|')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("speed");
        assert!(speed > 100.0, "{row}");
    }
    assert!(out.contains("(7 rows)"), "{out}");

    let (ok, _, err) = weir.psql_c("SELECT * FROM ev");
    assert!(
        !ok && err.contains("LIMIT"),
        "a tail without LIMIT says to add one: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tail_over_a_followed_file_returns_records_as_they_arrive() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("events.ndjson");
    std::fs::write(&input, "{\"k\": 1, \"msg\": \"old\"}\n").expect("write");
    let weir = Weir::start(dir.path(), None);
    let client = weir.client().await;
    client
        .batch_execute(&format!(
            "CREATE STREAM logs (k BIGINT, msg TEXT) WITH (connector = 'file', path = '{}', follow = true, 'follow.interval' = '100ms')",
            input.display()
        ))
        .await
        .expect("create");
    let tail = {
        let client = weir.client().await;
        tokio::spawn(async move {
            client
                .simple_query("SELECT k, msg FROM logs WHERE k > 1 LIMIT 2")
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!tail.is_finished(), "the tail waits for matching records");
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&input)
        .expect("open");
    writeln!(file, "{{\"k\": 2, \"msg\": \"new\"}}").expect("append");
    writeln!(file, "{{\"k\": 0, \"msg\": \"filtered\"}}").expect("append");
    writeln!(file, "{{\"k\": 3, \"msg\": \"newer\"}}").expect("append");
    drop(file);
    let messages = tokio::time::timeout(Duration::from_secs(20), tail)
        .await
        .expect("the tail finishes once 2 records arrived")
        .expect("task")
        .expect("query");
    let rows: Vec<(String, String)> = messages
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => {
                Some((r.get(0)?.to_string(), r.get(1)?.to_string()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        rows,
        vec![("2".into(), "new".into()), ("3".into(), "newer".into())]
    );
}
