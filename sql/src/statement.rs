//! [`Statement`]: everything Weir accepts, standard SQL wrapped as sqlparser's AST.

use std::fmt;

use sqlparser::ast::{ColumnDef, Expr, Query};

use crate::options::Options;

/// The kinds of catalog objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjectKind {
    Stream,
    Table,
    /// A named query, not stored: inlined into the statements that read it.
    View,
    MaterializedView,
    Sink,
}

impl ObjectKind {
    /// The SQL words for the kind, e.g. `MATERIALIZED VIEW`.
    pub fn sql_name(self) -> &'static str {
        match self {
            ObjectKind::Stream => "STREAM",
            ObjectKind::Table => "TABLE",
            ObjectKind::View => "VIEW",
            ObjectKind::MaterializedView => "MATERIALIZED VIEW",
            ObjectKind::Sink => "SINK",
        }
    }
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ObjectKind::Stream => "stream",
            ObjectKind::Table => "table",
            ObjectKind::View => "view",
            ObjectKind::MaterializedView => "materialized view",
            ObjectKind::Sink => "sink",
        })
    }
}

/// `SHOW <what>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShowKind {
    Streams,
    Tables,
    Views,
    MaterializedViews,
    Sinks,
    Queries,
    Users,
}

/// What a user may do. Two levels, over every object: privileges are per server, not per
/// object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Privilege {
    /// Queries (SELECT on streams, tables and views, tails too), SHOW, DESCRIBE, EXPLAIN.
    Read,
    /// Everything: DDL and user management, and what `Read` allows.
    Admin,
}

impl fmt::Display for Privilege {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Privilege::Read => "read",
            Privilege::Admin => "admin",
        })
    }
}

/// `WATERMARK FOR column AS expr`.
#[derive(Debug, Clone, PartialEq)]
pub struct Watermark {
    pub column: String,
    pub expr: Expr,
}

/// `CREATE STREAM` or `CREATE TABLE`: a named, typed view of a connector.
#[derive(Debug, Clone, PartialEq)]
pub struct CreateSource {
    pub name: String,
    pub if_not_exists: bool,
    pub columns: Vec<ColumnDef>,
    pub watermark: Option<Watermark>,
    /// Column names of the primary key (tables), normalized.
    pub primary_key: Vec<String>,
    pub options: Options,
}

/// `CREATE MATERIALIZED VIEW name [WITH (...)] AS query`.
#[derive(Debug, Clone, PartialEq)]
pub struct CreateMaterializedView {
    pub name: String,
    pub if_not_exists: bool,
    pub options: Options,
    pub query: Box<Query>,
}

/// `CREATE VIEW name AS query`: a name for a query, inlined where it is read.
#[derive(Debug, Clone, PartialEq)]
pub struct CreateView {
    pub name: String,
    pub if_not_exists: bool,
    pub query: Box<Query>,
}

/// Where a sink's rows come from.
#[derive(Debug, Clone, PartialEq)]
pub enum SinkInput {
    /// `CREATE SINK name FROM object WITH (...)`.
    From(String),
    /// `CREATE SINK name WITH (...) AS query`.
    Query(Box<Query>),
}

/// `CREATE SINK`.
#[derive(Debug, Clone, PartialEq)]
pub struct CreateSink {
    pub name: String,
    pub if_not_exists: bool,
    pub input: SinkInput,
    pub options: Options,
}

/// One statement of Weir's dialect.
#[derive(Debug, Clone, PartialEq)]
pub enum Statement {
    CreateStream(CreateSource),
    CreateTable(CreateSource),
    CreateView(CreateView),
    CreateMaterializedView(CreateMaterializedView),
    CreateSink(CreateSink),
    Show(ShowKind),
    ShowCreate {
        kind: ObjectKind,
        name: String,
    },
    Describe {
        name: String,
    },
    Explain {
        analyze: bool,
        query: Box<Query>,
    },
    Drop {
        kind: ObjectKind,
        names: Vec<String>,
        if_exists: bool,
        cascade: bool,
    },
    /// `CREATE USER name [WITH] [PASSWORD 'secret']`: a user with no privileges yet.
    CreateUser {
        name: String,
        if_not_exists: bool,
        /// The password, or a SCRAM-SHA-256 verifier as Postgres prints it. `None`: the
        /// user cannot log in until one is set.
        password: Option<String>,
    },
    /// `ALTER USER name [WITH] PASSWORD 'secret' | PASSWORD NULL`.
    AlterUser {
        name: String,
        password: Option<String>,
    },
    DropUser {
        names: Vec<String>,
        if_exists: bool,
    },
    /// `GRANT READ | ADMIN TO user, ...` (and `GRANT SELECT ON ALL TABLES ...` for READ).
    Grant {
        privilege: Privilege,
        users: Vec<String>,
    },
    Revoke {
        privilege: Privilege,
        users: Vec<String>,
    },
    /// A `SELECT` (or `WITH ... SELECT`, `VALUES`, set operation).
    Query(Box<Query>),
    /// Any other statement sqlparser knows (SET, SHOW variable, BEGIN, ...).
    Standard(Box<sqlparser::ast::Statement>),
}

impl Statement {
    /// A short name for logs and command tags, e.g. `CREATE STREAM`.
    pub fn tag(&self) -> &'static str {
        match self {
            Statement::CreateStream(_) => "CREATE STREAM",
            Statement::CreateTable(_) => "CREATE TABLE",
            Statement::CreateView(_) => "CREATE VIEW",
            Statement::CreateMaterializedView(_) => "CREATE MATERIALIZED VIEW",
            Statement::CreateSink(_) => "CREATE SINK",
            Statement::Show(_) | Statement::ShowCreate { .. } => "SHOW",
            Statement::Describe { .. } => "DESCRIBE",
            Statement::Explain { .. } => "EXPLAIN",
            Statement::Drop { kind, .. } => match kind {
                ObjectKind::Stream => "DROP STREAM",
                ObjectKind::Table => "DROP TABLE",
                ObjectKind::View => "DROP VIEW",
                ObjectKind::MaterializedView => "DROP MATERIALIZED VIEW",
                ObjectKind::Sink => "DROP SINK",
            },
            // Postgres' tags: a user is a role that can log in.
            Statement::CreateUser { .. } => "CREATE ROLE",
            Statement::AlterUser { .. } => "ALTER ROLE",
            Statement::DropUser { .. } => "DROP ROLE",
            Statement::Grant { .. } => "GRANT",
            Statement::Revoke { .. } => "REVOKE",
            Statement::Query(_) => "SELECT",
            Statement::Standard(_) => "OK",
        }
    }
}
