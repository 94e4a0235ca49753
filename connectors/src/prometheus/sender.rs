//! Shards: concurrent, ordered, retrying senders of remote-write requests.
//!
//! A series always hashes to the same shard, and a shard sends one request at a time, in
//! the order its batches were filled, retrying each until it is accepted or dropped by the
//! spec's rules. So the samples of one series reach the receiver in the order they were
//! written, while `max_shards` requests are in flight.
//!
//! Batches are filled on the pipeline's side ([`Shards::push`]) and handed to the shard's
//! task through a bounded channel: when the receiver is down and the queues are full,
//! [`Shards::send_ready`] waits, and the pipeline with it (back-pressure to the source).

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use reqwest::StatusCode;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use weir_runtime::metrics::RemoteWriteMetrics;
use weir_runtime::pipeline::RateLimitedLog;
use weir_runtime::{Error, Result};

use super::proto::append_series;

/// What the senders need to know.
#[derive(Debug, Clone)]
pub struct SenderConfig {
    pub url: reqwest::Url,
    /// Carries the auth, TLS and extra headers.
    pub client: reqwest::Client,
    /// Extra headers, sent with every request.
    pub headers: reqwest::header::HeaderMap,
    pub auth: super::auth::Auth,
    pub max_shards: usize,
    pub max_samples_per_send: usize,
    pub batch_send_deadline: Duration,
    /// Samples a shard holds (queued, or being sent) before the pipeline waits; it waits
    /// holding one more batch for that shard.
    pub capacity: usize,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// Give up on a request (dropping its samples) after retrying it this long.
    pub max_retry_duration: Option<Duration>,
}

/// Samples for one request, in the order they were pushed.
#[derive(Default)]
struct Batch {
    /// Encoded `WriteRequest` (uncompressed).
    body: Vec<u8>,
    samples: usize,
    max_timestamp_ms: i64,
    /// When the first sample went in (the send deadline counts from there).
    opened: Option<Instant>,
}

enum Command {
    Send(Batch),
    /// Answered once every batch sent before it is done.
    Flush(oneshot::Sender<()>),
}

/// The shards of one sink.
pub struct Shards {
    config: Arc<SenderConfig>,
    channels: Vec<mpsc::Sender<Command>>,
    tasks: Vec<JoinHandle<()>>,
    filling: Vec<Batch>,
    /// Full batches waiting for [`Shards::send_ready`].
    ready: Vec<(usize, Batch)>,
    metrics: RemoteWriteMetrics,
}

impl Shards {
    pub fn start(config: SenderConfig, metrics: RemoteWriteMetrics) -> Self {
        let config = Arc::new(config);
        // A shard holds `capacity` samples: the batch it is sending, and the queued ones.
        let batches = config.capacity.div_ceil(config.max_samples_per_send);
        let queued_batches = batches.saturating_sub(1).max(1);
        let mut channels = Vec::with_capacity(config.max_shards);
        let mut tasks = Vec::with_capacity(config.max_shards);
        for shard in 0..config.max_shards {
            let (tx, rx) = mpsc::channel(queued_batches);
            let sender = ShardSender::new(shard, config.clone(), metrics.clone());
            tasks.push(tokio::spawn(sender.run(rx)));
            channels.push(tx);
        }
        Self {
            filling: (0..config.max_shards).map(|_| Batch::default()).collect(),
            config,
            channels,
            tasks,
            ready: Vec::new(),
            metrics,
        }
    }

    /// Adds one encoded series (with its sample) to its shard's batch.
    pub fn push(&mut self, series: &[u8], hash: u64, timestamp_ms: i64) {
        let shard = (hash % self.channels.len() as u64) as usize;
        let batch = &mut self.filling[shard];
        if batch.samples == 0 {
            batch.opened = Some(Instant::now());
            batch.max_timestamp_ms = timestamp_ms;
        }
        append_series(series, &mut batch.body);
        batch.samples += 1;
        batch.max_timestamp_ms = batch.max_timestamp_ms.max(timestamp_ms);
        if batch.samples >= self.config.max_samples_per_send {
            self.ready.push((shard, std::mem::take(batch)));
        }
    }

    /// Queues the full batches, waiting while a shard's queue is full.
    pub async fn send_ready(&mut self) -> Result<()> {
        for (shard, batch) in std::mem::take(&mut self.ready) {
            self.queue(shard, batch).await?;
        }
        Ok(())
    }

    /// Queues partly filled batches: those open longer than the send deadline, or all.
    pub async fn send_partial(&mut self, all: bool) -> Result<()> {
        let deadline = self.config.batch_send_deadline;
        for shard in 0..self.filling.len() {
            let due = self.filling[shard]
                .opened
                .is_some_and(|opened| all || opened.elapsed() >= deadline);
            if due {
                let batch = std::mem::take(&mut self.filling[shard]);
                self.queue(shard, batch).await?;
            }
        }
        Ok(())
    }

    async fn queue(&self, shard: usize, batch: Batch) -> Result<()> {
        self.metrics.queue_samples().inc_by(batch.samples as i64);
        self.channels[shard]
            .send(Command::Send(batch))
            .await
            .map_err(|_| Error::Internal("a remote-write shard stopped".into()))
    }

    /// Sends everything pushed so far and waits until every shard is done with it (sent,
    /// or dropped by the rules).
    pub async fn flush(&mut self) -> Result<()> {
        self.send_ready().await?;
        self.send_partial(true).await?;
        let mut acks = Vec::with_capacity(self.channels.len());
        for channel in &self.channels {
            let (tx, rx) = oneshot::channel();
            channel
                .send(Command::Flush(tx))
                .await
                .map_err(|_| Error::Internal("a remote-write shard stopped".into()))?;
            acks.push(rx);
        }
        for ack in acks {
            ack.await
                .map_err(|_| Error::Internal("a remote-write shard stopped".into()))?;
        }
        Ok(())
    }

    /// Flushes, then stops the shards.
    pub async fn close(&mut self) -> Result<()> {
        self.flush().await?;
        self.channels.clear();
        for task in self.tasks.drain(..) {
            task.await
                .map_err(|e| Error::Internal(format!("a remote-write shard failed: {e}")))?;
        }
        Ok(())
    }
}

impl Drop for Shards {
    fn drop(&mut self) {
        // Closed without `close` (the pipeline was stopped): nothing waits for the rest.
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// How one request ended.
enum Outcome {
    Sent,
    /// Not to be retried (4xx other than 429): dropped, with the reason.
    Rejected(&'static str),
    /// Worth another try, after at least this long.
    Retry(Option<Duration>),
}

struct ShardSender {
    shard: usize,
    config: Arc<SenderConfig>,
    metrics: RemoteWriteMetrics,
    highest_sent: weir_runtime::metrics::Gauge,
    highest_ms: i64,
    log: RateLimitedLog,
}

impl ShardSender {
    fn new(shard: usize, config: Arc<SenderConfig>, metrics: RemoteWriteMetrics) -> Self {
        Self {
            shard,
            highest_sent: metrics.highest_sent_ms(shard),
            config,
            metrics,
            highest_ms: i64::MIN,
            log: RateLimitedLog::new(Duration::from_secs(10)),
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        while let Some(command) = rx.recv().await {
            match command {
                Command::Send(batch) => {
                    let samples = batch.samples;
                    self.send(batch).await;
                    self.metrics.queue_samples().dec_by(samples as i64);
                }
                Command::Flush(ack) => {
                    let _ = ack.send(());
                }
            }
        }
    }

    /// Sends one batch until it is accepted, rejected, or out of retry time.
    async fn send(&mut self, batch: Batch) {
        let samples = batch.samples as u64;
        let body = match snap::raw::Encoder::new().compress_vec(&batch.body) {
            Ok(body) => bytes::Bytes::from(body),
            Err(e) => {
                // Only an input over snappy's 4 GiB limit fails; never with sane batch sizes.
                tracing::error!(shard = self.shard, error = %e, "remote write: cannot compress a request");
                self.metrics.samples_dropped("encoding").inc_by(samples);
                return;
            }
        };
        let first_try = Instant::now();
        let mut backoff = self.config.min_backoff;
        loop {
            let wait = match self.attempt(body.clone()).await {
                Outcome::Sent => {
                    self.metrics.samples_sent().inc_by(samples);
                    if batch.max_timestamp_ms > self.highest_ms {
                        self.highest_ms = batch.max_timestamp_ms;
                        self.highest_sent.set(self.highest_ms);
                    }
                    return;
                }
                Outcome::Rejected(reason) => {
                    self.metrics.samples_dropped(reason).inc_by(samples);
                    return;
                }
                Outcome::Retry(after) => {
                    let jittered = backoff.mul_f64(rand::rng().random_range(0.5..=1.0));
                    backoff = (backoff * 2).min(self.config.max_backoff);
                    after.map_or(jittered, |after| after.max(jittered))
                }
            };
            if let Some(limit) = self.config.max_retry_duration
                && first_try.elapsed().saturating_add(wait) > limit
            {
                tracing::warn!(shard = self.shard, samples, limit = ?limit,
                    "remote write: giving up on a request after max_retry_duration; its samples are dropped");
                self.metrics
                    .samples_dropped("retry_timeout")
                    .inc_by(samples);
                return;
            }
            self.metrics.samples_retried().inc_by(samples);
            tokio::time::sleep(wait).await;
        }
    }

    async fn attempt(&mut self, body: bytes::Bytes) -> Outcome {
        let started = Instant::now();
        let request = self.config.client.post(self.config.url.clone());
        let request = match self.config.auth.apply(request) {
            Ok(request) => request,
            Err(e) => {
                // A credentials file that cannot be read now may be readable later (rotation).
                self.metrics.requests("error").inc();
                let shard = self.shard;
                self.log.log(|suppressed| {
                    tracing::warn!(shard, error = %e, suppressed, "remote write: cannot read credentials; retrying");
                });
                return Outcome::Retry(None);
            }
        };
        let result = request
            .headers(self.config.headers.clone())
            .header(reqwest::header::CONTENT_ENCODING, "snappy")
            .header(reqwest::header::CONTENT_TYPE, "application/x-protobuf")
            .header("X-Prometheus-Remote-Write-Version", "0.1.0")
            .body(body)
            .send()
            .await;
        self.metrics
            .request_seconds()
            .observe(started.elapsed().as_secs_f64());
        let response = match result {
            Ok(response) => response,
            Err(e) => {
                self.metrics.requests("error").inc();
                let shard = self.shard;
                let error = without_url(e);
                self.log.log(|suppressed| {
                    tracing::warn!(shard, error = %error, suppressed,
                        "remote write: request failed; retrying with backoff");
                });
                return Outcome::Retry(None);
            }
        };
        let status = response.status();
        self.metrics.requests(status.as_str()).inc();
        if status.is_success() {
            return Outcome::Sent;
        }
        let retry_after = retry_after(response.headers());
        let text = response.text().await.unwrap_or_default();
        let text: String = text.chars().take(512).collect();
        let shard = self.shard;
        let retryable = status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS;
        self.log.log(|suppressed| {
            if retryable {
                tracing::warn!(shard, status = %status, response = %text.trim(), suppressed,
                    "remote write: the receiver failed the request; retrying with backoff");
            } else {
                tracing::error!(shard, status = %status, response = %text.trim(), suppressed,
                    "remote write: the receiver rejected the request; its samples are dropped");
            }
        });
        if retryable {
            Outcome::Retry(retry_after)
        } else if status == StatusCode::BAD_REQUEST {
            Outcome::Rejected("bad_request")
        } else {
            Outcome::Rejected("client_error")
        }
    }
}

/// `Retry-After`: seconds, or an HTTP date.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    let wait = match value.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => {
            let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
            let ms = at
                .timestamp_millis()
                .saturating_sub(chrono::Utc::now().timestamp_millis())
                .max(0);
            Duration::from_millis(ms as u64)
        }
    };
    // A receiver asking for days is taken to mean "later", not obeyed to the letter.
    Some(wait.min(MAX_RETRY_AFTER))
}

/// The longest `Retry-After` honoured.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// A request error without the URL (which may carry credentials).
fn without_url(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_takes_seconds_or_a_date() {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(reqwest::header::RETRY_AFTER, "3".parse().expect("header"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(3)));
        let later = chrono::Utc::now() + chrono::Duration::seconds(30);
        headers.insert(
            reqwest::header::RETRY_AFTER,
            later.to_rfc2822().parse().expect("header"),
        );
        let wait = retry_after(&headers).expect("date");
        assert!(
            wait > Duration::from_secs(25) && wait <= Duration::from_secs(30),
            "{wait:?}"
        );
        headers.insert(
            reqwest::header::RETRY_AFTER,
            "soon".parse().expect("header"),
        );
        assert_eq!(retry_after(&headers), None);
        headers.insert(
            reqwest::header::RETRY_AFTER,
            "18446744073709551615".parse().expect("header"),
        );
        assert_eq!(
            retry_after(&headers),
            Some(MAX_RETRY_AFTER),
            "capped, no overflow"
        );
    }
}
