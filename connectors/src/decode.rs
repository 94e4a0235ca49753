//! [`BlockDecoder`]: NDJSON or CSV (lines of a file, or Kafka messages) to Arrow batches with
//! arrow's vectorized decoders, isolating the records that do not decode.

use std::borrow::Cow;
use std::ops::Range;

use arrow::datatypes::SchemaRef;
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use weir_runtime::Result;

/// The text format of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per line.
    Json,
    Csv {
        header: bool,
        delimiter: u8,
    },
}

/// A record that did not decode.
#[derive(Debug, Clone)]
pub struct BadRecord {
    /// 0-based line number within the block (record index for `decode_records`).
    pub line_in_block: u64,
    /// `json`, `csv` (syntax) or `schema` (a value that does not fit its column).
    pub reason: &'static str,
    pub error: String,
    pub bytes: Vec<u8>,
}

/// Decodes blocks of whole lines with arrow's vectorized decoders.
#[derive(Debug)]
pub struct BlockDecoder {
    schema: SchemaRef,
    format: Format,
    batch_rows: usize,
}

/// Why a decode failed: the stage tells the reason.
struct Failure {
    reason: &'static str,
    error: ArrowError,
}

impl BlockDecoder {
    pub fn new(schema: SchemaRef, format: Format, batch_rows: usize) -> Self {
        Self {
            schema,
            format,
            batch_rows,
        }
    }

    /// Decodes `block` (whole lines; the header, if any, already removed). When the block as a
    /// whole fails, its lines are decoded as records, so that every good one still arrives.
    pub fn decode_block(&mut self, block: &[u8]) -> Result<(Vec<RecordBatch>, Vec<BadRecord>)> {
        let block: Cow<'_, [u8]> = if block.last().is_some_and(|&b| b != b'\n') {
            let mut owned = block.to_vec();
            owned.push(b'\n');
            Cow::Owned(owned)
        } else {
            Cow::Borrowed(block)
        };
        if let Ok(batches) = self.decode(&block) {
            return Ok((batches, Vec::new()));
        }
        // Line ranges without their newline; blank lines are no records.
        let mut lines = Vec::new();
        let mut line_numbers = Vec::new();
        let mut start = 0;
        for (i, line) in block.split(|&b| b == b'\n').enumerate() {
            let end = start + line.len();
            if end < block.len() && !line.iter().all(|b| b.is_ascii_whitespace()) {
                lines.push(start..end);
                line_numbers.push(i as u64);
            }
            start = end + 1;
        }
        let decoded = self.decode_records(&block, &lines)?;
        let bad = decoded
            .bad
            .into_iter()
            .map(|mut b| {
                b.line_in_block = line_numbers[b.line_in_block as usize];
                b
            })
            .collect();
        Ok((decoded.batches.into_iter().map(|(_, b)| b).collect(), bad))
    }

    /// Decodes the records at `records` in `block` (each followed by a newline in `block`),
    /// one row per record. Runs of records that decode together become one batch each; a run
    /// that fails is split in halves until the bad records are alone, so a few bad records
    /// among thousands cost a few extra passes, not one decode per record. In the result a
    /// bad record's `line_in_block` is its index in `records`.
    pub fn decode_records(&self, block: &[u8], records: &[Range<usize>]) -> Result<Decoded> {
        let mut decoded = Decoded::default();
        // A stack of runs of record indices still to decode, the whole input first.
        let mut pending: Vec<Range<usize>> = Vec::new();
        pending.push(0..records.len());
        while let Some(run) = pending.pop() {
            if run.is_empty() {
                continue;
            }
            let bytes = &block[records[run.start].start..records[run.end - 1].end + 1];
            let failure = match self.decode(bytes) {
                Ok(batches) if rows(&batches) == run.len() => {
                    let batch = match batches.as_slice() {
                        [one] => one.clone(),
                        _ => arrow::compute::concat_batches(&self.schema, &batches)?,
                    };
                    decoded.batches.push((run, batch));
                    continue;
                }
                Ok(batches) => Failure {
                    reason: "json",
                    error: ArrowError::ParseError(format!(
                        "expected one record, found {}",
                        rows(&batches)
                    )),
                },
                Err(failure) => failure,
            };
            if run.len() == 1 {
                let record = &block[records[run.start].clone()];
                let failure = match std::str::from_utf8(record) {
                    Err(e) => Failure {
                        reason: "utf8",
                        error: ArrowError::ParseError(e.to_string()),
                    },
                    Ok(_) => failure,
                };
                decoded.bad.push(BadRecord {
                    line_in_block: run.start as u64,
                    reason: failure.reason,
                    error: failure.error.to_string(),
                    bytes: record.strip_suffix(b"\r").unwrap_or(record).to_vec(),
                });
            } else {
                // Later half first on the stack, so runs come out in record order.
                let mid = run.start + run.len() / 2;
                pending.push(mid..run.end);
                pending.push(run.start..mid);
            }
        }
        decoded.bad.sort_by_key(|b| b.line_in_block);
        Ok(decoded)
    }

    fn decode(&self, block: &[u8]) -> Result<Vec<RecordBatch>, Failure> {
        match self.format {
            Format::Json => {
                let decoder = arrow::json::ReaderBuilder::new(self.schema.clone())
                    .with_batch_size(self.batch_rows)
                    .with_strict_mode(false)
                    .build_decoder()
                    .map_err(|error| Failure {
                        reason: "schema",
                        error,
                    })?;
                drive(block, JsonDecoder(decoder), "json")
            }
            Format::Csv { delimiter, .. } => {
                let decoder = arrow::csv::ReaderBuilder::new(self.schema.clone())
                    .with_header(false)
                    .with_delimiter(delimiter)
                    .with_batch_size(self.batch_rows)
                    .build_decoder();
                drive(block, CsvDecoder(decoder), "csv")
            }
        }
    }
}

/// What [`BlockDecoder::decode_records`] made of a run of records.
#[derive(Debug, Default)]
pub struct Decoded {
    /// Batches in record order, each with the indices of the records it holds.
    pub batches: Vec<(Range<usize>, RecordBatch)>,
    /// The records that did not decode, in order.
    pub bad: Vec<BadRecord>,
}

fn rows(batches: &[RecordBatch]) -> usize {
    batches.iter().map(|b| b.num_rows()).sum()
}

/// The two arrow decoders share this shape.
trait PushDecoder {
    fn decode(&mut self, buf: &[u8]) -> Result<usize, ArrowError>;
    fn flush(&mut self) -> Result<Option<RecordBatch>, ArrowError>;
}

struct JsonDecoder(arrow::json::reader::Decoder);
struct CsvDecoder(arrow::csv::reader::Decoder);

impl PushDecoder for JsonDecoder {
    fn decode(&mut self, buf: &[u8]) -> Result<usize, ArrowError> {
        self.0.decode(buf)
    }
    fn flush(&mut self) -> Result<Option<RecordBatch>, ArrowError> {
        self.0.flush()
    }
}

impl PushDecoder for CsvDecoder {
    fn decode(&mut self, buf: &[u8]) -> Result<usize, ArrowError> {
        self.0.decode(buf)
    }
    fn flush(&mut self) -> Result<Option<RecordBatch>, ArrowError> {
        self.0.flush()
    }
}

fn drive(
    block: &[u8],
    mut decoder: impl PushDecoder,
    syntax: &'static str,
) -> Result<Vec<RecordBatch>, Failure> {
    let mut batches = Vec::new();
    let mut offset = 0;
    loop {
        let read = decoder.decode(&block[offset..]).map_err(|error| Failure {
            reason: syntax,
            error,
        })?;
        offset += read;
        let flushed = decoder.flush().map_err(|error| Failure {
            reason: "schema",
            error,
        })?;
        let done = offset >= block.len();
        match flushed {
            Some(batch) => batches.push(batch),
            None if read == 0 || done => break,
            None => {}
        }
        if done && read == 0 {
            break;
        }
    }
    Ok(batches)
}

/// Generated blocks: records of every type Weir declares, at the edges of their values, with
/// bytes flipped, dropped, inserted and cut. 100 000 records per format per run.
#[cfg(test)]
mod generated {
    use std::sync::Arc;

    use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    const RECORDS: usize = 100_000;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, false),
            Field::new("n", DataType::Int32, true),
            Field::new("v", DataType::Float64, true),
            Field::new("s", DataType::Utf8, true),
            Field::new("ok", DataType::Boolean, true),
            Field::new("ts", DataType::Timestamp(TimeUnit::Millisecond, None), true),
            Field::new("day", DataType::Date32, true),
        ]))
    }

    fn pick<'a>(rng: &mut SmallRng, values: &[&'a str]) -> &'a str {
        values[rng.random_range(0..values.len())]
    }

    /// One record's values, as text: most of them ordinary, one in seven at an edge of its
    /// type (or past it).
    fn values(rng: &mut SmallRng) -> [String; 7] {
        let int = [
            "0",
            "-1",
            "9223372036854775807",
            "9223372036854775808",
            "-9223372036854775809",
            "1e3",
            "007",
        ];
        let float = ["-0.0", "1e308", "1e400", "NaN", "-inf", ".5"];
        let text = ["", "é", "\\u0000", "tab\\t", "\\ud800"];
        let boolean = ["1", "TRUE", "null"];
        let ts = [
            "2026-01-01 00:00:00.123",
            "1767225600000",
            "99999-12-31T00:00:00Z",
            "-1",
            "2026-13-45T99:00:00Z",
        ];
        let day = ["0000-01-01", "2026-02-30", "20260101"];
        let edge = |rng: &mut SmallRng, ordinary: String, edges: &[&str]| {
            if rng.random_bool(1.0 / 7.0) {
                pick(rng, edges).to_string()
            } else {
                ordinary
            }
        };
        let minute = rng.random_range(0..60);
        let k = rng.random_range(i64::MIN..=i64::MAX).to_string();
        let n = rng.random_range(-1000..1000).to_string();
        let v = format!("{:.3}", rng.random_range(-1e6..1e6));
        let ok = rng.random_bool(0.5).to_string();
        [
            k,
            edge(rng, n, &int),
            edge(rng, v, &float),
            edge(rng, "sensor".to_string(), &text),
            edge(rng, ok, &boolean),
            edge(rng, format!("2026-01-01T00:{minute:02}:00Z"), &ts),
            edge(rng, format!("2026-01-{:02}", minute % 28 + 1), &day),
        ]
    }

    fn json_record(rng: &mut SmallRng) -> Vec<u8> {
        let [k, n, v, s, ok, ts, day] = values(rng);
        let mut fields = vec![
            format!("\"k\":{k}"),
            format!("\"n\":{n}"),
            format!("\"v\":{v}"),
            format!("\"s\":\"{s}\""),
            format!("\"ok\":{ok}"),
            format!("\"ts\":\"{ts}\""),
            format!("\"day\":\"{day}\""),
        ];
        match rng.random_range(0..6) {
            0 => fields.push("\"extra\":{\"nested\":[1,2,{\"x\":null}]}".into()),
            1 => {
                let i = rng.random_range(0..fields.len());
                fields.remove(i);
            }
            2 => fields.push("\"v\":null".into()),
            _ => {}
        }
        format!("{{{}}}", fields.join(",")).into_bytes()
    }

    fn csv_record(rng: &mut SmallRng) -> Vec<u8> {
        let [k, n, v, s, ok, ts, day] = values(rng);
        let s = if rng.random_bool(0.2) {
            format!("\"{s},\"\"quoted\"\"\"")
        } else {
            s
        };
        [k, n, v, s, ok, ts, day].join(",").into_bytes()
    }

    /// `record` with a few bytes flipped, dropped or inserted, or cut short; never a newline,
    /// never blank.
    fn mangle(rng: &mut SmallRng, mut record: Vec<u8>) -> Vec<u8> {
        for _ in 0..rng.random_range(0..4) {
            if record.is_empty() {
                break;
            }
            let at = rng.random_range(0..record.len());
            match rng.random_range(0..4) {
                0 => record[at] ^= 1 << rng.random_range(0..8),
                1 => {
                    record.remove(at);
                }
                2 => record.insert(at, rng.random()),
                _ => record.truncate(at),
            }
        }
        for b in &mut record {
            if matches!(*b, b'\n' | b'\r') {
                *b = b' ';
            }
        }
        if record.iter().all(u8::is_ascii_whitespace) {
            record.push(b'x');
        }
        record
    }

    /// Blocks of 1 to 63 records, a fifth of them mangled: every record comes out as one row
    /// or one dead letter holding its bytes, and nothing panics.
    fn run(format: Format, record: fn(&mut SmallRng) -> Vec<u8>, seed: u64) {
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut decoder = BlockDecoder::new(schema(), format, 16);
        let (mut done, mut good, mut bad_total) = (0, 0, 0);
        while done < RECORDS {
            let n = rng.random_range(1..64);
            let records: Vec<Vec<u8>> = (0..n)
                .map(|_| {
                    let r = record(&mut rng);
                    if rng.random_bool(0.2) {
                        mangle(&mut rng, r)
                    } else {
                        r
                    }
                })
                .collect();
            let mut block = Vec::new();
            let mut ranges = Vec::new();
            for r in &records {
                ranges.push(block.len()..block.len() + r.len());
                block.extend_from_slice(r);
                block.push(b'\n');
            }
            let decoded = decoder
                .decode_records(&block, &ranges)
                .unwrap_or_else(|e| panic!("records {:?}: {e}", String::from_utf8_lossy(&block)));
            let rows: usize = decoded.batches.iter().map(|(_, b)| b.num_rows()).sum();
            assert_eq!(
                rows + decoded.bad.len(),
                n,
                "one row or one dead letter per record: {:?}",
                String::from_utf8_lossy(&block)
            );
            for bad in &decoded.bad {
                assert_eq!(
                    bad.bytes, records[bad.line_in_block as usize],
                    "a dead letter holds its record"
                );
            }
            // The file source's path: the block as a whole first.
            let (_, bad) = decoder
                .decode_block(&block)
                .unwrap_or_else(|e| panic!("block {:?}: {e}", String::from_utf8_lossy(&block)));
            for b in &bad {
                assert_eq!(b.bytes, records[b.line_in_block as usize]);
            }
            done += n;
            good += rows;
            bad_total += decoded.bad.len();
        }
        println!("{format:?}: {done} generated records, {good} rows, {bad_total} dead letters");
        assert!(
            good > 0 && bad_total > 0,
            "the generator reaches both outcomes"
        );
    }

    #[test]
    fn generated_ndjson_records_are_rows_or_dead_letters() {
        run(Format::Json, json_record, 11);
    }

    #[test]
    fn generated_csv_records_are_rows_or_dead_letters() {
        run(
            Format::Csv {
                header: false,
                delimiter: b',',
            },
            csv_record,
            12,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, false),
            Field::new("v", DataType::Float64, true),
        ]))
    }

    #[test]
    fn good_ndjson_decodes_in_one_pass() {
        let mut d = BlockDecoder::new(schema(), Format::Json, 2);
        let (batches, bad) = d
            .decode_block(b"{\"k\":1,\"v\":1.5}\n{\"k\":2}\n{\"k\":3,\"v\":2}")
            .expect("ok");
        assert_eq!(rows(&batches), 3);
        assert!(bad.is_empty());
    }

    #[test]
    fn bad_ndjson_lines_are_isolated() {
        let mut d = BlockDecoder::new(schema(), Format::Json, 1024);
        let block = b"{\"k\":1}\n{not json\n{\"k\":2,\"v\":\"fast\"}\n{\"v\":1.0}\n\n{\"k\":3}\n";
        let (batches, bad) = d.decode_block(block).expect("ok");
        assert_eq!(rows(&batches), 2, "k=1 and k=3 arrive");
        let reasons: Vec<(u64, &str)> = bad.iter().map(|b| (b.line_in_block, b.reason)).collect();
        assert_eq!(reasons, vec![(1, "json"), (2, "schema"), (3, "schema")]);
    }

    #[test]
    fn bad_csv_lines_are_isolated() {
        let mut d = BlockDecoder::new(
            schema(),
            Format::Csv {
                header: false,
                delimiter: b',',
            },
            1024,
        );
        let (batches, bad) = d.decode_block(b"1,2.5\n2,abc\n3\n4,\n").expect("ok");
        assert_eq!(rows(&batches), 2, "rows 1 and 4 arrive");
        assert_eq!(bad.len(), 2);
        assert_eq!(bad[0].line_in_block, 1);
    }
}
