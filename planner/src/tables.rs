//! DataFusion table providers for catalog objects.
//!
//! Registering every object in the session's catalog is what lets psql's `\d` (through
//! `pg_catalog`) list them: streams and tables as base tables (`\dt`), materialized views as
//! views (`\dv`).

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use datafusion::catalog::Session;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::{TableProvider, TableType};
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::ExecutionPlan;
use weir_runtime::mv_store::MvStore;
use weir_sql::ObjectKind;

/// A stream or table: it has a schema, but its rows are not a finite set to scan. Continuous
/// queries read it through a pipeline; a direct scan explains what to do instead.
#[derive(Debug)]
pub struct UnboundedTable {
    pub name: String,
    pub kind: ObjectKind,
    pub schema: SchemaRef,
}

#[async_trait]
impl TableProvider for UnboundedTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        _projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        Err(DataFusionError::NotImplemented(match self.kind {
            ObjectKind::Stream => format!(
                "reading stream \"{}\" as a finite table; a SELECT over a stream is a live tail and needs LIMIT n",
                self.name
            ),
            _ => format!(
                "scanning table \"{}\" (tables are the lookup side of joins, which arrive with lookup JOIN)",
                self.name
            ),
        }))
    }
}

/// A materialized view: a snapshot of its current rows, queried with all of DataFusion.
#[derive(Debug)]
pub struct MvTable {
    pub store: Arc<MvStore>,
}

#[async_trait]
impl TableProvider for MvTable {
    fn schema(&self) -> SchemaRef {
        self.store.schema()
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let batches = self.store.snapshot();
        Ok(MemorySourceConfig::try_new_exec(
            &[batches],
            self.store.schema(),
            projection.cloned(),
        )?)
    }
}
