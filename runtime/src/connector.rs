//! The seam between the planner and the connectors: a registry that validates `WITH` options
//! at CREATE time into factories, which build a fresh [`Source`] or [`Sink`] per pipeline.

use std::fmt::Debug;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use weir_sql::Options;
use weir_sql::options::OptionError;

use crate::Result;
use crate::lookup::LookupTable;
use crate::operator::{Sink, Source};

/// Why a connector's configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    /// Unknown, missing or invalid option (SQLSTATE 22023).
    #[error(transparent)]
    Option(#[from] OptionError),
    /// A connector or option value a later version implements (SQLSTATE 0A000).
    #[error("feature not supported yet: {0}")]
    NotSupported(String),
    /// A file or directory named by the options does not exist (SQLSTATE 58P01).
    #[error("{0}")]
    MissingFile(String),
    /// Options that parse but do not fit the declared columns (SQLSTATE 22023).
    #[error("{0}")]
    Invalid(String),
    /// A server named by the options cannot be reached (SQLSTATE 08001).
    #[error("{0}")]
    Unreachable(String),
    /// An object named by the options (a Kafka topic) does not exist (SQLSTATE 42704).
    #[error("{0}")]
    MissingObject(String),
    /// A path outside the server's allowed roots, or an option SQL clients may not set
    /// (SQLSTATE 42501).
    #[error("{0}")]
    NotAllowed(String),
}

/// The event time a stream declares with `WATERMARK FOR column AS column - delay`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventTime {
    pub column: String,
    pub delay: std::time::Duration,
}

/// What a source connector is asked to read.
#[derive(Debug, Clone)]
pub struct SourceSpec {
    /// The stream's name.
    pub name: String,
    /// The declared columns.
    pub schema: SchemaRef,
    pub event_time: Option<EventTime>,
    /// True while a saved catalog is replayed at start: external systems are not checked then
    /// (a broker that is down at restart is an outage to ride out, not a reason to drop the
    /// stream).
    pub restoring: bool,
}

/// A validated source configuration; builds the [`Source`]s that read the stream.
pub trait SourceFactory: Send + Sync + Debug {
    /// The connector's name, e.g. `datagen`.
    fn connector(&self) -> &'static str;
    /// Whether the input ends by itself (a file read once, datagen with `max_rows`).
    fn is_bounded(&self) -> bool;
    /// A source for a pipeline (or, if [`SourceFactory::is_shared`], for all of them).
    fn create(&self) -> Result<Box<dyn Source>>;

    /// True when one source instance must feed every pipeline reading the stream: a Kafka
    /// consumer group, whose offsets are committed once every pipeline has its rows. False
    /// (the default) gives each pipeline its own copy of the input, as Flink does.
    fn is_shared(&self) -> bool {
        false
    }

    /// A source for a live tail: it must not disturb the pipelines (for Kafka: no consumer
    /// group, no commits, starting at the end of each partition).
    fn create_tail(&self) -> Result<Box<dyn Source>> {
        self.create()
    }

    /// Whether several sources of one pipeline can each read a share of the input (see
    /// [`crate::SourceContext::worker`]): Kafka, by partition. False (the default) runs the
    /// pipeline on one worker.
    fn splittable(&self) -> bool {
        false
    }

    /// One position for a source from the positions several workers saved (their shares may
    /// have been split differently). Only a [`SourceFactory::splittable`] source is ever
    /// asked to merge more than one.
    fn merge_positions(&self, mut positions: Vec<crate::Snapshot>) -> Result<crate::Snapshot> {
        match (positions.pop(), positions.is_empty()) {
            (Some(position), true) => Ok(position),
            _ => Err(crate::Error::Internal(format!(
                "a {} source cannot merge positions saved by several workers",
                self.connector()
            ))),
        }
    }

    /// Columns the source adds after the declared ones, selectable by name but left out of
    /// `SELECT *` (Kafka's `_key`, `_partition`, `_offset`, `_timestamp`).
    fn hidden_columns(&self) -> Vec<arrow::datatypes::FieldRef> {
        Vec::new()
    }

    /// The input as partitions that the processes of a cluster share through a group
    /// (`weir serve --cluster`), if it has partitions (Kafka).
    fn partitioned(&self) -> Option<Arc<dyn PartitionedSource>> {
        None
    }
}

/// What a group tells a cluster member.
#[derive(Debug)]
pub enum MembershipEvent {
    /// These partitions are now this process's.
    Assigned(Vec<i32>),
    /// These partitions go to another process once `done` is sent (or dropped): their
    /// tasks stop first, with a last checkpoint, so that the next owner resumes from it.
    Revoked(Vec<i32>, std::sync::mpsc::Sender<()>),
}

/// A seat in a group: assignments arrive on `events`; dropping it leaves the group.
pub struct Membership {
    pub events: tokio::sync::mpsc::Receiver<MembershipEvent>,
    /// Whatever keeps the seat (a consumer's thread); dropped to leave.
    pub seat: Box<dyn Send + Sync>,
}

/// An input split in partitions, shared by the processes of a cluster through groups, and
/// the shuffle between them (a repartition topic in the same Kafka). The calls that wait
/// on the broker block: run them off the runtime's threads.
pub trait PartitionedSource: Send + Sync + Debug {
    /// How many partitions the input has.
    fn partition_count(&self) -> Result<usize>;

    /// A source reading partition `partition` alone: from its checkpointed position, or
    /// else from its pipeline's group's committed offset, or per the stream's startup mode.
    fn create_partition(&self, partition: i32) -> Result<Box<dyn Source>>;

    /// Joins group `group` for a share of `topic`'s partitions (the input's by default).
    fn join(&self, group: &str, topic: Option<&str>) -> Result<Membership>;

    /// Creates the shuffle topic `topic` with `partitions` partitions, unless it exists;
    /// returns how many partitions it has (a broker that cannot create topics on request
    /// may have made it with its default count).
    fn create_shuffle(&self, topic: &str, partitions: usize) -> Result<usize>;

    /// Appends `record` under `key` to `topic`, a small topic of one partition created if
    /// missing and kept forever: the directory through which a cluster's processes find
    /// each other.
    fn publish(&self, topic: &str, key: &str, record: &[u8]) -> Result<()>;

    /// Every record of `topic` (see [`PartitionedSource::publish`]), oldest first; none if
    /// the topic does not exist.
    fn read_all(&self, topic: &str) -> Result<Vec<(String, Vec<u8>)>>;

    /// The writer of input partition `writer` (of `writers`) into the shuffle: rows go to
    /// the partition their `keys` hash to; the bytes written are counted in `bytes`.
    fn shuffle_writer(
        &self,
        topic: &str,
        partitions: usize,
        keys: Vec<Arc<dyn datafusion::physical_expr::PhysicalExpr>>,
        writer: i32,
        writers: usize,
        bytes: crate::metrics::Counter,
    ) -> Result<Box<dyn Sink>>;

    /// The reader of the shuffle's partition `partition`, whose rows have `schema`.
    fn shuffle_reader(
        &self,
        topic: &str,
        partition: i32,
        schema: SchemaRef,
    ) -> Result<Box<dyn Source>>;
}

/// What a sink connector is asked to write.
#[derive(Debug, Clone)]
pub struct SinkSpec {
    /// The sink's name.
    pub name: String,
    /// The rows the sink will receive.
    pub schema: SchemaRef,
    /// True while a saved catalog is replayed (see [`SourceSpec::restoring`]).
    pub restoring: bool,
}

/// A validated sink configuration.
pub trait SinkFactory: Send + Sync + Debug {
    fn connector(&self) -> &'static str;
    /// A sink for the pipeline; `metrics` is where it may register its own metrics.
    fn create(&self, metrics: &crate::Metrics) -> Result<Box<dyn Sink>>;

    /// A sink for one of the pipeline's instances on a cluster (`instance` names its
    /// partition, e.g. `r3`); several run at once, in this process and others, so what they
    /// name (files) must not collide.
    fn create_instance(&self, metrics: &crate::Metrics, _instance: &str) -> Result<Box<dyn Sink>> {
        self.create(metrics)
    }
}

/// What a table connector is asked to serve.
#[derive(Debug, Clone)]
pub struct TableSpec {
    /// The table's name.
    pub name: String,
    /// The declared columns.
    pub schema: SchemaRef,
    /// The primary key's columns (indices into `schema`), in key order; never empty.
    pub key_columns: Vec<usize>,
    /// True while a saved catalog is replayed (see [`SourceSpec::restoring`]).
    pub restoring: bool,
}

/// A validated table configuration.
#[async_trait::async_trait]
pub trait TableFactory: Send + Sync + Debug {
    fn connector(&self) -> &'static str;

    /// Opens the table for lookups: an in-memory table is loaded (a failure is the CREATE's
    /// error) and its refresh started. The refresh stops when the returned table is dropped.
    async fn open(&self, metrics: &crate::Metrics) -> Result<Arc<dyn LookupTable>>;
}

/// Turns `WITH` options into factories. Implemented by `weir-connectors`, injected by the
/// server, so that the planner validates options without depending on any connector.
pub trait ConnectorRegistry: Send + Sync + Debug {
    fn source(
        &self,
        spec: &SourceSpec,
        options: &Options,
    ) -> Result<Arc<dyn SourceFactory>, ConnectorError>;

    fn sink(
        &self,
        spec: &SinkSpec,
        options: &Options,
    ) -> Result<Arc<dyn SinkFactory>, ConnectorError>;

    fn table(
        &self,
        spec: &TableSpec,
        options: &Options,
    ) -> Result<Arc<dyn TableFactory>, ConnectorError>;
}
