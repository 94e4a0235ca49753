//! Window table-valued functions: `TUMBLE(stream, ts, size)`, `HOP(stream, ts, slide, size)`,
//! `SESSION(stream, ts, gap)` and the Flink spelling
//! `TABLE(TUMBLE(TABLE stream, DESCRIPTOR(ts), size))`.
//!
//! Before DataFusion plans a query, each window call in `FROM` is rewritten into a subquery
//! over its stream that adds `window_start` and `window_end` as placeholder functions of the
//! time column (`__weir_window_start(ts, size_ms, slide_ms)`, which evaluates to `ts` itself).
//! The `GROUP BY` that consumes them is lowered to a
//! [`weir_runtime::operators::WindowAggregate`] (a `SessionAggregate` for SESSION), which
//! computes the real bounds from the time
//! column and the window read from the placeholder's arguments.

use arrow::datatypes::DataType;
use datafusion::common::Result as DfResult;
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use sqlparser::ast::{
    Expr, FunctionArg, FunctionArgExpr, FunctionArguments, ObjectName, Query, SetExpr, TableAlias,
    TableFactor, TableWithJoins,
};
use weir_runtime::operators::WindowKind;

use crate::catalog::Catalog;
use crate::error::{PlanError, Result};
use crate::schema::interval_duration;

/// The placeholder function standing for `window_start`.
pub const WINDOW_START: &str = "__weir_window_start";
/// The placeholder function standing for `window_end`.
pub const WINDOW_END: &str = "__weir_window_end";

/// A window call found in a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowTvf {
    pub kind: WindowKind,
    pub stream: String,
    pub time_column: String,
}

/// Rewrites every window call in `query`'s `FROM` clauses; returns them by id.
/// Over a view that has `window_start` / `window_end` (a roll-up), the new window's columns
/// replace them.
pub fn rewrite_windows(query: &mut Query, catalog: &Catalog) -> Result<Vec<WindowTvf>> {
    let mut found = Vec::new();
    rewrite_query(query, catalog, &mut found)?;
    Ok(found)
}

fn rewrite_query(query: &mut Query, catalog: &Catalog, found: &mut Vec<WindowTvf>) -> Result<()> {
    rewrite_set_expr(&mut query.body, catalog, found)
}

fn rewrite_set_expr(
    body: &mut SetExpr,
    catalog: &Catalog,
    found: &mut Vec<WindowTvf>,
) -> Result<()> {
    match body {
        SetExpr::Select(select) => select
            .from
            .iter_mut()
            .try_for_each(|t| rewrite_table_with_joins(t, catalog, found)),
        SetExpr::Query(q) => rewrite_query(q, catalog, found),
        SetExpr::SetOperation { left, right, .. } => {
            rewrite_set_expr(left, catalog, found)?;
            rewrite_set_expr(right, catalog, found)
        }
        _ => Ok(()),
    }
}

fn rewrite_table_with_joins(
    t: &mut TableWithJoins,
    catalog: &Catalog,
    found: &mut Vec<WindowTvf>,
) -> Result<()> {
    rewrite_factor(&mut t.relation, catalog, found)?;
    t.joins
        .iter_mut()
        .try_for_each(|j| rewrite_factor(&mut j.relation, catalog, found))
}

fn rewrite_factor(
    factor: &mut TableFactor,
    catalog: &Catalog,
    found: &mut Vec<WindowTvf>,
) -> Result<()> {
    let (name, args, alias) = match factor {
        TableFactor::Derived { subquery, .. } => return rewrite_query(subquery, catalog, found),
        TableFactor::NestedJoin {
            table_with_joins, ..
        } => return rewrite_table_with_joins(table_with_joins, catalog, found),
        TableFactor::Table {
            name,
            args: Some(args),
            alias,
            ..
        } => (last_name(name), args.args.clone(), alias.clone()),
        TableFactor::TableFunction {
            expr: Expr::Function(f),
            alias,
        } => {
            let FunctionArguments::List(list) = &f.args else {
                return Ok(());
            };
            (last_name(&f.name), list.args.clone(), alias.clone())
        }
        _ => return Ok(()),
    };
    let Some(function) = name.map(|n| n.to_ascii_uppercase()) else {
        return Ok(());
    };
    if !matches!(function.as_str(), "TUMBLE" | "HOP" | "SESSION") {
        return Ok(());
    }
    let window = parse_window(&function, &args)?;
    let stream_ident = sqlparser::ast::Ident::with_quote('"', window.stream.clone());
    let time = sqlparser::ast::Ident::with_quote('"', window.time_column.clone());
    // A slide of 0 marks a session window, whose gap stands in the size's place.
    let (size, slide) = match window.kind {
        WindowKind::Tumble { size } => (size, size),
        WindowKind::Hop { size, slide } => (size, slide),
        WindowKind::Session { gap } => (gap, 0),
    };
    let replaced: Vec<&str> = catalog
        .get(&window.stream)
        .map(|entry| {
            ["window_start", "window_end"]
                .into_iter()
                .filter(|c| entry.schema.column_with_name(c).is_some())
                .collect()
        })
        .unwrap_or_default();
    let star = match replaced.as_slice() {
        [] => "*".to_string(),
        columns => format!("* EXCLUDE ({})", columns.join(", ")),
    };
    let sql = format!(
        "SELECT {star}, {WINDOW_START}({time}, {size}, {slide}) AS window_start, \
         {WINDOW_END}({time}, {size}, {slide}) AS window_end FROM {stream_ident}"
    );
    let subquery = parse_query(&sql)?;
    let alias = alias.unwrap_or_else(|| TableAlias {
        explicit: true,
        name: sqlparser::ast::Ident::new(window.stream.clone()),
        columns: Vec::new(),
        at: None,
    });
    found.push(window);
    *factor = TableFactor::Derived {
        lateral: false,
        subquery: Box::new(subquery),
        alias: Some(alias),
        sample: None,
    };
    Ok(())
}

/// 22023: a window call with arguments of the wrong shape.
fn bad_window(message: String) -> PlanError {
    PlanError::Plan {
        sqlstate: "22023",
        message,
    }
}

fn last_name(name: &ObjectName) -> Option<String> {
    name.0
        .last()
        .and_then(|p| p.as_ident())
        .map(|i| i.value.clone())
}

/// `(stream, time, size)` for TUMBLE, `(stream, time, slide, size)` for HOP,
/// `(stream, time, gap)` for SESSION.
fn parse_window(function: &str, args: &[FunctionArg]) -> Result<WindowTvf> {
    let usage = || {
        bad_window(match function {
            "TUMBLE" => "TUMBLE takes (stream, time_column, INTERVAL size)".to_string(),
            "SESSION" => "SESSION takes (stream, time_column, INTERVAL gap)".to_string(),
            _ => "HOP takes (stream, time_column, INTERVAL slide, INTERVAL size)".to_string(),
        })
    };
    let exprs: Vec<&Expr> = args
        .iter()
        .map(|a| match a {
            FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => Some(e),
            _ => None,
        })
        .collect::<Option<_>>()
        .ok_or_else(usage)?;
    let expected = if function == "HOP" { 4 } else { 3 };
    if exprs.len() != expected {
        return Err(usage());
    }
    let name = |e: &Expr| match e {
        Expr::Identifier(i) => Some(normalize(i)),
        Expr::CompoundIdentifier(parts) => parts.last().map(normalize),
        _ => None,
    };
    let stream = match exprs[0] {
        // Flink's `TABLE s`, which the dialect parses as a call `TABLE(s)`.
        Expr::Function(f)
            if last_name(&f.name)
                .is_some_and(|n| n.eq_ignore_ascii_case(weir_sql::dialect::TABLE_ARG_FUNCTION)) =>
        {
            match &f.args {
                FunctionArguments::List(list) => match list.args.as_slice() {
                    [FunctionArg::Unnamed(FunctionArgExpr::Expr(e))] => name(e),
                    _ => None,
                },
                _ => None,
            }
        }
        e => name(e),
    }
    .ok_or_else(usage)?;
    let time_column = match exprs[1] {
        Expr::Identifier(i) => normalize(i),
        Expr::Function(f)
            if last_name(&f.name).is_some_and(|n| n.eq_ignore_ascii_case("DESCRIPTOR")) =>
        {
            let FunctionArguments::List(list) = &f.args else {
                return Err(usage());
            };
            match list.args.as_slice() {
                [FunctionArg::Unnamed(FunctionArgExpr::Expr(Expr::Identifier(i)))] => normalize(i),
                _ => return Err(usage()),
            }
        }
        _ => return Err(usage()),
    };
    let millis = |e: &Expr| -> Result<i64> {
        let d = interval_duration(e).ok_or_else(usage)?;
        let ms = i64::try_from(d.as_millis()).map_err(|_| usage())?;
        if ms <= 0 {
            return Err(bad_window(format!(
                "{function}: a window interval must be positive, got {e}"
            )));
        }
        Ok(ms)
    };
    let kind = if function == "TUMBLE" {
        WindowKind::Tumble {
            size: millis(exprs[2])?,
        }
    } else if function == "SESSION" {
        WindowKind::Session {
            gap: millis(exprs[2])?,
        }
    } else {
        let (slide, size) = (millis(exprs[2])?, millis(exprs[3])?);
        if size % slide != 0 {
            return Err(PlanError::NotSupported(format!(
                "HOP with a size ({size} ms) that is not a multiple of the slide ({slide} ms)"
            )));
        }
        WindowKind::Hop { size, slide }
    };
    Ok(WindowTvf {
        kind,
        stream,
        time_column,
    })
}

/// An identifier as the catalog keys it: unquoted ones lower-cased.
pub fn normalize(ident: &sqlparser::ast::Ident) -> String {
    match ident.quote_style {
        Some(_) => ident.value.clone(),
        None => ident.value.to_lowercase(),
    }
}

fn parse_query(sql: &str) -> Result<Query> {
    let dialect = sqlparser::dialect::GenericDialect {};
    let mut statements = sqlparser::parser::Parser::parse_sql(&dialect, sql)
        .map_err(|e| PlanError::Internal(format!("window rewrite: {e}")))?;
    match statements.pop() {
        Some(sqlparser::ast::Statement::Query(q)) => Ok(*q),
        _ => Err(PlanError::Internal("window rewrite: not a query".into())),
    }
}

/// The placeholder functions, registered in the session so that DataFusion can plan them.
pub fn placeholder_udfs() -> Vec<ScalarUDF> {
    [WINDOW_START, WINDOW_END]
        .into_iter()
        .map(|name| {
            ScalarUDF::new_from_impl(WindowPlaceholder {
                name,
                signature: Signature::any(3, Volatility::Immutable),
            })
        })
        .collect()
}

/// `__weir_window_start(ts, size_ms, slide_ms)`: evaluates to `ts`; the window operator reads it as the
/// record's event time. A session window is `(ts, gap_ms, 0)`.
#[derive(Debug, PartialEq, Eq, Hash)]
struct WindowPlaceholder {
    name: &'static str,
    signature: Signature,
}

impl ScalarUDFImpl for WindowPlaceholder {
    fn name(&self) -> &str {
        self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> DfResult<DataType> {
        Ok(arg_types.first().cloned().unwrap_or(DataType::Null))
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        args.args.into_iter().next().ok_or_else(|| {
            datafusion::error::DataFusionError::Internal(format!("{} without arguments", self.name))
        })
    }
}

/// The window of a placeholder call `(ts, size_ms, slide_ms)`.
pub fn placeholder_window(args: &[datafusion::logical_expr::Expr]) -> Option<WindowKind> {
    let millis = |i: usize| match args.get(i)? {
        datafusion::logical_expr::Expr::Literal(
            datafusion::common::ScalarValue::Int64(Some(v)),
            _,
        ) => Some(*v),
        _ => None,
    };
    let (size, slide) = (millis(1)?, millis(2)?);
    Some(if slide == 0 {
        WindowKind::Session { gap: size }
    } else if size == slide {
        WindowKind::Tumble { size }
    } else {
        WindowKind::Hop { size, slide }
    })
}

/// Shared so that callers can name the placeholders without the planner's internals.
pub fn is_placeholder(name: &str) -> bool {
    name == WINDOW_START || name == WINDOW_END
}
