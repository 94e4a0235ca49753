//! The SQL port's front door with real clients: SCRAM-SHA-256 logins from psql, psycopg and
//! tokio-postgres, privileges (read and admin), the first admin's password, failed-login rate
//! limiting, TLS with `sslmode=verify-full` against a test CA, secrets kept out of the catalog
//! and connector paths confined to the allowed roots.

use std::path::Path;
use std::process::Command;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, IsCa, KeyPair,
};
use tokio_postgres::error::SqlState;

use crate::harness::{ADMIN_PASSWORD, Weir, duckdb_python};

/// Connects as `user` with `password`; the error's SQLSTATE on failure.
async fn login(weir: &Weir, user: &str, password: &str) -> Result<tokio_postgres::Client, String> {
    let conn = format!(
        "host=127.0.0.1 port={} user={user} password={password} dbname=weir connect_timeout=10",
        weir.pg_port
    );
    match tokio_postgres::connect(&conn, tokio_postgres::NoTls).await {
        Ok((client, connection)) => {
            tokio::spawn(async move {
                let _ = connection.await;
            });
            Ok(client)
        }
        Err(e) => Err(e
            .code()
            .map(|c| c.code().to_string())
            .unwrap_or_else(|| e.to_string())),
    }
}

/// Runs a psycopg script with `conninfo` as `sys.argv[1]` and `args` after it; returns its
/// stdout, trimmed.
fn psycopg(conninfo: &str, script: &str, args: &[&str]) -> String {
    let out = Command::new(duckdb_python())
        .arg("-c")
        .arg(format!("import sys, psycopg\n{script}"))
        .arg(conninfo)
        .args(args)
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "psycopg script failed:\n{script}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// psycopg: prints the SQLSTATE a connection fails with, or runs `query` and prints its rows.
const PSYCOPG_CONNECT: &str = "
try:
    with psycopg.connect(sys.argv[1]) as conn:
        print(conn.execute(sys.argv[2] if len(sys.argv) > 2 else 'SELECT 1').fetchall())
except psycopg.Error as e:
    print('sqlstate', e.sqlstate, type(e).__name__, e)
";

fn conninfo(weir: &Weir, user: &str, password: &str) -> String {
    format!(
        "host=127.0.0.1 port={} user={user} password={password} dbname=weir connect_timeout=10",
        weir.pg_port
    )
}

fn psql_as(weir: &Weir, user: &str, password: &str, sql: &str) -> (bool, String) {
    let out = Command::new("psql")
        .args([
            "-X",
            "-A",
            "-t",
            "-h",
            "127.0.0.1",
            "-p",
            &weir.pg_port.to_string(),
        ])
        .args(["-U", user, "-d", "weir", "-c", sql])
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .expect("psql is installed");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn code(e: &tokio_postgres::Error) -> Option<&str> {
    e.code().map(SqlState::code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_logins_and_privileges_from_psql_psycopg_and_tokio_postgres() {
    let dir = tempfile::tempdir().expect("tempdir");
    let weir = Weir::start(dir.path(), None);

    // The admin from WEIR_ADMIN_PASSWORD; a wrong password and an unknown user fail alike.
    let admin = login(&weir, "weir", ADMIN_PASSWORD)
        .await
        .expect("admin logs in");
    assert_eq!(
        login(&weir, "weir", "nope").await.err().as_deref(),
        Some("28P01")
    );
    assert_eq!(
        login(&weir, "ghost", "nope").await.err().as_deref(),
        Some("28P01")
    );
    let (ok, out) = psql_as(&weir, "weir", "nope", "SELECT 1");
    assert!(
        !ok && out.contains("password authentication failed for user \"weir\""),
        "{out}"
    );
    let (ok, out) = psql_as(&weir, "weir", ADMIN_PASSWORD, "SELECT 41 + 1");
    assert!(ok && out.trim() == "42", "{out}");
    // libpq (psql, psycopg) reports a failed connection by its message only: no result
    // carries the SQLSTATE (tokio-postgres above shows it is 28P01).
    let wrong = psycopg(&conninfo(&weir, "weir", "nope"), PSYCOPG_CONNECT, &[]);
    assert!(
        wrong.contains("OperationalError")
            && wrong.contains("password authentication failed for user \"weir\""),
        "{wrong}"
    );
    let right = psycopg(
        &conninfo(&weir, "weir", ADMIN_PASSWORD),
        PSYCOPG_CONNECT,
        &[],
    );
    assert_eq!(right, "[(1,)]");

    admin
        .batch_execute(
            "CREATE STREAM events (vehicle_id BIGINT) WITH (connector = 'datagen', \
             rows_per_second = 100, max_rows = 10);
             CREATE MATERIALIZED VIEW totals AS SELECT vehicle_id FROM events;
             CREATE USER reader WITH PASSWORD 'r-pass-1';
             GRANT READ TO reader;
             CREATE USER nobody WITH PASSWORD 'n-pass';",
        )
        .await
        .expect("admin DDL");

    // A read user queries and lists, but its DDL is refused with 42501.
    let reader = login(&weir, "reader", "r-pass-1")
        .await
        .expect("reader logs in");
    crate::harness::eventually(std::time::Duration::from_secs(30), || {
        let (ok, out) = psql_as(&weir, "reader", "r-pass-1", "SELECT count(*) FROM totals");
        (ok && out.trim() == "10").then_some(())
    })
    .expect("the reader sees the view's rows");
    reader.simple_query("SHOW STREAMS").await.expect("SHOW");
    let e = reader
        .batch_execute("CREATE STREAM s2 (x INT) WITH (connector = 'datagen')")
        .await
        .expect_err("a read user's DDL is refused");
    assert_eq!(code(&e), Some("42501"), "{e:?}");
    let e = reader
        .batch_execute("DROP MATERIALIZED VIEW totals")
        .await
        .expect_err("refused");
    assert_eq!(code(&e), Some("42501"), "{e:?}");
    let e = reader
        .batch_execute("GRANT ADMIN TO reader")
        .await
        .expect_err("refused");
    assert_eq!(code(&e), Some("42501"), "{e:?}");
    let reader_info = conninfo(&weir, "reader", "r-pass-1");
    let rows = psycopg(
        &reader_info,
        PSYCOPG_CONNECT,
        &["SELECT count(*) FROM totals"],
    );
    assert_eq!(rows, "[(10,)]");
    let denied = psycopg(&reader_info, PSYCOPG_CONNECT, &["DROP VIEW totals"]);
    assert!(denied.starts_with("sqlstate 42501"), "{denied}");

    // A user without privileges connects and sets session options, nothing else.
    let nobody = login(&weir, "nobody", "n-pass")
        .await
        .expect("nobody logs in");
    nobody
        .batch_execute("SET application_name = 'x'")
        .await
        .expect("SET");
    let e = nobody
        .simple_query("SELECT count(*) FROM totals")
        .await
        .expect_err("refused");
    assert_eq!(code(&e), Some("42501"), "{e:?}");
    let e = nobody
        .prepare("SELECT count(*) FROM totals")
        .await
        .expect_err("refused");
    assert_eq!(code(&e), Some("42501"), "extended protocol too: {e:?}");

    // Users change their own password; the old one stops working.
    reader
        .batch_execute("ALTER USER reader WITH PASSWORD 'r-pass-2'")
        .await
        .expect("own password");
    assert_eq!(
        login(&weir, "reader", "r-pass-1").await.err().as_deref(),
        Some("28P01")
    );
    login(&weir, "reader", "r-pass-2")
        .await
        .expect("new password");

    // REVOKE applies to a session already open.
    admin
        .batch_execute("REVOKE READ FROM reader")
        .await
        .expect("revoke");
    let e = reader
        .simple_query("SELECT count(*) FROM totals")
        .await
        .expect_err("refused");
    assert_eq!(code(&e), Some("42501"), "{e:?}");

    // The last admin stays; SHOW USERS lists users, never verifiers.
    let e = admin
        .batch_execute("DROP USER weir")
        .await
        .expect_err("refused");
    assert_eq!(code(&e), Some("55006"), "{e:?}");
    let rows = admin.simple_query("SHOW USERS").await.expect("SHOW USERS");
    let users: Vec<String> = rows
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(format!(
                "{}|{}|{}",
                r.get(0).unwrap_or(""),
                r.get(1).unwrap_or(""),
                r.get(2).unwrap_or("")
            )),
            _ => None,
        })
        .collect();
    assert_eq!(users, ["nobody||true", "reader||true", "weir|admin|true"]);
    // psql's \du reads the same users from pg_roles.
    let (ok, out) = psql_as(&weir, "weir", ADMIN_PASSWORD, "\\du");
    assert!(ok, "{out}");
    let roles: Vec<&str> = out.lines().collect();
    assert_eq!(
        roles,
        ["nobody||", "reader||", "weir|Superuser, Create role|"],
        "{out}"
    );
    admin
        .batch_execute("DROP USER nobody")
        .await
        .expect("drop user");
    assert_eq!(
        login(&weir, "nobody", "n-pass").await.err().as_deref(),
        Some("28P01")
    );

    // What is kept on disk: verifiers in a file only its owner reads.
    let users_file = dir.path().join("weir-data/users.json");
    let text = std::fs::read_to_string(&users_file).expect("users.json");
    for secret in [ADMIN_PASSWORD, "r-pass-1", "r-pass-2", "n-pass"] {
        assert!(!text.contains(secret), "a password in users.json: {text}");
    }
    assert!(text.contains("SCRAM-SHA-256$4096:"), "{text}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&users_file)
        .expect("stat")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let metrics = weir.http_get("/metrics");
    assert!(
        metrics.contains("weir_logins_total{result=\"wrong_password\"}"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_admin_password_is_generated_once_and_failed_logins_are_limited() {
    let dir = tempfile::tempdir().expect("tempdir");
    let no_password = [("WEIR_ADMIN_PASSWORD".to_string(), String::new())];
    let mut weir = Weir::start_with(dir.path(), None, &[], &no_password);
    let log = weir.log_text();
    let password = log
        .lines()
        .find_map(|l| l.strip_prefix("created the admin user 'weir' with the password: "))
        .unwrap_or_else(|| panic!("no generated password in the log:\n{log}"))
        .trim()
        .to_string();
    assert!(password.len() >= 20, "{password}");
    login(&weir, "weir", &password)
        .await
        .expect("the generated password works");
    assert!(weir.stop());
    let weir = Weir::start_with(dir.path(), None, &[], &no_password);
    assert!(
        !weir.log_text().contains("with the password"),
        "printed once only:\n{}",
        weir.log_text()
    );
    login(&weir, "weir", &password)
        .await
        .expect("kept across restarts");

    // Ten failures from one address, then that address is refused even with the right
    // password until the window ends.
    for _ in 0..10 {
        assert_eq!(
            login(&weir, "weir", "guess").await.err().as_deref(),
            Some("28P01")
        );
    }
    assert_eq!(
        login(&weir, "weir", &password).await.err().as_deref(),
        Some("28000")
    );
    let (ok, out) = psql_as(&weir, "weir", &password, "SELECT 1");
    assert!(!ok && out.contains("too many failed logins"), "{out}");
}

/// Runs `sql` as the admin; the SQLSTATE it fails with, or `None`.
async fn sqlstate(client: &tokio_postgres::Client, sql: &str) -> Option<String> {
    match client.batch_execute(sql).await {
        Ok(()) => None,
        Err(e) => Some(code(&e).map_or_else(|| e.to_string(), str::to_string)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_stay_references_and_connectors_only_touch_allowed_paths() {
    let dir = tempfile::tempdir().expect("tempdir");
    let work = dir.path().join("work");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&work).expect("mkdir");
    std::fs::create_dir_all(&outside).expect("mkdir");
    for d in [&work, &outside] {
        std::fs::write(d.join("events.ndjson"), "{\"k\": 1}\n{\"k\": 2}\n").expect("write");
    }
    std::os::unix::fs::symlink(&outside, work.join("link")).expect("symlink");
    let token = [(
        "WEIR_E2E_TOKEN".to_string(),
        "token-from-the-environment".to_string(),
    )];
    let mut weir = Weir::start_with(&work, None, &[], &token);
    let admin = login(&weir, "weir", ADMIN_PASSWORD).await.expect("admin");

    // By default: the working directory and the data directory.
    let stream = |name: &str, path: &str| {
        format!("CREATE STREAM {name} (k BIGINT) WITH (connector = 'file', path = '{path}')")
    };
    assert_eq!(
        sqlstate(&admin, &stream("here", "events.ndjson")).await,
        None
    );
    let view = "CREATE STREAM g (vehicle_id BIGINT, ts TIMESTAMP(3), \
                  WATERMARK FOR ts AS ts - INTERVAL '1' SECOND) WITH (connector = 'datagen'); \
                CREATE MATERIALIZED VIEW per_5s AS SELECT window_start, window_end, count(*) AS n \
                  FROM TUMBLE(g, ts, INTERVAL '5' SECOND) GROUP BY window_start, window_end";
    assert_eq!(sqlstate(&admin, view).await, None);
    let work_file = work.join("events.ndjson");
    let absolute = work_file.to_str().expect("utf8");
    assert_eq!(sqlstate(&admin, &stream("here_abs", absolute)).await, None);
    let outside_file = outside.join("events.ndjson");
    let refused = [
        stream("abs", outside_file.to_str().expect("utf8")),
        stream("dotdot", "../outside/events.ndjson"),
        stream("link", "link/events.ndjson"),
        stream("etc", "/etc/passwd"),
        format!(
            "CREATE SINK lake WITH (connector = 'parquet', path = 'file://{}') AS SELECT k FROM here",
            outside.join("lake").display()
        ),
        "CREATE SINK p FROM per_5s WITH (connector = 'prometheus_remote_write', \
           url = 'http://127.0.0.1:1/api/v1/write', bearer_token_file = '/etc/hostname')"
            .to_string(),
    ];
    for sql in &refused {
        assert_eq!(
            sqlstate(&admin, sql).await.as_deref(),
            Some("42501"),
            "{sql}"
        );
    }
    let err = admin
        .batch_execute(&stream("etc", "/etc/passwd"))
        .await
        .expect_err("outside");
    let message = err.as_db_error().map(|e| e.message().to_string());
    assert!(
        message
            .as_deref()
            .is_some_and(|m| m.contains("--allow-path")),
        "the error says what to do: {message:?}"
    );
    assert_eq!(
        sqlstate(
            &admin,
            "CREATE SINK lake WITH (connector = 'parquet', path = 'weir-data/lake') AS SELECT k FROM here"
        )
        .await,
        None,
        "the data directory is allowed"
    );

    // A secret given as ${ENV} is kept as the reference; a literal one is kept in a catalog
    // only the owner can read, and SHOW CREATE hides it.
    for (name, auth) in [
        ("from_env", "bearer_token = '${WEIR_E2E_TOKEN}'"),
        (
            "literal",
            "'basic_auth.username' = 'u', 'basic_auth.password' = 'literal-secret'",
        ),
    ] {
        let sql = format!(
            "CREATE SINK {name} FROM per_5s WITH (connector = 'prometheus_remote_write', \
               url = 'http://127.0.0.1:1/api/v1/write', {auth})"
        );
        assert_eq!(sqlstate(&admin, &sql).await, None, "{sql}");
    }
    let catalog_file = work.join("weir-data/catalog.json");
    let catalog = std::fs::read_to_string(&catalog_file).expect("catalog.json");
    assert!(catalog.contains("${WEIR_E2E_TOKEN}"), "{catalog}");
    assert!(!catalog.contains("token-from-the-environment"), "{catalog}");
    let mode = std::fs::metadata(&catalog_file)
        .expect("metadata")
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    let rows = admin
        .simple_query("SHOW CREATE SINK literal")
        .await
        .expect("show create");
    let shown = format!("{rows:?}");
    assert!(
        shown.contains("***") && !shown.contains("literal-secret"),
        "{shown}"
    );

    // Restarted with --allow-path: that directory and the data directory, no longer the
    // working directory. The saved objects are replayed through the same check.
    drop(admin);
    assert!(weir.stop());
    let args = ["--allow-path".to_string(), outside.display().to_string()];
    let weir = Weir::start_with(&work, None, &args, &token);
    let admin = login(&weir, "weir", ADMIN_PASSWORD).await.expect("admin");
    assert_eq!(
        sqlstate(&admin, &stream("abs", outside_file.to_str().expect("utf8"))).await,
        None
    );
    assert_eq!(
        sqlstate(&admin, &stream("here2", absolute))
            .await
            .as_deref(),
        Some("42501")
    );
    // The stream in the working directory is not restored: logged, and kept in the catalog
    // for the next start. The sinks are, their ${ENV} resolved again.
    let log = weir.log_text();
    assert!(
        log.contains("cannot restore catalog object") && log.contains("outside the paths"),
        "{log}"
    );
    let catalog = std::fs::read_to_string(&catalog_file).expect("catalog.json");
    assert!(catalog.contains("here_abs"), "{catalog}");
    let rows = admin.simple_query("SHOW SINKS").await.expect("show sinks");
    let shown = format!("{rows:?}");
    assert!(
        shown.contains("from_env") && shown.contains("literal"),
        "{shown}"
    );
}

/// A test CA and a server certificate for `localhost` only, as PEM files in `dir`.
fn test_pki(dir: &Path) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // Distinct names: OpenSSL (libpq) takes a certificate whose subject is its issuer for a
    // self-signed one.
    ca_params.distinguished_name = DistinguishedName::new();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "weir test CA");
    let ca =
        CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("key")).expect("ca");
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let cert = params.signed_by(&key, &ca).expect("server cert");
    std::fs::write(dir.join("ca.pem"), ca.pem()).expect("write");
    std::fs::write(dir.join("server.pem"), cert.pem()).expect("write");
    std::fs::write(dir.join("server.key"), key.serialize_pem()).expect("write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_verify_full_works_and_plain_connections_are_refused_when_tls_is_required() {
    let dir = tempfile::tempdir().expect("tempdir");
    test_pki(dir.path());
    let file = |name: &str| dir.path().join(name).display().to_string();
    let args = [
        "--pg-tls-cert".to_string(),
        file("server.pem"),
        "--pg-tls-key".to_string(),
        file("server.key"),
        "--pg-tls-required".to_string(),
    ];
    let weir = Weir::start_with(dir.path(), None, &args, &[]);
    let psql = |conninfo: String| {
        let out = Command::new("psql")
            .args(["-X", "-A", "-t", &conninfo, "-c", "SELECT 'secure'"])
            .env("PGCONNECT_TIMEOUT", "10")
            .output()
            .expect("psql");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let base = format!(
        "port={} user=weir password={ADMIN_PASSWORD} dbname=weir",
        weir.pg_port
    );
    let verify_full = format!(
        "host=localhost hostaddr=127.0.0.1 {base} sslmode=verify-full sslrootcert={}",
        file("ca.pem")
    );
    let (ok, out) = psql(verify_full.clone());
    assert!(ok && out.trim() == "secure", "{out}");
    let via_psycopg = psycopg(&verify_full, PSYCOPG_CONNECT, &[]);
    assert_eq!(via_psycopg, "[(1,)]");
    let (ok, out) = psql(format!("host=127.0.0.1 {base} sslmode=require"));
    assert!(ok, "sslmode=require: {out}");

    // verify-full checks the name: the certificate is for localhost, not 127.0.0.1.
    let (ok, out) = psql(format!(
        "host=127.0.0.1 {base} sslmode=verify-full sslrootcert={}",
        file("ca.pem")
    ));
    assert!(!ok && out.contains("does not match host name"), "{out}");

    // Without TLS: refused before authentication, with 28000.
    let (ok, out) = psql(format!("host=127.0.0.1 {base} sslmode=disable"));
    assert!(!ok && out.contains("requires TLS"), "{out}");
    let plain = psycopg(
        &format!("host=127.0.0.1 {base} sslmode=disable"),
        PSYCOPG_CONNECT,
        &[],
    );
    assert!(plain.contains("requires TLS"), "{plain}");
    let e = tokio_postgres::connect(&format!("host=127.0.0.1 {base}"), tokio_postgres::NoTls)
        .await
        .err()
        .expect("refused without TLS");
    assert_eq!(code(&e), Some("28000"), "{e:?}");
}
