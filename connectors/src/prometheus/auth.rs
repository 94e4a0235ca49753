//! Credentials of the remote-write sink: basic auth or a bearer token, each given as a value,
//! a `${ENV}` reference, or a `*_file` read at every request (so a rotated token is picked
//! up). Secrets never appear in `Debug` output, logs or errors.

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
    fn resolve(&self) -> Result<String, String> {
        match self {
            Secret::Value(v) => Ok(v.clone()),
            Secret::File(path) => std::fs::read_to_string(path)
                .map(|s| s.trim_end_matches(['\n', '\r']).to_string())
                .map_err(|e| format!("cannot read {}: {e}", path.display())),
        }
    }

    /// `key` or `key_file`, at most one of them.
    fn read(reader: &OptionReader<'_>, key: &str) -> Result<Option<Secret>, ConnectorError> {
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

/// How requests authenticate.
#[derive(Debug, Clone, Default)]
pub enum Auth {
    #[default]
    None,
    Basic {
        username: String,
        password: Secret,
    },
    Bearer(Secret),
}

impl Auth {
    /// Reads `basic_auth.username`, `basic_auth.password[_file]`, `bearer_token[_file]`.
    pub fn read(reader: &OptionReader<'_>) -> Result<Self, ConnectorError> {
        let username = reader
            .string("basic_auth.username")
            .map(|u| expand_env("basic_auth.username", u))
            .transpose()?;
        let password = Secret::read(reader, "basic_auth.password")?;
        let token = Secret::read(reader, "bearer_token")?;
        match (username, password, token) {
            (None, None, None) => Ok(Auth::None),
            (Some(username), password, None) => Ok(Auth::Basic {
                username,
                password: password.unwrap_or(Secret::Value(String::new())),
            }),
            (None, Some(_), _) => Err(OptionError::new(
                "basic_auth.password",
                "option 'basic_auth.password' needs 'basic_auth.username'",
            )
            .into()),
            (None, None, Some(token)) => Ok(Auth::Bearer(token)),
            (Some(_), _, Some(_)) => Err(OptionError::new(
                "bearer_token",
                "give basic_auth.* or bearer_token, not both",
            )
            .into()),
        }
    }

    /// Adds the credentials to `request`.
    pub fn apply(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::RequestBuilder, String> {
        Ok(match self {
            Auth::None => request,
            Auth::Basic { username, password } => {
                request.basic_auth(username, Some(password.resolve()?))
            }
            Auth::Bearer(token) => request.bearer_auth(token.resolve()?),
        })
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

#[cfg(test)]
mod tests {
    use weir_sql::Options;

    use super::*;

    fn options(pairs: &[(&str, &str)]) -> Options {
        Options::from_pairs_as_written(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn secrets_come_from_values_env_or_files_and_never_print() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("token");
        std::fs::write(&file, "from-file\n").expect("write");
        let o = options(&[("bearer_token_file", file.to_str().expect("path"))]);
        let auth = Auth::read(&o.reader()).expect("auth");
        let Auth::Bearer(token) = &auth else {
            panic!("{auth:?}")
        };
        assert_eq!(token.resolve().as_deref(), Ok("from-file"));

        let o = options(&[
            ("basic_auth.username", "u"),
            ("basic_auth.password", "${PATH}"),
        ]);
        let auth = Auth::read(&o.reader()).expect("auth");
        let Auth::Basic { password, .. } = &auth else {
            panic!("{auth:?}")
        };
        assert_eq!(password.resolve().ok(), std::env::var("PATH").ok());
        assert!(!format!("{auth:?}").contains(&std::env::var("PATH").expect("PATH")));

        let o = options(&[("bearer_token", "${WEIR_SURELY_NOT_SET}")]);
        let err = Auth::read(&o.reader()).expect_err("unset");
        assert!(err.to_string().contains("WEIR_SURELY_NOT_SET"), "{err}");
        let o = options(&[("bearer_token", "a"), ("bearer_token_file", "/x")]);
        assert!(Auth::read(&o.reader()).is_err());
        let o = options(&[("basic_auth.password", "p")]);
        assert!(Auth::read(&o.reader()).is_err());
    }
}
