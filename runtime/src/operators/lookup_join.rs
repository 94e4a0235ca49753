//! [`LookupJoin`]: enriches each record with the row of a [`LookupTable`] its key matches.
//!
//! A lookup join (`FROM stream JOIN table ON stream_expr = table.key`) reads the table as it is
//! when the record is processed. Per batch: the stream-side key expressions are evaluated once,
//! the table answers all keys in one call, and the output is the input's columns plus the
//! table's, gathered with `take`. INNER drops the records with no row, LEFT keeps them with
//! NULLs; either way they are counted as misses. ON conditions beyond the key equalities are
//! checked on the joined rows: a row that fails them is a miss too.

use std::sync::Arc;
use std::time::Instant;

use arrow::array::{Array, ArrayRef, AsArray, UInt32Array};
use arrow::compute::kernels::boolean::{is_not_null, not};
use arrow::compute::{filter, filter_record_batch, nullif, prep_null_mask_filter, take};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::{RecordBatch, RecordBatchOptions};
use datafusion::physical_expr::PhysicalExpr;

use crate::error::{Error, Result};
use crate::lookup::{LookupRows, LookupTable};
use crate::metrics::LookupJoinMetrics;
use crate::operator::{AsyncOperator, BatchFuture};

/// Batches one lookup join keeps in flight by default.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 4;

/// Which stream records a lookup join emits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupJoinType {
    /// Only records that found a row.
    Inner,
    /// Every record; the table's columns are NULL where none was found.
    Left,
}

impl std::fmt::Display for LookupJoinType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LookupJoinType::Inner => "INNER",
            LookupJoinType::Left => "LEFT",
        })
    }
}

/// A lookup join as planned; shared by the operator instances of every pipeline built from it.
#[derive(Debug)]
pub struct LookupJoinSpec {
    /// The table's name, for metrics.
    pub table_name: String,
    pub table: Arc<dyn LookupTable>,
    pub join_type: LookupJoinType,
    /// One expression over the input per key column, in key order, of that column's type.
    pub keys: Vec<Arc<dyn PhysicalExpr>>,
    /// Table columns appended to the input's columns, in order.
    pub table_columns: Vec<usize>,
    /// ON conditions other than the key equalities (and filters on the table's columns), over
    /// the input's columns followed by every table column (nullable): a row that fails them
    /// found nothing.
    pub filter: Option<Arc<dyn PhysicalExpr>>,
    /// The rows produced: the input's columns, then `table_columns`.
    pub schema: SchemaRef,
    pub max_in_flight: usize,
}

/// The operator: one per pipeline.
#[derive(Debug)]
pub struct LookupJoin {
    spec: Arc<LookupJoinSpec>,
    /// The input's columns and every table column (nullable): what `filter` reads.
    probe_schema: SchemaRef,
    /// Every table column, in order (the probe takes them all).
    all_table_columns: Vec<usize>,
    metrics: LookupJoinMetrics,
}

impl LookupJoin {
    /// Checks the spec against the input once: the keys' types, the output's width.
    pub fn try_new(
        spec: Arc<LookupJoinSpec>,
        input_schema: &Schema,
        metrics: LookupJoinMetrics,
    ) -> Result<Self> {
        let table_schema = spec.table.schema();
        let key_columns = spec.table.key_columns();
        if spec.keys.len() != key_columns.len() {
            return Err(Error::Internal(format!(
                "lookup join on \"{}\" with {} key expressions for {} key columns",
                spec.table_name,
                spec.keys.len(),
                key_columns.len()
            )));
        }
        for (expr, &column) in spec.keys.iter().zip(key_columns) {
            let expected = table_schema.field(column).data_type();
            let actual = expr.data_type(input_schema)?;
            if &actual != expected {
                return Err(Error::Internal(format!(
                    "lookup join on \"{}\": key {expr} is {actual}, the column {expected}",
                    spec.table_name
                )));
            }
        }
        let width = input_schema.fields().len() + spec.table_columns.len();
        if spec.schema.fields().len() != width {
            return Err(Error::Internal(format!(
                "lookup join on \"{}\" declares {} columns but joins {width}",
                spec.table_name,
                spec.schema.fields().len()
            )));
        }
        let probe_fields: Vec<Field> = input_schema
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .chain(
                table_schema
                    .fields()
                    .iter()
                    .map(|f| f.as_ref().clone().with_nullable(true)),
            )
            .collect();
        Ok(Self {
            probe_schema: Arc::new(Schema::new(probe_fields)),
            all_table_columns: (0..table_schema.fields().len()).collect(),
            spec,
            metrics,
        })
    }
}

impl AsyncOperator for LookupJoin {
    fn name(&self) -> &'static str {
        "lookup_join"
    }

    fn max_in_flight(&self) -> usize {
        self.spec.max_in_flight
    }

    fn process_batch(&mut self, batch: RecordBatch) -> Result<BatchFuture> {
        let keys = self
            .spec
            .keys
            .iter()
            .map(|k| k.evaluate(&batch)?.into_array(batch.num_rows()))
            .collect::<Result<Vec<ArrayRef>, _>>()?;
        let spec = self.spec.clone();
        let probe = (self.probe_schema.clone(), self.all_table_columns.clone());
        let metrics = self.metrics.clone();
        Ok(Box::pin(async move {
            if batch.num_rows() == 0 {
                return Ok(None);
            }
            let started = Instant::now();
            let found = spec.table.lookup(&keys).await?;
            metrics.seconds.observe(started.elapsed().as_secs_f64());
            if found.indices.len() != batch.num_rows() {
                return Err(Error::Internal(format!(
                    "table \"{}\" answered {} of {} keys",
                    spec.table_name,
                    found.indices.len(),
                    batch.num_rows()
                )));
            }
            join(&spec, &probe, batch, found, &metrics)
        }))
    }
}

/// The output for one batch, given what the table found for its keys.
fn join(
    spec: &LookupJoinSpec,
    (probe_schema, all_table_columns): &(SchemaRef, Vec<usize>),
    batch: RecordBatch,
    found: LookupRows,
    metrics: &LookupJoinMetrics,
) -> Result<Option<RecordBatch>> {
    let rows = batch.num_rows();
    let mut indices = found.indices;
    if let Some(condition) = &spec.filter {
        let joined = assemble(
            probe_schema,
            all_table_columns,
            &batch,
            &found.rows,
            &indices,
        )?;
        let mask = condition.evaluate(&joined)?.into_array(rows)?;
        let mask = mask.as_boolean_opt().ok_or_else(|| {
            Error::Internal(format!("join condition returned {}", mask.data_type()))
        })?;
        // A row whose condition is false or NULL found nothing.
        let passed = match mask.nulls() {
            Some(_) => prep_null_mask_filter(mask),
            None => mask.clone(),
        };
        let failed = not(&passed)?;
        indices = nullif(&indices, &failed)?
            .as_primitive_opt()
            .cloned()
            .ok_or_else(|| Error::Internal("nullif changed the index type".into()))?;
    }
    let misses = indices.null_count();
    metrics.lookups.inc_by(rows as u64);
    metrics.hits.inc_by((rows - misses) as u64);
    metrics.misses.inc_by(misses as u64);
    let batch = match spec.join_type {
        LookupJoinType::Inner if misses == rows => return Ok(None),
        LookupJoinType::Inner if misses > 0 => {
            let matched = is_not_null(&indices)?;
            indices = filter(&indices, &matched)?
                .as_primitive_opt()
                .cloned()
                .ok_or_else(|| Error::Internal("filter changed the index type".into()))?;
            filter_record_batch(&batch, &matched)?
        }
        _ => batch,
    };
    Ok(Some(assemble(
        &spec.schema,
        &spec.table_columns,
        &batch,
        &found.rows,
        &indices,
    )?))
}

/// The input's columns, then the table's `columns` gathered at `indices`.
fn assemble(
    schema: &SchemaRef,
    columns: &[usize],
    batch: &RecordBatch,
    table: &RecordBatch,
    indices: &UInt32Array,
) -> Result<RecordBatch> {
    let mut out: Vec<ArrayRef> = Vec::with_capacity(batch.num_columns() + columns.len());
    out.extend(batch.columns().iter().cloned());
    for &c in columns {
        let column = table
            .columns()
            .get(c)
            .ok_or_else(|| Error::Internal(format!("table column {c} missing")))?;
        out.push(take(column.as_ref(), indices, None)?);
    }
    // A table column declared NOT NULL is nullable in the output of a LEFT join only.
    let out = out
        .into_iter()
        .zip(schema.fields())
        .map(|(a, f)| {
            if a.data_type() == f.data_type() || a.data_type() == &DataType::Null {
                Ok(a)
            } else {
                Ok(arrow::compute::cast(&a, f.data_type())?)
            }
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(RecordBatch::try_new_with_options(
        schema.clone(),
        out,
        &RecordBatchOptions::new().with_row_count(Some(batch.num_rows())),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lookup::MemoryTable;
    use arrow::array::{Int64Array, StringArray};
    use arrow::util::pretty::pretty_format_batches;
    use datafusion::logical_expr::Operator as BinOp;
    use datafusion::physical_expr::expressions::{BinaryExpr, Column, Literal};
    use datafusion::scalar::ScalarValue;

    fn vehicles_schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("vehicle_id", DataType::Int64, false),
            Field::new("region", DataType::Utf8, true),
        ]))
    }

    fn vehicles_rows(ids: Vec<i64>, regions: Vec<&str>) -> RecordBatch {
        RecordBatch::try_new(
            vehicles_schema(),
            vec![
                Arc::new(Int64Array::from(ids)),
                Arc::new(StringArray::from(regions)),
            ],
        )
        .expect("rows")
    }

    fn vehicles() -> Arc<MemoryTable> {
        MemoryTable::try_new(
            "vehicles",
            vehicles_schema(),
            vec![0],
            vehicles_rows(vec![1, 2, 3], vec!["eu", "us", "ap"]),
            crate::Metrics::new().lookup_table("vehicles"),
        )
        .expect("table")
    }

    fn events() -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, true),
            Field::new("speed", DataType::Int64, false),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from(vec![
                    Some(2),
                    Some(9),
                    None,
                    Some(1),
                    Some(3),
                ])),
                Arc::new(Int64Array::from(vec![10, 20, 30, 40, 50])),
            ],
        )
        .expect("events")
    }

    fn metrics() -> LookupJoinMetrics {
        crate::Metrics::new().lookup_join("p", "vehicles")
    }

    fn operator(
        join_type: LookupJoinType,
        filter: Option<Arc<dyn PhysicalExpr>>,
        metrics: LookupJoinMetrics,
    ) -> LookupJoin {
        operator_on(vehicles(), join_type, filter, metrics)
    }

    fn operator_on(
        table: Arc<MemoryTable>,
        join_type: LookupJoinType,
        filter: Option<Arc<dyn PhysicalExpr>>,
        metrics: LookupJoinMetrics,
    ) -> LookupJoin {
        let input = events().schema();
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, true),
            Field::new("speed", DataType::Int64, false),
            Field::new("region", DataType::Utf8, true),
        ]));
        let spec = LookupJoinSpec {
            table_name: "vehicles".into(),
            table,
            join_type,
            keys: vec![Arc::new(Column::new("id", 0))],
            table_columns: vec![1],
            filter,
            schema,
            max_in_flight: 1,
        };
        LookupJoin::try_new(Arc::new(spec), &input, metrics).expect("valid")
    }

    async fn run(mut op: LookupJoin) -> String {
        let out = op
            .process_batch(events())
            .expect("start")
            .await
            .expect("join");
        pretty_format_batches(&out.into_iter().collect::<Vec<_>>())
            .expect("format")
            .to_string()
    }

    #[tokio::test]
    async fn inner_keeps_matches_in_input_order_and_counts_misses() {
        let m = metrics();
        let out = run(operator(LookupJoinType::Inner, None, m.clone())).await;
        let expected = "\
+----+-------+--------+
| id | speed | region |
+----+-------+--------+
| 2  | 10    | us     |
| 1  | 40    | eu     |
| 3  | 50    | ap     |
+----+-------+--------+";
        assert_eq!(out, expected);
        assert_eq!((m.lookups.get(), m.hits.get(), m.misses.get()), (5, 3, 2));
    }

    #[tokio::test]
    async fn left_keeps_every_record_with_nulls_for_misses() {
        let m = metrics();
        let out = run(operator(LookupJoinType::Left, None, m.clone())).await;
        let expected = "\
+----+-------+--------+
| id | speed | region |
+----+-------+--------+
| 2  | 10    | us     |
| 9  | 20    |        |
|    | 30    |        |
| 1  | 40    | eu     |
| 3  | 50    | ap     |
+----+-------+--------+";
        assert_eq!(out, expected);
        assert_eq!(m.misses.get(), 2);
    }

    #[tokio::test]
    async fn a_failed_on_condition_is_a_miss() {
        // ON e.id = v.vehicle_id AND e.speed > 15
        let condition: Arc<dyn PhysicalExpr> = Arc::new(BinaryExpr::new(
            Arc::new(Column::new("speed", 1)),
            BinOp::Gt,
            Arc::new(Literal::new(ScalarValue::Int64(Some(15)))),
        ));
        let m = metrics();
        let out = run(operator(
            LookupJoinType::Left,
            Some(condition.clone()),
            m.clone(),
        ))
        .await;
        let expected = "\
+----+-------+--------+
| id | speed | region |
+----+-------+--------+
| 2  | 10    |        |
| 9  | 20    |        |
|    | 30    |        |
| 1  | 40    | eu     |
| 3  | 50    | ap     |
+----+-------+--------+";
        assert_eq!(out, expected);
        assert_eq!(m.misses.get(), 3);
        let inner = run(operator(LookupJoinType::Inner, Some(condition), metrics())).await;
        assert_eq!(inner.lines().count(), 6, "{inner}");
    }

    /// Reloads swap whole versions: while versions in which every vehicle is in "a", then
    /// every one in "b", replace each other as fast as they can be built, every batch is
    /// joined against one of them, never a mix.
    #[tokio::test]
    async fn a_batch_never_sees_half_a_reload() {
        let ids: Vec<i64> = (0..2000).collect();
        let version = |region: &str| vehicles_rows(ids.clone(), vec![region; ids.len()]);
        let table = MemoryTable::try_new(
            "vehicles",
            vehicles_schema(),
            vec![0],
            version("a"),
            crate::Metrics::new().lookup_table("vehicles"),
        )
        .expect("table");
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reloader = {
            let (table, stop) = (table.clone(), stop.clone());
            let versions = [version("a"), version("b")];
            std::thread::spawn(move || {
                let mut published = 0usize;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    table
                        .publish(versions[published % 2].clone())
                        .expect("publish");
                    published += 1;
                }
                published
            })
        };
        let mut op = operator_on(table, LookupJoinType::Inner, None, metrics());
        let input = RecordBatch::try_new(
            events().schema(),
            vec![
                Arc::new(Int64Array::from(ids.clone())),
                Arc::new(Int64Array::from(vec![0; ids.len()])),
            ],
        )
        .expect("input");
        let mut seen = std::collections::BTreeSet::new();
        for batch in 0..20_000 {
            if batch >= 300 && seen.len() == 2 {
                break;
            }
            let out = op
                .process_batch(input.clone())
                .expect("start")
                .await
                .expect("join")
                .expect("rows");
            let regions = out.column(2).as_string::<i32>();
            let first = regions.value(0).to_string();
            assert!(
                regions.iter().all(|r| r == Some(first.as_str())),
                "one batch saw two versions"
            );
            seen.insert(first);
            tokio::task::yield_now().await;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let published = reloader.join().expect("reloader");
        assert!(published > 2, "the table was reloaded while batches ran");
        assert_eq!(
            seen.len(),
            2,
            "batches saw both versions over time: {seen:?}"
        );
    }
}
