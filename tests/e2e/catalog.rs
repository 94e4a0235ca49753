//! DDL, introspection, error classes and restart, through real psql and tokio-postgres.

use std::time::Duration;

use tokio_postgres::error::SqlState;

use crate::harness::{Weir, eventually};

const STREAM: &str = "CREATE STREAM vehicle_events (vehicle_id BIGINT NOT NULL, ts TIMESTAMP(3) NOT NULL, \
    speed_kmh DOUBLE, status TEXT, WATERMARK FOR ts AS ts - INTERVAL '5' SECOND) \
    WITH (connector = 'datagen', rows_per_second = 2000, cardinality = 50, seed = 1)";
const VIEW: &str = "CREATE MATERIALIZED VIEW fast AS SELECT vehicle_id, speed_kmh AS speed, status \
    FROM vehicle_events WHERE speed_kmh > 100";

#[test]
fn psql_ddl_introspection_and_error_classes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let weir = Weir::start(dir.path(), None);

    let (ok, out, err) = weir.psql_c(STREAM);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "CREATE STREAM");
    let (ok, _, err) = weir.psql_c(VIEW);
    assert!(ok, "{err}");
    let (ok, _, err) = weir.psql_c("CREATE SINK fast_out FROM fast WITH (connector = 'blackhole')");
    assert!(ok, "{err}");

    // psql's meta-commands read pg_catalog.
    let (ok, out, err) = weir.psql_c("\\d");
    assert!(ok, "\\d failed: {err}");
    assert!(
        out.contains("vehicle_events") && out.contains("fast"),
        "\\d:\n{out}"
    );
    let (ok, out, err) = weir.psql_c("\\dt");
    assert!(ok, "\\dt failed: {err}");
    assert!(
        out.contains("vehicle_events") && !out.contains("|fast|"),
        "\\dt:\n{out}"
    );
    let (ok, out, err) = weir.psql_c("\\dv");
    assert!(ok, "\\dv failed: {err}");
    assert!(
        out.contains("fast") && !out.contains("vehicle_events"),
        "\\dv:\n{out}"
    );
    let (ok, out, err) = weir.psql_c("\\d vehicle_events");
    assert!(ok, "\\d name failed: {err}");
    for column in ["vehicle_id", "ts", "speed_kmh", "status"] {
        assert!(
            out.contains(column),
            "\\d vehicle_events lacks {column}:\n{out}"
        );
    }
    assert!(
        out.contains("bigint") && out.contains("timestamp"),
        "types in \\d vehicle_events:\n{out}"
    );

    let (ok, out, _) = weir.psql_c("SHOW STREAMS");
    assert!(ok && out.contains("vehicle_events|datagen"), "{out}");
    let (ok, out, _) = weir.psql_c("SHOW MATERIALIZED VIEWS");
    assert!(ok && out.contains("fast|vehicle_events|running"), "{out}");
    let (ok, out, _) = weir.psql_c("SHOW SINKS");
    assert!(
        ok && out.contains("fast_out|blackhole|fast|running"),
        "{out}"
    );
    let (ok, out, _) = weir.psql_c("SHOW QUERIES");
    assert!(
        ok && out.contains("fast|materialized view") && out.contains("fast_out|sink"),
        "{out}"
    );
    let (ok, out, _) = weir.psql_c("DESCRIBE fast");
    assert!(ok && out.contains("speed|DOUBLE|t|f"), "{out}");
    let (ok, out, _) = weir.psql_c("SHOW CREATE MATERIALIZED VIEW fast");
    assert!(ok && out.contains("WHERE speed_kmh > 100"), "{out}");

    // Every error class, with its SQLSTATE (psql prints it in verbose mode).
    let cases = [
        (STREAM, "42P07"),
        ("SELECT * FROM nowhere", "42P01"),
        ("DROP STREAM nowhere", "42P01"),
        (
            "CREATE STREAM s2 (x INT) WITH (connector = 'datagen', colour = 'blue')",
            "22023",
        ),
        (
            "CREATE STREAM s2 (x INT) WITH (connector = 'datagen', rows_per_second = 'lots')",
            "22023",
        ),
        ("CREATE STREM s2 (x INT)", "42601"),
        (
            "SELECT * FROM TUMBLE(vehicle_events, ts, INTERVAL '1' MINUTE) LIMIT 1",
            "0A000",
        ),
        ("SELECT * FROM vehicle_events", "0A000"),
        ("DROP STREAM vehicle_events", "2BP01"),
    ];
    for (sql, code) in cases {
        let (ok, _, err) = weir.psql_c(sql);
        assert!(!ok, "{sql} should fail");
        assert!(
            err.contains(&format!("ERROR:  {code}")),
            "{sql}: expected {code}, got {err}"
        );
    }
    // The option is named, and syntax errors point at the position.
    let (_, _, err) =
        weir.psql_c("CREATE STREAM s2 (x INT) WITH (connector = 'datagen', colour = 'blue')");
    assert!(err.contains("colour"), "{err}");
    let (_, _, err) = weir.psql_c("CREATE STREAM s2 (x INT,, y INT) WITH (connector = 'datagen')");
    assert!(
        err.contains("LINE 1:") && err.contains('^'),
        "no position in: {err}"
    );

    let (ok, _, err) = weir.psql_c("DROP STREAM vehicle_events CASCADE");
    assert!(ok, "{err}");
    let (ok, out, _) = weir.psql_c("SHOW SINKS");
    assert!(ok && !out.contains("fast_out|"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_prepared_statements_and_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let weir = Weir::start(dir.path(), None);
    let client = weir.client().await;
    client.batch_execute(STREAM).await.expect("stream");
    client.batch_execute(VIEW).await.expect("view");

    // The view fills as the generator runs.
    let mut rows = Vec::new();
    for _ in 0..100 {
        rows = client
            .query("SELECT vehicle_id, speed, status FROM fast WHERE speed > $1 ORDER BY speed DESC LIMIT 5", &[&150.0f64])
            .await
            .expect("prepared query");
        if rows.len() == 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(rows.len(), 5, "the view never held 5 rows over 150 km/h");
    for row in &rows {
        let id: i64 = row.get(0);
        let speed: f64 = row.get(1);
        let status: &str = row.get(2);
        assert!((1..=50).contains(&id), "{id}");
        assert!(speed > 150.0 && speed < 180.0, "{speed}");
        assert!(["driving", "idle", "parked"].contains(&status), "{status}");
    }
    let speeds: Vec<f64> = rows.iter().map(|r| r.get(1)).collect();
    assert!(
        speeds.windows(2).all(|w| w[0] >= w[1]),
        "ORDER BY over a view: {speeds:?}"
    );

    // Aggregates and joins over views run on DataFusion.
    let row = client
        .query_one("SELECT count(*), min(speed) > 100 FROM fast a JOIN (SELECT DISTINCT vehicle_id FROM fast) b USING (vehicle_id)", &[])
        .await
        .expect("aggregate");
    let (count, all_fast): (i64, bool) = (row.get(0), row.get(1));
    assert!(count > 0 && all_fast);

    // Errors reach the extended protocol with their SQLSTATE; the connection survives.
    let err = client
        .query("SELECT * FROM nowhere", &[])
        .await
        .expect_err("unknown table");
    assert_eq!(err.code(), Some(&SqlState::UNDEFINED_TABLE), "{err:?}");
    let err = client.batch_execute(STREAM).await.expect_err("duplicate");
    assert_eq!(err.code(), Some(&SqlState::DUPLICATE_TABLE), "{err:?}");
    let err = client
        .batch_execute("CREATE STREAM x (a INT) WITH (connector = 'datagen', bogus = 1)")
        .await
        .expect_err("option");
    assert_eq!(
        err.code(),
        Some(&SqlState::INVALID_PARAMETER_VALUE),
        "{err:?}"
    );
    let one: i64 = client
        .query_one("SELECT 1::BIGINT", &[])
        .await
        .expect("still usable")
        .get(0);
    assert_eq!(one, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_restores_the_catalog_and_restarts_pipelines() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut weir = Weir::start(dir.path(), None);
    {
        let client = weir.client().await;
        client.batch_execute(STREAM).await.expect("stream");
        client.batch_execute(VIEW).await.expect("view");
        client
            .batch_execute("CREATE SINK fast_out FROM fast WITH (connector = 'blackhole')")
            .await
            .expect("sink");
        client
            .batch_execute("CREATE STREAM doomed (x INT) WITH (connector = 'datagen')")
            .await
            .expect("stream");
        client
            .batch_execute("DROP STREAM doomed")
            .await
            .expect("drop");
    }
    assert!(weir.stop(), "graceful stop exits 0:\n{}", weir.log_text());

    let weir = Weir::start(dir.path(), None);
    let client = weir.client().await;
    let names = |rows: Vec<tokio_postgres::SimpleQueryMessage>| -> Vec<String> {
        rows.into_iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
                _ => None,
            })
            .collect()
    };
    assert_eq!(
        names(client.simple_query("SHOW STREAMS").await.expect("show")),
        vec!["vehicle_events"]
    );
    assert_eq!(
        names(
            client
                .simple_query("SHOW MATERIALIZED VIEWS")
                .await
                .expect("show")
        ),
        vec!["fast"]
    );
    assert_eq!(
        names(client.simple_query("SHOW SINKS").await.expect("show")),
        vec!["fast_out"]
    );
    let show_create = client
        .query_one("SHOW CREATE MATERIALIZED VIEW fast", &[])
        .await
        .expect("show create");
    assert_eq!(show_create.get::<_, &str>(1), VIEW);
    // The view's pipeline runs again and refills it.
    let mut count = 0i64;
    for _ in 0..100 {
        count = client
            .query_one("SELECT count(*) FROM fast", &[])
            .await
            .expect("count")
            .get(0);
        if count > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(count > 0, "the restored view never received rows");
    let metrics = eventually(Duration::from_secs(10), || {
        let m = weir.http_get("/metrics");
        m.contains("weir_sink_rows_written_total{pipeline=\"fast_out\",sink=\"blackhole\"}")
            .then_some(m)
    });
    assert!(metrics.is_some(), "the restored sink reports its rows");
}

#[test]
fn an_object_that_cannot_be_restored_is_kept_and_retried() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("events.ndjson");
    std::fs::write(&input, "{\"k\": 1}\n").expect("write");
    let mut weir = Weir::start(dir.path(), None);
    let (ok, _, err) = weir.psql_c(&format!(
        "CREATE STREAM logs (k BIGINT) WITH (connector = 'file', path = '{}')",
        input.display()
    ));
    assert!(ok, "{err}");
    assert!(weir.stop());

    // The file is gone at the next start: the stream is not restored, but not forgotten.
    std::fs::remove_file(&input).expect("remove");
    let mut weir = Weir::start(dir.path(), None);
    let (ok, out, _) = weir.psql_c("SHOW STREAMS");
    assert!(ok && !out.contains("logs|"), "{out}");
    let (ok, _, err) = weir.psql_c("CREATE STREAM logs (x INT) WITH (connector = 'datagen')");
    assert!(
        !ok && err.contains("42P07") && err.contains("not restored"),
        "the name stays reserved: {err}"
    );
    let (ok, _, err) = weir.psql_c("CREATE STREAM other (x INT) WITH (connector = 'datagen')");
    assert!(ok, "{err}");
    assert!(weir.stop());

    // With the file back, the next start restores it.
    std::fs::write(&input, "{\"k\": 1}\n").expect("write");
    let weir = Weir::start(dir.path(), None);
    let (ok, out, _) = weir.psql_c("SHOW STREAMS");
    assert!(
        ok && out.contains("logs|file") && out.contains("other|datagen"),
        "{out}"
    );
}
