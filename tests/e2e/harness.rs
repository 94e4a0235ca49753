//! Starts and stops `weir serve` on free ports; runs psql; finds DuckDB.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The `weir` binary under test (built by the test script before the tests run).
pub fn weir_bin() -> PathBuf {
    if let Ok(bin) = std::env::var("WEIR_BIN") {
        return PathBuf::from(bin);
    }
    let root = repo_root();
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target"));
    let bin = target.join("debug").join("weir");
    assert!(
        bin.exists(),
        "{} not found: build it first (cargo build --bin weir) or set WEIR_BIN",
        bin.display()
    );
    bin
}

/// `weir run FILE`, which must exit 0.
pub fn weir_run(sql: &Path) {
    let out = Command::new(weir_bin())
        .arg("run")
        .arg(sql)
        .output()
        .expect("weir run");
    assert!(
        out.status.success(),
        "weir run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The admin password every test server starts with (`WEIR_ADMIN_PASSWORD`): tests log in
/// with SCRAM, the default, like users do.
pub const ADMIN_PASSWORD: &str = "weir-e2e-admin";

/// A running `weir serve`, killed on drop.
pub struct Weir {
    child: Option<Child>,
    pub pg_port: u16,
    pub http_port: u16,
    log: PathBuf,
}

impl Weir {
    /// Starts `weir serve` in `work_dir` with its catalog in `work_dir/weir-data`.
    pub fn start(work_dir: &Path, queries: Option<&Path>) -> Weir {
        Weir::start_with(work_dir, queries, &[], &[])
    }

    /// [`Weir::start`] with more arguments to `weir serve` and environment variables.
    pub fn start_with(
        work_dir: &Path,
        queries: Option<&Path>,
        args: &[String],
        env: &[(String, String)],
    ) -> Weir {
        static STARTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = work_dir.join(format!("weir-{n}.log"));
        let mut command = Command::new(weir_bin());
        // Port 0: weir binds ports the system chooses and logs them (`weir is serving`), so
        // no other server can take a port between its choice and weir's bind.
        command
            .current_dir(work_dir)
            .arg("serve")
            .arg("--pg-listen")
            .arg("127.0.0.1:0")
            .arg("--http-listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(work_dir.join("weir-data"))
            // Frequent checkpoints: sinks publish sooner, and every test exercises them.
            .arg("--checkpoint-interval")
            .arg("1s")
            .env("WEIR_ADMIN_PASSWORD", ADMIN_PASSWORD)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"));
        if let Some(queries) = queries {
            command.arg("--queries").arg(queries);
        }
        command.args(args).envs(env.iter().map(|(k, v)| (k, v)));
        let child = command.spawn().expect("spawn weir serve");
        let mut weir = Weir {
            child: Some(child),
            pg_port: 0,
            http_port: 0,
            log,
        };
        weir.wait_ready();
        weir
    }

    /// Waits for the log's `weir is serving pg=<addr> http=<addr>` and takes the ports.
    fn wait_ready(&mut self) {
        let port = |line: &str, key: &str| -> Option<u16> {
            let addr = line.split_whitespace().find_map(|w| w.strip_prefix(key))?;
            addr.rsplit_once(':')?.1.parse().ok()
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let log = self.log_text();
            if let Some(line) = log.lines().find(|l| l.contains("weir is serving"))
                && let (Some(pg), Some(http)) = (port(line, "pg="), port(line, "http="))
            {
                self.pg_port = pg;
                self.http_port = http;
                return;
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "weir serve exited early with {status}:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("weir serve did not become ready:\n{}", self.log_text());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGTERM, then wait for a graceful exit; returns whether it exited with status 0.
    pub fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(40);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    /// SIGKILL: no last checkpoint, nothing flushed.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn conn_string(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=weir password={ADMIN_PASSWORD} dbname=weir connect_timeout=10",
            self.pg_port
        )
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, connection) =
            tokio_postgres::connect(&self.conn_string(), tokio_postgres::NoTls)
                .await
                .unwrap_or_else(|e| panic!("connect: {e}\n{}", self.log_text()));
        tokio::spawn(async move {
            let _ = connection.await;
        });
        client
    }

    /// Runs psql with `args` (after the connection options), returning its output.
    pub fn psql(&self, args: &[&str]) -> Output {
        Command::new("psql")
            .args([
                "-X",
                "-h",
                "127.0.0.1",
                "-p",
                &self.pg_port.to_string(),
                "-U",
                "weir",
                "-d",
                "weir",
            ])
            .args(args)
            .env("PGCONNECT_TIMEOUT", "10")
            .env("PGPASSWORD", ADMIN_PASSWORD)
            .output()
            .expect("psql is installed (scripts/test.sh installs it)")
    }

    /// `psql -c sql` in verbose-error mode; returns (success, stdout, stderr).
    pub fn psql_c(&self, sql: &str) -> (bool, String, String) {
        let out = self.psql(&["-v", "VERBOSITY=verbose", "-A", "-F", "|", "-c", sql]);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    }

    pub fn http_get(&self, path: &str) -> String {
        http_get(self.http_port, path).unwrap_or_else(|e| {
            let pid = self.child.as_ref().map(Child::id).unwrap_or_default();
            let state = std::fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find(|l| l.starts_with("State:"))
                        .map(str::to_string)
                })
                .unwrap_or_else(|| "gone".to_string());
            panic!(
                "weir (pid {pid}, {state}) does not answer GET {path}: {e}\n{}",
                self.log_text()
            )
        })
    }

    /// `GET /health`'s JSON.
    pub fn health(&self) -> serde_json::Value {
        let response = self.http_get("/health");
        let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        serde_json::from_str(body).unwrap_or_else(|e| panic!("/health is JSON: {e}: {response}"))
    }

    /// The process's resident set size in bytes (Linux).
    pub fn rss_bytes(&self) -> u64 {
        let pid = self.child.as_ref().map(Child::id).unwrap_or_default();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }
}

/// `GET path` on 127.0.0.1:`port` (HTTP/1.0: the whole response, never chunked); the
/// status line, headers and body as one string.
pub fn http_get(port: u16, path: &str) -> std::io::Result<String> {
    http_request(port, "GET", path)
}

/// An HTTP/1.0 request without a body; the whole response.
pub fn http_request(port: u16, method: &str, path: &str) -> std::io::Result<String> {
    http_bytes(port, method, path).map(|r| String::from_utf8_lossy(&r).into_owned())
}

/// An HTTP/1.0 request without a body; the whole response, as bytes.
pub fn http_bytes(port: u16, method: &str, path: &str) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n"
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    Ok(response)
}

impl Drop for Weir {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Python with DuckDB (scripts/test.sh makes a venv); `WEIR_TEST_PYTHON` overrides.
pub fn duckdb_python() -> PathBuf {
    if let Ok(python) = std::env::var("WEIR_TEST_PYTHON") {
        return PathBuf::from(python);
    }
    let venv = repo_root().join(".venv/bin/python");
    assert!(
        venv.exists(),
        "{} not found: run scripts/test.sh (it installs DuckDB)",
        venv.display()
    );
    venv
}

/// Runs a DuckDB SQL query, returning rows as tab-separated lines.
pub fn duckdb(sql: &str) -> Vec<String> {
    try_duckdb(sql).unwrap_or_else(|e| panic!("duckdb failed on {sql}:\n{e}"))
}

/// [`duckdb`], or its error (e.g. "No files found" while a lake is still empty).
pub fn try_duckdb(sql: &str) -> Result<Vec<String>, String> {
    // No progress bar: DuckDB draws it on stdout for queries that run over a second.
    let script = "import duckdb, sys\ncon = duckdb.connect()\ncon.execute('SET enable_progress_bar = false')\nfor row in con.sql(sys.argv[1]).fetchall():\n    print('\\t'.join('NULL' if v is None else str(v) for v in row))\n";
    let out = Command::new(duckdb_python())
        .arg("-c")
        .arg(script)
        .arg(sql)
        .output()
        .expect("python runs");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).to_string());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect())
}

/// Polls `check` until it returns `Some`, for at most `timeout`.
pub fn eventually<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A tansu broker (Kafka protocol) on a free port, storing into SQLite under its own
/// directory, so that it can be killed and restarted with its records and offsets intact.
pub struct Tansu {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
}

fn tansu_bin() -> PathBuf {
    if let Ok(bin) = std::env::var("TANSU_BIN") {
        return PathBuf::from(bin);
    }
    let bin = repo_root().join(".tools/bin/tansu");
    assert!(
        bin.exists(),
        "{} not found: run scripts/install-test-deps.sh (or set TANSU_BIN)",
        bin.display()
    );
    bin
}

impl Tansu {
    pub fn start(dir: &Path) -> Tansu {
        let dir = dir.join("tansu");
        std::fs::create_dir_all(&dir).expect("tansu dir");
        let mut tansu = Tansu {
            child: None,
            port: free_port(),
            dir,
        };
        tansu.restart();
        tansu
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts (again) on the same port and storage; waits until it accepts connections.
    pub fn restart(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("tansu.log"))
            .expect("tansu log");
        let child = Command::new(tansu_bin())
            .current_dir(&self.dir)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "sqlite://tansu.db"])
            // tansu logs to standard output: errors, and its group coordinator's few lines
            // (a new leader, a member dropped for a missed heartbeat) for a failed test's
            // message.
            .env("RUST_LOG", "error,tansu_broker::coordinator=info")
            .stdout(log.try_clone().expect("tansu log"))
            .stderr(log)
            .spawn()
            .expect("spawn tansu");
        self.child = Some(child);
        let ready = eventually(Duration::from_secs(30), || {
            std::net::TcpStream::connect(("127.0.0.1", self.port))
                .ok()
                .map(|_| ())
        });
        assert!(ready.is_some(), "tansu did not start: {}", self.log_text());
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Creates `name` with `partitions` partitions. Tried again while it fails: a busy
    /// tansu accepts connections a moment before it answers them ("early eof").
    pub fn create_topic(&self, name: &str, partitions: u32) {
        let mut failed = String::new();
        let created = eventually(Duration::from_secs(30), || {
            let output = Command::new(tansu_bin())
                .current_dir(&self.dir)
                .args(["topic", "create", "--broker"])
                .arg(format!("tcp://127.0.0.1:{}", self.port))
                .args(["--partitions", &partitions.to_string(), name])
                .output()
                .expect("tansu topic create");
            failed = String::from_utf8_lossy(&output.stderr).into_owned();
            (output.status.success() || self.partitions(name) == Some(partitions)).then_some(())
        });
        assert!(created.is_some(), "cannot create topic {name}: {failed}");
    }

    /// How many partitions `topic` has, if it exists.
    fn partitions(&self, topic: &str) -> Option<u32> {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let client: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .create()
            .ok()?;
        let metadata = client
            .fetch_metadata(Some(topic), Duration::from_secs(5))
            .ok()?;
        let topic = metadata.topics().first()?;
        (topic.error().is_none() && !topic.partitions().is_empty())
            .then(|| topic.partitions().len() as u32)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.join("tansu.log")).unwrap_or_default()
    }
}

/// A record for [`produce`]: partitioned by key (or round robin) unless a partition is given.
#[derive(Default)]
pub struct Record {
    pub partition: Option<i32>,
    pub key: Option<String>,
    pub payload: String,
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Produces `records` to `topic` on the broker at `bootstrap`, waiting for the broker to
/// have every one.
pub fn produce(bootstrap: &str, topic: &str, records: impl IntoIterator<Item = Record>) {
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
    let producer: ThreadedProducer<DefaultProducerContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "20")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "200000")
        // One request in flight: a partition keeps the order records were sent in (with
        // several, the broker may append concurrent batches in another order).
        .set("max.in.flight.requests.per.connection", "1")
        .create()
        .expect("producer");
    for r in records {
        let mut record = BaseRecord::<str, str>::to(topic).payload(&r.payload);
        if let Some(key) = &r.key {
            record = record.key(key);
        }
        if let Some(partition) = r.partition {
            record = record.partition(partition);
        }
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, back)) => {
                    record = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(120)).expect("flush");
}

/// A Prometheus server (Debian's 2.42) with the remote-write receiver, on a free port, its
/// TSDB under its own directory so that it can be stopped and started again on it.
pub struct Prometheus {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
}

impl Prometheus {
    pub fn start(dir: &Path) -> Prometheus {
        let dir = dir.join("prometheus");
        std::fs::create_dir_all(&dir).expect("prometheus dir");
        std::fs::write(
            dir.join("prometheus.yml"),
            "global: {scrape_interval: 15s}\nscrape_configs: []\n",
        )
        .expect("prometheus config");
        let mut prometheus = Prometheus {
            child: None,
            port: free_port(),
            dir,
        };
        prometheus.restart();
        prometheus
    }

    /// The remote-write endpoint.
    pub fn write_url(&self) -> String {
        format!("http://127.0.0.1:{}/api/v1/write", self.port)
    }

    /// Starts (again) on the same port and TSDB; waits until `/-/ready` answers 200.
    pub fn restart(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("prometheus.log"))
            .expect("prometheus log");
        let child = Command::new("prometheus")
            .current_dir(&self.dir)
            .arg(format!(
                "--config.file={}",
                self.dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                self.dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{}", self.port))
            .arg("--web.enable-remote-write-receiver")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn prometheus (scripts/install-test-deps.sh installs it)");
        self.child = Some(child);
        let ready = eventually(Duration::from_secs(60), || {
            http_get(self.port, "/-/ready")
                .ok()
                .filter(|r| r.starts_with("HTTP/1.0 200") || r.starts_with("HTTP/1.1 200"))
        });
        assert!(
            ready.is_some(),
            "prometheus did not start: {}",
            self.log_text()
        );
    }

    /// Stops it the way a service manager does (SIGTERM), waiting for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").arg(child.id().to_string()).status();
            let _ = child.wait();
        }
    }

    /// The JSON `data.result` of an instant query at `time` (seconds since the epoch).
    pub fn query(&self, query: &str, time: f64) -> Vec<serde_json::Value> {
        let params = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("query", query)
            .append_pair("time", &time.to_string())
            .finish();
        let response =
            http_get(self.port, &format!("/api/v1/query?{params}")).expect("prometheus answers");
        let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
        let json: serde_json::Value = serde_json::from_str(body)
            .unwrap_or_else(|e| panic!("prometheus answered {response}: {e}"));
        assert_eq!(json["status"], "success", "{json}");
        json["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A PostgreSQL server (Debian's) on a free port, its cluster under its own directory, so
/// that it can be stopped and started again on it. As root (CI), the server runs as the
/// `postgres` user the Debian package creates: PostgreSQL refuses to run as root.
pub struct Postgres {
    pub port: u16,
    dir: PathBuf,
    running: bool,
}

/// The directory of Debian's PostgreSQL server programs (`initdb`, `pg_ctl`).
fn postgres_bin() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is installed (scripts/install-test-deps.sh installs it)")
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop().expect("a PostgreSQL with initdb")
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|u| u.split_whitespace().next().map(|u| u == "0"))
        })
        .unwrap_or(false)
}

impl Postgres {
    /// initdb (trust authentication on 127.0.0.1) and start; waits until it accepts queries.
    pub fn start(dir: &Path) -> Postgres {
        let base = dir;
        let dir = dir.join("postgres");
        std::fs::create_dir_all(&dir).expect("postgres dir");
        if is_root() {
            // A test's temporary directory is 0700: let the postgres user reach its cluster.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(base, std::fs::Permissions::from_mode(0o755)).expect("chmod");
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir)
                .status()
                .expect("chown");
            assert!(status.success(), "chown the cluster directory to postgres");
        }
        let out = Self::command("initdb")
            .args(["-D"])
            .arg(dir.join("data"))
            .args(["-U", "postgres", "-A", "trust", "--no-sync"])
            .output()
            .expect("initdb");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut postgres = Postgres {
            port: free_port(),
            dir,
            running: false,
        };
        postgres.restart();
        postgres
    }

    /// A server program, run as `postgres` when this process is root.
    fn command(program: &str) -> Command {
        let path = postgres_bin().join(program);
        if is_root() {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(path);
            command
        } else {
            Command::new(path)
        }
    }

    /// Starts (again) on the same port and cluster.
    pub fn restart(&mut self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.display()
        );
        let out = Self::command("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(self.dir.join("postgres.log"))
            .args(["-o", &options, "-w", "-t", "60", "start"])
            .output()
            .expect("pg_ctl start");
        assert!(
            out.status.success(),
            "pg_ctl start: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        self.running = true;
    }

    /// Stops it (fast shutdown: clients are disconnected), waiting for it to exit.
    pub fn stop(&mut self) {
        if !self.running {
            return;
        }
        let _ = Self::command("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "fast", "-w", "stop"])
            .output();
        self.running = false;
    }

    /// The URL Weir's `postgres` table connector takes.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(
            &format!(
                "host=127.0.0.1 port={} user=postgres dbname=postgres",
                self.port
            ),
            tokio_postgres::NoTls,
        )
        .await
        .unwrap_or_else(|e| panic!("connect to postgres: {e}\n{}", self.log_text()));
        tokio::spawn(async move {
            let _ = connection.await;
        });
        client
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An S3-compatible server (moto, from the venv `scripts/install-test-deps.sh` makes) on a free
/// port, killed on drop.
pub struct S3 {
    child: Child,
    pub port: u16,
    dir: PathBuf,
}

impl S3 {
    pub fn start(dir: &Path) -> S3 {
        let dir = dir.join("s3");
        std::fs::create_dir_all(&dir).expect("s3 dir");
        let port = free_port();
        let server = duckdb_python().with_file_name("moto_server");
        let child = Command::new(&server)
            .current_dir(&dir)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("moto.log")).expect("moto log"))
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "spawn {} (scripts/install-test-deps.sh installs it): {e}",
                    server.display()
                )
            });
        let s3 = S3 { child, port, dir };
        let ready = eventually(Duration::from_secs(60), || {
            http_get(port, "/")
                .ok()
                .filter(|r| r.starts_with("HTTP/1."))
        });
        assert!(ready.is_some(), "moto did not start: {}", s3.log_text());
        s3
    }

    /// Creates bucket `name` (the server checks no signature).
    pub fn create_bucket(&self, name: &str) {
        let response = http_request(self.port, "PUT", &format!("/{name}")).expect("moto answers");
        assert!(
            response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200"),
            "{response}"
        );
    }

    /// The keys under `prefix` in `bucket` (a ListObjectsV2 of up to 1000 keys).
    pub fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let response = http_get(self.port, &format!("/{bucket}?list-type=2&prefix={prefix}"))
            .expect("moto answers");
        assert!(
            !response.contains("<IsTruncated>true"),
            "more than 1000 keys under {prefix}"
        );
        response
            .split("<Key>")
            .skip(1)
            .filter_map(|k| k.split("</Key>").next())
            .map(str::to_string)
            .collect()
    }

    /// The keys of the multipart uploads in progress in `bucket`.
    pub fn uploads(&self, bucket: &str) -> Vec<String> {
        let response = http_get(self.port, &format!("/{bucket}?uploads")).expect("moto answers");
        response
            .split("<Upload>")
            .skip(1)
            .filter_map(|u| u.split("<Key>").nth(1)?.split("</Key>").next())
            .map(str::to_string)
            .collect()
    }

    /// The object `key` of `bucket`.
    pub fn get(&self, bucket: &str, key: &str) -> Vec<u8> {
        let response =
            http_bytes(self.port, "GET", &format!("/{bucket}/{key}")).expect("moto answers");
        let split = response
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("an HTTP response");
        let head = String::from_utf8_lossy(&response[..split]);
        assert!(head.contains(" 200 "), "GET {key}: {head}");
        response[split + 4..].to_vec()
    }

    /// Copies the keys under `prefix` ending in `suffix` to `dir`, keeping their paths below
    /// `prefix`, and skipping those copied before (published objects never change).
    pub fn mirror(&self, bucket: &str, prefix: &str, suffix: &str, dir: &Path) {
        for key in self.keys(bucket, prefix) {
            let Some(relative) = key.strip_prefix(prefix).filter(|_| key.ends_with(suffix)) else {
                continue;
            };
            let path = dir.join(relative.trim_start_matches('/'));
            if path.exists() {
                continue;
            }
            std::fs::create_dir_all(path.parent().expect("a parent")).expect("mirror dir");
            let partial = path.with_extension("partial");
            std::fs::write(&partial, self.get(bucket, &key)).expect("mirror file");
            std::fs::rename(&partial, &path).expect("mirror file");
        }
    }

    /// The environment that points `weir` at this server.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT", format!("http://127.0.0.1:{}", self.port)),
            ("AWS_ALLOW_HTTP", "true".to_string()),
            ("AWS_ACCESS_KEY_ID", "test".to_string()),
            ("AWS_SECRET_ACCESS_KEY", "test".to_string()),
            ("AWS_REGION", "us-east-1".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.join("moto.log")).unwrap_or_default()
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
