//! `POST /api/run` `{"sql"}`: runs a notebook block as the session's user and streams what
//! it returns as server-sent events (`text/event-stream`, read with `fetch`, since an
//! `EventSource` cannot POST):
//!
//! - `schema` `{"columns": [{"name", "type", "kind"}], "live"?}`, `kind` one of `number`,
//!   `time` (values in ms since the epoch, UTC), `bool`, `text`; `live` for a tail;
//! - `rows` `{"rows": [[...]]}`, in batches as they come (a live tail) or at once;
//! - `done` `{"rows", "truncated"}` after each result, `command` `{"tag"}` for DDL;
//! - `error` `{"message", "sqlstate", "position": {"line", "column"} | null}`;
//! - `end` when the block is done (a tail ends at its LIMIT).
//!
//! Back-pressure: events go through a small channel into the response body, so a browser
//! that reads slowly slows the tail's pipeline (whose queue is bounded too) rather than
//! growing the server's memory. Closing the block aborts the request; the tail's pipeline
//! stops with it.

use std::sync::Arc;
use std::time::Duration;

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::{DataType, Int64Type, Schema, TimeUnit};
use arrow::record_batch::RecordBatch;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::sync::mpsc;
use weir_planner::PlanError;

use super::{ApiError, Console, parse_json};
use crate::engine::Output;

/// Rows of a finite result sent at most (a notebook shows the first of them).
const MAX_ROWS: usize = 10_000;
/// Rows per `rows` event.
const ROWS_PER_EVENT: usize = 500;
/// An idle stream sends a comment this often, so a closed browser tab is noticed.
const KEEPALIVE: Duration = Duration::from_secs(15);

pub(super) async fn run(
    State(console): State<Arc<Console>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request = console.writer(&headers).and_then(|session| {
        let body = parse_json(&body)?;
        let sql = body["sql"]
            .as_str()
            .ok_or_else(|| ApiError::BadRequest("expected {\"sql\": \"...\"}".to_string()))?
            .to_string();
        Ok((session, sql))
    });
    let (session, sql) = match request {
        Ok(request) => request,
        Err(e) => return e.into_response(),
    };
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let engine = console.engine.clone();
    tokio::spawn(async move {
        let events = Events { tx };
        let outputs = engine.execute_as(session.caller(), &sql).await;
        for output in outputs {
            let sent = match output {
                Ok(output) => events.output(output).await,
                Err(e) => events.error(&e).await,
            };
            if !sent {
                return;
            }
        }
        events.send("end", &serde_json::json!({})).await;
    });
    let body = futures::stream::unfold(rx, |mut rx| async move {
        let bytes = rx.recv().await?;
        Some((Ok::<_, std::convert::Infallible>(bytes), rx))
    });
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

/// The sending side of one run's event stream.
struct Events {
    tx: mpsc::Sender<Bytes>,
}

impl Events {
    /// Sends one event; false once the browser has gone.
    async fn send(&self, event: &str, data: &serde_json::Value) -> bool {
        let text = format!("event: {event}\ndata: {data}\n\n");
        self.tx.send(Bytes::from(text)).await.is_ok()
    }

    async fn error(&self, error: &PlanError) -> bool {
        let position = error
            .position()
            .map(|p| serde_json::json!({ "line": p.line, "column": p.column }));
        self.send(
            "error",
            &serde_json::json!({
                "message": error.to_string(),
                "sqlstate": error.sqlstate(),
                "position": position,
            }),
        )
        .await
    }

    /// Sends a statement's output; false once the browser has gone.
    async fn output(&self, output: Output) -> bool {
        match output {
            Output::Command(tag) => {
                self.send("command", &serde_json::json!({ "tag": tag }))
                    .await
            }
            Output::Rows { schema, batches } => {
                let kinds = kinds(&schema);
                if !self.send("schema", &schema_json(&schema, &kinds)).await {
                    return false;
                }
                let mut sent = 0;
                for batch in &batches {
                    let take = batch.num_rows().min(MAX_ROWS - sent);
                    if !self.rows(&batch.slice(0, take), &kinds).await {
                        return false;
                    }
                    sent += take;
                    if sent == MAX_ROWS {
                        break;
                    }
                }
                let total: usize = batches.iter().map(RecordBatch::num_rows).sum();
                self.send(
                    "done",
                    &serde_json::json!({ "rows": total, "truncated": total > sent }),
                )
                .await
            }
            Output::Tail(mut tail) => {
                let kinds = kinds(&tail.schema);
                let mut schema = schema_json(&tail.schema, &kinds);
                schema["live"] = true.into();
                if !self.send("schema", &schema).await {
                    return false;
                }
                let mut returned = 0;
                loop {
                    tokio::select! {
                        batch = tail.next_batch(&mut returned) => match batch {
                            Some(batch) => {
                                if !self.rows(&batch, &kinds).await {
                                    return false;
                                }
                            }
                            None => break,
                        },
                        () = tokio::time::sleep(KEEPALIVE) => {
                            if self.tx.send(Bytes::from_static(b": keepalive\n\n")).await.is_err() {
                                return false;
                            }
                        }
                        () = self.tx.closed() => return false,
                    }
                }
                self.send(
                    "done",
                    &serde_json::json!({ "rows": returned, "truncated": false }),
                )
                .await
            }
        }
    }

    async fn rows(&self, batch: &RecordBatch, kinds: &[Kind]) -> bool {
        let mut start = 0;
        while start < batch.num_rows() {
            let len = (batch.num_rows() - start).min(ROWS_PER_EVENT);
            let rows = rows_json(&batch.slice(start, len), kinds);
            if !self
                .send("rows", &serde_json::json!({ "rows": rows }))
                .await
            {
                return false;
            }
            start += len;
        }
        true
    }
}

/// How the browser should read a column's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Number,
    Time,
    Bool,
    Text,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Number => "number",
            Kind::Time => "time",
            Kind::Bool => "bool",
            Kind::Text => "text",
        }
    }
}

fn kinds(schema: &Schema) -> Vec<Kind> {
    schema
        .fields()
        .iter()
        .map(|f| match f.data_type() {
            t if t.is_numeric() => Kind::Number,
            DataType::Timestamp(..) | DataType::Date32 | DataType::Date64 => Kind::Time,
            DataType::Boolean => Kind::Bool,
            _ => Kind::Text,
        })
        .collect()
}

fn schema_json(schema: &Schema, kinds: &[Kind]) -> serde_json::Value {
    let columns: Vec<_> = schema
        .fields()
        .iter()
        .zip(kinds)
        .map(|(f, kind)| {
            serde_json::json!({
                "name": f.name(),
                "type": f.data_type().to_string(),
                "kind": kind.name(),
            })
        })
        .collect();
    serde_json::json!({ "columns": columns })
}

/// Rows as JSON arrays: times as ms since the epoch, numbers as numbers where a JSON
/// number holds them exactly (else as text), the rest as Arrow prints it.
fn rows_json(batch: &RecordBatch, kinds: &[Kind]) -> Vec<Vec<serde_json::Value>> {
    let options = FormatOptions::default().with_null("");
    let columns: Vec<Column<'_>> = batch
        .columns()
        .iter()
        .zip(kinds)
        .map(|(array, kind)| Column::new(array, *kind, &options))
        .collect();
    (0..batch.num_rows())
        .map(|row| columns.iter().map(|c| c.value(row)).collect())
        .collect()
}

/// One column, ready to be read row by row.
enum Column<'a> {
    Millis(ArrayRef),
    Bool(&'a arrow::array::BooleanArray),
    Formatted(&'a dyn Array, Option<ArrayFormatter<'a>>, Kind),
}

impl<'a> Column<'a> {
    fn new(array: &'a ArrayRef, kind: Kind, options: &'a FormatOptions<'a>) -> Self {
        if kind == Kind::Time {
            let millis =
                arrow::compute::cast(array, &DataType::Timestamp(TimeUnit::Millisecond, None))
                    .and_then(|a| arrow::compute::cast(&a, &DataType::Int64));
            if let Ok(millis) = millis {
                return Column::Millis(millis);
            }
        }
        if kind == Kind::Bool {
            return Column::Bool(array.as_boolean());
        }
        Column::Formatted(
            array.as_ref(),
            ArrayFormatter::try_new(array.as_ref(), options).ok(),
            kind,
        )
    }

    fn value(&self, row: usize) -> serde_json::Value {
        match self {
            Column::Millis(millis) => {
                let millis = millis.as_primitive::<Int64Type>();
                if millis.is_null(row) {
                    serde_json::Value::Null
                } else {
                    millis.value(row).into()
                }
            }
            Column::Bool(array) => {
                if array.is_null(row) {
                    serde_json::Value::Null
                } else {
                    array.value(row).into()
                }
            }
            Column::Formatted(array, formatter, kind) => {
                if array.is_null(row) {
                    return serde_json::Value::Null;
                }
                let Some(formatter) = formatter else {
                    return serde_json::Value::Null;
                };
                // A value Arrow cannot print is shown empty, not a panic.
                let Ok(text) = formatter.value(row).try_to_string() else {
                    return serde_json::Value::Null;
                };
                if *kind == Kind::Number {
                    // Exactly, or as text: a JSON number is a double in the browser.
                    const EXACT: f64 = 9_007_199_254_740_992.0;
                    if let Ok(int) = text.parse::<i64>() {
                        if (int as f64).abs() < EXACT {
                            return int.into();
                        }
                    } else if let Ok(number) = text.parse::<f64>()
                        && let Some(number) = serde_json::Number::from_f64(number)
                    {
                        return serde_json::Value::Number(number);
                    }
                }
                text.into()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float64Array, Int64Array, StringArray, TimestampMillisecondArray};
    use arrow::datatypes::Field;

    #[test]
    fn rows_keep_numbers_times_and_nulls() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("t", DataType::Timestamp(TimeUnit::Millisecond, None), true),
            Field::new("n", DataType::Int64, true),
            Field::new("v", DataType::Float64, true),
            Field::new("s", DataType::Utf8, true),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(TimestampMillisecondArray::from(vec![Some(1_000), None])),
                Arc::new(Int64Array::from(vec![Some(9_007_199_254_740_993), Some(7)])),
                Arc::new(Float64Array::from(vec![Some(1.5), None])),
                Arc::new(StringArray::from(vec![Some("a"), None])),
            ],
        )
        .expect("batch");
        let kinds = kinds(&schema);
        assert_eq!(kinds, [Kind::Time, Kind::Number, Kind::Number, Kind::Text]);
        let rows = rows_json(&batch, &kinds);
        assert_eq!(
            serde_json::Value::from(rows),
            serde_json::json!([[1000, "9007199254740993", 1.5, "a"], [null, 7, null, null]])
        );
    }
}
