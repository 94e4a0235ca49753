//! Arrow → Postgres type mapping, in both wire formats (binary for tokio-postgres' typed
//! reads, text for the simple protocol and psql).

use std::time::Duration;

use chrono::{NaiveDate, NaiveDateTime};
use tokio_postgres::SimpleQueryMessage;

use crate::harness::Weir;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_column_type_reaches_clients_in_both_formats() {
    let dir = tempfile::tempdir().expect("tempdir");
    let weir = Weir::start(dir.path(), None);
    let client = weir.client().await;
    client
        .batch_execute(
            "CREATE STREAM t (flag BOOLEAN, i2 SMALLINT, i4 INT, i8 BIGINT, f4 REAL, f8 DOUBLE, s TEXT, d DATE, \
               ts TIMESTAMP(3), amount DECIMAL(10, 2)) \
             WITH (connector = 'datagen', rows_per_second = 0, max_rows = 10, start_time = '2026-05-04T03:02:01.250Z'); \
             CREATE MATERIALIZED VIEW tv AS SELECT * FROM t",
        )
        .await
        .expect("create");
    let mut rows = Vec::new();
    for _ in 0..100 {
        rows = client
            .query("SELECT * FROM tv ORDER BY ts", &[])
            .await
            .expect("typed query");
        if rows.len() == 10 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(rows.len(), 10);
    let first = &rows[0];
    let _: bool = first.get("flag");
    let i2: i16 = first.get("i2");
    let i4: i32 = first.get("i4");
    let i8: i64 = first.get("i8");
    assert!((0..100).contains(&i2) && (0..100).contains(&i4) && (0..100).contains(&i8));
    let f4: f32 = first.get("f4");
    let f8: f64 = first.get("f8");
    assert!((0.0..1000.0).contains(&f4) && (0.0..1000.0).contains(&f8));
    let s: String = first.get("s");
    assert_eq!(s.len(), 8);
    let d: NaiveDate = first.get("d");
    assert_eq!(d, NaiveDate::from_ymd_opt(2026, 5, 4).expect("date"));
    let ts: NaiveDateTime = first.get("ts");
    assert_eq!(ts.to_string(), "2026-05-04 03:02:01.250");
    let last: NaiveDateTime = rows[9].get("ts");
    assert_eq!(
        (last - ts).num_milliseconds(),
        9,
        "unpaced datagen rows are 1 ms apart"
    );

    // The text format, as psql shows it.
    let messages = client
        .simple_query("SELECT ts, d, amount, flag FROM tv ORDER BY ts LIMIT 1")
        .await
        .expect("simple");
    let row = messages
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .expect("a row");
    // arrow-pg prints microseconds (".250000" where Postgres trims to ".25"); clients parse both.
    let text_ts = NaiveDateTime::parse_from_str(row.get(0).expect("ts"), "%Y-%m-%d %H:%M:%S%.f")
        .expect("ts parses");
    assert_eq!(text_ts, ts);
    assert_eq!(row.get(1), Some("2026-05-04"));
    let amount = row.get(2).expect("amount");
    assert!(
        amount
            .split_once('.')
            .is_some_and(|(_, cents)| cents.len() == 2),
        "DECIMAL(10, 2) text: {amount}"
    );
    assert!(matches!(row.get(3), Some("t" | "f")), "{:?}", row.get(3));
}
