//! Continuous queries: a `SELECT` over a stream, planned by DataFusion, run by Weir.
//!
//! The query goes through DataFusion's SQL planner and optimizer unchanged; the optimized
//! logical plan is then lowered node by node to runtime operators whose expressions are
//! DataFusion physical expressions: filters and projections, window aggregates (an
//! `Aggregate` over a window's placeholder columns) and lookup joins (a `Join` whose right
//! side is a TABLE). What this release cannot run continuously (stream-stream joins,
//! aggregation without a window, ORDER BY) is refused with SQLSTATE 0A000 naming the feature.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use datafusion::common::tree_node::TreeNode;
use datafusion::common::{DFSchema, TableReference};
use datafusion::execution::context::SessionState;
use datafusion::logical_expr::{
    Aggregate, Expr as Expr_, ExprSchemable, FetchType, Join, JoinType, LogicalPlan, SkipType,
    physical_planning_context::PhysicalPlanningContext,
};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::aggregate::LoweredAggregateBuilder;
use datafusion::physical_expr::expressions::Column;
use sqlparser::ast::{
    Expr, Ident, Query, SelectItem, SelectItemQualifiedWildcardKind, SetExpr, TableAlias,
    TableFactor, TableWithJoins, WildcardAdditionalOptions,
};
use weir_runtime::operators::{
    FilterOperator, GroupColumn, LookupJoin, LookupJoinSpec, LookupJoinType, Phase,
    ProjectOperator, WindowAggregate, WindowAggregateSpec, WindowKind, partial_schema,
    window_operator,
};
use weir_runtime::{Metrics, Stage};
use weir_sql::ObjectKind;

use crate::catalog::Catalog;
use crate::error::{PlanError, Result};
use crate::window;

/// A lowered continuous query: reads `input`, applies `steps`, produces `schema`.
#[derive(Debug)]
pub struct ContinuousPlan {
    /// The stream or materialized view read.
    pub input: String,
    pub input_kind: ObjectKind,
    steps: Vec<Step>,
    /// The rows produced.
    pub schema: SchemaRef,
    /// `LIMIT n` (live tails only).
    pub limit: Option<usize>,
    /// The tables it looks rows up in (lookup joins), in join order.
    pub tables: Vec<String>,
    /// The views (not materialized) inlined into it.
    pub views: Vec<String>,
}

/// The rows a cluster's shuffle carries, and how the upstream half makes them.
pub struct ShuffleHalf {
    pub stages: Vec<Stage>,
    pub schema: SchemaRef,
    /// Over `schema`: the columns whose hash picks the shuffle's partition.
    pub keys: Vec<Arc<dyn PhysicalExpr>>,
}

/// Whether a window's aggregation can be split in a partial and a final phase: TUMBLE and
/// HOP on event time (a SESSION's bounds depend on all of a key's rows; a processing-time
/// pane on each process's clock).
fn splits_in_phases(spec: &WindowAggregateSpec) -> bool {
    !spec.processing_time && !matches!(spec.kind, WindowKind::Session { .. })
}

/// A fresh operator for `step`.
fn stage(step: &Step, metrics: &Metrics, pipeline: &str) -> Result<Stage> {
    Ok(match step {
        Step::Filter {
            predicate,
            input_schema,
            ..
        } => Stage::Sync(Box::new(FilterOperator::try_new(
            predicate.clone(),
            input_schema,
        )?)),
        Step::Project { exprs, schema, .. } => Stage::Sync(Box::new(ProjectOperator::new(
            exprs.clone(),
            schema.clone(),
        ))),
        Step::Window {
            spec, input_schema, ..
        } => Stage::Sync(window_operator(spec.clone(), input_schema)?),
        Step::LookupJoin {
            spec, input_schema, ..
        } => Stage::Async(Box::new(LookupJoin::try_new(
            spec.clone(),
            input_schema,
            metrics.lookup_join(pipeline, &spec.table_name),
        )?)),
    })
}

/// How a continuous query can be split over workers that each read a share of the input.
#[derive(Debug)]
pub enum Partitioning {
    /// Every step works row by row: each worker runs all of them on its share.
    RowByRow,
    /// Step `step` (a window `GROUP BY`) and those after it need all the rows of a key in
    /// one place: the rows are exchanged by `keys` (over that step's input) before it.
    ByKey {
        step: usize,
        keys: Vec<Arc<dyn PhysicalExpr>>,
    },
    /// More than one keyed step: the query runs on one worker.
    Single,
}

#[derive(Debug)]
enum Step {
    Filter {
        predicate: Arc<dyn PhysicalExpr>,
        input_schema: SchemaRef,
        text: String,
    },
    Project {
        exprs: Vec<Arc<dyn PhysicalExpr>>,
        schema: SchemaRef,
        text: String,
    },
    Window {
        spec: Arc<WindowAggregateSpec>,
        input_schema: SchemaRef,
        text: String,
    },
    LookupJoin {
        spec: Arc<LookupJoinSpec>,
        input_schema: SchemaRef,
        text: String,
    },
}

impl ContinuousPlan {
    /// Fresh operator instances for the pipeline `pipeline`, whose counters go to `metrics`.
    pub fn stages(&self, metrics: &Metrics, pipeline: &str) -> Result<Vec<Stage>> {
        self.steps
            .iter()
            .map(|step| stage(step, metrics, pipeline))
            .collect()
    }

    /// The query's half before a cluster's shuffle, for a query that
    /// [`ContinuousPlan::partitioning`] splits by key: the row-by-row steps, then, with
    /// `pre_aggregate` and a window that allows it, the window's partial phase. Also the rows
    /// that cross the shuffle and their key columns (over those rows).
    pub fn upstream(
        &self,
        metrics: &Metrics,
        pipeline: &str,
        pre_aggregate: bool,
    ) -> Result<ShuffleHalf> {
        let (step, spec, input_schema) = self.keyed_step()?;
        let mut stages = self.steps[..step]
            .iter()
            .map(|s| stage(s, metrics, pipeline))
            .collect::<Result<Vec<_>>>()?;
        if pre_aggregate && splits_in_phases(spec) {
            stages.push(Stage::Sync(Box::new(WindowAggregate::with_phase(
                spec.clone(),
                input_schema,
                Phase::Partial,
            )?)));
            let schema = partial_schema(spec, input_schema)?;
            // Column 0 is the pane; the keys follow it (one constant column without keys).
            let keys = schema.fields().len()
                - 1
                - spec
                    .aggregates
                    .iter()
                    .map(|a| Ok(a.state_fields()?.len()))
                    .sum::<Result<usize>>()?;
            let keys = (1..=keys)
                .map(|i| Arc::new(Column::new(schema.field(i).name(), i)) as Arc<dyn PhysicalExpr>)
                .collect();
            return Ok(ShuffleHalf {
                stages,
                schema,
                keys,
            });
        }
        Ok(ShuffleHalf {
            stages,
            schema: input_schema.clone(),
            keys: spec.keys.clone(),
        })
    }

    /// The query's half after a cluster's shuffle (see [`ContinuousPlan::upstream`]): the
    /// window (its final phase when the upstream half pre-aggregates) and what follows it.
    pub fn downstream(
        &self,
        metrics: &Metrics,
        pipeline: &str,
        pre_aggregate: bool,
    ) -> Result<Vec<Stage>> {
        let (step, spec, input_schema) = self.keyed_step()?;
        let window = if pre_aggregate && splits_in_phases(spec) {
            Stage::Sync(Box::new(WindowAggregate::with_phase(
                spec.clone(),
                input_schema,
                Phase::Final,
            )?))
        } else {
            Stage::Sync(window_operator(spec.clone(), input_schema)?)
        };
        let mut stages = vec![window];
        for s in &self.steps[step + 1..] {
            stages.push(stage(s, metrics, pipeline)?);
        }
        Ok(stages)
    }

    /// The one window step, its spec and its input's schema.
    fn keyed_step(&self) -> Result<(usize, &Arc<WindowAggregateSpec>, &SchemaRef)> {
        let mut windows = self.steps.iter().enumerate().filter_map(|(i, s)| match s {
            Step::Window {
                spec, input_schema, ..
            } => Some((i, spec, input_schema)),
            _ => None,
        });
        match (windows.next(), windows.next()) {
            (Some(window), None) => Ok(window),
            _ => Err(PlanError::NotSupported(
                "a cluster runs a query with exactly one window aggregation".into(),
            )),
        }
    }

    /// How the query splits over a pipeline's workers (see `weir_runtime::exchange`).
    pub fn partitioning(&self) -> Partitioning {
        let mut keyed = self
            .steps
            .iter()
            .enumerate()
            .filter_map(|(i, step)| match step {
                Step::Window { spec, .. } => Some((i, spec.keys.clone())),
                _ => None,
            });
        match (keyed.next(), keyed.next()) {
            (None, _) => Partitioning::RowByRow,
            (Some((step, keys)), None) => Partitioning::ByKey { step, keys },
            (Some(_), Some(_)) => Partitioning::Single,
        }
    }

    /// Whether it aggregates per window.
    pub fn has_window(&self) -> bool {
        self.steps.iter().any(|s| matches!(s, Step::Window { .. }))
    }

    /// What it reads: its input first, then the tables it joins and the views it inlines (a
    /// DROP of any of them needs CASCADE).
    pub fn reads(&self) -> Vec<String> {
        let mut reads = vec![self.input.clone()];
        for t in self.tables.iter().chain(&self.views) {
            if !reads.contains(t) {
                reads.push(t.clone());
            }
        }
        reads
    }

    /// Lets records arrive up to `lateness` after their window's end (the window is emitted
    /// that much later). Only for a query with a window.
    pub fn with_allowed_lateness(mut self, lateness: std::time::Duration) -> Result<Self> {
        let millis = i64::try_from(lateness.as_millis()).unwrap_or(i64::MAX);
        let mut windows = 0;
        for step in &mut self.steps {
            if let Step::Window { spec, text, .. } = step {
                let mut changed = spec.as_ref().clone();
                changed.allowed_lateness = millis;
                *spec = Arc::new(changed);
                text.push_str(&format!(" allowed lateness {}", fmt_millis(millis)));
                windows += 1;
            }
        }
        if windows == 0 {
            return Err(PlanError::InvalidOption {
                key: "window.allowed_lateness".into(),
                message: "option 'window.allowed_lateness' applies to a query with a window (TUMBLE, HOP, SESSION)".into(),
            });
        }
        Ok(self)
    }

    /// The operator graph, one line per operator, source first.
    pub fn explain(&self, source: &str) -> Vec<String> {
        let mut lines = vec![format!(
            "source: {} \"{}\" ({source})",
            self.input_kind, self.input
        )];
        for step in &self.steps {
            lines.push(match step {
                Step::Filter { text, .. } => format!("  -> filter: {text}"),
                Step::Project { text, .. } => format!("  -> project: {text}"),
                Step::Window { text, .. } => format!("  -> window aggregate: {text}"),
                Step::LookupJoin { text, .. } => format!("  -> lookup join: {text}"),
            });
        }
        if let Some(limit) = self.limit {
            lines.push(format!("  -> limit: {limit}"));
        }
        lines
    }
}

/// `FOR SYSTEM_TIME AS OF <time>` on a joined relation: accepted on a TABLE, where it means
/// what a plain join with a table means (the table as it is when the record is processed),
/// and removed before DataFusion plans the query.
pub fn strip_system_time(query: &mut Query, catalog: &Catalog) -> Result<()> {
    strip_set_expr(&mut query.body, catalog)
}

fn strip_set_expr(body: &mut SetExpr, catalog: &Catalog) -> Result<()> {
    match body {
        SetExpr::Select(select) => select
            .from
            .iter_mut()
            .try_for_each(|t| strip_table_with_joins(t, catalog)),
        SetExpr::Query(q) => strip_system_time(q, catalog),
        SetExpr::SetOperation { left, right, .. } => {
            strip_set_expr(left, catalog)?;
            strip_set_expr(right, catalog)
        }
        _ => Ok(()),
    }
}

fn strip_table_with_joins(t: &mut TableWithJoins, catalog: &Catalog) -> Result<()> {
    strip_factor(&mut t.relation, catalog)?;
    t.joins
        .iter_mut()
        .try_for_each(|j| strip_factor(&mut j.relation, catalog))
}

fn strip_factor(factor: &mut TableFactor, catalog: &Catalog) -> Result<()> {
    match factor {
        TableFactor::Table { name, version, .. } if version.is_some() => {
            let table = name
                .0
                .last()
                .and_then(|p| p.as_ident())
                .map(crate::window::normalize)
                .unwrap_or_default();
            match catalog.get(&table) {
                Some(entry) if entry.kind == ObjectKind::Table => {
                    *version = None;
                    Ok(())
                }
                Some(entry) => Err(PlanError::NotSupported(format!(
                    "FOR SYSTEM_TIME AS OF on {} \"{table}\" (a temporal join of two streams); it applies to a TABLE, the lookup side of a join",
                    entry.kind
                ))),
                None => Err(PlanError::undefined("table", &table)),
            }
        }
        TableFactor::Derived { subquery, .. } => strip_system_time(subquery, catalog),
        TableFactor::NestedJoin {
            table_with_joins, ..
        } => strip_table_with_joins(table_with_joins, catalog),
        _ => Ok(()),
    }
}

/// Everything a query's AST goes through before DataFusion plans it: `FOR SYSTEM_TIME AS OF`
/// removed ([`strip_system_time`]), window calls rewritten ([`window::rewrite_windows`]),
/// views inlined ([`inline_views`]), `*` expanded ([`expand_wildcards`]). Returns the views
/// it inlined (what the query depends on besides what it scans).
pub fn prepare(query: &mut Query, catalog: &Catalog) -> Result<Vec<String>> {
    strip_system_time(query, catalog)?;
    window::rewrite_windows(query, catalog)?;
    let mut views = Vec::new();
    inline_views(query, catalog, &mut views, 0)?;
    expand_wildcards(query, catalog);
    Ok(views)
}

/// Views may read views; a chain deeper than this is a cycle or a mistake.
const MAX_VIEW_DEPTH: usize = 32;

/// Replaces every `FROM view` with the view's query as a subquery under the view's name (or
/// the alias): a view is a name for a query, so statements that read it read what it reads,
/// with the same event time and watermarks, in their own pipeline.
pub fn inline_views(
    query: &mut Query,
    catalog: &Catalog,
    views: &mut Vec<String>,
    depth: usize,
) -> Result<()> {
    if depth > MAX_VIEW_DEPTH {
        return Err(PlanError::NotSupported(format!(
            "views nested more than {MAX_VIEW_DEPTH} deep"
        )));
    }
    if let Some(with) = &mut query.with {
        for cte in &mut with.cte_tables {
            inline_views(&mut cte.query, catalog, views, depth)?;
        }
    }
    inline_set_expr(&mut query.body, catalog, views, depth)
}

fn inline_set_expr(
    body: &mut SetExpr,
    catalog: &Catalog,
    views: &mut Vec<String>,
    depth: usize,
) -> Result<()> {
    match body {
        SetExpr::Select(select) => {
            for t in &mut select.from {
                inline_factor(&mut t.relation, catalog, views, depth)?;
                for j in &mut t.joins {
                    inline_factor(&mut j.relation, catalog, views, depth)?;
                }
            }
            Ok(())
        }
        SetExpr::Query(q) => inline_views(q, catalog, views, depth),
        SetExpr::SetOperation { left, right, .. } => {
            inline_set_expr(left, catalog, views, depth)?;
            inline_set_expr(right, catalog, views, depth)
        }
        _ => Ok(()),
    }
}

fn inline_factor(
    factor: &mut TableFactor,
    catalog: &Catalog,
    views: &mut Vec<String>,
    depth: usize,
) -> Result<()> {
    match factor {
        TableFactor::Derived { subquery, .. } => inline_views(subquery, catalog, views, depth),
        TableFactor::NestedJoin {
            table_with_joins, ..
        } => {
            inline_factor(&mut table_with_joins.relation, catalog, views, depth)?;
            for j in &mut table_with_joins.joins {
                inline_factor(&mut j.relation, catalog, views, depth)?;
            }
            Ok(())
        }
        TableFactor::Table {
            name,
            alias,
            args: None,
            ..
        } => {
            let [part] = name.0.as_slice() else {
                return Ok(());
            };
            let Some(ident) = part.as_ident() else {
                return Ok(());
            };
            let key = window::normalize(ident);
            let Some(entry) = catalog.get(&key).filter(|e| e.kind == ObjectKind::View) else {
                return Ok(());
            };
            let Some(view) = &entry.query else {
                return Err(PlanError::Internal(format!("view \"{key}\" has no query")));
            };
            let mut subquery = view.as_ref().clone();
            // The view's query was prepared when it was created, but what it reads may have
            // been views too: inline those, once more per level.
            inline_views(&mut subquery, catalog, views, depth + 1)?;
            if !views.contains(&entry.name) {
                views.push(entry.name.clone());
            }
            let alias = alias.clone().unwrap_or_else(|| TableAlias {
                explicit: true,
                name: Ident::with_quote('"', entry.name.clone()),
                columns: Vec::new(),
                at: None,
            });
            *factor = TableFactor::Derived {
                lateral: false,
                subquery: Box::new(subquery),
                alias: Some(alias),
                sample: None,
            };
            Ok(())
        }
        _ => Ok(()),
    }
}

/// `SELECT *` over a stream lists its declared columns only: the columns a source adds
/// (Kafka's `_key`, `_partition`, `_offset`, `_timestamp`) are there to be selected by name,
/// as in Flink and RisingWave. Rewrites `*` and `name.*` into the declared columns.
pub fn expand_wildcards(query: &mut Query, catalog: &Catalog) {
    expand_set_expr(&mut query.body, catalog);
}

fn expand_set_expr(body: &mut SetExpr, catalog: &Catalog) {
    match body {
        SetExpr::Select(select) => {
            for t in &mut select.from {
                if let TableFactor::Derived { subquery, .. } = &mut t.relation {
                    expand_wildcards(subquery, catalog);
                }
            }
            let [only] = select.from.as_slice() else {
                return;
            };
            if !only.joins.is_empty() {
                return;
            }
            let TableFactor::Table { name, alias, .. } = &only.relation else {
                return;
            };
            let Some(entry) = name.0.last().and_then(|p| p.as_ident()).and_then(|ident| {
                let key = match ident.quote_style {
                    Some(_) => ident.value.clone(),
                    None => ident.value.to_lowercase(),
                };
                catalog.get(&key)
            }) else {
                return;
            };
            let hidden = entry
                .source
                .as_ref()
                .is_some_and(|s| !s.hidden_columns().is_empty());
            if entry.kind != ObjectKind::Stream || !hidden {
                return;
            }
            let qualifier = alias.as_ref().map_or_else(
                || name.clone(),
                |a| sqlparser::ast::ObjectName::from(vec![a.name.clone()]),
            );
            let columns = |prefix: Option<&sqlparser::ast::ObjectName>| -> Vec<SelectItem> {
                entry
                    .schema
                    .fields()
                    .iter()
                    .map(|f| {
                        let column = Ident::with_quote('"', f.name());
                        SelectItem::UnnamedExpr(match prefix {
                            Some(p) => {
                                let mut parts: Vec<Ident> =
                                    p.0.iter().filter_map(|p| p.as_ident().cloned()).collect();
                                parts.push(column);
                                Expr::CompoundIdentifier(parts)
                            }
                            None => Expr::Identifier(column),
                        })
                    })
                    .collect()
            };
            let plain = |o: &WildcardAdditionalOptions| {
                o.opt_ilike.is_none()
                    && o.opt_exclude.is_none()
                    && o.opt_except.is_none()
                    && o.opt_replace.is_none()
                    && o.opt_rename.is_none()
            };
            let mut projection = Vec::with_capacity(select.projection.len());
            for item in std::mem::take(&mut select.projection) {
                match item {
                    SelectItem::Wildcard(o) if plain(&o) => projection.extend(columns(None)),
                    SelectItem::QualifiedWildcard(
                        SelectItemQualifiedWildcardKind::ObjectName(n),
                        o,
                    ) if plain(&o) && n == qualifier => {
                        projection.extend(columns(Some(&n)));
                    }
                    other => projection.push(other),
                }
            }
            select.projection = projection;
        }
        SetExpr::Query(q) => expand_wildcards(q, catalog),
        SetExpr::SetOperation { left, right, .. } => {
            expand_set_expr(left, catalog);
            expand_set_expr(right, catalog);
        }
        _ => {}
    }
}

/// Names of the catalog streams and views a plan scans.
pub fn scanned_objects(plan: &LogicalPlan, catalog: &Catalog) -> Vec<(String, ObjectKind)> {
    let mut found = Vec::new();
    let _ = plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node {
            let schema = scan.table_name.schema();
            if (schema.is_none() || schema == Some("public"))
                && let Some(entry) = catalog.get(scan.table_name.table())
            {
                found.push((entry.name.clone(), entry.kind));
            }
        }
        Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
    });
    found
}

/// Whether a plan holds a window's placeholder columns (they mean something only to the
/// window operator of a continuous query).
pub fn uses_window(plan: &LogicalPlan) -> bool {
    plan.exists(|node| {
        Ok(node.expressions().iter().any(|e| {
            e.exists(|e| {
                Ok(matches!(e, Expr_::ScalarFunction(f) if window::is_placeholder(f.name())))
            })
            .unwrap_or(true)
        }))
    })
    .unwrap_or(true)
}

/// Lowers an optimized logical plan over one stream (or view) to a [`ContinuousPlan`].
pub fn lower(
    plan: &LogicalPlan,
    state: &SessionState,
    catalog: &Catalog,
) -> Result<ContinuousPlan> {
    let mut lowering = Lowering {
        input: None,
        steps: Vec::new(),
        limit: None,
        window_columns: HashMap::new(),
        tables: Vec::new(),
    };
    lowering.visit(plan, state, catalog)?;
    if !lowering.window_columns.is_empty() {
        return Err(PlanError::NotSupported(
            "a window (TUMBLE, HOP, SESSION) without GROUP BY window_start, window_end: window results are aggregates per window".into(),
        ));
    }
    let Some((input, input_kind, input_schema)) = lowering.input else {
        return Err(PlanError::NotSupported(
            "a continuous query that reads no stream or materialized view".into(),
        ));
    };
    // The schema of what the chain emits: the last projection's, or the input's.
    let emitted = lowering
        .steps
        .iter()
        .rev()
        .find_map(|s| match s {
            Step::Project { schema, .. } => Some(schema.clone()),
            Step::Window { spec, .. } => Some(spec.schema.clone()),
            Step::LookupJoin { spec, .. } => Some(spec.schema.clone()),
            Step::Filter { .. } => None,
        })
        .unwrap_or(input_schema);
    // The plan's own schema is the contract (names as the user wrote them); relabel the
    // emitted columns when only names or nullability differ.
    let declared: SchemaRef = Arc::new(plan.schema().as_arrow().clone());
    if emitted.fields().len() != declared.fields().len() {
        return Err(PlanError::Internal(format!(
            "continuous plan emits {} columns but declares {}",
            emitted.fields().len(),
            declared.fields().len()
        )));
    }
    if emitted != declared {
        let exprs = emitted
            .fields()
            .iter()
            .enumerate()
            .map(|(i, f)| Arc::new(Column::new(f.name(), i)) as Arc<dyn PhysicalExpr>)
            .collect();
        let text = declared
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .collect::<Vec<_>>()
            .join(", ");
        lowering.steps.push(Step::Project {
            exprs,
            schema: declared.clone(),
            text,
        });
    }
    Ok(ContinuousPlan {
        input,
        input_kind,
        steps: lowering.steps,
        schema: declared,
        limit: lowering.limit,
        tables: lowering.tables,
        views: Vec::new(),
    })
}

struct Lowering {
    input: Option<(String, ObjectKind, SchemaRef)>,
    steps: Vec<Step>,
    limit: Option<usize>,
    /// Columns of the current output that stand for a window's bounds (placeholders that
    /// still hold the event time), by name, until the `GROUP BY` that consumes them.
    window_columns: HashMap<String, (WindowKind, GroupColumn)>,
    /// Tables joined so far.
    tables: Vec<String>,
}

impl Lowering {
    fn visit(&mut self, plan: &LogicalPlan, state: &SessionState, catalog: &Catalog) -> Result<()> {
        match plan {
            LogicalPlan::Projection(p) => {
                self.visit(&p.input, state, catalog)?;
                let mut window_columns = HashMap::new();
                for (i, e) in p.expr.iter().enumerate() {
                    if let Some(column) = self.window_column(e) {
                        window_columns.insert(p.schema.field(i).name().clone(), column);
                    } else if self.mentions_window(e) {
                        return Err(window_expression(e));
                    }
                }
                self.window_columns = window_columns;
                let exprs = p
                    .expr
                    .iter()
                    .map(|e| state.create_physical_expr(e.clone(), p.input.schema()))
                    .collect::<Result<Vec<_>, _>>()?;
                let text = p
                    .expr
                    .iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join(", ");
                let schema = Arc::new(p.schema.as_arrow().clone());
                self.steps.push(Step::Project {
                    exprs,
                    schema,
                    text,
                });
                Ok(())
            }
            LogicalPlan::Filter(f) => {
                self.visit(&f.input, state, catalog)?;
                if self.limit.is_some() {
                    return Err(PlanError::NotSupported(
                        "a WHERE above a LIMIT in a continuous query".into(),
                    ));
                }
                if self.mentions_window(&f.predicate) {
                    return Err(window_expression(&f.predicate));
                }
                let predicate =
                    state.create_physical_expr(f.predicate.clone(), f.input.schema())?;
                let input_schema = Arc::new(f.input.schema().as_arrow().clone());
                self.steps.push(Step::Filter {
                    predicate,
                    input_schema,
                    text: f.predicate.to_string(),
                });
                Ok(())
            }
            LogicalPlan::SubqueryAlias(a) => self.visit(&a.input, state, catalog),
            LogicalPlan::Limit(l) => {
                self.visit(&l.input, state, catalog)?;
                let skip = matches!(l.get_skip_type()?, SkipType::Literal(0));
                let FetchType::Literal(fetch) = l.get_fetch_type()? else {
                    return Err(PlanError::NotSupported(
                        "a LIMIT that is not a constant".into(),
                    ));
                };
                if !skip {
                    return Err(PlanError::NotSupported("OFFSET over a stream".into()));
                }
                self.set_limit(fetch)
            }
            LogicalPlan::TableScan(scan) => {
                let name = scan.table_name.table();
                let Some(entry) = catalog.get(name) else {
                    return Err(PlanError::NotSupported(format!(
                        "a continuous query over \"{}\", which is not a stream or materialized view",
                        scan.table_name
                    )));
                };
                if !matches!(
                    entry.kind,
                    ObjectKind::Stream | ObjectKind::MaterializedView
                ) {
                    return Err(PlanError::NotSupported(format!(
                        "reading {} \"{name}\" as a stream: a table is the lookup side of a join (FROM stream JOIN {name} ON ...)",
                        entry.kind
                    )));
                }
                if !scan.filters.is_empty() {
                    return Err(PlanError::Internal(
                        "filters pushed into a stream scan".into(),
                    ));
                }
                // The scanned table's schema: the declared columns and any hidden ones.
                let full = scan.source.schema();
                self.input = Some((entry.name.clone(), entry.kind, full.clone()));
                if let Some(projection) = &scan.projection
                    && (projection.len() != full.fields().len()
                        || projection.iter().enumerate().any(|(i, p)| i != *p))
                {
                    let exprs = projection
                        .iter()
                        .map(|&i| {
                            Arc::new(Column::new(full.field(i).name(), i)) as Arc<dyn PhysicalExpr>
                        })
                        .collect();
                    let schema = Arc::new(full.project(projection)?);
                    let text = schema
                        .fields()
                        .iter()
                        .map(|f| f.name().as_str())
                        .collect::<Vec<_>>()
                        .join(", ");
                    self.steps.push(Step::Project {
                        exprs,
                        schema,
                        text,
                    });
                }
                if let Some(fetch) = scan.fetch {
                    self.set_limit(Some(fetch))?;
                }
                Ok(())
            }
            LogicalPlan::Aggregate(a) => {
                self.visit(&a.input, state, catalog)?;
                self.lower_window_aggregate(a, state, catalog)
            }
            LogicalPlan::Join(j) => self.lower_lookup_join(j, state, catalog),
            LogicalPlan::Sort(_) => Err(PlanError::NotSupported(
                "ORDER BY over an unbounded stream".into(),
            )),
            LogicalPlan::Window(_) => Err(PlanError::NotSupported(
                "window functions (OVER) over a stream".into(),
            )),
            LogicalPlan::Distinct(_) => {
                Err(PlanError::NotSupported("DISTINCT over a stream".into()))
            }
            LogicalPlan::Union(_) => Err(PlanError::NotSupported("UNION of streams".into())),
            other => Err(PlanError::NotSupported(format!(
                "{} in a continuous query",
                other
                    .display()
                    .to_string()
                    .split(':')
                    .next()
                    .unwrap_or("this operator")
            ))),
        }
    }

    /// What `e` is if it stands for a window bound: a placeholder call, or a column
    /// passing one through.
    fn window_column(&self, e: &Expr_) -> Option<(WindowKind, GroupColumn)> {
        match e {
            Expr_::Alias(a) => self.window_column(&a.expr),
            Expr_::Column(c) => self.window_columns.get(&c.name).copied(),
            Expr_::ScalarFunction(f) if window::is_placeholder(f.name()) => {
                let kind = window::placeholder_window(&f.args)?;
                let column = if f.name() == window::WINDOW_START {
                    GroupColumn::WindowStart
                } else {
                    GroupColumn::WindowEnd
                };
                Some((kind, column))
            }
            _ => None,
        }
    }

    /// Whether `e` reads a window bound anywhere (a placeholder call or a column holding one).
    fn mentions_window(&self, e: &Expr_) -> bool {
        e.exists(|e| {
            Ok(match e {
                Expr_::Column(c) => self.window_columns.contains_key(&c.name),
                Expr_::ScalarFunction(f) => window::is_placeholder(f.name()),
                _ => false,
            })
        })
        .unwrap_or(true)
    }

    /// `GROUP BY window_start, window_end, keys...` over a window's rows.
    fn lower_window_aggregate(
        &mut self,
        a: &Aggregate,
        state: &SessionState,
        catalog: &Catalog,
    ) -> Result<()> {
        let not_windowed = || {
            PlanError::NotSupported(
                "aggregation over a stream without a window (GROUP BY window_start, window_end of TUMBLE, HOP or SESSION)".into(),
            )
        };
        let input_schema = Arc::new(a.input.schema().as_arrow().clone());
        let mut kind = None;
        let mut time = None;
        let mut keys = Vec::new();
        let mut group_columns = Vec::new();
        for e in &a.group_expr {
            if matches!(e, Expr_::GroupingSet(_)) {
                return Err(PlanError::NotSupported(
                    "GROUPING SETS, ROLLUP and CUBE over a stream".into(),
                ));
            }
            match self.window_column(e) {
                Some((k, column)) => {
                    if kind.is_some_and(|known| known != k) {
                        return Err(PlanError::NotSupported(
                            "GROUP BY over two different windows".into(),
                        ));
                    }
                    kind = Some(k);
                    // The placeholder column holds the event time.
                    time = Some(state.create_physical_expr(e.clone(), a.input.schema())?);
                    group_columns.push(column);
                }
                None if self.mentions_window(e) => return Err(window_expression(e)),
                None => {
                    group_columns.push(GroupColumn::Key(keys.len()));
                    keys.push(state.create_physical_expr(e.clone(), a.input.schema())?);
                }
            }
        }
        let (Some(kind), Some(time)) = (kind, time) else {
            return Err(not_windowed());
        };
        let planning = PhysicalPlanningContext::default();
        let mut aggregates = Vec::with_capacity(a.aggr_expr.len());
        let mut filters = Vec::with_capacity(a.aggr_expr.len());
        for e in &a.aggr_expr {
            if self.mentions_window(e) {
                return Err(window_expression(e));
            }
            let lowered = LoweredAggregateBuilder::new(
                e,
                a.input.schema(),
                &input_schema,
                state.execution_props(),
                &planning,
            )
            .build()?;
            aggregates.push(lowered.aggregate);
            filters.push(lowered.filter);
        }
        let schema: SchemaRef = Arc::new(a.schema.as_arrow().clone());
        let text = format!(
            "{} keys [{}] aggregates [{}]",
            match kind {
                WindowKind::Tumble { size } => format!("TUMBLE size {}", fmt_millis(size)),
                WindowKind::Hop { size, slide } =>
                    format!("HOP size {} slide {}", fmt_millis(size), fmt_millis(slide)),
                WindowKind::Session { gap } => format!("SESSION gap {}", fmt_millis(gap)),
            },
            a.group_expr
                .iter()
                .zip(&group_columns)
                .filter(|(_, c)| matches!(c, GroupColumn::Key(_)))
                .map(|(e, _)| e.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            a.aggr_expr
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let spec = WindowAggregateSpec {
            kind,
            time,
            keys,
            aggregates,
            filters,
            group_columns,
            schema,
            allowed_lateness: 0,
            // A stream without WATERMARK, or a materialized view of one: processing time.
            processing_time: self
                .input
                .as_ref()
                .is_some_and(|(name, _, _)| on_processing_time(catalog, name, 0)),
        };
        let text = if spec.processing_time {
            format!("{text} on processing time (the stream read has no WATERMARK)")
        } else {
            text
        };
        let spec = Arc::new(spec);
        // Checked here, not first at run time.
        window_operator(spec.clone(), &input_schema)?;
        self.steps.push(Step::Window {
            spec,
            input_schema,
            text,
        });
        self.window_columns.clear();
        Ok(())
    }

    /// `stream JOIN table ON stream_expr = table.key [AND condition]`, INNER or LEFT.
    fn lower_lookup_join(
        &mut self,
        j: &Join,
        state: &SessionState,
        catalog: &Catalog,
    ) -> Result<()> {
        let reads_stream = |plan: &LogicalPlan| {
            scanned_objects(plan, catalog)
                .iter()
                .any(|(_, k)| matches!(k, ObjectKind::Stream | ObjectKind::MaterializedView))
        };
        match (reads_stream(&j.left), reads_stream(&j.right)) {
            (true, true) => {
                return Err(PlanError::NotSupported(
                    "joins of two streams (stream-stream or interval joins); the right side of a JOIN over a stream must be a TABLE (a lookup join)".into(),
                ));
            }
            (false, true) => {
                return Err(PlanError::NotSupported(
                    "a lookup JOIN with the stream on the right side; write the stream first: FROM stream JOIN table ON ...".into(),
                ));
            }
            (false, false) => {
                return Err(PlanError::NotSupported(
                    "a join of tables in a continuous query; a continuous query reads a stream"
                        .into(),
                ));
            }
            (true, false) => {}
        }
        let join_type = match j.join_type {
            JoinType::Inner => LookupJoinType::Inner,
            JoinType::Left => LookupJoinType::Left,
            other => {
                return Err(PlanError::NotSupported(format!(
                    "{other} JOIN with a table; a lookup join is INNER or LEFT (every stream record looks its row up)"
                )));
            }
        };
        if j.on.is_empty() {
            // No equality binds the key (the optimizer may have moved a condition on the
            // table's columns into the right side): say what is missing, not how it looks.
            if let Some(entry) = scanned_objects(&j.right, catalog)
                .iter()
                .find(|(_, k)| *k == ObjectKind::Table)
                .and_then(|(name, _)| catalog.get(name))
                && let Some(table) = &entry.table
            {
                let schema = table.schema();
                let key: Vec<&str> = table
                    .key_columns()
                    .iter()
                    .map(|c| schema.field(*c).name().as_str())
                    .collect();
                return Err(unbound_key(&entry.name, &key, &key));
            }
        }
        let side = LookupSide::find(&j.right, catalog)?;
        let entry = side.entry;
        let Some(table) = entry.table.clone() else {
            return Err(PlanError::Internal(format!(
                "table \"{}\" has no lookup table",
                entry.name
            )));
        };
        self.visit(&j.left, state, catalog)?;
        let table_schema = table.schema();
        let key_columns = table.key_columns().to_vec();
        // Which key column each ON equality binds; the other equalities become conditions.
        let mut keys: Vec<Option<Expr_>> = vec![None; key_columns.len()];
        let mut conditions: Vec<Expr_> = Vec::new();
        let mut key_text = Vec::new();
        for (left, right) in &j.on {
            if self.mentions_window(left) {
                return Err(window_expression(left));
            }
            let column = match strip_casts(right) {
                Expr_::Column(c) => table_schema.index_of(&c.name).ok(),
                _ => None,
            };
            match column.and_then(|c| key_columns.iter().position(|k| *k == c)) {
                Some(k) if keys[k].is_none() => {
                    let key_type = table_schema.field(key_columns[k]).data_type().clone();
                    let left_type = left.get_type(j.left.schema())?;
                    keys[k] = Some(if left_type == key_type {
                        left.clone()
                    } else {
                        // A stream value that does not fit the key's type finds nothing.
                        Expr_::TryCast(datafusion::logical_expr::TryCast::new(
                            Box::new(left.clone()),
                            key_type,
                        ))
                    });
                    key_text.push(format!("{left} = {right}"));
                }
                _ => conditions.push(left.clone().eq(right.clone())),
            }
        }
        let missing: Vec<&str> = key_columns
            .iter()
            .zip(&keys)
            .filter(|(_, k)| k.is_none())
            .map(|(c, _)| table_schema.field(*c).name().as_str())
            .collect();
        if !missing.is_empty() {
            let key: Vec<&str> = key_columns
                .iter()
                .map(|c| table_schema.field(*c).name().as_str())
                .collect();
            return Err(unbound_key(&entry.name, &key, &missing));
        }
        let keys: Vec<Expr_> = keys.into_iter().flatten().collect();
        // Conditions see the input's columns and every table column (qualified `__lookup`),
        // even those the output leaves out.
        let lookup = TableReference::bare("__lookup");
        let probe_fields: Vec<(Option<TableReference>, Arc<arrow::datatypes::Field>)> = j
            .left
            .schema()
            .iter()
            .map(|(q, f)| (q.cloned(), f.clone()))
            .chain(table_schema.fields().iter().map(|f| {
                (
                    Some(lookup.clone()),
                    Arc::new(f.as_ref().clone().with_nullable(true)),
                )
            }))
            .collect();
        let probe = DFSchema::new_with_metadata(probe_fields, Default::default())?;
        let to_table = |e: Expr_, only_right: bool| -> Result<Expr_> {
            use datafusion::common::tree_node::Transformed;
            Ok(e.transform(|e| {
                Ok(match e {
                    Expr_::Column(c) if only_right || j.right.schema().has_column(&c) => {
                        Transformed::yes(Expr_::Column(datafusion::common::Column::new(
                            Some(lookup.clone()),
                            c.name,
                        )))
                    }
                    other => Transformed::no(other),
                })
            })?
            .data)
        };
        let mut condition_text = Vec::new();
        let mut probe_conditions = Vec::new();
        for c in conditions.into_iter().chain(j.filter.clone()) {
            condition_text.push(c.to_string());
            probe_conditions.push(to_table(c, false)?);
        }
        for f in side.filters {
            condition_text.push(f.to_string());
            probe_conditions.push(to_table(f, true)?);
        }
        if probe_conditions.iter().any(|c| self.mentions_window(c)) {
            return Err(PlanError::NotSupported(
                "a lookup JOIN condition over window_start or window_end".into(),
            ));
        }
        let filter = probe_conditions
            .into_iter()
            .reduce(Expr_::and)
            .map(|c| state.create_physical_expr(c, &probe))
            .transpose()?;
        // The output: the input's columns, then the table columns the plan kept.
        let table_columns = j
            .right
            .schema()
            .fields()
            .iter()
            .map(|f| {
                table_schema.index_of(f.name()).map_err(|_| {
                    PlanError::Internal(format!(
                        "column {} of the right side is not in table \"{}\"",
                        f.name(),
                        entry.name
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let input_schema: SchemaRef = Arc::new(j.left.schema().as_arrow().clone());
        let schema: SchemaRef = Arc::new(j.schema.as_arrow().clone());
        let keys = keys
            .into_iter()
            .map(|k| state.create_physical_expr(k, j.left.schema()))
            .collect::<Result<Vec<_>, _>>()?;
        let max_in_flight = table.max_concurrency().max(1);
        let spec = LookupJoinSpec {
            table_name: entry.name.clone(),
            table,
            join_type,
            keys,
            table_columns,
            filter,
            schema,
            max_in_flight,
        };
        let mut text = format!(
            "{join_type} table \"{}\" ({}, cache {}) keys [{}]",
            entry.name,
            entry.connector.as_deref().unwrap_or("?"),
            spec.table.cache_mode(),
            key_text.join(", ")
        );
        if !condition_text.is_empty() {
            text.push_str(&format!(" condition [{}]", condition_text.join(" AND ")));
        }
        let spec = Arc::new(spec);
        // Checked here, not first at run time.
        LookupJoin::try_new(
            spec.clone(),
            &input_schema,
            Metrics::new().lookup_join("check", &entry.name),
        )?;
        self.tables.push(entry.name.clone());
        self.steps.push(Step::LookupJoin {
            spec,
            input_schema,
            text,
        });
        Ok(())
    }

    fn set_limit(&mut self, fetch: Option<usize>) -> Result<()> {
        if let Some(fetch) = fetch {
            self.limit = Some(self.limit.map_or(fetch, |l| l.min(fetch)));
        }
        Ok(())
    }
}

/// 0A000 for a lookup join whose ON leaves key columns `missing` of `table` unbound.
fn unbound_key(table: &str, key: &[&str], missing: &[&str]) -> PlanError {
    PlanError::NotSupported(format!(
        "a lookup JOIN on table \"{table}\" that does not bind its whole PRIMARY KEY ({}): add ON <stream expression> = {table}.{} (a lookup finds rows by key; a join on other columns is not a lookup)",
        key.join(", "),
        missing.join(", ")
    ))
}

/// Whether the rows of stream or materialized view `name` carry no event time: a stream
/// without WATERMARK, or a view of one that has no window (a view with a window forwards
/// the clock as its watermark, so what reads it runs on event time).
fn on_processing_time(catalog: &Catalog, name: &str, depth: usize) -> bool {
    match catalog.get(name) {
        Some(e) if e.kind == ObjectKind::Stream => e.watermark_column.is_none(),
        Some(e) if e.kind == ObjectKind::MaterializedView && depth < 64 => {
            e.plan.as_ref().is_some_and(|plan| {
                !plan.has_window() && on_processing_time(catalog, &plan.input, depth + 1)
            })
        }
        _ => false,
    }
}

/// The right side of a lookup join: a table scan, under any aliases, column selections and
/// filters (filters the optimizer pushed down, or a WHERE on the table's columns).
struct LookupSide<'a> {
    entry: &'a crate::catalog::CatalogEntry,
    /// Predicates over the table's columns: a row that fails them is not found.
    filters: Vec<Expr_>,
}

impl<'a> LookupSide<'a> {
    fn find(plan: &LogicalPlan, catalog: &'a Catalog) -> Result<Self> {
        let not_direct = || {
            PlanError::NotSupported(
                "a lookup JOIN over a subquery or expression; join the table itself (JOIN table [AS alias] ON ...)".into(),
            )
        };
        let mut filters = Vec::new();
        let mut node = plan;
        loop {
            match node {
                LogicalPlan::SubqueryAlias(a) => node = &a.input,
                LogicalPlan::Filter(f) => {
                    filters.push(f.predicate.clone());
                    node = &f.input;
                }
                LogicalPlan::Projection(p)
                    if p.expr.iter().all(|e| matches!(e, Expr_::Column(_))) =>
                {
                    node = &p.input
                }
                LogicalPlan::TableScan(scan) => {
                    let entry = catalog
                        .get(scan.table_name.table())
                        .filter(|e| e.kind == ObjectKind::Table)
                        .ok_or_else(not_direct)?;
                    filters.extend(scan.filters.iter().cloned());
                    return Ok(Self { entry, filters });
                }
                _ => return Err(not_direct()),
            }
        }
    }
}

/// `e` without the casts type coercion wrapped around it.
fn strip_casts(e: &Expr_) -> &Expr_ {
    match e {
        Expr_::Cast(c) => strip_casts(&c.expr),
        Expr_::TryCast(c) => strip_casts(&c.expr),
        Expr_::Alias(a) => strip_casts(&a.expr),
        other => other,
    }
}

/// `60000` as `1m`, `1500` as `1500ms`: window sizes in EXPLAIN.
fn fmt_millis(ms: i64) -> String {
    const UNITS: [(i64, &str); 4] = [
        (86_400_000, "d"),
        (3_600_000, "h"),
        (60_000, "m"),
        (1000, "s"),
    ];
    UNITS.iter().find(|(unit, _)| ms % unit == 0).map_or_else(
        || format!("{ms}ms"),
        |(unit, name)| format!("{}{name}", ms / unit),
    )
}

/// 0A000 for an expression over window_start / window_end before the GROUP BY: the bounds
/// exist only once the window operator has assigned the rows.
fn window_expression(e: &Expr_) -> PlanError {
    PlanError::NotSupported(format!(
        "{e}: an expression or WHERE over window_start or window_end before the GROUP BY (use them as GROUP BY columns, then in HAVING or an outer query)"
    ))
}
