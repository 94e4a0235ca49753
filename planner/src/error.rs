//! [`PlanError`]: what a client sees when a statement is refused.

use datafusion::error::DataFusionError;
use weir_runtime::connector::ConnectorError;
use weir_sql::{Position, SqlError};

/// A statement that cannot be planned or executed, with the SQLSTATE the client receives.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// 42601.
    #[error("{message}")]
    Syntax {
        message: String,
        position: Option<Position>,
    },
    /// 42P07.
    #[error("{kind} \"{name}\" already exists")]
    Duplicate { kind: String, name: String },
    /// 42P01.
    #[error("{0}")]
    Undefined(String),
    /// 22023: an unknown, missing or invalid `WITH` option, named.
    #[error("{message}")]
    InvalidOption { key: String, message: String },
    /// 0A000.
    #[error("feature not supported yet: {0}")]
    NotSupported(String),
    /// 58P01.
    #[error("{0}")]
    MissingFile(String),
    /// 2BP01.
    #[error("{0}")]
    Dependent(String),
    /// 42xxx from DataFusion's planner (unknown column, type mismatch, ...).
    #[error("{message}")]
    Plan {
        sqlstate: &'static str,
        message: String,
    },
    /// 08xxx, 53xxx, 57xxx: a service outside Weir (broker, receiver, database) failed.
    #[error("{message}")]
    External {
        sqlstate: &'static str,
        message: String,
    },
    /// 42501: the user lacks the privilege the statement needs.
    #[error("{0}")]
    Privilege(String),
    /// 22000-class errors while executing.
    #[error("{0}")]
    Execution(String),
    /// XX000: a bug.
    #[error("internal error (this is a bug in Weir): {0}")]
    Internal(String),
}

pub type Result<T, E = PlanError> = std::result::Result<T, E>;

impl PlanError {
    /// The SQLSTATE code for this error.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            PlanError::Syntax { .. } => "42601",
            PlanError::Duplicate { .. } => "42P07",
            PlanError::Undefined(_) => "42P01",
            PlanError::InvalidOption { .. } => "22023",
            PlanError::NotSupported(_) => "0A000",
            PlanError::MissingFile(_) => "58P01",
            PlanError::Dependent(_) => "2BP01",
            PlanError::Plan { sqlstate, .. } | PlanError::External { sqlstate, .. } => sqlstate,
            PlanError::Privilege(_) => "42501",
            PlanError::Execution(_) => "22000",
            PlanError::Internal(_) => "XX000",
        }
    }

    /// The position in the statement the error refers to, when known.
    pub fn position(&self) -> Option<Position> {
        match self {
            PlanError::Syntax { position, .. } => *position,
            _ => None,
        }
    }

    pub fn undefined(kind: &str, name: &str) -> Self {
        PlanError::Undefined(format!("{kind} \"{name}\" does not exist"))
    }
}

impl From<SqlError> for PlanError {
    fn from(e: SqlError) -> Self {
        PlanError::Syntax {
            message: e.message,
            position: e.position,
        }
    }
}

impl From<ConnectorError> for PlanError {
    fn from(e: ConnectorError) -> Self {
        match e {
            ConnectorError::Option(o) => PlanError::InvalidOption {
                key: o.key,
                message: o.message,
            },
            ConnectorError::NotSupported(what) => PlanError::NotSupported(what),
            ConnectorError::MissingFile(m) => PlanError::MissingFile(m),
            ConnectorError::Invalid(m) => PlanError::InvalidOption {
                key: String::new(),
                message: m,
            },
            ConnectorError::Unreachable(message) => PlanError::External {
                sqlstate: "08001",
                message,
            },
            ConnectorError::MissingObject(message) => PlanError::Plan {
                sqlstate: "42704",
                message,
            },
            ConnectorError::NotAllowed(message) => PlanError::Privilege(message),
        }
    }
}

impl From<weir_sql::options::OptionError> for PlanError {
    fn from(o: weir_sql::options::OptionError) -> Self {
        PlanError::InvalidOption {
            key: o.key,
            message: o.message,
        }
    }
}

impl From<weir_runtime::Error> for PlanError {
    fn from(e: weir_runtime::Error) -> Self {
        match e {
            weir_runtime::Error::DataFusion(e) => e.into(),
            weir_runtime::Error::Internal(m) => PlanError::Internal(m),
            weir_runtime::Error::External { kind, message } => PlanError::External {
                sqlstate: kind.sqlstate(),
                message,
            },
            other => PlanError::Execution(other.to_string()),
        }
    }
}

impl From<arrow::error::ArrowError> for PlanError {
    fn from(e: arrow::error::ArrowError) -> Self {
        PlanError::Execution(e.to_string())
    }
}

impl From<DataFusionError> for PlanError {
    fn from(e: DataFusionError) -> Self {
        match e.find_root() {
            DataFusionError::SQL(parse, _) => SqlError::from_parser(parse.as_ref().clone()).into(),
            DataFusionError::NotImplemented(m) => PlanError::NotSupported(m.clone()),
            DataFusionError::Plan(m) => PlanError::Plan {
                sqlstate: plan_sqlstate(m),
                message: m.clone(),
            },
            DataFusionError::SchemaError(err, _) => {
                use datafusion::common::SchemaError;
                let sqlstate = match err.as_ref() {
                    SchemaError::FieldNotFound { .. } => "42703",
                    SchemaError::AmbiguousReference { .. } => "42702",
                    SchemaError::DuplicateQualifiedField { .. }
                    | SchemaError::DuplicateUnqualifiedField { .. } => "42701",
                };
                PlanError::Plan {
                    sqlstate,
                    message: err.to_string(),
                }
            }
            DataFusionError::Internal(m) => PlanError::Internal(m.clone()),
            // Weir's own functions run inside DataFusion and raise Weir's errors through it.
            DataFusionError::External(inner) => match inner.downcast_ref::<PlanError>() {
                Some(own) => PlanError::Plan {
                    sqlstate: own.sqlstate(),
                    message: own.to_string(),
                },
                None => match inner.downcast_ref::<weir_runtime::Error>() {
                    Some(weir_runtime::Error::External { kind, message }) => PlanError::External {
                        sqlstate: kind.sqlstate(),
                        message: message.clone(),
                    },
                    _ => PlanError::Execution(inner.to_string()),
                },
            },
            other => PlanError::Execution(strip_prefixes(&other.to_string())),
        }
    }
}

/// Postgres' codes for the planning errors users hit most. DataFusion raises these as
/// `Plan(String)`, with no variant to tell them apart (schema errors are mapped by variant
/// above), so only the text can.
fn plan_sqlstate(message: &str) -> &'static str {
    if message.contains("No field named")
        || message.contains("not found") && message.contains("column")
    {
        "42703"
    } else if message.contains("table") && message.contains("not found") {
        "42P01"
    } else if message.contains("Invalid function")
        || message.contains("function") && message.contains("not found")
    {
        "42883"
    } else {
        "42000"
    }
}

fn strip_prefixes(message: &str) -> String {
    let mut m = message;
    for prefix in [
        "Execution error: ",
        "Arrow error: ",
        "External error: ",
        "Error during planning: ",
    ] {
        m = m.strip_prefix(prefix).unwrap_or(m);
    }
    m.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir_runtime::error::External;

    #[test]
    fn errors_outside_weir_carry_their_class_not_internal() {
        for (kind, sqlstate) in [
            (External::Connection, "08006"),
            (External::Resources, "53000"),
            (External::Refused, "57000"),
        ] {
            let e = PlanError::from(weir_runtime::Error::external(kind, "broker down"));
            assert_eq!(e.sqlstate(), sqlstate);
            assert_eq!(
                e.to_string(),
                "broker down",
                "no 'this is a bug' for {kind:?}"
            );
        }
        let unreachable = PlanError::from(ConnectorError::Unreachable("no broker".into()));
        assert_eq!(unreachable.sqlstate(), "08001");
    }

    #[test]
    fn schema_errors_are_mapped_by_variant() {
        use datafusion::common::{Column, SchemaError};
        let missing = DataFusionError::SchemaError(
            Box::new(SchemaError::FieldNotFound {
                field: Box::new(Column::from_name("nope")),
                valid_fields: vec![Column::from_name("a")],
            }),
            Box::new(None),
        );
        assert_eq!(PlanError::from(missing).sqlstate(), "42703");
        let twice = DataFusionError::SchemaError(
            Box::new(SchemaError::DuplicateUnqualifiedField { name: "a".into() }),
            Box::new(None),
        );
        assert_eq!(PlanError::from(twice).sqlstate(), "42701");
    }
}
