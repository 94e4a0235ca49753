//! Windowed GROUP BY end to end: 1 M events through TUMBLE, HOP and SESSION, from a file
//! with `weir run` and from Kafka (tansu) with `weir serve`; the Parquet output compared with
//! DuckDB's batch answer over the same input.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use crate::harness::{Record, Tansu, Weir, duckdb, eventually, produce, weir_run};

/// Events in the file run; the Kafka run takes the first `KAFKA_EVENTS` of them, as each of
/// its three pipelines reads the topic itself and the test broker serves some 25 000 records/s.
const EVENTS: u64 = 1_000_000;
const KAFKA_EVENTS: u64 = 400_000;
const BASE_MS: i64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z

/// `events` NDJSON records `{k, v, ts}`: 5000 keys, integer-valued v (so that sums are exact in any order),
/// 10 events per ms, each up to 400 ms out of order (the watermark delay is 1 s). After the
/// first 30 s, every 10 000th event is followed by a record 25 s behind, flagged `late`:
/// its windows have closed by then, so it must be dropped and change nothing.
fn write_input(path: &Path, events: u64) -> u64 {
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
    for i in 0..events {
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

const AGGREGATES: &str =
    "count(*) AS n, sum(v) AS s, min(v) AS mn, max(v) AS mx, avg(v) AS a, count(DISTINCT v) AS d";
const DUCK_AGGREGATES: &str = "count(*), sum(v), min(v), max(v), avg(v), count(DISTINCT v)";
/// Sessions per (k, v % 10): about 20 records each over the 100 s of input, so that a 2 s gap
/// splits them into many sessions.
const SESSION_GAP_MS: i64 = 2000;

/// The three windowed sinks over stream `ev`, into `lake/{tumble,hop,session}`.
fn window_sinks(lake: &Path) -> String {
    let lake = lake.display();
    let gap = SESSION_GAP_MS;
    format!(
        "CREATE SINK tumble WITH (connector = 'parquet', path = '{lake}/tumble', 'rollover.interval' = '1s') AS
           SELECT window_start, k, {AGGREGATES} FROM TUMBLE(ev, ts, INTERVAL '10' SECOND) GROUP BY window_start, window_end, k;
         CREATE SINK hop WITH (connector = 'parquet', path = '{lake}/hop', 'rollover.interval' = '1s') AS
           SELECT window_start, k, {AGGREGATES} FROM HOP(ev, ts, INTERVAL '2' SECOND, INTERVAL '10' SECOND) GROUP BY window_start, window_end, k;
         CREATE SINK session WITH (connector = 'parquet', path = '{lake}/session', 'rollover.interval' = '1s') AS
           SELECT window_start, window_end, k, v % 10 AS b, {AGGREGATES} FROM SESSION(ev, ts, INTERVAL '{gap}' MILLISECOND) GROUP BY window_start, window_end, k, v % 10;"
    )
}

/// DuckDB's answer per sink, over the on-time records of `input`: windows by epoch
/// arithmetic; sessions by gaps between a group's consecutive records.
fn expected(input: &Path) -> [(&'static str, String); 3] {
    let on_time = format!(
        "(SELECT k, v, ts, epoch_ms(ts) AS ms FROM read_json('{}', columns = {{k: 'BIGINT', v: 'DOUBLE', ts: 'TIMESTAMP', late: 'BOOLEAN'}}) WHERE late IS NULL)",
        input.display()
    );
    let tumble = format!(
        "SELECT make_timestamp((ms // 10000) * 10000 * 1000) AS window_start, NULL, k, NULL, {DUCK_AGGREGATES} FROM {on_time} GROUP BY ALL"
    );
    let hop = format!(
        "SELECT make_timestamp(((ms // 2000) - i) * 2000 * 1000) AS window_start, NULL, k, NULL, {DUCK_AGGREGATES} \
         FROM {on_time}, range(0, 5) AS r(i) GROUP BY ALL"
    );
    let gap = SESSION_GAP_MS;
    let session = format!(
        "WITH o AS (SELECT k, v, v % 10 AS b, ms FROM {on_time}), \
              g AS (SELECT *, CASE WHEN ms - lag(ms) OVER (PARTITION BY k, b ORDER BY ms) < {gap} THEN 0 ELSE 1 END AS new FROM o), \
              s AS (SELECT *, sum(new) OVER (PARTITION BY k, b ORDER BY ms ROWS UNBOUNDED PRECEDING) AS sid FROM g) \
         SELECT make_timestamp(min(ms) * 1000), make_timestamp((max(ms) + {gap}) * 1000), k, b, {DUCK_AGGREGATES} FROM s GROUP BY k, b, sid"
    );
    [("tumble", tumble), ("hop", hop), ("session", session)]
}

/// Weir's rows of sink `name` (NULL for the columns it does not have).
fn weir_rows(lake: &Path, name: &str) -> String {
    let (end, b) = if name == "session" {
        ("CAST(window_end AS TIMESTAMP)", "b")
    } else {
        ("NULL", "NULL")
    };
    format!(
        "SELECT CAST(window_start AS TIMESTAMP), {end}, k, {b}, n, s, mn, mx, a, d FROM '{}/{name}/*.parquet' WHERE k >= 0",
        lake.display()
    )
}

/// `[weir rows, expected rows, weir-only rows, expected-only rows, weir records, expected
/// records]` for one sink.
fn compare(lake: &Path, name: &str, expected: &str) -> Vec<u64> {
    let weir = weir_rows(lake, name);
    let result = duckdb(&format!(
        "SELECT (SELECT count(*) FROM ({weir})), (SELECT count(*) FROM ({expected})), \
                (SELECT count(*) FROM (SELECT * FROM ({weir}) EXCEPT ALL SELECT * FROM ({expected}))), \
                (SELECT count(*) FROM (SELECT * FROM ({expected}) EXCEPT ALL SELECT * FROM ({weir}))), \
                (SELECT sum(n) FROM ({weir}) AS w(s, e, k, b, n)), \
                (SELECT sum(n) FROM ({expected}) AS x(s, e, k, b, n))"
    ));
    result[0]
        .split('\t')
        .map(|f| f.parse().unwrap_or(u64::MAX))
        .collect()
}

/// `context` is shown on failure.
fn assert_equal(name: &str, counts: &[u64], context: &str) {
    assert!(counts[0] > 10_000, "{name}: {counts:?}");
    assert_eq!(
        counts[0], counts[1],
        "{name}: as many window rows as DuckDB's answer\n{context}"
    );
    assert_eq!(
        &counts[2..6],
        [0, 0, counts[5], counts[5]],
        "{name}: every row equals DuckDB's (weir-only rows, duckdb-only rows, weir records, duckdb records)\n{context}"
    );
}

#[test]
fn windows_over_a_file_equal_duckdbs_batch_answer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("events.ndjson");
    let late = write_input(&input, EVENTS);
    assert!(late > 0);
    let lake = dir.path().join("lake");
    let job = dir.path().join("job.sql");
    std::fs::write(
        &job,
        format!(
            "CREATE STREAM ev (k BIGINT NOT NULL, v DOUBLE, ts TIMESTAMP(3) NOT NULL, WATERMARK FOR ts AS ts - INTERVAL '1' SECOND)
               WITH (connector = 'file', path = '{}', format = 'json');
             {}",
            input.display(),
            window_sinks(&lake)
        ),
    )
    .expect("job");
    weir_run(&job);
    for (name, expected) in expected(&input) {
        assert_equal(name, &compare(&lake, name, &expected), "");
    }
}

/// The same events from Kafka: partition `i % 4` for the i-th on-time record (a partition
/// holds them in the file's order, so each is out of order by less than the watermark
/// delay), and a last record an hour later in every partition that closes every window.
/// The late records are left out: with four partitions, whether one is late depends on how
/// far the partitions' reading runs apart. Every partition has records up to its closing one,
/// so none needs to count as idle: the idle timeout is an hour, as tansu may serve one
/// partition nothing for longer than the default 30 s while it serves the others' backlog
/// to three readers.
#[test]
fn windows_over_kafka_equal_duckdbs_batch_answer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("events.ndjson");
    write_input(&input, KAFKA_EVENTS);
    let tansu = Tansu::start(dir.path());
    tansu.create_topic("ev", 4);
    let text = std::fs::read_to_string(&input).expect("input");
    let on_time = text.lines().filter(|l| !l.contains(r#""late""#));
    let closing = chrono::DateTime::from_timestamp_millis(BASE_MS + 3_600_000)
        .expect("time")
        .format("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string();
    let on_time = on_time
        .enumerate()
        .map(|(i, line)| (i as i32 % 4, line.to_string()));
    let closers = (0..4).map(|p| (p, format!(r#"{{"k":-1,"v":0.0,"ts":"{closing}"}}"#)));
    produce(
        &tansu.bootstrap(),
        "ev",
        on_time.chain(closers).map(|(p, payload)| Record {
            partition: Some(p),
            payload,
            ..Record::default()
        }),
    );

    let weir = Weir::start(dir.path(), None);
    let lake = dir.path().join("lake");
    let sql = format!(
        "CREATE STREAM ev (k BIGINT NOT NULL, v DOUBLE, ts TIMESTAMP(3) NOT NULL, WATERMARK FOR ts AS ts - INTERVAL '1' SECOND) \
           WITH (connector = 'kafka', topic = 'ev', 'bootstrap.servers' = '{}', 'scan.startup.mode' = 'earliest', 'watermark.idle_timeout' = '1h'); {}",
        tansu.bootstrap(),
        window_sinks(&lake)
    );
    let (ok, out, err) = weir.psql_c(&sql);
    assert!(ok, "{out}{err}\n{}", weir.log_text());
    for (name, expected) in expected(&input) {
        // Files appear as windows close; wait for all of them (counting rows is cheap, the
        // comparison is not).
        let want: u64 = duckdb(&format!("SELECT count(*) FROM ({expected})"))[0]
            .parse()
            .expect("count");
        let mut last = None;
        let complete = eventually(Duration::from_secs(300), || {
            let dir = lake.join(name);
            let has_files = std::fs::read_dir(&dir)
                .ok()?
                .flatten()
                .any(|e| e.path().extension().is_some_and(|x| x == "parquet"));
            let rows = weir_rows(&lake, name);
            let have: u64 = has_files.then(|| {
                duckdb(&format!("SELECT count(*) FROM ({rows})"))[0]
                    .parse()
                    .ok()
            })??;
            last = Some(have);
            (have >= want).then_some(())
        });
        let counts = complete.map(|()| compare(&lake, name, &expected));
        let metrics = weir.http_get("/metrics");
        let context: Vec<&str> = metrics
            .lines()
            .filter(|l| {
                [
                    "late",
                    "rebalance",
                    "commits",
                    "client_errors",
                    "partition_records",
                    "watermark",
                    "checkpoints_",
                    "rows_written",
                ]
                .iter()
                .any(|m| l.contains(m))
            })
            .collect();
        let context = context.join("\n");
        let counts = counts.unwrap_or_else(|| {
            panic!(
                "{name}: incomplete, {last:?} of {want} rows\n{context}\n{}",
                weir.log_text()
            )
        });
        assert_equal(name, &counts, &context);
    }
}
