//! [`ProjectOperator`]: computes the SELECT list.

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::{RecordBatch, RecordBatchOptions};
use datafusion::physical_expr::PhysicalExpr;

use crate::error::Result;
use crate::message::Message;
use crate::operator::Operator;

/// `SELECT expr AS name, ...`: one DataFusion physical expression per output column.
#[derive(Debug)]
pub struct ProjectOperator {
    exprs: Vec<Arc<dyn PhysicalExpr>>,
    /// The output schema, computed once by the planner.
    schema: SchemaRef,
}

impl ProjectOperator {
    pub fn new(exprs: Vec<Arc<dyn PhysicalExpr>>, schema: SchemaRef) -> Self {
        Self { exprs, schema }
    }
}

impl Operator for ProjectOperator {
    fn name(&self) -> &'static str {
        "project"
    }

    fn process_batch(&mut self, batch: RecordBatch, out: &mut Vec<Message>) -> Result<()> {
        let rows = batch.num_rows();
        let columns = self
            .exprs
            .iter()
            .map(|e| e.evaluate(&batch).and_then(|v| v.into_array(rows)))
            .collect::<Result<Vec<_>, _>>()?;
        let options = RecordBatchOptions::new().with_row_count(Some(rows));
        out.push(Message::Data(RecordBatch::try_new_with_options(
            self.schema.clone(),
            columns,
            &options,
        )?));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};
    use arrow::util::pretty::pretty_format_batches;
    use datafusion::logical_expr::Operator as BinOp;
    use datafusion::physical_expr::expressions::{BinaryExpr, Column};

    #[test]
    fn computes_expressions_per_batch() {
        let input = Arc::new(Schema::new(vec![Field::new("k", DataType::Int64, false)]));
        let output = Arc::new(Schema::new(vec![Field::new("k2", DataType::Int64, false)]));
        let k = Arc::new(Column::new("k", 0));
        let mut project = ProjectOperator::new(
            vec![Arc::new(BinaryExpr::new(k.clone(), BinOp::Plus, k))],
            output,
        );
        let batch =
            RecordBatch::try_new(input, vec![Arc::new(Int64Array::from(vec![1, 5]))]).expect("b");
        let mut out = Vec::new();
        project.process_batch(batch, &mut out).expect("runs");
        let [Message::Data(result)] = out.as_slice() else {
            panic!("one batch expected")
        };
        let table = pretty_format_batches(std::slice::from_ref(result))
            .expect("format")
            .to_string();
        assert_eq!(table, "+----+\n| k2 |\n+----+\n| 2  |\n| 10 |\n+----+");
    }
}
