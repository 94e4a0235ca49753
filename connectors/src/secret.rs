//! Secrets in `WITH` options (passwords, tokens): a value, a `${ENV}` reference, or a `*_file`
//! read when needed (so a rotated secret is picked up). They never appear in `Debug` output,
//! logs or errors.

use std::fmt;
use std::path::PathBuf;

use weir_runtime::connector::ConnectorError;
use weir_sql::options::{OptionError, OptionReader};

/// A secret: a value (already resolved from `${ENV}`), or a file holding it.
#[derive(Clone)]
pub enum Secret {
    Value(String),
    File(PathBuf),
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Secret::Value(_) => f.write_str("Secret(***)"),
            Secret::File(path) => write!(f, "Secret(file {})", path.display()),
        }
    }
}

impl Secret {
    /// The secret now (a file's content without its trailing newline).
    pub fn resolve(&self) -> Result<String, String> {
        match self {
            Secret::Value(v) => Ok(v.clone()),
            Secret::File(path) => std::fs::read_to_string(path)
                .map(|s| s.trim_end_matches(['\n', '\r']).to_string())
                .map_err(|e| format!("cannot read {}: {e}", path.display())),
        }
    }

    /// `key` or `key_file`, at most one of them.
    pub fn read(reader: &OptionReader<'_>, key: &str) -> Result<Option<Secret>, ConnectorError> {
        let file_key = format!("{key}_file");
        match (reader.string(key), reader.string(&file_key)) {
            (Some(_), Some(_)) => {
                Err(OptionError::new(key, format!("give '{key}' or '{file_key}', not both")).into())
            }
            (Some(value), None) => Ok(Some(Secret::Value(expand_env(key, value)?))),
            (None, Some(path)) => {
                let path = PathBuf::from(path);
                let secret = Secret::File(path);
                secret.resolve().map_err(|e| {
                    OptionError::new(&file_key, format!("option '{file_key}': {e}"))
                })?;
                Ok(Some(secret))
            }
            (None, None) => Ok(None),
        }
    }
}

/// Replaces each `${NAME}` in `value` by the environment variable NAME. The error names the
/// option and the variable, never the value.
pub fn expand_env(key: &str, value: &str) -> Result<String, ConnectorError> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or_else(|| {
            OptionError::new(key, format!("option '{key}': '${{' without a closing '}}'"))
        })?;
        let name = &after[..end];
        let resolved = std::env::var(name).map_err(|_| {
            OptionError::new(
                key,
                format!("option '{key}': environment variable '{name}' is not set"),
            )
        })?;
        out.push_str(&resolved);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}
