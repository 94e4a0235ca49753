//! [`SqlError`]: a parse error with the position it refers to.

use std::fmt;

/// A 1-based line and column in the statement text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Position {
    pub line: u64,
    pub column: u64,
}

impl Position {
    /// The 1-based character offset of this position in `sql` (Postgres' `position` field).
    pub fn offset_in(&self, sql: &str) -> usize {
        let mut offset = 0usize;
        for (i, line) in sql.split('\n').enumerate() {
            if i as u64 + 1 == self.line {
                return offset + (self.column as usize).max(1);
            }
            offset += line.chars().count() + 1;
        }
        offset.max(1)
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// A statement that does not parse (SQLSTATE 42601), or a `WITH` option that is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SqlError {
    /// What is wrong, without the position.
    pub message: String,
    /// Where, when known.
    pub position: Option<Position>,
}

impl SqlError {
    pub fn new(message: impl Into<String>, position: Option<Position>) -> Self {
        Self {
            message: message.into(),
            position,
        }
    }

    /// Converts sqlparser's error, whose text ends with "at Line: L, Column: C".
    pub fn from_parser(err: sqlparser::parser::ParserError) -> Self {
        let text = match err {
            sqlparser::parser::ParserError::TokenizerError(s)
            | sqlparser::parser::ParserError::ParserError(s) => s,
            sqlparser::parser::ParserError::RecursionLimitExceeded => {
                return Self::new("statement is nested too deeply", None);
            }
        };
        match text.rfind(" at Line: ") {
            Some(at) => {
                let position = parse_line_column(&text[at + 4..]);
                Self::new(text[..at].to_string(), position)
            }
            None => Self::new(text, None),
        }
    }
}

fn parse_line_column(s: &str) -> Option<Position> {
    // "Line: 1, Column: 15"
    let s = s.strip_prefix("Line: ")?;
    let (line, rest) = s.split_once(", Column: ")?;
    let column: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    Some(Position {
        line: line.trim().parse().ok()?,
        column: column.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_offsets_count_characters_across_lines() {
        let sql = "SELECT 1\nFROM x";
        assert_eq!(Position { line: 2, column: 1 }.offset_in(sql), 10);
        assert_eq!(Position { line: 1, column: 8 }.offset_in(sql), 8);
    }

    #[test]
    fn parser_errors_keep_their_position() {
        let e = SqlError::from_parser(sqlparser::parser::ParserError::ParserError(
            "Expected: an expression, found: EOF at Line: 3, Column: 7".into(),
        ));
        assert_eq!(e.message, "Expected: an expression, found: EOF");
        assert_eq!(e.position, Some(Position { line: 3, column: 7 }));
    }
}
