//! [`Engine`]: executes statements against the catalog and runs the pipelines they define.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use datafusion::execution::context::SessionContext;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::SessionConfig;
use datafusion_pg_catalog::sql::PostgresCompatibilityParser;
use tokio::sync::{Mutex, mpsc};
use tokio::task::JoinHandle;
use weir_planner::catalog::{Catalog, CatalogEntry};
use weir_planner::continuous::{self, ContinuousPlan};
use weir_planner::schema::{is_event_time_type, schema_from_columns, watermark_delay};
use weir_planner::tables::{LookupTableProvider, MvTable, UnboundedTable};
use weir_planner::{PlanError, Result};
use weir_runtime::connector::{ConnectorRegistry, EventTime, SinkSpec, SourceSpec, TableSpec};
use weir_runtime::coordinator::{CheckpointConfig, CheckpointInfo, Coordinator};
use weir_runtime::message::Message;
use weir_runtime::mv_store::{DEFAULT_MAX_ROWS, DEFAULT_RETENTION, MvSink, MvStore};
use weir_runtime::operator::Stage;
use weir_runtime::pipeline::{self, Fanout, PipelineStatus, SinkTask, SourceTask, StatusCell};
use weir_runtime::{CancellationToken, Checkpoint, CheckpointStore, CommitLog, Metrics, Snapshot};
use weir_sql::parser::ParsedStatement;
use weir_sql::{
    CreateMaterializedView, CreateSink, CreateSource, CreateView, ObjectKind, Privilege, ShowKind,
    SinkInput, Statement, parse_sql_with_positions,
};

/// A view's or sink's option: how long after its end a window still takes records.
const ALLOWED_LATENESS: &str = "window.allowed_lateness";
/// A view's or sink's option: how often its job takes a checkpoint.
const CHECKPOINT_INTERVAL: &str = "checkpoint.interval";
/// Default `checkpoint.interval`.
pub const DEFAULT_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(10);
/// How long a stop waits for a job's last checkpoint before tearing it down.
const STOP_WAIT: Duration = Duration::from_secs(30);

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
    started: Instant,
    /// The job the pipeline belongs to: its own name when it reads a stream, the view's
    /// job when it reads a materialized view.
    job: String,
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
}

struct State {
    catalog: Catalog,
    running: HashMap<String, Running>,
    /// Running jobs, by the name of the pipeline that reads their source.
    jobs: HashMap<String, Job>,
    /// False while restoring or loading files: pipelines start together in `start_all`.
    started: bool,
    /// While statements sent together run: their sources start only once all of them are
    /// wired, so that a view over a view created in the same command sees every row.
    batch_release: Option<CancellationToken>,
}

/// Executes statements. Cheap to share (`Arc`); DDL is serialized, queries run concurrently.
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
                batch_release: None,
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
                    engine
                        .state
                        .lock()
                        .await
                        .catalog
                        .keep_unrestored(object.clone());
                }
            }
        }
        engine.restoring.store(false, Ordering::Relaxed);
        if !saved.is_empty() {
            tracing::info!(restored, total = saved.len(), "catalog restored");
        }
        Ok(engine)
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
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

    /// Starts every pipeline defined so far; from now on new ones start at CREATE.
    pub async fn start_all(&self) -> Result<()> {
        let mut state = self.state.lock().await;
        state.started = true;
        let names: Vec<String> = state
            .catalog
            .in_order()
            .filter(|e| matches!(e.kind, ObjectKind::MaterializedView | ObjectKind::Sink))
            .map(|e| e.name.clone())
            .collect();
        for name in names {
            // One pipeline that cannot start (its checkpoint unreadable, say) does not keep
            // the others from running; SHOW QUERIES says why.
            if let Err(e) = self.start_pipeline(&mut state, &name).await {
                tracing::error!(pipeline = %name, error = %e, "pipeline cannot start");
            }
        }
        self.release.cancel();
        Ok(())
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
        let together = (parsed.len() > 1).then(CancellationToken::new);
        self.state.lock().await.batch_release = together.clone();
        let mut results = Vec::with_capacity(parsed.len());
        for statement in parsed {
            let result = self.execute_statement(caller, statement).await;
            let failed = result.is_err();
            results.push(result);
            if failed {
                break;
            }
        }
        if let Some(token) = together {
            self.state.lock().await.batch_release = None;
            token.cancel();
        }
        results
    }

    /// Executes exactly one statement.
    pub async fn execute_one(&self, sql: &str) -> Result<Output> {
        let mut parsed = self.parse(sql)?;
        match parsed.len() {
            1 => {
                self.execute_statement(Caller::Trusted, parsed.remove(0))
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
        let statements = self.pg_parser.parse(sql).ok()?;
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

    async fn execute_statement(
        &self,
        caller: Caller<'_>,
        parsed: ParsedStatement,
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
            Statement::CreateMaterializedView(create) => self.create_view(create, sql).await,
            Statement::CreateSink(create) => self.create_sink(create, sql).await,
            Statement::Drop {
                kind,
                names,
                if_exists,
                cascade,
            } => self.drop_objects(kind, &names, if_exists, cascade).await,
            Statement::Show(kind) => {
                let state = self.state.lock().await;
                let rows = state
                    .running
                    .iter()
                    .map(|(n, r)| PipelineRow {
                        name: n.clone(),
                        kind: r.kind,
                        input: r.input.clone(),
                        status: r.status.get(),
                        started: r.started,
                        checkpoints: state
                            .jobs
                            .get(&r.job)
                            .map(|j| j.coordinator.info())
                            .unwrap_or_default(),
                    })
                    .collect::<Vec<_>>();
                introspection::show(&state.catalog, kind, &rows)
            }
            Statement::ShowCreate { kind, name } => {
                let state = self.state.lock().await;
                introspection::show_create(state.catalog.get_kind(&name, kind)?)
            }
            Statement::Describe { name } => {
                let state = self.state.lock().await;
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

    async fn create_source(
        &self,
        create: CreateSource,
        kind: ObjectKind,
        sql: String,
    ) -> Result<Output> {
        let mut state = self.state.lock().await;
        if create.if_not_exists && state.catalog.get(&create.name).is_some() {
            return Ok(Output::Command(format!("CREATE {}", kind.sql_name())));
        }
        state.catalog.check_free(&create.name)?;
        let schema = schema_from_columns(&create.columns, &create.primary_key)?;
        let event_time = match &create.watermark {
            Some(w) => {
                let field = schema
                    .field_with_name(&w.column)
                    .map_err(|_| PlanError::Plan {
                        sqlstate: "42703",
                        message: format!(
                            "WATERMARK FOR \"{}\": no such column in \"{}\"",
                            w.column, create.name
                        ),
                    })?;
                if !is_event_time_type(field.data_type()) {
                    return Err(PlanError::Plan {
                        sqlstate: "42804",
                        message: format!(
                            "WATERMARK FOR \"{}\": the column must be a TIMESTAMP, not {}",
                            w.column,
                            field.data_type()
                        ),
                    });
                }
                Some(EventTime {
                    column: w.column.clone(),
                    delay: watermark_delay(w)?,
                })
            }
            None => None,
        };
        let watermark_column = event_time.as_ref().map(|e| e.column.clone());
        let options = create.options.clone();
        let spec = SourceSpec {
            name: create.name.clone(),
            schema: schema.clone(),
            event_time,
            restoring: self.restoring.load(Ordering::Relaxed),
        };
        let factory = self.connectors.source(&spec, &options)?;
        // Queries see the declared columns, then the hidden ones (selectable by name only).
        let hidden = factory.hidden_columns();
        let table_schema = if hidden.is_empty() {
            schema.clone()
        } else {
            let fields: Vec<_> = schema.fields().iter().cloned().chain(hidden).collect();
            Arc::new(arrow::datatypes::Schema::new(fields))
        };
        let provider = Arc::new(UnboundedTable {
            name: create.name.clone(),
            kind,
            schema: table_schema,
        });
        self.ctx.register_table(create.name.as_str(), provider)?;
        let entry = CatalogEntry {
            name: create.name.clone(),
            kind,
            sql,
            schema,
            connector: Some(factory.connector().to_string()),
            depends_on: Vec::new(),
            source: Some(factory),
            table: None,
            sink: None,
            plan: None,
            query: None,
            watermark_column,
            store: None,
            checkpoint_interval: None,
        };
        if let Err(e) = state.catalog.insert(entry) {
            let _ = self.ctx.deregister_table(create.name.as_str());
            return Err(e);
        }
        Ok(Output::Command(format!("CREATE {}", kind.sql_name())))
    }

    /// `CREATE TABLE`: a keyed table, loaded (or connected to) now, looked up by joins.
    async fn create_table(&self, create: CreateSource, sql: String) -> Result<Output> {
        let mut state = self.state.lock().await;
        if create.if_not_exists && state.catalog.get(&create.name).is_some() {
            return Ok(Output::Command("CREATE TABLE".into()));
        }
        state.catalog.check_free(&create.name)?;
        if create.watermark.is_some() {
            return Err(PlanError::Plan {
                sqlstate: "42P16",
                message: format!(
                    "table \"{}\" has a WATERMARK: a table is looked up, not streamed; declare event time on the stream",
                    create.name
                ),
            });
        }
        if create.primary_key.is_empty() {
            return Err(PlanError::Plan {
                sqlstate: "42P16",
                message: format!(
                    "table \"{}\" needs a PRIMARY KEY: a lookup join finds its rows by key",
                    create.name
                ),
            });
        }
        let schema = schema_from_columns(&create.columns, &create.primary_key)?;
        let key_columns = create
            .primary_key
            .iter()
            .map(|k| {
                schema.index_of(k).map_err(|_| PlanError::Plan {
                    sqlstate: "42703",
                    message: format!(
                        "PRIMARY KEY column \"{k}\" is not a column of \"{}\"",
                        create.name
                    ),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let spec = TableSpec {
            name: create.name.clone(),
            schema: schema.clone(),
            key_columns,
            restoring: self.restoring.load(Ordering::Relaxed),
        };
        let factory = self.connectors.table(&spec, &create.options)?;
        let table = factory.open(&self.metrics).await?;
        self.ctx.register_table(
            create.name.as_str(),
            Arc::new(LookupTableProvider {
                table: table.clone(),
            }),
        )?;
        let entry = CatalogEntry {
            name: create.name.clone(),
            kind: ObjectKind::Table,
            sql,
            schema,
            connector: Some(factory.connector().to_string()),
            depends_on: Vec::new(),
            source: None,
            table: Some(table),
            sink: None,
            plan: None,
            query: None,
            watermark_column: None,
            store: None,
            checkpoint_interval: None,
        };
        if let Err(e) = state.catalog.insert(entry) {
            let _ = self.ctx.deregister_table(create.name.as_str());
            return Err(e);
        }
        Ok(Output::Command("CREATE TABLE".into()))
    }

    /// `CREATE VIEW`: a name for a query. Planned now as a continuous query (so a view that
    /// cannot run is refused at CREATE), stored prepared, and inlined wherever it is read.
    async fn create_plain_view(&self, create: CreateView, sql: String) -> Result<Output> {
        let mut state = self.state.lock().await;
        if create.if_not_exists && state.catalog.get(&create.name).is_some() {
            return Ok(Output::Command("CREATE VIEW".into()));
        }
        state.catalog.check_free(&create.name)?;
        let mut query = *create.query;
        let views = continuous::prepare(&mut query, &state.catalog)?;
        let plan = self
            .plan_prepared(&state.catalog, query.clone(), views)
            .await?;
        self.ctx.register_table(
            create.name.as_str(),
            Arc::new(UnboundedTable {
                name: create.name.clone(),
                kind: ObjectKind::View,
                schema: plan.schema.clone(),
            }),
        )?;
        let entry = CatalogEntry {
            name: create.name.clone(),
            kind: ObjectKind::View,
            sql,
            schema: plan.schema.clone(),
            connector: None,
            depends_on: plan.reads(),
            source: None,
            table: None,
            sink: None,
            plan: None,
            query: Some(Arc::new(query)),
            watermark_column: None,
            store: None,
            checkpoint_interval: None,
        };
        if let Err(e) = state.catalog.insert(entry) {
            let _ = self.ctx.deregister_table(create.name.as_str());
            return Err(e);
        }
        Ok(Output::Command("CREATE VIEW".into()))
    }

    /// Plans a continuous query (a materialized view's or a sink's).
    async fn plan_continuous(
        &self,
        catalog: &Catalog,
        mut query: sqlparser::ast::Query,
    ) -> Result<ContinuousPlan> {
        let views = continuous::prepare(&mut query, catalog)?;
        self.plan_prepared(catalog, query, views).await
    }

    /// Plans a query that went through [`continuous::prepare`], which inlined `views`.
    async fn plan_prepared(
        &self,
        catalog: &Catalog,
        query: sqlparser::ast::Query,
        views: Vec<String>,
    ) -> Result<ContinuousPlan> {
        let plan = self.logical_plan(query).await?;
        let scanned = continuous::scanned_objects(&plan, catalog);
        if !scanned
            .iter()
            .any(|(_, k)| matches!(k, ObjectKind::Stream | ObjectKind::MaterializedView))
        {
            return Err(PlanError::NotSupported(
                "a continuous query must read a stream or a materialized view".into(),
            ));
        }
        let mut lowered = continuous::lower(&plan, &self.ctx.state(), catalog)?;
        if lowered.limit.is_some() {
            return Err(PlanError::NotSupported(
                "LIMIT in a materialized view, view or sink (it runs forever; LIMIT belongs to live tails)".into(),
            ));
        }
        lowered.views = views;
        Ok(lowered)
    }

    async fn logical_plan(&self, query: sqlparser::ast::Query) -> Result<LogicalPlan> {
        let statement = crate::compat::rewrite(
            self.pg_parser
                .rewrite(sqlparser::ast::Statement::Query(Box::new(query))),
        );
        let state = self.ctx.state();
        let plan = state
            .statement_to_plan(datafusion::sql::parser::Statement::Statement(Box::new(
                statement,
            )))
            .await?;
        Ok(state.optimize(&plan)?)
    }

    async fn create_view(&self, create: CreateMaterializedView, sql: String) -> Result<Output> {
        let mut state = self.state.lock().await;
        if create.if_not_exists && state.catalog.get(&create.name).is_some() {
            return Ok(Output::Command("CREATE MATERIALIZED VIEW".into()));
        }
        state.catalog.check_free(&create.name)?;
        let reader = create.options.reader();
        let retention = reader.duration("retention")?.unwrap_or(DEFAULT_RETENTION);
        let max_rows = reader
            .u64("max_rows")?
            .map(|n| n as usize)
            .unwrap_or(DEFAULT_MAX_ROWS);
        let lateness = reader.duration(ALLOWED_LATENESS)?;
        let checkpoint_interval = checkpoint_interval(reader.duration(CHECKPOINT_INTERVAL)?)?;
        reader.finish()?;
        let mut plan = self.plan_continuous(&state.catalog, *create.query).await?;
        if let Some(lateness) = lateness {
            plan = plan.with_allowed_lateness(lateness)?;
        }
        let store = MvStore::new(plan.schema.clone(), retention, max_rows);
        self.ctx.register_table(
            create.name.as_str(),
            Arc::new(MvTable {
                store: store.clone(),
            }),
        )?;
        let entry = CatalogEntry {
            name: create.name.clone(),
            kind: ObjectKind::MaterializedView,
            sql,
            schema: plan.schema.clone(),
            connector: None,
            depends_on: plan.reads(),
            source: None,
            table: None,
            sink: None,
            plan: Some(Arc::new(plan)),
            query: None,
            watermark_column: None,
            store: Some(store),
            checkpoint_interval,
        };
        state.catalog.insert(entry)?;
        if state.started
            && let Err(e) = self.start_pipeline(&mut state, &create.name).await
        {
            let _ = state.catalog.remove(&create.name);
            let _ = self.ctx.deregister_table(create.name.as_str());
            return Err(e);
        }
        Ok(Output::Command("CREATE MATERIALIZED VIEW".into()))
    }

    async fn create_sink(&self, create: CreateSink, sql: String) -> Result<Output> {
        let mut state = self.state.lock().await;
        if create.if_not_exists && state.catalog.get(&create.name).is_some() {
            return Ok(Output::Command("CREATE SINK".into()));
        }
        state.catalog.check_free(&create.name)?;
        // Read here, not by the connector: they belong to the sink's query and job.
        let lateness = create.options.reader().duration(ALLOWED_LATENESS)?;
        let checkpoint_interval =
            checkpoint_interval(create.options.reader().duration(CHECKPOINT_INTERVAL)?)?;
        let (schema, depends_on, plan) = match create.input {
            SinkInput::From(from) => {
                if lateness.is_some() {
                    return Err(PlanError::InvalidOption {
                        key: ALLOWED_LATENESS.into(),
                        message: format!(
                            "option '{ALLOWED_LATENESS}' applies to a sink whose query has a window (TUMBLE, HOP, SESSION), not to a sink FROM a relation"
                        ),
                    });
                }
                let entry = state
                    .catalog
                    .get(&from)
                    .ok_or_else(|| PlanError::undefined("relation", &from))?;
                if !matches!(
                    entry.kind,
                    ObjectKind::Stream | ObjectKind::View | ObjectKind::MaterializedView
                ) {
                    return Err(PlanError::NotSupported(format!(
                        "a sink FROM {} \"{from}\"",
                        entry.kind
                    )));
                }
                // A view is inlined; a stream with hidden columns is read as `SELECT *`.
                let hides = entry.kind == ObjectKind::View
                    || entry
                        .source
                        .as_ref()
                        .is_some_and(|s| !s.hidden_columns().is_empty());
                if hides {
                    // The sink receives the declared columns, as `SELECT *` would.
                    let query = select_all(&from)?;
                    let plan = self.plan_continuous(&state.catalog, query).await?;
                    (plan.schema.clone(), plan.reads(), Some(Arc::new(plan)))
                } else {
                    (entry.schema.clone(), vec![from], None)
                }
            }
            SinkInput::Query(query) => {
                let mut plan = self.plan_continuous(&state.catalog, *query).await?;
                if let Some(lateness) = lateness {
                    plan = plan.with_allowed_lateness(lateness)?;
                }
                (plan.schema.clone(), plan.reads(), Some(Arc::new(plan)))
            }
        };
        let spec = SinkSpec {
            name: create.name.clone(),
            schema: schema.clone(),
            restoring: self.restoring.load(Ordering::Relaxed),
        };
        let factory = self.connectors.sink(
            &spec,
            &create
                .options
                .without(ALLOWED_LATENESS)
                .without(CHECKPOINT_INTERVAL),
        )?;
        let entry = CatalogEntry {
            name: create.name.clone(),
            kind: ObjectKind::Sink,
            sql,
            schema,
            connector: Some(factory.connector().to_string()),
            depends_on,
            source: None,
            table: None,
            sink: Some(factory),
            plan,
            query: None,
            watermark_column: None,
            store: None,
            checkpoint_interval,
        };
        state.catalog.insert(entry)?;
        if state.started
            && let Err(e) = self.start_pipeline(&mut state, &create.name).await
        {
            let _ = state.catalog.remove(&create.name);
            return Err(e);
        }
        Ok(Output::Command("CREATE SINK".into()))
    }
}

impl Engine {
    /// Starts the pipeline of view or sink `name`: a job of its own when it reads a stream
    /// (restored from the job's last checkpoint), or a part of the view's job when it reads
    /// a materialized view.
    async fn start_pipeline(&self, state: &mut State, name: &str) -> Result<()> {
        let entry = state
            .catalog
            .get(name)
            .ok_or_else(|| PlanError::Internal(format!("starting unknown pipeline {name}")))?
            .clone();
        let restore_started = Instant::now();
        let stop = self.shutdown.child_token();
        let status = StatusCell::default();
        let mut tasks = Vec::new();
        let input_name = entry
            .depends_on
            .first()
            .cloned()
            .ok_or_else(|| PlanError::Internal(format!("pipeline {name} reads nothing")))?;
        let fingerprint = fingerprint(&state.catalog, name);
        let view_output = state
            .running
            .get(&input_name)
            .and_then(|r| r.output.clone().map(|o| (o, r.job.clone())));
        // The job's checkpoint, if it has one and this pipeline's plan is the one saved.
        let (job, restored) = match &view_output {
            Some((_, job)) => {
                let restored = state.jobs.get(job).and_then(|j| j.restored.clone());
                (job.clone(), restored)
            }
            None => {
                let restored = match &self.store {
                    Some(store) => store
                        .latest(name)
                        .await
                        .map_err(|e| {
                            PlanError::Internal(format!(
                                "cannot read the last checkpoint of {name} from {}: {e}",
                                store.location()
                            ))
                        })?
                        .map(Arc::new),
                    None => None,
                };
                (name.to_string(), restored)
            }
        };
        let saved = restored.as_ref().and_then(|c| {
            match c.fingerprints.get(name) {
                Some(f) if *f == fingerprint => Some(c.clone()),
                Some(_) => {
                    tracing::warn!(pipeline = %name, epoch = c.epoch,
                        "the pipeline's query or inputs changed since its last checkpoint: it starts fresh");
                    None
                }
                None => None,
            }
        });
        let snapshot = |participant: &str| -> Option<Snapshot> {
            saved
                .as_ref()
                .and_then(|c| c.snapshots.get(&format!("{name}/{participant}")).cloned())
        };
        let fanout = Fanout::new();
        let mut stages = match &entry.plan {
            Some(plan) => plan.stages(&self.metrics, name)?,
            None => Vec::new(),
        };
        for (i, stage) in stages.iter_mut().enumerate() {
            if let Stage::Sync(op) = stage
                && let Some(state) = snapshot(&format!("op{i}"))
            {
                op.restore(state).map_err(|e| {
                    PlanError::Internal(format!(
                        "cannot restore operator {i} of {name} from its checkpoint: {e}"
                    ))
                })?;
            }
        }
        let mut output = None;
        let (sink, label): (Box<dyn weir_runtime::Sink>, &str) = match entry.kind {
            ObjectKind::MaterializedView => {
                let store = entry
                    .store
                    .clone()
                    .ok_or_else(|| PlanError::Internal(format!("view {name} has no store")))?;
                output = Some(fanout.clone());
                (Box::new(MvSink(store)), "view")
            }
            ObjectKind::Sink => {
                let factory = entry
                    .sink
                    .clone()
                    .ok_or_else(|| PlanError::Internal(format!("sink {name} has no factory")))?;
                (factory.create(&self.metrics)?, factory.connector())
            }
            other => return Err(PlanError::Internal(format!("a {other} has no pipeline"))),
        };
        // Only now, with everything that can fail created, start reading.
        // The rows entering this pipeline's operators: a fresh source, or a view's output.
        let (input, committed) = match view_output {
            Some((view_output, job)) => {
                let coordinator = &state
                    .jobs
                    .get(&job)
                    .ok_or_else(|| PlanError::Internal(format!("no job {job}")))?
                    .coordinator;
                coordinator.set_fingerprint(name, fingerprint);
                (view_output.subscribe(), coordinator.committed())
            }
            None => {
                let source_entry = state.catalog.get_kind(&input_name, ObjectKind::Stream)?;
                let factory = source_entry.source.clone().ok_or_else(|| {
                    PlanError::Internal(format!("stream {input_name} has no source"))
                })?;
                let config = CheckpointConfig {
                    interval: entry
                        .checkpoint_interval
                        .unwrap_or(self.checkpoint_interval),
                    store: self.store.clone(),
                };
                // Epochs go on from the last checkpoint even when its state is not restored
                // (the query changed): sinks' commit records refer to them.
                let (coordinator, checkpoints) = Coordinator::spawn(
                    name,
                    config,
                    restored.as_ref().map_or(0, |c| c.epoch),
                    self.metrics.checkpoints(name),
                );
                coordinator.set_fingerprint(name, fingerprint);
                let committed = coordinator.committed();
                let (rx, task) = pipeline::spawn_source(
                    factory.create()?,
                    SourceTask {
                        shutdown: stop.clone(),
                        release: Self::release(state, &self.release),
                        metrics: self.metrics.source(&input_name, name, factory.connector()),
                        status: status.clone(),
                        pipeline: name.to_string(),
                        checkpoints: Some(checkpoints),
                        restore: snapshot("source"),
                        instance_id: self.instance_id.clone(),
                    },
                );
                tasks.push(task);
                if let Some(c) = &saved {
                    coordinator.restored(c.epoch, restore_started.elapsed());
                    self.metrics
                        .checkpoints(name)
                        .restore_seconds
                        .set(restore_started.elapsed().as_secs_f64());
                    tracing::info!(pipeline = %name, epoch = c.epoch,
                        ms = restore_started.elapsed().as_millis() as u64, "restored from checkpoint");
                }
                state.jobs.insert(
                    name.to_string(),
                    Job {
                        coordinator,
                        restored: saved.clone(),
                    },
                );
                (rx, committed)
            }
        };
        tasks.push(pipeline::spawn_sink(
            sink,
            fanout.subscribe(),
            SinkTask {
                metrics: self.metrics.sink(name, label),
                status: status.clone(),
                pipeline: name.to_string(),
                committed: Some(committed),
                restore: snapshot("sink"),
                commit_log: self.store.clone().map(|store| CommitLog {
                    store,
                    job: job.clone(),
                }),
            },
        ));
        tasks.extend(pipeline::spawn_stages(
            input,
            stages,
            fanout,
            &self.metrics,
            name,
        ));
        self.metrics
            .pipelines_running(&entry.kind.to_string())
            .inc();
        state.running.insert(
            name.to_string(),
            Running {
                kind: entry.kind,
                input: input_name,
                stop,
                status,
                output,
                tasks,
                started: Instant::now(),
                job,
            },
        );
        Ok(())
    }

    async fn drop_objects(
        &self,
        kind: ObjectKind,
        names: &[String],
        if_exists: bool,
        cascade: bool,
    ) -> Result<Output> {
        let mut state = self.state.lock().await;
        for name in names {
            match state.catalog.get(name) {
                None if if_exists => continue,
                None => return Err(PlanError::undefined(&kind.to_string(), name)),
                Some(e) if e.kind != kind => {
                    return Err(PlanError::Undefined(format!(
                        "\"{name}\" is a {}, not a {kind}",
                        e.kind
                    )));
                }
                Some(_) => {}
            }
            // Dependents first (deepest first), refused without CASCADE.
            let mut doomed = Vec::new();
            collect_dependents(&state.catalog, name, &mut doomed);
            if !doomed.is_empty() && !cascade {
                let list: Vec<String> = doomed
                    .iter()
                    .map(|d| {
                        format!(
                            "{} \"{d}\"",
                            state
                                .catalog
                                .get(d)
                                .map(|e| e.kind.to_string())
                                .unwrap_or_default()
                        )
                    })
                    .collect();
                return Err(PlanError::Dependent(format!(
                    "cannot drop {kind} \"{name}\" because {} depend(s) on it; use DROP ... CASCADE to drop them too",
                    list.join(", ")
                )));
            }
            doomed.push(name.clone());
            for victim in doomed {
                let was_job = state.jobs.contains_key(&victim);
                self.stop_pipeline(&mut state, &victim).await;
                // A pipeline created again under this name starts fresh.
                if was_job
                    && let Some(store) = &self.store
                    && let Err(e) = store.delete_job(&victim).await
                {
                    tracing::warn!(pipeline = %victim, error = %e, "cannot delete the checkpoints of a dropped pipeline");
                }
                if let Some(entry) = state.catalog.remove(&victim)?
                    && entry.kind != ObjectKind::Sink
                {
                    let _ = self.ctx.deregister_table(victim.as_str());
                }
            }
        }
        Ok(Output::Command(format!("DROP {}", kind.sql_name())))
    }

    /// The token a new source waits on: the one of the statements being executed together,
    /// or the engine's (cancelled once everything defined at start is wired).
    fn release(state: &State, engine: &CancellationToken) -> CancellationToken {
        state
            .batch_release
            .clone()
            .unwrap_or_else(|| engine.clone())
    }

    /// Stops pipeline `name`. A job's pipeline takes a last checkpoint (its source stops
    /// where it is; nothing partial is emitted) and ends its job; the pipelines reading its
    /// view are stopped before it (DROP and shutdown order them so). A pipeline reading a
    /// view leaves its job and is torn down: the job's next checkpoint no longer has it.
    async fn stop_pipeline(&self, state: &mut State, name: &str) {
        let Some(mut running) = state.running.remove(name) else {
            return;
        };
        self.metrics
            .pipelines_running(&running.kind.to_string())
            .dec();
        if running.job == name {
            if let Some(mut job) = state.jobs.remove(name)
                && !job.coordinator.stop(STOP_WAIT).await
            {
                tracing::warn!(pipeline = %name,
                    "the last checkpoint did not complete in time; the pipeline resumes from the one before");
            }
            running.stop.cancel();
            for task in running.tasks.drain(..) {
                let abort = task.abort_handle();
                if tokio::time::timeout(Duration::from_secs(10), task)
                    .await
                    .is_err()
                {
                    tracing::warn!(pipeline = %name, "pipeline did not stop within 10 s; aborted");
                    abort.abort();
                }
            }
        } else {
            if let Some(job) = state.jobs.get(&running.job) {
                job.coordinator.remove_pipeline(name);
            }
            for task in running.tasks.drain(..) {
                task.abort();
            }
        }
    }

    async fn explain(&self, mut query: sqlparser::ast::Query) -> Result<Output> {
        let state = self.state.lock().await;
        continuous::prepare(&mut query, &state.catalog)?;
        let plan = self.logical_plan(query).await?;
        let scanned = continuous::scanned_objects(&plan, &state.catalog);
        let lines = if scanned.iter().any(|(_, k)| *k == ObjectKind::Stream) {
            let lowered = continuous::lower(&plan, &self.ctx.state(), &state.catalog)?;
            let connector = state
                .catalog
                .get(&lowered.input)
                .and_then(|e| e.connector.clone())
                .unwrap_or_else(|| "view".into());
            lowered.explain(&connector)
        } else {
            plan.display_indent()
                .to_string()
                .lines()
                .map(str::to_string)
                .collect()
        };
        introspection::explain_rows(lines)
    }

    async fn query(&self, mut query: sqlparser::ast::Query) -> Result<Output> {
        continuous::prepare(&mut query, &self.state.lock().await.catalog)?;
        let plan = self.logical_plan(query).await?;
        self.run_plan(plan).await
    }

    /// Runs a planned query: a live tail when it reads a stream, else a DataFusion batch query.
    async fn run_plan(&self, plan: LogicalPlan) -> Result<Output> {
        let state = self.state.lock().await;
        let scanned = continuous::scanned_objects(&plan, &state.catalog);
        if let Some((stream, _)) = scanned.iter().find(|(_, k)| *k == ObjectKind::Stream) {
            let lowered = continuous::lower(&plan, &self.ctx.state(), &state.catalog)?;
            let Some(limit) = lowered.limit else {
                return Err(PlanError::NotSupported(format!(
                    "a SELECT over stream \"{stream}\" without LIMIT: a SELECT over a stream is a live tail, add LIMIT n to receive the next n matching records"
                )));
            };
            return self.start_tail(&state, lowered, limit);
        }
        drop(state);
        if continuous::uses_window(&plan) {
            return Err(PlanError::NotSupported(
                "a window (TUMBLE, HOP, SESSION) in a one-off SELECT over a materialized view: windows run continuously; create a materialized view with it, or group the rows by date_bin(...)".into(),
            ));
        }
        let schema = Arc::new(plan.schema().as_arrow().clone());
        let batches = self.ctx.execute_logical_plan(plan).await?.collect().await?;
        Ok(Output::Rows { schema, batches })
    }

    /// A live tail: its own source and operators, feeding the client until `limit` rows.
    fn start_tail(&self, state: &State, plan: ContinuousPlan, limit: usize) -> Result<Output> {
        let stop = self.shutdown.child_token();
        let source = state
            .catalog
            .get_kind(&plan.input, ObjectKind::Stream)?
            .source
            .clone()
            .ok_or_else(|| PlanError::Internal("stream without source".into()))?;
        let name = format!("tail_{}", plan.input);
        let (rx, _source_task) = pipeline::spawn_source(
            source.create_tail()?,
            SourceTask {
                shutdown: stop.clone(),
                release: self.release.clone(),
                metrics: self.metrics.source(&plan.input, &name, source.connector()),
                status: StatusCell::default(),
                pipeline: name.clone(),
                checkpoints: None,
                restore: None,
                instance_id: None,
            },
        );
        let fanout = Fanout::new();
        let batches = fanout.subscribe();
        let _chain = pipeline::spawn_stages(
            rx,
            plan.stages(&self.metrics, &name)?,
            fanout,
            &self.metrics,
            &name,
        );
        Ok(Output::Tail(Tail {
            schema: plan.schema.clone(),
            limit,
            batches,
            stop,
        }))
    }

    async fn standard(&self, statement: sqlparser::ast::Statement) -> Result<Output> {
        use sqlparser::ast::Statement as S;
        match statement {
            S::Set(_) => Ok(Output::Command("SET".into())),
            S::StartTransaction { .. } => Ok(Output::Command("BEGIN".into())),
            S::Commit { .. } => Ok(Output::Command("COMMIT".into())),
            S::Rollback { .. } => Ok(Output::Command("ROLLBACK".into())),
            S::Discard { .. } => Ok(Output::Command("DISCARD ALL".into())),
            S::ShowVariable { variable } => {
                let name = variable
                    .iter()
                    .map(|i| i.value.to_ascii_lowercase())
                    .collect::<Vec<_>>()
                    .join(" ");
                introspection::show_variable(&name)
            }
            other => {
                let what = other.to_string();
                let what = what
                    .split_whitespace()
                    .take(3)
                    .collect::<Vec<_>>()
                    .join(" ");
                Err(PlanError::NotSupported(format!("the statement {what} ...")))
            }
        }
    }

    /// Stops every pipeline: each job takes a last checkpoint (sources stop where they are,
    /// sinks publish what it covers, nothing partial is emitted), then its tasks end. A job
    /// whose checkpoint does not complete within `grace` is torn down; it resumes from its
    /// previous checkpoint.
    pub async fn shutdown(&self, grace: Duration) {
        let mut state = self.state.lock().await;
        let mut jobs: Vec<(String, Job)> = state.jobs.drain().collect();
        let stops = jobs.iter_mut().map(|(_, job)| job.coordinator.stop(grace));
        let stopped = futures::future::join_all(stops).await;
        for ((name, _), ok) in jobs.iter().zip(stopped) {
            if !ok {
                tracing::warn!(pipeline = %name, ?grace,
                    "the last checkpoint did not complete in time; the pipeline resumes from the one before");
            }
        }
        let tasks: Vec<JoinHandle<()>> = state
            .running
            .values_mut()
            .flat_map(|r| r.tasks.drain(..))
            .collect();
        drop(state);
        let all = futures::future::join_all(tasks);
        if tokio::time::timeout(Duration::from_secs(10), all)
            .await
            .is_err()
        {
            tracing::warn!("some pipelines did not end after their last checkpoint");
        }
        self.shutdown.cancel();
    }

    /// Waits until every pipeline has finished by itself (all sources bounded and done).
    pub async fn wait_finished(&self) {
        let tasks: Vec<JoinHandle<()>> = {
            let mut state = self.state.lock().await;
            state
                .running
                .values_mut()
                .flat_map(|r| r.tasks.drain(..))
                .collect()
        };
        futures::future::join_all(tasks).await;
    }

    /// Failures of pipelines, by name.
    pub async fn failures(&self) -> Vec<(String, String)> {
        let state = self.state.lock().await;
        state
            .running
            .iter()
            .map(|(n, r)| (n, &r.status))
            .filter_map(|(n, status)| match status.get() {
                PipelineStatus::Failed(e) => Some((n.clone(), e)),
                _ => None,
            })
            .collect()
    }

    /// The result columns and parameter types of `sql`, without running it (extended
    /// protocol's Describe). `None` when it returns no rows.
    pub async fn describe(&self, sql: &str) -> Result<Option<SchemaRef>> {
        self.describe_as(Caller::Trusted, sql).await
    }

    /// [`Engine::describe`] for `caller`, who must be allowed to run the statement.
    pub async fn describe_as(&self, caller: Caller<'_>, sql: &str) -> Result<Option<SchemaRef>> {
        let mut parsed = self.parse(sql)?;
        if parsed.len() != 1 {
            return Ok(None);
        }
        self.authorize(caller, &parsed[0].statement)?;
        match parsed.remove(0).statement {
            Statement::Query(query) => {
                let mut query = *query;
                continuous::prepare(&mut query, &self.state.lock().await.catalog)?;
                let plan = self.logical_plan(query).await?;
                Ok(Some(Arc::new(plan.schema().as_arrow().clone())))
            }
            Statement::Show(kind) => Ok(Some(introspection::show_schema(kind))),
            Statement::ShowCreate { .. } => Ok(Some(introspection::show_create_schema())),
            Statement::Describe { .. } => Ok(Some(introspection::describe_schema())),
            Statement::Explain { .. } => Ok(Some(introspection::explain_schema())),
            Statement::Standard(s)
                if matches!(*s, sqlparser::ast::Statement::ShowVariable { .. }) =>
            {
                Ok(Some(introspection::show_variable_schema()))
            }
            _ => Ok(None),
        }
    }

    /// Plans a query with `$n` parameters and returns the parameter types DataFusion infers.
    pub async fn parameter_types(
        &self,
        sql: &str,
    ) -> Result<Vec<Option<arrow::datatypes::DataType>>> {
        let mut parsed = self.parse(sql)?;
        if parsed.len() != 1 {
            return Ok(Vec::new());
        }
        match parsed.remove(0).statement {
            Statement::Query(query) => {
                let mut query = *query;
                continuous::prepare(&mut query, &self.state.lock().await.catalog)?;
                let plan = self.logical_plan(query).await?;
                let types = plan.get_parameter_types()?;
                let mut ordered: Vec<(String, Option<arrow::datatypes::DataType>)> =
                    types.into_iter().collect();
                ordered.sort_by_key(|(k, _)| {
                    k.trim_start_matches('$')
                        .parse::<usize>()
                        .unwrap_or(usize::MAX)
                });
                Ok(ordered.into_iter().map(|(_, t)| t).collect())
            }
            _ => Ok(Vec::new()),
        }
    }

    /// Executes a query with parameter values (extended protocol's Execute).
    pub async fn execute_with_params(
        &self,
        caller: Caller<'_>,
        sql: &str,
        params: datafusion::common::ParamValues,
    ) -> Result<Output> {
        let mut parsed = self.parse(sql)?;
        if parsed.len() != 1 {
            return Err(PlanError::Syntax {
                message: "a prepared statement holds exactly one statement".into(),
                position: None,
            });
        }
        let parsed = parsed.remove(0);
        self.authorize(caller, &parsed.statement)?;
        let Statement::Query(query) = parsed.statement else {
            return self.execute_statement(caller, parsed).await;
        };
        let mut query = *query;
        continuous::prepare(&mut query, &self.state.lock().await.catalog)?;
        let plan = self.logical_plan(query).await?.with_param_values(params)?;
        let plan = self.ctx.state().optimize(&plan)?;
        self.run_plan(plan).await
    }
}

/// A `checkpoint.interval` from a WITH clause, checked.
fn checkpoint_interval(interval: Option<Duration>) -> Result<Option<Duration>> {
    match interval {
        Some(d) if d < Duration::from_millis(10) => Err(PlanError::InvalidOption {
            key: CHECKPOINT_INTERVAL.into(),
            message: format!("option '{CHECKPOINT_INTERVAL}' must be at least 10ms"),
        }),
        other => Ok(other),
    }
}

/// What a pipeline's saved state depends on: its own statement and those of everything it
/// reads, transitively. State saved under another fingerprint is not restored.
fn fingerprint(catalog: &Catalog, name: &str) -> String {
    let mut seen = Vec::new();
    let mut stack = vec![name.to_string()];
    while let Some(object) = stack.pop() {
        if seen.contains(&object) {
            continue;
        }
        if let Some(entry) = catalog.get(&object) {
            stack.extend(entry.depends_on.iter().cloned());
        }
        seen.push(object);
    }
    seen.sort();
    seen.iter()
        .filter_map(|o| catalog.get(o).map(|e| e.sql.trim().to_string()))
        .collect::<Vec<_>>()
        .join(";\n")
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

fn collect_dependents(catalog: &Catalog, name: &str, out: &mut Vec<String>) {
    for dependent in catalog.dependents(name) {
        if !out.contains(&dependent.name) {
            collect_dependents(catalog, &dependent.name, out);
            out.push(dependent.name.clone());
        }
    }
}

/// `SELECT * FROM name`, as a parsed query.
fn select_all(name: &str) -> Result<sqlparser::ast::Query> {
    let quoted = format!("\"{}\"", name.replace('"', "\"\""));
    match weir_sql::parse_sql(&format!("SELECT * FROM {quoted}"))?.pop() {
        Some(Statement::Query(query)) => Ok(*query),
        _ => Err(PlanError::Internal(format!("cannot select from {name}"))),
    }
}
