//! The `weir` command line: `serve`, `run`, `check`, `bench`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use weir_connectors::Connectors;
use weir_connectors::paths::AllowedPaths;
use weir_planner::PlanError;
use weir_server::engine::{Engine, EngineConfig};
use weir_server::pg::auth::{Auth, AuthMode};
use weir_sql::Statement;
use weir_sql::parser::parse_sql_with_positions;

mod bench;

/// How long pipelines get to flush on SIGINT/SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Weir: a streaming SQL engine.
#[derive(Parser)]
#[command(name = "weir", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve Postgres-wire clients (psql) and HTTP /metrics, running every pipeline.
    Serve {
        /// Postgres wire protocol address.
        #[arg(long, default_value = "127.0.0.1:5433")]
        pg_listen: SocketAddr,
        /// HTTP address for /health and /metrics.
        #[arg(long, default_value = "127.0.0.1:9464")]
        http_listen: SocketAddr,
        /// Where the catalog is kept (restored on restart).
        #[arg(long, default_value = "./weir-data")]
        data_dir: PathBuf,
        /// Run every *.sql file in this directory at start (objects already in the catalog
        /// are kept as they are).
        #[arg(long)]
        queries: Option<PathBuf>,
        /// The web console's notebooks: Markdown files (*.md) with ```sql blocks, under this
        /// directory.
        #[arg(long, default_value = "queries")]
        notebooks: PathBuf,
        /// How often each job checkpoints (a view's or sink's 'checkpoint.interval'
        /// overrides it), e.g. 10s.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        checkpoint_interval: std::time::Duration,
        /// Where checkpoints are kept: a directory, or s3://bucket/prefix, gs://, az://
        /// (credentials from the usual environment variables). Default: <data-dir>/checkpoints.
        #[arg(long)]
        checkpoint_store: Option<String>,
        /// How SQL clients log in: `scram` (SCRAM-SHA-256 with the users CREATE USER makes;
        /// the first start creates the admin `weir`), or `trust` (no password, every client
        /// is an admin: local demos only).
        #[arg(long, value_enum, default_value = "scram")]
        auth: AuthMode,
        /// PEM certificate chain for TLS on the SQL port (with --pg-tls-key).
        #[arg(long, requires = "pg_tls_key")]
        pg_tls_cert: Option<PathBuf>,
        /// PEM private key for TLS on the SQL port (with --pg-tls-cert).
        #[arg(long, requires = "pg_tls_cert")]
        pg_tls_key: Option<PathBuf>,
        /// Refuse SQL connections that do not use TLS.
        #[arg(long, requires = "pg_tls_cert")]
        pg_tls_required: bool,
        /// A directory whose files `file` and `parquet` connectors (and `*_file` options) may
        /// use; repeat for more. The data directory is always allowed. Default: the data
        /// directory and the working directory.
        #[arg(long = "allow-path", value_name = "DIR")]
        allow_paths: Vec<PathBuf>,
        /// Workers per pipeline over Kafka, each reading a share of the partitions, with
        /// rows exchanged by key before a window. Default: the number of cores.
        #[arg(long)]
        workers: Option<usize>,
        #[command(flatten)]
        cluster: ClusterArgs,
        /// With --cluster: the address (host:port) at which the other processes reach this
        /// one's HTTP port, to gather a view's rows. Default: --http-listen's, unless that
        /// listens on every interface.
        #[arg(long, requires = "cluster")]
        cluster_advertise: Option<String>,
    },
    /// Run pipelines headless until SIGINT/SIGTERM, or until every source is bounded and done.
    Run {
        /// SQL files, executed in order.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Workers per pipeline over Kafka (see `serve --workers`).
        #[arg(long)]
        workers: Option<usize>,
        /// Where checkpoints are kept (see `serve --checkpoint-store`). Without it, `run`
        /// keeps no state across restarts.
        #[arg(long)]
        checkpoint_store: Option<String>,
        #[command(flatten)]
        cluster: ClusterArgs,
    },
    /// Parse and plan SQL files offline; print `file:line:col: message` per error.
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Benchmarks: print events/s, events per CPU-second and peak RSS.
    Bench(bench::BenchArgs),
}

/// Sharing pipelines with other processes.
#[derive(clap::Args, Debug)]
struct ClusterArgs {
    /// Share every Kafka-sourced pipeline with the processes started with the same name
    /// and SQL: Kafka's groups spread the partitions, a repartition topic brings each key to
    /// one process, and state moves through the checkpoint store, which must be one they
    /// all reach (a shared directory or s3://).
    #[arg(long, requires = "checkpoint_store")]
    cluster: Option<String>,
    /// With --cluster: send rows through the repartition topic instead of partial window
    /// aggregates (for measuring what pre-aggregation saves).
    #[arg(long, requires = "cluster")]
    no_pre_aggregate: bool,
    /// With --cluster: how often the instances reading Kafka commit what they sent through
    /// a repartition topic, e.g. 200ms. Their checkpoints hold offsets, no state, and a
    /// window's result waits for its events' commit: shorter cuts that latency, at a
    /// manifest written (and one deleted) in the checkpoint store per source partition per
    /// commit. Default (and at most): the checkpoint interval.
    #[arg(long, requires = "cluster", value_parser = parse_duration)]
    cluster_commit_interval: Option<std::time::Duration>,
}

impl ClusterArgs {
    fn config(&self) -> Option<weir_server::engine::ClusterConfig> {
        self.cluster
            .as_ref()
            .map(|name| weir_server::engine::ClusterConfig {
                name: name.clone(),
                pre_aggregate: !self.no_pre_aggregate,
                advertise: None,
                commit_interval: self.cluster_commit_interval,
            })
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WEIR_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve {
                pg_listen,
                http_listen,
                data_dir,
                queries,
                notebooks,
                checkpoint_interval,
                checkpoint_store,
                auth,
                pg_tls_cert,
                pg_tls_key,
                pg_tls_required,
                allow_paths,
                workers,
                cluster,
                cluster_advertise,
            } => {
                let mut roots = allow_paths;
                if roots.is_empty() {
                    roots.push(PathBuf::from("."));
                }
                roots.push(data_dir.clone());
                let config = EngineConfig {
                    data_dir: Some(data_dir),
                    checkpoint_interval: Some(checkpoint_interval),
                    checkpoint_store,
                    checkpoints_retained: None,
                    workers,
                    cluster: cluster.config(),
                };
                let tls = match (pg_tls_cert, pg_tls_key) {
                    (Some(cert), Some(key)) => Some((cert, key)),
                    _ => None,
                };
                let front_door = FrontDoor {
                    auth,
                    tls,
                    tls_required: pg_tls_required,
                };
                let listen = Listen {
                    pg: pg_listen,
                    http: http_listen,
                    advertise: cluster_advertise,
                };
                serve(listen, config, queries, notebooks, front_door, roots).await
            }
            Command::Run {
                files,
                workers,
                checkpoint_store,
                cluster,
            } => {
                let config = EngineConfig {
                    workers,
                    checkpoint_store,
                    cluster: cluster.config(),
                    ..EngineConfig::default()
                };
                run(&files, config).await
            }
            Command::Check { files } => check(&files).await,
            Command::Bench(args) => bench::run(args).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// How the SQL port lets clients in.
struct FrontDoor {
    auth: AuthMode,
    /// Certificate chain and key files.
    tls: Option<(PathBuf, PathBuf)>,
    tls_required: bool,
}

/// Where `serve` listens, and the HTTP address it gives its cluster's other processes.
struct Listen {
    pg: SocketAddr,
    http: SocketAddr,
    advertise: Option<String>,
}

async fn serve(
    listen: Listen,
    mut config: EngineConfig,
    queries: Option<PathBuf>,
    notebooks: PathBuf,
    front_door: FrontDoor,
    allowed_roots: Vec<PathBuf>,
) -> Result<ExitCode, String> {
    let data_dir = config.data_dir.clone().unwrap_or_default();
    let paths = AllowedPaths::under(allowed_roots)
        .map_err(|e| format!("cannot resolve the allowed paths (--allow-path): {e}"))?;
    let tls = match &front_door.tls {
        Some((cert, key)) => Some(weir_server::pg::tls::acceptor(cert, key)?),
        None => None,
    };
    let allowed = paths
        .roots()
        .unwrap_or_default()
        .iter()
        .map(|r| r.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    tracing::info!(%allowed, "connectors may use files under these directories");
    let (pg_listen, http_listen) = (listen.pg, listen.http);
    let http = tokio::net::TcpListener::bind(http_listen)
        .await
        .map_err(|e| format!("cannot listen on {http_listen} (--http-listen): {e}"))?;
    if let Some(cluster) = config.cluster.as_mut() {
        let bound = http
            .local_addr()
            .map_err(|e| format!("--http-listen {http_listen}: {e}"))?;
        cluster.advertise = match listen.advertise {
            Some(address) => Some(address),
            None if bound.ip().is_unspecified() => {
                return Err(format!(
                    "--http-listen {http_listen} listens on every interface: say with --cluster-advertise host:port where the other processes of the cluster reach it"
                ));
            }
            None => Some(bound.to_string()),
        };
    }
    let engine = Engine::open(config, Arc::new(Connectors::confined(paths)))
        .await
        .map_err(|e| e.to_string())?;
    create_first_admin(&engine)?;
    let auth = Arc::new(Auth::new(
        front_door.auth,
        front_door.tls_required,
        engine.users().clone(),
        engine.metrics().clone(),
    ));
    if let Some(dir) = queries {
        for file in sql_files(&dir)? {
            load_file(&engine, &file, true).await?;
        }
    }
    engine.start_all().await.map_err(|e| e.to_string())?;
    let pg = tokio::net::TcpListener::bind(pg_listen)
        .await
        .map_err(|e| format!("cannot listen on {pg_listen} (--pg-listen): {e}"))?;
    // The addresses bound (a port 0 asked for is the one the system chose).
    let bound = |l: &tokio::net::TcpListener, asked: SocketAddr| l.local_addr().unwrap_or(asked);
    tracing::info!(pg = %bound(&pg, pg_listen), http = %bound(&http, http_listen),
        data_dir = %data_dir.display(), "weir is serving");
    if front_door.auth == AuthMode::Trust {
        tracing::warn!("--auth trust: every SQL client is an admin, without a password");
    }
    let console = Arc::new(weir_server::console::Console::new(
        engine.clone(),
        auth.clone(),
        notebooks,
    ));
    let pg_task = tokio::spawn(weir_server::pg::serve(pg, engine.clone(), auth, tls));
    let http_task = tokio::spawn(weir_server::http::serve(http, engine.clone(), console));
    wait_for_signal().await;
    tracing::info!("stopping: each pipeline takes a last checkpoint");
    pg_task.abort();
    http_task.abort();
    engine.shutdown(SHUTDOWN_GRACE).await;
    Ok(ExitCode::SUCCESS)
}

/// On a first start, the admin user `weir`, with `WEIR_ADMIN_PASSWORD` or a generated password
/// printed once here (only its verifier is kept).
fn create_first_admin(engine: &Engine) -> Result<(), String> {
    if !engine.users().is_empty() {
        return Ok(());
    }
    let (password, generated) = match std::env::var("WEIR_ADMIN_PASSWORD") {
        Ok(p) if !p.is_empty() => (p, false),
        _ => (
            weir_server::users::generate_password().map_err(|e| e.to_string())?,
            true,
        ),
    };
    engine
        .create_first_admin(&password)
        .map_err(|e| format!("cannot create the admin user: {e}"))?;
    let user = weir_server::users::ADMIN_USER;
    if generated {
        eprintln!(
            "created the admin user '{user}' with the password: {password}\n\
             (shown only this once; change it with ALTER USER {user} PASSWORD '...')"
        );
    } else {
        tracing::info!(%user, "created the admin user with the password from WEIR_ADMIN_PASSWORD");
    }
    Ok(())
}

async fn run(files: &[PathBuf], config: EngineConfig) -> Result<ExitCode, String> {
    let engine = Engine::open(config, Arc::new(Connectors::default()))
        .await
        .map_err(|e| e.to_string())?;
    for file in files {
        load_file(&engine, file, false).await?;
    }
    engine.start_all().await.map_err(|e| e.to_string())?;
    tokio::select! {
        () = engine.wait_finished() => {}
        () = wait_for_signal() => {
            tracing::info!("stopping: flushing pipelines");
            engine.shutdown(SHUTDOWN_GRACE).await;
        }
    }
    let failures = engine.failures().await;
    for (name, error) in &failures {
        eprintln!("error: pipeline {name} failed: {error}");
    }
    Ok(if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Executes the statements of one file. With `keep_existing`, a statement creating an object
/// that the catalog already holds is skipped (a restart of `serve --queries`).
async fn load_file(engine: &Engine, file: &Path, keep_existing: bool) -> Result<(), String> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let statements = parse_sql_with_positions(&text).map_err(|e| {
        let p = e.position.unwrap_or_default();
        format!("{}:{}:{}: {}", file.display(), p.line, p.column, e.message)
    })?;
    for statement in statements {
        match engine.execute_one(&statement.sql).await {
            Ok(_) => {}
            Err(PlanError::Duplicate { name, .. }) if keep_existing => {
                tracing::info!(object = %name, file = %file.display(), "already in the catalog; keeping it");
            }
            Err(e) => {
                return Err(format!(
                    "{}:{}:{}: {} (SQLSTATE {})",
                    file.display(),
                    statement.start.line,
                    statement.start.column,
                    e,
                    e.sqlstate()
                ));
            }
        }
    }
    Ok(())
}

async fn check(files: &[PathBuf]) -> Result<ExitCode, String> {
    let engine = Engine::open(EngineConfig::default(), Arc::new(Connectors::default()))
        .await
        .map_err(|e| e.to_string())?;
    let mut errors = 0usize;
    for file in files {
        let text = match std::fs::read_to_string(file) {
            Ok(text) => text,
            Err(e) => {
                println!("{}:1:1: cannot read: {e}", file.display());
                errors += 1;
                continue;
            }
        };
        // A notebook's ```sql blocks, each where it stands in the file.
        if file.extension().is_some_and(|x| x == "md") {
            for (line, sql) in weir_server::console::sql_blocks(&text) {
                errors += check_sql(&engine, file, &sql, line - 1).await;
            }
        } else {
            errors += check_sql(&engine, file, &text, 0).await;
        }
    }
    if errors == 0 {
        eprintln!("{} file(s) checked, no errors", files.len());
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("{errors} error(s)");
        Ok(ExitCode::FAILURE)
    }
}

/// Checks `text`, which starts `lines_before` lines into `file`; prints each error and
/// returns how many there were.
async fn check_sql(engine: &Engine, file: &Path, text: &str, lines_before: usize) -> usize {
    let lines_before = lines_before as u64;
    let statements = match parse_sql_with_positions(text) {
        Ok(s) => s,
        Err(e) => {
            let p = e.position.unwrap_or_default();
            println!(
                "{}:{}:{}: {} (SQLSTATE 42601)",
                file.display(),
                p.line.max(1) + lines_before,
                p.column.max(1),
                e.message
            );
            return 1;
        }
    };
    let mut errors = 0;
    for statement in statements {
        // Queries are planned, never run: a live tail would wait for data.
        let result = match statement.statement {
            Statement::Query(_) | Statement::Explain { .. } => {
                engine.describe(&statement.sql).await.map(|_| ())
            }
            _ => engine.execute_one(&statement.sql).await.map(|_| ()),
        };
        if let Err(e) = result {
            // One line per error, whatever the message holds.
            let message = e
                .to_string()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            println!(
                "{}:{}:{}: {message} (SQLSTATE {})",
                file.display(),
                statement.start.line + lines_before,
                statement.start.column,
                e.sqlstate()
            );
            errors += 1;
        }
    }
    errors
}

fn sql_files(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot read --queries {}: {e}", dir.display()))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .collect();
    files.sort();
    Ok(files)
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// A duration as Weir's SQL options write them: `500ms`, `10s`, `1m`.
fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    weir_sql::options::parse_duration(text)
        .ok_or_else(|| format!("invalid duration '{text}': expected e.g. 500ms, 10s, 1m"))
}
