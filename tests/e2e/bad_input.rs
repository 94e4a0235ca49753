//! Bad input never stops Weir: malformed records, missing files, huge statements, garbage
//! bytes on the wire, and failing statements on one connection while another works.

use std::io::Write;
use std::time::Duration;

use crate::harness::{Weir, eventually};

fn count(weir: &Weir, sql: &str) -> Option<i64> {
    let (ok, out, _) = weir.psql_c(sql);
    if !ok {
        return None;
    }
    out.lines().nth(1).and_then(|l| l.trim().parse().ok())
}

#[test]
fn malformed_records_are_counted_skipped_and_dead_lettered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("events.ndjson");
    let csv = dir.path().join("events.csv");
    let (mut good_json, mut good_csv) = (0, 0);
    {
        let mut j = std::fs::File::create(&json).expect("json");
        let mut c = std::fs::File::create(&csv).expect("csv");
        writeln!(c, "k,v").expect("header");
        for i in 0..5000 {
            match i % 500 {
                7 => writeln!(j, "{{\"k\": {i}, \"v\": ").expect("w"),
                8 => writeln!(j, "{{\"k\": \"seven\", \"v\": 1.0}}").expect("w"),
                9 => writeln!(j, "\u{1}\u{2}garbage").expect("w"),
                _ => {
                    good_json += 1;
                    writeln!(j, "{{\"k\": {i}, \"v\": {i}.5}}").expect("w")
                }
            }
            match i % 1000 {
                3 => writeln!(c, "{i},not-a-number").expect("w"),
                4 => writeln!(c, "{i}").expect("w"),
                _ => {
                    good_csv += 1;
                    writeln!(c, "{i},{i}.25").expect("w")
                }
            }
        }
    }
    let dead = dir.path().join("dead.ndjson");
    let weir = Weir::start(dir.path(), None);
    let statements = [
        format!(
            "CREATE STREAM j (k BIGINT NOT NULL, v DOUBLE) WITH (connector = 'file', path = '{}', 'dead_letter.path' = '{}')",
            json.display(),
            dead.display()
        ),
        format!(
            "CREATE STREAM c (k BIGINT NOT NULL, v DOUBLE) WITH (connector = 'file', path = '{}', format = 'csv')",
            csv.display()
        ),
        "CREATE MATERIALIZED VIEW jv AS SELECT k, v FROM j".to_string(),
        "CREATE MATERIALIZED VIEW cv AS SELECT k, v FROM c".to_string(),
    ];
    for sql in &statements {
        let (ok, _, err) = weir.psql_c(sql);
        assert!(ok, "{sql}: {err}");
    }
    let json_rows = eventually(Duration::from_secs(30), || {
        count(&weir, "SELECT count(*) FROM jv").filter(|n| *n == good_json)
    });
    assert_eq!(json_rows, Some(good_json), "every good JSON row arrives");
    let csv_rows = eventually(Duration::from_secs(30), || {
        count(&weir, "SELECT count(*) FROM cv").filter(|n| *n == good_csv)
    });
    assert_eq!(csv_rows, Some(good_csv), "every good CSV row arrives");
    // Sums equal what was written (the good rows only).
    let expected_sum: i64 = (0..5000).filter(|i| !matches!(i % 500, 7..=9)).sum();
    assert_eq!(count(&weir, "SELECT sum(k) FROM jv"), Some(expected_sum));

    let metrics = weir.http_get("/metrics");
    let decode_errors = |pipeline: &str| -> u64 {
        metrics
            .lines()
            .filter(|l| {
                l.starts_with("weir_decode_errors_total{")
                    && l.contains(&format!("pipeline=\"{pipeline}\""))
            })
            .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<u64>().ok()))
            .sum()
    };
    assert_eq!(decode_errors("jv"), 30, "{metrics}");
    assert_eq!(decode_errors("cv"), 10, "{metrics}");
    let dead_letters = std::fs::read_to_string(&dead).expect("dead letters written");
    let entries: Vec<serde_json::Value> = dead_letters
        .lines()
        .map(|l| serde_json::from_str(l).expect("dead letter is JSON"))
        .collect();
    assert_eq!(entries.len(), 30);
    assert!(entries.iter().all(
        |e| e["error"].as_str().is_some_and(|s| !s.is_empty()) && e["line"].as_u64().is_some()
    ));
    assert_eq!(
        entries[0]["line"].as_u64(),
        Some(8),
        "line numbers are 1-based file lines"
    );
}

#[test]
fn a_missing_file_is_an_error_at_create_and_the_server_keeps_running() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut weir = Weir::start(dir.path(), None);
    let missing = dir.path().join("definitely/not/here.ndjson");
    let (ok, _, err) = weir.psql_c(&format!(
        "CREATE STREAM s (k BIGINT) WITH (connector = 'file', path = '{}')",
        missing.display()
    ));
    assert!(!ok);
    assert!(
        err.contains("58P01") && err.contains("definitely/not/here.ndjson"),
        "{err}"
    );
    assert!(weir.is_running());
    let (ok, out, _) = weir.psql_c("SELECT 40 + 2");
    assert!(ok && out.contains("42"), "{out}");
}

#[test]
fn a_one_megabyte_statement_is_answered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut weir = Weir::start(dir.path(), None);
    let big = "x".repeat(1 << 20);
    let sql_file = dir.path().join("big.sql");
    std::fs::write(&sql_file, format!("SELECT length('{big}') AS n;\n")).expect("write");
    let out = weir.psql(&["-A", "-t", "-f", sql_file.to_str().expect("utf8 path")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1048576");
    // A 1 MB statement that does not parse is a clean syntax error.
    std::fs::write(&sql_file, format!("SELECT (((( {big}")).expect("write");
    let out = weir.psql(&[
        "-v",
        "VERBOSITY=verbose",
        "-f",
        sql_file.to_str().expect("utf8 path"),
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("42601"));
    assert!(weir.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_wire_and_bad_statements_do_not_hurt_other_connections() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut weir = Weir::start(dir.path(), None);
    let healthy = weir.client().await;
    for garbage in [
        &b"\x00\x00\x00\x08\x04\xd2\x16/garbage"[..],
        &[0xffu8; 4096][..],
        b"GET / HTTP/1.1\r\n\r\n",
    ] {
        let mut socket =
            std::net::TcpStream::connect(("127.0.0.1", weir.pg_port)).expect("connect");
        let _ = socket.write_all(garbage);
        let _ = socket.shutdown(std::net::Shutdown::Both);
    }
    let other = weir.client().await;
    for bad in [
        "SELEC 1",
        "SELECT * FROM nowhere",
        "SELECT 1/0",
        "CREATE STREAM (",
        "\u{0}",
    ] {
        assert!(other.simple_query(bad).await.is_err(), "{bad} fails");
    }
    let n: i64 = healthy
        .query_one("SELECT 7::BIGINT * 6", &[])
        .await
        .expect("healthy client works")
        .get(0);
    assert_eq!(n, 42);
    let n: i64 = other
        .query_one("SELECT 2::BIGINT", &[])
        .await
        .expect("the failing client recovers")
        .get(0);
    assert_eq!(n, 2);
    assert!(weir.is_running());
    assert_eq!(weir.health()["status"], "ok");
}
