//! [`parse_sql`]: text to [`Statement`]s, using sqlparser's `Parser` for every piece.

use sqlparser::ast::{ColumnOption, Ident, ObjectName};
use sqlparser::keywords::Keyword;
use sqlparser::parser::{Parser, ParserError};
use sqlparser::tokenizer::{Location, Token};

use crate::dialect::WeirDialect;
use crate::error::{Position, SqlError};
use crate::options::Options;
use crate::statement::{
    CreateMaterializedView, CreateSink, CreateSource, CreateView, ObjectKind, Privilege, ShowKind,
    SinkInput, Statement, Watermark,
};

/// The deepest expression nesting accepted; deeper input is an error, not a stack overflow.
const RECURSION_LIMIT: usize = 64;

/// A parsed statement with the exact text it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedStatement {
    pub statement: Statement,
    /// The statement's text, without the trailing semicolon.
    pub sql: String,
    /// Where the statement starts in the input.
    pub start: Position,
}

/// Parses `;`-separated statements.
pub fn parse_sql(sql: &str) -> Result<Vec<Statement>, SqlError> {
    Ok(parse_sql_with_positions(sql)?
        .into_iter()
        .map(|p| p.statement)
        .collect())
}

/// Parses `;`-separated statements, keeping each one's text and position.
pub fn parse_sql_with_positions(sql: &str) -> Result<Vec<ParsedStatement>, SqlError> {
    let dialect = WeirDialect::default();
    let mut parser = Parser::new(&dialect)
        .with_recursion_limit(RECURSION_LIMIT)
        .try_with_sql(sql)
        .map_err(SqlError::from_parser)?;
    let lines = LineIndex::new(sql);
    let mut out = Vec::new();
    loop {
        while parser.consume_token(&Token::SemiColon) {}
        let first = parser.peek_token();
        if first.token == Token::EOF {
            break;
        }
        let statement = parse_statement(&mut parser).map_err(SqlError::from_parser)?;
        let next = parser.peek_token();
        if !matches!(next.token, Token::SemiColon | Token::EOF) {
            return Err(SqlError::new(
                format!("Expected: end of statement, found: {}", next.token),
                Some(position(next.span.start)),
            ));
        }
        let end = match next.token {
            Token::EOF => sql.len(),
            _ => lines.byte_offset(next.span.start),
        };
        let start = lines.byte_offset(first.span.start);
        out.push(ParsedStatement {
            statement,
            sql: sql[start.min(end)..end].trim().to_string(),
            start: position(first.span.start),
        });
    }
    Ok(out)
}

fn position(location: Location) -> Position {
    Position {
        line: location.line,
        column: location.column,
    }
}

/// Maps sqlparser's (line, column) locations back to byte offsets.
struct LineIndex<'a> {
    sql: &'a str,
    line_starts: Vec<usize>,
}

impl<'a> LineIndex<'a> {
    fn new(sql: &'a str) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(sql.match_indices('\n').map(|(i, _)| i + 1));
        Self { sql, line_starts }
    }

    fn byte_offset(&self, location: Location) -> usize {
        let Some(&line_start) = self
            .line_starts
            .get(location.line.saturating_sub(1) as usize)
        else {
            return self.sql.len();
        };
        let column = location.column.saturating_sub(1) as usize;
        self.sql[line_start..]
            .char_indices()
            .nth(column)
            .map(|(i, _)| line_start + i)
            .unwrap_or(self.sql.len())
    }
}

fn parse_statement(parser: &mut Parser<'_>) -> Result<Statement, ParserError> {
    let token = parser.peek_token();
    let Token::Word(word) = &token.token else {
        return standard(parser);
    };
    match word.keyword {
        Keyword::CREATE => parse_create(parser),
        Keyword::SHOW => parse_show(parser),
        Keyword::DESCRIBE | Keyword::DESC => {
            parser.next_token();
            let _ = parser.parse_keyword(Keyword::TABLE);
            Ok(Statement::Describe {
                name: parse_name(parser)?,
            })
        }
        Keyword::EXPLAIN => {
            parser.next_token();
            let analyze = parser.parse_keyword(Keyword::ANALYZE);
            Ok(Statement::Explain {
                analyze,
                query: parser.parse_query()?,
            })
        }
        Keyword::DROP => parse_drop(parser),
        Keyword::ALTER if peek_word(parser, 1, "USER") => parse_alter_user(parser),
        Keyword::GRANT | Keyword::REVOKE => parse_grant(parser),
        Keyword::SELECT | Keyword::WITH | Keyword::VALUES => {
            Ok(Statement::Query(parser.parse_query()?))
        }
        _ => standard(parser),
    }
}

fn standard(parser: &mut Parser<'_>) -> Result<Statement, ParserError> {
    if parser.peek_token().token == Token::LParen {
        return Ok(Statement::Query(parser.parse_query()?));
    }
    Ok(Statement::Standard(Box::new(parser.parse_statement()?)))
}

/// Whether the next token is the (non-keyword) word `word`, consuming it if so.
fn parse_word(parser: &mut Parser<'_>, word: &str) -> bool {
    if peek_word(parser, 0, word) {
        parser.next_token();
        true
    } else {
        false
    }
}

fn peek_word(parser: &Parser<'_>, n: usize, word: &str) -> bool {
    matches!(&parser.peek_nth_token(n).token,
        Token::Word(w) if w.quote_style.is_none() && w.value.eq_ignore_ascii_case(word))
}

fn parse_create(parser: &mut Parser<'_>) -> Result<Statement, ParserError> {
    if peek_word(parser, 1, "USER") {
        parser.next_token(); // CREATE
        parser.next_token(); // USER
        let if_not_exists = parser.parse_keywords(&[Keyword::IF, Keyword::NOT, Keyword::EXISTS]);
        let name = normalize(&parser.parse_identifier()?);
        let password = parse_user_options(parser)?.flatten();
        return Ok(Statement::CreateUser {
            name,
            if_not_exists,
            password,
        });
    }
    // Look ahead without consuming, so anything that is not Weir's goes to sqlparser whole.
    let kind = if peek_word(parser, 1, "STREAM") {
        Some(ObjectKind::Stream)
    } else if peek_word(parser, 1, "SINK") {
        Some(ObjectKind::Sink)
    } else if peek_word(parser, 1, "TABLE") && !is_create_table_as(parser) {
        Some(ObjectKind::Table)
    } else if peek_word(parser, 1, "MATERIALIZED") && peek_word(parser, 2, "VIEW") {
        Some(ObjectKind::MaterializedView)
    } else if peek_word(parser, 1, "VIEW") {
        Some(ObjectKind::View)
    } else {
        None
    };
    let Some(kind) = kind else {
        return standard(parser);
    };
    parser.next_token(); // CREATE
    parser.next_token(); // STREAM | SINK | TABLE | VIEW | MATERIALIZED
    if kind == ObjectKind::MaterializedView {
        parser.next_token(); // VIEW
    }
    let if_not_exists = parser.parse_keywords(&[Keyword::IF, Keyword::NOT, Keyword::EXISTS]);
    let name = parse_name(parser)?;
    match kind {
        ObjectKind::Stream | ObjectKind::Table => {
            let source = parse_source_body(parser, name, if_not_exists, kind)?;
            Ok(match kind {
                ObjectKind::Stream => Statement::CreateStream(source),
                _ => Statement::CreateTable(source),
            })
        }
        ObjectKind::View => {
            parser.expect_keyword(Keyword::AS)?;
            let query = parser.parse_query()?;
            Ok(Statement::CreateView(CreateView {
                name,
                if_not_exists,
                query,
            }))
        }
        ObjectKind::MaterializedView => {
            let options = parse_with_options(parser)?;
            parser.expect_keyword(Keyword::AS)?;
            let query = parser.parse_query()?;
            Ok(Statement::CreateMaterializedView(CreateMaterializedView {
                name,
                if_not_exists,
                options,
                query,
            }))
        }
        ObjectKind::Sink => {
            let from = if parser.parse_keyword(Keyword::FROM) {
                Some(parse_name(parser)?)
            } else {
                None
            };
            let options = parse_with_options(parser)?;
            let input = match from {
                Some(from) => SinkInput::From(from),
                None => {
                    parser.expect_keyword(Keyword::AS)?;
                    SinkInput::Query(parser.parse_query()?)
                }
            };
            Ok(Statement::CreateSink(CreateSink {
                name,
                if_not_exists,
                input,
                options,
            }))
        }
    }
}

/// `CREATE TABLE t AS SELECT` is standard SQL (and not supported); leave it to sqlparser.
fn is_create_table_as(parser: &Parser<'_>) -> bool {
    let mut n = 2;
    while let Token::Word(_) | Token::Period = parser.peek_nth_token(n).token {
        if matches!(&parser.peek_nth_token(n).token, Token::Word(w) if w.keyword == Keyword::AS) {
            return true;
        }
        n += 1;
    }
    false
}

fn parse_source_body(
    parser: &mut Parser<'_>,
    name: String,
    if_not_exists: bool,
    kind: ObjectKind,
) -> Result<CreateSource, ParserError> {
    let mut columns = Vec::new();
    let mut watermark = None;
    let mut primary_key = Vec::new();
    parser.expect_token(&Token::LParen)?;
    loop {
        if parse_word(parser, "WATERMARK") {
            if watermark.is_some() {
                return parser.expected("one WATERMARK clause", parser.peek_token());
            }
            parser.expect_keyword(Keyword::FOR)?;
            let column = normalize(&parser.parse_identifier()?);
            parser.expect_keyword(Keyword::AS)?;
            watermark = Some(Watermark {
                column,
                expr: parser.parse_expr()?,
            });
        } else if parser.parse_keywords(&[Keyword::PRIMARY, Keyword::KEY]) {
            let cols = parser
                .parse_parenthesized_column_list(sqlparser::parser::IsOptional::Mandatory, false)?;
            primary_key.extend(cols.iter().map(normalize));
            let _ = parser.parse_keywords(&[Keyword::NOT, Keyword::ENFORCED]);
        } else {
            let column = parser.parse_column_def()?;
            if column
                .options
                .iter()
                .any(|o| matches!(o.option, ColumnOption::PrimaryKey(_)))
            {
                primary_key.push(normalize(&column.name));
            }
            columns.push(column);
        }
        if parser.consume_token(&Token::Comma) {
            continue;
        }
        parser.expect_token(&Token::RParen)?;
        break;
    }
    let options = parse_with_options(parser)?;
    if kind == ObjectKind::Stream && !primary_key.is_empty() {
        return Err(ParserError::ParserError(
            "a STREAM has no PRIMARY KEY (it is append-only); use CREATE TABLE for keyed data"
                .into(),
        ));
    }
    Ok(CreateSource {
        name,
        if_not_exists,
        columns,
        watermark,
        primary_key,
        options,
    })
}

/// `WITH (key = value, ...)`; keys may be identifiers (dotted) or string literals, values
/// string, numeric or boolean literals.
fn parse_with_options(parser: &mut Parser<'_>) -> Result<Options, ParserError> {
    if !parser.parse_keyword(Keyword::WITH) {
        return Ok(Options::default());
    }
    parser.expect_token(&Token::LParen)?;
    let mut pairs = Vec::new();
    if !parser.consume_token(&Token::RParen) {
        loop {
            let key = parse_option_key(parser)?;
            parser.expect_token(&Token::Eq)?;
            let value = parse_option_value(parser)?;
            pairs.push((key, value));
            if parser.consume_token(&Token::Comma) {
                continue;
            }
            parser.expect_token(&Token::RParen)?;
            break;
        }
    }
    Ok(Options::from_pairs_as_written(pairs))
}

fn parse_option_key(parser: &mut Parser<'_>) -> Result<String, ParserError> {
    let token = parser.next_token();
    let mut key = match token.token {
        Token::SingleQuotedString(s) => return Ok(s),
        Token::Word(w) => w.value,
        _ => return parser.expected("an option name", token),
    };
    while parser.consume_token(&Token::Period) {
        let token = parser.next_token();
        match token.token {
            Token::Word(w) => {
                key.push('.');
                key.push_str(&w.value);
            }
            _ => return parser.expected("an option name", token),
        }
    }
    Ok(key)
}

fn parse_option_value(parser: &mut Parser<'_>) -> Result<String, ParserError> {
    let token = parser.next_token();
    match token.token {
        Token::SingleQuotedString(s) => Ok(s),
        Token::Number(n, _) => Ok(n),
        Token::Minus => match parser.next_token().token {
            Token::Number(n, _) => Ok(format!("-{n}")),
            _ => parser.expected("a number", token),
        },
        Token::Word(w) if matches!(w.keyword, Keyword::TRUE | Keyword::FALSE) => {
            Ok(w.value.to_ascii_lowercase())
        }
        _ => parser.expected(
            "an option value (a string, number or boolean literal)",
            token,
        ),
    }
}

fn parse_show(parser: &mut Parser<'_>) -> Result<Statement, ParserError> {
    let kind = if peek_word(parser, 1, "STREAMS") {
        Some(ShowKind::Streams)
    } else if peek_word(parser, 1, "TABLES") {
        Some(ShowKind::Tables)
    } else if peek_word(parser, 1, "SINKS") {
        Some(ShowKind::Sinks)
    } else if peek_word(parser, 1, "QUERIES") {
        Some(ShowKind::Queries)
    } else if peek_word(parser, 1, "USERS") {
        Some(ShowKind::Users)
    } else if peek_word(parser, 1, "MATERIALIZED") && peek_word(parser, 2, "VIEWS") {
        Some(ShowKind::MaterializedViews)
    } else if peek_word(parser, 1, "VIEWS") {
        Some(ShowKind::Views)
    } else {
        None
    };
    if let Some(kind) = kind {
        parser.next_token();
        parser.next_token();
        if kind == ShowKind::MaterializedViews {
            parser.next_token();
        }
        return Ok(Statement::Show(kind));
    }
    if peek_word(parser, 1, "CREATE") {
        parser.next_token();
        parser.next_token();
        let kind = parse_object_kind(parser)?;
        return Ok(Statement::ShowCreate {
            kind,
            name: parse_name(parser)?,
        });
    }
    standard(parser)
}

fn parse_object_kind(parser: &mut Parser<'_>) -> Result<ObjectKind, ParserError> {
    if parse_word(parser, "STREAM") {
        Ok(ObjectKind::Stream)
    } else if parser.parse_keyword(Keyword::TABLE) {
        Ok(ObjectKind::Table)
    } else if parser.parse_keywords(&[Keyword::MATERIALIZED, Keyword::VIEW]) {
        Ok(ObjectKind::MaterializedView)
    } else if parser.parse_keyword(Keyword::VIEW) {
        Ok(ObjectKind::View)
    } else if parse_word(parser, "SINK") {
        Ok(ObjectKind::Sink)
    } else {
        parser.expected(
            "STREAM, TABLE, VIEW, MATERIALIZED VIEW or SINK",
            parser.peek_token(),
        )
    }
}

/// `[WITH] [[ENCRYPTED] PASSWORD 'secret' | PASSWORD NULL]`: `None` without a PASSWORD clause,
/// `Some(None)` for `PASSWORD NULL`.
fn parse_user_options(parser: &mut Parser<'_>) -> Result<Option<Option<String>>, ParserError> {
    let _ = parser.parse_keyword(Keyword::WITH);
    let _ = parse_word(parser, "ENCRYPTED");
    if !parse_word(parser, "PASSWORD") {
        return Ok(None);
    }
    if parser.parse_keyword(Keyword::NULL) {
        return Ok(Some(None));
    }
    Ok(Some(Some(parser.parse_literal_string()?)))
}

fn parse_alter_user(parser: &mut Parser<'_>) -> Result<Statement, ParserError> {
    parser.next_token(); // ALTER
    parser.next_token(); // USER
    let name = normalize(&parser.parse_identifier()?);
    match parse_user_options(parser)? {
        Some(password) => Ok(Statement::AlterUser { name, password }),
        None => parser.expected("PASSWORD 'secret' or PASSWORD NULL", parser.peek_token()),
    }
}

/// `GRANT READ | ADMIN TO user, ...`, `REVOKE READ | ADMIN FROM user, ...`; `SELECT ON ALL
/// TABLES [IN SCHEMA public]` is Postgres' spelling of READ.
fn parse_grant(parser: &mut Parser<'_>) -> Result<Statement, ParserError> {
    let grant = matches!(parser.next_token().token, Token::Word(w) if w.keyword == Keyword::GRANT);
    let privilege = if parse_word(parser, "READ") {
        Privilege::Read
    } else if parse_word(parser, "ADMIN") {
        Privilege::Admin
    } else if parser.parse_keyword(Keyword::SELECT) {
        if !parser.parse_keywords(&[Keyword::ON, Keyword::ALL, Keyword::TABLES]) {
            return Err(ParserError::ParserError(
                "privileges are per server, not per object: GRANT READ TO user (or GRANT SELECT \
                 ON ALL TABLES IN SCHEMA public TO user)"
                    .into(),
            ));
        }
        if parser.parse_keywords(&[Keyword::IN, Keyword::SCHEMA]) {
            let schema = parser.parse_identifier()?;
            if normalize(&schema) != "public" {
                return Err(ParserError::ParserError(
                    "Weir has one schema, public".into(),
                ));
            }
        }
        Privilege::Read
    } else {
        return parser.expected("READ, ADMIN or SELECT ON ALL TABLES", parser.peek_token());
    };
    parser.expect_keyword(if grant { Keyword::TO } else { Keyword::FROM })?;
    let users = parser
        .parse_comma_separated(|p| p.parse_identifier())?
        .iter()
        .map(normalize)
        .collect();
    Ok(if grant {
        Statement::Grant { privilege, users }
    } else {
        Statement::Revoke { privilege, users }
    })
}

fn parse_drop(parser: &mut Parser<'_>) -> Result<Statement, ParserError> {
    if peek_word(parser, 1, "USER") {
        parser.next_token(); // DROP
        parser.next_token(); // USER
        let if_exists = parser.parse_keywords(&[Keyword::IF, Keyword::EXISTS]);
        let names = parser
            .parse_comma_separated(|p| p.parse_identifier())?
            .iter()
            .map(normalize)
            .collect();
        return Ok(Statement::DropUser { names, if_exists });
    }
    let is_weir = peek_word(parser, 1, "STREAM")
        || peek_word(parser, 1, "SINK")
        || peek_word(parser, 1, "TABLE")
        || peek_word(parser, 1, "VIEW")
        || (peek_word(parser, 1, "MATERIALIZED") && peek_word(parser, 2, "VIEW"));
    if !is_weir {
        return standard(parser);
    }
    parser.next_token(); // DROP
    let kind = parse_object_kind(parser)?;
    let if_exists = parser.parse_keywords(&[Keyword::IF, Keyword::EXISTS]);
    let names = parser.parse_comma_separated(parse_name)?;
    let cascade = matches!(
        parser.parse_one_of_keywords(&[Keyword::CASCADE, Keyword::RESTRICT]),
        Some(Keyword::CASCADE)
    );
    Ok(Statement::Drop {
        kind,
        names,
        if_exists,
        cascade,
    })
}

/// An object name: one identifier, optionally qualified by `public.`.
fn parse_name(parser: &mut Parser<'_>) -> Result<String, ParserError> {
    let start = parser.peek_token();
    let name: ObjectName = parser.parse_object_name(false)?;
    let parts: Vec<&Ident> = name.0.iter().filter_map(|p| p.as_ident()).collect();
    match parts.as_slice() {
        [name] => Ok(normalize(name)),
        [schema, name] if normalize(schema) == "public" => Ok(normalize(name)),
        _ => parser.expected(
            "an unqualified object name (Weir has one schema, public)",
            start,
        ),
    }
}

/// Unquoted identifiers fold to lower case, as in Postgres; quoted ones keep their case.
pub fn normalize(ident: &Ident) -> String {
    match ident.quote_style {
        Some(_) => ident.value.clone(),
        None => ident.value.to_ascii_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(sql: &str) -> Statement {
        let mut statements = parse_sql(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
        assert_eq!(statements.len(), 1, "{sql}");
        statements.remove(0)
    }

    #[test]
    fn users_and_privileges() {
        assert_eq!(
            one("CREATE USER Alice WITH PASSWORD 'pw'"),
            Statement::CreateUser {
                name: "alice".into(),
                if_not_exists: false,
                password: Some("pw".into()),
            }
        );
        assert_eq!(
            one("create user if not exists \"Bob\""),
            Statement::CreateUser {
                name: "Bob".into(),
                if_not_exists: true,
                password: None,
            }
        );
        assert_eq!(
            one("ALTER USER alice PASSWORD NULL"),
            Statement::AlterUser {
                name: "alice".into(),
                password: None,
            }
        );
        assert_eq!(
            one("ALTER USER alice WITH ENCRYPTED PASSWORD 'x'"),
            Statement::AlterUser {
                name: "alice".into(),
                password: Some("x".into()),
            }
        );
        assert_eq!(
            one("DROP USER IF EXISTS a, b"),
            Statement::DropUser {
                names: vec!["a".into(), "b".into()],
                if_exists: true,
            }
        );
        assert_eq!(
            one("GRANT SELECT ON ALL TABLES IN SCHEMA public TO a, b"),
            Statement::Grant {
                privilege: Privilege::Read,
                users: vec!["a".into(), "b".into()],
            }
        );
        assert_eq!(
            one("REVOKE ADMIN FROM a"),
            Statement::Revoke {
                privilege: Privilege::Admin,
                users: vec!["a".into()],
            }
        );
        assert_eq!(one("SHOW USERS"), Statement::Show(ShowKind::Users));
        for bad in [
            "GRANT SELECT ON v TO a",
            "GRANT READ TO",
            "ALTER USER a",
            "GRANT SELECT ON ALL TABLES IN SCHEMA other TO a",
            "REVOKE READ TO a",
        ] {
            assert!(parse_sql(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn create_stream_with_watermark_and_options() {
        let Statement::CreateStream(s) = one(
            "CREATE STREAM Vehicle_Events (vehicle_id BIGINT NOT NULL, ts TIMESTAMP(3) NOT NULL, \
             WATERMARK FOR ts AS ts - INTERVAL '5' SECOND) WITH (connector = 'kafka', \
             'bootstrap.servers' = '127.0.0.1:9092', rows_per_second = 1000, properties.security.protocol = 'SSL', x = true)",
        ) else {
            panic!("not a stream")
        };
        assert_eq!(s.name, "vehicle_events");
        assert_eq!(s.columns.len(), 2);
        assert_eq!(s.watermark.as_ref().map(|w| w.column.as_str()), Some("ts"));
        assert_eq!(s.options.get("bootstrap.servers"), Some("127.0.0.1:9092"));
        assert_eq!(s.options.get("rows_per_second"), Some("1000"));
        assert_eq!(s.options.get("properties.security.protocol"), Some("SSL"));
        assert_eq!(s.options.get("x"), Some("true"));
    }

    #[test]
    fn create_table_primary_keys_both_spellings() {
        let Statement::CreateTable(t) =
            one("CREATE TABLE v (id BIGINT PRIMARY KEY, name TEXT) WITH (connector='file')")
        else {
            panic!("not a table")
        };
        assert_eq!(t.primary_key, vec!["id"]);
        let Statement::CreateTable(t) =
            one("CREATE TABLE v (id BIGINT, name TEXT, PRIMARY KEY (id) NOT ENFORCED)")
        else {
            panic!("not a table")
        };
        assert_eq!(t.primary_key, vec!["id"]);
    }

    #[test]
    fn statement_text_is_kept_per_statement() {
        let parsed = parse_sql_with_positions(
            "CREATE STREAM a (x INT) WITH (connector='datagen');\n  SELECT * FROM a LIMIT 1;",
        )
        .expect("parses");
        assert_eq!(
            parsed[0].sql,
            "CREATE STREAM a (x INT) WITH (connector='datagen')"
        );
        assert_eq!(parsed[1].sql, "SELECT * FROM a LIMIT 1");
        assert_eq!(parsed[1].start, Position { line: 2, column: 3 });
    }

    #[test]
    fn window_functions_parse_in_both_spellings() {
        one("SELECT window_start, count(*) FROM TUMBLE(s, ts, INTERVAL '1' MINUTE) GROUP BY 1");
        one("SELECT * FROM TABLE(TUMBLE(TABLE s, DESCRIPTOR(ts), INTERVAL '1' MINUTE))");
        one("SELECT * FROM HOP(s, ts, INTERVAL '2' SECOND, INTERVAL '10' SECOND) AS h");
        one("SELECT * FROM TABLE(SESSION(TABLE s, DESCRIPTOR(ts), INTERVAL '30' SECOND))");
    }

    #[test]
    fn lookup_join_parses() {
        one("SELECT * FROM e JOIN vehicles FOR SYSTEM_TIME AS OF e.ts AS v ON e.id = v.id");
    }

    #[test]
    fn introspection_statements() {
        assert_eq!(one("SHOW STREAMS"), Statement::Show(ShowKind::Streams));
        assert_eq!(
            one("show materialized views"),
            Statement::Show(ShowKind::MaterializedViews)
        );
        assert_eq!(
            one("SHOW CREATE MATERIALIZED VIEW m"),
            Statement::ShowCreate {
                kind: ObjectKind::MaterializedView,
                name: "m".into()
            }
        );
        assert_eq!(
            one("DESCRIBE \"Mixed\""),
            Statement::Describe {
                name: "Mixed".into()
            }
        );
        assert_eq!(
            one("DROP SINK IF EXISTS a, b CASCADE"),
            Statement::Drop {
                kind: ObjectKind::Sink,
                names: vec!["a".into(), "b".into()],
                if_exists: true,
                cascade: true
            }
        );
        assert!(matches!(
            one("SET search_path = public"),
            Statement::Standard(_)
        ));
    }

    #[test]
    fn syntax_errors_carry_a_position() {
        let err = parse_sql("CREATE STREAM s (x INT,, y INT)").expect_err("bad");
        assert_eq!(err.position.map(|p| p.column), Some(24), "{err:?}");
        let err = parse_sql("SELECT 1 2").expect_err("bad");
        assert!(err.position.is_some(), "{err:?}");
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let sql = format!("SELECT {}1{}", "(".repeat(5000), ")".repeat(5000));
        assert!(parse_sql(&sql).is_err());
    }
}
