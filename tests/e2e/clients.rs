//! The clients people use, each as it talks to Postgres: psql (its `\d` family and its tab
//! completion), psycopg 3 (simple and extended protocol), node-postgres and JDBC, next to
//! tokio-postgres. Every client runs the same queries: a live tail over a Kafka stream and
//! over a datagen stream, a parameterized SELECT on a materialized view, the catalog queries
//! that `\d`-style browsing sends, and one error. Each must return the right rows and types.
//!
//! The client programs live in `tests/clients/` and print one format (see [`parse`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::harness::{
    ADMIN_PASSWORD, Record, Tansu, Weir, duckdb_python, eventually, produce, repo_root,
};

/// 2026-01-01T00:00:00Z in milliseconds: event times of the Kafka records and the file.
const BASE_MS: i64 = 1_767_225_600_000;

/// An event time as the records write it: RFC 3339.
fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .expect("in range")
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// (name, Postgres type name, the client's native type of the first value).
type Column = (String, String, String);

/// One query's result as a client printed it.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    Rows {
        columns: Vec<Column>,
        rows: Vec<Vec<String>>,
    },
    Error {
        sqlstate: String,
        message: String,
    },
}

impl Outcome {
    fn rows(&self, what: &str) -> &[Vec<String>] {
        match self {
            Outcome::Rows { rows, .. } => rows,
            Outcome::Error { sqlstate, message } => {
                panic!("{what}: error {sqlstate}: {message}")
            }
        }
    }

    /// (name, type) of each column.
    fn types(&self, what: &str) -> Vec<(String, String)> {
        match self {
            Outcome::Rows { columns, .. } => columns
                .iter()
                .map(|(n, t, _)| (n.clone(), t.clone()))
                .collect(),
            Outcome::Error { sqlstate, message } => {
                panic!("{what}: error {sqlstate}: {message}")
            }
        }
    }

    fn natives(&self, what: &str) -> Vec<String> {
        match self {
            Outcome::Rows { columns, .. } => columns.iter().map(|(_, _, n)| n.clone()).collect(),
            Outcome::Error { sqlstate, message } => {
                panic!("{what}: error {sqlstate}: {message}")
            }
        }
    }
}

/// Parses what a client printed:
///
/// ```text
/// columns <TAB> name:pg_type:native ...
/// row <TAB> value ...          (timestamps as epoch milliseconds, NULL as NULL)
/// end                          (or: error <TAB> SQLSTATE <TAB> message)
/// ```
fn parse(out: &str) -> Vec<Outcome> {
    let mut outcomes = Vec::new();
    let mut current: Option<(Vec<Column>, Vec<Vec<String>>)> = None;
    for line in out.lines() {
        let mut fields = line.split('\t');
        match fields.next() {
            Some("columns") => {
                let columns = fields
                    .map(|c| {
                        let mut parts = c.splitn(3, ':');
                        let mut next = || parts.next().unwrap_or_default().to_string();
                        (next(), next(), next())
                    })
                    .collect();
                current = Some((columns, Vec::new()));
            }
            Some("row") => {
                let (_, rows) = current.as_mut().expect("a row after its columns");
                rows.push(fields.map(str::to_string).collect());
            }
            Some("end") => {
                let (columns, rows) = current.take().expect("an end after its columns");
                outcomes.push(Outcome::Rows { columns, rows });
            }
            Some("error") => outcomes.push(Outcome::Error {
                sqlstate: fields.next().unwrap_or_default().to_string(),
                message: fields.collect::<Vec<_>>().join(" "),
            }),
            _ => {}
        }
    }
    outcomes
}

/// A query as the client programs take it: SQL, then typed parameters, joined by U+001F.
fn query(sql: &str, params: &[&str]) -> String {
    std::iter::once(sql)
        .chain(params.iter().copied())
        .collect::<Vec<_>>()
        .join("\u{1f}")
}

const KAFKA_TAIL: &str = "SELECT k, temp, site, ts FROM readings LIMIT 3";
const KAFKA_TAIL_PARAM: &str = "SELECT k, site FROM readings WHERE site = $1 LIMIT 2";
const DATAGEN_TAIL: &str = "SELECT vehicle_id, speed_kmh, status, ts FROM vehicles LIMIT 3";
const VIEW_PARAM: &str = "SELECT window_start, site, n, total FROM per_minute \
     WHERE n >= $1 AND site <> $2 ORDER BY window_start, site";
const RELATIONS: &str = "SELECT c.relname, c.relkind FROM pg_catalog.pg_class c \
     JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 ORDER BY 1";
const COLUMNS: &str = "SELECT a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod) AS type, \
     a.attnotnull FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_class c ON c.oid = a.attrelid \
     WHERE c.relname = $1 AND a.attnum > 0 ORDER BY a.attnum";
const UNKNOWN_COLUMN: &str = "SELECT nope FROM per_minute";

/// The queries every client runs, in order.
fn queries() -> Vec<String> {
    vec![
        query(KAFKA_TAIL, &[]),
        query(KAFKA_TAIL_PARAM, &["text:s1"]),
        query(DATAGEN_TAIL, &[]),
        query(VIEW_PARAM, &["int:2", "text:s0"]),
        query(RELATIONS, &["text:public"]),
        query(COLUMNS, &["text:per_minute"]),
        query(UNKNOWN_COLUMN, &[]),
    ]
}

/// The visits file behind the view: in minute m, site s{j} has (m + j) % 3 + 1 visits, the
/// i-th with v = 10 m + j + i.
fn visits() -> Vec<(i64, String, i64, i64)> {
    let mut visits = Vec::new();
    for m in 0..3i64 {
        for j in 0..3i64 {
            for i in 0..((m + j) % 3 + 1) {
                let ts = BASE_MS + m * 60_000 + (j * 5 + i) * 1000;
                visits.push((m, format!("s{j}"), 10 * m + j + i, ts));
            }
        }
    }
    visits
}

/// The view's rows for VIEW_PARAM with n >= 2 and site <> 's0': (window_start ms, site, n,
/// total), ordered.
fn expected_view_rows() -> Vec<Vec<String>> {
    let mut groups: BTreeMap<(i64, String), (i64, i64)> = BTreeMap::new();
    for (m, site, v, _) in visits() {
        let g = groups.entry((BASE_MS + m * 60_000, site)).or_default();
        g.0 += 1;
        g.1 += v;
    }
    groups
        .into_iter()
        .filter(|((_, site), (n, _))| *n >= 2 && site != "s0")
        .map(|((start, site), (n, total))| {
            vec![start.to_string(), site, n.to_string(), total.to_string()]
        })
        .collect()
}

struct Setup {
    weir: Weir,
    _tansu: Tansu,
    producing: Arc<AtomicBool>,
    producer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.producing.store(false, Ordering::Relaxed);
        if let Some(producer) = self.producer.take() {
            let _ = producer.join();
        }
    }
}

/// A Kafka topic written to all along (record k: temp k + 0.25, site s{k % 3}, event time
/// BASE + k s), the streams over it, over datagen and over the visits file, and the view.
async fn setup(dir: &Path) -> Setup {
    let tansu = Tansu::start(dir);
    tansu.create_topic("readings", 1);
    let producing = Arc::new(AtomicBool::new(true));
    let producer = {
        let (bootstrap, producing) = (tansu.bootstrap(), producing.clone());
        std::thread::spawn(move || {
            let mut k = 0i64;
            while producing.load(Ordering::Relaxed) {
                produce(
                    &bootstrap,
                    "readings",
                    (k..k + 5).map(|k| Record {
                        payload: format!(
                            r#"{{"k":{k},"temp":{},"site":"s{}","ts":"{}"}}"#,
                            k as f64 + 0.25,
                            k % 3,
                            rfc3339(BASE_MS + k * 1000)
                        ),
                        ..Record::default()
                    }),
                );
                k += 5;
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let file: String = visits()
        .into_iter()
        .map(|(_, site, v, ts)| {
            format!(
                "{{\"site\":\"{site}\",\"v\":{v},\"ts\":\"{}\"}}\n",
                rfc3339(ts)
            )
        })
        .collect();
    std::fs::write(dir.join("visits.ndjson"), file).expect("write visits");

    let weir = Weir::start(dir, None);
    let client = weir.client().await;
    client
        .batch_execute(&format!(
            "CREATE STREAM readings (k BIGINT, temp DOUBLE, site TEXT, ts TIMESTAMP) \
               WITH (connector = 'kafka', topic = 'readings', 'bootstrap.servers' = '{}');
             CREATE STREAM vehicles (vehicle_id BIGINT, speed_kmh DOUBLE, status TEXT, ts TIMESTAMP) \
               WITH (connector = 'datagen', rows_per_second = 100, seed = 7, start_time = '2026-01-01T00:00:00Z');
             CREATE STREAM visits (site TEXT, v BIGINT, ts TIMESTAMP, WATERMARK FOR ts AS ts - INTERVAL '1' SECOND) \
               WITH (connector = 'file', path = 'visits.ndjson');
             CREATE MATERIALIZED VIEW per_minute AS \
               SELECT window_start, site, count(*) AS n, sum(v) AS total \
               FROM TUMBLE(visits, ts, INTERVAL '1' MINUTE) GROUP BY window_start, window_end, site",
            tansu.bootstrap()
        ))
        .await
        .unwrap_or_else(|e| panic!("setup: {e:?}\n{}", weir.log_text()));
    // Every window of the bounded file is closed once it has been read.
    let groups = 9;
    let all = eventually(Duration::from_secs(60), || {
        let out = weir.psql(&["-At", "-c", "SELECT count(*) FROM per_minute"]);
        (String::from_utf8_lossy(&out.stdout).trim() == groups.to_string()).then_some(())
    });
    assert!(
        all.is_some(),
        "the view holds every window\n{}",
        weir.log_text()
    );
    Setup {
        weir,
        _tansu: tansu,
        producing,
        producer: Some(producer),
    }
}

fn clients_dir() -> PathBuf {
    repo_root().join("tests/clients")
}

/// Runs a client program; its parsed output, one outcome per query.
fn run_client(name: &str, command: &mut Command) -> Vec<Outcome> {
    let out = command
        .env("TZ", "UTC")
        .output()
        .unwrap_or_else(|e| panic!("{name} runs: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{name} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse(&stdout)
}

fn psycopg(weir: &Weir, protocol: &str) -> Vec<Outcome> {
    run_client(
        &format!("psycopg ({protocol})"),
        Command::new(duckdb_python())
            .arg(clients_dir().join("psycopg_client.py"))
            .arg(weir.conn_string())
            .arg(protocol)
            .args(queries()),
    )
}

fn node_postgres(weir: &Weir) -> Vec<Outcome> {
    let module = repo_root().join(".tools/node/node_modules/pg");
    assert!(
        module.exists(),
        "{} not found: run scripts/install-test-deps.sh",
        module.display()
    );
    run_client(
        "node-postgres",
        Command::new("node")
            .arg(clients_dir().join("pg_client.js"))
            .arg(module)
            .args([
                "127.0.0.1",
                &weir.pg_port.to_string(),
                "weir",
                ADMIN_PASSWORD,
            ])
            .args(queries()),
    )
}

fn jdbc(weir: &Weir, extra: &[&str]) -> Vec<Outcome> {
    // Java 11+ compiles a single source file and runs it (JEP 330).
    run_client(
        "JDBC",
        Command::new("java")
            .arg("-Duser.timezone=UTC")
            .args(["-cp", "/usr/share/java/postgresql.jar"])
            .arg(clients_dir().join("JdbcClient.java"))
            .arg(format!(
                "jdbc:postgresql://127.0.0.1:{}/weir?user=weir&password={ADMIN_PASSWORD}",
                weir.pg_port
            ))
            .args(queries())
            .args(extra),
    )
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
    items
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

/// Kafka tail rows (k, temp, site, ts): each a record as produced, consecutive offsets.
fn check_kafka_tail(client: &str, rows: &[Vec<String>]) {
    assert_eq!(rows.len(), 3, "{client}: {rows:?}");
    let ks: Vec<i64> = rows
        .iter()
        .map(|r| r[0].parse().expect("k is an integer"))
        .collect();
    for (row, k) in rows.iter().zip(&ks) {
        let temp: f64 = row[1].parse().expect("temp is a number");
        assert_eq!(temp, *k as f64 + 0.25, "{client}: {row:?}");
        assert_eq!(row[2], format!("s{}", k % 3), "{client}: {row:?}");
        assert_eq!(
            row[3],
            (BASE_MS + k * 1000).to_string(),
            "{client}: {row:?}"
        );
    }
    assert!(
        ks.windows(2).all(|w| w[1] == w[0] + 1),
        "{client}: the next records in order: {ks:?}"
    );
}

/// What every client must return, given its native types for int8, float8, text and
/// timestamp and how it prints a boolean.
fn check_client(
    client: &str,
    got: &[Outcome],
    natives: [&str; 4],
    datagen_reference: &[Vec<String>],
    truth: (&str, &str),
) {
    assert_eq!(got.len(), queries().len(), "{client}: {got:?}");
    let [int8, float8, text, timestamp] = natives;

    // The Kafka tail: the next records, with their types.
    assert_eq!(
        got[0].types(client),
        pairs(&[
            ("k", "int8"),
            ("temp", "float8"),
            ("site", "text"),
            ("ts", "timestamp")
        ]),
        "{client}"
    );
    assert_eq!(
        got[0].natives(client),
        strings(&[int8, float8, text, timestamp]),
        "{client}"
    );
    check_kafka_tail(client, got[0].rows(client));

    // The Kafka tail with a parameter.
    let rows = got[1].rows(client);
    assert_eq!(rows.len(), 2, "{client}: {rows:?}");
    for row in rows {
        let k: i64 = row[0].parse().expect("k");
        assert_eq!((k % 3, row[1].as_str()), (1, "s1"), "{client}: {row:?}");
    }

    // The datagen tail: the stream's sequence from its first row, as every client sees it.
    assert_eq!(
        got[2].types(client),
        pairs(&[
            ("vehicle_id", "int8"),
            ("speed_kmh", "float8"),
            ("status", "text"),
            ("ts", "timestamp")
        ]),
        "{client}"
    );
    let rows = got[2].rows(client);
    assert_eq!(rows, datagen_reference, "{client}");

    // The view, with two parameters.
    assert_eq!(
        got[3].types(client),
        pairs(&[
            ("window_start", "timestamp"),
            ("site", "text"),
            ("n", "int8"),
            ("total", "int8")
        ]),
        "{client}"
    );
    assert_eq!(
        got[3].natives(client),
        strings(&[timestamp, text, int8, int8]),
        "{client}"
    );
    assert_eq!(got[3].rows(client), expected_view_rows(), "{client}");

    // The catalog, as `\d` browses it.
    let relations = got[4].rows(client);
    assert_eq!(
        relations,
        [
            ["per_minute", "v"],
            ["readings", "r"],
            ["vehicles", "r"],
            ["visits", "r"]
        ]
        .map(|r| strings(&r)),
        "{client}"
    );
    let (t, f) = truth;
    assert_eq!(
        got[5].rows(client),
        [
            ["window_start", "timestamp without time zone", f],
            ["site", "text", f],
            ["n", "bigint", t],
            ["total", "bigint", f],
        ]
        .map(|r| strings(&r)),
        "{client}"
    );

    // An error carries its SQLSTATE to every client.
    match &got[6] {
        Outcome::Error { sqlstate, message } => {
            assert_eq!(sqlstate, "42703", "{client}: {message}");
            assert!(message.contains("nope"), "{client}: {message}");
        }
        other => panic!("{client}: an unknown column is an error, not {other:?}"),
    }
}

/// The datagen tail's rows as the reference reader (tokio-postgres) gets them, in the
/// clients' format, checked for plausibility.
async fn datagen_reference(client: &tokio_postgres::Client) -> Vec<Vec<String>> {
    let rows = client
        .query(DATAGEN_TAIL, &[])
        .await
        .expect("the datagen tail through the extended protocol");
    let reference: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let ts: chrono::NaiveDateTime = r.get(3);
            let speed: f64 = r.get(1);
            assert!((0.0..=180.0).contains(&speed), "{speed}");
            let status: String = r.get(2);
            assert!(["driving", "idle", "parked"].contains(&status.as_str()));
            vec![
                r.get::<_, i64>(0).to_string(),
                speed.to_string(),
                status,
                ts.and_utc().timestamp_millis().to_string(),
            ]
        })
        .collect();
    assert_eq!(reference.len(), 3);
    reference
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_node_postgres_and_jdbc_tail_streams_bind_parameters_and_read_the_catalog() {
    let dir = tempfile::tempdir().expect("tempdir");
    let setup = setup(dir.path()).await;
    let weir = &setup.weir;

    // tokio-postgres: the extended protocol announces the tail's own columns (not the
    // stream's hidden ones) and sends rows of that width.
    let client = weir.client().await;
    let rows = client
        .query(KAFKA_TAIL, &[])
        .await
        .unwrap_or_else(|e| panic!("a Kafka tail through the extended protocol: {e:?}"));
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let ts: chrono::NaiveDateTime = r.get(3);
            vec![
                r.get::<_, i64>(0).to_string(),
                r.get::<_, f64>(1).to_string(),
                r.get(2),
                ts.and_utc().timestamp_millis().to_string(),
            ]
        })
        .collect();
    check_kafka_tail("tokio-postgres", &rows);
    let statement = client.prepare(VIEW_PARAM).await.expect("prepare on a view");
    let rows = client
        .query(&statement, &[&2i64, &"s0"])
        .await
        .expect("a prepared statement on a view, run");
    assert_eq!(rows.len(), expected_view_rows().len());
    let reference = datagen_reference(&client).await;

    let truth = ("True", "False");
    check_client(
        "psycopg (simple)",
        &psycopg(weir, "simple"),
        ["int", "float", "str", "datetime"],
        &reference,
        truth,
    );
    check_client(
        "psycopg (extended)",
        &psycopg(weir, "extended"),
        ["int", "float", "str", "datetime"],
        &reference,
        truth,
    );
    check_client(
        "node-postgres",
        &node_postgres(weir),
        // pg returns int8 as a string: a JavaScript number cannot hold every int8.
        ["string", "number", "string", "Date"],
        &reference,
        ("true", "false"),
    );
    let got = jdbc(weir, &["@tables", "@columns:per_minute"]);
    check_client(
        "JDBC",
        &got[..queries().len()],
        ["Long", "Double", "String", "Timestamp"],
        &reference,
        ("true", "false"),
    );
    // DatabaseMetaData, which JDBC tools (DBeaver, IntelliJ) browse with.
    let n = queries().len();
    assert_eq!(
        got[n].rows("getTables"),
        // Ordered by type, then name, as the JDBC specification asks.
        [
            ["readings", "TABLE"],
            ["vehicles", "TABLE"],
            ["visits", "TABLE"],
            ["per_minute", "VIEW"]
        ]
        .map(|r| strings(&r))
    );
    assert_eq!(
        got[n + 1].rows("getColumns"),
        [
            // java.sql.Types: TIMESTAMP 93, VARCHAR 12, BIGINT -5; NULLABLE 0 = no nulls.
            ["window_start", "timestamp", "93", "1"],
            ["site", "text", "12", "1"],
            ["n", "int8", "-5", "0"],
            ["total", "int8", "-5", "1"],
        ]
        .map(|r| strings(&r))
    );
}

/// psql: its `\d` family, a tail over each stream, and the queries behind its tab completion
/// (driven through a terminal, as a user presses Tab).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_describes_tails_and_tab_completes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let setup = setup(dir.path()).await;
    let weir = &setup.weir;
    let psql = |args: &[&str]| {
        let out = weir.psql(args);
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "psql {args:?}:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };

    let listing = psql(&["-At", "-c", "\\d"]);
    assert_eq!(
        listing
            .lines()
            .map(|l| l.split('|').take(3).collect::<Vec<_>>().join("|"))
            .collect::<Vec<_>>(),
        [
            "public|per_minute|view",
            "public|readings|table",
            "public|vehicles|table",
            "public|visits|table"
        ]
    );
    let tables = psql(&["-At", "-c", "\\dt"]);
    assert!(
        tables.contains("|readings|table|") && !tables.contains("per_minute"),
        "{tables}"
    );
    let views = psql(&["-At", "-c", "\\dv"]);
    assert!(
        views.contains("|per_minute|view|") && !views.contains("readings"),
        "{views}"
    );
    let described = psql(&["-c", "\\d per_minute"]);
    for line in [
        "View \"public.per_minute\"",
        "window_start | timestamp without time zone",
        "site         | text",
        "n            | bigint                      |           | not null |",
        "total        | bigint",
    ] {
        assert!(described.contains(line), "{line:?} in:\n{described}");
    }
    let described = psql(&["-c", "\\d readings"]);
    assert!(
        described.contains("Table \"public.readings\"")
            && described.contains("temp       | double precision"),
        "{described}"
    );
    let databases = psql(&["-At", "-c", "\\l"]);
    assert!(
        databases.lines().any(|l| l.starts_with("weir|")),
        "{databases}"
    );
    let roles = psql(&["-At", "-c", "\\du"]);
    assert!(roles.contains("weir|Superuser"), "{roles}");

    // Tails, in psql's unaligned output: `k|temp|site|ts`.
    let tail = psql(&["-At", "-c", KAFKA_TAIL]);
    let rows: Vec<Vec<String>> = tail
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split('|').collect();
            let ts = chrono::NaiveDateTime::parse_from_str(f[3], "%Y-%m-%d %H:%M:%S%.f")
                .unwrap_or_else(|e| panic!("{l}: {e}"));
            vec![
                f[0].to_string(),
                f[1].to_string(),
                f[2].to_string(),
                ts.and_utc().timestamp_millis().to_string(),
            ]
        })
        .collect();
    check_kafka_tail("psql", &rows);
    let client = weir.client().await;
    let reference = datagen_reference(&client).await;
    let tail = psql(&["-At", "-c", DATAGEN_TAIL]);
    let first_three: Vec<Vec<String>> = tail
        .lines()
        .map(|l| l.split('|').take(3).map(str::to_string).collect())
        .collect();
    let expected: Vec<Vec<String>> = reference.iter().map(|r| r[..3].to_vec()).collect();
    assert_eq!(first_three, expected);

    // Tab completion: psql asks the catalog for names as the user presses Tab.
    let out = Command::new(duckdb_python())
        .arg(clients_dir().join("psql_tab.py"))
        .arg(format!(
            "host=127.0.0.1 port={} user=weir password={ADMIN_PASSWORD} dbname=weir",
            weir.pg_port
        ))
        .args([
            "SELECT * FROM per_m\t",
            "SELECT * FROM per_minute WHERE to\t",
            "\\d vis\t",
            "SELECT * FROM \t\t",
        ])
        .output()
        .expect("python runs");
    let completed = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{completed}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = completed.lines().collect();
    assert_eq!(lines.len(), 4, "{completed}");
    assert!(
        lines[0].contains("SELECT * FROM per_minute "),
        "{}",
        lines[0]
    );
    assert!(lines[1].contains("WHERE total "), "{}", lines[1]);
    assert!(lines[2].contains("\\d visits "), "{}", lines[2]);
    for name in ["per_minute", "readings", "vehicles", "visits"] {
        assert!(lines[3].contains(name), "{name} offered: {}", lines[3]);
    }
}
