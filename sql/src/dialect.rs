//! [`WeirDialect`]: the generic dialect, plus what streaming SQL needs.

use std::any::TypeId;

use sqlparser::ast::{Expr, Function, FunctionArguments, Ident, ObjectName, ObjectNamePart};
use sqlparser::dialect::{Dialect, GenericDialect};
use sqlparser::keywords::Keyword;
use sqlparser::parser::{Parser, ParserError};
use sqlparser::tokenizer::Token;

/// sqlparser's [`GenericDialect`] (what DataFusion plans by default) with two additions:
///
/// - `FOR SYSTEM_TIME AS OF expr` after a table name (lookup joins);
/// - `TABLE name` as a function argument, so that the Flink window spelling
///   `TABLE(TUMBLE(TABLE s, DESCRIPTOR(ts), INTERVAL '1' MINUTE))` parses. The argument
///   becomes a call `TABLE(name)`, which the planner unwraps.
///
/// `dialect()` reports the generic dialect so every `dialect_of!(GenericDialect)` check in
/// sqlparser still applies.
#[derive(Debug, Default, Clone, Copy)]
pub struct WeirDialect {
    generic: GenericDialect,
}

/// The function name that stands for a Flink-style `TABLE name` argument.
pub const TABLE_ARG_FUNCTION: &str = "TABLE";

impl Dialect for WeirDialect {
    fn dialect(&self) -> TypeId {
        TypeId::of::<GenericDialect>()
    }
    fn is_delimited_identifier_start(&self, ch: char) -> bool {
        self.generic.is_delimited_identifier_start(ch)
    }
    fn is_identifier_start(&self, ch: char) -> bool {
        self.generic.is_identifier_start(ch)
    }
    fn is_identifier_part(&self, ch: char) -> bool {
        self.generic.is_identifier_part(ch)
    }
    fn supports_table_versioning(&self) -> bool {
        true
    }
    fn supports_group_by_expr(&self) -> bool {
        true
    }
    fn supports_filter_during_aggregation(&self) -> bool {
        true
    }
    fn supports_window_function_null_treatment_arg(&self) -> bool {
        true
    }
    fn supports_unicode_string_literal(&self) -> bool {
        true
    }
    fn supports_string_escape_constant(&self) -> bool {
        true
    }
    fn supports_nested_comments(&self) -> bool {
        true
    }
    fn supports_parens_around_table_factor(&self) -> bool {
        true
    }
    fn supports_projection_trailing_commas(&self) -> bool {
        false
    }
    fn supports_interval_options(&self) -> bool {
        true
    }

    fn parse_prefix(&self, parser: &mut Parser<'_>) -> Option<Result<Expr, ParserError>> {
        // `TABLE name` inside a function's argument list (Flink window TVFs). A bare
        // `TABLE` keyword cannot start any other expression, so this is unambiguous.
        let next = parser.peek_token();
        let Token::Word(word) = &next.token else {
            return None;
        };
        if word.keyword != Keyword::TABLE || word.quote_style.is_some() {
            return None;
        }
        let after = parser.peek_nth_token(1);
        if !matches!(after.token, Token::Word(_)) {
            return None;
        }
        parser.next_token();
        Some(parser.parse_object_name(false).map(|name| {
            Expr::Function(Function {
                name: ObjectName(vec![ObjectNamePart::Identifier(Ident::new(
                    TABLE_ARG_FUNCTION,
                ))]),
                uses_odbc_syntax: false,
                parameters: FunctionArguments::None,
                args: FunctionArguments::List(sqlparser::ast::FunctionArgumentList {
                    duplicate_treatment: None,
                    args: vec![sqlparser::ast::FunctionArg::Unnamed(
                        sqlparser::ast::FunctionArgExpr::Expr(Expr::CompoundIdentifier(
                            name.0
                                .into_iter()
                                .filter_map(|p| p.as_ident().cloned())
                                .collect(),
                        )),
                    )],
                    clauses: vec![],
                }),
                filter: None,
                null_treatment: None,
                over: None,
                within_group: vec![],
            })
        }))
    }
}
