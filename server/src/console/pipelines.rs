//! `GET /api/pipelines`: every running pipeline as the graph of its operators (source →
//! operators → sink) with their counters, from the same registry `/metrics` encodes; the
//! page turns two readings into rates.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use weir_runtime::pipeline::PipelineStatus;

use super::{Console, json_response};

/// One sample of the text exposition format.
#[derive(Debug, PartialEq)]
struct Sample {
    /// Without `weir_` and a counter's `_total`.
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// The samples of Prometheus' text format, histograms' series left out.
fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    if line.starts_with('#') {
        return None;
    }
    let name_end = line.find(['{', ' '])?;
    let name = &line[..name_end];
    if ["_bucket", "_sum", "_count", "_created"]
        .iter()
        .any(|s| name.ends_with(s))
    {
        return None;
    }
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices();
        let mut key = String::new();
        loop {
            let (i, c) = chars.next()?;
            match c {
                '}' => {
                    rest = &inner[i + 1..];
                    break;
                }
                ',' => {}
                '=' => {
                    let (_, '"') = chars.next()? else {
                        return None;
                    };
                    let mut value = String::new();
                    loop {
                        match chars.next()?.1 {
                            '\\' => match chars.next()?.1 {
                                'n' => value.push('\n'),
                                other => value.push(other),
                            },
                            '"' => break,
                            other => value.push(other),
                        }
                    }
                    labels.insert(std::mem::take(&mut key), value);
                }
                other => key.push(other),
            }
        }
    }
    let value = rest.split_whitespace().next()?.parse().ok()?;
    let name = name.strip_prefix("weir_").unwrap_or(name);
    Some(Sample {
        name: name.strip_suffix("_total").unwrap_or(name).to_string(),
        labels,
        value,
    })
}

/// The order operators are drawn in: the source, the plan's steps by number, the sink.
fn operator_order(id: &str) -> (u8, u64, String) {
    if id.starts_with("source") {
        return (0, 0, id.to_string());
    }
    match id.split_once('_').and_then(|(n, _)| n.parse().ok()) {
        Some(n) => (1, n, id.to_string()),
        None => (2, 0, id.to_string()),
    }
}

type Metrics = BTreeMap<String, f64>;

fn add(into: &mut Metrics, sample: &Sample) {
    *into.entry(sample.name.clone()).or_default() += sample.value;
}

/// One pipeline's samples, by what they describe.
#[derive(Debug, Default, PartialEq)]
struct Grouped {
    /// By drawing order (source, steps, the rest).
    operators: BTreeMap<(u8, u64, String), Metrics>,
    /// By the `sink` label; a Prometheus sink's `remote_write_*` counters (labelled with the
    /// sink's name) are merged into it.
    sinks: BTreeMap<String, Metrics>,
    /// By source and partition.
    partitions: BTreeMap<(String, i64), Metrics>,
    /// By lookup table.
    lookups: BTreeMap<String, Metrics>,
    source: Metrics,
    other: Metrics,
}

/// The samples of pipeline `name`, grouped.
fn group(samples: &[Sample], name: &str) -> Grouped {
    let mut grouped = Grouped::default();
    let mut remote_write = Metrics::new();
    for sample in samples {
        let labels = &sample.labels;
        if labels.get("pipeline").map(String::as_str) != Some(name) {
            // Remote-write counters are the sink's own, by its name.
            if sample.name.starts_with("remote_write")
                && labels.get("sink").map(String::as_str) == Some(name)
            {
                add(&mut remote_write, sample);
            }
            continue;
        }
        if let Some(operator) = labels.get("operator") {
            add(
                grouped
                    .operators
                    .entry(operator_order(operator))
                    .or_default(),
                sample,
            );
        } else if let Some(sink) = labels.get("sink") {
            add(grouped.sinks.entry(sink.clone()).or_default(), sample);
        } else if let Some(partition) = labels.get("partition") {
            let key = (
                labels.get("source").cloned().unwrap_or_default(),
                partition.parse().unwrap_or(-1),
            );
            add(grouped.partitions.entry(key).or_default(), sample);
        } else if let Some(table) = labels.get("table") {
            add(grouped.lookups.entry(table.clone()).or_default(), sample);
        } else if labels.contains_key("source") {
            add(&mut grouped.source, sample);
        } else {
            add(&mut grouped.other, sample);
        }
    }
    if !remote_write.is_empty() {
        let sink = match grouped.sinks.values_mut().next() {
            Some(sink) => sink,
            None => grouped.sinks.entry("remote_write".into()).or_default(),
        };
        sink.extend(remote_write);
    }
    grouped
}

pub(super) async fn pipelines(State(console): State<Arc<Console>>, headers: HeaderMap) -> Response {
    if let Err(e) = console.reader(&headers) {
        return e.into_response();
    }
    let samples = parse(&console.engine.metrics().encode());
    let mut rows = console.engine.pipelines();
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    let now_ms = chrono::Utc::now().timestamp_millis();
    let pipelines: Vec<serde_json::Value> = rows
        .iter()
        .map(|row| {
            let Grouped {
                operators,
                sinks,
                partitions,
                lookups,
                source,
                other,
            } = group(&samples, &row.name);
            let (status, cause) = match &row.status {
                PipelineStatus::Running => ("running", None),
                PipelineStatus::Finished => ("finished", None),
                PipelineStatus::Stopped => ("stopped", None),
                PipelineStatus::Failed(f) => ("failed", Some(f.cause.clone())),
            };
            let checkpoint = row.checkpoints.last.map(|(epoch, at_ms, took, bytes)| {
                serde_json::json!({
                    "epoch": epoch,
                    "at_ms": at_ms,
                    "age_s": (now_ms - at_ms) as f64 / 1000.0,
                    "duration_ms": took.as_millis() as u64,
                    "bytes": bytes,
                })
            });
            let mut graph: Vec<serde_json::Value> = operators
                .into_iter()
                .map(|((_, _, id), metrics)| {
                    let kind = if id.starts_with("source") {
                        "source"
                    } else {
                        "operator"
                    };
                    serde_json::json!({ "id": id, "kind": kind, "metrics": metrics })
                })
                .collect();
            graph.extend(sinks.into_iter().map(|(sink, metrics)| {
                serde_json::json!({ "id": format!("sink_{sink}"), "kind": "sink", "metrics": metrics })
            }));
            let partitions: Vec<_> = partitions
                .into_iter()
                .map(|((source, partition), metrics)| {
                    serde_json::json!({ "source": source, "partition": partition, "metrics": metrics })
                })
                .collect();
            let lookups: Vec<_> = lookups
                .into_iter()
                .map(|(table, metrics)| serde_json::json!({ "table": table, "metrics": metrics }))
                .collect();
            serde_json::json!({
                "name": row.name,
                "kind": row.kind.to_string(),
                "input": row.input,
                "status": status,
                "cause": cause,
                "restarts": row.restarts.0,
                "last_failure": row.restarts.1,
                "uptime_s": row.started.elapsed().as_secs_f64(),
                "instances": row.instances,
                "checkpoint": checkpoint,
                "checkpoints_failed": row.checkpoints.failed,
                "watermark_ms": source.get("source_watermark_ms"),
                "operators": graph,
                "partitions": partitions,
                "lookups": lookups,
                "other": other,
            })
        })
        .collect();
    json_response(
        StatusCode::OK,
        &serde_json::json!({ "time_ms": now_ms, "pipelines": pipelines }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_parsed_with_escaped_labels() {
        let text = "# TYPE weir_records_in counter\n\
            weir_records_in_total{pipeline=\"p\",operator=\"0_filter\"} 3\n\
            weir_lookup_seconds_bucket{le=\"0.1\"} 1\n\
            weir_pipelines_running 2\n\
            weir_x{a=\"q\\\"uote\\\\,}\",b=\"\"} 1.5\n\
            # EOF\n";
        let samples = parse(text);
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(
            samples,
            vec![
                Sample {
                    name: "records_in".into(),
                    labels: labels(&[("pipeline", "p"), ("operator", "0_filter")]),
                    value: 3.0
                },
                Sample {
                    name: "pipelines_running".into(),
                    labels: BTreeMap::new(),
                    value: 2.0
                },
                Sample {
                    name: "x".into(),
                    labels: labels(&[("a", "q\"uote\\,}"), ("b", "")]),
                    value: 1.5
                },
            ]
        );
    }

    #[test]
    fn a_pipelines_samples_are_grouped_by_what_they_describe() {
        let text = "weir_records_out_total{pipeline=\"p\",operator=\"source_kafka\"} 10\n\
            weir_records_in_total{pipeline=\"p\",operator=\"0_filter\"} 10\n\
            weir_records_in_total{pipeline=\"q\",operator=\"0_filter\"} 99\n\
            weir_sink_rows_written_total{pipeline=\"p\",sink=\"prometheus_remote_write\"} 4\n\
            weir_remote_write_queue_samples{sink=\"p\"} 7\n\
            weir_remote_write_samples_dropped_total{sink=\"p\",reason=\"bad_request\"} 1\n\
            weir_remote_write_samples_dropped_total{sink=\"p\",reason=\"client_error\"} 2\n\
            weir_source_partition_lag{source=\"s\",pipeline=\"p\",partition=\"3\"} 12\n\
            weir_source_watermark_ms{source=\"s\",pipeline=\"p\"} 1000\n\
            weir_lookup_misses_total{pipeline=\"p\",table=\"t\"} 5\n\
            weir_decode_errors_total{pipeline=\"p\",reason=\"json\"} 2\n";
        let grouped = group(&parse(text), "p");
        let metrics = |pairs: &[(&str, f64)]| -> Metrics {
            pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
        };
        assert_eq!(
            grouped,
            Grouped {
                operators: [
                    (
                        (0, 0, "source_kafka".to_string()),
                        metrics(&[("records_out", 10.0)])
                    ),
                    (
                        (1, 0, "0_filter".to_string()),
                        metrics(&[("records_in", 10.0)])
                    ),
                ]
                .into(),
                sinks: [(
                    "prometheus_remote_write".to_string(),
                    metrics(&[
                        ("sink_rows_written", 4.0),
                        ("remote_write_queue_samples", 7.0),
                        ("remote_write_samples_dropped", 3.0),
                    ])
                )]
                .into(),
                partitions: [(
                    ("s".to_string(), 3),
                    metrics(&[("source_partition_lag", 12.0)])
                )]
                .into(),
                lookups: [("t".to_string(), metrics(&[("lookup_misses", 5.0)]))].into(),
                source: metrics(&[("source_watermark_ms", 1000.0)]),
                other: metrics(&[("decode_errors", 2.0)]),
            }
        );
    }

    #[test]
    fn operators_are_drawn_source_first_then_by_step() {
        let mut ids = ["10_project", "sink", "2_window_aggregate", "source_kafka"];
        ids.sort_by_key(|id| operator_order(id));
        assert_eq!(
            ids,
            ["source_kafka", "2_window_aggregate", "10_project", "sink"]
        );
    }
}
