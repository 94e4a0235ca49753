//! The `file` source: NDJSON or CSV, one file or a directory, read once or followed.
//!
//! Files are read in blocks of whole lines and decoded with arrow's batch decoders. A block
//! that fails to decode is decoded again line by line to find the bad records: good rows all
//! arrive, bad ones are counted by reason (`json`, `csv`, `schema`, `utf8`), logged at a rate
//! limit, and written to `dead_letter.path` with the error when that is set.

use std::path::{Path, PathBuf};
use std::time::Duration;

use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use weir_runtime::connector::{ConnectorError, SourceFactory};
use weir_runtime::pipeline::RateLimitedLog;
use weir_runtime::{Error, Message, Result, Source, SourceContext, SourceExit};
use weir_sql::Options;

pub use crate::decode::{BadRecord, BlockDecoder, Format};

mod table;
pub use table::FileTableFactory;

/// Bytes read per block (whole lines are decoded; a partial last line waits for more).
const BLOCK_BYTES: usize = 1 << 20;
/// Rows per decoded batch.
pub const BATCH_ROWS: usize = 8192;

/// Validated `file` options.
#[derive(Debug, Clone)]
pub struct FileSourceFactory {
    stream: String,
    schema: SchemaRef,
    path: PathBuf,
    format: Format,
    follow: bool,
    follow_interval: Duration,
    dead_letter: Option<PathBuf>,
    event_time: Option<(usize, i64)>,
    /// Rows per batch (a watermark follows each batch that advances it).
    batch_rows: usize,
}

impl FileSourceFactory {
    pub fn try_new(
        stream: &str,
        schema: SchemaRef,
        options: &Options,
    ) -> Result<Self, ConnectorError> {
        let reader = options.reader();
        reader.string("connector");
        let path = PathBuf::from(strip_file_scheme(reader.required("path")?));
        let format = match reader
            .one_of("format", &["json", "ndjson", "csv"])?
            .as_deref()
        {
            Some("csv") => Format::Csv {
                header: reader.bool("csv.header")?.unwrap_or(true),
                delimiter: match reader.string("csv.delimiter") {
                    Some(d) if d.len() == 1 => d.as_bytes()[0],
                    Some(d) => {
                        return Err(ConnectorError::Option(weir_sql::options::OptionError::new(
                            "csv.delimiter",
                            format!(
                                "invalid value '{d}' for option 'csv.delimiter': expected one character"
                            ),
                        )));
                    }
                    None => b',',
                },
            },
            _ => Format::Json,
        };
        let follow = reader.bool("follow")?.unwrap_or(false);
        let follow_interval = reader
            .duration("follow.interval")?
            .unwrap_or(Duration::from_secs(1));
        let dead_letter = reader
            .string("dead_letter.path")
            .map(|p| PathBuf::from(strip_file_scheme(p)));
        let batch_rows = match reader.u64("batch.rows")? {
            None => BATCH_ROWS,
            Some(n @ 1..=1_048_576) => n as usize,
            Some(n) => {
                return Err(ConnectorError::Option(weir_sql::options::OptionError::new(
                    "batch.rows",
                    format!("invalid value '{n}' for option 'batch.rows': expected 1 to 1048576"),
                )));
            }
        };
        reader.finish()?;
        if !path.exists() {
            return Err(ConnectorError::MissingFile(format!(
                "file source '{stream}': path '{}' does not exist",
                path.display()
            )));
        }
        Ok(Self {
            stream: stream.to_string(),
            schema,
            path,
            format,
            follow,
            follow_interval,
            dead_letter,
            event_time: None,
            batch_rows,
        })
    }

    /// The stream's WATERMARK (event-time column index, delay): watermarks follow the
    /// batches that advance it.
    pub fn with_event_time(mut self, event_time: Option<(usize, i64)>) -> Self {
        self.event_time = event_time;
        self
    }
}

fn strip_file_scheme(path: &str) -> &str {
    path.strip_prefix("file://").unwrap_or(path)
}

impl SourceFactory for FileSourceFactory {
    fn connector(&self) -> &'static str {
        "file"
    }

    fn is_bounded(&self) -> bool {
        !self.follow
    }

    fn create(&self) -> Result<Box<dyn Source>> {
        Ok(Box::new(FileSource {
            config: self.clone(),
            log: RateLimitedLog::new(Duration::from_secs(10)),
            restored: Vec::new(),
        }))
    }
}

/// One reader of a file or directory.
pub struct FileSource {
    config: FileSourceFactory,
    log: RateLimitedLog,
    /// Where each file was when the checkpoint restored was taken.
    restored: Vec<FileCursor>,
}

/// How far one file has been read.
struct FileCursor {
    path: PathBuf,
    offset: u64,
    /// Lines fully consumed so far (for error coordinates).
    line: u64,
    /// Bytes of an incomplete last line, waiting for the rest.
    pending: Vec<u8>,
    header_skipped: bool,
}

/// A file's place in a checkpoint: every byte before `consumed` has been emitted.
#[derive(serde::Serialize, serde::Deserialize)]
struct FilePosition {
    path: PathBuf,
    consumed: u64,
    line: u64,
    header_skipped: bool,
}

impl FileCursor {
    fn position(&self) -> FilePosition {
        FilePosition {
            path: self.path.clone(),
            consumed: self.offset - self.pending.len() as u64,
            line: self.line,
            header_skipped: self.header_skipped,
        }
    }
}

/// The position of every file: those before the one being read, it, and those after.
fn positions(parts: [&[FileCursor]; 3]) -> Result<weir_runtime::Snapshot> {
    let files: Vec<FilePosition> = parts
        .iter()
        .flat_map(|p| p.iter())
        .map(FileCursor::position)
        .collect();
    let meta =
        serde_json::to_value(files).map_err(|e| Error::Internal(format!("file position: {e}")))?;
    Ok(weir_runtime::Snapshot::meta(
        serde_json::json!({ "files": meta }),
    ))
}

#[async_trait]
impl Source for FileSource {
    async fn run(&mut self, ctx: &mut SourceContext) -> Result<SourceExit> {
        if let Some((column, delay_ms)) = self.config.event_time {
            ctx.track_event_time(column, delay_ms);
        }
        let mut decoder = BlockDecoder::new(
            self.config.schema.clone(),
            self.config.format,
            self.config.batch_rows,
        );
        let mut cursors: Vec<FileCursor> = std::mem::take(&mut self.restored);
        let mut buf = vec![0u8; BLOCK_BYTES];
        loop {
            self.discover(&mut cursors).await?;
            for i in 0..cursors.len() {
                let (before, rest) = cursors.split_at_mut(i);
                let Some((cursor, after)) = rest.split_first_mut() else {
                    break;
                };
                if !self
                    .read_available(cursor, [before, after], &mut decoder, &mut buf, ctx)
                    .await?
                {
                    return Ok(SourceExit::Stopped);
                }
            }
            if !self.config.follow {
                // The last line of a file need not end with a newline.
                for cursor in cursors.iter_mut() {
                    let rest = std::mem::take(&mut cursor.pending);
                    if !self.decode_lines(cursor, &rest, &mut decoder, ctx).await? {
                        return Ok(SourceExit::Stopped);
                    }
                }
                return Ok(SourceExit::Finished);
            }
            if !ctx.sleep(self.config.follow_interval).await {
                return Ok(SourceExit::Stopped);
            }
            if let Some(barrier) = ctx.barrier_due()
                && !ctx
                    .emit_barrier(barrier, positions([&cursors, &[], &[]])?)
                    .await
            {
                return Ok(SourceExit::Stopped);
            }
        }
    }

    async fn restore(&mut self, position: weir_runtime::Snapshot) -> Result<()> {
        let files = position.meta.get("files").cloned().unwrap_or_default();
        let files: Vec<FilePosition> = serde_json::from_value(files)
            .map_err(|e| Error::Execution(format!("file position is unreadable: {e}")))?;
        self.restored = files
            .into_iter()
            .map(|f| FileCursor {
                path: f.path,
                offset: f.consumed,
                line: f.line,
                pending: Vec::new(),
                header_skipped: f.header_skipped,
            })
            .collect();
        Ok(())
    }
}

impl FileSource {
    /// Adds cursors for files not seen yet (a directory is listed in name order).
    async fn discover(&self, cursors: &mut Vec<FileCursor>) -> Result<()> {
        let path = &self.config.path;
        let meta = tokio::fs::metadata(path)
            .await
            .map_err(|e| Error::io(path.display().to_string(), e))?;
        let mut files = Vec::new();
        if meta.is_dir() {
            let mut entries = tokio::fs::read_dir(path)
                .await
                .map_err(|e| Error::io(path.display().to_string(), e))?;
            while let Some(entry) = entries
                .next_entry()
                .await
                .map_err(|e| Error::io(path.display().to_string(), e))?
            {
                let name = entry.file_name();
                let hidden = name.to_string_lossy().starts_with('.');
                if !hidden
                    && entry
                        .file_type()
                        .await
                        .map(|t| t.is_file())
                        .unwrap_or(false)
                {
                    files.push(entry.path());
                }
            }
            files.sort();
        } else {
            files.push(path.clone());
        }
        for file in files {
            if !cursors.iter().any(|c| c.path == file) {
                cursors.push(FileCursor {
                    path: file,
                    offset: 0,
                    line: 0,
                    pending: Vec::new(),
                    header_skipped: false,
                });
            }
        }
        Ok(())
    }

    /// Reads and decodes everything currently in the file; `false` if the pipeline stopped.
    /// `others` are the other files' cursors (before and after this one), for the position
    /// a checkpoint barrier saves between two blocks.
    async fn read_available(
        &mut self,
        cursor: &mut FileCursor,
        others: [&[FileCursor]; 2],
        decoder: &mut BlockDecoder,
        buf: &mut [u8],
        ctx: &mut SourceContext,
    ) -> Result<bool> {
        let path_text = cursor.path.display().to_string();
        let mut file = tokio::fs::File::open(&cursor.path)
            .await
            .map_err(|e| Error::io(&path_text, e))?;
        let len = file
            .metadata()
            .await
            .map_err(|e| Error::io(&path_text, e))?
            .len();
        if len < cursor.offset {
            tracing::warn!(file = %path_text, "file shrank; reading it again from the start");
            *cursor = FileCursor {
                path: cursor.path.clone(),
                offset: 0,
                line: 0,
                pending: Vec::new(),
                header_skipped: false,
            };
        }
        file.seek(std::io::SeekFrom::Start(cursor.offset))
            .await
            .map_err(|e| Error::io(&path_text, e))?;
        loop {
            let n = file.read(buf).await.map_err(|e| Error::io(&path_text, e))?;
            if n == 0 {
                return Ok(true);
            }
            cursor.offset += n as u64;
            let chunk = &buf[..n];
            // Decode up to the last newline; keep the partial line for the next read.
            let Some(last_newline) = memrchr(b'\n', chunk) else {
                cursor.pending.extend_from_slice(chunk);
                continue;
            };
            let mut block = std::mem::take(&mut cursor.pending);
            block.extend_from_slice(&chunk[..=last_newline]);
            cursor.pending.extend_from_slice(&chunk[last_newline + 1..]);
            if !self.decode_lines(cursor, &block, decoder, ctx).await? {
                return Ok(false);
            }
            if let Some(barrier) = ctx.barrier_due() {
                let [before, after] = others;
                let position = positions([before, std::slice::from_ref(cursor), after])?;
                if !ctx.emit_barrier(barrier, position).await {
                    return Ok(false);
                }
            }
        }
    }

    async fn decode_lines(
        &mut self,
        cursor: &mut FileCursor,
        mut block: &[u8],
        decoder: &mut BlockDecoder,
        ctx: &mut SourceContext,
    ) -> Result<bool> {
        if block.is_empty() {
            return Ok(true);
        }
        if matches!(self.config.format, Format::Csv { header: true, .. }) && !cursor.header_skipped
        {
            let end = block
                .iter()
                .position(|&b| b == b'\n')
                .map_or(block.len(), |i| i + 1);
            block = &block[end..];
            cursor.line += 1;
            cursor.header_skipped = true;
        }
        let first_line = cursor.line + 1;
        cursor.line += block.iter().filter(|&&b| b == b'\n').count() as u64;
        let (batches, bad) = decoder.decode_block(block)?;
        if !bad.is_empty() {
            self.report_bad(&cursor.path, first_line, &bad, ctx).await;
        }
        for batch in batches {
            if !ctx.emit(Message::Data(batch)).await {
                return Ok(false);
            }
        }
        Ok(true)
    }

    async fn report_bad(
        &mut self,
        path: &Path,
        first_line: u64,
        bad: &[BadRecord],
        ctx: &mut SourceContext,
    ) {
        for record in bad {
            ctx.metrics.decode_errors(record.reason, 1);
        }
        let stream = &self.config.stream;
        let first = &bad[0];
        self.log.log(|suppressed| {
            tracing::warn!(stream = %stream, file = %path.display(), line = first_line + first.line_in_block,
                error = %first.error, bad_records = bad.len(), suppressed, "skipping records that do not decode");
        });
        let Some(dead_letter) = &self.config.dead_letter else {
            return;
        };
        let mut text = String::new();
        for record in bad {
            let entry = serde_json::json!({
                "stream": stream,
                "file": path.display().to_string(),
                "line": first_line + record.line_in_block,
                "reason": record.reason,
                "error": record.error,
                "record": String::from_utf8_lossy(&record.bytes),
            });
            text.push_str(&entry.to_string());
            text.push('\n');
        }
        let written = async {
            let mut file = tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dead_letter)
                .await?;
            file.write_all(text.as_bytes()).await?;
            file.flush().await
        };
        if let Err(e) = written.await {
            tracing::warn!(stream = %stream, path = %dead_letter.display(), error = %e, "cannot write dead letters");
        }
    }
}

fn memrchr(needle: u8, haystack: &[u8]) -> Option<usize> {
    haystack.iter().rposition(|&b| b == needle)
}

/// Decodes a whole file synchronously (for `CREATE TABLE ... connector = 'file'` snapshots and
/// tools): returns the batches and the number of records skipped.
pub fn read_file_to_batches(
    path: &Path,
    schema: SchemaRef,
    format: Format,
) -> Result<(Vec<arrow::record_batch::RecordBatch>, usize)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path.display().to_string(), e))?;
    let mut body: &[u8] = &bytes;
    if let Format::Csv { header: true, .. } = format {
        let end = body
            .iter()
            .position(|&b| b == b'\n')
            .map_or(body.len(), |i| i + 1);
        body = &body[end..];
    }
    let mut decoder = BlockDecoder::new(schema, format, BATCH_ROWS);
    let (batches, bad) = decoder.decode_block(body)?;
    Ok((batches, bad.len()))
}
