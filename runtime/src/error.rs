//! [`Error`]: everything that can go wrong while a pipeline runs.

use arrow::error::ArrowError;
use datafusion::error::DataFusionError;

/// Errors of the runtime, split by cause.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input or configuration that a user can fix; the message says how.
    #[error("{0}")]
    Execution(String),
    #[error(transparent)]
    Arrow(#[from] ArrowError),
    #[error(transparent)]
    DataFusion(#[from] DataFusionError),
    #[error("I/O error on {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    /// A broken invariant inside Weir: always a bug.
    #[error("internal error (this is a bug in Weir): {0}")]
    Internal(String),
}

impl Error {
    pub fn io(path: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
