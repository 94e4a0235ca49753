//! Weir's runtime: what runs once a statement has been planned.
//!
//! # Layout
//!
//! - [`message`]: [`Message`], the one type on every channel (data, watermarks, barriers, end).
//! - [`operator`]: the [`Operator`] trait (only `process_batch` is required) and the
//!   [`Source`] / [`Sink`] traits connectors implement.
//!   [`AsyncOperator`] is the seam for steps that wait on I/O per batch (ordered, bounded in
//!   flight); [`Stage`] is either kind.
//! - [`operators`]: stateless operators evaluated with DataFusion physical expressions
//!   ([`operators::FilterOperator`], [`operators::ProjectOperator`]), window aggregates, and
//!   [`operators::LookupJoin`].
//! - [`lookup`]: [`lookup::LookupTable`], the keyed side of a lookup join, and
//!   [`lookup::TableVersion`], an indexed in-memory version of a table swapped whole on reload.
//! - [`pipeline`]: a source, a chain of operators and a [`pipeline::Fanout`] to any number of
//!   consumers, connected by bounded channels; [`pipeline::Pipeline::spawn`] runs them on tokio.
//! - [`exchange`]: a pipeline's workers: [`exchange::spawn_router`] sends each row to the
//!   worker its key hashes to, [`exchange::spawn_merge`] joins inputs with aligned barriers.
//! - [`checkpoint`]: [`Snapshot`] (what one participant saves: JSON facts and Arrow
//!   batches), [`Checkpoint`] (a job's snapshots at one epoch) and [`CheckpointStore`]
//!   (complete checkpoints only, the last few kept, in any `object_store`).
//! - [`coordinator`]: [`coordinator::Coordinator`], which takes a job's checkpoints: barriers
//!   into the source on an interval, snapshots written to the store, epochs announced
//!   committed to sinks and sources.
//! - [`connector`]: [`connector::ConnectorRegistry`], the seam to the connectors crate.
//! - [`mv_store`]: [`mv_store::MvStore`], the bounded in-memory rows of a materialized view.
//! - [`metrics`]: counters for `/metrics` (records in/out per operator, decode errors, rows
//!   written per sink).
//! - [`sql_types`]: [`sql_type_name`], how a user would declare an Arrow type (`DESCRIBE`,
//!   error messages).
//! - [`storage`]: [`storage::parse_location`], a local directory or an object store URL
//!   (checkpoints and the Parquet lake accept the same locations).
//! - [`error`]: [`Error`], split by cause.

pub mod checkpoint;
pub mod connector;
pub mod coordinator;
pub mod error;
pub mod exchange;
pub mod lookup;
pub mod message;
pub mod metrics;
pub mod mv_store;
pub mod operator;
pub mod operators;
pub mod pipeline;
pub mod sql_types;
pub mod storage;

pub use checkpoint::{Checkpoint, CheckpointStore, CommitLog, Snapshot};
pub use error::{Error, Result};
pub use message::{CheckpointBarrier, EpochDone, Message, Watermark};
pub use metrics::Metrics;
pub use operator::{AsyncOperator, Operator, Sink, Source, SourceContext, SourceExit, Stage};
pub use sql_types::sql_type_name;
pub use tokio_util::sync::CancellationToken;

/// Capacity, in messages, of every channel between two tasks. Small on purpose: a slow
/// consumer stops its producer after a few batches instead of buffering without limit.
pub const CHANNEL_CAPACITY: usize = 4;
