//! Notebooks: Markdown files (`*.md`) under the notebooks directory (`--notebooks`, default
//! `queries/`), whose ```sql blocks the console runs. They are plain files, so they live in
//! git beside the `.sql` files; `weir check` lints their blocks.

use std::path::{Component, Path as FsPath, PathBuf};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::{ApiError, Console, json_response, parse_json};

/// Notebook files larger than this are refused (a notebook is prose and queries).
const MAX_NOTEBOOK_BYTES: usize = 1 << 20;
/// How deep the listing looks under the directory.
const MAX_DEPTH: usize = 4;

/// The notebooks directory.
pub(super) struct Notebooks {
    dir: PathBuf,
}

impl Notebooks {
    pub(super) fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    /// Every notebook, as paths relative to the directory with `/` between parts, sorted.
    pub(super) fn list(&self) -> Vec<String> {
        fn walk(dir: &FsPath, prefix: &str, depth: usize, out: &mut Vec<String>) {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return;
            };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    continue;
                }
                let path = format!("{prefix}{name}");
                match entry.file_type() {
                    Ok(t) if t.is_dir() && depth < MAX_DEPTH => {
                        walk(&entry.path(), &format!("{path}/"), depth + 1, out);
                    }
                    Ok(t) if t.is_file() && name.ends_with(".md") => out.push(path),
                    _ => {}
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.dir, "", 0, &mut out);
        out.sort();
        out
    }

    /// The file a notebook name stands for: relative, without `..` or hidden parts, ending
    /// in `.md`.
    fn path(&self, name: &str) -> Result<PathBuf, ApiError> {
        let bad = || {
            ApiError::BadRequest(format!(
                "'{name}' is not a notebook name: use a relative path ending in .md, without .. or hidden parts"
            ))
        };
        let relative = FsPath::new(name);
        if !name.ends_with(".md") || name.len() > 255 || name.contains('\\') {
            return Err(bad());
        }
        for component in relative.components() {
            match component {
                Component::Normal(part) if !part.to_string_lossy().starts_with('.') => {}
                _ => return Err(bad()),
            }
        }
        Ok(self.dir.join(relative))
    }

    pub(super) fn read(&self, name: &str) -> Result<String, ApiError> {
        let path = self.path(name)?;
        std::fs::read_to_string(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ApiError::NotFound(format!("no notebook '{name}'")),
            _ => ApiError::Internal(format!("cannot read {}: {e}", path.display())),
        })
    }

    /// Writes `text` to the notebook (created if new): to a temporary file beside it, then
    /// renamed over it, so a reader never sees half a file. With `base` (the [`version`] the
    /// editor started from), a file changed since (a `git pull`, another editor) is not
    /// overwritten: 409.
    pub(super) fn write(&self, name: &str, text: &str, base: Option<&str>) -> Result<(), ApiError> {
        if text.len() > MAX_NOTEBOOK_BYTES {
            return Err(ApiError::BadRequest(format!(
                "a notebook may hold at most {MAX_NOTEBOOK_BYTES} bytes"
            )));
        }
        let path = self.path(name)?;
        if let Some(base) = base {
            let current = match std::fs::read_to_string(&path) {
                Ok(current) => Some(version(&current)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(ApiError::Internal(format!("cannot read {name}: {e}"))),
            };
            if current.is_some_and(|current| current != base) {
                return Err(ApiError::Conflict(format!(
                    "{name} changed on disk since it was opened: reload it, then make the edit again"
                )));
            }
        }
        let failed = |e: std::io::Error| ApiError::Internal(format!("cannot write {name}: {e}"));
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(failed)?;
        }
        let temporary = path.with_extension("md.saving");
        std::fs::write(&temporary, text).map_err(failed)?;
        std::fs::rename(&temporary, &path).map_err(failed)
    }
}

/// A notebook's version: a hash of its text.
fn version(text: &str) -> String {
    crate::users::sha256(text.as_bytes())[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The ```sql blocks of a Markdown text: (the line its code starts on, 1-based; the code).
pub fn sql_blocks(text: &str) -> Vec<(usize, String)> {
    /// An open fence: its backticks, and the code so far if it is SQL.
    struct Fence {
        ticks: usize,
        start: usize,
        sql: Option<String>,
    }
    let mut blocks = Vec::new();
    let mut open: Option<Fence> = None;
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        let ticks = trimmed.chars().take_while(|c| *c == '`').count();
        match &mut open {
            None if ticks >= 3 => {
                let language = trimmed[ticks..].split_whitespace().next().unwrap_or("");
                open = Some(Fence {
                    ticks,
                    start: i + 2,
                    sql: language.eq_ignore_ascii_case("sql").then(String::new),
                });
            }
            None => {}
            Some(fence) if ticks >= fence.ticks && trimmed[ticks..].trim().is_empty() => {
                if let Some(sql) = fence.sql.take() {
                    blocks.push((fence.start, sql));
                }
                open = None;
            }
            Some(fence) => {
                if let Some(sql) = &mut fence.sql {
                    sql.push_str(line);
                    sql.push('\n');
                }
            }
        }
    }
    blocks
}

/// `GET /api/notebooks`: `{"notebooks": [names]}`.
pub(super) async fn list(State(console): State<Arc<Console>>, headers: HeaderMap) -> Response {
    if let Err(e) = console.reader(&headers) {
        return e.into_response();
    }
    let notebooks = console.notebooks.list();
    json_response(
        StatusCode::OK,
        &serde_json::json!({ "notebooks": notebooks }),
    )
}

/// `GET /api/notebooks/{name}`: `{"name", "version", "text"}`.
pub(super) async fn read(
    State(console): State<Arc<Console>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    let result = console
        .reader(&headers)
        .and_then(|_| console.notebooks.read(&name));
    match result {
        Ok(text) => json_response(
            StatusCode::OK,
            &serde_json::json!({ "name": name, "version": version(&text), "text": text }),
        ),
        Err(e) => e.into_response(),
    }
}

/// `PUT /api/notebooks/{name}` `{"text", "base"?}`: saves, unless the file changed since
/// version `base`. Admins only: it writes the server's files.
pub(super) async fn write(
    State(console): State<Arc<Console>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let result = (|| {
        let session = console.writer(&headers)?;
        if !console.auth.is_admin(session.user.as_deref()) {
            return Err(ApiError::Forbidden(
                "saving a notebook writes the server's files: admins only (GRANT ADMIN)"
                    .to_string(),
            ));
        }
        let body = parse_json(&body)?;
        let text = body["text"]
            .as_str()
            .ok_or_else(|| ApiError::BadRequest("expected {\"text\": \"...\"}".to_string()))?;
        console
            .notebooks
            .write(&name, text, body["base"].as_str())?;
        tracing::info!(notebook = %name, user = ?session.user, "notebook saved");
        Ok(json_response(
            StatusCode::OK,
            &serde_json::json!({ "name": name, "version": version(text), "bytes": text.len() }),
        ))
    })();
    result.unwrap_or_else(IntoResponse::into_response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sql_blocks_are_found_with_their_lines() {
        let text = "# Title\n\nSome text.\n\n```sql\nSELECT 1;\nSELECT 2;\n```\n\n```python\nprint(1)\n```\n\n````SQL\nSELECT '```';\n````\n";
        assert_eq!(
            sql_blocks(text),
            vec![
                (6, "SELECT 1;\nSELECT 2;\n".to_string()),
                (15, "SELECT '```';\n".to_string())
            ]
        );
    }

    #[test]
    fn names_stay_inside_the_directory() {
        let notebooks = Notebooks::new(PathBuf::from("/tmp/notebooks"));
        for bad in [
            "../x.md",
            "/etc/x.md",
            "a/../../x.md",
            ".hidden.md",
            "a/.git/x.md",
            "x.sql",
            "a\\b.md",
        ] {
            assert!(notebooks.path(bad).is_err(), "{bad}");
        }
        assert_eq!(
            notebooks.path("demo/intro.md").expect("a good name"),
            PathBuf::from("/tmp/notebooks/demo/intro.md")
        );
    }
}
