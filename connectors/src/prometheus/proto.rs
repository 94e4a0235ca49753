//! The remote-write 1.0 wire format: `prometheus.WriteRequest` (protobuf), snappy-compressed
//! in the *block* format.
//!
//! The sink encodes each time series straight into bytes ([`SeriesWriter`]): a request body
//! is then the concatenation of its series, with no per-sample allocation. The prost
//! messages below decode those bytes (tests, the benchmark's receiver) and are the
//! reference the hand encoding is tested against.

use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};

/// `message WriteRequest { repeated TimeSeries timeseries = 1; }`
#[derive(Clone, PartialEq, prost::Message)]
pub struct WriteRequest {
    #[prost(message, repeated, tag = "1")]
    pub timeseries: Vec<TimeSeries>,
}

/// `message TimeSeries { repeated Label labels = 1; repeated Sample samples = 2; }`
#[derive(Clone, PartialEq, prost::Message)]
pub struct TimeSeries {
    #[prost(message, repeated, tag = "1")]
    pub labels: Vec<Label>,
    #[prost(message, repeated, tag = "2")]
    pub samples: Vec<Sample>,
}

/// `message Label { string name = 1; string value = 2; }`
#[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
pub struct Label {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

/// `message Sample { double value = 1; int64 timestamp = 2; }` (milliseconds)
#[derive(Clone, PartialEq, prost::Message)]
pub struct Sample {
    #[prost(double, tag = "1")]
    pub value: f64,
    #[prost(int64, tag = "2")]
    pub timestamp: i64,
}

/// Decodes a snappy-compressed `WriteRequest` body.
pub fn decode_body(body: &[u8]) -> Result<WriteRequest, String> {
    let raw = snap::raw::Decoder::new()
        .decompress_vec(body)
        .map_err(|e| format!("snappy: {e}"))?;
    prost::Message::decode(raw.as_slice()).map_err(|e| format!("protobuf: {e}"))
}

/// Encodes one `TimeSeries` message (its fields, without the enclosing tag and length).
///
/// `label` must be called in label-name order; `finish` writes the one sample.
pub struct SeriesWriter<'a> {
    out: &'a mut Vec<u8>,
}

impl<'a> SeriesWriter<'a> {
    pub fn new(out: &'a mut Vec<u8>) -> Self {
        Self { out }
    }

    pub fn label(&mut self, name: &[u8], value: &[u8]) {
        let len = field_len(1, name.len()) + field_len(2, value.len());
        encode_key(1, WireType::LengthDelimited, self.out);
        encode_varint(len as u64, self.out);
        bytes_field(1, name, self.out);
        bytes_field(2, value, self.out);
    }

    pub fn finish(self, value: f64, timestamp_ms: i64) {
        // value (fixed64) and timestamp (varint); proto3 leaves out a field at its default.
        let mut len = 0;
        if value.to_bits() != 0 {
            len += 1 + 8;
        }
        if timestamp_ms != 0 {
            len += 1 + encoded_len_varint(timestamp_ms as u64);
        }
        encode_key(2, WireType::LengthDelimited, self.out);
        encode_varint(len as u64, self.out);
        if value.to_bits() != 0 {
            encode_key(1, WireType::SixtyFourBit, self.out);
            self.out.extend_from_slice(&value.to_le_bytes());
        }
        if timestamp_ms != 0 {
            encode_key(2, WireType::Varint, self.out);
            encode_varint(timestamp_ms as u64, self.out);
        }
    }
}

/// Bytes of a length-delimited field `tag` of `len` bytes.
fn field_len(tag: u32, len: usize) -> usize {
    prost::encoding::key_len(tag) + encoded_len_varint(len as u64) + len
}

fn bytes_field(tag: u32, bytes: &[u8], out: &mut Vec<u8>) {
    encode_key(tag, WireType::LengthDelimited, out);
    encode_varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// Appends `series` (one encoded `TimeSeries`) to a `WriteRequest` body as field 1.
pub fn append_series(series: &[u8], body: &mut Vec<u8>) {
    bytes_field(1, series, body);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_encoded_series_decode_as_prost_messages() {
        let mut body = Vec::new();
        for (value, ts) in [(1.5, 1_700_000_000_000), (0.0, 0), (-2.0, 5), (f64::NAN, 7)] {
            let mut series = Vec::new();
            let mut w = SeriesWriter::new(&mut series);
            w.label(b"__name__", b"m");
            w.label(b"zone", "é".as_bytes());
            w.finish(value, ts);
            append_series(&series, &mut body);
        }
        let compressed = snap::raw::Encoder::new()
            .compress_vec(&body)
            .expect("compress");
        let request = decode_body(&compressed).expect("decode");
        assert_eq!(request.timeseries.len(), 4);
        let first = &request.timeseries[0];
        assert_eq!(
            first.labels,
            vec![
                Label {
                    name: "__name__".into(),
                    value: "m".into()
                },
                Label {
                    name: "zone".into(),
                    value: "é".into()
                }
            ]
        );
        assert_eq!(
            first.samples,
            vec![Sample {
                value: 1.5,
                timestamp: 1_700_000_000_000
            }]
        );
        assert_eq!(request.timeseries[1].samples[0].value, 0.0);
        assert_eq!(request.timeseries[1].samples[0].timestamp, 0);
        assert_eq!(request.timeseries[2].samples[0].value, -2.0);
        assert!(request.timeseries[3].samples[0].value.is_nan());
        // The same request through prost's encoder gives the same bytes.
        let reference = prost::Message::encode_to_vec(&request);
        assert_eq!(reference.len(), body.len());
    }
}
