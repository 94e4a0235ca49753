//! The rows of SHOW, DESCRIBE, SHOW CREATE and EXPLAIN. Each has a fixed schema (also used to
//! describe the statement to extended-protocol clients before it runs).

use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanArray, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use weir_planner::catalog::{Catalog, CatalogEntry};
use weir_planner::{PlanError, Result};
use weir_runtime::sql_type_name;
use weir_sql::{ObjectKind, ShowKind};

use crate::engine::{Output, PipelineRow};

fn utf8_schema(names: &[&str]) -> SchemaRef {
    Arc::new(Schema::new(
        names
            .iter()
            .map(|n| Field::new(*n, DataType::Utf8, true))
            .collect::<Vec<_>>(),
    ))
}

fn rows(schema: SchemaRef, columns: Vec<ArrayRef>) -> Result<Output> {
    let batch = RecordBatch::try_new(schema.clone(), columns)
        .map_err(|e| PlanError::Internal(format!("introspection rows: {e}")))?;
    Ok(Output::Rows {
        schema,
        batches: vec![batch],
    })
}

fn text_rows(schema: SchemaRef, table: Vec<Vec<String>>) -> Result<Output> {
    let columns = (0..schema.fields().len())
        .map(|c| {
            Arc::new(StringArray::from_iter_values(
                table.iter().map(|r| r[c].as_str()),
            )) as ArrayRef
        })
        .collect();
    rows(schema, columns)
}

/// The columns of `SHOW <kind>`.
pub fn show_schema(kind: ShowKind) -> SchemaRef {
    match kind {
        ShowKind::Streams | ShowKind::Tables => utf8_schema(&["name", "connector", "columns"]),
        ShowKind::Views => utf8_schema(&["name", "reads", "columns"]),
        ShowKind::MaterializedViews => utf8_schema(&["name", "reads", "status"]),
        ShowKind::Sinks => utf8_schema(&["name", "connector", "reads", "status"]),
        ShowKind::Queries => utf8_schema(&[
            "name",
            "kind",
            "reads",
            "status",
            "uptime",
            "last_checkpoint",
            "restored_from",
            "restarts",
            "instances",
        ]),
        ShowKind::Users => utf8_schema(&["name", "privileges", "can_login"]),
    }
}

/// `SHOW USERS`: every user, its privileges (`admin`, `read` or none) and whether it has a
/// password. Verifiers are never shown.
pub fn show_users(users: &[crate::users::UserRow]) -> Result<Output> {
    let table = users
        .iter()
        .map(|u| {
            let privileges = if u.admin {
                "admin"
            } else if u.read {
                "read"
            } else {
                ""
            };
            vec![
                u.name.clone(),
                privileges.to_string(),
                u.can_login.to_string(),
            ]
        })
        .collect();
    text_rows(show_schema(ShowKind::Users), table)
}

/// `SHOW STREAMS | TABLES | VIEWS | MATERIALIZED VIEWS | SINKS | QUERIES`.
pub fn show(catalog: &Catalog, kind: ShowKind, running: &[PipelineRow]) -> Result<Output> {
    let status_of = |name: &str| {
        running
            .iter()
            .find(|r| r.name == name)
            .map(|r| r.status.to_string())
            .unwrap_or_else(|| "not started".into())
    };
    let columns_of = |e: &CatalogEntry| {
        e.schema
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let table: Vec<Vec<String>> = match kind {
        ShowKind::Streams | ShowKind::Tables => {
            let object = if kind == ShowKind::Streams {
                ObjectKind::Stream
            } else {
                ObjectKind::Table
            };
            catalog
                .of_kind(object)
                .map(|e| {
                    vec![
                        e.name.clone(),
                        e.connector.clone().unwrap_or_default(),
                        columns_of(e),
                    ]
                })
                .collect()
        }
        ShowKind::Views => catalog
            .of_kind(ObjectKind::View)
            .map(|e| vec![e.name.clone(), e.depends_on.join(", "), columns_of(e)])
            .collect(),
        ShowKind::MaterializedViews => catalog
            .of_kind(ObjectKind::MaterializedView)
            .map(|e| vec![e.name.clone(), e.depends_on.join(", "), status_of(&e.name)])
            .collect(),
        ShowKind::Sinks => catalog
            .of_kind(ObjectKind::Sink)
            .map(|e| {
                vec![
                    e.name.clone(),
                    e.connector.clone().unwrap_or_default(),
                    e.depends_on.join(", "),
                    status_of(&e.name),
                ]
            })
            .collect(),
        ShowKind::Queries => {
            let mut sorted: Vec<_> = running.iter().collect();
            sorted.sort_by(|a, b| a.name.cmp(&b.name));
            sorted
                .into_iter()
                .map(|row| {
                    let info = &row.checkpoints;
                    let last = match info.last {
                        Some((epoch, at_ms, took, bytes)) => {
                            let at = chrono::DateTime::from_timestamp_millis(at_ms)
                                .map(|t| t.format("%Y-%m-%d %H:%M:%S%.3f").to_string())
                                .unwrap_or_default();
                            let mut text = format!(
                                "epoch {epoch} at {at}, {} ms, {bytes} bytes",
                                took.as_millis()
                            );
                            if info.failed > 0 {
                                text.push_str(&format!(", {} failed", info.failed));
                            }
                            text
                        }
                        None if info.failed > 0 => format!("none ({} failed)", info.failed),
                        None => "none".to_string(),
                    };
                    let restored = match info.restored {
                        Some((epoch, took)) => {
                            format!("epoch {epoch} in {} ms", took.as_millis())
                        }
                        None => String::new(),
                    };
                    vec![
                        row.name.clone(),
                        row.kind.to_string(),
                        row.input.clone(),
                        row.status.to_string(),
                        format!("{}s", row.started.elapsed().as_secs()),
                        last,
                        restored,
                        match &row.restarts {
                            (0, None) => "0".to_string(),
                            (n, None) => n.to_string(),
                            (n, Some(cause)) => format!("{n} (last failure: {cause})"),
                        },
                        row.instances.join(" "),
                    ]
                })
                .collect()
        }
        ShowKind::Users => {
            return Err(PlanError::Internal(
                "SHOW USERS is answered from the users, not the catalog".into(),
            ));
        }
    };
    text_rows(show_schema(kind), table)
}

pub fn show_create_schema() -> SchemaRef {
    utf8_schema(&["name", "create_statement"])
}

/// `SHOW CREATE <kind> name`: the statement as written, with secret option values (passwords,
/// tokens, header values) shown as `'***'`.
pub fn show_create(entry: &CatalogEntry) -> Result<Output> {
    text_rows(
        show_create_schema(),
        vec![vec![
            entry.name.clone(),
            weir_sql::redact_secrets(&entry.sql),
        ]],
    )
}

pub fn describe_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("column", DataType::Utf8, false),
        Field::new("type", DataType::Utf8, false),
        Field::new("nullable", DataType::Boolean, false),
        Field::new("event_time", DataType::Boolean, false),
    ]))
}

/// `DESCRIBE name`: one row per column.
pub fn describe(entry: &CatalogEntry) -> Result<Output> {
    let fields = entry.schema.fields();
    let names = StringArray::from_iter_values(fields.iter().map(|f| f.name().as_str()));
    let types = StringArray::from_iter_values(fields.iter().map(|f| sql_type_name(f.data_type())));
    let nullable = BooleanArray::from(fields.iter().map(|f| f.is_nullable()).collect::<Vec<_>>());
    let event_time = BooleanArray::from(
        fields
            .iter()
            .map(|f| entry.watermark_column.as_deref() == Some(f.name().as_str()))
            .collect::<Vec<_>>(),
    );
    rows(
        describe_schema(),
        vec![
            Arc::new(names),
            Arc::new(types),
            Arc::new(nullable),
            Arc::new(event_time),
        ],
    )
}

pub fn explain_schema() -> SchemaRef {
    utf8_schema(&["plan"])
}

pub fn explain_rows(lines: Vec<String>) -> Result<Output> {
    text_rows(
        explain_schema(),
        lines.into_iter().map(|l| vec![l]).collect(),
    )
}

pub fn show_variable_schema() -> SchemaRef {
    utf8_schema(&["setting"])
}

/// The Postgres version Weir answers as (in the startup's `server_version` too): clients
/// gate features on it, and Weir's catalog answers psql and drivers of that version.
pub const SERVER_VERSION: &str = "16.6 (Weir)";

/// The few settings clients ask about (`SHOW name`, `current_setting('name')`); `None`
/// for any other. They are fixed: `SET` is accepted and changes nothing.
pub fn setting(name: &str) -> Option<&'static str> {
    Some(match name.to_ascii_lowercase().as_str() {
        "transaction isolation level" | "transaction_isolation" => "read committed",
        "search_path" => "public",
        "server_version" => SERVER_VERSION,
        "server_version_num" => "160006",
        "server_encoding" | "client_encoding" => "UTF8",
        "timezone" | "time zone" => "UTC",
        "datestyle" => "ISO, MDY",
        "intervalstyle" => "postgres",
        "integer_datetimes" => "on",
        "standard_conforming_strings" => "on",
        "max_identifier_length" => "63",
        "default_transaction_read_only" => "off",
        _ => return None,
    })
}

/// The error for a setting [`setting`] does not know (42704, as Postgres).
pub fn unknown_setting(name: &str) -> PlanError {
    PlanError::Plan {
        sqlstate: "42704",
        message: format!("unrecognized configuration parameter \"{name}\""),
    }
}

/// `SHOW <variable>` for the few settings clients ask about.
pub fn show_variable(name: &str) -> Result<Output> {
    let value = setting(name).ok_or_else(|| unknown_setting(name))?;
    text_rows(show_variable_schema(), vec![vec![value.to_string()]])
}
