//! The README's demo, tried as a new user would, with the lake checked by DuckDB.

use std::path::Path;
use std::time::Duration;

use crate::harness::{Weir, duckdb, eventually, repo_root};

fn parquet_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "parquet"))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn the_demo_serves_psql_and_its_lake_equals_the_query_over_the_raw_events() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The demo's paths are relative to the directory weir runs in, the repository root in the
    // README: give this one the same `queries/`.
    std::os::unix::fs::symlink(repo_root().join("queries"), dir.path().join("queries"))
        .expect("symlink");
    // The link leads out of the working directory: allow where it leads too.
    let allow = [
        "--allow-path".to_string(),
        ".".to_string(),
        "--allow-path".to_string(),
        repo_root().join("queries").display().to_string(),
    ];
    let mut weir = Weir::start_with(
        dir.path(),
        Some(&repo_root().join("queries/demo")),
        &allow,
        &[],
    );

    let (ok, out, err) = weir.psql_c("\\d");
    assert!(ok, "{err}");
    assert!(
        out.contains("vehicle_events") && out.contains("speeding") && out.contains("vehicles"),
        "{out}"
    );
    let (ok, out, err) = weir.psql_c("SELECT count(*) FROM vehicles");
    assert!(
        ok && out.contains("500"),
        "the reference table is loaded: {out}{err}"
    );
    let five = eventually(Duration::from_secs(20), || {
        let (ok, out, _) = weir.psql_c("SELECT * FROM speeding LIMIT 5");
        (ok && out.contains("(5 rows)")).then_some(out)
    });
    let five = five.expect("SELECT * FROM speeding LIMIT 5 returns 5 rows");
    assert!(
        five.lines()
            .next()
            .is_some_and(|h| h.starts_with("vehicle_id|ts|speed_kmh")),
        "{five}"
    );

    let lake = dir.path().join("weir-data/lake");
    let files = eventually(Duration::from_secs(30), || {
        (parquet_files(&lake.join("speeding")) >= 1
            && parquet_files(&lake.join("vehicle_events")) >= 1)
            .then_some(())
    });
    assert!(
        files.is_some(),
        "the lake has Parquet files after a few seconds"
    );
    assert!(
        weir.stop(),
        "SIGTERM flushes and exits 0:\n{}",
        weir.log_text()
    );

    // DuckDB, an independent engine, applies the demo query to the raw events and must get
    // exactly the view's lake, over the event-time range both lakes cover.
    let raw = format!("'{}/vehicle_events/*.parquet'", lake.display());
    let view = format!("'{}/speeding/*.parquet'", lake.display());
    let cut = format!("(SELECT least((SELECT max(ts) FROM {raw}), (SELECT max(ts) FROM {view})))");
    let expected = format!(
        "SELECT vehicle_id, ts, speed_kmh, engine_temp, engine_temp > 110 AS overheating, upper(status) AS status \
         FROM {raw} WHERE speed_kmh > 120 AND ts <= {cut}"
    );
    let actual = format!("SELECT * FROM {view} WHERE ts <= {cut}");
    let counts = duckdb(&format!(
        "SELECT (SELECT count(*) FROM ({expected})), (SELECT count(*) FROM ({actual})), \
                (SELECT count(*) FROM (({expected}) EXCEPT ALL ({actual}))), \
                (SELECT count(*) FROM (({actual}) EXCEPT ALL ({expected}))), \
                (SELECT count(*) FROM {raw})"
    ));
    let fields: Vec<i64> = counts[0]
        .split('\t')
        .map(|v| v.parse().expect("count"))
        .collect();
    let [expected_rows, actual_rows, missing, extra, raw_rows] = fields[..] else {
        panic!("{counts:?}")
    };
    assert!(
        raw_rows > 1000,
        "the raw lake holds the generated events: {raw_rows}"
    );
    assert!(expected_rows > 0, "some events were over 120 km/h");
    assert_eq!(
        (actual_rows, missing, extra),
        (expected_rows, 0, 0),
        "lake differs from DuckDB's answer"
    );
    // The generator's model holds in what users read.
    let ranges = duckdb(&format!(
        "SELECT min(vehicle_id) >= 1 AND max(vehicle_id) <= 500 AND min(speed_kmh) >= 0 AND max(speed_kmh) < 180 FROM {raw}"
    ));
    assert_eq!(ranges, vec!["True"]);
}
