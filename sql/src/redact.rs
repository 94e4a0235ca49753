//! Secrets out of statement text: `SHOW CREATE` prints a statement as written, except that the
//! values of secret `WITH` options (passwords, tokens, header values) read `'***'`.
//!
//! The catalog keeps the real text (a restart needs the real value); only what is shown to users
//! goes through [`redact_secrets`]. It works on tokens, not on a re-printed AST, so everything
//! else keeps the user's own spelling and layout.

use sqlparser::tokenizer::{Location, Token, TokenWithSpan, Tokenizer};

use crate::WeirDialect;

/// What a secret option's value is shown as.
pub const REDACTED: &str = "'***'";

/// Whether a `WITH` option holds a secret: a password, token, secret, key or credential (but not
/// a `*_file` option, which holds a path), or an HTTP header value (`headers.*`), which often
/// carries an API key.
pub fn is_secret_option(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    if key.starts_with("headers.") {
        return true;
    }
    if key.ends_with("_file") || key.ends_with(".location") {
        return false;
    }
    let last = key.rsplit('.').next().unwrap_or(&key);
    [
        "password",
        "passwd",
        "token",
        "secret",
        "authorization",
        "api_key",
        "apikey",
        "credentials",
        "jaas.config",
    ]
    .iter()
    .any(|word| last.contains(word) || key.ends_with(word))
}

/// `sql` with the value of every secret option inside a `WITH (...)` list replaced by
/// [`REDACTED`]. Text that does not tokenize is returned whole only if it has no `WITH` at all;
/// otherwise nothing of it is shown but a note, since the secret's position is unknown.
pub fn redact_secrets(sql: &str) -> String {
    let Ok(tokens) = Tokenizer::new(&WeirDialect::default(), sql).tokenize_with_location() else {
        return if sql.to_ascii_lowercase().contains("with") {
            "-- (statement text not shown: it could not be tokenized to hide its secrets)".into()
        } else {
            sql.to_string()
        };
    };
    let tokens: Vec<&TokenWithSpan> = tokens
        .iter()
        .filter(|t| !matches!(t.token, Token::Whitespace(_)))
        .collect();
    let offsets = LineOffsets::new(sql);
    let mut secrets = Vec::new(); // byte ranges of secret values
    let mut depth_of_with: Option<usize> = None; // paren depth of the open `WITH (`
    let mut depth = 0usize;
    for (i, t) in tokens.iter().enumerate() {
        match &t.token {
            Token::LParen => {
                depth += 1;
                let after_with = i > 0
                    && matches!(&tokens[i - 1].token, Token::Word(w) if w.value.eq_ignore_ascii_case("with"));
                if after_with && depth_of_with.is_none() {
                    depth_of_with = Some(depth);
                }
            }
            Token::RParen => {
                if depth_of_with == Some(depth) {
                    depth_of_with = None;
                }
                depth = depth.saturating_sub(1);
            }
            Token::SingleQuotedString(_)
                if depth_of_with == Some(depth)
                    && i >= 2
                    && tokens[i - 1].token == Token::Eq
                    && option_key(&tokens[..i - 1]).is_some_and(|k| is_secret_option(&k)) =>
            {
                secrets.push(offsets.byte(t.span.start)..offsets.byte(t.span.end));
            }
            _ => {}
        }
    }
    let mut out = String::with_capacity(sql.len());
    let mut at = 0;
    for range in secrets {
        out.push_str(&sql[at..range.start]);
        out.push_str(REDACTED);
        at = range.end;
    }
    out.push_str(&sql[at..]);
    out
}

/// The option key that ends `tokens`: `'a.b'`, `a.b` or `"a"."b"`, read back to the `(` or `,`
/// before it.
fn option_key(tokens: &[&TokenWithSpan]) -> Option<String> {
    let mut parts = Vec::new();
    for t in tokens.iter().rev() {
        match &t.token {
            Token::SingleQuotedString(s) if parts.is_empty() => return Some(s.clone()),
            Token::Word(w) => parts.push(w.value.clone()),
            Token::Period => parts.push(".".into()),
            Token::Minus => parts.push("-".into()),
            Token::LParen | Token::Comma => break,
            _ => return None,
        }
    }
    (!parts.is_empty()).then(|| parts.iter().rev().map(String::as_str).collect())
}

/// Byte offsets of sqlparser's (line, column) locations; columns count characters.
struct LineOffsets<'a> {
    sql: &'a str,
    starts: Vec<usize>,
}

impl<'a> LineOffsets<'a> {
    fn new(sql: &'a str) -> Self {
        let starts = std::iter::once(0)
            .chain(sql.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        LineOffsets { sql, starts }
    }

    fn byte(&self, at: Location) -> usize {
        let Some(&start) = self.starts.get((at.line as usize).saturating_sub(1)) else {
            return self.sql.len();
        };
        self.sql[start..]
            .char_indices()
            .nth((at.column as usize).saturating_sub(1))
            .map_or(self.sql.len(), |(i, _)| start + i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_values_are_hidden_and_everything_else_kept_as_written() {
        let sql = "CREATE SINK p FROM v WITH (\n  connector = 'prometheus_remote_write',\n  \
                   url = 'https://prom:9090/api/v1/write',\n  basic_auth.username = 'weir',\n  \
                   'basic_auth.password' = 'hunter2',  bearer_token_file = '/run/token',\n  \
                   headers.X-Scope-OrgID = 'tenant-1', \"properties\".\"sasl\".\"password\" = 'pässwörd')";
        let shown = redact_secrets(sql);
        assert_eq!(
            shown,
            "CREATE SINK p FROM v WITH (\n  connector = 'prometheus_remote_write',\n  \
             url = 'https://prom:9090/api/v1/write',\n  basic_auth.username = 'weir',\n  \
             'basic_auth.password' = '***',  bearer_token_file = '/run/token',\n  \
             headers.X-Scope-OrgID = '***', \"properties\".\"sasl\".\"password\" = '***')"
        );
    }

    #[test]
    fn only_with_options_are_touched() {
        let sql = "CREATE SINK s WITH (connector = 'blackhole') AS \
                   SELECT * FROM logins WHERE password = 'x' AND token = 'y'";
        assert_eq!(redact_secrets(sql), sql);
        let mv = "CREATE MATERIALIZED VIEW v WITH (retention = '1h') AS SELECT 'token' AS t FROM s";
        assert_eq!(redact_secrets(mv), mv);
    }

    #[test]
    fn which_options_are_secret() {
        for key in [
            "basic_auth.password",
            "bearer_token",
            "properties.sasl.password",
            "properties.sasl.jaas.config",
            "properties.ssl.key.password",
            "headers.authorization",
            "headers.x-api-key",
            "s3.secret_access_key",
        ] {
            assert!(is_secret_option(key), "{key}");
        }
        for key in [
            "bearer_token_file",
            "basic_auth.username",
            "url",
            "tls.key_file",
            "properties.ssl.keystore.location",
            "topic",
        ] {
            assert!(!is_secret_option(key), "{key}");
        }
    }

    #[test]
    fn untokenizable_text_with_options_is_not_shown() {
        let shown = redact_secrets("CREATE SINK s WITH (password = 'unterminated)");
        assert!(!shown.contains("unterminated"), "{shown}");
    }
}
