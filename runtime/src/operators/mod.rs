//! Operators. Stateless ones evaluate DataFusion physical expressions on whole batches.

mod filter;
mod project;

pub use filter::FilterOperator;
pub use project::ProjectOperator;
mod window;
pub use window::{GroupColumn, WindowAggregate, WindowAggregateSpec, WindowKind};
