//! Rewrites that let the catalog queries of Postgres clients run on DataFusion, beyond the
//! ones datafusion-pg-catalog makes (they run after those).

use std::borrow::Cow;
use std::ops::ControlFlow;
use std::sync::{Arc, LazyLock};

use arrow::array::{ArrayRef, StringArray};
use arrow::datatypes::DataType;
use datafusion::common::cast::as_string_array;
use datafusion::common::{DataFusionError, ScalarValue};
use datafusion::logical_expr::{ColumnarValue, ScalarUDF, Volatility, create_udf};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::tokenizer::{Location, Token, TokenWithSpan, Tokenizer};

use sqlparser::ast::{
    Expr, Function, FunctionArg, FunctionArgExpr, FunctionArgumentList, FunctionArguments,
    GroupByExpr, Ident, ObjectName, Query, SelectItem, SetExpr, Statement, TableAlias, TableFactor,
    VisitMut, VisitorMut,
};

/// Grafana's PostgreSQL data source asks which schemas are on the search path with a
/// subquery DataFusion cannot plan (a set-returning `generate_series` over array bounds,
/// cross-joined with an array used as a table). Weir's search path is always `public`, so
/// the subquery is replaced by that list before parsing: `schema IN (<subquery>)` becomes
/// `schema IN ('public')`.
const SEARCH_PATH_SUBQUERY: &str = r#"SELECT
    CASE WHEN trim(s[i]) = '"$user"' THEN user ELSE trim(s[i]) END
  FROM
    generate_series(
      array_lower(string_to_array(current_setting('search_path'),','),1),
      array_upper(string_to_array(current_setting('search_path'),','),1)
    ) as i,
    string_to_array(current_setting('search_path'),',') s"#;

/// `sql` with every [`SEARCH_PATH_SUBQUERY`] (compared token by token, whitespace and the
/// case of words aside) replaced by `'public'`; as it is when there is none. The text around
/// a match is kept byte for byte.
pub fn search_path_as_list(sql: &str) -> Cow<'_, str> {
    if !sql.contains("search_path") {
        return Cow::Borrowed(sql);
    }
    static PATTERN: LazyLock<Vec<Token>> = LazyLock::new(|| {
        let tokens = Tokenizer::new(&PostgreSqlDialect {}, SEARCH_PATH_SUBQUERY)
            .tokenize()
            .unwrap_or_default();
        significant(tokens.iter())
    });
    let Ok(all) = Tokenizer::new(&PostgreSqlDialect {}, sql).tokenize_with_location() else {
        return Cow::Borrowed(sql);
    };
    let kept: Vec<&TokenWithSpan> = all.iter().filter(|t| counts(&t.token)).collect();
    let normalized = significant(kept.iter().map(|t| &t.token));
    let mut out = String::with_capacity(sql.len());
    let (mut copied, mut k) = (0, 0);
    while !PATTERN.is_empty() && k + PATTERN.len() <= normalized.len() {
        if normalized[k..k + PATTERN.len()] != PATTERN[..] {
            k += 1;
            continue;
        }
        let (Some(start), Some(end)) = (
            byte_offset(sql, kept[k].span.start),
            byte_offset(sql, kept[k + PATTERN.len() - 1].span.end),
        ) else {
            return Cow::Borrowed(sql);
        };
        out.push_str(&sql[copied..start]);
        out.push_str("'public'");
        copied = end;
        k += PATTERN.len();
    }
    if copied == 0 {
        return Cow::Borrowed(sql);
    }
    out.push_str(&sql[copied..]);
    Cow::Owned(out)
}

/// The byte offset in `sql` of a tokenizer location (1-based line, and column in
/// characters); the end of `sql` for the location just past it.
fn byte_offset(sql: &str, at: Location) -> Option<usize> {
    let line_start = if at.line <= 1 {
        0
    } else {
        sql.match_indices('\n').nth(at.line as usize - 2)?.0 + 1
    };
    let column = (at.column as usize).checked_sub(1)?;
    sql[line_start..]
        .char_indices()
        .map(|(i, _)| line_start + i)
        .chain([sql.len()])
        .nth(column)
}

/// Whether a token is more than whitespace (comments included).
fn counts(token: &Token) -> bool {
    !matches!(token, Token::Whitespace(_))
}

/// The tokens that count, words in lower case.
fn significant<'a>(tokens: impl Iterator<Item = &'a Token>) -> Vec<Token> {
    tokens
        .filter(|t| counts(t))
        .map(|t| match t {
            Token::Word(w) if w.quote_style.is_none() => {
                Token::make_word(&w.value.to_ascii_lowercase(), None)
            }
            other => other.clone(),
        })
        .collect()
}

/// `current_setting(name)`: the value of one of the settings Weir answers for
/// ([`crate::introspection::setting`]); 42704 for any other, as in Postgres.
pub fn current_setting_udf() -> ScalarUDF {
    text_udf("current_setting", Volatility::Stable, |name| {
        crate::introspection::setting(name)
            .map(str::to_string)
            .ok_or_else(|| {
                DataFusionError::External(Box::new(crate::introspection::unknown_setting(name)))
            })
    })
}

/// A function of one text argument to text, `f` applied to each value (NULL stays NULL).
fn text_udf(
    name: &str,
    volatility: Volatility,
    f: fn(&str) -> datafusion::common::Result<String>,
) -> ScalarUDF {
    create_udf(
        name,
        vec![DataType::Utf8],
        DataType::Utf8,
        volatility,
        Arc::new(move |args: &[ColumnarValue]| {
            let input = match &args[0] {
                ColumnarValue::Scalar(s) => s.to_array()?,
                ColumnarValue::Array(a) => a.clone(),
            };
            let output: StringArray = as_string_array(&input)?
                .iter()
                .map(|v| v.map(f).transpose())
                .collect::<datafusion::common::Result<_>>()?;
            let output: ArrayRef = Arc::new(output);
            Ok(match &args[0] {
                ColumnarValue::Scalar(_) => {
                    ColumnarValue::Scalar(ScalarValue::try_from_array(&output, 0)?)
                }
                ColumnarValue::Array(_) => ColumnarValue::Array(output),
            })
        }),
    )
}

/// Applies every rewrite to `statement`.
pub fn rewrite(mut statement: Statement) -> Statement {
    let _ = statement.visit(&mut ArraySubquery);
    let _ = statement.visit(&mut ColumnTypeNames);
    statement
}

/// The UDF that names an Arrow type as `information_schema.columns.data_type` does in
/// Postgres.
const TYPE_NAME_UDF: &str = "weir_information_schema_type";

/// DataFusion's `information_schema.columns` with Postgres' names in `data_type`
/// (`bigint`, `timestamp without time zone`, `text`) instead of Arrow's (`Int64`,
/// `Timestamp(ms)`, `Utf8`): catalog browsers such as Grafana's query builder pick time and
/// number columns by those names.
const COLUMNS_WITH_POSTGRES_TYPES: &str = "SELECT table_catalog, table_schema, table_name, \
    column_name, ordinal_position, column_default, is_nullable, \
    weir_information_schema_type(data_type) AS data_type, character_maximum_length, \
    character_octet_length, numeric_precision, numeric_precision_radix, numeric_scale, \
    datetime_precision, interval_type FROM information_schema.columns";

/// Reads of `information_schema.columns` become reads of [`COLUMNS_WITH_POSTGRES_TYPES`],
/// under the same alias (or `columns`).
struct ColumnTypeNames;

impl VisitorMut for ColumnTypeNames {
    type Break = ();

    // After the children: the subquery put in reads the table itself, and is not visited.
    fn post_visit_table_factor(&mut self, factor: &mut TableFactor) -> ControlFlow<Self::Break> {
        let TableFactor::Table {
            name, alias, args, ..
        } = factor
        else {
            return ControlFlow::Continue(());
        };
        let parts: Vec<String> = name
            .0
            .iter()
            .filter_map(|p| p.as_ident().map(|i| i.value.to_ascii_lowercase()))
            .collect();
        let is_columns = args.is_none()
            && matches!(
                parts
                    .iter()
                    .map(String::as_str)
                    .collect::<Vec<_>>()
                    .as_slice(),
                ["information_schema", "columns"] | [_, "information_schema", "columns"]
            );
        if !is_columns {
            return ControlFlow::Continue(());
        }
        static QUERY: LazyLock<Option<Query>> = LazyLock::new(|| {
            match sqlparser::parser::Parser::parse_sql(
                &PostgreSqlDialect {},
                COLUMNS_WITH_POSTGRES_TYPES,
            )
            .ok()?
            .pop()?
            {
                Statement::Query(query) => Some(*query),
                _ => None,
            }
        });
        let Some(query) = QUERY.clone() else {
            return ControlFlow::Continue(());
        };
        let alias = alias.take().unwrap_or_else(|| TableAlias {
            explicit: true,
            name: Ident::new("columns"),
            columns: Vec::new(),
            at: None,
        });
        *factor = TableFactor::Derived {
            lateral: false,
            subquery: Box::new(query),
            alias: Some(alias),
            sample: None,
        };
        ControlFlow::Continue(())
    }
}

/// The name Postgres' `information_schema.columns.data_type` gives an Arrow type (written as
/// Arrow displays it); the Arrow name, lower case, for a type Postgres has no name for.
fn information_schema_type(arrow: &str) -> String {
    let Ok(t) = arrow.parse::<DataType>() else {
        return arrow.to_ascii_lowercase();
    };
    match t {
        DataType::Boolean => "boolean",
        DataType::Int8 | DataType::Int16 | DataType::UInt8 => "smallint",
        DataType::Int32 | DataType::UInt16 => "integer",
        DataType::Int64 | DataType::UInt32 => "bigint",
        DataType::UInt64 | DataType::Decimal32(..) | DataType::Decimal64(..) => "numeric",
        DataType::Decimal128(..) | DataType::Decimal256(..) => "numeric",
        DataType::Float16 | DataType::Float32 => "real",
        DataType::Float64 => "double precision",
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => "text",
        DataType::Binary
        | DataType::LargeBinary
        | DataType::BinaryView
        | DataType::FixedSizeBinary(_) => "bytea",
        DataType::Date32 | DataType::Date64 => "date",
        DataType::Time32(_) | DataType::Time64(_) => "time without time zone",
        DataType::Timestamp(_, None) => "timestamp without time zone",
        DataType::Timestamp(_, Some(_)) => "timestamp with time zone",
        DataType::Interval(_) | DataType::Duration(_) => "interval",
        DataType::List(_)
        | DataType::LargeList(_)
        | DataType::ListView(_)
        | DataType::LargeListView(_)
        | DataType::FixedSizeList(..) => "ARRAY",
        DataType::Struct(_) | DataType::Map(..) | DataType::Union(..) => "USER-DEFINED",
        DataType::Dictionary(_, value) => return information_schema_type(&value.to_string()),
        other => return other.to_string().to_ascii_lowercase(),
    }
    .to_string()
}

/// Registers the UDF [`COLUMNS_WITH_POSTGRES_TYPES`] calls.
pub fn information_schema_type_udf() -> ScalarUDF {
    text_udf(TYPE_NAME_UDF, Volatility::Immutable, |t| {
        Ok(information_schema_type(t))
    })
}

/// `ARRAY(SELECT e FROM ... WHERE ...)`, which DataFusion does not plan, as the scalar
/// subquery `(SELECT array_agg(e) FROM ... WHERE ...)`, which it does, correlated or not
/// (psql's `\du` lists role memberships this way). One difference: no rows give NULL, not an
/// empty array. A subquery with more than a plain projection (GROUP BY, DISTINCT, ORDER BY,
/// LIMIT, set operations) is left as it is.
struct ArraySubquery;

impl VisitorMut for ArraySubquery {
    type Break = ();

    fn post_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<Self::Break> {
        let Expr::Function(Function {
            name,
            args: FunctionArguments::Subquery(query),
            ..
        }) = expr
        else {
            return ControlFlow::Continue(());
        };
        let is_array = name.0.len() == 1
            && name.0[0]
                .as_ident()
                .is_some_and(|i| i.value.eq_ignore_ascii_case("array"));
        if is_array && let Some(aggregated) = aggregate_projection(query) {
            *expr = Expr::Subquery(Box::new(aggregated));
        }
        ControlFlow::Continue(())
    }
}

/// `query` with its single projected expression wrapped in `array_agg`, if it is that simple.
fn aggregate_projection(query: &Query) -> Option<Query> {
    if query.order_by.is_some() || query.limit_clause.is_some() || query.fetch.is_some() {
        return None;
    }
    let SetExpr::Select(select) = query.body.as_ref() else {
        return None;
    };
    let plain_group_by =
        matches!(&select.group_by, GroupByExpr::Expressions(e, m) if e.is_empty() && m.is_empty());
    if select.distinct.is_some()
        || select.having.is_some()
        || !plain_group_by
        || select.projection.len() != 1
    {
        return None;
    }
    let element = match &select.projection[0] {
        SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => e.clone(),
        _ => return None,
    };
    let array_agg = Expr::Function(Function {
        name: ObjectName::from(vec![Ident::new("array_agg")]),
        uses_odbc_syntax: false,
        parameters: FunctionArguments::None,
        args: FunctionArguments::List(FunctionArgumentList {
            duplicate_treatment: None,
            args: vec![FunctionArg::Unnamed(FunctionArgExpr::Expr(element))],
            clauses: vec![],
        }),
        filter: None,
        null_treatment: None,
        over: None,
        within_group: vec![],
    });
    let mut select = select.clone();
    select.projection = vec![SelectItem::UnnamedExpr(array_agg)];
    let mut aggregated = query.clone();
    aggregated.body = Box::new(SetExpr::Select(select));
    Some(aggregated)
}

#[cfg(test)]
mod tests {
    use sqlparser::dialect::PostgreSqlDialect;
    use sqlparser::parser::Parser;

    use super::*;

    fn rewritten(sql: &str) -> String {
        let mut statements = Parser::parse_sql(&PostgreSqlDialect {}, sql).expect("parses");
        rewrite(statements.remove(0)).to_string()
    }

    #[test]
    fn information_schema_columns_reads_postgres_type_names() {
        let sql = rewritten(
            "SELECT c.column_name, c.data_type FROM information_schema.columns c WHERE c.table_name = 't'",
        );
        assert!(
            sql.starts_with("SELECT c.column_name, c.data_type FROM (SELECT table_catalog, ")
                && sql.contains("weir_information_schema_type(data_type) AS data_type")
                && sql.ends_with("FROM information_schema.columns) c WHERE c.table_name = 't'"),
            "{sql}"
        );
        for (arrow, postgres) in [
            (DataType::Int64, "bigint"),
            (DataType::Float64, "double precision"),
            (DataType::Utf8, "text"),
            (
                DataType::Timestamp(arrow::datatypes::TimeUnit::Millisecond, None),
                "timestamp without time zone",
            ),
            (
                DataType::Timestamp(arrow::datatypes::TimeUnit::Microsecond, Some("UTC".into())),
                "timestamp with time zone",
            ),
            (DataType::Date32, "date"),
            (DataType::Boolean, "boolean"),
        ] {
            assert_eq!(
                information_schema_type(&arrow.to_string()),
                postgres,
                "{arrow}"
            );
        }
    }

    #[test]
    fn grafanas_search_path_subquery_becomes_a_list() {
        let sql = r#"SELECT quote_ident(column_name) AS "column" FROM information_schema.columns
      WHERE quote_ident(table_schema) IN (
          SELECT
            CASE WHEN trim(s[i]) = '"$user"' THEN user ELSE trim(s[i]) END
          FROM
            generate_series(
              array_lower(string_to_array(current_setting('search_path'),','),1),
              array_upper(string_to_array(current_setting('search_path'),','),1)
            ) as i,
            string_to_array(current_setting('search_path'),',') s
          ) AND table_name = 'a''b'"#;
        let rewritten = search_path_as_list(sql);
        assert_eq!(
            rewritten,
            "SELECT quote_ident(column_name) AS \"column\" FROM information_schema.columns\n      \
             WHERE quote_ident(table_schema) IN (\n          'public'\n          ) AND table_name = 'a''b'"
        );
        // Anything else stays as it is, byte for byte.
        for sql in [
            "SELECT current_setting('search_path')",
            "SELECT 1 FROM t WHERE x IN (SELECT y FROM u)",
        ] {
            assert!(matches!(search_path_as_list(sql), Cow::Borrowed(s) if s == sql));
        }
    }

    #[test]
    fn array_of_a_subquery_becomes_an_aggregating_scalar_subquery() {
        assert_eq!(
            rewritten(
                "SELECT r.rolname, ARRAY(SELECT b.rolname FROM m JOIN b ON m.roleid = b.oid \
                 WHERE m.member = r.oid) AS memberof FROM r"
            ),
            "SELECT r.rolname, (SELECT array_agg(b.rolname) FROM m JOIN b ON m.roleid = b.oid \
             WHERE m.member = r.oid) AS memberof FROM r"
        );
        // What the rewrite cannot express stays as written.
        for sql in [
            "SELECT ARRAY(SELECT x FROM t ORDER BY x)",
            "SELECT ARRAY(SELECT DISTINCT x FROM t)",
            "SELECT ARRAY(SELECT x, y FROM t)",
            "SELECT ARRAY[1, 2]",
        ] {
            assert_eq!(rewritten(sql), sql);
        }
    }
}
