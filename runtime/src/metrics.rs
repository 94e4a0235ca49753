//! [`Metrics`]: Weir's own counters, served at `GET /metrics` in Prometheus text format.
//!
//! Handles ([`OperatorMetrics`], [`SourceMetrics`], [`SinkMetrics`]) are resolved once when a
//! pipeline is built, so the per-batch cost is an atomic add.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::text::encode;
pub use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
pub use prometheus_client::metrics::gauge::Gauge;
pub use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::{Metric, Registry};

type Labels = Vec<(String, String)>;

/// The registry and every metric family Weir reports.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Mutex<Families>>,
    records_in: Family<Labels, Counter>,
    records_out: Family<Labels, Counter>,
    operator_errors: Family<Labels, Counter>,
    decode_errors: Family<Labels, Counter>,
    sink_rows: Family<Labels, Counter>,
    sink_errors: Family<Labels, Counter>,
    sink_write_seconds: Family<Labels, Counter<f64, AtomicU64>>,
    shuffle_bytes: Family<Labels, Counter>,
    pipelines: Family<Labels, Gauge>,
    state: StateFamilies,
    source: SourceFamilies,
    remote_write: RemoteWriteFamilies,
    lookup: LookupFamilies,
    checkpoint: CheckpointFamilies,
    logins: Family<Labels, Counter>,
}

/// Families of checkpoints, per job.
#[derive(Clone, Debug)]
struct CheckpointFamilies {
    completed: Family<Labels, Counter>,
    failed: Family<Labels, Counter>,
    seconds: Family<Labels, Histogram, fn() -> Histogram>,
    alignment_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    bytes: Family<Labels, Gauge>,
    epoch: Family<Labels, Gauge>,
    restore_seconds: Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>,
}

impl Default for CheckpointFamilies {
    fn default() -> Self {
        fn seconds() -> Histogram {
            // 1 ms to ~65 s.
            Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.001, 2.0, 17,
            ))
        }
        Self {
            completed: Family::default(),
            failed: Family::default(),
            seconds: Family::new_with_constructor(seconds),
            alignment_seconds: Family::new_with_constructor(seconds),
            bytes: Family::default(),
            epoch: Family::default(),
            restore_seconds: Family::default(),
        }
    }
}

/// Families of lookup joins (per pipeline and table) and lookup tables (per table).
#[derive(Clone, Debug)]
struct LookupFamilies {
    lookups: Family<Labels, Counter>,
    hits: Family<Labels, Counter>,
    misses: Family<Labels, Counter>,
    lookup_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    table_rows: Family<Labels, Gauge>,
    table_bytes: Family<Labels, Gauge>,
    reloads: Family<Labels, Counter>,
    cache_rows: Family<Labels, Gauge>,
    cache_bytes: Family<Labels, Gauge>,
    queries: Family<Labels, Counter>,
    retries: Family<Labels, Counter>,
    cache_hits: Family<Labels, Counter>,
    cache_misses: Family<Labels, Counter>,
    changelog_lag: Family<Labels, Gauge>,
}

impl Default for LookupFamilies {
    fn default() -> Self {
        fn lookup_histogram() -> Histogram {
            // 10 µs to ~20 s.
            Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.00001, 2.0, 21,
            ))
        }
        Self {
            lookups: Family::default(),
            hits: Family::default(),
            misses: Family::default(),
            lookup_seconds: Family::new_with_constructor(lookup_histogram),
            table_rows: Family::default(),
            table_bytes: Family::default(),
            reloads: Family::default(),
            cache_rows: Family::default(),
            cache_bytes: Family::default(),
            queries: Family::default(),
            retries: Family::default(),
            cache_hits: Family::default(),
            cache_misses: Family::default(),
            changelog_lag: Family::default(),
        }
    }
}

/// Families of the Prometheus remote-write sink.
#[derive(Clone, Debug)]
struct RemoteWriteFamilies {
    samples_sent: Family<Labels, Counter>,
    samples_retried: Family<Labels, Counter>,
    samples_dropped: Family<Labels, Counter>,
    requests: Family<Labels, Counter>,
    request_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    queue_samples: Family<Labels, Gauge>,
    highest_sent_ms: Family<Labels, Gauge>,
}

impl Default for RemoteWriteFamilies {
    fn default() -> Self {
        fn request_histogram() -> Histogram {
            // 1 ms to ~16 s.
            Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.001, 2.0, 15,
            ))
        }
        Self {
            samples_sent: Family::default(),
            samples_retried: Family::default(),
            samples_dropped: Family::default(),
            requests: Family::default(),
            request_seconds: Family::new_with_constructor(request_histogram),
            queue_samples: Family::default(),
            highest_sent_ms: Family::default(),
        }
    }
}

/// Per-source families: partitions, watermarks, commits (Kafka fills all of them).
#[derive(Clone, Debug, Default)]
struct SourceFamilies {
    partition_records: Family<Labels, Counter>,
    partition_bytes: Family<Labels, Counter>,
    partition_skipped: Family<Labels, Counter>,
    partition_lag: Family<Labels, Gauge>,
    partition_watermark: Family<Labels, Gauge>,
    watermark: Family<Labels, Gauge>,
    commits: Family<Labels, Counter>,
    rebalances: Family<Labels, Counter>,
    client_errors: Family<Labels, Counter>,
    dead_letters: Family<Labels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Families {
            registry: Registry::with_prefix("weir"),
            described: Vec::new(),
        };
        let metrics = Self {
            registry: Arc::new(Mutex::new(Families {
                registry: Registry::default(),
                described: Vec::new(),
            })),
            records_in: Family::default(),
            records_out: Family::default(),
            operator_errors: Family::default(),
            decode_errors: Family::default(),
            sink_rows: Family::default(),
            sink_errors: Family::default(),
            sink_write_seconds: Family::default(),
            shuffle_bytes: Family::default(),
            pipelines: Family::default(),
            state: StateFamilies::default(),
            source: SourceFamilies::default(),
            remote_write: RemoteWriteFamilies::default(),
            lookup: LookupFamilies::default(),
            checkpoint: CheckpointFamilies::default(),
            logins: Family::default(),
        };
        let st = &metrics.state;
        for (name, help, family) in [
            (
                "operator_watermark_ms",
                "The last watermark an operator received, per pipeline and operator (ms since the epoch; with several workers, the last any worker received)",
                &st.watermark,
            ),
            (
                "operator_open_windows",
                "Windows open in a window operator's state, per pipeline and operator",
                &st.open_windows,
            ),
            (
                "operator_keys_in_state",
                "Groups (window panes x keys) held in a window operator's state, per pipeline and operator",
                &st.keys,
            ),
            (
                "operator_state_bytes",
                "Estimated bytes of a window operator's state, per pipeline and operator",
                &st.bytes,
            ),
            (
                "operator_emit_lag_ms",
                "Event time from a window's end to the watermark that emitted it (the last emission), per pipeline and operator",
                &st.emit_lag,
            ),
        ] {
            registry.register(name, help, family.clone());
        }
        registry.register(
            "late_records_dropped",
            "Records dropped because their window had closed (or they had no event time), per pipeline and operator",
            st.late.clone(),
        );
        let f = &metrics.source;
        for (name, help, family) in [
            (
                "source_partition_records_in",
                "Records read, per source and partition",
                &f.partition_records,
            ),
            (
                "source_partition_bytes_in",
                "Payload bytes read, per source and partition",
                &f.partition_bytes,
            ),
            (
                "source_partition_records_skipped",
                "Records never read because the broker deleted them (retention) before the source resumed there, per source and partition",
                &f.partition_skipped,
            ),
            (
                "source_commits",
                "Offset commits, per source and result (ok, failed)",
                &f.commits,
            ),
            (
                "source_rebalances",
                "Consumer-group rebalances (assign, revoke), per source",
                &f.rebalances,
            ),
            (
                "source_client_errors",
                "Errors reported by the source's client (a broker outage shows here), per source",
                &f.client_errors,
            ),
            (
                "dead_letters_written",
                "Undecodable records written to the dead-letter destination, per source",
                &f.dead_letters,
            ),
        ] {
            registry.register(name, help, family.clone());
        }
        for (name, help, family) in [
            (
                "source_partition_lag",
                "Consumer lag in records, per source and partition",
                &f.partition_lag,
            ),
            (
                "source_partition_watermark_ms",
                "Highest event time seen minus the watermark delay, per source and partition (ms since the epoch)",
                &f.partition_watermark,
            ),
            (
                "source_watermark_ms",
                "The source's watermark: the minimum over its non-idle partitions (ms since the epoch)",
                &f.watermark,
            ),
        ] {
            registry.register(name, help, family.clone());
        }
        registry.register(
            "records_in",
            "Records received, per pipeline and operator",
            metrics.records_in.clone(),
        );
        registry.register(
            "records_out",
            "Records emitted, per pipeline and operator (sources included)",
            metrics.records_out.clone(),
        );
        registry.register(
            "operator_errors",
            "Batches an operator failed on and dropped, per pipeline and operator",
            metrics.operator_errors.clone(),
        );
        registry.register(
            "decode_errors",
            "Source records that did not decode and were skipped, per pipeline and reason",
            metrics.decode_errors.clone(),
        );
        registry.register(
            "sink_rows_written",
            "Rows written by a sink, per pipeline and sink",
            metrics.sink_rows.clone(),
        );
        registry.register(
            "shuffle_bytes_written",
            "Bytes a cluster's pipeline wrote to its repartition topic (record values), per pipeline",
            metrics.shuffle_bytes.clone(),
        );
        registry.register(
            "sink_write_seconds",
            "Time a sink spent writing batches, per pipeline and sink: its back-pressure (near 1 second per second, the sink is what holds its pipeline back)",
            metrics.sink_write_seconds.clone(),
        );
        registry.register(
            "sink_errors",
            "Sink write failures, per pipeline and sink",
            metrics.sink_errors.clone(),
        );
        registry.register(
            "pipelines_running",
            "Pipelines currently running, per kind",
            metrics.pipelines.clone(),
        );
        let rw = &metrics.remote_write;
        for (name, help, family) in [
            (
                "remote_write_samples_sent",
                "Samples a remote-write receiver accepted, per sink",
                &rw.samples_sent,
            ),
            (
                "remote_write_samples_retried",
                "Samples sent again after a retryable failure (5xx, 429, connection error), per sink",
                &rw.samples_retried,
            ),
            (
                "remote_write_samples_dropped",
                "Samples not written, per sink and reason (bad_request: 400; client_error: other 4xx; retry_timeout: max_retry_duration passed; unmappable: the row had no usable timestamp or metric name)",
                &rw.samples_dropped,
            ),
            (
                "remote_write_requests",
                "Remote-write requests, per sink and HTTP status code (or 'error' when no response came)",
                &rw.requests,
            ),
        ] {
            registry.register(name, help, family.clone());
        }
        registry.register(
            "remote_write_request_seconds",
            "Remote-write request latency, per sink",
            rw.request_seconds.clone(),
        );
        registry.register(
            "remote_write_queue_samples",
            "Samples waiting to be sent (queued or being retried), per sink",
            rw.queue_samples.clone(),
        );
        registry.register(
            "remote_write_shard_highest_timestamp_ms",
            "Highest sample timestamp a receiver accepted, per sink and shard (ms since the epoch)",
            rw.highest_sent_ms.clone(),
        );
        let lk = &metrics.lookup;
        for (name, help, family) in [
            (
                "lookups",
                "Records looked up by a lookup join, per pipeline and table",
                &lk.lookups,
            ),
            (
                "lookup_hits",
                "Records a lookup join found a table row for, per pipeline and table",
                &lk.hits,
            ),
            (
                "lookup_misses",
                "Records a lookup join found no table row for (INNER drops them, LEFT emits NULLs), per pipeline and table",
                &lk.misses,
            ),
            (
                "lookup_table_reloads",
                "Loads of a lookup table's contents, per table and result (ok, failed)",
                &lk.reloads,
            ),
            (
                "lookup_table_queries",
                "Queries a lookup table sent to its external system, per table",
                &lk.queries,
            ),
            (
                "lookup_table_retries",
                "Queries a lookup table retried after its external system failed, per table",
                &lk.retries,
            ),
            (
                "lookup_cache_hits",
                "Records whose key a partial lookup cache answered, per table",
                &lk.cache_hits,
            ),
            (
                "lookup_cache_misses",
                "Records whose key a partial lookup cache sent to the external system, per table",
                &lk.cache_misses,
            ),
        ] {
            registry.register(name, help, family.clone());
        }
        for (name, help, family) in [
            (
                "lookup_table_rows",
                "Rows a lookup table holds in memory (full cache), per table",
                &lk.table_rows,
            ),
            (
                "lookup_table_bytes",
                "Estimated bytes of a lookup table held in memory, per table",
                &lk.table_bytes,
            ),
            (
                "lookup_cache_rows",
                "Keys (found or missing) in a partial lookup cache, per table",
                &lk.cache_rows,
            ),
            (
                "lookup_cache_bytes",
                "Estimated bytes of a partial lookup cache, per table",
                &lk.cache_bytes,
            ),
            (
                "lookup_table_changelog_lag",
                "Records of a Kafka table's changelog not yet applied, per table",
                &lk.changelog_lag,
            ),
        ] {
            registry.register(name, help, family.clone());
        }
        registry.register(
            "lookup_seconds",
            "Time to look up one batch's keys, per pipeline and table",
            lk.lookup_seconds.clone(),
        );
        let cp = &metrics.checkpoint;
        registry.register(
            "checkpoints_completed",
            "Checkpoints written and committed, per job",
            cp.completed.clone(),
        );
        registry.register(
            "checkpoints_failed",
            "Checkpoints abandoned (a participant failed or lost its barrier, or the store refused the write), per job",
            cp.failed.clone(),
        );
        registry.register(
            "checkpoint_seconds",
            "Time from injecting a checkpoint's barrier to its write completing, per job",
            cp.seconds.clone(),
        );
        registry.register(
            "checkpoint_alignment_seconds",
            "Time from injecting a checkpoint's barrier until every participant acknowledged it, per job",
            cp.alignment_seconds.clone(),
        );
        registry.register(
            "checkpoint_bytes",
            "Size of the last checkpoint written, per job",
            cp.bytes.clone(),
        );
        registry.register(
            "checkpoint_epoch",
            "Epoch of the last completed checkpoint, per job",
            cp.epoch.clone(),
        );
        registry.register(
            "checkpoint_restore_seconds",
            "Time the last restore from a checkpoint took (reading it and restoring every participant), per job",
            cp.restore_seconds.clone(),
        );
        registry.register(
            "logins",
            "Login attempts on the SQL port and the web console, per result (ok, wrong_password, rate_limited, tls_required, protocol_error)",
            metrics.logins.clone(),
        );
        *metrics.registry.lock().unwrap_or_else(|e| e.into_inner()) = registry;
        metrics
    }

    /// The metrics of job `job`'s checkpoints.
    pub fn checkpoints(&self, job: &str) -> CheckpointMetrics {
        let labels = vec![("job".to_string(), job.to_string())];
        let cp = &self.checkpoint;
        CheckpointMetrics {
            completed: cp.completed.get_or_create(&labels).clone(),
            failed: cp.failed.get_or_create(&labels).clone(),
            seconds: cp.seconds.get_or_create(&labels).clone(),
            alignment_seconds: cp.alignment_seconds.get_or_create(&labels).clone(),
            bytes: cp.bytes.get_or_create(&labels).clone(),
            epoch: cp.epoch.get_or_create(&labels).clone(),
            restore_seconds: cp.restore_seconds.get_or_create(&labels).clone(),
        }
    }

    /// An operator's counters; `stateful` ones (windows) also get the state gauges.
    pub fn operator(
        &self,
        pipeline: &str,
        operator: &str,
        index: usize,
        stateful: bool,
    ) -> OperatorMetrics {
        let labels = vec![
            ("pipeline".to_string(), pipeline.to_string()),
            ("operator".to_string(), format!("{index}_{operator}")),
        ];
        OperatorMetrics {
            records_in: self.records_in.get_or_create(&labels).clone(),
            records_out: self.records_out.get_or_create(&labels).clone(),
            errors: self.operator_errors.get_or_create(&labels).clone(),
            watermark_ms: self.state.watermark.get_or_create(&labels).clone(),
            state: stateful.then(|| {
                StateMetrics::new(
                    self.state.open_windows.get_or_create(&labels).clone(),
                    self.state.keys.get_or_create(&labels).clone(),
                    self.state.bytes.get_or_create(&labels).clone(),
                    self.state.emit_lag.get_or_create(&labels).clone(),
                    self.state.late.get_or_create(&labels).clone(),
                )
            }),
        }
    }

    /// The metrics of stream `stream`'s reader in `pipeline` (each pipeline reads its own input).
    pub fn source(&self, stream: &str, pipeline: &str, connector: &str) -> SourceMetrics {
        let labels = vec![
            ("pipeline".to_string(), pipeline.to_string()),
            ("operator".to_string(), format!("source_{connector}")),
        ];
        SourceMetrics {
            records_out: self.records_out.get_or_create(&labels).clone(),
            decode_errors: self.decode_errors.clone(),
            stream: stream.to_string(),
            pipeline: pipeline.to_string(),
            families: self.source.clone(),
        }
    }

    pub fn sink(&self, pipeline: &str, sink: &str) -> SinkMetrics {
        let labels = vec![
            ("pipeline".to_string(), pipeline.to_string()),
            ("sink".to_string(), sink.to_string()),
        ];
        SinkMetrics {
            rows_written: self.sink_rows.get_or_create(&labels).clone(),
            errors: self.sink_errors.get_or_create(&labels).clone(),
            write_seconds: self.sink_write_seconds.get_or_create(&labels).clone(),
        }
    }

    /// Bytes pipeline `pipeline` writes to its repartition topic on a cluster.
    pub fn shuffle_bytes(&self, pipeline: &str) -> Counter {
        self.shuffle_bytes
            .get_or_create(&vec![("pipeline".to_string(), pipeline.to_string())])
            .clone()
    }

    /// The remote-write sink `sink`'s metrics.
    pub fn remote_write(&self, sink: &str) -> RemoteWriteMetrics {
        RemoteWriteMetrics {
            sink: sink.to_string(),
            families: self.remote_write.clone(),
        }
    }

    /// The counter of logins ending with `result`.
    pub fn logins(&self, result: &str) -> Counter {
        self.logins
            .get_or_create(&vec![("result".to_string(), result.to_string())])
            .clone()
    }

    /// A gauge counting running pipelines of `kind`.
    pub fn pipelines_running(&self, kind: &str) -> Gauge {
        self.pipelines
            .get_or_create(&vec![("kind".to_string(), kind.to_string())])
            .clone()
    }

    /// The counters of a lookup join in `pipeline` against `table`.
    pub fn lookup_join(&self, pipeline: &str, table: &str) -> LookupJoinMetrics {
        let labels = vec![
            ("pipeline".to_string(), pipeline.to_string()),
            ("table".to_string(), table.to_string()),
        ];
        let lk = &self.lookup;
        LookupJoinMetrics {
            lookups: lk.lookups.get_or_create(&labels).clone(),
            hits: lk.hits.get_or_create(&labels).clone(),
            misses: lk.misses.get_or_create(&labels).clone(),
            seconds: lk.lookup_seconds.get_or_create(&labels).clone(),
        }
    }

    /// The metrics of lookup table `table`.
    pub fn lookup_table(&self, table: &str) -> LookupTableMetrics {
        let labels = vec![("table".to_string(), table.to_string())];
        let with = |key: &str, value: &str| {
            let mut l = labels.clone();
            l.push((key.to_string(), value.to_string()));
            l
        };
        let lk = &self.lookup;
        // One statement per family lookup: `get_or_create` returns a read guard, and a
        // second call on the same family within one expression would wait on it forever.
        let reloads_ok = lk.reloads.get_or_create(&with("result", "ok")).clone();
        let reloads_failed = lk.reloads.get_or_create(&with("result", "failed")).clone();
        LookupTableMetrics {
            rows: lk.table_rows.get_or_create(&labels).clone(),
            bytes: lk.table_bytes.get_or_create(&labels).clone(),
            reloads_ok,
            reloads_failed,
            cache_rows: lk.cache_rows.get_or_create(&labels).clone(),
            cache_bytes: lk.cache_bytes.get_or_create(&labels).clone(),
            queries: lk.queries.get_or_create(&labels).clone(),
            retries: lk.retries.get_or_create(&labels).clone(),
            cache_hits: lk.cache_hits.get_or_create(&labels).clone(),
            cache_misses: lk.cache_misses.get_or_create(&labels).clone(),
            changelog_lag: lk.changelog_lag.get_or_create(&labels).clone(),
        }
    }

    /// Everything, in the Prometheus text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let families = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &families.registry);
        // The encoder leaves out a family with no series yet (no Kafka source, say); it is
        // described anyway, so that /metrics lists every metric Weir has and dashboards and
        // alerts can be checked against it before the first series exists.
        let typed: std::collections::HashSet<&str> = out
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next())
            .collect();
        let missing: String = families
            .described
            .iter()
            .filter(|(name, ..)| !typed.contains(name.as_str()))
            .map(|(name, help, kind)| {
                format!("# HELP {name} {help}.\n# TYPE {name} {}\n", kind.as_str())
            })
            .collect();
        if let Some(eof) = out.rfind("# EOF") {
            out.insert_str(eof, &missing);
        }
        out
    }
}

/// The registry, and each family's name, help and type: what `/metrics` describes.
struct Families {
    registry: Registry,
    described: Vec<(String, String, MetricType)>,
}

impl Families {
    fn register<M: Metric + TypedMetric>(&mut self, name: &str, help: &str, metric: M) {
        self.described
            .push((format!("weir_{name}"), help.to_string(), M::TYPE));
        self.registry.register(name, help, metric);
    }
}

/// Counters of one operator in one pipeline.
#[derive(Clone, Debug, Default)]
pub struct OperatorMetrics {
    pub records_in: Counter,
    pub records_out: Counter,
    pub errors: Counter,
    /// The last watermark the operator received (ms since the epoch).
    pub watermark_ms: Gauge,
    /// Present for stateful operators only.
    pub state: Option<StateMetrics>,
}

#[derive(Clone, Debug, Default)]
struct StateFamilies {
    watermark: Family<Labels, Gauge>,
    open_windows: Family<Labels, Gauge>,
    keys: Family<Labels, Gauge>,
    bytes: Family<Labels, Gauge>,
    emit_lag: Family<Labels, Gauge>,
    late: Family<Labels, Counter>,
}

/// The state of one stateful operator, as [`crate::operator::StateReport`] tells it. The
/// copies of an operator in a pipeline's workers share the series: each adds what it holds
/// (keys, bytes, panes, late records) and takes it back when it goes away.
#[derive(Clone, Debug)]
pub struct StateMetrics {
    open_windows: Gauge,
    keys: Gauge,
    bytes: Gauge,
    emit_lag: Gauge,
    late: Counter,
    /// What this copy of the operator has added to the gauges and the counter.
    added: Arc<Mutex<Added>>,
}

#[derive(Debug, Default)]
struct Added {
    open_windows: i64,
    keys: i64,
    bytes: i64,
    /// Late records counted so far; `None` until the first report, whose count (restored
    /// from a checkpoint, and so counted by the run that dropped them) is the baseline.
    late: Option<u64>,
    gauges: Option<(Gauge, Gauge, Gauge)>,
}

impl Drop for Added {
    fn drop(&mut self) {
        if let Some((open_windows, keys, bytes)) = &self.gauges {
            open_windows.dec_by(self.open_windows);
            keys.dec_by(self.keys);
            bytes.dec_by(self.bytes);
        }
    }
}

impl StateMetrics {
    fn new(open_windows: Gauge, keys: Gauge, bytes: Gauge, emit_lag: Gauge, late: Counter) -> Self {
        let added = Added {
            gauges: Some((open_windows.clone(), keys.clone(), bytes.clone())),
            ..Added::default()
        };
        Self {
            open_windows,
            keys,
            bytes,
            emit_lag,
            late,
            added: Arc::new(Mutex::new(added)),
        }
    }

    pub fn record(&self, report: &crate::operator::StateReport) {
        let gauge = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        let mut guard = self.added.lock().unwrap_or_else(|e| e.into_inner());
        let added = &mut *guard;
        for (gauge_, value, previous) in [
            (
                &self.open_windows,
                gauge(report.open_windows),
                &mut added.open_windows,
            ),
            (&self.keys, gauge(report.keys), &mut added.keys),
            (&self.bytes, gauge(report.bytes), &mut added.bytes),
        ] {
            gauge_.inc_by(value.saturating_sub(*previous));
            *previous = value;
        }
        if let Some(lag) = report.emit_lag_ms {
            self.emit_lag.set(lag);
        }
        let counted = *added.late.get_or_insert(report.late_dropped);
        if report.late_dropped > counted {
            self.late.inc_by(report.late_dropped - counted);
            added.late = Some(report.late_dropped);
        }
    }
}

/// Counters of one source.
#[derive(Clone, Debug)]
pub struct SourceMetrics {
    pub records_out: Counter,
    decode_errors: Family<Labels, Counter>,
    stream: String,
    pipeline: String,
    families: SourceFamilies,
}

/// Counters and gauges of one partition of a source.
#[derive(Clone, Debug, Default)]
pub struct PartitionMetrics {
    pub records_in: Counter,
    pub bytes_in: Counter,
    /// Records between a resume position and the start of the broker's log: deleted unread.
    pub skipped: Counter,
    pub lag: Gauge,
    pub watermark_ms: Gauge,
}

impl SourceMetrics {
    /// Detached counters, for tests and tools that do not serve `/metrics`.
    pub fn detached() -> Self {
        Self {
            records_out: Counter::default(),
            decode_errors: Family::default(),
            stream: String::new(),
            pipeline: String::new(),
            families: SourceFamilies::default(),
        }
    }

    fn labels(&self, extra: Option<(&str, String)>) -> Labels {
        let mut labels = vec![
            ("source".to_string(), self.stream.clone()),
            ("pipeline".to_string(), self.pipeline.clone()),
        ];
        labels.extend(extra.map(|(k, v)| (k.to_string(), v)));
        labels
    }

    pub fn partition(&self, partition: i32) -> PartitionMetrics {
        let labels = self.labels(Some(("partition", partition.to_string())));
        let f = &self.families;
        PartitionMetrics {
            records_in: f.partition_records.get_or_create(&labels).clone(),
            bytes_in: f.partition_bytes.get_or_create(&labels).clone(),
            skipped: f.partition_skipped.get_or_create(&labels).clone(),
            lag: f.partition_lag.get_or_create(&labels).clone(),
            watermark_ms: f.partition_watermark.get_or_create(&labels).clone(),
        }
    }

    /// The source's own watermark (ms since the epoch).
    pub fn watermark_ms(&self) -> Gauge {
        self.families
            .watermark
            .get_or_create(&self.labels(None))
            .clone()
    }

    /// Offset commits by `result` (`ok`, `failed`).
    pub fn commits(&self, result: &str) -> Counter {
        self.families
            .commits
            .get_or_create(&self.labels(Some(("result", result.to_string()))))
            .clone()
    }

    pub fn rebalances(&self) -> Counter {
        self.families
            .rebalances
            .get_or_create(&self.labels(None))
            .clone()
    }

    pub fn client_errors(&self) -> Counter {
        self.families
            .client_errors
            .get_or_create(&self.labels(None))
            .clone()
    }

    pub fn dead_letters(&self) -> Counter {
        self.families
            .dead_letters
            .get_or_create(&self.labels(None))
            .clone()
    }

    /// Counts `n` records that did not decode, by reason (e.g. `json`, `csv`, `schema`).
    pub fn decode_errors(&self, reason: &str, n: u64) {
        let labels = vec![
            ("pipeline".to_string(), self.pipeline.clone()),
            ("reason".to_string(), reason.to_string()),
        ];
        self.decode_errors.get_or_create(&labels).inc_by(n);
    }
}

/// Metrics of one Prometheus remote-write sink.
#[derive(Clone, Debug)]
pub struct RemoteWriteMetrics {
    sink: String,
    families: RemoteWriteFamilies,
}

impl RemoteWriteMetrics {
    fn labels(&self, extra: Option<(&str, &str)>) -> Labels {
        let mut labels = vec![("sink".to_string(), self.sink.clone())];
        if let Some((k, v)) = extra {
            labels.push((k.to_string(), v.to_string()));
        }
        labels
    }

    pub fn samples_sent(&self) -> Counter {
        self.families
            .samples_sent
            .get_or_create(&self.labels(None))
            .clone()
    }

    pub fn samples_retried(&self) -> Counter {
        self.families
            .samples_retried
            .get_or_create(&self.labels(None))
            .clone()
    }

    pub fn samples_dropped(&self, reason: &str) -> Counter {
        let labels = self.labels(Some(("reason", reason)));
        self.families.samples_dropped.get_or_create(&labels).clone()
    }

    /// Requests answered with `code` (an HTTP status, or `error`).
    pub fn requests(&self, code: &str) -> Counter {
        let labels = self.labels(Some(("code", code)));
        self.families.requests.get_or_create(&labels).clone()
    }

    pub fn request_seconds(&self) -> Histogram {
        self.families
            .request_seconds
            .get_or_create(&self.labels(None))
            .clone()
    }

    pub fn queue_samples(&self) -> Gauge {
        self.families
            .queue_samples
            .get_or_create(&self.labels(None))
            .clone()
    }

    pub fn highest_sent_ms(&self, shard: usize) -> Gauge {
        let labels = self.labels(Some(("shard", &shard.to_string())));
        self.families.highest_sent_ms.get_or_create(&labels).clone()
    }
}

/// Counters of one lookup join.
#[derive(Clone, Debug)]
pub struct LookupJoinMetrics {
    pub lookups: Counter,
    pub hits: Counter,
    pub misses: Counter,
    /// Time per batch lookup.
    pub seconds: Histogram,
}

/// Metrics of one lookup table (shared by every join that reads it).
#[derive(Clone, Debug, Default)]
pub struct LookupTableMetrics {
    pub rows: Gauge,
    pub bytes: Gauge,
    pub reloads_ok: Counter,
    pub reloads_failed: Counter,
    pub cache_rows: Gauge,
    pub cache_bytes: Gauge,
    /// Queries sent to the external system (partial cache).
    pub queries: Counter,
    pub retries: Counter,
    /// Records a partial cache answered, and records whose key it had to fetch.
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub changelog_lag: Gauge,
}

/// Metrics of one job's checkpoints.
#[derive(Clone, Debug)]
pub struct CheckpointMetrics {
    pub completed: Counter,
    pub failed: Counter,
    pub seconds: Histogram,
    pub alignment_seconds: Histogram,
    pub bytes: Gauge,
    pub epoch: Gauge,
    pub restore_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
}

/// Counters of one sink.
#[derive(Clone, Debug, Default)]
pub struct SinkMetrics {
    pub rows_written: Counter,
    pub errors: Counter,
    /// Seconds spent in the sink's `write`.
    pub write_seconds: Counter<f64, AtomicU64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_appear_in_the_text_format() {
        let metrics = Metrics::new();
        metrics
            .operator("p1", "filter", 0, false)
            .records_in
            .inc_by(3);
        metrics.source("s", "p1", "file").decode_errors("json", 2);
        let text = metrics.encode();
        assert!(
            text.contains("weir_records_in_total{pipeline=\"p1\",operator=\"0_filter\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("weir_decode_errors_total{pipeline=\"p1\",reason=\"json\"} 2"),
            "{text}"
        );
    }

    #[test]
    fn families_without_series_are_described_once() {
        let metrics = Metrics::new();
        metrics.operator("p1", "filter", 0, false).records_in.inc();
        let text = metrics.encode();
        assert!(text.ends_with("# EOF\n"), "{text}");
        for (line, count) in [
            ("# TYPE weir_source_partition_lag gauge\n", 1),
            ("# TYPE weir_lookup_seconds histogram\n", 1),
            ("# TYPE weir_logins counter\n", 1),
            ("# TYPE weir_records_in counter\n", 1),
        ] {
            assert_eq!(text.matches(line).count(), count, "{line} in {text}");
        }
        assert!(
            text.contains("# HELP weir_source_partition_lag Consumer lag in records"),
            "{text}"
        );
    }
}
