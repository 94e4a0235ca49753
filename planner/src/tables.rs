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
use weir_runtime::lookup::LookupTable;
use weir_runtime::mv_store::MvStore;
use weir_sql::ObjectKind;

/// A stream (or a view, which reads like one): it has a schema, but its rows are not a finite
/// set to scan. Continuous queries read it through a pipeline (a view is inlined before
/// DataFusion sees it); a direct scan explains what to do instead.
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
        match self.kind {
            ObjectKind::View => TableType::View,
            _ => TableType::Base,
        }
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
            kind => format!("scanning {kind} \"{}\"", self.name),
        }))
    }
}

/// A lookup table: a `SELECT` shows its current contents (a partial-cache table reads them
/// from its external system).
#[derive(Debug)]
pub struct LookupTableProvider {
    pub table: Arc<dyn LookupTable>,
}

#[async_trait]
impl TableProvider for LookupTableProvider {
    fn schema(&self) -> SchemaRef {
        self.table.schema()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let batches = self
            .table
            .scan()
            .await
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
        Ok(MemorySourceConfig::try_new_exec(
            &[batches],
            self.table.schema(),
            projection.cloned(),
        )?)
    }
}

/// A materialized view: a snapshot of its current rows (on a cluster, gathered from every
/// process), queried with all of DataFusion.
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
        let batches = self
            .store
            .rows()
            .await
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
        Ok(MemorySourceConfig::try_new_exec(
            &[batches],
            self.store.schema(),
            projection.cloned(),
        )?)
    }
}
