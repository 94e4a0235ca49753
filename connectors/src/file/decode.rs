//! [`BlockDecoder`]: whole lines of NDJSON or CSV to Arrow batches, isolating bad records.

use std::borrow::Cow;

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
    /// 0-based line number within the block.
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
    /// whole fails, each line is tried alone so that every good record still arrives.
    pub fn decode_block(&mut self, block: &[u8]) -> Result<(Vec<RecordBatch>, Vec<BadRecord>)> {
        let block: Cow<'_, [u8]> = if block.last().is_some_and(|&b| b != b'\n') {
            let mut owned = block.to_vec();
            owned.push(b'\n');
            Cow::Owned(owned)
        } else {
            Cow::Borrowed(block)
        };
        match self.decode(&block) {
            Ok(batches) => Ok((batches, Vec::new())),
            Err(_) => self.decode_line_by_line(&block),
        }
    }

    fn decode_line_by_line(&self, block: &[u8]) -> Result<(Vec<RecordBatch>, Vec<BadRecord>)> {
        let mut good = Vec::with_capacity(block.len());
        let mut bad = Vec::new();
        for (i, line) in block.split(|&b| b == b'\n').enumerate() {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.iter().all(|b| b.is_ascii_whitespace()) {
                continue;
            }
            let mut one = line.to_vec();
            one.push(b'\n');
            let failure = match std::str::from_utf8(line) {
                Err(e) => Some(Failure {
                    reason: "utf8",
                    error: ArrowError::ParseError(e.to_string()),
                }),
                Ok(_) => self.decode(&one).err(),
            };
            match failure {
                None => good.extend_from_slice(&one),
                Some(f) => bad.push(BadRecord {
                    line_in_block: i as u64,
                    reason: f.reason,
                    error: f.error.to_string(),
                    bytes: line.to_vec(),
                }),
            }
        }
        // Every line here decoded alone, so together they decode too.
        let batches = self.decode(&good).map_err(|f| {
            weir_runtime::Error::Internal(format!(
                "records that decoded alone failed together: {}",
                f.error
            ))
        })?;
        Ok((batches, bad))
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

    fn rows(batches: &[RecordBatch]) -> usize {
        batches.iter().map(|b| b.num_rows()).sum()
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
