//! Weir's SQL dialect: the user-facing contract in `docs/sql.md`.
//!
//! # Layout
//!
//! - [`dialect`]: [`WeirDialect`], sqlparser's generic dialect plus `FOR SYSTEM_TIME AS OF`
//!   and the Flink `TABLE s` / `DESCRIPTOR(col)` window-function arguments.
//! - [`statement`]: [`Statement`], Weir's own statements (CREATE STREAM / TABLE / MATERIALIZED
//!   VIEW / SINK, SHOW, DESCRIBE, DROP, ...) wrapping sqlparser's for everything standard.
//! - [`parser`]: [`parse_sql`], built from sqlparser's own `Parser` primitives (no forking,
//!   no text pre-processing), so queries and expressions stay sqlparser's.
//! - [`options`]: [`Options`], the `WITH (...)` map, with typed accessors for durations,
//!   sizes, booleans and numbers, and detection of unknown keys.
//! - [`redact`]: [`redact_secrets`], statement text with secret option values hidden, for
//!   `SHOW CREATE`.
//! - [`error`]: [`SqlError`], a message with the statement position it refers to.

pub mod dialect;
pub mod error;
pub mod options;
pub mod parser;
pub mod redact;
pub mod statement;

pub use dialect::WeirDialect;
pub use error::{Position, SqlError};
pub use options::Options;
pub use parser::{parse_sql, parse_sql_with_positions};
pub use redact::redact_secrets;
pub use sqlparser;
pub use statement::{
    CreateMaterializedView, CreateSink, CreateSource, CreateView, ObjectKind, Privilege, ShowKind,
    SinkInput, Statement, Watermark,
};
