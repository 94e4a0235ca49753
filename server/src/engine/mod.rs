//! [`Engine`]: executes statements against the catalog and runs the pipelines they define.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use datafusion::execution::context::SessionContext;
use datafusion::prelude::SessionConfig;
use datafusion_pg_catalog::sql::PostgresCompatibilityParser;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use weir_planner::catalog::Catalog;
use weir_planner::{PlanError, Result};
use weir_runtime::connector::ConnectorRegistry;
use weir_runtime::coordinator::{CheckpointInfo, Coordinator};
use weir_runtime::message::Message;
use weir_runtime::pipeline::{Fanout, PipelineStatus, StatusCell};
use weir_runtime::{CancellationToken, Checkpoint, CheckpointStore, Metrics};
use weir_sql::parser::ParsedStatement;
use weir_sql::{ObjectKind, Privilege, ShowKind, Statement, parse_sql_with_positions};

mod cluster;
mod ddl;
mod peers;
mod pipelines;
mod query;
mod supervise;

pub use ddl::DEFAULT_CHECKPOINT_INTERVAL;

use crate::introspection;
use crate::users::Users;

/// Who runs a statement: the privileges it is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller<'a> {
    /// Files (`weir run`, `--queries`), the catalog's replay, and clients under `--auth
    /// trust`: every privilege.
    Trusted,
    /// A user who logged in: what `GRANT` gave it, looked up at each statement (a `REVOKE`
    /// applies to sessions already open).
    User(&'a str),
}

impl<'a> Caller<'a> {
    fn user(self) -> Option<&'a str> {
        match self {
            Caller::Trusted => None,
            Caller::User(name) => Some(name),
        }
    }
}

/// The catalog name psql sees (`current_database()`).
pub const DATABASE: &str = "weir";

/// How an engine is set up.
#[derive(Debug, Clone, Default)]
pub struct EngineConfig {
    /// Where the catalog is persisted; `None` keeps everything in memory.
    pub data_dir: Option<PathBuf>,
    /// How often jobs checkpoint unless their WITH says otherwise (default 10 s).
    pub checkpoint_interval: Option<Duration>,
    /// Where checkpoints go: a directory or an object store URL. Default:
    /// `<data_dir>/checkpoints`; without either, jobs checkpoint (sinks commit per epoch)
    /// but keep no state across restarts.
    pub checkpoint_store: Option<String>,
    /// Complete checkpoints kept per job (default 3).
    pub checkpoints_retained: Option<usize>,
    /// Workers per pipeline over a source that splits (Kafka); default: the number of cores.
    pub workers: Option<usize>,
    /// Share Kafka-sourced pipelines with the other processes of this cluster
    /// (`--cluster NAME`); the checkpoint store must be one they all reach.
    pub cluster: Option<ClusterConfig>,
}

pub use cluster::ClusterConfig;
pub use peers::PARTS_HEADER;

/// What [`Engine::view_parts`] answers a peer.
#[derive(Debug)]
pub enum PeerAnswer {
    Parts { parts: String, body: Vec<u8> },
    Unauthorized,
    NotFound,
    Failed(String),
}

/// The number of cores this process may use.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// What one statement returns.
pub enum Output {
    /// A finite result.
    Rows {
        schema: SchemaRef,
        batches: Vec<RecordBatch>,
    },
    /// A live tail: batches as they arrive, at most `limit` rows in total.
    Tail(Tail),
    /// A command with its completion tag, e.g. `CREATE STREAM`.
    Command(String),
}

/// The receiving end of a live tail; dropping it stops the tail's pipeline.
pub struct Tail {
    pub schema: SchemaRef,
    pub limit: usize,
    pub batches: mpsc::Receiver<Message>,
    stop: CancellationToken,
}

impl Drop for Tail {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Tail {
    /// The next batch, cut so that no more than `limit` rows are returned in all; `None` when
    /// the limit is reached or the input ended.
    pub async fn next_batch(&mut self, returned: &mut usize) -> Option<RecordBatch> {
        while *returned < self.limit {
            match self.batches.recv().await? {
                Message::Data(batch) if batch.num_rows() > 0 => {
                    let take = batch.num_rows().min(self.limit - *returned);
                    *returned += take;
                    return Some(batch.slice(0, take));
                }
                Message::End | Message::Stop => return None,
                _ => {}
            }
        }
        self.stop.cancel();
        None
    }
}

/// A running pipeline (a view, a sink, or a live tail).
struct Running {
    kind: ObjectKind,
    input: String,
    /// Cancelled to tear the pipeline down at once (a stop whose last checkpoint timed out).
    stop: CancellationToken,
    status: StatusCell,
    /// Views only: where sinks `FROM` the view subscribe.
    output: Option<Arc<Fanout>>,
    tasks: Vec<JoinHandle<()>>,
    /// A pipeline shared with a cluster: its instances in this process.
    cluster: Option<cluster::ClusterPipeline>,
    started: Instant,
    /// The job the pipeline belongs to: its own name when it reads a stream, the view's
    /// job when it reads a materialized view.
    job: String,
}

impl Running {
    /// A pipeline of `kind` reading `input`, in job `job`, with no tasks yet.
    fn new(
        kind: ObjectKind,
        input: &str,
        stop: CancellationToken,
        status: StatusCell,
        job: &str,
    ) -> Self {
        Self {
            kind,
            input: input.to_string(),
            stop,
            status,
            output: None,
            tasks: Vec::new(),
            cluster: None,
            started: Instant::now(),
            job: job.to_string(),
        }
    }
}

/// A source, the pipeline reading it, and the pipelines reading that one's output: what
/// one coordinator checkpoints together.
struct Job {
    coordinator: Coordinator,
    /// The checkpoint restored at start, for pipelines of the job started after the first.
    restored: Option<Arc<Checkpoint>>,
}

/// One row of `SHOW QUERIES`.
pub struct PipelineRow {
    pub name: String,
    pub kind: ObjectKind,
    pub input: String,
    pub status: PipelineStatus,
    pub started: Instant,
    pub checkpoints: CheckpointInfo,
    /// How often its job was restarted after a failure, and the last failure's cause.
    pub restarts: (u64, Option<String>),
    /// On a cluster: the pipeline's instances in this process (`p<n>` per source partition,
    /// `r<n>` per shuffle partition).
    pub instances: Vec<String>,
}

struct State {
    catalog: Catalog,
    running: HashMap<String, Running>,
    /// Running jobs, by the name of the pipeline that reads their source.
    jobs: HashMap<String, Job>,
    /// False while restoring or loading files: pipelines start together in `start_all`.
    started: bool,
    /// Names a CREATE or DROP works on outside the lock (connecting to a broker, loading a
    /// table, reading a checkpoint, waiting for a stop): no other statement takes them
    /// meanwhile.
    busy: HashMap<String, Busy>,
    /// Restarts after failures, by job.
    restarts: HashMap<String, supervise::Restarts>,
}

/// What a statement is doing with a name it reserved.
#[derive(Debug, Clone, Copy)]
enum Busy {
    Creating,
    Dropping,
    Restarting,
}

impl State {
    /// Checks that `name` is neither in the catalog nor reserved by a statement under way.
    fn check_free(&self, name: &str) -> Result<()> {
        self.catalog.check_free(name)?;
        self.check_not_busy(name)
    }

    /// Checks that no statement under way has reserved `name`.
    fn check_not_busy(&self, name: &str) -> Result<()> {
        match self.busy.get(name) {
            None => Ok(()),
            Some(busy) => Err(PlanError::Plan {
                sqlstate: "55006",
                message: format!(
                    "\"{name}\" is being {} by another statement; try again when it has finished",
                    match busy {
                        Busy::Creating => "created",
                        Busy::Dropping => "dropped",
                        Busy::Restarting => "restarted after a failure",
                    }
                ),
            }),
        }
    }
}

/// A name reserved in [`State::busy`] while a statement works on it without the lock;
/// freed when dropped, whether the statement succeeded or not.
struct Reservation<'a> {
    engine: &'a Engine,
    name: String,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.engine.lock().busy.remove(&self.name);
    }
}

/// Executes statements. Cheap to share (`Arc`).
///
/// One lock guards the catalog and the running pipelines, and it is a blocking one: it is
/// taken for bookkeeping only and never held across an `.await` (the compiler refuses a
/// `MutexGuard` held across one in a `Send` future). A statement that waits on the world
/// (a broker, a database, a checkpoint store, a pipeline's last checkpoint) reserves the
/// names it works on, waits without the lock, and takes it again to finish; other
/// sessions' queries and DDL go on meanwhile.
pub struct Engine {
    state: Mutex<State>,
    ctx: SessionContext,
    connectors: Arc<dyn ConnectorRegistry>,
    metrics: Metrics,
    shutdown: CancellationToken,
    /// Cancelled by `start_all` once every pipeline is wired: sources wait for it, so a sink
    /// `FROM` a view sees the view's first rows too.
    release: CancellationToken,
    /// True while `open` replays the saved catalog.
    restoring: AtomicBool,
    pg_parser: PostgresCompatibilityParser,
    /// Where checkpoints go, if anywhere.
    store: Option<CheckpointStore>,
    checkpoint_interval: Duration,
    /// Workers per pipeline over a source that splits.
    workers: usize,
    cluster: Option<ClusterConfig>,
    /// On a cluster: how this process finds the others and gathers views from them.
    peers: Option<Arc<peers::Peers>>,
    /// This data directory's stable id (Kafka static membership).
    instance_id: Option<String>,
    /// Who may log in, and what each user may do. Not under `state`: a login or a privilege
    /// check never waits on DDL.
    users: Arc<Users>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Engine")
    }
}

impl Engine {
    /// Opens the catalog (replaying what it holds) without starting any pipeline yet.
    pub async fn open(
        config: EngineConfig,
        connectors: Arc<dyn ConnectorRegistry>,
    ) -> Result<Arc<Self>> {
        let (catalog, saved) = match &config.data_dir {
            Some(dir) => Catalog::open(dir)?,
            None => (Catalog::in_memory(), Vec::new()),
        };
        let retained = config.checkpoints_retained.unwrap_or(3);
        let store = match (&config.checkpoint_store, &config.data_dir) {
            (Some(location), _) => Some(CheckpointStore::open(location, retained)?),
            (None, Some(dir)) => Some(CheckpointStore::local(&dir.join("checkpoints"), retained)?),
            (None, None) => None,
        };
        let peers = match (&config.cluster, &store) {
            (Some(cluster), Some(store)) => Some(Arc::new(peers::Peers::new(
                &cluster.name,
                cluster.advertise.clone(),
                store.clone(),
            )?)),
            _ => None,
        };
        let instance_id = match &config.data_dir {
            Some(dir) => Some(instance_id(dir)?),
            None => None,
        };
        let users = Arc::new(match &config.data_dir {
            Some(dir) => Users::open(dir)?,
            None => Users::in_memory(),
        });
        let mut session = SessionConfig::new()
            .with_default_catalog_and_schema(DATABASE, "public")
            .with_information_schema(true);
        session
            .options_mut()
            .sql_parser
            .map_string_types_to_utf8view = false;
        let ctx = SessionContext::new_with_config(session);
        for udf in weir_planner::window::placeholder_udfs() {
            ctx.register_udf(udf);
        }
        ctx.register_udf(crate::compat::current_setting_udf());
        ctx.register_udf(crate::compat::information_schema_type_udf());
        datafusion_pg_catalog::setup_pg_catalog(
            &ctx,
            DATABASE,
            crate::users::CatalogRoles(users.clone()),
        )
        .map_err(|e| PlanError::Internal(format!("cannot set up pg_catalog: {e}")))?;
        let engine = Arc::new(Self {
            state: Mutex::new(State {
                catalog,
                running: HashMap::new(),
                jobs: HashMap::new(),
                started: false,
                busy: HashMap::new(),
                restarts: HashMap::new(),
            }),
            ctx,
            connectors,
            metrics: Metrics::new(),
            shutdown: CancellationToken::new(),
            release: CancellationToken::new(),
            restoring: AtomicBool::new(true),
            pg_parser: PostgresCompatibilityParser::new(),
            store,
            checkpoint_interval: config
                .checkpoint_interval
                .unwrap_or(DEFAULT_CHECKPOINT_INTERVAL),
            workers: config.workers.unwrap_or_else(default_workers).max(1),
            cluster: config.cluster.clone(),
            peers,
            instance_id,
            users,
        });
        let mut restored = 0;
        for object in &saved {
            match engine.execute_one(&object.sql).await {
                Ok(_) => restored += 1,
                Err(e) => {
                    tracing::error!(object = %object.name, error = %e,
                        "cannot restore catalog object; it stays in the catalog and is retried at the next start");
                    engine.lock().catalog.keep_unrestored(object.clone());
                }
            }
        }
        engine.restoring.store(false, Ordering::Relaxed);
        if !saved.is_empty() {
            tracing::info!(restored, total = saved.len(), "catalog restored");
        }
        Ok(engine)
    }

    /// The engine's state, for bookkeeping only: never held across an `.await`.
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while the lock was held (a bug) leaves the state as it was at that point;
        // serving on from it beats refusing every statement from then on.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reserves `name` (checked free) while a statement works on it without the lock.
    fn reserve(&self, state: &mut State, name: &str, busy: Busy) -> Result<Reservation<'_>> {
        match busy {
            Busy::Creating => state.check_free(name)?,
            Busy::Dropping | Busy::Restarting => state.check_not_busy(name)?,
        }
        state.busy.insert(name.to_string(), busy);
        Ok(Reservation {
            engine: self,
            name: name.to_string(),
        })
    }

    /// On a cluster, the repartition topic `pipeline` shuffles through if its query has a
    /// window by a key (`None` off a cluster, or for an unknown name): for brokers that
    /// let applications neither create topics nor have them created on first use, an
    /// operator creates it beforehand, with the source's partition count.
    pub fn shuffle_topic(&self, pipeline: &str) -> Option<String> {
        let cluster = self.cluster.as_ref()?;
        let state = self.lock();
        state.catalog.get(pipeline)?;
        let fingerprint = pipelines::fingerprint(&state.catalog, pipeline);
        Some(cluster::names_of(cluster, pipeline, &fingerprint).1)
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// For a peer on the cluster presenting `token`: view `name`'s parts in this process,
    /// as their names (comma-separated) and an Arrow IPC stream of their rows.
    pub async fn view_parts(&self, name: &str, token: Option<&str>) -> PeerAnswer {
        let Some(peers) = &self.peers else {
            return PeerAnswer::NotFound;
        };
        match peers.authorized(token).await {
            Ok(true) => {}
            Ok(false) => return PeerAnswer::Unauthorized,
            Err(e) => return PeerAnswer::Failed(e.to_string()),
        }
        let store = {
            let state = self.lock();
            state
                .catalog
                .get(name)
                .filter(|e| e.kind == ObjectKind::MaterializedView)
                .and_then(|e| e.store.clone())
        };
        match store.map(|s| peers::encode_parts(&s)) {
            None => PeerAnswer::NotFound,
            Some(Ok((parts, body))) => PeerAnswer::Parts { parts, body },
            Some(Err(e)) => PeerAnswer::Failed(e.to_string()),
        }
    }

    pub fn users(&self) -> &Arc<Users> {
        &self.users
    }

    /// On a first start (no user yet), creates the admin user [`crate::users::ADMIN_USER`]
    /// with `password`. Returns whether it did.
    pub fn create_first_admin(&self, password: &str) -> Result<bool> {
        use crate::users::ADMIN_USER;
        if !self.users.is_empty() {
            return Ok(false);
        }
        self.users.create(ADMIN_USER, Some(password), false)?;
        self.users
            .grant(Privilege::Admin, &[ADMIN_USER.to_string()], true)?;
        Ok(true)
    }

    /// Parses and executes `sql` (one or more statements) with every privilege; stops at the
    /// first error.
    pub async fn execute(&self, sql: &str) -> Vec<Result<Output>> {
        self.execute_as(Caller::Trusted, sql).await
    }

    /// Parses and executes `sql` (one or more statements) for `caller`; stops at the first
    /// error (a statement `caller` may not run is one, 42501).
    pub async fn execute_as(&self, caller: Caller<'_>, sql: &str) -> Vec<Result<Output>> {
        let parsed = match self.parse(sql) {
            Ok(parsed) => parsed,
            Err(e) => return vec![Err(e)],
        };
        // Statements sent together start their sources only once all of them are wired, so
        // that a view over a view created in the same command sees every row. The token is
        // this call's own: batches from other sessions start independently.
        let together = (parsed.len() > 1).then(CancellationToken::new);
        let release = together.clone().unwrap_or_else(|| self.release.clone());
        let mut results = Vec::with_capacity(parsed.len());
        for statement in parsed {
            let result = self.execute_statement(caller, statement, &release).await;
            let failed = result.is_err();
            results.push(result);
            if failed {
                break;
            }
        }
        if let Some(token) = together {
            token.cancel();
        }
        results
    }

    /// Executes exactly one statement.
    pub async fn execute_one(&self, sql: &str) -> Result<Output> {
        let mut parsed = self.parse(sql)?;
        match parsed.len() {
            1 => {
                self.execute_statement(Caller::Trusted, parsed.remove(0), &self.release)
                    .await
            }
            0 => Ok(Output::Command("EMPTY".into())),
            _ => Err(PlanError::Syntax {
                message: "expected one statement".into(),
                position: None,
            }),
        }
    }

    /// Weir's parser first; a query only Postgres' dialect understands (psql's catalog
    /// queries) goes through the Postgres-compatibility parser instead.
    fn parse(&self, sql: &str) -> Result<Vec<ParsedStatement>> {
        match parse_sql_with_positions(sql) {
            // Catalog queries (psql's \d and friends) are written for Postgres; its
            // compatibility parser rewrites them into what DataFusion runs.
            Ok(parsed) if parsed.iter().any(reads_system_catalog) => {
                Ok(self.parse_postgres_queries(sql).unwrap_or(parsed))
            }
            Ok(parsed) => Ok(parsed),
            Err(weir_error) => self
                .parse_postgres_queries(sql)
                .ok_or_else(|| weir_error.into()),
        }
    }

    /// `sql` as Postgres-dialect queries, if it is only queries.
    fn parse_postgres_queries(&self, sql: &str) -> Option<Vec<ParsedStatement>> {
        let statements = self
            .pg_parser
            .parse(&crate::compat::search_path_as_list(sql))
            .ok()?;
        statements
            .into_iter()
            .map(|s| match s {
                sqlparser::ast::Statement::Query(q) => Some(ParsedStatement {
                    statement: Statement::Query(q),
                    sql: sql.to_string(),
                    start: Default::default(),
                }),
                _ => None,
            })
            .collect()
    }

    /// Refuses `statement` (42501) unless `caller` holds the privilege it needs.
    fn authorize(&self, caller: Caller<'_>, statement: &Statement) -> Result<()> {
        let Caller::User(user) = caller else {
            return Ok(());
        };
        let needed = match statement {
            // Session settings and transaction brackets: anyone who logged in.
            Statement::Standard(_) => return Ok(()),
            Statement::AlterUser { name, .. } if name == user => return Ok(()),
            Statement::Query(_)
            | Statement::Show(_)
            | Statement::ShowCreate { .. }
            | Statement::Describe { .. }
            | Statement::Explain { .. } => Privilege::Read,
            _ => Privilege::Admin,
        };
        if self.users.has(user, needed) {
            return Ok(());
        }
        let what = match needed {
            Privilege::Read => "read (GRANT READ TO ...)",
            Privilege::Admin => "admin (GRANT ADMIN TO ...)",
        };
        Err(PlanError::Privilege(format!(
            "permission denied: {} needs the {what} privilege, which user \"{user}\" does not have",
            statement.tag()
        )))
    }

    /// Executes one statement; the pipelines it starts begin reading once `release` is
    /// cancelled.
    async fn execute_statement(
        &self,
        caller: Caller<'_>,
        parsed: ParsedStatement,
        release: &CancellationToken,
    ) -> Result<Output> {
        self.authorize(caller, &parsed.statement)?;
        let sql = parsed.sql;
        match parsed.statement {
            Statement::CreateUser {
                name,
                if_not_exists,
                password,
            } => {
                self.users
                    .create(&name, password.as_deref(), if_not_exists)?;
                Ok(Output::Command("CREATE ROLE".into()))
            }
            Statement::AlterUser { name, password } => {
                self.users.set_password(&name, password.as_deref())?;
                Ok(Output::Command("ALTER ROLE".into()))
            }
            Statement::DropUser { names, if_exists } => {
                self.users.drop_users(&names, if_exists, caller.user())?;
                Ok(Output::Command("DROP ROLE".into()))
            }
            Statement::Grant { privilege, users } => {
                self.users.grant(privilege, &users, true)?;
                Ok(Output::Command("GRANT".into()))
            }
            Statement::Revoke { privilege, users } => {
                self.users.grant(privilege, &users, false)?;
                Ok(Output::Command("REVOKE".into()))
            }
            Statement::Show(ShowKind::Users) => introspection::show_users(&self.users.rows()),
            Statement::CreateStream(create) => {
                self.create_source(create, ObjectKind::Stream, sql).await
            }
            Statement::CreateTable(create) => self.create_table(create, sql).await,
            Statement::CreateView(create) => self.create_plain_view(create, sql).await,
            Statement::CreateMaterializedView(create) => {
                self.create_view(create, sql, release).await
            }
            Statement::CreateSink(create) => self.create_sink(create, sql, release).await,
            Statement::Drop {
                kind,
                names,
                if_exists,
                cascade,
            } => self.drop_objects(kind, &names, if_exists, cascade).await,
            Statement::Show(kind) => {
                let state = self.lock();
                introspection::show(&state.catalog, kind, &state.pipeline_rows())
            }
            Statement::ShowCreate { kind, name } => {
                introspection::show_create(self.lock().catalog.get_kind(&name, kind)?)
            }
            Statement::Describe { name } => {
                let state = self.lock();
                let entry = state
                    .catalog
                    .get(&name)
                    .ok_or_else(|| PlanError::undefined("object", &name))?;
                introspection::describe(entry)
            }
            Statement::Explain { analyze, query } => {
                if analyze {
                    return Err(PlanError::NotSupported("EXPLAIN ANALYZE".into()));
                }
                self.explain(*query).await
            }
            Statement::Query(query) => self.query(*query).await,
            Statement::Standard(statement) => self.standard(*statement).await,
        }
    }
}

/// The stable id of the process owning `dir` (created on first use), from which Kafka
/// consumers take their static group membership.
fn instance_id(dir: &std::path::Path) -> Result<String> {
    let path = dir.join("instance_id");
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(PlanError::Internal(format!(
                "cannot read {}: {e}",
                path.display()
            )));
        }
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let id = format!("weir-{:x}{:x}", nanos, std::process::id());
    std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::write(&path, &id))
        .map_err(|e| PlanError::Internal(format!("cannot write {}: {e}", path.display())))?;
    Ok(id)
}

/// Whether a statement is a query over `pg_catalog` or `information_schema`.
fn reads_system_catalog(parsed: &ParsedStatement) -> bool {
    let Statement::Query(query) = &parsed.statement else {
        return false;
    };
    let mut found = false;
    let _ = sqlparser::ast::visit_relations(query.as_ref(), |name| {
        let first = name
            .0
            .first()
            .and_then(|p| p.as_ident())
            .map(|i| i.value.to_ascii_lowercase());
        if matches!(first.as_deref(), Some("pg_catalog" | "information_schema"))
            || name.0.len() == 1 && first.as_deref().is_some_and(|n| n.starts_with("pg_"))
        {
            found = true;
        }
        std::ops::ControlFlow::<()>::Continue(())
    });
    found
}
