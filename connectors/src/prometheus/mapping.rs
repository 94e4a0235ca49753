//! Rows → remote-write samples.
//!
//! Decided once, at CREATE, from the sink's schema and options ([`Mapping::try_new`]):
//!
//! - every numeric column (integers, floats, decimals) not used as the timestamp is a value:
//!   a series `<metric_prefix>_<column>` per row;
//! - a text column `__name__` names the metric instead (`<__name__>` when there is one value
//!   column, `<__name__>_<column>` when there are several);
//! - every other column except timestamps is a label (text as is, booleans and dates as
//!   text); `labels.<name> = '<value>'` adds constant labels;
//! - the sample time is the `timestamp` column (default `window_end`, else the wall clock).
//!
//! Names are sanitized to the spec's character sets (`[a-zA-Z_:][a-zA-Z0-9_:]*` for metrics,
//! `[a-zA-Z_][a-zA-Z0-9_]*` for labels); names that collide once sanitized are refused at
//! CREATE. Labels are written sorted by name, NULL or empty label values left out, and NULL
//! values give no sample.

use arrow::array::{
    Array, ArrayRef, AsArray, Float64Array, StringArray, TimestampMillisecondArray,
};
use arrow::compute::cast;
use arrow::datatypes::{DataType, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use weir_runtime::connector::ConnectorError;
use weir_runtime::{Result, sql_type_name};

use super::proto::SeriesWriter;

/// Where a sample's time comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Time {
    Column(usize),
    /// The wall clock when the row is written.
    Processing,
}

/// Where a label's value comes from.
#[derive(Debug, Clone)]
enum LabelSource {
    /// The metric name (`__name__`).
    MetricName,
    /// A column, as text.
    Column(usize),
    Constant(String),
}

#[derive(Debug, Clone)]
struct LabelSlot {
    name: String,
    source: LabelSource,
}

/// A numeric column written as samples.
#[derive(Debug, Clone)]
struct ValueColumn {
    index: usize,
    /// The metric name, or (with a `__name__` column) the suffix after it, if any.
    name: String,
}

/// How rows of one schema become samples.
#[derive(Debug, Clone)]
pub struct Mapping {
    time: Time,
    /// The `__name__` column, if the rows name their metrics.
    name_column: Option<usize>,
    values: Vec<ValueColumn>,
    /// Sorted by name.
    labels: Vec<LabelSlot>,
}

/// Why rows' samples were not written, for the `samples_dropped` metric.
pub const UNMAPPABLE: &str = "unmappable";

/// One batch's samples, handed out one at a time to a callback.
pub struct Sample<'a> {
    /// The encoded `TimeSeries` message (labels and the one sample).
    pub series: &'a [u8],
    /// Hash of the label set (the series identity), for sharding.
    pub hash: u64,
    pub timestamp_ms: i64,
}

impl Mapping {
    pub fn try_new(
        schema: &SchemaRef,
        metric_prefix: &str,
        timestamp: Option<&str>,
        constant_labels: Vec<(String, String)>,
    ) -> Result<Self, ConnectorError> {
        let invalid = |m: String| ConnectorError::Invalid(m);
        let time = match timestamp {
            Some(name) => {
                let name = name.to_lowercase();
                let index = schema.index_of(&name).map_err(|_| {
                    invalid(format!(
                        "option 'timestamp' names no column: '{name}' is not among {}",
                        column_list(schema)
                    ))
                })?;
                if !matches!(schema.field(index).data_type(), DataType::Timestamp(..)) {
                    return Err(invalid(format!(
                        "option 'timestamp': column '{name}' is {}, not a TIMESTAMP",
                        sql_type_name(schema.field(index).data_type())
                    )));
                }
                Time::Column(index)
            }
            None => match schema.index_of("window_end") {
                Ok(i) if matches!(schema.field(i).data_type(), DataType::Timestamp(..)) => {
                    Time::Column(i)
                }
                _ => Time::Processing,
            },
        };
        let name_column = schema.index_of("__name__").ok();
        if let Some(i) = name_column
            && !is_text(schema.field(i).data_type())
        {
            return Err(invalid(format!(
                "column '__name__' names the metric and must be text, not {}",
                sql_type_name(schema.field(i).data_type())
            )));
        }
        let mut values = Vec::new();
        let mut labels = vec![LabelSlot {
            name: "__name__".into(),
            source: LabelSource::MetricName,
        }];
        for (index, field) in schema.fields().iter().enumerate() {
            let data_type = field.data_type();
            if Some(index) == name_column || matches!(data_type, DataType::Timestamp(..)) {
                continue;
            }
            if is_numeric(data_type) {
                values.push(ValueColumn {
                    index,
                    name: field.name().clone(),
                });
            } else if is_labelable(data_type) {
                let name = sanitize_label_name(field.name()).ok_or_else(|| {
                    invalid(format!(
                        "column '{}' cannot be a label name: rename it",
                        field.name()
                    ))
                })?;
                labels.push(LabelSlot {
                    name,
                    source: LabelSource::Column(index),
                });
            } else {
                return Err(invalid(format!(
                    "column '{}' is {}: neither a number (a sample) nor text (a label); cast it or leave it out",
                    field.name(),
                    sql_type_name(data_type)
                )));
            }
        }
        if values.is_empty() {
            return Err(invalid(format!(
                "a Prometheus sink needs at least one numeric column to write as samples; the rows have {}",
                column_list(schema)
            )));
        }
        for (name, value) in constant_labels {
            let sanitized = sanitize_label_name(&name)
                .filter(|n| *n == name && n != "__name__")
                .ok_or_else(|| {
                    invalid(format!(
                        "option 'labels.{name}': not a valid label name ([a-zA-Z_][a-zA-Z0-9_]*, not __name__)"
                    ))
                })?;
            labels.push(LabelSlot {
                name: sanitized,
                source: LabelSource::Constant(value),
            });
        }
        labels.sort_by(|a, b| a.name.cmp(&b.name));
        if let Some(pair) = labels.windows(2).find(|w| w[0].name == w[1].name) {
            return Err(invalid(format!(
                "two labels would both be named '{}' (after sanitizing to [a-zA-Z0-9_]): {} and {}",
                pair[0].name,
                describe(&pair[0], schema),
                describe(&pair[1], schema)
            )));
        }
        // Metric names of the value columns (without a __name__ column: fixed now).
        match name_column {
            None => {
                let prefix = metric_prefix.trim_end_matches('_');
                for v in &mut values {
                    let full = if prefix.is_empty() {
                        v.name.clone()
                    } else {
                        format!("{prefix}_{}", v.name)
                    };
                    v.name = sanitize_metric_name(&full)
                        .ok_or_else(|| invalid(format!("'{full}' cannot be made a metric name")))?;
                }
            }
            Some(_) if values.len() == 1 => values[0].name.clear(),
            Some(_) => {
                for v in &mut values {
                    v.name = format!("_{}", v.name);
                }
            }
        }
        let mut names: Vec<&str> = values.iter().map(|v| v.name.as_str()).collect();
        names.sort_unstable();
        if let Some(pair) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(invalid(format!(
                "two value columns would both be the metric '{}' after sanitizing",
                pair[0]
            )));
        }
        Ok(Self {
            time,
            name_column,
            values,
            labels,
        })
    }

    pub fn time(&self) -> Time {
        self.time
    }

    /// Encodes every sample of `batch`, calling `emit` for each; returns how many samples
    /// were dropped because their row had no time or no usable metric name.
    pub fn encode(
        &self,
        batch: &RecordBatch,
        now_ms: i64,
        mut emit: impl FnMut(Sample<'_>),
    ) -> Result<u64> {
        let rows = batch.num_rows();
        let times: Option<TimestampMillisecondArray> = match self.time {
            Time::Column(i) => Some(
                cast(
                    batch.column(i),
                    &DataType::Timestamp(TimeUnit::Millisecond, None),
                )?
                .as_primitive()
                .clone(),
            ),
            Time::Processing => None,
        };
        let values: Vec<Float64Array> = self
            .values
            .iter()
            .map(|v| {
                Ok(cast(batch.column(v.index), &DataType::Float64)?
                    .as_primitive()
                    .clone())
            })
            .collect::<Result<_>>()?;
        let label_columns: Vec<Option<StringArray>> = self
            .labels
            .iter()
            .map(|l| match l.source {
                LabelSource::Column(i) => Ok(Some(label_values(batch.column(i))?)),
                _ => Ok(None),
            })
            .collect::<Result<_>>()?;
        let names: Option<StringArray> = match self.name_column {
            Some(i) => Some(
                cast(batch.column(i), &DataType::Utf8)?
                    .as_string::<i32>()
                    .clone(),
            ),
            None => None,
        };
        let hasher = series_hasher();
        let mut dropped = 0;
        let mut series = Vec::with_capacity(256);
        let mut metric = String::new();
        for row in 0..rows {
            let timestamp_ms = match &times {
                Some(t) if t.is_null(row) => {
                    dropped += values.iter().filter(|v| v.is_valid(row)).count() as u64;
                    continue;
                }
                Some(t) => t.value(row),
                None => now_ms,
            };
            for (v, column) in self.values.iter().zip(&values) {
                if column.is_null(row) {
                    continue;
                }
                metric.clear();
                match &names {
                    None => metric.push_str(&v.name),
                    Some(names) => {
                        let base = if names.is_null(row) {
                            ""
                        } else {
                            names.value(row)
                        };
                        let Some(base) = sanitize_metric_name(base) else {
                            dropped += 1;
                            continue;
                        };
                        metric.push_str(&base);
                        metric.push_str(&v.name);
                    }
                }
                series.clear();
                let mut writer = SeriesWriter::new(&mut series);
                for (slot, column) in self.labels.iter().zip(&label_columns) {
                    let value = match (&slot.source, column) {
                        (LabelSource::MetricName, _) => metric.as_str(),
                        (LabelSource::Constant(c), _) => c.as_str(),
                        (LabelSource::Column(_), Some(c)) if c.is_valid(row) => c.value(row),
                        (LabelSource::Column(_), _) => continue,
                    };
                    if !value.is_empty() {
                        writer.label(slot.name.as_bytes(), value.as_bytes());
                    }
                }
                let labels_end = series.len();
                let hash = hasher.hash_one(&series[..labels_end]);
                let writer = SeriesWriter::new(&mut series);
                writer.finish(column.value(row), timestamp_ms);
                emit(Sample {
                    series: &series,
                    hash,
                    timestamp_ms,
                });
            }
        }
        Ok(dropped)
    }
}

/// FNV-1a over the encoded labels: stable across runs and processes, so a series always
/// lands on the same shard.
/// Hashes a series' encoded labels, for sharding: fixed seeds, so a series keeps its shard
/// for the life of the sink (ahash, as arrow uses it).
fn series_hasher() -> ahash::RandomState {
    ahash::RandomState::with_seeds(0x5765_6972, 0x7072_6f6d, 0x7265_6d6f, 0x7465_7772)
}

fn describe(slot: &LabelSlot, schema: &SchemaRef) -> String {
    match &slot.source {
        LabelSource::Column(i) => format!("column '{}'", schema.field(*i).name()),
        LabelSource::Constant(_) => format!("option 'labels.{}'", slot.name),
        LabelSource::MetricName => "the metric name".into(),
    }
}

fn column_list(schema: &SchemaRef) -> String {
    let names: Vec<String> = schema
        .fields()
        .iter()
        .map(|f| format!("{} {}", f.name(), sql_type_name(f.data_type())))
        .collect();
    format!("({})", names.join(", "))
}

fn is_numeric(t: &DataType) -> bool {
    t.is_integer()
        || t.is_floating()
        || matches!(t, DataType::Decimal128(..) | DataType::Decimal256(..))
}

fn is_text(t: &DataType) -> bool {
    matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
}

/// A label column's values as text. A value that has no text form (a date past chrono's
/// range, year 262 143) is NULL, so its rows go without that label, as a NULL's do, rather
/// than failing the whole batch (and the sink with it).
fn label_values(column: &ArrayRef) -> Result<StringArray> {
    if let Ok(text) = cast(column, &DataType::Utf8) {
        return Ok(text.as_string::<i32>().clone());
    }
    let formatter = ArrayFormatter::try_new(
        column.as_ref(),
        &FormatOptions::default().with_display_error(false),
    )?;
    Ok((0..column.len())
        .map(|row| {
            column
                .is_valid(row)
                .then(|| formatter.value(row).try_to_string().ok())
                .flatten()
        })
        .collect())
}

fn is_labelable(t: &DataType) -> bool {
    is_text(t) || matches!(t, DataType::Boolean | DataType::Date32 | DataType::Date64)
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*`: other characters become `_`, a leading digit gets a `_`
/// before it. None for an empty name.
pub fn sanitize_metric_name(name: &str) -> Option<String> {
    sanitize(name, true)
}

/// `[a-zA-Z_][a-zA-Z0-9_]*`, the same way.
pub fn sanitize_label_name(name: &str) -> Option<String> {
    sanitize(name, false)
}

fn sanitize(name: &str, colon: bool) -> Option<String> {
    if name.is_empty() {
        return None;
    }
    let mut out = String::with_capacity(name.len() + 1);
    if name.starts_with(|c: char| c.is_ascii_digit()) {
        out.push('_');
    }
    out.extend(name.chars().map(|c| {
        if c.is_ascii_alphanumeric() || c == '_' || (colon && c == ':') {
            c
        } else {
            '_'
        }
    }));
    Some(out)
}

/// Generated schemas and rows: column names and types a query may produce, values at the
/// edges of their types, nulls. A schema maps or is refused at CREATE; rows of one that maps
/// encode into a valid remote-write body; nothing panics. 100 000 rows per run.
#[cfg(test)]
mod generated {
    use std::sync::Arc;

    use arrow::array::{
        ArrayRef, BinaryArray, BooleanArray, Date32Array, Float32Array, Int32Array, Int64Array,
        LargeStringArray, TimestampNanosecondArray, TimestampSecondArray,
    };
    use arrow::datatypes::{Field, Schema};
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    use super::super::proto::{WriteRequest, append_series};
    use super::*;

    const ROWS: usize = 100_000;
    const NAMES: &[&str] = &[
        "value",
        "v",
        "n",
        "window_end",
        "window_start",
        "ts",
        "__name__",
        "device",
        "Device",
        "dev-ice",
        "1st",
        "é",
        "",
        "a b",
        "sum(v)",
    ];
    const TEXT: &[&str] = &["a", "", "up", "é", "1bad", "a:b", "x y", "__name__"];

    fn pick<T: Copy>(rng: &mut SmallRng, values: &[T]) -> T {
        values[rng.random_range(0..values.len())]
    }

    fn data_type(rng: &mut SmallRng) -> DataType {
        let types = [
            DataType::Int64,
            DataType::Int32,
            DataType::Float64,
            DataType::Float32,
            DataType::Boolean,
            DataType::Utf8,
            DataType::LargeUtf8,
            DataType::Date32,
            DataType::Binary,
            DataType::Timestamp(TimeUnit::Second, None),
            DataType::Timestamp(TimeUnit::Millisecond, None),
            DataType::Timestamp(TimeUnit::Nanosecond, None),
        ];
        types[rng.random_range(0..types.len())].clone()
    }

    /// `rows` values of `t`, a fifth of them null, the others often at an edge.
    fn column(rng: &mut SmallRng, t: &DataType, rows: usize) -> ArrayRef {
        let null = |rng: &mut SmallRng| rng.random_bool(0.2);
        macro_rules! values_of {
            ($array:ty, $edges:expr) => {{
                let values: Vec<_> = (0..rows)
                    .map(|_| (!null(rng)).then(|| pick(rng, &$edges)))
                    .collect();
                Arc::new(<$array>::from(values)) as ArrayRef
            }};
        }
        match t {
            DataType::Int64 => values_of!(Int64Array, [0, -1, i64::MAX, i64::MIN, 42]),
            DataType::Int32 => values_of!(Int32Array, [0, i32::MIN, i32::MAX, 7]),
            DataType::Float64 => values_of!(
                Float64Array,
                [
                    0.5,
                    f64::NAN,
                    f64::INFINITY,
                    -0.0,
                    f64::MAX,
                    f64::MIN_POSITIVE
                ]
            ),
            DataType::Float32 => values_of!(Float32Array, [1.5f32, f32::NAN, f32::NEG_INFINITY]),
            DataType::Boolean => values_of!(BooleanArray, [true, false]),
            DataType::Utf8 => values_of!(StringArray, TEXT),
            DataType::LargeUtf8 => values_of!(LargeStringArray, TEXT),
            DataType::Date32 => values_of!(Date32Array, [0, i32::MAX, i32::MIN, 20_454]),
            DataType::Binary => values_of!(BinaryArray, [b"\x00\xff".as_slice(), b"".as_slice()]),
            DataType::Timestamp(TimeUnit::Second, _) => values_of!(
                TimestampSecondArray,
                [0, i64::MAX, i64::MIN, 1_767_225_600, -1]
            ),
            DataType::Timestamp(TimeUnit::Nanosecond, _) => values_of!(
                TimestampNanosecondArray,
                [0, i64::MAX, i64::MIN, 1_767_225_600_000_000_000]
            ),
            _ => values_of!(
                TimestampMillisecondArray,
                [0, i64::MAX, i64::MIN, 1_767_225_600_000, -1]
            ),
        }
    }

    #[test]
    fn generated_schemas_map_or_are_refused_and_their_rows_encode() {
        let mut rng = SmallRng::seed_from_u64(21);
        let (mut rows_done, mut mapped, mut refused, mut samples) = (0, 0, 0, 0u64);
        while rows_done < ROWS {
            let fields: Vec<Field> = (0..rng.random_range(1..7))
                .map(|_| Field::new(pick(&mut rng, NAMES), data_type(&mut rng), true))
                .collect();
            let schema = Arc::new(Schema::new(fields));
            let prefix = pick(&mut rng, &["", "weir", "1bad", "a:b", "é", "x_"]);
            let timestamp = rng.random_bool(0.3).then(|| pick(&mut rng, NAMES));
            let labels = (0..rng.random_range(0..3))
                .map(|_| {
                    let name = pick(&mut rng, &["env", "__name__", "1x", "a-b", "", "job"]);
                    (name.to_string(), pick(&mut rng, TEXT).to_string())
                })
                .collect();
            let mapping = match Mapping::try_new(&schema, prefix, timestamp, labels) {
                Ok(mapping) => mapping,
                Err(e) => {
                    assert!(!e.to_string().is_empty());
                    refused += 1;
                    rows_done += 1;
                    continue;
                }
            };
            mapped += 1;
            for _ in 0..4 {
                let rows = rng.random_range(0..64);
                let columns = schema
                    .fields()
                    .iter()
                    .map(|f| column(&mut rng, f.data_type(), rows))
                    .collect();
                let batch = RecordBatch::try_new(schema.clone(), columns).expect("batch");
                let mut body = Vec::new();
                let mut emitted = 0u64;
                let encoded = mapping.encode(&batch, 1_767_225_600_000, |s| {
                    emitted += 1;
                    append_series(s.series, &mut body);
                });
                rows_done += rows;
                if let Err(e) = encoded {
                    panic!("a batch of a schema that maps is refused: {e}; {schema:?}");
                }
                let request: WriteRequest =
                    prost::Message::decode(body.as_slice()).expect("a valid WriteRequest");
                assert_eq!(request.timeseries.len() as u64, emitted);
                for series in &request.timeseries {
                    let names: Vec<&str> = series.labels.iter().map(|l| l.name.as_str()).collect();
                    assert!(
                        names.windows(2).all(|w| w[0] < w[1]),
                        "sorted, unique: {names:?}"
                    );
                    assert!(names.contains(&"__name__"), "{names:?}");
                    assert!(series.labels.iter().all(|l| !l.value.is_empty()));
                    assert_eq!(series.samples.len(), 1);
                }
                samples += emitted;
            }
        }
        println!(
            "{rows_done} generated rows: {mapped} schemas mapped, {refused} refused, \
             {samples} samples"
        );
        assert!(mapped > 0 && refused > 0 && samples > 0);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{BooleanArray, Int64Array, TimestampMillisecondArray};
    use arrow::datatypes::{Field, Schema};

    use super::super::proto::{WriteRequest, append_series};
    use super::*;

    fn schema(fields: Vec<Field>) -> SchemaRef {
        Arc::new(Schema::new(fields))
    }

    fn ts(name: &str) -> Field {
        Field::new(name, DataType::Timestamp(TimeUnit::Millisecond, None), true)
    }

    /// A sample as (labels, value, time).
    type Decoded = (Vec<(String, String)>, f64, i64);

    /// Every sample of `batch`, and how many were dropped.
    fn samples(mapping: &Mapping, batch: &RecordBatch) -> (Vec<Decoded>, u64) {
        let mut body = Vec::new();
        let dropped = mapping
            .encode(batch, 42, |s| append_series(s.series, &mut body))
            .expect("encode");
        let request: WriteRequest = prost::Message::decode(body.as_slice()).expect("decode");
        let samples = request
            .timeseries
            .into_iter()
            .map(|t| {
                let labels = t.labels.into_iter().map(|l| (l.name, l.value)).collect();
                (labels, t.samples[0].value, t.samples[0].timestamp)
            })
            .collect();
        (samples, dropped)
    }

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn numbers_become_series_text_becomes_sorted_labels_and_window_end_the_time() {
        let s = schema(vec![
            ts("window_start"),
            ts("window_end"),
            Field::new("region", DataType::Utf8, true),
            Field::new("Zone-Name", DataType::Utf8, true),
            Field::new("up", DataType::Boolean, true),
            Field::new("events", DataType::Int64, true),
            Field::new("avg speed", DataType::Float64, true),
        ]);
        let mapping =
            Mapping::try_new(&s, "vehicle", None, pairs(&[("env", "prod")])).expect("mapping");
        let batch = RecordBatch::try_new(
            s.clone(),
            vec![
                Arc::new(TimestampMillisecondArray::from(vec![0, 0])),
                Arc::new(TimestampMillisecondArray::from(vec![60_000, 120_000])),
                Arc::new(StringArray::from(vec![Some("north"), None])),
                Arc::new(StringArray::from(vec!["a", ""])),
                Arc::new(BooleanArray::from(vec![true, false])),
                Arc::new(Int64Array::from(vec![Some(3), None])),
                Arc::new(Float64Array::from(vec![1.5, 2.5])),
            ],
        )
        .expect("batch");
        let (samples, dropped) = samples(&mapping, &batch);
        assert_eq!(dropped, 0);
        assert_eq!(
            samples,
            vec![
                (
                    pairs(&[
                        ("Zone_Name", "a"),
                        ("__name__", "vehicle_events"),
                        ("env", "prod"),
                        ("region", "north"),
                        ("up", "true")
                    ]),
                    3.0,
                    60_000
                ),
                (
                    pairs(&[
                        ("Zone_Name", "a"),
                        ("__name__", "vehicle_avg_speed"),
                        ("env", "prod"),
                        ("region", "north"),
                        ("up", "true")
                    ]),
                    1.5,
                    60_000
                ),
                // NULL events: no sample; NULL and empty labels left out.
                (
                    pairs(&[
                        ("__name__", "vehicle_avg_speed"),
                        ("env", "prod"),
                        ("up", "false")
                    ]),
                    2.5,
                    120_000
                ),
            ]
        );
    }

    #[test]
    fn a_name_column_names_the_metric_and_bad_rows_are_counted() {
        let s = schema(vec![
            ts("t"),
            Field::new("__name__", DataType::Utf8, true),
            Field::new("v", DataType::Float64, true),
        ]);
        let mapping = Mapping::try_new(&s, "ignored", Some("T"), vec![]).expect("mapping");
        let batch = RecordBatch::try_new(
            s.clone(),
            vec![
                Arc::new(TimestampMillisecondArray::from(vec![
                    Some(5),
                    None,
                    Some(6),
                ])),
                Arc::new(StringArray::from(vec![
                    Some("http.requests"),
                    Some("x"),
                    None,
                ])),
                Arc::new(Float64Array::from(vec![1.0, 2.0, 3.0])),
            ],
        )
        .expect("batch");
        let (samples, dropped) = samples(&mapping, &batch);
        assert_eq!(
            samples,
            vec![(pairs(&[("__name__", "http_requests")]), 1.0, 5)]
        );
        assert_eq!(dropped, 2, "a NULL time and a NULL name");
    }

    #[test]
    fn mapping_errors_are_found_at_create() {
        let text_only = schema(vec![Field::new("a", DataType::Utf8, true)]);
        let err = Mapping::try_new(&text_only, "p", None, vec![]).expect_err("no numeric column");
        assert!(
            err.to_string().contains("at least one numeric column"),
            "{err}"
        );
        let s = schema(vec![ts("t"), Field::new("v", DataType::Int64, true)]);
        let err = Mapping::try_new(&s, "p", Some("nope"), vec![]).expect_err("unknown column");
        assert!(err.to_string().contains("'nope'"), "{err}");
        let err = Mapping::try_new(&s, "p", Some("v"), vec![]).expect_err("not a timestamp");
        assert!(err.to_string().contains("not a TIMESTAMP"), "{err}");
        let clash = schema(vec![
            Field::new("a-b", DataType::Utf8, true),
            Field::new("a_b", DataType::Utf8, true),
            Field::new("v", DataType::Int64, true),
        ]);
        let err = Mapping::try_new(&clash, "p", None, vec![]).expect_err("collision");
        assert!(err.to_string().contains("'a_b'"), "{err}");
        let err = Mapping::try_new(&s, "p", None, pairs(&[("v", "x"), ("bad-name", "y")]))
            .expect_err("bad constant label");
        assert!(err.to_string().contains("labels.bad-name"), "{err}");
        let s = schema(vec![Field::new("v", DataType::Int64, true)]);
        assert_eq!(
            Mapping::try_new(&s, "p", None, vec![]).expect("ok").time(),
            Time::Processing
        );
    }

    #[test]
    fn names_are_sanitized_to_the_spec() {
        assert_eq!(sanitize_metric_name("a.b:c-d").as_deref(), Some("a_b:c_d"));
        assert_eq!(sanitize_metric_name("9lives").as_deref(), Some("_9lives"));
        assert_eq!(sanitize_label_name("a:b").as_deref(), Some("a_b"));
        assert_eq!(sanitize_label_name(""), None);
    }
}
