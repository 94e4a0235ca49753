//! Queries: batch SELECTs, live tails, EXPLAIN, and the extended protocol's Describe.
//!
//! The engine's lock is taken only to resolve names against the catalog and to start a
//! tail's pipeline; planning and execution run without it, so queries never wait on DDL.

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use datafusion::logical_expr::LogicalPlan;
use weir_planner::continuous::{self, ContinuousPlan};
use weir_planner::{PlanError, Result};
use weir_runtime::pipeline::{self, Fanout, SourceTask, StatusCell, Worker};
use weir_sql::{ObjectKind, Statement};

use super::{Caller, Engine, Output, State, Tail};
use crate::introspection;

impl Engine {
    pub(super) async fn explain(&self, mut query: sqlparser::ast::Query) -> Result<Output> {
        continuous::prepare(&mut query, &self.lock().catalog)?;
        let plan = self.logical_plan(query).await?;
        let state = self.lock();
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

    pub(super) async fn query(&self, mut query: sqlparser::ast::Query) -> Result<Output> {
        continuous::prepare(&mut query, &self.lock().catalog)?;
        let plan = self.logical_plan(query).await?;
        self.run_plan(plan).await
    }

    /// Plans `query` (Postgres spellings rewritten) and optimizes the plan.
    pub(super) async fn logical_plan(&self, query: sqlparser::ast::Query) -> Result<LogicalPlan> {
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

    /// Runs a planned query: a live tail when it reads a stream, else a DataFusion batch query.
    async fn run_plan(&self, plan: LogicalPlan) -> Result<Output> {
        {
            let state = self.lock();
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
        }
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
        let status = StatusCell::default();
        let (rx, _source_task) = pipeline::spawn_source(
            source.create_tail()?,
            SourceTask {
                shutdown: stop.clone(),
                release: self.release.clone(),
                metrics: self.metrics.source(&plan.input, &name, source.connector()),
                status: status.clone(),
                pipeline: name.clone(),
                checkpoints: None,
                restore: None,
                instance_id: None,
                worker: Worker::ONLY,
            },
        );
        let fanout = Fanout::new();
        let batches = fanout.subscribe();
        let _chain = pipeline::spawn_stages(
            rx,
            plan.stages(&self.metrics, &name)?,
            0,
            fanout,
            &self.metrics,
            &name,
            &name,
            &status,
        );
        Ok(Output::Tail(Tail {
            schema: plan.schema.clone(),
            limit,
            batches,
            stop,
        }))
    }

    pub(super) async fn standard(&self, statement: sqlparser::ast::Statement) -> Result<Output> {
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
                continuous::prepare(&mut query, &self.lock().catalog)?;
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
                continuous::prepare(&mut query, &self.lock().catalog)?;
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
            return self.execute_statement(caller, parsed, &self.release).await;
        };
        let mut query = *query;
        continuous::prepare(&mut query, &self.lock().catalog)?;
        let plan = self.logical_plan(query).await?.with_param_values(params)?;
        let plan = self.ctx.state().optimize(&plan)?;
        self.run_plan(plan).await
    }
}
