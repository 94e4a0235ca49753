//! Continuous queries: a `SELECT` over a stream, planned by DataFusion, run by Weir.
//!
//! The query goes through DataFusion's SQL planner and optimizer unchanged; the optimized
//! logical plan is then lowered node by node to runtime operators whose expressions are
//! DataFusion physical expressions. What this release cannot run continuously (aggregation,
//! joins, window TVFs, ORDER BY) is refused with SQLSTATE 0A000 naming the feature.

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use datafusion::execution::context::SessionState;
use datafusion::logical_expr::{FetchType, LogicalPlan, SkipType};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::expressions::Column;
use sqlparser::ast::{
    Expr, Ident, Query, SelectItem, SelectItemQualifiedWildcardKind, SetExpr, TableFactor,
    TableWithJoins, WildcardAdditionalOptions,
};
use weir_runtime::Operator;
use weir_runtime::operators::{FilterOperator, ProjectOperator};
use weir_sql::ObjectKind;

use crate::catalog::Catalog;
use crate::error::{PlanError, Result};

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
                })
            })
            .collect()
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
    let window = |name: &str| -> Result<()> {
        let upper = name.to_ascii_uppercase();
        if matches!(upper.as_str(), "TUMBLE" | "HOP" | "SESSION") {
            return Err(PlanError::NotSupported(format!(
                "windowed aggregation with {upper}"
            )));
        }
        Ok(())
    };
    match factor {
        TableFactor::Table {
            name,
            args,
            version,
            ..
        } => {
            if version.is_some() {
                return Err(PlanError::NotSupported(
                    "lookup JOIN (FOR SYSTEM_TIME AS OF)".into(),
                ));
            }
            if args.is_some()
                && let Some(last) = name.0.last().and_then(|p| p.as_ident())
            {
                window(&last.value)?;
            }
            Ok(())
        }
        TableFactor::TableFunction { expr, .. } => {
            if let sqlparser::ast::Expr::Function(f) = expr
                && let Some(last) = f.name.0.last().and_then(|p| p.as_ident())
            {
                window(&last.value)?;
            }
            Ok(())
        }
        TableFactor::Function { name, .. } => match name.0.last().and_then(|p| p.as_ident()) {
            Some(last) => window(&last.value),
            None => Ok(()),
        },
        TableFactor::Derived { subquery, .. } => check_supported_syntax(subquery),
        TableFactor::NestedJoin {
            table_with_joins, ..
        } => check_table_with_joins(table_with_joins),
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
    };
    lowering.visit(plan, state, catalog)?;
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
}

impl Lowering {
    fn visit(&mut self, plan: &LogicalPlan, state: &SessionState, catalog: &Catalog) -> Result<()> {
        match plan {
            LogicalPlan::Projection(p) => {
                self.visit(&p.input, state, catalog)?;
                let exprs = p
                    .expr
                    .iter()
                    .map(|e| state.create_physical_expr(e.clone(), p.input.schema()))
                    .collect::<Result<Vec<_>, _>>()?;
                let text = p.expr.iter().map(|e| e.to_string()).collect::<Vec<_>>().join(", ");
                let schema = Arc::new(p.schema.as_arrow().clone());
                self.steps.push(Step::Project { exprs, schema, text });
                Ok(())
            }
            LogicalPlan::Filter(f) => {
                self.visit(&f.input, state, catalog)?;
                if self.limit.is_some() {
                    return Err(PlanError::NotSupported("a WHERE above a LIMIT in a continuous query".into()));
                }
                let predicate = state.create_physical_expr(f.predicate.clone(), f.input.schema())?;
                let input_schema = Arc::new(f.input.schema().as_arrow().clone());
                self.steps.push(Step::Filter { predicate, input_schema, text: f.predicate.to_string() });
                Ok(())
            }
            LogicalPlan::SubqueryAlias(a) => self.visit(&a.input, state, catalog),
            LogicalPlan::Limit(l) => {
                self.visit(&l.input, state, catalog)?;
                let skip = matches!(l.get_skip_type()?, SkipType::Literal(0));
                let FetchType::Literal(fetch) = l.get_fetch_type()? else {
                    return Err(PlanError::NotSupported("a LIMIT that is not a constant".into()));
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
                if !matches!(entry.kind, ObjectKind::Stream | ObjectKind::MaterializedView) {
                    return Err(PlanError::NotSupported(format!(
                        "reading {} \"{name}\" continuously (tables are the lookup side of joins, which arrive with lookup JOIN)",
                        entry.kind
                    )));
                }
                if !scan.filters.is_empty() {
                    return Err(PlanError::Internal("filters pushed into a stream scan".into()));
                }
                // The scanned table's schema: the declared columns and any hidden ones.
                let full = scan.source.schema();
                self.input = Some((entry.name.clone(), entry.kind, full.clone()));
                if let Some(projection) = &scan.projection
                    && (projection.len() != full.fields().len() || projection.iter().enumerate().any(|(i, p)| i != *p)) {
                        let exprs = projection
                            .iter()
                            .map(|&i| Arc::new(Column::new(full.field(i).name(), i)) as Arc<dyn PhysicalExpr>)
                            .collect();
                        let schema = Arc::new(full.project(projection)?);
                        let text = schema.fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>().join(", ");
                        self.steps.push(Step::Project { exprs, schema, text });
                    }
                if let Some(fetch) = scan.fetch {
                    self.set_limit(Some(fetch))?;
                }
                Ok(())
            }
            LogicalPlan::Aggregate(_) => Err(PlanError::NotSupported(
                "aggregation over a stream (GROUP BY over a stream needs a window: TUMBLE, HOP or SESSION)".into(),
            )),
            LogicalPlan::Join(_) => Err(PlanError::NotSupported("joins over streams (lookup JOIN)".into())),
            LogicalPlan::Sort(_) => Err(PlanError::NotSupported("ORDER BY over an unbounded stream".into())),
            LogicalPlan::Window(_) => Err(PlanError::NotSupported("window functions (OVER) over a stream".into())),
            LogicalPlan::Distinct(_) => Err(PlanError::NotSupported("DISTINCT over a stream".into())),
            LogicalPlan::Union(_) => Err(PlanError::NotSupported("UNION of streams".into())),
            other => Err(PlanError::NotSupported(format!(
                "{} in a continuous query",
                other.display().to_string().split(':').next().unwrap_or("this operator")
            ))),
        }
    }

    fn set_limit(&mut self, fetch: Option<usize>) -> Result<()> {
        if let Some(fetch) = fetch {
            self.limit = Some(self.limit.map_or(fetch, |l| l.min(fetch)));
        }
        Ok(())
    }
}
