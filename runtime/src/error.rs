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
    /// A service outside Weir (a broker, an HTTP receiver, a database, an object store)
    /// failed or cannot be reached: not a bug, and often passing.
    #[error("{message}")]
    External { kind: External, message: String },
    /// A broken invariant inside Weir: always a bug.
    #[error("internal error (this is a bug in Weir): {0}")]
    Internal(String),
}

/// What went wrong outside Weir, by the SQLSTATE class Postgres reports it with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum External {
    /// The service cannot be reached, or the connection broke (08006).
    Connection,
    /// The service is out of a resource: disk, memory, a quota (53000).
    Resources,
    /// The service refused or ended the work: shutting down, throttling, denying access
    /// (57000).
    Refused,
}

impl External {
    pub fn sqlstate(self) -> &'static str {
        match self {
            External::Connection => "08006",
            External::Resources => "53000",
            External::Refused => "57000",
        }
    }
}

impl Error {
    pub fn io(path: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub fn external(kind: External, message: impl Into<String>) -> Self {
        Error::External {
            kind,
            message: message.into(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
