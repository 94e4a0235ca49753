//! [`AllowedPaths`]: the local paths connectors may touch.
//!
//! `weir serve` confines every path a `WITH` option names to its `--allow-path` roots (by
//! default the data directory and the working directory), so that a SQL client with the admin
//! privilege cannot read `/etc/shadow` through a file stream, overwrite files through a Parquet
//! sink, or send a file's content as a password to a server it controls. The options checked,
//! by name so that a new connector's options are covered without a list to keep up:
//!
//! - `path` and `dead_letter.path` (file streams and tables, Parquet sinks; a `path` that is a
//!   bucket URL such as `s3://` is not local and not checked);
//! - every `*_file` (`password_file`, `bearer_token_file`, `tls.ca_file`, ...);
//! - Kafka's `properties.*.location` and `properties.sasl.kerberos.keytab`; the librdkafka
//!   properties that load code or run a command (`plugin.library.paths`, `ssl.engine.location`,
//!   `sasl.kerberos.kinit.cmd`) are refused outright.
//!
//! A path is resolved before the check: relative to the working directory, symbolic links
//! followed as far as the path exists, `..` applied after that. The check is made when the
//! statement is executed and when the catalog is replayed at start; a file replaced by a link
//! later is not checked again. `weir run` and `weir check` run the invoking user's own files
//! with that user's rights and are not confined.

use std::path::{Component, Path, PathBuf};

use weir_runtime::connector::ConnectorError;
use weir_sql::Options;

/// librdkafka properties that load a library or run a command.
const REFUSED_KAFKA_PROPERTIES: &[&str] = &[
    "properties.plugin.library.paths",
    "properties.ssl.engine.location",
    "properties.sasl.kerberos.kinit.cmd",
];

/// Where connectors may read and write files: anywhere, or under a set of roots.
#[derive(Debug, Clone, Default)]
pub struct AllowedPaths {
    /// Resolved roots; `None` allows every path.
    roots: Option<Vec<PathBuf>>,
}

impl AllowedPaths {
    /// No confinement (`weir run`, `weir check`, tests).
    pub fn anywhere() -> Self {
        Self::default()
    }

    /// Paths under one of `roots` (each resolved now; a root need not exist yet).
    pub fn under(roots: impl IntoIterator<Item = PathBuf>) -> std::io::Result<Self> {
        let roots = roots
            .into_iter()
            .map(|root| resolve(&root))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Self { roots: Some(roots) })
    }

    /// The resolved roots; `None` when every path is allowed.
    pub fn roots(&self) -> Option<&[PathBuf]> {
        self.roots.as_deref()
    }

    /// Checks every option that names a local path.
    pub fn check_options(&self, options: &Options) -> Result<(), ConnectorError> {
        if self.roots.is_none() {
            return Ok(());
        }
        for (key, value) in options.iter() {
            if REFUSED_KAFKA_PROPERTIES.contains(&key) {
                return Err(ConnectorError::NotAllowed(format!(
                    "option '{key}' loads code or runs a command on the server, which SQL clients may not configure"
                )));
            }
            if names_path(key) {
                self.check(key, value)?;
            }
        }
        Ok(())
    }

    /// Checks that `value`, the local path option `key` names, is under a root.
    fn check(&self, key: &str, value: &str) -> Result<(), ConnectorError> {
        let Some(roots) = &self.roots else {
            return Ok(());
        };
        let local = match value.strip_prefix("file://") {
            Some(path) => path,
            None if value.contains("://") => return Ok(()),
            None => value,
        };
        let resolved = resolve(Path::new(local)).map_err(|e| {
            ConnectorError::Invalid(format!("option '{key}': cannot resolve '{value}': {e}"))
        })?;
        if roots.iter().any(|root| resolved.starts_with(root)) {
            return Ok(());
        }
        let roots = roots
            .iter()
            .map(|r| r.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        Err(ConnectorError::NotAllowed(format!(
            "option '{key}': '{value}' is outside the paths this server may use ({roots}); \
             start weir serve with --allow-path to add a directory"
        )))
    }
}

/// Whether the option `key` holds a local path.
fn names_path(key: &str) -> bool {
    key == "path"
        || key.ends_with(".path")
        || key.ends_with("_file")
        || (key.starts_with("properties.")
            && (key.ends_with(".location") || key.ends_with(".keytab")))
}

/// `path` made absolute, with symbolic links resolved as far as it exists and `.`/`..` applied
/// to the rest (which, not existing, holds no links).
fn resolve(path: &Path) -> std::io::Result<PathBuf> {
    let absolute = std::path::absolute(path)?;
    let mut existing = absolute.as_path();
    let mut missing = Vec::new();
    let mut resolved = loop {
        match existing.canonicalize() {
            Ok(resolved) => break resolved,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let (Some(parent), Some(last)) =
                    (existing.parent(), existing.components().next_back())
                else {
                    return Err(e);
                };
                missing.push(last);
                existing = parent;
            }
            Err(e) => return Err(e),
        }
    };
    for component in missing.into_iter().rev() {
        match component {
            Component::ParentDir => {
                resolved.pop();
            }
            Component::Normal(name) => resolved.push(name),
            Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
        }
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(pairs: &[(&str, &str)]) -> Options {
        Options::try_from_pairs(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            .expect("options")
    }

    fn refused(allowed: &AllowedPaths, pairs: &[(&str, &str)]) -> String {
        match allowed.check_options(&options(pairs)) {
            Err(ConnectorError::NotAllowed(message)) => message,
            other => panic!("{pairs:?} should be refused, got {other:?}"),
        }
    }

    #[test]
    fn paths_under_a_root_pass_and_others_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("in")).expect("mkdir");
        let allowed = AllowedPaths::under([root.clone()]).expect("roots");
        let inside = root.join("in/events.ndjson");
        let not_yet = root.join("lake/new/part");
        for path in [&inside, &not_yet] {
            let path = path.to_str().expect("utf8");
            allowed
                .check_options(&options(&[("path", path)]))
                .expect("inside");
            allowed
                .check_options(&options(&[("path", &format!("file://{path}"))]))
                .expect("file URL inside");
        }
        allowed
            .check_options(&options(&[("path", "s3://bucket/lake")]))
            .expect("a bucket is not a local path");
        let message = refused(&allowed, &[("path", "/etc/passwd")]);
        assert!(
            message.contains("'/etc/passwd' is outside") && message.contains("--allow-path"),
            "{message}"
        );
        let escape = format!("{}/in/../../secret", root.display());
        refused(&allowed, &[("path", &escape)]);
        let escape = format!("{}/no/such/../../../secret", root.display());
        refused(&allowed, &[("dead_letter.path", &escape)]);
        refused(&allowed, &[("password_file", "/etc/shadow")]);
        refused(&allowed, &[("tls.ca_file", "/etc/ssl/ca.pem")]);
        refused(
            &allowed,
            &[("properties.ssl.key.location", "/root/key.pem")],
        );
        refused(&allowed, &[("properties.plugin.library.paths", "x.so")]);
        // A root given with `..` or not yet created is resolved the same way.
        let relative_root = AllowedPaths::under([root.join("in/../later")]).expect("roots");
        relative_root
            .check_options(&options(&[(
                "path",
                root.join("later/x").to_str().expect("utf8"),
            )]))
            .expect("under the resolved root");
        // Anywhere allows everything, the refused properties too.
        AllowedPaths::anywhere()
            .check_options(&options(&[
                ("path", "/etc/passwd"),
                ("properties.plugin.library.paths", "x.so"),
            ]))
            .expect("anywhere");
    }

    #[test]
    fn a_symbolic_link_out_of_a_root_is_followed_and_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&root).expect("mkdir");
        std::fs::create_dir_all(&outside).expect("mkdir");
        std::os::unix::fs::symlink(&outside, root.join("link")).expect("symlink");
        let allowed = AllowedPaths::under([root.clone()]).expect("roots");
        let through_link = root.join("link/data.csv");
        refused(&allowed, &[("path", through_link.to_str().expect("utf8"))]);
        // The reverse: a root reached through a link allows its real paths.
        let link_root = dir.path().join("root-link");
        std::os::unix::fs::symlink(&root, &link_root).expect("symlink");
        let via_link = AllowedPaths::under([link_root]).expect("roots");
        via_link
            .check_options(&options(&[(
                "path",
                root.join("x.csv").to_str().expect("utf8"),
            )]))
            .expect("the root's real path");
    }
}
