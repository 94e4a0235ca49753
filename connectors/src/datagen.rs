//! The `datagen` source: a deterministic vehicle-telemetry generator.
//!
//! Every value is a pure function of (`seed`, column name, row number), so the same seed
//! gives the same rows whatever the batch boundaries, pacing or column subset. Columns named
//! like the vehicle model get its values; any other declared column gets random values of its
//! type (as Flink's datagen does).
//!
//! | column | values |
//! |---|---|
//! | `vehicle_id` | 1 ..= `cardinality` |
//! | `ts` | `start_time` (default: when the stream was created) + row × (1 s / `rows_per_second`); 1 ms apart when unpaced |
//! | `speed_kmh` | 0.0 – 179.9 |
//! | `engine_temp` | 60.0 – 119.9 |
//! | `fuel_level` | 0.0 – 99.9 |
//! | `lat`, `lon` | 47 – 55, 5 – 15 |
//! | `status` | `driving` (70 %), `idle` (20 %), `parked` (10 %) |

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{
    ArrayRef, BooleanArray, Date32Array, Float64Array, Int64Array, StringArray,
    TimestampMillisecondArray,
};
use arrow::compute::cast;
use arrow::datatypes::{DataType, SchemaRef};
use arrow::record_batch::{RecordBatch, RecordBatchOptions};
use async_trait::async_trait;
use weir_runtime::connector::{ConnectorError, SourceFactory};
use weir_runtime::{Message, Result, Source, SourceContext, SourceExit};
use weir_sql::Options;

/// Rows per batch when generating as fast as possible.
const MAX_BATCH_ROWS: u64 = 8192;

/// Validated `datagen` options.
#[derive(Debug, Clone)]
pub struct DatagenFactory {
    schema: SchemaRef,
    /// 0 = as fast as possible.
    rows_per_second: u64,
    cardinality: u64,
    seed: u64,
    max_rows: Option<u64>,
    /// Event time of row 0, ms since the epoch: `start_time`, or the wall clock when the stream
    /// was created, so every pipeline reading the stream sees the same rows.
    start_time: i64,
    event_time: Option<(usize, i64)>,
}

impl DatagenFactory {
    pub fn try_new(schema: SchemaRef, options: &Options) -> Result<Self, ConnectorError> {
        let reader = options.reader();
        reader.string("connector");
        let rows_per_second = reader.u64("rows_per_second")?.unwrap_or(1000);
        let cardinality = reader.u64("cardinality")?.unwrap_or(1000);
        let seed = reader.u64("seed")?.unwrap_or(0);
        let max_rows = reader.u64("max_rows")?;
        let start_time = match reader.string("start_time") {
            Some(text) => parse_start_time(text).ok_or_else(|| {
                weir_sql::options::OptionError::new(
                    "start_time",
                    format!("invalid value '{text}' for option 'start_time': expected an RFC 3339 timestamp such as '2026-01-01T00:00:00Z'"),
                )
            })?,
            None => chrono::Utc::now().timestamp_millis(),
        };
        reader.finish()?;
        if cardinality == 0 {
            return Err(ConnectorError::Option(weir_sql::options::OptionError::new(
                "cardinality",
                "option 'cardinality' must be at least 1",
            )));
        }
        for field in schema.fields() {
            if !is_supported(field.data_type()) {
                return Err(ConnectorError::NotSupported(format!(
                    "datagen values for column '{}' of type {}",
                    field.name(),
                    field.data_type()
                )));
            }
        }
        Ok(Self {
            schema,
            rows_per_second,
            cardinality,
            seed,
            max_rows,
            start_time,
            event_time: None,
        })
    }

    /// The stream's WATERMARK (event-time column index, delay): watermarks follow the
    /// batches that advance it.
    pub fn with_event_time(mut self, event_time: Option<(usize, i64)>) -> Self {
        self.event_time = event_time;
        self
    }
}

fn parse_start_time(text: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.timestamp_millis())
}

fn is_supported(data_type: &DataType) -> bool {
    data_type.is_numeric()
        || matches!(
            data_type,
            DataType::Utf8
                | DataType::LargeUtf8
                | DataType::Utf8View
                | DataType::Boolean
                | DataType::Timestamp(_, _)
                | DataType::Date32
                | DataType::Date64
        )
}

impl SourceFactory for DatagenFactory {
    fn connector(&self) -> &'static str {
        "datagen"
    }

    fn is_bounded(&self) -> bool {
        self.max_rows.is_some()
    }

    fn create(&self) -> Result<Box<dyn Source>> {
        Ok(Box::new(DatagenSource {
            config: self.clone(),
            generator: Generator::new(self.seed, self.cardinality, &self.schema),
            next_row: 0,
        }))
    }
}

/// One running generator.
#[derive(Debug)]
pub struct DatagenSource {
    config: DatagenFactory,
    generator: Generator,
    /// The next row to generate (restored from a checkpoint, or 0).
    next_row: u64,
}

/// Where a datagen source resumes: the next row, and the event time of row 0 (a restarted
/// stream is created again, at another wall-clock time; its rows must not change).
#[derive(serde::Serialize, serde::Deserialize)]
struct Position {
    next_row: u64,
    start_time: i64,
}

#[async_trait]
impl Source for DatagenSource {
    async fn run(&mut self, ctx: &mut SourceContext) -> Result<SourceExit> {
        if let Some((column, delay_ms)) = self.config.event_time {
            ctx.track_event_time(column, delay_ms);
        }
        let rps = self.config.rows_per_second;
        let start_time = self.config.start_time;
        let batch_rows = if rps == 0 {
            MAX_BATCH_ROWS
        } else {
            (rps / 10).clamp(1, MAX_BATCH_ROWS)
        };
        let started = Instant::now();
        let first = self.next_row;
        let mut row = first;
        loop {
            if let Some(barrier) = ctx.barrier_due() {
                let position = Position {
                    next_row: row,
                    start_time,
                };
                let position = serde_json::to_value(position)
                    .map_err(|e| weir_runtime::Error::Internal(format!("datagen position: {e}")))?;
                if !ctx
                    .emit_barrier(barrier, weir_runtime::Snapshot::meta(position))
                    .await
                {
                    return Ok(SourceExit::Stopped);
                }
            }
            let mut n = batch_rows;
            if let Some(max) = self.config.max_rows {
                if row >= max {
                    return Ok(SourceExit::Finished);
                }
                n = n.min(max - row);
            }
            if rps > 0 {
                // Pace: row `row` is due at (row - first) / rps seconds after the start.
                let due = Duration::from_secs_f64((row - first) as f64 / rps as f64);
                if let Some(wait) = due.checked_sub(started.elapsed())
                    && !ctx.sleep(wait).await
                {
                    return Ok(SourceExit::Stopped);
                }
            }
            let batch = self
                .generator
                .batch(&self.config.schema, row, n, start_time, rps)?;
            if !ctx.emit(Message::Data(batch)).await {
                return Ok(SourceExit::Stopped);
            }
            row += n;
        }
    }

    async fn restore(&mut self, position: weir_runtime::Snapshot) -> Result<()> {
        let position: Position = serde_json::from_value(position.meta).map_err(|e| {
            weir_runtime::Error::Execution(format!("datagen position is unreadable: {e}"))
        })?;
        self.next_row = position.next_row;
        self.config.start_time = position.start_time;
        Ok(())
    }
}

/// Pure, vectorized value generation.
#[derive(Debug)]
struct Generator {
    cardinality: u64,
    /// Per column: the hash key mixed with the row number.
    column_keys: Vec<u64>,
}

impl Generator {
    fn new(seed: u64, cardinality: u64, schema: &SchemaRef) -> Self {
        let column_keys = schema
            .fields()
            .iter()
            .map(|f| splitmix64(seed ^ fnv1a(f.name().as_bytes())))
            .collect();
        Self {
            cardinality,
            column_keys,
        }
    }

    fn batch(
        &self,
        schema: &SchemaRef,
        first: u64,
        n: u64,
        start_time: i64,
        rows_per_second: u64,
    ) -> Result<RecordBatch> {
        let rows = first..first + n;
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
        for (field, &key) in schema.fields().iter().zip(&self.column_keys) {
            let hash = |row: u64| splitmix64(key ^ row.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let unit = |row: u64, modulo: u64| (hash(row) % modulo) as f64;
            let event_time = |row: u64| {
                let offset = match rows_per_second {
                    0 => row as i64,
                    rps => (row as i128 * 1000 / rps as i128) as i64,
                };
                start_time + offset
            };
            let model: Option<ArrayRef> = match field.name().as_str() {
                "vehicle_id" => Some(Arc::new(Int64Array::from_iter_values(
                    rows.clone()
                        .map(|r| 1 + (hash(r) % self.cardinality) as i64),
                ))),
                "ts" => Some(Arc::new(TimestampMillisecondArray::from_iter_values(
                    rows.clone().map(event_time),
                ))),
                "speed_kmh" => Some(Arc::new(Float64Array::from_iter_values(
                    rows.clone().map(|r| unit(r, 1800) / 10.0),
                ))),
                "engine_temp" => Some(Arc::new(Float64Array::from_iter_values(
                    rows.clone().map(|r| 60.0 + unit(r, 600) / 10.0),
                ))),
                "fuel_level" => Some(Arc::new(Float64Array::from_iter_values(
                    rows.clone().map(|r| unit(r, 1000) / 10.0),
                ))),
                "lat" => Some(Arc::new(Float64Array::from_iter_values(
                    rows.clone().map(|r| 47.0 + unit(r, 800_000) / 100_000.0),
                ))),
                "lon" => Some(Arc::new(Float64Array::from_iter_values(
                    rows.clone().map(|r| 5.0 + unit(r, 1_000_000) / 100_000.0),
                ))),
                "status" => Some(Arc::new(StringArray::from_iter_values(rows.clone().map(
                    |r| match hash(r) % 10 {
                        0..=6 => "driving",
                        7 | 8 => "idle",
                        _ => "parked",
                    },
                )))),
                _ => None,
            };
            let array: ArrayRef = match model {
                Some(array) => array,
                None => match field.data_type() {
                    DataType::Boolean => Arc::new(BooleanArray::from_iter(
                        rows.clone().map(|r| Some(hash(r) & 1 == 1)),
                    )),
                    DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => Arc::new(
                        StringArray::from_iter_values(rows.clone().map(|r| random_word(hash(r)))),
                    ),
                    DataType::Timestamp(_, _) | DataType::Date64 => Arc::new(
                        TimestampMillisecondArray::from_iter_values(rows.clone().map(event_time)),
                    ),
                    DataType::Date32 => Arc::new(Date32Array::from_iter_values(
                        rows.clone().map(|r| (event_time(r) / 86_400_000) as i32),
                    )),
                    t if t.is_floating()
                        || matches!(t, DataType::Decimal128(..) | DataType::Decimal256(..)) =>
                    {
                        Arc::new(Float64Array::from_iter_values(
                            rows.clone().map(|r| unit(r, 100_000) / 100.0),
                        ))
                    }
                    _ => Arc::new(Int64Array::from_iter_values(
                        rows.clone().map(|r| (hash(r) % 100) as i64),
                    )),
                },
            };
            let array = if array.data_type() == field.data_type() {
                array
            } else {
                cast(&array, field.data_type())?
            };
            columns.push(array);
        }
        let options = RecordBatchOptions::new().with_row_count(Some(n as usize));
        Ok(RecordBatch::try_new_with_options(
            schema.clone(),
            columns,
            &options,
        )?)
    }
}

fn random_word(hash: u64) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    (0..8)
        .map(|i| ALPHABET[((hash >> (i * 6)) % ALPHABET.len() as u64) as usize] as char)
        .collect()
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::{Field, Schema, TimeUnit};

    fn schema(fields: Vec<Field>) -> SchemaRef {
        Arc::new(Schema::new(fields))
    }

    #[test]
    fn same_seed_same_rows_whatever_the_batching() {
        let s = schema(vec![
            Field::new("vehicle_id", DataType::Int64, false),
            Field::new("speed_kmh", DataType::Float64, false),
            Field::new("status", DataType::Utf8, false),
        ]);
        let g = Generator::new(7, 100, &s);
        let whole = g.batch(&s, 0, 10, 0, 0).expect("batch");
        let first = g.batch(&s, 0, 4, 0, 0).expect("batch");
        let rest = g.batch(&s, 4, 6, 0, 0).expect("batch");
        let joined = arrow::compute::concat_batches(&s, &[first, rest]).expect("concat");
        assert_eq!(whole, joined);
        let other_seed = Generator::new(8, 100, &s)
            .batch(&s, 0, 10, 0, 0)
            .expect("batch");
        assert_ne!(whole, other_seed);
    }

    #[test]
    fn values_stay_in_the_model_ranges() {
        let s = schema(vec![
            Field::new("vehicle_id", DataType::Int64, false),
            Field::new("speed_kmh", DataType::Float64, false),
        ]);
        let batch = Generator::new(1, 50, &s)
            .batch(&s, 0, 5000, 0, 0)
            .expect("batch");
        let ids = batch
            .column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .expect("i64");
        assert!(ids.values().iter().all(|v| (1..=50).contains(v)));
        let speeds = batch
            .column(1)
            .as_any()
            .downcast_ref::<Float64Array>()
            .expect("f64");
        assert!(speeds.values().iter().all(|v| (0.0..180.0).contains(v)));
    }

    #[test]
    fn other_columns_get_values_of_their_declared_type() {
        let s = schema(vec![
            Field::new("flag", DataType::Boolean, false),
            Field::new("n", DataType::Int32, false),
            Field::new("x", DataType::Float32, false),
            Field::new(
                "at",
                DataType::Timestamp(TimeUnit::Microsecond, None),
                false,
            ),
        ]);
        let batch = Generator::new(0, 10, &s)
            .batch(&s, 0, 3, 1_000, 1000)
            .expect("batch");
        assert_eq!(batch.schema(), s);
    }

    #[test]
    fn unknown_options_are_refused() {
        let options = Options::try_from_pairs(vec![
            ("connector".to_string(), "datagen".to_string()),
            ("rows_per_sec".to_string(), "5".to_string()),
        ])
        .expect("options");
        let err = DatagenFactory::try_new(schema(vec![]), &options).expect_err("typo");
        assert!(err.to_string().contains("rows_per_sec"), "{err}");
    }
}
