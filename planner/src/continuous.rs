//! Continuous queries: a `SELECT` over a stream, planned by DataFusion, run by Weir.
//!
//! The query goes through DataFusion's SQL planner and optimizer unchanged; the optimized
//! logical plan is then lowered node by node to runtime operators whose expressions are
//! DataFusion physical expressions. What this release cannot run continuously (aggregation,
//! joins, window TVFs, ORDER BY) is refused with SQLSTATE 0A000 naming the feature.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use datafusion::common::tree_node::TreeNode;
use datafusion::execution::context::SessionState;
use datafusion::logical_expr::{
    Aggregate, Expr as Expr_, FetchType, LogicalPlan, SkipType,
    physical_planning_context::PhysicalPlanningContext,
};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::aggregate::LoweredAggregateBuilder;
use datafusion::physical_expr::expressions::Column;
use sqlparser::ast::{
    Expr, Ident, Query, SelectItem, SelectItemQualifiedWildcardKind, SetExpr, TableFactor,
    TableWithJoins, WildcardAdditionalOptions,
};
use weir_runtime::Operator;
use weir_runtime::operators::{
    FilterOperator, GroupColumn, ProjectOperator, WindowAggregateSpec, WindowKind, window_operator,
};
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
}

impl ContinuousPlan {
    /// Fresh operator instances for one pipeline.
    pub fn operators(&self) -> Result<Vec<Box<dyn Operator>>> {
        self.steps
            .iter()
            .map(|step| -> Result<Box<dyn Operator>> {
                Ok(match step {
                    Step::Filter {
                        predicate,
                        input_schema,
                        ..
                    } => Box::new(FilterOperator::try_new(predicate.clone(), input_schema)?),
                    Step::Project { exprs, schema, .. } => {
                        Box::new(ProjectOperator::new(exprs.clone(), schema.clone()))
                    }
                    Step::Window {
                        spec, input_schema, ..
                    } => window_operator(spec.clone(), input_schema)?,
                })
            })
            .collect()
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
            });
        }
        if let Some(limit) = self.limit {
            lines.push(format!("  -> limit: {limit}"));
        }
        lines
    }
}

/// Refuses, with the feature's name, syntax that a later release runs continuously.
pub fn check_supported_syntax(query: &Query) -> Result<()> {
    check_set_expr(&query.body)
}

fn check_set_expr(body: &SetExpr) -> Result<()> {
    match body {
        SetExpr::Select(select) => select.from.iter().try_for_each(check_table_with_joins),
        SetExpr::Query(q) => check_supported_syntax(q),
        SetExpr::SetOperation { left, right, .. } => {
            check_set_expr(left)?;
            check_set_expr(right)
        }
        _ => Ok(()),
    }
}

fn check_table_with_joins(t: &TableWithJoins) -> Result<()> {
    check_factor(&t.relation)?;
    t.joins.iter().try_for_each(|j| check_factor(&j.relation))
}

fn check_factor(factor: &TableFactor) -> Result<()> {
    match factor {
        TableFactor::Table {
            version: Some(_), ..
        } => Err(PlanError::NotSupported(
            "lookup JOIN (FOR SYSTEM_TIME AS OF)".into(),
        )),
        TableFactor::Derived { subquery, .. } => check_supported_syntax(subquery),
        TableFactor::NestedJoin {
            table_with_joins, ..
        } => check_table_with_joins(table_with_joins),
        _ => Ok(()),
    }
}

/// Everything a continuous query's AST goes through before DataFusion plans it: refusals
/// of what is not supported yet, window calls rewritten ([`window::rewrite_windows`]), `*`
/// expanded ([`expand_wildcards`]).
pub fn prepare(query: &mut Query, catalog: &Catalog) -> Result<()> {
    check_supported_syntax(query)?;
    window::rewrite_windows(query, catalog)?;
    expand_wildcards(query, catalog);
    Ok(())
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
    })
}

struct Lowering {
    input: Option<(String, ObjectKind, SchemaRef)>,
    steps: Vec<Step>,
    limit: Option<usize>,
    /// Columns of the current output that stand for a window's bounds (placeholders that
    /// still hold the event time), by name, until the `GROUP BY` that consumes them.
    window_columns: HashMap<String, (WindowKind, GroupColumn)>,
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
                        "reading {} \"{name}\" continuously (tables are the lookup side of joins, which arrive with lookup JOIN)",
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
            LogicalPlan::Join(_) => Err(PlanError::NotSupported(
                "joins over streams (lookup JOIN)".into(),
            )),
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
            // A stream without WATERMARK: processing time (views carry their input's time).
            processing_time: self.input.as_ref().is_some_and(|(name, kind, _)| {
                *kind == ObjectKind::Stream
                    && catalog
                        .get(name)
                        .is_some_and(|e| e.watermark_column.is_none())
            }),
        };
        let text = if spec.processing_time {
            format!("{text} on processing time (the stream has no WATERMARK)")
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

    fn set_limit(&mut self, fetch: Option<usize>) -> Result<()> {
        if let Some(fetch) = fetch {
            self.limit = Some(self.limit.map_or(fetch, |l| l.min(fetch)));
        }
        Ok(())
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
