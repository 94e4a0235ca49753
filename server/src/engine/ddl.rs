//! DDL: CREATE and DROP.
//!
//! Every statement here has the same shape: reserve the name under the lock, do the slow
//! part without it (a broker's metadata, a table's first load, planning, a pipeline's
//! checkpoint, a stop), then take the lock once more to check what may have changed
//! meanwhile and publish the result.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use datafusion::catalog::TableProvider;

use weir_planner::catalog::{Catalog, CatalogEntry};
use weir_planner::continuous::{self, ContinuousPlan};
use weir_planner::schema::{is_event_time_type, schema_from_columns, watermark_delay};
use weir_planner::tables::{LookupTableProvider, MvTable, UnboundedTable};
use weir_planner::{PlanError, Result};
use weir_runtime::CancellationToken;
use weir_runtime::connector::{
    ConnectorError, ConnectorRegistry, EventTime, SinkSpec, SourceSpec, TableSpec,
};
use weir_runtime::mv_store::{DEFAULT_MAX_ROWS, DEFAULT_RETENTION, MvStore};
use weir_sql::{
    CreateMaterializedView, CreateSink, CreateSource, CreateView, ObjectKind, SinkInput, Statement,
};

use super::{Busy, Engine, Output, Reservation, State};

/// A view's or sink's option: how long after its end a window still takes records.
const ALLOWED_LATENESS: &str = "window.allowed_lateness";
/// A view's or sink's option: how often its job takes a checkpoint.
const CHECKPOINT_INTERVAL: &str = "checkpoint.interval";
/// Default `checkpoint.interval`.
pub const DEFAULT_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(10);

impl Engine {
    pub(super) async fn create_source(
        &self,
        create: CreateSource,
        kind: ObjectKind,
        sql: String,
    ) -> Result<Output> {
        let done = Output::Command(format!("CREATE {}", kind.sql_name()));
        let Some(_reserved) = self.reserve_new(&create.name, create.if_not_exists)? else {
            return Ok(done);
        };
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
        let factory = self
            .connect(move |connectors| connectors.source(&spec, &options))
            .await?;
        // Queries see the declared columns, then the hidden ones (selectable by name only).
        let hidden = factory.hidden_columns();
        let table_schema = if hidden.is_empty() {
            schema.clone()
        } else {
            let fields: Vec<_> = schema.fields().iter().cloned().chain(hidden).collect();
            Arc::new(arrow::datatypes::Schema::new(fields))
        };
        let provider: Arc<dyn TableProvider> = Arc::new(UnboundedTable {
            name: create.name.clone(),
            kind,
            schema: table_schema,
        });
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
        self.publish(&mut self.lock(), entry, Some(provider))?;
        Ok(done)
    }

    /// `CREATE TABLE`: a keyed table, loaded (or connected to) now, looked up by joins.
    pub(super) async fn create_table(&self, create: CreateSource, sql: String) -> Result<Output> {
        let Some(_reserved) = self.reserve_new(&create.name, create.if_not_exists)? else {
            return Ok(Output::Command("CREATE TABLE".into()));
        };
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
        let options = create.options.clone();
        let factory = self
            .connect(move |connectors| connectors.table(&spec, &options))
            .await?;
        // Loaded to the end (or connected to) before CREATE returns, without the lock.
        let table = factory.open(&self.metrics).await?;
        let provider: Arc<dyn TableProvider> = Arc::new(LookupTableProvider {
            table: table.clone(),
        });
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
        self.publish(&mut self.lock(), entry, Some(provider))?;
        Ok(Output::Command("CREATE TABLE".into()))
    }

    /// `CREATE VIEW`: a name for a query. Planned now as a continuous query (so a view that
    /// cannot run is refused at CREATE), stored prepared, and inlined wherever it is read.
    pub(super) async fn create_plain_view(
        &self,
        create: CreateView,
        sql: String,
    ) -> Result<Output> {
        let Some(_reserved) = self.reserve_new(&create.name, create.if_not_exists)? else {
            return Ok(Output::Command("CREATE VIEW".into()));
        };
        let mut query = *create.query;
        let views = continuous::prepare(&mut query, &self.lock().catalog)?;
        let plan = self.plan_prepared(query.clone(), views).await?;
        let provider: Arc<dyn TableProvider> = Arc::new(UnboundedTable {
            name: create.name.clone(),
            kind: ObjectKind::View,
            schema: plan.schema.clone(),
        });
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
        self.publish(&mut self.lock(), entry, Some(provider))?;
        Ok(Output::Command("CREATE VIEW".into()))
    }

    /// Plans a continuous query (a materialized view's or a sink's).
    async fn plan_continuous(&self, mut query: sqlparser::ast::Query) -> Result<ContinuousPlan> {
        let views = continuous::prepare(&mut query, &self.lock().catalog)?;
        self.plan_prepared(query, views).await
    }

    /// Plans a query that went through [`continuous::prepare`], which inlined `views`.
    async fn plan_prepared(
        &self,
        query: sqlparser::ast::Query,
        views: Vec<String>,
    ) -> Result<ContinuousPlan> {
        let plan = self.logical_plan(query).await?;
        let state = self.lock();
        let catalog = &state.catalog;
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

    pub(super) async fn create_view(
        &self,
        create: CreateMaterializedView,
        sql: String,
        release: &CancellationToken,
    ) -> Result<Output> {
        let Some(_reserved) = self.reserve_new(&create.name, create.if_not_exists)? else {
            return Ok(Output::Command("CREATE MATERIALIZED VIEW".into()));
        };
        let reader = create.options.reader();
        let retention = reader.duration("retention")?.unwrap_or(DEFAULT_RETENTION);
        let max_rows = reader
            .u64("max_rows")?
            .map(|n| n as usize)
            .unwrap_or(DEFAULT_MAX_ROWS);
        let lateness = reader.duration(ALLOWED_LATENESS)?;
        let checkpoint_interval = checkpoint_interval(reader.duration(CHECKPOINT_INTERVAL)?)?;
        reader.finish()?;
        let mut plan = self.plan_continuous(*create.query).await?;
        if let Some(lateness) = lateness {
            plan = plan.with_allowed_lateness(lateness)?;
        }
        let store = MvStore::new(plan.schema.clone(), retention, max_rows);
        let provider: Arc<dyn TableProvider> = Arc::new(MvTable {
            store: store.clone(),
        });
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
        self.publish_and_start(entry, Some(provider), release)
            .await?;
        Ok(Output::Command("CREATE MATERIALIZED VIEW".into()))
    }

    pub(super) async fn create_sink(
        &self,
        create: CreateSink,
        sql: String,
        release: &CancellationToken,
    ) -> Result<Output> {
        let Some(_reserved) = self.reserve_new(&create.name, create.if_not_exists)? else {
            return Ok(Output::Command("CREATE SINK".into()));
        };
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
                let (hides, schema) = {
                    let state = self.lock();
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
                    (hides, entry.schema.clone())
                };
                if hides {
                    // The sink receives the declared columns, as `SELECT *` would.
                    let query = select_all(&from)?;
                    let plan = self.plan_continuous(query).await?;
                    (plan.schema.clone(), plan.reads(), Some(Arc::new(plan)))
                } else {
                    (schema, vec![from], None)
                }
            }
            SinkInput::Query(query) => {
                let mut plan = self.plan_continuous(*query).await?;
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
        let options = create
            .options
            .without(ALLOWED_LATENESS)
            .without(CHECKPOINT_INTERVAL);
        let factory = self
            .connect(move |connectors| connectors.sink(&spec, &options))
            .await?;
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
        self.publish_and_start(entry, None, release).await?;
        Ok(Output::Command("CREATE SINK".into()))
    }

    /// `DROP`: every named object and, with CASCADE, what reads it. The objects leave the
    /// catalog at once; their pipelines are stopped (each job with a last checkpoint) and
    /// their checkpoints deleted without the lock, the names reserved until that is done.
    pub(super) async fn drop_objects(
        &self,
        kind: ObjectKind,
        names: &[String],
        if_exists: bool,
        cascade: bool,
    ) -> Result<Output> {
        let mut reserved = Vec::new();
        let mut stopping = Vec::new();
        let removed = {
            let mut state = self.lock();
            // Dependents before what they read (deepest first), each once.
            let mut doomed: Vec<String> = Vec::new();
            for name in names {
                if doomed.contains(name) {
                    continue;
                }
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
                let mut dependents = Vec::new();
                collect_dependents(&state.catalog, name, &mut dependents);
                if !dependents.is_empty() && !cascade {
                    return Err(dependents_error(&state, kind, name, &dependents));
                }
                for object in dependents.into_iter().chain([name.clone()]) {
                    if !doomed.contains(&object) {
                        doomed.push(object);
                    }
                }
            }
            for victim in &doomed {
                reserved.push(self.reserve(&mut state, victim, Busy::Dropping)?);
            }
            self.remove_objects(&mut state, &doomed, &mut stopping)
        };
        for pipeline in stopping {
            self.stop_pipeline(pipeline, true).await;
        }
        drop(reserved);
        removed?;
        Ok(Output::Command(format!("DROP {}", kind.sql_name())))
    }

    /// Takes `doomed` out of the catalog and the query context, and their pipelines out of
    /// the running ones into `stopping`. Goes on past a catalog that cannot be written, so
    /// that every pipeline taken out is stopped; returns the first such error.
    fn remove_objects(
        &self,
        state: &mut State,
        doomed: &[String],
        stopping: &mut Vec<super::pipelines::Stopping>,
    ) -> Result<()> {
        let mut first_error = None;
        for victim in doomed {
            stopping.extend(self.take_pipeline(state, victim));
            state.restarts.remove(victim);
            match state.catalog.remove(victim) {
                Ok(Some(entry)) if entry.kind != ObjectKind::Sink => {
                    let _ = self.ctx.deregister_table(victim.as_str());
                }
                Ok(_) => {}
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Reserves `name` for a CREATE; `None` when it exists and the statement said
    /// IF NOT EXISTS.
    fn reserve_new(&self, name: &str, if_not_exists: bool) -> Result<Option<Reservation<'_>>> {
        let mut state = self.lock();
        if if_not_exists && state.catalog.get(name).is_some() {
            return Ok(None);
        }
        self.reserve(&mut state, name, Busy::Creating).map(Some)
    }

    /// Runs a connector registry call on a blocking thread: it may wait on an external
    /// system (a Kafka broker's metadata, up to `connect.timeout`), and must hold neither
    /// the engine's lock nor one of the runtime's few workers meanwhile.
    async fn connect<T: Send + 'static>(
        &self,
        call: impl FnOnce(&dyn ConnectorRegistry) -> std::result::Result<T, ConnectorError>
        + Send
        + 'static,
    ) -> Result<T> {
        let connectors = self.connectors.clone();
        tokio::task::spawn_blocking(move || call(connectors.as_ref()))
            .await
            .map_err(|e| PlanError::Internal(format!("a connector's setup did not finish: {e}")))?
            .map_err(PlanError::from)
    }

    /// Adds `entry` to the catalog and its table, if it is a relation, to the query
    /// context. What it reads must still be there: a DROP may have run while the statement
    /// worked without the lock.
    fn publish(
        &self,
        state: &mut State,
        entry: CatalogEntry,
        provider: Option<Arc<dyn TableProvider>>,
    ) -> Result<()> {
        if let Some(gone) = entry
            .depends_on
            .iter()
            .find(|input| state.catalog.get(input).is_none())
        {
            return Err(PlanError::Undefined(format!(
                "\"{gone}\", which \"{}\" reads, was dropped while \"{}\" was being created",
                entry.name, entry.name
            )));
        }
        let name = entry.name.clone();
        if let Some(provider) = provider {
            self.ctx.register_table(name.as_str(), provider)?;
        }
        if let Err(e) = state.catalog.insert(entry) {
            let _ = self.ctx.deregister_table(name.as_str());
            return Err(e);
        }
        Ok(())
    }

    /// Publishes a view's or sink's entry and, once the engine has started, starts its
    /// pipeline under the same lock: no statement sees the one without the other.
    async fn publish_and_start(
        &self,
        entry: CatalogEntry,
        provider: Option<Arc<dyn TableProvider>>,
        release: &CancellationToken,
    ) -> Result<()> {
        let name = entry.name.clone();
        let input = entry.depends_on.first().cloned().unwrap_or_default();
        // `started` turns true once, in `start_all`, before any client can connect.
        let checkpoint = if self.lock().started {
            self.stored_checkpoint(&name, &input).await?
        } else {
            None
        };
        let mut state = self.lock();
        self.publish(&mut state, entry, provider)?;
        if state.started
            && let Err(e) = self.start_pipeline(&mut state, &name, checkpoint, release)
        {
            let _ = state.catalog.remove(&name);
            let _ = self.ctx.deregister_table(name.as_str());
            return Err(e);
        }
        Ok(())
    }
}

/// The error of a DROP without CASCADE of an object others read.
fn dependents_error(
    state: &State,
    kind: ObjectKind,
    name: &str,
    dependents: &[String],
) -> PlanError {
    let list: Vec<String> = dependents
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
    PlanError::Dependent(format!(
        "cannot drop {kind} \"{name}\" because {} depend(s) on it; use DROP ... CASCADE to drop them too",
        list.join(", ")
    ))
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
