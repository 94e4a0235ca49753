//! Postgres rows to Arrow columns of the declared types, and Arrow keys to query parameters.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Date32Array, Float64Array, Int64Array, StringArray,
    TimestampMicrosecondArray,
};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Float64Type, Int64Type, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use tokio_postgres::Row;
use tokio_postgres::types::{Kind, ToSql, Type};
use weir_runtime::{Error, Result};

use super::{PgConfig, pg_error};

/// The whole table: `SELECT <declared columns> FROM <table or query>`.
pub async fn load(config: &PgConfig, client: &tokio_postgres::Client) -> Result<RecordBatch> {
    let statement = client
        .prepare(&config.select())
        .await
        .map_err(|e| pg_error(&config.spec.name, &e))?;
    check_columns(config, statement.columns())?;
    let rows = client
        .query(&statement, &[])
        .await
        .map_err(|e| pg_error(&config.spec.name, &e))?;
    rows_to_batch(&config.spec.schema, &rows)
}

/// Checks that every declared column can be read from the Postgres column of the same name.
pub fn check_columns(config: &PgConfig, columns: &[tokio_postgres::Column]) -> Result<()> {
    for (field, column) in config.spec.schema.fields().iter().zip(columns) {
        if !readable(column.type_(), field.data_type()) {
            return Err(Error::Execution(format!(
                "postgres table '{}': column \"{}\" is {} in Postgres and cannot be read as {}; cast it in 'query' (e.g. SELECT {}::text ...)",
                config.spec.name,
                field.name(),
                column.type_(),
                weir_runtime::sql_type_name(field.data_type()),
                field.name()
            )));
        }
    }
    Ok(())
}

fn is_integer(t: &Type) -> bool {
    matches!(*t, Type::INT2 | Type::INT4 | Type::INT8)
}

fn is_text(t: &Type) -> bool {
    matches!(
        *t,
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN
    )
}

/// Whether a Postgres value of type `pg` becomes an Arrow value of type `arrow`.
fn readable(pg: &Type, arrow: &DataType) -> bool {
    match arrow {
        DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64 => is_integer(pg),
        DataType::Float32 | DataType::Float64 => {
            is_integer(pg) || matches!(*pg, Type::FLOAT4 | Type::FLOAT8)
        }
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => is_text(pg),
        DataType::Boolean => *pg == Type::BOOL,
        DataType::Timestamp(_, _) => matches!(*pg, Type::TIMESTAMP | Type::TIMESTAMPTZ),
        DataType::Date32 => *pg == Type::DATE,
        _ => false,
    }
}

fn get<'a, T: tokio_postgres::types::FromSql<'a>>(row: &'a Row, i: usize) -> Result<Option<T>> {
    row.try_get::<_, Option<T>>(i)
        .map_err(|e| Error::Execution(format!("column {}: {e}", row.columns()[i].name())))
}

/// Rows (columns in the declared order) to one batch of `schema`.
pub fn rows_to_batch(schema: &SchemaRef, rows: &[Row]) -> Result<RecordBatch> {
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    for (i, field) in schema.fields().iter().enumerate() {
        columns.push(column(field, i, rows)?);
    }
    Ok(RecordBatch::try_new_with_options(
        schema.clone(),
        columns,
        &arrow::record_batch::RecordBatchOptions::new().with_row_count(Some(rows.len())),
    )?)
}

fn column(field: &Field, i: usize, rows: &[Row]) -> Result<ArrayRef> {
    let pg = |row: &Row| row.columns()[i].type_().clone();
    let array: ArrayRef = match field.data_type() {
        DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64 => {
            let values = rows
                .iter()
                .map(|row| integer(row, i, &pg(row)))
                .collect::<Result<Int64Array>>()?;
            Arc::new(values)
        }
        DataType::Float32 | DataType::Float64 => {
            let values = rows
                .iter()
                .map(|row| match pg(row) {
                    t if is_integer(&t) => Ok(integer(row, i, &t)?.map(|v| v as f64)),
                    Type::FLOAT4 => Ok(get::<f32>(row, i)?.map(f64::from)),
                    _ => get::<f64>(row, i),
                })
                .collect::<Result<Float64Array>>()?;
            Arc::new(values)
        }
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
            let values = rows
                .iter()
                .map(|row| get::<&str>(row, i))
                .collect::<Result<StringArray>>()?;
            Arc::new(values)
        }
        DataType::Boolean => Arc::new(
            rows.iter()
                .map(|row| get::<bool>(row, i))
                .collect::<Result<BooleanArray>>()?,
        ),
        DataType::Timestamp(_, _) => {
            let values =
                rows.iter()
                    .map(|row| match pg(row) {
                        Type::TIMESTAMPTZ => Ok(get::<chrono::DateTime<chrono::Utc>>(row, i)?
                            .map(|t| t.timestamp_micros())),
                        _ => Ok(get::<chrono::NaiveDateTime>(row, i)?
                            .map(|t| t.and_utc().timestamp_micros())),
                    })
                    .collect::<Result<TimestampMicrosecondArray>>()?;
            Arc::new(values)
        }
        DataType::Date32 => {
            let epoch = chrono::NaiveDate::from_ymd_opt(1970, 1, 1).unwrap_or_default();
            let values = rows
                .iter()
                .map(|row| {
                    Ok(get::<chrono::NaiveDate>(row, i)?.map(|d| (d - epoch).num_days() as i32))
                })
                .collect::<Result<Date32Array>>()?;
            Arc::new(values)
        }
        other => {
            return Err(Error::Execution(format!(
                "column {}: {} columns are not read from Postgres",
                field.name(),
                weir_runtime::sql_type_name(other)
            )));
        }
    };
    if array.data_type() == field.data_type() {
        Ok(array)
    } else {
        Ok(cast(&array, field.data_type())?)
    }
}

fn integer(row: &Row, i: usize, t: &Type) -> Result<Option<i64>> {
    Ok(match *t {
        Type::INT2 => get::<i16>(row, i)?.map(i64::from),
        Type::INT4 => get::<i32>(row, i)?.map(i64::from),
        _ => get::<i64>(row, i)?,
    })
}

/// The array parameter `$n` of a key query, from the key column's values, as the element
/// type Postgres expects (`ty` is the array type the statement declares).
pub fn key_param(values: &ArrayRef, ty: &Type) -> Result<Box<dyn ToSql + Sync + Send>> {
    let element = match ty.kind() {
        Kind::Array(element) => element.clone(),
        _ => ty.clone(),
    };
    let as_i64 = || -> Result<Vec<Option<i64>>> {
        let v = cast(values, &DataType::Int64)?;
        Ok(v.as_primitive::<Int64Type>().iter().collect())
    };
    Ok(match element {
        Type::INT2 => Box::new(
            as_i64()?
                .into_iter()
                .map(|v| v.and_then(|v| i16::try_from(v).ok()))
                .collect::<Vec<_>>(),
        ),
        Type::INT4 => Box::new(
            as_i64()?
                .into_iter()
                .map(|v| v.and_then(|v| i32::try_from(v).ok()))
                .collect::<Vec<_>>(),
        ),
        Type::INT8 => Box::new(as_i64()?),
        Type::FLOAT4 | Type::FLOAT8 => {
            let v = cast(values, &DataType::Float64)?;
            let v: Vec<Option<f64>> = v.as_primitive::<Float64Type>().iter().collect();
            if element == Type::FLOAT4 {
                Box::new(
                    v.into_iter()
                        .map(|v| v.map(|v| v as f32))
                        .collect::<Vec<_>>(),
                )
            } else {
                Box::new(v)
            }
        }
        Type::BOOL => {
            let v = cast(values, &DataType::Boolean)?;
            Box::new(v.as_boolean().iter().collect::<Vec<_>>())
        }
        t if is_text(&t) => {
            let v = cast(values, &DataType::Utf8)?;
            Box::new(
                v.as_string::<i32>()
                    .iter()
                    .map(|s| s.map(str::to_string))
                    .collect::<Vec<_>>(),
            )
        }
        Type::TIMESTAMP | Type::TIMESTAMPTZ => {
            let v = cast(values, &DataType::Timestamp(TimeUnit::Microsecond, None))?;
            let micros = v.as_primitive::<arrow::datatypes::TimestampMicrosecondType>();
            let times: Vec<Option<chrono::NaiveDateTime>> = micros
                .iter()
                .map(|m| {
                    m.and_then(chrono::DateTime::from_timestamp_micros)
                        .map(|t| t.naive_utc())
                })
                .collect();
            if element == Type::TIMESTAMPTZ {
                Box::new(
                    times
                        .into_iter()
                        .map(|t| t.map(|t| t.and_utc()))
                        .collect::<Vec<_>>(),
                )
            } else {
                Box::new(times)
            }
        }
        Type::DATE => {
            let v = cast(values, &DataType::Date32)?;
            let epoch = chrono::NaiveDate::from_ymd_opt(1970, 1, 1).unwrap_or_default();
            Box::new(
                v.as_primitive::<arrow::datatypes::Date32Type>()
                    .iter()
                    .map(|d| d.map(|d| epoch + chrono::Duration::days(i64::from(d))))
                    .collect::<Vec<_>>(),
            )
        }
        other => {
            return Err(Error::Execution(format!(
                "a key column of Postgres type {other} cannot be looked up; cast it in 'query'"
            )));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_types_map_to_the_declared_arrow_types() {
        assert!(readable(&Type::INT4, &DataType::Int64));
        assert!(readable(&Type::INT8, &DataType::Float64));
        assert!(readable(&Type::VARCHAR, &DataType::Utf8));
        assert!(readable(
            &Type::TIMESTAMPTZ,
            &DataType::Timestamp(TimeUnit::Millisecond, None)
        ));
        assert!(!readable(&Type::NUMERIC, &DataType::Float64));
        assert!(!readable(&Type::TEXT, &DataType::Int64));
    }

    #[test]
    fn keys_become_arrays_of_the_parameter_type() {
        let keys: ArrayRef = Arc::new(Int64Array::from(vec![Some(1), None, Some(70_000)]));
        let param = key_param(&keys, &Type::INT2_ARRAY).expect("int2");
        // 70 000 does not fit an int2: it becomes NULL, which matches nothing.
        assert_eq!(format!("{param:?}"), "[Some(1), None, None]");
        let param = key_param(&keys, &Type::TEXT_ARRAY).expect("text");
        assert_eq!(format!("{param:?}"), "[Some(\"1\"), None, Some(\"70000\")]");
    }
}
