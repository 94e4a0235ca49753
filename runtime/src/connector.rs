//! The seam between the planner and the connectors: a registry that validates `WITH` options
//! at CREATE time into factories, which build a fresh [`Source`] or [`Sink`] per pipeline.

use std::fmt::Debug;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use weir_sql::Options;
use weir_sql::options::OptionError;

use crate::Result;
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
}

/// A validated source configuration; builds one [`Source`] per pipeline reading the stream.
pub trait SourceFactory: Send + Sync + Debug {
    /// The connector's name, e.g. `datagen`.
    fn connector(&self) -> &'static str;
    /// Whether the input ends by itself (a file read once, datagen with `max_rows`).
    fn is_bounded(&self) -> bool;
    fn create(&self) -> Result<Box<dyn Source>>;
}

/// A validated sink configuration.
pub trait SinkFactory: Send + Sync + Debug {
    fn connector(&self) -> &'static str;
    fn create(&self) -> Result<Box<dyn Sink>>;
}

/// Turns `WITH` options into factories. Implemented by `weir-connectors`, injected by the
/// server, so that the planner validates options without depending on any connector.
pub trait ConnectorRegistry: Send + Sync + Debug {
    /// `schema` is the stream's declared columns; `name` the stream's name.
    fn source(
        &self,
        name: &str,
        schema: SchemaRef,
        options: &Options,
    ) -> Result<Arc<dyn SourceFactory>, ConnectorError>;

    /// `schema` is the rows the sink will receive; `name` the sink's name.
    fn sink(
        &self,
        name: &str,
        schema: SchemaRef,
        options: &Options,
    ) -> Result<Arc<dyn SinkFactory>, ConnectorError>;
}
