//! Shared by the window operators' tests: an input `(k, v, ts)` and
//! `SELECT window_start, window_end, k, count(v), sum(v) ... GROUP BY window_start, window_end, k`.

use std::sync::Arc;

use arrow::array::{Float64Array, Int64Array, TimestampMillisecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use arrow::util::pretty::pretty_format_batches;
use datafusion::functions_aggregate::count::count_udaf;
use datafusion::functions_aggregate::sum::sum_udaf;
use datafusion::physical_expr::aggregate::AggregateExprBuilder;
use datafusion::physical_expr::expressions::col;

use super::window::{GroupColumn, WindowAggregateSpec, WindowKind};
use crate::message::Message;
use crate::operator::Operator;

pub fn input_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("k", DataType::Int64, false),
        Field::new("v", DataType::Float64, true),
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Millisecond, None),
            false,
        ),
    ]))
}

/// `SELECT window_start, window_end, k, count(v), sum(v) ... GROUP BY window_start, window_end, k`.
pub fn spec(kind: WindowKind, allowed_lateness: i64) -> Arc<WindowAggregateSpec> {
    let input = input_schema();
    let aggregate = |udaf, name: &str| {
        Arc::new(
            AggregateExprBuilder::new(udaf, vec![col("v", &input).expect("v")])
                .schema(input.clone())
                .alias(name)
                .build()
                .expect("aggregate"),
        )
    };
    let ts = DataType::Timestamp(TimeUnit::Millisecond, None);
    let spec = WindowAggregateSpec {
        kind,
        time: col("ts", &input).expect("ts"),
        keys: vec![col("k", &input).expect("k")],
        aggregates: vec![aggregate(count_udaf(), "n"), aggregate(sum_udaf(), "total")],
        filters: vec![None, None],
        group_columns: vec![
            GroupColumn::WindowStart,
            GroupColumn::WindowEnd,
            GroupColumn::Key(0),
        ],
        schema: Arc::new(Schema::new(vec![
            Field::new("window_start", ts.clone(), false),
            Field::new("window_end", ts, false),
            Field::new("k", DataType::Int64, false),
            Field::new("n", DataType::Int64, false),
            Field::new("total", DataType::Float64, true),
        ])),
        allowed_lateness,
        processing_time: false,
    };
    Arc::new(spec)
}

pub fn batch(rows: &[(i64, f64, i64)]) -> RecordBatch {
    RecordBatch::try_new(
        input_schema(),
        vec![
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))),
            Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.1))),
            Arc::new(TimestampMillisecondArray::from_iter_values(
                rows.iter().map(|r| r.2),
            )),
        ],
    )
    .expect("batch")
}

/// The data rows in `out` as a table (sorted), and the watermarks passed on.
pub fn drain(out: &mut Vec<Message>) -> (String, Vec<i64>) {
    let mut batches = Vec::new();
    let mut marks = Vec::new();
    for m in out.drain(..) {
        match m {
            Message::Data(b) => batches.push(b),
            Message::Watermark(w) => marks.push(w.0),
            _ => {}
        }
    }
    if batches.is_empty() {
        return (String::new(), marks);
    }
    let table = pretty_format_batches(&batches).expect("format").to_string();
    let mut lines: Vec<&str> = table.lines().collect();
    if lines.len() > 4 {
        let body = lines.len() - 1;
        lines[3..body].sort_unstable();
    }
    (lines.join("\n"), marks)
}

/// One input of a scripted run.
pub enum Step {
    Batch(RecordBatch),
    Watermark(i64),
}

fn run(op: &mut dyn Operator, steps: &[Step], out: &mut Vec<Message>) {
    for step in steps {
        match step {
            Step::Batch(b) => op.process_batch(b.clone(), out).expect("batch"),
            Step::Watermark(w) => op
                .on_watermark(crate::message::Watermark(*w), out)
                .expect("watermark"),
        }
    }
}

/// Runs `steps` (then the end of input) through one operator without interruption, and
/// again with a checkpoint after every step: the operator snapshotted there goes on, and a
/// fresh one restored from the snapshot (through the store's encoding) replaces it for the
/// rest. Every run must emit the same rows and watermarks.
pub fn assert_restores(make: impl Fn() -> Box<dyn Operator>, steps: &[Step]) {
    let mut whole = make();
    let mut expected = Vec::new();
    run(whole.as_mut(), steps, &mut expected);
    whole.on_end(&mut expected).expect("end");
    let expected = drain(&mut expected);
    assert!(!expected.0.is_empty(), "the script emits rows");
    for cut in 0..=steps.len() {
        let mut first = make();
        let mut before = Vec::new();
        run(first.as_mut(), &steps[..cut], &mut before);
        let snapshot = first
            .snapshot()
            .expect("snapshot")
            .expect("a stateful operator has a snapshot");
        let mut unperturbed = before.clone();
        run(first.as_mut(), &steps[cut..], &mut unperturbed);
        first.on_end(&mut unperturbed).expect("end");
        assert_eq!(
            drain(&mut unperturbed),
            expected,
            "taking a snapshot after step {cut} changed the output"
        );
        let mut restored = make();
        restored
            .restore(crate::checkpoint::round_trip(&snapshot))
            .expect("restore");
        let mut after = before;
        run(restored.as_mut(), &steps[cut..], &mut after);
        restored.on_end(&mut after).expect("end");
        assert_eq!(
            drain(&mut after),
            expected,
            "restoring the snapshot taken after step {cut} changed the output"
        );
    }
}
