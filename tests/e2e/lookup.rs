//! Lookup joins end to end: 1 M events enriched from file tables with `weir run`, aggregated
//! per region and minute in both spellings (a join inside the windowed query, and Flink's view
//! that joins with a window over the view), LEFT join row and NULL counts, and two lookups in
//! one query, each compared with DuckDB's join + GROUP BY over the same files. Then a
//! reference file replaced while `weir serve` runs.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use crate::harness::{Postgres, Record, Tansu, Weir, duckdb, eventually, produce, weir_run};

const EVENTS: u64 = 1_000_000;
const BASE_MS: i64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z
/// Vehicles 0..10 000 are in the table; events name ids up to 12 000, so one in six misses.
const VEHICLES: u64 = 10_000;
const IDS: u64 = 12_000;
/// Fleets 0..100; the fleets table knows 80 of them.
const FLEETS: u64 = 100;

/// NDJSON `{id, v, ts}`, 1000 events per second of event time, a little out of order.
fn write_events(path: &Path) {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    let mut state: u64 = 11;
    for i in 0..EVENTS {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let ms = BASE_MS + i as i64 - (state >> 40) as i64 % 300;
        let ts = chrono::DateTime::from_timestamp_millis(ms)
            .expect("time")
            .format("%Y-%m-%dT%H:%M:%S%.3fZ");
        let (id, v) = (state % IDS, (state >> 20) % 1000);
        writeln!(out, r#"{{"id":{id},"v":{v},"ts":"{ts}"}}"#).expect("write");
    }
    out.flush().expect("flush");
}

/// `vehicle_id,make,region,fleet_id` and `fleet_id,owner`.
fn write_tables(vehicles: &Path, fleets: &Path) {
    let mut out = std::io::BufWriter::new(std::fs::File::create(vehicles).expect("create"));
    writeln!(out, "vehicle_id,make,region,fleet_id").expect("write");
    let makes = ["volvo", "scania", "man", "daf", "iveco"];
    let regions = ["north", "south", "east", "west"];
    for id in 0..VEHICLES {
        let make = makes[(id * 7 % 5) as usize];
        let region = regions[(id * 13 % 4) as usize];
        writeln!(out, "{id},{make},{region},{}", id % FLEETS).expect("write");
    }
    out.flush().expect("flush");
    let mut out = std::io::BufWriter::new(std::fs::File::create(fleets).expect("create"));
    writeln!(out, "fleet_id,owner").expect("write");
    for fleet in 0..FLEETS * 8 / 10 {
        writeln!(out, "{fleet},owner{}", fleet % 7).expect("write");
    }
    out.flush().expect("flush");
}

/// `(weir-only rows, duckdb-only rows, weir rows)` of `weir` against `expected`.
fn difference(weir: &str, expected: &str) -> (u64, u64, u64) {
    let row = duckdb(&format!(
        "SELECT (SELECT count(*) FROM (SELECT * FROM ({weir}) EXCEPT ALL SELECT * FROM ({expected}))), \
                (SELECT count(*) FROM (SELECT * FROM ({expected}) EXCEPT ALL SELECT * FROM ({weir}))), \
                (SELECT count(*) FROM ({weir}))"
    ));
    let fields: Vec<u64> = row[0]
        .split('\t')
        .map(|f| f.parse().expect("a count"))
        .collect();
    (fields[0], fields[1], fields[2])
}

#[test]
fn enrichment_from_file_tables_equals_duckdbs_join() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (vehicles, fleets) = (
        dir.path().join("vehicles.csv"),
        dir.path().join("fleets.csv"),
    );
    write_tables(&vehicles, &fleets);
    let tables = format!(
        "CREATE TABLE vehicles (vehicle_id BIGINT PRIMARY KEY, make TEXT, region TEXT, fleet_id INT)
           WITH (connector = 'file', path = '{}', format = 'csv');
         CREATE TABLE fleets (fleet_id BIGINT PRIMARY KEY, owner TEXT)
           WITH (connector = 'file', path = '{}');",
        vehicles.display(),
        fleets.display()
    );
    enrichment_equals_duckdbs_join(dir.path(), &tables);
}

/// The same job with the tables in a real PostgreSQL: vehicles looked up per batch through
/// the partial cache, fleets loaded whole (`lookup.cache = 'full'`).
#[test]
fn enrichment_from_postgres_tables_equals_duckdbs_join() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (vehicles, fleets) = (
        dir.path().join("vehicles.csv"),
        dir.path().join("fleets.csv"),
    );
    write_tables(&vehicles, &fleets);
    let postgres = Postgres::start(dir.path());
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let client = postgres.client().await;
        client
            .batch_execute(
                "CREATE TABLE vehicles (vehicle_id bigint PRIMARY KEY, make text, region varchar(16), fleet_id int);
                 CREATE TABLE fleets (fleet_id int PRIMARY KEY, owner text);",
            )
            .await
            .expect("create tables");
        for (table, file) in [("vehicles", &vehicles), ("fleets", &fleets)] {
            let text = std::fs::read_to_string(file).expect("csv");
            let sink = client
                .copy_in(&format!("COPY {table} FROM STDIN (FORMAT csv, HEADER true)"))
                .await
                .expect("copy");
            futures_sink_all(sink, text).await;
        }
    });
    let tables = format!(
        "CREATE TABLE vehicles (vehicle_id BIGINT PRIMARY KEY, make TEXT, region TEXT, fleet_id INT)
           WITH (connector = 'postgres', url = '{url}', table = 'vehicles');
         CREATE TABLE fleets (fleet_id BIGINT PRIMARY KEY, owner TEXT)
           WITH (connector = 'postgres', url = '{url}', query = 'SELECT fleet_id, owner FROM fleets', 'lookup.cache' = 'full');",
        url = postgres.url()
    );
    enrichment_equals_duckdbs_join(dir.path(), &tables);
}

/// The same job with the tables read from topics on tansu (a separate broker process), keyed
/// by the primary key, values as JSON; a vehicle's first value is replaced by a later one,
/// and a fleet that is produced and then deleted (a tombstone) must not be found.
#[test]
fn enrichment_from_kafka_tables_on_tansu_equals_duckdbs_join() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tansu = Tansu::start(dir.path());
    tansu.create_topic("vehicles", 4);
    tansu.create_topic("fleets", 2);
    enrichment_from_kafka_tables(dir.path(), &tansu.bootstrap());
}

/// The same on librdkafka's mock cluster (its brokers listen on 127.0.0.1, so `weir` reaches
/// them from its own process).
#[test]
fn enrichment_from_kafka_tables_on_the_mock_cluster_equals_duckdbs_join() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = rdkafka::mocking::MockCluster::new(1).expect("mock cluster");
    cluster.create_topic("vehicles", 4, 1).expect("topic");
    cluster.create_topic("fleets", 2, 1).expect("topic");
    enrichment_from_kafka_tables(dir.path(), &cluster.bootstrap_servers());
}

/// The tables as keyed topics at `bootstrap` (topics `vehicles` and `fleets` exist), then the
/// job.
fn enrichment_from_kafka_tables(dir: &Path, bootstrap: &str) {
    let (vehicles, fleets) = (dir.join("vehicles.csv"), dir.join("fleets.csv"));
    write_tables(&vehicles, &fleets);
    let csv = |path: &Path| -> Vec<Vec<String>> {
        std::fs::read_to_string(path)
            .expect("csv")
            .lines()
            .skip(1)
            .map(|l| l.split(',').map(str::to_string).collect())
            .collect()
    };
    let mut records = Vec::new();
    for row in csv(&vehicles) {
        // A stale value first: the table must end up with the later one.
        records.push(Record {
            key: Some(row[0].clone()),
            payload: r#"{"make":"stale","region":"stale","fleet_id":0}"#.to_string(),
            ..Record::default()
        });
        records.push(Record {
            key: Some(row[0].clone()),
            payload: format!(
                r#"{{"make":"{}","region":"{}","fleet_id":{}}}"#,
                row[1], row[2], row[3]
            ),
            ..Record::default()
        });
    }
    produce(bootstrap, "vehicles", records);
    let mut records: Vec<Record> = csv(&fleets)
        .into_iter()
        .map(|row| Record {
            key: Some(format!(r#"{{"fleet_id":{}}}"#, row[0])),
            payload: format!(r#"{{"owner":"{}"}}"#, row[1]),
            ..Record::default()
        })
        .collect();
    // Fleet 99 (not in the CSV) is produced and then deleted.
    records.push(Record {
        key: Some(r#"{"fleet_id":99}"#.to_string()),
        payload: r#"{"owner":"gone"}"#.to_string(),
        ..Record::default()
    });
    produce(bootstrap, "fleets", records);
    produce_tombstone(bootstrap, "fleets", r#"{"fleet_id":99}"#);
    let tables = format!(
        "CREATE TABLE vehicles (vehicle_id BIGINT PRIMARY KEY, make TEXT, region TEXT, fleet_id INT)
           WITH (connector = 'kafka', topic = 'vehicles', 'bootstrap.servers' = '{b}');
         CREATE TABLE fleets (fleet_id BIGINT PRIMARY KEY, owner TEXT)
           WITH (connector = 'kafka', topic = 'fleets', 'bootstrap.servers' = '{b}');",
        b = bootstrap
    );
    enrichment_equals_duckdbs_join(dir, &tables);
}

/// A record with `key` and no value.
fn produce_tombstone(bootstrap: &str, topic: &str, key: &str) {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let producer: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("producer");
    producer
        .send(BaseRecord::<str, str>::to(topic).key(key))
        .expect("tombstone");
    producer.flush(Duration::from_secs(30)).expect("flush");
}

/// Writes `text` into a `COPY ... FROM STDIN`.
async fn futures_sink_all(sink: tokio_postgres::CopyInSink<bytes::Bytes>, text: String) {
    use futures::SinkExt;
    let mut sink = Box::pin(sink);
    sink.send(bytes::Bytes::from(text))
        .await
        .expect("copy data");
    sink.as_mut().finish().await.expect("copy done");
}

/// Runs the enrichment job over tables `vehicles` and `fleets` (created by `tables`, with the
/// data of [`write_tables`] in `dir`) and compares every sink with DuckDB's answer.
fn enrichment_equals_duckdbs_join(dir: &Path, tables: &str) {
    let (events, vehicles, fleets) = (
        dir.join("events.ndjson"),
        dir.join("vehicles.csv"),
        dir.join("fleets.csv"),
    );
    write_events(&events);
    let lake = dir.join("lake");
    let parquet = |name: &str| {
        format!(
            "WITH (connector = 'parquet', path = '{}/{name}', 'rollover.interval' = '1s')",
            lake.display()
        )
    };
    let job = dir.join("job.sql");
    std::fs::write(
        &job,
        format!(
            "CREATE STREAM ev (id BIGINT NOT NULL, v BIGINT, ts TIMESTAMP(3) NOT NULL, WATERMARK FOR ts AS ts - INTERVAL '1' SECOND)
               WITH (connector = 'file', path = '{events}', format = 'json');
             {tables}
             -- The join inside the windowed query (sql.md's spelling).
             CREATE SINK by_region {by_region} AS
               SELECT window_start, v.region, count(*) AS n, sum(e.v) AS s
               FROM TUMBLE(ev, ts, INTERVAL '1' MINUTE) AS e JOIN vehicles v ON e.id = v.vehicle_id
               GROUP BY window_start, window_end, v.region;
             -- Flink's: a view that enriches, a window over the view.
             CREATE VIEW enriched AS
               SELECT e.ts, e.v, v.region, v.make FROM ev e JOIN vehicles FOR SYSTEM_TIME AS OF e.ts AS v ON e.id = v.vehicle_id;
             CREATE SINK by_make {by_make} AS
               SELECT window_start, region, make, count(*) AS n, max(v) AS mx
               FROM TUMBLE(enriched, ts, INTERVAL '1' MINUTE)
               GROUP BY window_start, window_end, region, make;
             -- LEFT keeps every event.
             CREATE SINK left_rows {left_rows} AS
               SELECT e.id, e.v, v.region FROM ev e LEFT JOIN vehicles v ON e.id = v.vehicle_id;
             -- Two lookups, the second keyed by what the first found.
             CREATE SINK by_owner {by_owner} AS
               SELECT window_start, f.owner, count(*) AS n
               FROM TUMBLE(ev, ts, INTERVAL '1' MINUTE) AS e
               JOIN vehicles v ON e.id = v.vehicle_id
               JOIN fleets f ON f.fleet_id = v.fleet_id
               GROUP BY window_start, window_end, f.owner;",
            events = events.display(),
            by_region = parquet("by_region"),
            by_make = parquet("by_make"),
            left_rows = parquet("left_rows"),
            by_owner = parquet("by_owner"),
        ),
    )
    .expect("job");
    weir_run(&job);

    let ev = format!(
        "(SELECT id, v, ts, epoch_ms(ts) // 60000 AS minute FROM read_json('{}', columns = {{id: 'BIGINT', v: 'BIGINT', ts: 'TIMESTAMP'}}))",
        events.display()
    );
    let veh = format!(
        "(SELECT * FROM read_csv('{}', header = true, columns = {{vehicle_id: 'BIGINT', make: 'VARCHAR', region: 'VARCHAR', fleet_id: 'BIGINT'}}))",
        vehicles.display()
    );
    let flt = format!(
        "(SELECT * FROM read_csv('{}', header = true, columns = {{fleet_id: 'BIGINT', owner: 'VARCHAR'}}))",
        fleets.display()
    );
    let lake_rows = |name: &str, columns: &str| {
        format!(
            "SELECT {columns} FROM '{}/{name}/*.parquet'",
            lake.display()
        )
    };
    let window = "make_timestamp(minute * 60000 * 1000)";
    let cases = [
        (
            "by_region",
            lake_rows("by_region", "CAST(window_start AS TIMESTAMP), region, n, s"),
            format!(
                "SELECT {window}, x.region, count(*), sum(e.v) FROM {ev} e JOIN {veh} x ON e.id = x.vehicle_id GROUP BY ALL"
            ),
        ),
        (
            "by_make",
            lake_rows(
                "by_make",
                "CAST(window_start AS TIMESTAMP), region, make, n, mx",
            ),
            format!(
                "SELECT {window}, x.region, x.make, count(*), max(e.v) FROM {ev} e JOIN {veh} x ON e.id = x.vehicle_id GROUP BY ALL"
            ),
        ),
        (
            "left_rows",
            lake_rows("left_rows", "id, v, region"),
            format!(
                "SELECT e.id, e.v, x.region FROM {ev} e LEFT JOIN {veh} x ON e.id = x.vehicle_id"
            ),
        ),
        (
            "by_owner",
            lake_rows("by_owner", "CAST(window_start AS TIMESTAMP), owner, n"),
            format!(
                "SELECT {window}, f.owner, count(*) FROM {ev} e JOIN {veh} x ON e.id = x.vehicle_id JOIN {flt} f ON f.fleet_id = x.fleet_id GROUP BY ALL"
            ),
        ),
    ];
    for (name, weir, expected) in &cases {
        let (weir_only, expected_only, rows) = difference(weir, expected);
        assert!(rows > 0, "{name}: no rows");
        assert_eq!(
            (weir_only, expected_only),
            (0, 0),
            "{name}: every row equals DuckDB's ({rows} rows)"
        );
    }
    // The LEFT join's NULLs are the misses, and there are as many as DuckDB finds.
    let nulls = duckdb(&format!(
        "SELECT (SELECT count(*) FROM '{}/left_rows/*.parquet' WHERE region IS NULL), \
                (SELECT count(*) FROM {ev} e LEFT JOIN {veh} x ON e.id = x.vehicle_id WHERE x.region IS NULL), \
                (SELECT count(*) FROM '{}/left_rows/*.parquet')",
        lake.display(),
        lake.display()
    ));
    let counts: Vec<u64> = nulls[0]
        .split('\t')
        .map(|c| c.parse().expect("count"))
        .collect();
    assert_eq!(counts[0], counts[1], "NULL rows of the LEFT join");
    assert!(
        counts[0] > EVENTS / 10,
        "about one in six events misses: {counts:?}"
    );
    assert_eq!(counts[2], EVENTS, "LEFT keeps every event");
}

/// A reference file replaced mid-run: records that arrive after the reload see the new rows;
/// the metrics count the reload and the misses.
#[test]
fn a_replaced_reference_file_is_used_for_later_records() {
    let dir = tempfile::tempdir().expect("tempdir");
    let events = dir.path().join("events.ndjson");
    let vehicles = dir.path().join("vehicles.csv");
    std::fs::write(&events, "").expect("events");
    let table = |region: &str| {
        let mut text = String::from("vehicle_id,region\n");
        for id in 0..100 {
            text.push_str(&format!("{id},{region}\n"));
        }
        text
    };
    std::fs::write(&vehicles, table("old")).expect("vehicles");
    let weir = Weir::start(dir.path(), None);
    let (ok, out, err) = weir.psql_c(&format!(
        "CREATE STREAM ev (id BIGINT, phase TEXT) WITH (connector = 'file', path = '{}', format = 'json', follow = true, 'follow.interval' = '100ms');
         CREATE TABLE vehicles (vehicle_id BIGINT PRIMARY KEY, region TEXT) WITH (connector = 'file', path = '{}');
         CREATE MATERIALIZED VIEW enriched AS SELECT e.phase, v.region FROM ev e LEFT JOIN vehicles v ON e.id = v.vehicle_id;",
        events.display(),
        vehicles.display()
    ));
    assert!(ok, "{out}{err}\n{}", weir.log_text());
    let append = |phase: &str, ids: std::ops::Range<u64>| {
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&events)
            .expect("open");
        let mut text = String::new();
        for id in ids {
            text.push_str(&format!("{{\"id\":{id},\"phase\":\"{phase}\"}}\n"));
        }
        file.write_all(text.as_bytes()).expect("append");
    };
    let counts = |weir: &Weir| -> Vec<String> {
        let (ok, out, err) = weir.psql_c(
            "SELECT phase, coalesce(region, 'NULL'), count(*) FROM enriched GROUP BY 1, 2 ORDER BY 1, 2",
        );
        assert!(ok, "{err}");
        out.lines()
            .filter(|l| l.contains('|'))
            .skip(1)
            .map(str::to_string)
            .collect()
    };
    append("before", 0..150);
    let seen = eventually(Duration::from_secs(30), || {
        let c = counts(&weir);
        (c == ["before|NULL|50", "before|old|100"]).then_some(())
    });
    assert!(seen.is_some(), "{:?}\n{}", counts(&weir), weir.log_text());

    // Replace the file as a writer should: write beside it, rename over it.
    let next = dir.path().join("vehicles.next");
    std::fs::write(&next, table("new")).expect("write");
    std::fs::rename(&next, &vehicles).expect("rename");
    let reloaded = eventually(Duration::from_secs(30), || {
        let metrics = weir.http_get("/metrics");
        metrics
            .lines()
            .any(|l| {
                l.starts_with("weir_lookup_table_reloads_total{")
                    && l.contains("result=\"ok\"")
                    && l.ends_with(" 2")
            })
            .then_some(metrics)
    });
    let metrics = reloaded.unwrap_or_else(|| panic!("no reload\n{}", weir.log_text()));
    assert!(
        metrics.contains("weir_lookup_misses_total{pipeline=\"enriched\",table=\"vehicles\"} 50"),
        "{metrics}"
    );
    append("after", 0..150);
    let seen = eventually(Duration::from_secs(30), || {
        let c = counts(&weir);
        (c == [
            "after|NULL|50",
            "after|new|100",
            "before|NULL|50",
            "before|old|100",
        ])
        .then_some(())
    });
    assert!(seen.is_some(), "{:?}\n{}", counts(&weir), weir.log_text());
}

/// Postgres stopped for 20 s while records that need it arrive, then started again: the
/// lookups retry (counted), the pipeline waits, and every record arrives enriched.
#[test]
fn a_postgres_outage_delays_lookups_and_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut postgres = Postgres::start(dir.path());
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let client = postgres.client().await;
        client
            .batch_execute(
                "CREATE TABLE vehicles (vehicle_id bigint PRIMARY KEY, region text);
                 INSERT INTO vehicles SELECT i, 'r' || (i % 3) FROM generate_series(0, 999) AS i;",
            )
            .await
            .expect("table");
    });
    let events = dir.path().join("events.ndjson");
    std::fs::write(&events, "").expect("events");
    let weir = Weir::start(dir.path(), None);
    let (ok, out, err) = weir.psql_c(&format!(
        "CREATE STREAM ev (id BIGINT) WITH (connector = 'file', path = '{}', format = 'json', follow = true, 'follow.interval' = '100ms');
         CREATE TABLE vehicles (vehicle_id BIGINT PRIMARY KEY, region TEXT) WITH (connector = 'postgres', url = '{}', table = 'vehicles', 'connect.timeout' = '2s');
         CREATE MATERIALIZED VIEW enriched AS SELECT e.id, v.region FROM ev e JOIN vehicles v ON e.id = v.vehicle_id;",
        events.display(),
        postgres.url()
    ));
    assert!(ok, "{out}{err}\n{}", weir.log_text());
    // A mistake in the user's query is the CREATE's error, with Postgres' own words.
    let (ok, _, err) = weir.psql_c(&format!(
        "CREATE TABLE bad (vehicle_id BIGINT PRIMARY KEY, region TEXT) WITH (connector = 'postgres', url = '{}', query = 'SELECT vehicle_id, region FROM nowhere')",
        postgres.url()
    ));
    assert!(
        !ok && err.contains("\"nowhere\" does not exist") && err.contains("42P01"),
        "{err}"
    );
    let append = |ids: std::ops::Range<u64>| {
        let mut text = String::new();
        for id in ids {
            text.push_str(&format!("{{\"id\":{id}}}\n"));
        }
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&events)
            .expect("open");
        file.write_all(text.as_bytes()).expect("append");
    };
    let rows = |weir: &Weir| -> Option<(u64, u64)> {
        let (ok, out, _) = weir
            .psql_c("SELECT count(*), count(DISTINCT id) FROM enriched WHERE region IS NOT NULL");
        let line = out.lines().nth(1)?;
        let (n, d) = line.split_once('|')?;
        ok.then(|| Some((n.parse().ok()?, d.parse().ok()?)))?
    };
    let metric = |weir: &Weir, name: &str| -> u64 {
        weir.http_get("/metrics")
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    append(0..300);
    let first = eventually(Duration::from_secs(30), || {
        (rows(&weir)? == (300, 300)).then_some(())
    });
    assert!(first.is_some(), "{:?}\n{}", rows(&weir), weir.log_text());

    postgres.stop();
    // Keys not seen before: they must go to Postgres, which is down.
    append(300..700);
    let retried = eventually(Duration::from_secs(30), || {
        (metric(&weir, "weir_lookup_table_retries_total{table=\"vehicles\"}") >= 2).then_some(())
    });
    assert!(
        retried.is_some(),
        "lookups retry while Postgres is down\n{}",
        weir.log_text()
    );
    std::thread::sleep(Duration::from_secs(20));
    assert_eq!(
        rows(&weir),
        Some((300, 300)),
        "nothing new while Postgres is down"
    );
    postgres.restart();
    let all = eventually(Duration::from_secs(60), || {
        (rows(&weir)? == (700, 700)).then_some(())
    });
    assert!(all.is_some(), "{:?}\n{}", rows(&weir), weir.log_text());
    assert_eq!(
        metric(&weir, "weir_lookup_misses_total{pipeline=\"enriched\""),
        0,
        "no record was dropped as a miss"
    );
    assert!(metric(&weir, "weir_lookup_table_retries_total{table=\"vehicles\"}") >= 2);
}
