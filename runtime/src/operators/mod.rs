//! Operators. Stateless ones evaluate DataFusion physical expressions on whole batches.

mod filter;
mod lookup_join;
mod project;

pub use filter::FilterOperator;
pub use lookup_join::{DEFAULT_MAX_IN_FLIGHT, LookupJoin, LookupJoinSpec, LookupJoinType};
pub use project::ProjectOperator;
mod session;
#[cfg(test)]
pub(crate) mod test_support;
mod window;
pub use session::SessionAggregate;
pub use window::{
    GroupColumn, Phase, WindowAggregate, WindowAggregateSpec, WindowKind, partial_schema,
    window_operator,
};
