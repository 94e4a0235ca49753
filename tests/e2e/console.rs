//! The web console: its API with a real HTTP client (logins, CSRF, privileges, notebook
//! names), and the pages in Debian's headless Chromium driven by playwright-core
//! (`tests/browser/console.mjs`): a live tail, a view's chart, an error's position, saving,
//! the pipelines page, and a read-only user. Screenshots go to `target/screenshots/`.

use std::path::Path;
use std::process::Command;

use crate::harness::{ADMIN_PASSWORD, Weir, repo_root};

const READER: (&str, &str) = ("reader", "reader-pass-1");

const STREAM: &str = "CREATE STREAM events (vehicle_id BIGINT, ts TIMESTAMP(3), speed_kmh DOUBLE, status TEXT, \
       WATERMARK FOR ts AS ts - INTERVAL '1' SECOND) \
     WITH (connector = 'datagen', rows_per_second = '200', cardinality = '20', seed = '3')";

/// The notebook the browser runs: a tail, a TUMBLE view, a syntax error.
const NOTEBOOK: &str = "# Console test\n\nA tail:\n\n```sql\nSELECT vehicle_id, ts, speed_kmh, status FROM events LIMIT 100000;\n```\n\nA view:\n\n```sql\nCREATE MATERIALIZED VIEW per_second AS\nSELECT window_start, window_end, status, count(*) AS n, avg(speed_kmh) AS speed\nFROM TUMBLE(events, ts, INTERVAL '1' SECOND)\nGROUP BY window_start, window_end, status;\n```\n\nA typo:\n\n```sql\nSELECT status,\n  count(* FROM per_second;\n```\n";

/// The third block, as the browser sends it.
const TYPO: &str = "SELECT status,\n  count(* FROM per_second;";

/// Starts weir (SCRAM) with `notebooks` as its notebooks directory, the stream, and a
/// read-only user.
fn start(dir: &Path, notebooks: &Path) -> Weir {
    let weir = Weir::start_with(
        dir,
        None,
        &["--notebooks".to_string(), notebooks.display().to_string()],
        &[],
    );
    let (ok, _, err) = weir.psql_c(&format!(
        "{STREAM}; CREATE USER {} WITH PASSWORD '{}'; GRANT READ TO {};",
        READER.0, READER.1, READER.0
    ));
    assert!(ok, "setup: {err}");
    weir
}

/// An HTTP client of the console with its own session cookie.
struct Client {
    http: reqwest::Client,
    base: String,
    cookie: Option<String>,
    csrf: Option<String>,
}

impl Client {
    fn new(weir: &Weir) -> Client {
        Client {
            http: reqwest::Client::new(),
            base: format!("http://127.0.0.1:{}", weir.http_port),
            cookie: None,
            csrf: None,
        }
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
        headers: &[(&str, &str)],
    ) -> (u16, String, reqwest::header::HeaderMap) {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(cookie) = &self.cookie {
            request = request.header("Cookie", cookie);
        }
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        if let Some(body) = body {
            request = request
                .header("Content-Type", "application/json")
                .body(body.to_string());
        }
        let response = request.send().await.expect("the console answers");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        (status, response.text().await.expect("body"), headers)
    }

    /// Logs in; the status.
    async fn login(&mut self, user: &str, password: &str) -> u16 {
        let (status, body, headers) = self
            .send(
                reqwest::Method::POST,
                "/api/session",
                Some(serde_json::json!({ "user": user, "password": password })),
                &[("X-Weir-CSRF", "login")],
            )
            .await;
        if status == 200 {
            let cookie = headers["set-cookie"].to_str().expect("ascii");
            assert!(
                cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
                "{cookie}"
            );
            self.cookie = Some(cookie.split(';').next().expect("pair").to_string());
            let json: serde_json::Value = serde_json::from_str(&body).expect("JSON");
            self.csrf = json["csrf"].as_str().map(str::to_string);
        }
        status
    }

    /// `PUT /api/notebooks/{name}` with this session's CSRF token; the status.
    async fn put_notebook(&self, name: &str, body: serde_json::Value) -> u16 {
        let csrf = self.csrf.clone().unwrap_or_default();
        self.send(
            reqwest::Method::PUT,
            &format!("/api/notebooks/{name}"),
            Some(body),
            &[("X-Weir-CSRF", &csrf)],
        )
        .await
        .0
    }

    /// `POST /api/run`: the status and the events (name, data).
    async fn run(&self, sql: &str) -> (u16, Vec<(String, serde_json::Value)>) {
        let csrf = self.csrf.clone().unwrap_or_default();
        let (status, body, _) = self
            .send(
                reqwest::Method::POST,
                "/api/run",
                Some(serde_json::json!({ "sql": sql })),
                &[("X-Weir-CSRF", &csrf)],
            )
            .await;
        let events = body
            .split("\n\n")
            .filter_map(|event| {
                let name = event.lines().find_map(|l| l.strip_prefix("event: "))?;
                let data = event.lines().find_map(|l| l.strip_prefix("data: "))?;
                Some((
                    name.to_string(),
                    serde_json::from_str(data).expect("event data is JSON"),
                ))
            })
            .collect();
        (status, events)
    }
}

#[tokio::test]
async fn the_console_api_checks_logins_csrf_privileges_and_names() {
    let dir = tempfile::tempdir().expect("tempdir");
    let notebooks = dir.path().join("notebooks");
    std::fs::create_dir_all(notebooks.join("team")).expect("mkdir");
    std::fs::write(notebooks.join("team/a.md"), NOTEBOOK).expect("write");
    let weir = start(dir.path(), &notebooks);
    let mut admin = Client::new(&weir);

    // The page is served with a policy that allows only its own scripts.
    let (status, page, headers) = admin.send(reqwest::Method::GET, "/", None, &[]).await;
    assert_eq!(status, 200);
    assert!(page.contains("/assets/console.js"), "{page}");
    assert!(
        headers["content-security-policy"]
            .to_str()
            .expect("ascii")
            .contains("script-src 'self'")
    );

    // Nothing without a login; a wrong password and an unknown user fail alike.
    let (status, ..) = admin
        .send(reqwest::Method::GET, "/api/pipelines", None, &[])
        .await;
    assert_eq!(status, 401);
    assert_eq!(admin.login("weir", "wrong").await, 403);
    assert_eq!(admin.login("nobody", "wrong").await, 403);
    // A login needs the header a foreign page cannot send, and no foreign Origin.
    let (status, ..) = admin
        .send(
            reqwest::Method::POST,
            "/api/session",
            Some(serde_json::json!({ "user": "weir", "password": ADMIN_PASSWORD })),
            &[],
        )
        .await;
    assert_eq!(status, 403);
    assert_eq!(admin.login("weir", ADMIN_PASSWORD).await, 200);
    let metrics = weir.http_get("/metrics");
    assert!(
        metrics.contains("weir_logins_total{result=\"wrong_password\"} 2"),
        "{metrics}"
    );

    // Running SQL needs the session's CSRF token and this origin.
    let (status, ..) = admin
        .send(
            reqwest::Method::POST,
            "/api/run",
            Some(serde_json::json!({ "sql": "SELECT 1" })),
            &[("X-Weir-CSRF", "guess")],
        )
        .await;
    assert_eq!(status, 403);
    let csrf = admin.csrf.clone().expect("csrf");
    let (status, ..) = admin
        .send(
            reqwest::Method::POST,
            "/api/run",
            Some(serde_json::json!({ "sql": "SELECT 1" })),
            &[("X-Weir-CSRF", &csrf), ("Origin", "http://evil.example")],
        )
        .await;
    assert_eq!(status, 403);
    let (status, events) = admin.run("SELECT 1 AS one, 'a' AS s").await;
    assert_eq!(status, 200);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["schema", "rows", "done", "end"], "{events:?}");
    assert_eq!(events[1].1["rows"], serde_json::json!([[1, "a"]]));

    // An error carries its position in the block.
    let (_, events) = admin.run(TYPO).await;
    let error = &events.iter().find(|(n, _)| n == "error").expect("error").1;
    assert_eq!(error["sqlstate"], "42601", "{error}");
    assert_eq!(error["position"]["line"], 2, "{error}");

    // A read user runs SELECTs and tails, and is refused DDL and saving.
    let mut reader = Client::new(&weir);
    assert_eq!(reader.login(READER.0, READER.1).await, 200);
    let (_, events) = reader.run("SELECT vehicle_id FROM events LIMIT 5").await;
    let rows: usize = events
        .iter()
        .filter(|(n, _)| n == "rows")
        .map(|(_, d)| d["rows"].as_array().map_or(0, Vec::len))
        .sum();
    assert_eq!(rows, 5, "{events:?}");
    assert_eq!(events[0].1["live"], true);
    let (_, events) = reader
        .run("CREATE MATERIALIZED VIEW v AS SELECT * FROM events")
        .await;
    assert_eq!(events[0].0, "error", "{events:?}");
    assert_eq!(events[0].1["sqlstate"], "42501", "{events:?}");
    let reader_csrf = reader.csrf.clone().expect("csrf");
    assert_eq!(
        reader
            .put_notebook("team/a.md", serde_json::json!({ "text": "overwritten" }))
            .await,
        403
    );
    assert_eq!(
        std::fs::read_to_string(notebooks.join("team/a.md")).expect("read"),
        NOTEBOOK
    );

    // Closing a block (dropping the stream) stops the tail's pipeline: its source's count
    // stops moving.
    let mut response = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{}/api/run", weir.http_port))
        .header("Cookie", reader.cookie.clone().expect("cookie"))
        .header("X-Weir-CSRF", &reader_csrf)
        .body(r#"{"sql": "SELECT * FROM events LIMIT 100000000"}"#)
        .send()
        .await
        .expect("a tail");
    let mut received = 0;
    while received < 2000 {
        received += response.chunk().await.expect("chunk").expect("more").len();
    }
    let tail_count = || {
        let metrics = weir.http_get("/metrics");
        metrics
            .lines()
            .find(|l| l.starts_with("weir_records_out_total{pipeline=\"tail_events\""))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("the tail's source count: {metrics}"))
    };
    assert!(tail_count() > 0);
    drop(response);
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let stopped = tail_count();
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(
        tail_count(),
        stopped,
        "the tail's source ran on after its reader left"
    );

    // Notebooks: listed, read, saved; names stay inside the directory.
    let (status, list, _) = admin
        .send(reqwest::Method::GET, "/api/notebooks", None, &[])
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&list).expect("JSON")["notebooks"],
        serde_json::json!(["team/a.md"])
    );
    for bad in [
        "../escape.md",
        "team/../../escape.md",
        ".hidden.md",
        "x.sql",
    ] {
        let status = admin
            .put_notebook(bad, serde_json::json!({ "text": "x" }))
            .await;
        assert!(status == 400 || status == 404, "{bad}: {status}");
    }
    assert!(!dir.path().join("escape.md").exists());
    // A save from an editor opened before the file changed on disk is refused.
    let (_, opened, _) = admin
        .send(reqwest::Method::GET, "/api/notebooks/team/a.md", None, &[])
        .await;
    let opened: serde_json::Value = serde_json::from_str(&opened).expect("JSON");
    assert_eq!(opened["text"], NOTEBOOK);
    let base = opened["version"].as_str().expect("version").to_string();
    std::fs::write(notebooks.join("team/a.md"), "# pulled from git\n").expect("write");
    assert_eq!(
        admin
            .put_notebook(
                "team/a.md",
                serde_json::json!({ "text": "# mine", "base": base })
            )
            .await,
        409
    );
    assert_eq!(
        std::fs::read_to_string(notebooks.join("team/a.md")).expect("read"),
        "# pulled from git\n"
    );
    assert_eq!(
        admin
            .put_notebook("new/b.md", serde_json::json!({ "text": "# B\n" }))
            .await,
        200
    );
    assert_eq!(
        std::fs::read_to_string(notebooks.join("new/b.md")).expect("saved"),
        "# B\n"
    );

    // Logging out ends the session.
    let (status, ..) = admin
        .send(
            reqwest::Method::DELETE,
            "/api/session",
            None,
            &[("X-Weir-CSRF", &csrf)],
        )
        .await;
    assert_eq!(status, 200);
    let (status, ..) = admin
        .send(reqwest::Method::GET, "/api/notebooks", None, &[])
        .await;
    assert_eq!(status, 401);

    // Failed console logins count toward the SQL port's limit: after 10 from one address,
    // both refuse it, the right password included.
    for _ in 0..10 {
        assert_eq!(admin.login("weir", "wrong").await, 403);
    }
    assert_eq!(admin.login("weir", ADMIN_PASSWORD).await, 429);
    let (ok, _, err) = weir.psql_c("SELECT 1");
    assert!(!ok && err.contains("too many failed logins"), "{err}");
}

#[tokio::test]
async fn under_auth_trust_the_console_needs_no_login_and_allows_ddl() {
    let dir = tempfile::tempdir().expect("tempdir");
    let weir = Weir::start_with(dir.path(), None, &["--auth".into(), "trust".into()], &[]);
    let mut client = Client::new(&weir);
    let (status, body, headers) = client
        .send(reqwest::Method::GET, "/api/session", None, &[])
        .await;
    assert_eq!(status, 200, "{body}");
    let session: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(session["admin"], true, "{session}");
    assert_eq!(session["auth"], "trust", "{session}");
    let cookie = headers["set-cookie"].to_str().expect("ascii");
    client.cookie = Some(cookie.split(';').next().expect("pair").to_string());
    client.csrf = session["csrf"].as_str().map(str::to_string);
    let (_, events) = client.run(STREAM).await;
    assert_eq!(events[0].0, "command", "{events:?}");
}

#[test]
fn the_console_in_chromium_runs_blocks_saves_and_shows_pipelines() {
    let dir = tempfile::tempdir().expect("tempdir");
    let notebooks = dir.path().join("notebooks");
    std::fs::create_dir_all(&notebooks).expect("mkdir");
    std::fs::write(notebooks.join("test.md"), NOTEBOOK).expect("write");
    let weir = start(dir.path(), &notebooks);
    let shots = repo_root().join("target/screenshots");
    std::fs::create_dir_all(&shots).expect("screenshots dir");
    let out = Command::new("node")
        .arg(repo_root().join("tests/browser/console.mjs"))
        .env("NODE_PATH", repo_root().join(".tools/node/node_modules"))
        .env("WEIR_URL", format!("http://127.0.0.1:{}/", weir.http_port))
        .env("ADMIN_USER", "weir")
        .env("ADMIN_PASSWORD", ADMIN_PASSWORD)
        .env("READ_USER", READER.0)
        .env("READ_PASSWORD", READER.1)
        .env("NOTEBOOK", "test.md")
        .env("VIEW", "per_second")
        .env("SCREENSHOTS", &shots)
        .output()
        .expect("node (scripts/install-test-deps.sh installs it and playwright-core)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the browser test failed:\n{stdout}\n{}\nweir's log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        weir.log_text()
    );
    let seen: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or_default()).expect("a JSON line");

    // The tail showed rows as they came; the chart gained points.
    assert!(
        seen["tail"]["later"].as_u64() > seen["tail"]["first"].as_u64(),
        "{seen}"
    );
    assert!(seen["tail"]["shown"].as_u64() >= Some(3), "{seen}");
    assert!(
        seen["chart"]["after"].as_u64() > seen["chart"]["before"].as_u64(),
        "{seen}"
    );
    // The error's position is the server's, as the API reports it for the same block.
    assert_eq!(seen["error"]["line"], 2, "{seen}");
    assert_eq!(seen["error"]["state"], "error", "{seen}");
    let column = seen["error"]["column"].as_u64().expect("column");
    let marked = seen["error"]["text"].as_str().expect("text");
    let caret_line = marked.lines().last().expect("caret line");
    assert_eq!(caret_line.len() as u64, column, "{marked}");
    // Saving wrote the file: the new text, and the blocks as they were.
    let saved = std::fs::read_to_string(notebooks.join("test.md")).expect("read");
    assert!(saved.starts_with(NOTEBOOK.trim_end()), "{saved}");
    assert!(saved.ends_with("Saved from the browser test."), "{saved}");
    // The pipelines page showed the view's rate and its operators.
    assert!(seen["pipelineRate"].as_f64() > Some(0.0), "{seen}");
    assert!(seen["operators"].as_u64() >= Some(3), "{seen}");
    assert!(
        seen["sink"].as_str().is_some_and(|s| s.contains("rows/s")),
        "{seen}"
    );
    // The read user ran the tail, was refused the DDL, and was not offered saving.
    assert!(
        seen["readDdl"]
            .as_str()
            .is_some_and(|s| s.contains("42501")),
        "{seen}"
    );
    assert_eq!(seen["readCanSave"], false, "{seen}");
    for shot in [
        "login.png",
        "notebook.png",
        "notebook-chart.png",
        "notebook-tail.png",
        "notebook-error.png",
        "pipelines.png",
    ] {
        let size = std::fs::metadata(shots.join(shot)).map_or(0, |m| m.len());
        assert!(size > 1000, "{shot}: {size} bytes");
    }
}
