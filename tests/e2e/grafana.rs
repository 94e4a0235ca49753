//! Grafana's PostgreSQL data source against Weir: the queries it sends on connect and to list
//! schemas, tables and columns, and a time-series query with its macros expanded, sent
//! verbatim (as `postgresMetaQuery.ts` writes them) through the simple protocol (psql) and
//! the extended protocol (tokio-postgres, as Grafana's pgx driver). The time series is
//! checked against DuckDB over the same input.

use std::time::Duration;

use crate::harness::{Weir, duckdb, eventually};

/// 2026-01-01T00:00:00Z in seconds.
const BASE_S: i64 = 1_767_225_600;
const SITES: [&str; 3] = ["north", "south", "west"];

/// Grafana's schema constraint, as `buildSchemaConstraint()` writes it.
const SCHEMA_CONSTRAINT: &str = r#"
          quote_ident(table_schema) IN (
          SELECT
            CASE WHEN trim(s[i]) = '"$user"' THEN user ELSE trim(s[i]) END
          FROM
            generate_series(
              array_lower(string_to_array(current_setting('search_path'),','),1),
              array_upper(string_to_array(current_setting('search_path'),','),1)
            ) as i,
            string_to_array(current_setting('search_path'),',') s
          )"#;

fn show_tables() -> String {
    format!(
        r#"SELECT
    CASE WHEN {SCHEMA_CONSTRAINT}
      THEN quote_ident(table_name)
      ELSE quote_ident(table_schema) || '.' || quote_ident(table_name)
    END AS "table"
    FROM information_schema.tables
    WHERE quote_ident(table_schema) NOT IN ('information_schema',
                             'pg_catalog',
                             '_timescaledb_cache',
                             '_timescaledb_catalog',
                             '_timescaledb_internal',
                             '_timescaledb_config',
                             'timescaledb_information',
                             'timescaledb_experimental')
    ORDER BY CASE WHEN {SCHEMA_CONSTRAINT} THEN 0 ELSE 1 END, 1"#
    )
}

fn show_tables_in(schema: &str) -> String {
    format!(
        r#"SELECT quote_ident(table_name) AS "table"
      FROM information_schema.tables
      WHERE quote_ident(table_schema) = '{schema}'
      ORDER BY 1"#
    )
}

const SHOW_SCHEMAS: &str = r#"SELECT schema_name AS "name"
    FROM information_schema.schemata
    WHERE schema_name NOT IN ('information_schema',
                              'pg_catalog',
                              'pg_toast',
                              '_timescaledb_cache',
                              '_timescaledb_catalog',
                              '_timescaledb_internal',
                              '_timescaledb_config',
                              'timescaledb_information',
                              'timescaledb_experimental')
    ORDER BY schema_name"#;

fn get_schema(table: &str) -> String {
    let table = format!("'{}'", table.replace('\'', "''"));
    format!(
        r#"SELECT quote_ident(column_name) AS "column", data_type AS "type"
    FROM information_schema.columns
    WHERE
      CASE WHEN array_length(parse_ident({table}),1) = 2
        THEN quote_ident(table_schema) = (parse_ident({table}))[1]
          AND quote_ident(table_name) = (parse_ident({table}))[2]
        ELSE quote_ident(table_name) = {table}
          AND {SCHEMA_CONSTRAINT}
      END"#
    )
}

/// `$__timeFilter(window_start)` and `$__timeGroupAlias(window_start, '1m')`, expanded as
/// Grafana does, over minutes 1 to 4 (inclusive bounds, as BETWEEN).
fn time_series() -> String {
    format!(
        r#"SELECT
  floor(extract(epoch from window_start)/60)*60 AS "time",
  site AS metric,
  sum(total) AS value
FROM per_minute
WHERE
  window_start BETWEEN '{}' AND '{}'
GROUP BY 1, 2
ORDER BY 1, 2"#,
        rfc3339(BASE_S + 60),
        rfc3339(BASE_S + 4 * 60)
    )
}

/// `$__unixEpochFilter(extract(epoch from window_start))`, expanded.
fn epoch_filtered() -> String {
    format!(
        r#"SELECT window_start AS "time", site, n FROM per_minute WHERE extract(epoch from window_start) >= {} AND extract(epoch from window_start) <= {} ORDER BY 1, 2"#,
        BASE_S + 2 * 60,
        BASE_S + 3 * 60
    )
}

fn rfc3339(seconds: i64) -> String {
    chrono::DateTime::from_timestamp(seconds, 0)
        .expect("in range")
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// Visits over six minutes: (site, v, event time in ms).
fn visits() -> Vec<(&'static str, i64, i64)> {
    (0..600)
        .map(|i: i64| {
            let site = SITES[(i % 3) as usize];
            (site, i % 17, (BASE_S * 1000) + i * 600 + (i % 7) * 13)
        })
        .collect()
}

/// psql's unaligned rows, `|`-separated, as Grafana's simple-protocol path would see them.
fn psql_rows(weir: &Weir, user: &str, sql: &str) -> Vec<String> {
    let out = std::process::Command::new("psql")
        .args(["-X", "-h", "127.0.0.1", "-p", &weir.pg_port.to_string()])
        .args(["-U", user, "-d", "weir", "-At", "-F", "|", "-c", sql])
        .env("PGPASSWORD", "grafana-secret")
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .expect("psql runs");
    assert!(
        out.status.success(),
        "{sql}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        weir.log_text()
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// (time, metric, value) from a line of text columns split by `separator`.
fn series_row(line: &str, separator: char) -> (f64, String, i64) {
    let f: Vec<&str> = line.split(separator).collect();
    (
        f[0].parse().expect("time"),
        f[1].to_string(),
        f[2].parse().expect("value"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grafana_browses_the_catalog_and_charts_a_window_view() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("visits.ndjson");
    let file: String = visits()
        .iter()
        .map(|(site, v, ms)| {
            let ts = chrono::DateTime::from_timestamp_millis(*ms)
                .expect("in range")
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
            format!("{{\"site\":\"{site}\",\"v\":{v},\"ts\":\"{ts}\"}}\n")
        })
        .collect();
    std::fs::write(&input, file).expect("write");
    let weir = Weir::start(dir.path(), None);
    let admin = weir.client().await;
    admin
        .batch_execute(
            "CREATE STREAM visits (site TEXT, v BIGINT, ts TIMESTAMP(3), \
               WATERMARK FOR ts AS ts - INTERVAL '1' SECOND) \
               WITH (connector = 'file', path = 'visits.ndjson');
             CREATE MATERIALIZED VIEW per_minute AS \
               SELECT window_start, window_end, site, count(*) AS n, sum(v) AS total \
               FROM TUMBLE(visits, ts, INTERVAL '1' MINUTE) GROUP BY window_start, window_end, site;
             CREATE USER grafana WITH PASSWORD 'grafana-secret';
             GRANT READ TO grafana",
        )
        .await
        .unwrap_or_else(|e| panic!("setup: {e:?}\n{}", weir.log_text()));
    // Six minutes, three sites: every window closes once the file is read.
    let closed = eventually(Duration::from_secs(60), || {
        let out = weir.psql(&["-At", "-c", "SELECT count(*) FROM per_minute"]);
        (String::from_utf8_lossy(&out.stdout).trim() == "18").then_some(())
    });
    assert!(closed.is_some(), "{}", weir.log_text());

    let (grafana, connection) = tokio_postgres::connect(
        &format!(
            "host=127.0.0.1 port={} user=grafana password=grafana-secret dbname=weir",
            weir.pg_port
        ),
        tokio_postgres::NoTls,
    )
    .await
    .expect("grafana logs in as a read user");
    tokio::spawn(connection);

    // On connect and when saving the data source: a ping, the version, TimescaleDB.
    grafana.batch_execute("-- ping").await.expect("ping");
    let version: i64 = grafana
        .query_one(
            "SELECT current_setting('server_version_num')::int/100 as version",
            &[],
        )
        .await
        .expect("version")
        .get("version");
    assert_eq!(version, 1600);
    assert_eq!(
        psql_rows(
            &weir,
            "grafana",
            "SELECT current_setting('server_version_num')::int/100 as version"
        ),
        ["1600"]
    );
    let timescale = grafana
        .query(
            "SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'",
            &[],
        )
        .await
        .expect("pg_extension");
    assert!(timescale.is_empty(), "no TimescaleDB");

    // Schemas, tables (on the search path: bare names), tables of a schema, columns.
    for (sql, expected) in [
        (SHOW_SCHEMAS.to_string(), vec!["public"]),
        (show_tables(), vec!["per_minute", "visits"]),
        (show_tables_in("public"), vec!["per_minute", "visits"]),
    ] {
        assert_eq!(psql_rows(&weir, "grafana", &sql), expected, "{sql}");
        let rows: Vec<String> = grafana
            .query(&sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(rows, expected, "{sql}");
    }
    let columns = [
        "window_start|timestamp without time zone",
        "window_end|timestamp without time zone",
        "site|text",
        "n|bigint",
        "total|bigint",
    ];
    for table in ["per_minute", "public.per_minute"] {
        let sql = get_schema(table);
        let mut rows = psql_rows(&weir, "grafana", &sql);
        rows.sort();
        let mut expected: Vec<String> = columns.iter().map(|c| c.to_string()).collect();
        expected.sort();
        assert_eq!(rows, expected, "{sql}");
    }

    // The time series, as Grafana sends it, against DuckDB over the same file.
    let expected: Vec<(f64, String, i64)> = duckdb(&format!(
        "SELECT floor(epoch(date_trunc('minute', t))/60)*60, site, sum(v) \
         FROM (SELECT site, v, CAST(rtrim(ts, 'Z') AS TIMESTAMP) AS t \
               FROM read_json('{}', columns = {{site: 'VARCHAR', v: 'BIGINT', ts: 'VARCHAR'}})) \
         WHERE date_trunc('minute', t) BETWEEN TIMESTAMP '{}' AND TIMESTAMP '{}' \
         GROUP BY 1, 2 ORDER BY 1, 2",
        input.display(),
        rfc3339(BASE_S + 60).trim_end_matches('Z'),
        rfc3339(BASE_S + 4 * 60).trim_end_matches('Z'),
    ))
    .iter()
    .map(|line| series_row(line, '\t'))
    .collect();
    assert_eq!(
        expected.len(),
        4 * SITES.len(),
        "four minutes of three sites"
    );
    let extended: Vec<(f64, String, i64)> = grafana
        .query(&time_series(), &[])
        .await
        .unwrap_or_else(|e| panic!("time series: {e:?}\n{}", weir.log_text()))
        .iter()
        .map(|r| (r.get("time"), r.get("metric"), r.get("value")))
        .collect();
    assert_eq!(extended, expected, "extended protocol");
    let simple: Vec<(f64, String, i64)> = psql_rows(&weir, "grafana", &time_series())
        .iter()
        .map(|line| series_row(line, '|'))
        .collect();
    assert_eq!(simple, expected, "simple protocol");

    // `$__unixEpochFilter`: minutes 2 and 3, every site, their counts.
    let rows = grafana
        .query(&epoch_filtered(), &[])
        .await
        .unwrap_or_else(|e| panic!("epoch filter: {e:?}"));
    let counted: Vec<(String, i64)> = rows.iter().map(|r| (r.get(1), r.get(2))).collect();
    let expected: Vec<(String, i64)> = [2, 3]
        .iter()
        .flat_map(|minute| {
            SITES.iter().map(move |site| {
                let n = visits()
                    .iter()
                    .filter(|(s, _, ms)| s == site && (ms / 1000 - BASE_S) / 60 == *minute)
                    .count() as i64;
                (site.to_string(), n)
            })
        })
        .collect();
    assert_eq!(counted, expected);

    // A read user browses; it does not change anything.
    let err = grafana
        .batch_execute("DROP MATERIALIZED VIEW per_minute")
        .await
        .expect_err("read only");
    assert_eq!(err.code().map(|c| c.code()), Some("42501"));
}
