//! Operators. Stateless ones evaluate DataFusion physical expressions on whole batches.

mod filter;
mod project;

pub use filter::FilterOperator;
pub use project::ProjectOperator;
mod session;
#[cfg(test)]
mod test_support;
mod window;
pub use session::SessionAggregate;
pub use window::{GroupColumn, WindowAggregate, WindowAggregateSpec, WindowKind, window_operator};
