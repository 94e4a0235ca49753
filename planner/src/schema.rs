//! Declared columns (`CREATE STREAM s (...)`) to an Arrow schema, with DataFusion's mapping.

use std::sync::Arc;

use arrow::datatypes::{DataType, SchemaRef};
use datafusion::common::TableReference;
use datafusion::common::config::ConfigOptions;
use datafusion::error::Result as DfResult;
use datafusion::logical_expr::{AggregateUDF, HigherOrderUDF, ScalarUDF, TableSource, WindowUDF};
use datafusion::sql::planner::{ContextProvider, SqlToRel};
use sqlparser::ast::{ColumnDef, ColumnOption, ColumnOptionDef};

use crate::error::{PlanError, Result};

/// Maps column definitions to fields (NOT NULL respected; primary key columns are NOT NULL).
pub fn schema_from_columns(columns: &[ColumnDef], primary_key: &[String]) -> Result<SchemaRef> {
    if columns.is_empty() {
        return Err(PlanError::Plan {
            sqlstate: "42601",
            message: "at least one column is required".into(),
        });
    }
    let mut options = ConfigOptions::default();
    // Weir's text columns are Utf8 everywhere (decoders, Parquet, the wire).
    options.sql_parser.map_string_types_to_utf8view = false;
    let provider = TypesOnly(options);
    let planner = SqlToRel::new(&provider);
    let mut columns: Vec<ColumnDef> = columns.to_vec();
    for column in &mut columns {
        let name = weir_sql::parser::normalize(&column.name);
        if primary_key.contains(&name) {
            column.options.push(ColumnOptionDef {
                name: None,
                option: ColumnOption::NotNull,
            });
        }
    }
    let schema = planner.build_schema(columns)?;
    let mut seen = std::collections::HashSet::new();
    for field in schema.fields() {
        if !seen.insert(field.name().clone()) {
            return Err(PlanError::Plan {
                sqlstate: "42701",
                message: format!("column \"{}\" specified more than once", field.name()),
            });
        }
    }
    Ok(Arc::new(schema))
}

/// Whether `data_type` is one a watermark can be declared on.
pub fn is_event_time_type(data_type: &DataType) -> bool {
    matches!(data_type, DataType::Timestamp(_, _))
}

/// A `ContextProvider` that knows no tables or functions: enough to map types.
struct TypesOnly(ConfigOptions);

impl ContextProvider for TypesOnly {
    fn get_table_source(&self, name: TableReference) -> DfResult<Arc<dyn TableSource>> {
        Err(datafusion::error::DataFusionError::Plan(format!(
            "table '{name}' not found"
        )))
    }
    fn get_function_meta(&self, _name: &str) -> Option<Arc<ScalarUDF>> {
        None
    }
    fn get_aggregate_meta(&self, _name: &str) -> Option<Arc<AggregateUDF>> {
        None
    }
    fn get_variable_type(&self, _variable_names: &[String]) -> Option<DataType> {
        None
    }
    fn get_window_meta(&self, _name: &str) -> Option<Arc<WindowUDF>> {
        None
    }
    fn get_higher_order_meta(&self, _name: &str) -> Option<Arc<HigherOrderUDF>> {
        None
    }
    fn higher_order_function_names(&self) -> Vec<String> {
        vec![]
    }
    fn options(&self) -> &ConfigOptions {
        &self.0
    }
    fn udf_names(&self) -> Vec<String> {
        vec![]
    }
    fn udaf_names(&self) -> Vec<String> {
        vec![]
    }
    fn udwf_names(&self) -> Vec<String> {
        vec![]
    }
}

/// The delay of `WATERMARK FOR c AS c - INTERVAL '5' SECOND`; `AS c` means none. Other
/// watermark expressions are refused (0A000).
pub fn watermark_delay(watermark: &weir_sql::Watermark) -> Result<std::time::Duration> {
    use sqlparser::ast::{BinaryOperator, Expr};
    let not_supported = || {
        PlanError::NotSupported(format!(
            "WATERMARK expression {}: write `{c} - INTERVAL '...' <unit>` or `{c}`",
            watermark.expr,
            c = watermark.column
        ))
    };
    let is_column = |e: &Expr| match e {
        Expr::Identifier(ident) => {
            let name = match ident.quote_style {
                Some(_) => ident.value.clone(),
                None => ident.value.to_lowercase(),
            };
            name == watermark.column
        }
        _ => false,
    };
    match &watermark.expr {
        e if is_column(e) => Ok(std::time::Duration::ZERO),
        Expr::BinaryOp {
            left,
            op: BinaryOperator::Minus,
            right,
        } if is_column(left) => interval_duration(right).ok_or_else(not_supported),
        _ => Err(not_supported()),
    }
}

/// `INTERVAL '5' SECOND` or `INTERVAL '10 seconds'` as a duration; None for anything else.
pub fn interval_duration(expr: &sqlparser::ast::Expr) -> Option<std::time::Duration> {
    use sqlparser::ast::{Expr, Value};
    let Expr::Interval(interval) = expr else {
        return None;
    };
    let Expr::Value(value) = interval.value.as_ref() else {
        return None;
    };
    let Value::SingleQuotedString(text) = &value.value else {
        return None;
    };
    let text = match &interval.leading_field {
        Some(unit) => format!("{text} {unit}"),
        None => text.clone(),
    };
    weir_sql::options::parse_duration(&text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_sql::{Statement, parse_sql};

    #[test]
    fn types_map_like_datafusion_and_not_null_holds() {
        let Ok(mut statements) = parse_sql(
            "CREATE STREAM s (id BIGINT NOT NULL, ts TIMESTAMP(3), name TEXT, v DOUBLE, ok BOOLEAN) WITH (connector='datagen')",
        ) else {
            panic!("parses")
        };
        let Statement::CreateStream(s) = statements.remove(0) else {
            panic!("stream")
        };
        let schema = schema_from_columns(&s.columns, &[]).expect("maps");
        let types: Vec<(String, DataType, bool)> = schema
            .fields()
            .iter()
            .map(|f| (f.name().clone(), f.data_type().clone(), f.is_nullable()))
            .collect();
        assert_eq!(types[0], ("id".into(), DataType::Int64, false));
        assert_eq!(types[1].0, "ts");
        assert!(is_event_time_type(&types[1].1));
        assert_eq!(types[2].1, DataType::Utf8);
        assert_eq!(types[3].1, DataType::Float64);
        assert_eq!(types[4].1, DataType::Boolean);
    }

    #[test]
    fn duplicate_columns_are_refused() {
        let Ok(mut statements) = parse_sql("CREATE STREAM s (a INT, A INT)") else {
            panic!("parses")
        };
        let Statement::CreateStream(s) = statements.remove(0) else {
            panic!("stream")
        };
        let err = schema_from_columns(&s.columns, &[]).expect_err("duplicate");
        assert_eq!(err.sqlstate(), "42701");
    }
}
