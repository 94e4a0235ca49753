//! [`FilterOperator`]: keeps the rows for which a predicate is true.

use std::sync::Arc;

use arrow::array::AsArray;
use arrow::compute::filter_record_batch;
use arrow::datatypes::DataType;
use arrow::record_batch::RecordBatch;
use datafusion::physical_expr::PhysicalExpr;

use crate::error::{Error, Result};
use crate::message::Message;
use crate::operator::Operator;

/// `WHERE predicate`, evaluated with a DataFusion physical expression (NULL counts as false).
#[derive(Debug)]
pub struct FilterOperator {
    /// A boolean expression over the input schema.
    predicate: Arc<dyn PhysicalExpr>,
}

impl FilterOperator {
    /// `predicate` must be boolean over `input_schema`; checked once here.
    pub fn try_new(
        predicate: Arc<dyn PhysicalExpr>,
        input_schema: &arrow::datatypes::Schema,
    ) -> Result<Self> {
        let data_type = predicate.data_type(input_schema)?;
        if data_type != DataType::Boolean {
            return Err(Error::Execution(format!(
                "WHERE needs a boolean expression, got {data_type}: {predicate}"
            )));
        }
        Ok(Self { predicate })
    }
}

impl Operator for FilterOperator {
    fn name(&self) -> &'static str {
        "filter"
    }

    fn process_batch(&mut self, batch: RecordBatch, out: &mut Vec<Message>) -> Result<()> {
        let mask = self
            .predicate
            .evaluate(&batch)?
            .into_array(batch.num_rows())?;
        let mask = mask.as_boolean_opt().ok_or_else(|| {
            Error::Internal(format!("filter predicate returned {}", mask.data_type()))
        })?;
        let kept = match mask.true_count() {
            0 => return Ok(()),
            n if n == batch.num_rows() => batch,
            _ => filter_record_batch(&batch, mask)?,
        };
        out.push(Message::Data(kept));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float64Array, Int64Array};
    use arrow::datatypes::{Field, Schema};
    use arrow::util::pretty::pretty_format_batches;
    use datafusion::logical_expr::Operator as BinOp;
    use datafusion::physical_expr::expressions::{BinaryExpr, Column, Literal};
    use datafusion::scalar::ScalarValue;

    #[test]
    fn keeps_matching_rows_and_drops_nulls() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, false),
            Field::new("v", DataType::Float64, true),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from(vec![1, 2, 3, 4])),
                Arc::new(Float64Array::from(vec![
                    Some(0.5),
                    None,
                    Some(7.0),
                    Some(2.0),
                ])),
            ],
        )
        .expect("batch");
        let predicate = Arc::new(BinaryExpr::new(
            Arc::new(Column::new("v", 1)),
            BinOp::Gt,
            Arc::new(Literal::new(ScalarValue::Float64(Some(1.0)))),
        ));
        let mut filter = FilterOperator::try_new(predicate, &schema).expect("boolean predicate");
        let mut out = Vec::new();
        filter.process_batch(batch, &mut out).expect("runs");
        let [Message::Data(result)] = out.as_slice() else {
            panic!("one batch expected")
        };
        let table = pretty_format_batches(std::slice::from_ref(result))
            .expect("format")
            .to_string();
        assert_eq!(
            table,
            "+---+-----+\n| k | v   |\n+---+-----+\n| 3 | 7.0 |\n| 4 | 2.0 |\n+---+-----+"
        );
    }

    #[test]
    fn rejects_non_boolean_predicates() {
        let schema = Schema::new(vec![Field::new("k", DataType::Int64, false)]);
        let err = FilterOperator::try_new(Arc::new(Column::new("k", 0)), &schema)
            .expect_err("not boolean");
        assert!(err.to_string().contains("boolean"), "{err}");
    }
}
