//! [`PlanError`] to a Postgres ErrorResponse.

use pgwire::error::{ErrorInfo, PgWireError};
use weir_planner::PlanError;

/// The ErrorResponse fields for `error`, raised by statement text `sql`.
pub fn error_info(error: &PlanError, sql: &str) -> ErrorInfo {
    let mut info = ErrorInfo::new(
        "ERROR".to_string(),
        error.sqlstate().to_string(),
        error.to_string(),
    );
    if let Some(position) = error.position() {
        info.position = Some(position.offset_in(sql).to_string());
    }
    if let PlanError::InvalidOption { key, .. } = error
        && !key.is_empty()
    {
        info.hint = Some(format!("check the WITH option '{key}' against docs/sql.md"));
    }
    info
}

pub fn to_pg_error(error: &PlanError, sql: &str) -> PgWireError {
    PgWireError::UserError(Box::new(error_info(error, sql)))
}
