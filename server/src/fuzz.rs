//! Generated-input tests of the SQL front door: statements of Weir's dialect, mutated token by
//! token, through the parser, the planner and the engine (`Engine::execute`, as a client's
//! statement runs, and `Engine::describe`, as the extended protocol's Parse). Every input
//! must come back as rows, a command, or an error with a SQLSTATE; none may panic.
//!
//! The generator is seeded, so a failure names an input that fails again the same way.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::FutureExt;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use sqlparser::dialect::GenericDialect;
use sqlparser::tokenizer::{Token, Tokenizer};
use weir_connectors::Connectors;
use weir_connectors::paths::AllowedPaths;

use crate::engine::{Engine, EngineConfig};

/// Statements covering the dialect: what the mutations start from.
const SEEDS: &[&str] = &[
    "CREATE STREAM events (device BIGINT NOT NULL, v DOUBLE, name TEXT, ts TIMESTAMP(3), \
     WATERMARK FOR ts AS ts - INTERVAL '5' SECOND) \
     WITH (connector = 'datagen', rows_per_second = 10, cardinality = 5, seed = 1)",
    "CREATE STREAM lines (k BIGINT, msg TEXT) WITH (connector = 'file', path = 'in.ndjson', \
     format = 'json', follow = true, 'follow.interval' = '100ms', 'batch.rows' = 10)",
    "CREATE MATERIALIZED VIEW per_minute WITH (retention = '1h', max_rows = 1000) AS \
     SELECT window_start, window_end, device, count(*) AS n, sum(v) AS total, max(v) AS top \
     FROM TUMBLE(events, ts, INTERVAL '1' MINUTE) GROUP BY window_start, window_end, device",
    "CREATE MATERIALIZED VIEW hopping AS SELECT window_start, window_end, avg(v) AS a \
     FROM HOP(TABLE events, DESCRIPTOR(ts), INTERVAL '10' SECOND, INTERVAL '1' MINUTE) \
     GROUP BY window_start, window_end",
    "CREATE MATERIALIZED VIEW sessions WITH ('window.allowed_lateness' = '5s') AS \
     SELECT window_start, window_end, device, approx_percentile_cont(v, 0.99) AS p99 \
     FROM SESSION(events, ts, INTERVAL '30' SECOND) GROUP BY window_start, window_end, device",
    "CREATE MATERIALIZED VIEW fast AS SELECT device, v * 2 AS double_v, upper(name) AS n, \
     CAST(v AS BIGINT) AS rounded FROM events WHERE v > 10 AND name LIKE 'a%'",
    "CREATE VIEW named AS SELECT device, coalesce(name, 'none') AS name FROM events",
    "CREATE SINK out FROM fast WITH (connector = 'blackhole')",
    "CREATE SINK rolled WITH (connector = 'blackhole', 'checkpoint.interval' = '1s') AS \
     SELECT window_end, device, count(*) AS n FROM TUMBLE(events, ts, INTERVAL '1' HOUR) \
     GROUP BY window_start, window_end, device",
    "SELECT device, sum(n) FROM per_minute WHERE window_start > now() - INTERVAL '1' DAY \
     GROUP BY device ORDER BY 2 DESC LIMIT 10",
    "SELECT floor(extract(epoch from window_start)/60)*60 AS \"time\", device, total \
     FROM per_minute WHERE window_start BETWEEN '2026-01-01T00:00:00Z' AND '2026-01-02T00:00:00Z'",
    "SELECT * FROM fast WHERE device = $1 AND double_v > $2",
    "SELECT device, v FROM events WHERE v > 1 LIMIT 5",
    "SELECT current_setting('server_version_num')::int / 100 AS version",
    "SELECT c.relname FROM pg_catalog.pg_class c WHERE c.relkind IN ('r', 'v') ORDER BY 1",
    "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'fast'",
    "SHOW QUERIES",
    "SHOW MATERIALIZED VIEWS",
    "SHOW CREATE SINK out",
    "DESCRIBE per_minute",
    "EXPLAIN SELECT device, count(*) FROM TUMBLE(events, ts, INTERVAL '1' MINUTE) \
     GROUP BY window_start, window_end, device",
    "DROP MATERIALIZED VIEW IF EXISTS fast CASCADE",
    "DROP STREAM events CASCADE",
    "CREATE USER reader WITH PASSWORD 'secret'",
    "GRANT READ TO reader",
    "SET search_path = public",
    "SHOW server_version",
];

/// What a mutation may put in: words, literals at the edges of their types, punctuation.
const DICTIONARY: &[&str] = &[
    "SELECT",
    "FROM",
    "WHERE",
    "GROUP",
    "BY",
    "ORDER",
    "LIMIT",
    "AS",
    "AND",
    "OR",
    "NOT",
    "NULL",
    "CAST",
    "INTERVAL",
    "TUMBLE",
    "HOP",
    "SESSION",
    "TABLE",
    "DESCRIPTOR",
    "WITH",
    "CREATE",
    "DROP",
    "STREAM",
    "SINK",
    "MATERIALIZED",
    "VIEW",
    "WATERMARK",
    "FOR",
    "JOIN",
    "LEFT",
    "ON",
    "SYSTEM_TIME",
    "OF",
    "PROCTIME",
    "CASCADE",
    "IF",
    "EXISTS",
    "DISTINCT",
    "HAVING",
    "UNION",
    "CASE",
    "WHEN",
    "THEN",
    "ELSE",
    "END",
    "BETWEEN",
    "IN",
    "IS",
    "TIMESTAMP",
    "BIGINT",
    "DOUBLE",
    "TEXT",
    "INT",
    "BOOLEAN",
    "DATE",
    "SECOND",
    "MINUTE",
    "HOUR",
    "DAY",
    "MONTH",
    "YEAR",
    "window_start",
    "window_end",
    "events",
    "per_minute",
    "fast",
    "device",
    "v",
    "ts",
    "name",
    "count",
    "sum",
    "avg",
    "max",
    "min",
    "now",
    "date_bin",
    "extract",
    "epoch",
    "0",
    "1",
    "-1",
    "2147483648",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775808",
    "100000000000000000000",
    "1e308",
    "1e400",
    "0.0000001",
    "'1s'",
    "'0s'",
    "'-5 seconds'",
    "'100000000000000000000s'",
    "'36501 days'",
    "'1 month'",
    "''",
    "'x'",
    "'2026-01-01T00:00:00Z'",
    "'99999-12-31'",
    "'NaN'",
    "'connector'",
    "'datagen'",
    "'blackhole'",
    "'file'",
    "'retention'",
    "'max_rows'",
    "'window.allowed_lateness'",
    "'checkpoint.interval'",
    "'rows_per_second'",
    "'cardinality'",
    "(",
    ")",
    ",",
    ";",
    "*",
    "+",
    "-",
    "/",
    "%",
    "=",
    "<>",
    "<",
    ">",
    "::",
    ".",
    "[",
    "]",
    "$1",
    "$99999",
    "'\u{0}'",
    "'é'",
    "\"quoted ident\"",
];

/// `seed` with 1 or 2 random token-level mutations.
fn mutate(rng: &mut SmallRng, seed: &str) -> String {
    let mut tokens: Vec<String> = Tokenizer::new(&GenericDialect {}, seed)
        .tokenize()
        .unwrap_or_default()
        .into_iter()
        .filter(|t| !matches!(t, Token::Whitespace(_)))
        .map(|t| t.to_string())
        .collect();
    for _ in 0..rng.random_range(1..=2) {
        let at = rng.random_range(0..=tokens.len());
        let word = DICTIONARY[rng.random_range(0..DICTIONARY.len())].to_string();
        match rng.random_range(0..6) {
            0 if at < tokens.len() => {
                tokens.remove(at);
            }
            1 if at < tokens.len() => {
                let copy = tokens[at].clone();
                tokens.insert(at, copy);
            }
            2 if at + 1 < tokens.len() => tokens.swap(at, at + 1),
            3 if at < tokens.len() => tokens[at] = word,
            4 => {
                // A number at its edge where a number was.
                if let Some(i) = tokens.iter().position(|t| t.parse::<f64>().is_ok()) {
                    tokens[i] = ["0", "-1", "9223372036854775808", "1e400", "100000000000"]
                        [rng.random_range(0..5)]
                    .to_string();
                }
            }
            _ => tokens.insert(at, word),
        }
    }
    tokens.join(" ")
}

/// A SQLSTATE: five digits or capital letters.
fn is_sqlstate(code: &str) -> bool {
    code.len() == 5
        && code
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase())
}

/// How many of each outcome the run saw, and the internal errors (bugs) it found.
#[derive(Default)]
struct Tally {
    ok: u64,
    by_sqlstate: BTreeMap<String, u64>,
    internal: BTreeMap<String, String>,
}

impl Tally {
    fn error(&mut self, input: &str, sqlstate: &str, message: String) {
        assert!(
            is_sqlstate(sqlstate),
            "not a SQLSTATE: {sqlstate:?} for {input:?}: {message}"
        );
        *self.by_sqlstate.entry(sqlstate.to_string()).or_default() += 1;
        if sqlstate == "XX000" {
            self.internal
                .entry(message.chars().take(160).collect())
                .or_insert_with(|| input.to_string());
        }
    }
}

/// `sql` with the file it reads under `dir` (the only root files may be read from).
fn in_dir(sql: &str, dir: &std::path::Path) -> String {
    sql.replace(
        "'in.ndjson'",
        &format!("'{}'", dir.join("in.ndjson").display()),
    )
}

async fn fresh_engine(dir: &std::path::Path) -> Arc<Engine> {
    let paths = AllowedPaths::under([dir.to_path_buf()]).expect("roots");
    let engine = Engine::open(
        EngineConfig::default(),
        Arc::new(Connectors::confined(paths)),
    )
    .await
    .expect("engine");
    // Objects the mutated queries read; pipelines are not started (no start_all), so DDL
    // and queries are planned and checked, and nothing runs.
    for seed in &SEEDS[..9] {
        for result in engine.execute(&in_dir(seed, dir)).await {
            result.expect("the seed statements are valid");
        }
    }
    engine
}

/// Inputs per run: 100 000 through the parser alone, and as many through the engine.
const INPUTS: u64 = 100_000;

#[test]
fn mutated_statements_never_panic_and_every_rejection_has_a_sqlstate() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("in.ndjson"), "{\"k\":1,\"msg\":\"a\"}\n").expect("input");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut rng = SmallRng::seed_from_u64(0x5eed_f00d);
    let mut tally = Tally::default();
    let mut parser_only = 0u64;
    runtime.block_on(async {
        let mut engine = fresh_engine(dir.path()).await;
        for i in 0..INPUTS {
            // A fresh catalog now and then: DROPs and CREATEs pile up otherwise.
            if i % 5_000 == 4_999 {
                engine = fresh_engine(dir.path()).await;
            }
            let seed = SEEDS[rng.random_range(0..SEEDS.len())];
            let input = mutate(&mut rng, &in_dir(seed, dir.path()));
            // The parser alone, as `weir check` runs it.
            match std::panic::catch_unwind(|| weir_sql::parse_sql_with_positions(&input)) {
                Ok(Ok(_)) => parser_only += 1,
                Ok(Err(e)) => {
                    if let Some(p) = e.position {
                        assert!(p.line >= 1 && p.column >= 1, "{input:?}: {p:?}");
                    }
                }
                Err(_) => panic!("the parser panicked on {input:?}"),
            }
            // The extended protocol's Parse, then the statement itself.
            let described = std::panic::AssertUnwindSafe(engine.describe(&input))
                .catch_unwind()
                .await
                .unwrap_or_else(|_| panic!("describe panicked on {input:?}"));
            if let Err(e) = described {
                tally.error(&input, e.sqlstate(), e.to_string());
            }
            let results = std::panic::AssertUnwindSafe(engine.execute(&input))
                .catch_unwind()
                .await
                .unwrap_or_else(|_| panic!("execute panicked on {input:?}"));
            for result in results {
                match result {
                    Ok(_) => tally.ok += 1,
                    Err(e) => tally.error(&input, e.sqlstate(), e.to_string()),
                }
            }
        }
        engine.shutdown(std::time::Duration::from_secs(1)).await;
    });
    println!(
        "{INPUTS} mutated statements: {parser_only} parsed, {} executed, errors by SQLSTATE {:?}",
        tally.ok, tally.by_sqlstate
    );
    for (message, input) in &tally.internal {
        println!("internal error {message:?} from {input:?}");
    }
    assert!(
        tally.ok > INPUTS / 100,
        "the mutations keep enough inputs valid to reach the planner and the engine"
    );
}
