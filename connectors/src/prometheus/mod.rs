//! The `prometheus_remote_write` sink: rows as samples, sent with the remote-write 1.0
//! protocol (protobuf `WriteRequest`, snappy block format) to Prometheus or any compatible
//! receiver.
//!
//! - [`mapping`]: which columns are samples, labels and the time (decided at CREATE).
//! - [`proto`]: the wire format; series are encoded straight into request bodies.
//! - [`sender`]: `max_shards` ordered senders, batching, retries, back-pressure.
//! - [`auth`]: basic auth and bearer tokens from values, `${ENV}` or files.
//!
//! Delivery follows the job's checkpoints: rows are held until the checkpoint after them
//! completes, then encoded and sent. A restart replays from the last checkpoint, so what
//! Prometheus received before a crash was all covered by a complete checkpoint, and the
//! replay sends only samples newer than those, in order: no out-of-order rejections. (Only a
//! crash while a commit is being sent re-sends that epoch's samples, which Prometheus
//! accepts as duplicates of its latest sample per series.)

pub mod auth;
pub mod mapping;
pub mod proto;
pub mod sender;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod transport_tests;

use std::time::Duration;

use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use weir_runtime::connector::{ConnectorError, SinkFactory, SinkSpec};
use weir_runtime::metrics::{Counter, RemoteWriteMetrics};
use weir_runtime::pipeline::RateLimitedLog;
use weir_runtime::{CheckpointBarrier, Metrics, Result, Sink, Snapshot};
use weir_sql::Options;
use weir_sql::options::OptionError;

use self::auth::{Auth, expand_env};
use self::mapping::{Mapping, UNMAPPABLE};
use self::sender::{SenderConfig, Shards};

/// What Weir sends as `User-Agent`.
const USER_AGENT: &str = concat!("weir/", env!("CARGO_PKG_VERSION"));

/// A validated `prometheus_remote_write` sink.
#[derive(Debug)]
pub struct PrometheusSinkFactory {
    name: String,
    mapping: Mapping,
    config: SenderConfig,
}

fn option_error(key: &str, message: String) -> ConnectorError {
    ConnectorError::Option(OptionError::new(key, message))
}

/// A positive count option within `1..=max`.
fn count(
    reader: &weir_sql::options::OptionReader<'_>,
    key: &str,
    default: u64,
    max: u64,
) -> Result<usize, ConnectorError> {
    let value = reader.u64(key)?.unwrap_or(default);
    if value == 0 || value > max {
        return Err(option_error(
            key,
            format!("invalid value '{value}' for option '{key}': expected 1 to {max}"),
        ));
    }
    Ok(value as usize)
}

impl PrometheusSinkFactory {
    pub fn try_new(spec: &SinkSpec, options: &Options) -> Result<Self, ConnectorError> {
        let reader = options.reader();
        reader.string("connector");
        let url_text = reader.required("url")?;
        let url = reqwest::Url::parse(url_text)
            .map_err(|e| option_error("url", format!("invalid value for option 'url': {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(option_error(
                "url",
                format!(
                    "option 'url' must be http:// or https://, not {}://",
                    url.scheme()
                ),
            ));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(option_error(
                "url",
                "option 'url' must not carry credentials: use basic_auth.username and basic_auth.password".into(),
            ));
        }
        let metric_prefix = reader
            .string("metric_prefix")
            .unwrap_or(&spec.name)
            .to_string();
        let timestamp = reader.string("timestamp");
        let labels = reader
            .prefixed("labels.")
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let max_shards = count(&reader, "max_shards", 4, 256)?;
        let max_samples_per_send = count(&reader, "max_samples_per_send", 2000, 1_000_000)?;
        let capacity = count(
            &reader,
            "capacity",
            (max_samples_per_send as u64 * 5).max(10_000),
            100_000_000,
        )?;
        let positive = |key: &str, default: Duration| -> Result<Duration, ConnectorError> {
            let value = reader.duration(key)?.unwrap_or(default);
            if value.is_zero() {
                return Err(option_error(
                    key,
                    format!("invalid value for option '{key}': must be above zero"),
                ));
            }
            Ok(value)
        };
        let batch_send_deadline = positive("batch_send_deadline", Duration::from_secs(1))?;
        let min_backoff = positive("min_backoff", Duration::from_millis(30))?;
        let max_backoff = positive("max_backoff", Duration::from_secs(5))?.max(min_backoff);
        let remote_timeout = positive("remote_timeout", Duration::from_secs(30))?;
        let max_retry_duration = reader.duration("max_retry_duration")?;
        let auth = Auth::read(&reader)?;
        let headers = headers(&reader)?;
        let client = client(&reader, remote_timeout)?;
        reader.finish()?;
        let mapping = Mapping::try_new(&spec.schema, &metric_prefix, timestamp, labels)?;
        Ok(Self {
            name: spec.name.clone(),
            mapping,
            config: SenderConfig {
                url,
                client,
                headers,
                auth,
                max_shards,
                max_samples_per_send,
                batch_send_deadline,
                capacity,
                min_backoff,
                max_backoff,
                max_retry_duration,
            },
        })
    }
}

/// `headers.<name> = '<value>'` (values may use `${ENV}`); marked sensitive so that they
/// never print.
fn headers(reader: &weir_sql::options::OptionReader<'_>) -> Result<HeaderMap, ConnectorError> {
    let mut headers = HeaderMap::new();
    for (name, value) in reader.prefixed("headers.") {
        let key = format!("headers.{name}");
        let header = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| option_error(&key, format!("option '{key}': not a valid header name")))?;
        let reserved = [
            "content-type",
            "content-encoding",
            "x-prometheus-remote-write-version",
        ];
        if reserved.contains(&header.as_str()) {
            return Err(option_error(
                &key,
                format!("option '{key}': the remote-write protocol sets this header"),
            ));
        }
        let mut value = HeaderValue::from_str(&expand_env(&key, value)?)
            .map_err(|_| option_error(&key, format!("option '{key}': not a valid header value")))?;
        value.set_sensitive(true);
        headers.insert(header, value);
    }
    Ok(headers)
}

/// The HTTP client: timeouts, User-Agent, and TLS (`tls.ca_file`, `tls.cert_file` +
/// `tls.key_file`).
fn client(
    reader: &weir_sql::options::OptionReader<'_>,
    timeout: Duration,
) -> Result<reqwest::Client, ConnectorError> {
    let read = |key: &str| -> Result<Option<Vec<u8>>, ConnectorError> {
        reader
            .string(key)
            .map(|path| {
                std::fs::read(path).map_err(|e| {
                    ConnectorError::MissingFile(format!(
                        "option '{key}': cannot read '{path}': {e}"
                    ))
                })
            })
            .transpose()
    };
    let mut builder = reqwest::Client::builder()
        .user_agent(USER_AGENT)
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .pool_idle_timeout(Duration::from_secs(90));
    if let Some(pem) = read("tls.ca_file")? {
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| e.to_string())
            .and_then(|certs| {
                if certs.is_empty() {
                    Err("the file holds none".to_string())
                } else {
                    Ok(certs)
                }
            })
            .map_err(|e| {
                option_error(
                    "tls.ca_file",
                    format!("option 'tls.ca_file': no PEM certificates: {e}"),
                )
            })?;
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    match (read("tls.cert_file")?, read("tls.key_file")?) {
        (Some(mut cert), Some(key)) => {
            cert.push(b'\n');
            cert.extend_from_slice(&key);
            let identity = reqwest::Identity::from_pem(&cert).map_err(|e| {
                option_error(
                    "tls.cert_file",
                    format!("options 'tls.cert_file' and 'tls.key_file': not a PEM certificate and key: {e}"),
                )
            })?;
            builder = builder.identity(identity);
        }
        (None, None) => {}
        _ => {
            return Err(option_error(
                "tls.cert_file",
                "options 'tls.cert_file' and 'tls.key_file' go together".into(),
            ));
        }
    }
    builder
        .build()
        .map_err(|e| ConnectorError::Invalid(format!("cannot build the HTTP client: {e}")))
}

impl SinkFactory for PrometheusSinkFactory {
    fn connector(&self) -> &'static str {
        "prometheus_remote_write"
    }

    fn create(&self, metrics: &Metrics) -> Result<Box<dyn Sink>> {
        Ok(Box::new(PrometheusSink::new(
            &self.name,
            self.mapping.clone(),
            self.config.clone(),
            metrics.remote_write(&self.name),
        )))
    }
}

/// Rows held for checkpoints not complete yet at most; beyond, rows are sent at once
/// (memory stays bounded when checkpoints stall; a crash then may replay samples older than
/// ones Prometheus has, which it rejects as out of order).
const MAX_HELD_ROWS: usize = 1_000_000;

/// Writes rows as samples through [`Shards`], once their checkpoint completes.
pub struct PrometheusSink {
    mapping: Mapping,
    shards: Shards,
    deadline: Duration,
    unmappable: Counter,
    unmappable_log: RateLimitedLog,
    name: String,
    /// Rows since the last barrier.
    open: Vec<RecordBatch>,
    /// Rows of epochs pre-committed, waiting for their checkpoint.
    pending: Vec<(u64, Vec<RecordBatch>)>,
    held_rows: usize,
    early_log: RateLimitedLog,
}

impl PrometheusSink {
    pub fn new(
        name: &str,
        mapping: Mapping,
        config: SenderConfig,
        metrics: RemoteWriteMetrics,
    ) -> Self {
        let deadline = config.batch_send_deadline;
        Self {
            mapping,
            unmappable: metrics.samples_dropped(UNMAPPABLE),
            unmappable_log: RateLimitedLog::new(Duration::from_secs(10)),
            name: name.to_string(),
            shards: Shards::start(config, metrics),
            deadline,
            open: Vec::new(),
            pending: Vec::new(),
            held_rows: 0,
            early_log: RateLimitedLog::new(Duration::from_secs(60)),
        }
    }

    /// Encodes rows into the shards and sends what is ready.
    async fn send(&mut self, batch: &RecordBatch) -> Result<()> {
        let now = chrono::Utc::now().timestamp_millis();
        let shards = &mut self.shards;
        let dropped = self.mapping.encode(batch, now, |s| {
            shards.push(s.series, s.hash, s.timestamp_ms)
        })?;
        if dropped > 0 {
            self.unmappable.inc_by(dropped);
            let sink = &self.name;
            self.unmappable_log.log(|suppressed| {
                tracing::warn!(%sink, samples = dropped, suppressed,
                    "samples dropped: their row has a NULL time or no usable metric name in '__name__'");
            });
        }
        self.shards.send_ready().await
    }

    /// Sends every held row, oldest first.
    async fn send_held(&mut self, up_to: Option<u64>) -> Result<()> {
        let mut kept = Vec::new();
        for (epoch, batches) in std::mem::take(&mut self.pending) {
            if up_to.is_some_and(|e| epoch > e) {
                kept.push((epoch, batches));
                continue;
            }
            for batch in &batches {
                self.held_rows -= batch.num_rows();
                self.send(batch).await?;
            }
        }
        self.pending = kept;
        if up_to.is_none() {
            for batch in std::mem::take(&mut self.open) {
                self.held_rows -= batch.num_rows();
                self.send(&batch).await?;
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Sink for PrometheusSink {
    async fn write(&mut self, batch: RecordBatch) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        self.held_rows += batch.num_rows();
        self.open.push(batch);
        if self.held_rows > MAX_HELD_ROWS {
            let sink = &self.name;
            self.early_log.log(|suppressed| {
                tracing::warn!(%sink, rows = MAX_HELD_ROWS, suppressed,
                    "checkpoints are not completing: rows are sent before their checkpoint");
            });
            self.send_held(None).await?;
        }
        Ok(())
    }

    fn tick_interval(&self) -> Option<Duration> {
        Some((self.deadline / 4).max(Duration::from_millis(10)))
    }

    async fn on_tick(&mut self) -> Result<()> {
        self.shards.send_partial(false).await
    }

    async fn pre_commit(&mut self, barrier: CheckpointBarrier) -> Result<()> {
        if barrier.last {
            // The pipeline ends here (a stop, or a bounded input's end): everything is sent
            // before this last checkpoint completes, so the restart has nothing to send
            // again. Samples Prometheus already has are refused as out of order when sent
            // again behind a later sample of their series (and the refusal rolls back the
            // whole request), so the restart must not replay them. Should this checkpoint
            // fail, the restart replays from the one before, as after a crash.
            self.send_held(None).await?;
            self.shards.flush().await?;
            barrier.ack();
            return Ok(());
        }
        let rows = std::mem::take(&mut self.open);
        if !rows.is_empty() {
            self.pending.push((barrier.epoch, rows));
        }
        barrier.ack();
        Ok(())
    }

    /// The rows waiting for their checkpoint: the restored sink sends them.
    fn snapshot(&mut self) -> Result<Option<Snapshot>> {
        let batches: Vec<RecordBatch> = self
            .pending
            .iter()
            .flat_map(|(_, b)| b.iter().cloned())
            .collect();
        Ok(Some(Snapshot::new(serde_json::Value::Null, batches)))
    }

    /// A repeat behind later samples of a series is refused as out of order: a restore
    /// must know whether the checkpoint's rows went out.
    fn reads_commit_records(&self) -> bool {
        true
    }

    async fn restore(&mut self, snapshot: Snapshot) -> Result<()> {
        if snapshot.committed {
            // Sent before the restart, by this checkpoint's commit: sent again behind later
            // samples of their series, Prometheus would refuse them as out of order.
            return Ok(());
        }
        // The restored checkpoint is complete, but its commit may not have finished before
        // the restart: what it held is sent now. Samples of it that had arrived are refused
        // as out of order (docs/sql.md, "Checkpoints and delivery").
        let rows: usize = snapshot.batches.iter().map(RecordBatch::num_rows).sum();
        if rows > 0 {
            tracing::info!(
                rows,
                "the restored checkpoint's commit had not finished before the restart: sending its rows again"
            );
        }
        for batch in &snapshot.batches {
            self.send(batch).await?;
        }
        self.shards.flush().await
    }

    /// The checkpoint is complete: its rows are sent, and the commit returns once the
    /// receiver has them (a receiver outage holds the pipeline here, bounded, not lossy).
    async fn commit(&mut self, epoch: u64) -> Result<()> {
        self.send_held(Some(epoch)).await?;
        self.shards.flush().await
    }

    async fn finish(&mut self) -> Result<()> {
        self.shards.close().await
    }
}

impl std::fmt::Debug for PrometheusSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PrometheusSink")
    }
}
