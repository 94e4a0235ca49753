//! `weir run` (headless, bounded inputs) and `weir check` (the CI lint).

use std::process::Command;

use crate::harness::{duckdb, repo_root, weir_bin, weir_run};

fn bounded_job(lake: &std::path::Path) -> String {
    format!(
        "CREATE STREAM ev (vehicle_id BIGINT, ts TIMESTAMP(3), speed_kmh DOUBLE, status TEXT)
           WITH (connector = 'datagen', rows_per_second = 0, max_rows = 50000, seed = 9, start_time = '2026-03-01T00:00:00Z');
         CREATE SINK lake WITH (connector = 'parquet', path = 'file://{}') AS
           SELECT vehicle_id, ts, speed_kmh * 2 AS double_speed, status FROM ev WHERE status = 'idle';",
        lake.display()
    )
}

#[test]
fn weir_run_finishes_bounded_jobs_and_datagen_is_deterministic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut lakes = Vec::new();
    for attempt in 0..2 {
        let lake = dir.path().join(format!("lake{attempt}"));
        let sql = dir.path().join(format!("job{attempt}.sql"));
        std::fs::write(&sql, bounded_job(&lake)).expect("write");
        weir_run(&sql);
        lakes.push(format!("'{}/*.parquet'", lake.display()));
    }
    let same = duckdb(&format!(
        "SELECT (SELECT count(*) FROM {a}), (SELECT count(*) FROM (SELECT * FROM {a} EXCEPT ALL SELECT * FROM {b})), \
                (SELECT count(*) FROM (SELECT * FROM {b} EXCEPT ALL SELECT * FROM {a})), \
                (SELECT bool_and(status = 'idle') FROM {a}), (SELECT min(ts) FROM {a})",
        a = lakes[0],
        b = lakes[1]
    ));
    let fields: Vec<&str> = same[0].split('\t').collect();
    let rows: i64 = fields[0].parse().expect("count");
    // 20 % of the model's statuses are 'idle'.
    assert!((8_000..12_000).contains(&rows), "{rows} idle rows of 50000");
    assert_eq!(
        &fields[1..4],
        ["0", "0", "True"],
        "two runs with one seed give the same rows"
    );
    assert!(
        fields[4].starts_with("2026-03-01 00:00:00"),
        "event time starts at start_time: {}",
        fields[4]
    );
}

#[test]
fn weir_run_over_a_file_with_bad_lines_writes_every_good_row() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lake = dir.path().join("lake");
    let sql = dir.path().join("job.sql");
    let input = repo_root().join("tests/data/events_bad.ndjson");
    std::fs::write(
        &sql,
        format!(
            "CREATE STREAM e (k BIGINT NOT NULL, v DOUBLE, ts TIMESTAMP(3)) WITH (connector = 'file', path = '{}');
             CREATE SINK out WITH (connector = 'parquet', path = '{}') AS SELECT k, v FROM e;",
            input.display(),
            lake.display()
        ),
    )
    .expect("write");
    weir_run(&sql);
    let rows = duckdb(&format!(
        "SELECT k, v FROM '{}/*.parquet' ORDER BY k",
        lake.display()
    ));
    assert_eq!(rows, vec!["1\t1.5", "2\t20.25", "4\t40.0", "6\tNULL"]);
}

#[test]
fn weir_check_lints_files_with_positions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good: Vec<_> = std::fs::read_dir(repo_root().join("queries/demo"))
        .expect("demo")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .collect();
    let mut sorted = good.clone();
    sorted.sort();
    // The notebook reads the demo's streams, so it comes after them.
    sorted.push(repo_root().join("queries/getting-started.md"));
    // Run where the README runs it: the demo's table path is relative to the repository root.
    let out = Command::new(weir_bin())
        .current_dir(repo_root())
        .arg("check")
        .args(&sorted)
        .output()
        .expect("weir check");
    assert!(
        out.status.success(),
        "the demo passes: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let bad = dir.path().join("bad.sql");
    std::fs::write(
        &bad,
        "CREATE STREAM s (x INT) WITH (connector = 'datagen');\n\n-- a typo in an option\nCREATE STREAM t (x INT)\n  WITH (connector = 'datagen', rows_per_sec = 5);\nCREATE MATERIALIZED VIEW m AS SELECT nope FROM s;\n",
    )
    .expect("write");
    let syntax = dir.path().join("syntax.sql");
    std::fs::write(&syntax, "SELECT 1;\nCREATE STREAM (x INT);\n").expect("write");
    let out = Command::new(weir_bin())
        .arg("check")
        .arg(&bad)
        .arg(&syntax)
        .output()
        .expect("weir check");
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    assert!(
        lines[0].starts_with(&format!(
            "{}:4:1: unknown option 'rows_per_sec'",
            bad.display()
        )),
        "{stdout}"
    );
    assert!(
        lines[1].starts_with(&format!("{}:6:1: ", bad.display())) && lines[1].contains("42703"),
        "{stdout}"
    );
    assert!(
        lines[2].starts_with(&format!("{}:2:15: ", syntax.display())) && lines[2].contains("42601"),
        "{stdout}"
    );

    // A notebook's ```sql blocks are checked where they stand in the file; other text and
    // other code blocks are not.
    let notebook = dir.path().join("notes.md");
    std::fs::write(
        &notebook,
        "# Notes\n\nSELECT this is prose;\n\n```sql\nCREATE STREAM n (x INT) WITH (connector = 'datagen');\n```\n\n```python\nSELECT not sql\n```\n\n```sql\nSELECT x\nFROM nope;\n```\n",
    )
    .expect("write");
    let out = Command::new(weir_bin())
        .arg("check")
        .arg(&notebook)
        .output()
        .expect("weir check");
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(
        stdout.starts_with(&format!("{}:14:1: ", notebook.display())) && stdout.contains("42P01"),
        "{stdout}"
    );
}
