//! Rewrites that let the catalog queries of Postgres clients run on DataFusion, beyond the
//! ones datafusion-pg-catalog makes (they run after those).

use std::ops::ControlFlow;

use sqlparser::ast::{
    Expr, Function, FunctionArg, FunctionArgExpr, FunctionArgumentList, FunctionArguments,
    GroupByExpr, Ident, ObjectName, Query, SelectItem, SetExpr, Statement, VisitMut, VisitorMut,
};

/// Applies every rewrite to `statement`.
pub fn rewrite(mut statement: Statement) -> Statement {
    let _ = statement.visit(&mut ArraySubquery);
    statement
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
