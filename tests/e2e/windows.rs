//! Windowed GROUP BY end to end: 1 M events from a file through TUMBLE and HOP with
//! `weir run`, the Parquet output compared with DuckDB's batch answer over the same input.

use crate::harness::{duckdb, weir_run};
use std::io::Write;
use std::path::Path;

const EVENTS: u64 = 1_000_000;
const BASE_MS: i64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z

/// NDJSON `{k, v, ts}`: 5000 keys, integer-valued v (so that sums are exact in any order),
/// 10 events per ms, each up to 400 ms out of order (the watermark delay is 1 s). After the
/// first 30 s, every 10 000th event is followed by a record 25 s behind, flagged `late`:
/// its windows have closed by then, so it must be dropped and change nothing.
fn write_input(path: &Path) -> u64 {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    let mut state: u64 = 7;
    let mut late = 0;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let line =
        |out: &mut std::io::BufWriter<std::fs::File>, k: u64, v: u64, ms: i64, late: bool| {
            let ts = chrono::DateTime::from_timestamp_millis(ms)
                .expect("time")
                .format("%Y-%m-%dT%H:%M:%S%.3fZ");
            let flag = if late { r#","late":true"# } else { "" };
            writeln!(out, r#"{{"k":{k},"v":{v}.0,"ts":"{ts}"{flag}}}"#).expect("write");
        };
    for i in 0..EVENTS {
        let r = next();
        let ms = BASE_MS + (i / 10) as i64 - (r >> 40) as i64 % 400;
        line(&mut out, r % 5000, (r >> 20) % 1000, ms, false);
        if i > 300_000 && i % 10_000 == 0 {
            line(
                &mut out,
                r % 5000,
                7,
                BASE_MS + (i / 10) as i64 - 25_000,
                true,
            );
            late += 1;
        }
    }
    out.flush().expect("flush");
    late
}

#[test]
fn tumble_and_hop_over_a_file_equal_duckdbs_batch_answer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("events.ndjson");
    let late = write_input(&input);
    assert!(late > 0);
    let lake = dir.path().join("lake");
    let job = dir.path().join("job.sql");
    let aggregates = "count(*) AS n, sum(v) AS s, min(v) AS mn, max(v) AS mx, avg(v) AS a, count(DISTINCT v) AS d";
    std::fs::write(
        &job,
        format!(
            "CREATE STREAM ev (k BIGINT NOT NULL, v DOUBLE, ts TIMESTAMP(3) NOT NULL, WATERMARK FOR ts AS ts - INTERVAL '1' SECOND)
               WITH (connector = 'file', path = '{input}', format = 'json');
             CREATE SINK tumble WITH (connector = 'parquet', path = '{lake}/tumble') AS
               SELECT window_start, k, {aggregates} FROM TUMBLE(ev, ts, INTERVAL '10' SECOND) GROUP BY window_start, window_end, k;
             CREATE SINK hop WITH (connector = 'parquet', path = '{lake}/hop') AS
               SELECT window_start, k, {aggregates} FROM HOP(ev, ts, INTERVAL '2' SECOND, INTERVAL '10' SECOND) GROUP BY window_start, window_end, k;",
            input = input.display(),
            lake = lake.display(),
        ),
    )
    .expect("job");
    weir_run(&job);

    // DuckDB's answer: the on-time records, assigned to windows by epoch arithmetic.
    let on_time = format!(
        "(SELECT k, v, ts, epoch_ms(ts) AS ms FROM read_json('{}', columns = {{k: 'BIGINT', v: 'DOUBLE', ts: 'TIMESTAMP', late: 'BOOLEAN'}}) WHERE late IS NULL)",
        input.display()
    );
    let duck_aggregates = "count(*), sum(v), min(v), max(v), avg(v), count(DISTINCT v)";
    let tumble = format!(
        "SELECT make_timestamp((ms // 10000) * 10000 * 1000) AS window_start, k, {duck_aggregates} FROM {on_time} GROUP BY ALL"
    );
    let hop = format!(
        "SELECT make_timestamp(((ms // 2000) - i) * 2000 * 1000) AS window_start, k, {duck_aggregates} \
         FROM {on_time}, range(0, 5) AS r(i) GROUP BY ALL"
    );
    for (name, expected) in [("tumble", tumble), ("hop", hop)] {
        let weir = format!(
            "SELECT CAST(window_start AS TIMESTAMP), k, n, s, mn, mx, a, d FROM '{}/{name}/*.parquet'",
            lake.display()
        );
        let result = duckdb(&format!(
            "SELECT (SELECT count(*) FROM ({weir})), (SELECT count(*) FROM ({expected})), \
                    (SELECT count(*) FROM ({weir} EXCEPT ALL {expected})), \
                    (SELECT count(*) FROM ({expected} EXCEPT ALL {weir}))"
        ));
        let fields: Vec<&str> = result[0].split('\t').collect();
        assert!(
            fields[0].parse::<u64>().unwrap_or(0) > 10_000,
            "{name}: {fields:?}"
        );
        assert_eq!(
            fields[0], fields[1],
            "{name}: as many window rows as DuckDB's answer"
        );
        assert_eq!(
            &fields[2..4],
            ["0", "0"],
            "{name}: every row equals DuckDB's (weir-only, duckdb-only rows)"
        );
    }
}
