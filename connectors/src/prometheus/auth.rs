//! Credentials of the remote-write sink: basic auth or a bearer token, each given as a value,
//! a `${ENV}` reference, or a `*_file` read at every request (so a rotated token is picked
//! up). Secrets never appear in `Debug` output, logs or errors.

use weir_runtime::connector::ConnectorError;
use weir_sql::options::{OptionError, OptionReader};

pub use crate::secret::{Secret, expand_env};

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
