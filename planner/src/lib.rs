//! Weir's planner: from statements to catalog objects and runnable operator chains.
//!
//! # Layout
//!
//! - [`error`]: [`PlanError`], each variant with its SQLSTATE.
//! - [`catalog`]: [`Catalog`], the definitions of streams, tables, views and sinks, their
//!   dependencies, and their persistence as the SQL that created them.
//! - [`schema`]: declared columns to an Arrow schema (DataFusion's own type mapping).
//! - [`tables`]: DataFusion table providers for catalog objects, so psql's `\d` and ad-hoc
//!   `SELECT`s see them.
//! - [`continuous`]: [`continuous::plan_continuous`], a `SELECT` over a stream through
//!   DataFusion's logical planner and optimizer, lowered to runtime operators.

pub mod catalog;
pub mod continuous;
pub mod error;
pub mod schema;
pub mod tables;
pub mod window;

pub use catalog::{Catalog, CatalogEntry};
pub use continuous::ContinuousPlan;
pub use error::{PlanError, Result};
