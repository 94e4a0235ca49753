//! `weir bench front-door`: the SQL port as clients meet it. A `weir serve` child process
//! with SCRAM-SHA-256 logins and TLS required (a self-signed certificate from `openssl`); the
//! load comes from this process over loopback, so the server's CPU is its own.
//!
//! 1. Connections per second: each one a TLS handshake, a SCRAM-SHA-256 login (4096
//!    PBKDF2 iterations on both sides, as Postgres), `SELECT 1`, and a close; from 1 and
//!    from 8 concurrent clients.
//! 2. A 100 k-row materialized view (a bounded datagen stream), queried by 32 concurrent
//!    clients, each with its own connection, for `QUERY_SECONDS`: a prepared
//!    `SELECT ... WHERE vehicle_id = $1` (about 100 rows out of 100 k); queries per second,
//!    p50 and p99 latency.

use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres_rustls::MakeRustlsConnect;
use tokio_rustls::rustls;

use super::{BenchArgs, peak_rss_kib, process_cpu_seconds, process_peak_rss_kib};

const PASSWORD: &str = "bench-front-door";
const VIEW_ROWS: i64 = 100_000;
const CLIENTS: usize = 32;
const QUERY_SECONDS: u64 = 10;

/// The server child, killed when dropped.
pub(super) struct Server(pub(super) Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub async fn run(args: &BenchArgs) -> Result<ExitCode, String> {
    let dir = args.dir.join("front-door");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    self_signed(&cert, &key)?;
    let pg_port = free_port()?;
    let http_port = free_port()?;
    let server = Server(
        serve_command(&dir, pg_port, http_port)?
            .arg("--pg-tls-cert")
            .arg(&cert)
            .arg("--pg-tls-key")
            .arg(&key)
            .arg("--pg-tls-required")
            .env("WEIR_ADMIN_PASSWORD", PASSWORD)
            .spawn()
            .map_err(|e| format!("cannot start weir serve: {e}"))?,
    );
    let pid = server.0.id().to_string();
    let tls = client_tls(&cert)?;
    let conninfo = format!(
        "host=127.0.0.1 port={pg_port} user=weir password={PASSWORD} dbname=weir sslmode=require"
    );
    let ready = Instant::now();
    while let Err(e) = connect(&conninfo, &tls).await {
        if ready.elapsed() > Duration::from_secs(30) {
            return Err(format!(
                "weir serve did not accept a TLS login within 30 s: {e}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    println!("front door: SCRAM-SHA-256 + TLS (rustls, ECDSA P-256), loopback");
    for workers in [1, 8] {
        let total = 400;
        let server_cpu = process_cpu_seconds(&pid);
        let started = Instant::now();
        let tasks: Vec<_> = (0..workers)
            .map(|_| {
                let (conninfo, tls) = (conninfo.clone(), tls.clone());
                tokio::spawn(async move {
                    for _ in 0..total / workers {
                        let client = connect(&conninfo, &tls).await?;
                        client
                            .simple_query("SELECT 1")
                            .await
                            .map_err(|e| e.to_string())?;
                    }
                    Ok::<_, String>(())
                })
            })
            .collect();
        for task in tasks {
            task.await.map_err(|e| e.to_string())??;
        }
        let seconds = started.elapsed().as_secs_f64();
        let cpu = process_cpu_seconds(&pid) - server_cpu;
        println!(
            "  connections, {workers} client(s): {total} in {seconds:.2} s = {:.0} connections/s; server CPU {:.2} ms per connection",
            total as f64 / seconds,
            cpu * 1000.0 / total as f64
        );
    }

    let admin = connect(&conninfo, &tls).await?;
    admin
        .batch_execute(&format!(
            "CREATE STREAM vehicles (vehicle_id BIGINT, speed_kmh DOUBLE, status TEXT, ts TIMESTAMP) \
               WITH (connector = 'datagen', rows_per_second = 0, max_rows = {VIEW_ROWS}, cardinality = 1000, seed = 1);
             CREATE MATERIALIZED VIEW fleet AS SELECT vehicle_id, speed_kmh, status, ts FROM vehicles"
        ))
        .await
        .map_err(|e| e.to_string())?;
    let filled = Instant::now();
    loop {
        let n: i64 = admin
            .query_one("SELECT count(*) FROM fleet", &[])
            .await
            .map_err(|e| e.to_string())?
            .get(0);
        if n >= VIEW_ROWS {
            break;
        }
        if filled.elapsed() > Duration::from_secs(120) {
            return Err(format!(
                "the view holds {n} of {VIEW_ROWS} rows after 120 s"
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let server_cpu = process_cpu_seconds(&pid);
    let deadline = Instant::now() + Duration::from_secs(QUERY_SECONDS);
    let started = Instant::now();
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (conninfo, tls) = (conninfo.clone(), tls.clone());
            tokio::spawn(async move {
                let client = connect(&conninfo, &tls).await?;
                let statement = client
                    .prepare(
                        "SELECT vehicle_id, speed_kmh, status FROM fleet WHERE vehicle_id = $1",
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                let mut latencies = Vec::new();
                // datagen's vehicle ids run from 1 to the cardinality.
                let mut id = c as i64;
                while Instant::now() < deadline {
                    id = (id * 7919 + 13) % 1000 + 1;
                    let at = Instant::now();
                    let rows = client
                        .query(&statement, &[&id])
                        .await
                        .map_err(|e| e.to_string())?;
                    latencies.push(at.elapsed());
                    if rows.is_empty() {
                        return Err(format!("no rows for vehicle {id}"));
                    }
                }
                Ok::<_, String>(latencies)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.map_err(|e| e.to_string())??);
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu = process_cpu_seconds(&pid) - server_cpu;
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    println!(
        "  SELECT on a {VIEW_ROWS}-row view, {CLIENTS} clients for {QUERY_SECONDS} s: {} queries = {:.0} queries/s; latency p50 {:.1} ms, p99 {:.1} ms; server CPU {:.2} s ({:.2} ms per query)",
        latencies.len(),
        latencies.len() as f64 / seconds,
        at(0.5).as_secs_f64() * 1000.0,
        at(0.99).as_secs_f64() * 1000.0,
        cpu,
        cpu * 1000.0 / latencies.len() as f64
    );
    println!(
        "  peak RSS: server {} MiB, load generator {} MiB",
        process_peak_rss_kib(&pid) / 1024,
        peak_rss_kib() / 1024
    );
    drop(server);
    Ok(ExitCode::SUCCESS)
}

/// A self-signed ECDSA certificate for 127.0.0.1, by `openssl` (on every Debian machine).
fn self_signed(cert: &Path, key: &Path) -> Result<(), String> {
    let status = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        // A leaf, not a CA (openssl's default), for rustls to accept it as a server's.
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .args(["-addext", "extendedKeyUsage=serverAuth"])
        .arg("-keyout")
        .arg(key)
        .arg("-out")
        .arg(cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| format!("cannot run openssl: {e}"))?;
    if !status.success() {
        return Err("openssl could not make a certificate".into());
    }
    Ok(())
}

/// rustls trusting exactly `cert`.
fn client_tls(cert: &Path) -> Result<MakeRustlsConnect, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(cert).map_err(|e| e.to_string())? {
        roots
            .add(cert.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

async fn connect(
    conninfo: &str,
    tls: &MakeRustlsConnect,
) -> Result<tokio_postgres::Client, String> {
    let (client, connection) = tokio_postgres::connect(conninfo, tls.clone())
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    Ok(client)
}

/// `weir serve` (this executable) on the given loopback ports with its data under `dir`,
/// logging warnings only; the caller adds its options and spawns it.
pub(super) fn serve_command(dir: &Path, pg_port: u16, http_port: u16) -> Result<Command, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut command = Command::new(exe);
    command
        .arg("serve")
        .args(["--pg-listen", &format!("127.0.0.1:{pg_port}")])
        .args(["--http-listen", &format!("127.0.0.1:{http_port}")])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    Ok(command)
}

pub(super) fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| e.to_string())
}
