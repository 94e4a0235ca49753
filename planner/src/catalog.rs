//! [`Catalog`]: every object's definition, dependencies and persistence.
//!
//! Objects are persisted as the SQL that created them (`catalog.json` in the data directory,
//! replaced atomically on every change). A restart replays that SQL in creation order through
//! the same path as a client's statement, so a restored object is validated and planned exactly
//! like a new one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use serde::{Deserialize, Serialize};
use weir_runtime::connector::{SinkFactory, SourceFactory};
use weir_runtime::lookup::LookupTable;
use weir_runtime::mv_store::MvStore;
use weir_sql::ObjectKind;

use crate::continuous::ContinuousPlan;
use crate::error::{PlanError, Result};

/// The file, under the data directory, holding the catalog.
pub const CATALOG_FILE: &str = "catalog.json";

/// One catalog object.
#[derive(Debug, Clone)]
pub struct CatalogEntry {
    pub name: String,
    pub kind: ObjectKind,
    /// The CREATE statement as the user wrote it.
    pub sql: String,
    /// Streams and tables: the declared columns. Views: the query's output. Sinks: the rows
    /// they receive.
    pub schema: SchemaRef,
    /// The connector name, for streams, tables and sinks.
    pub connector: Option<String>,
    /// Objects this one reads from (a DROP of those needs CASCADE).
    pub depends_on: Vec<String>,
    /// Streams: builds one source per pipeline.
    pub source: Option<Arc<dyn SourceFactory>>,
    /// Tables: the loaded table lookups read (one for every pipeline).
    pub table: Option<Arc<dyn LookupTable>>,
    /// Sinks: builds the sink.
    pub sink: Option<Arc<dyn SinkFactory>>,
    /// Materialized views, and sinks defined `AS SELECT`: the continuous query.
    pub plan: Option<Arc<ContinuousPlan>>,
    /// Views (not materialized): the query, inlined where the view is read.
    pub query: Option<Arc<sqlparser::ast::Query>>,
    /// The event-time column, when the stream declares a WATERMARK.
    pub watermark_column: Option<String>,
    /// Views: their rows.
    pub store: Option<Arc<MvStore>>,
    /// Materialized views and sinks: `checkpoint.interval` from their WITH, if set.
    pub checkpoint_interval: Option<std::time::Duration>,
}

/// What is written to `catalog.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PersistedObject {
    pub kind: String,
    pub name: String,
    pub sql: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct PersistedCatalog {
    version: u32,
    objects: Vec<PersistedObject>,
}

/// All objects, by name (one namespace for every kind, as in Postgres' pg_class).
#[derive(Debug, Default)]
pub struct Catalog {
    entries: BTreeMap<String, CatalogEntry>,
    /// Names in creation order: the replay order on restart.
    order: Vec<String>,
    /// Where to persist; `None` for an in-memory catalog (tests, `weir check`).
    file: Option<PathBuf>,
    /// Saved objects that failed to restore (say, a file that is missing for now): kept in
    /// `catalog.json`, and their names reserved, so the next start tries them again.
    unrestored: Vec<PersistedObject>,
}

impl Catalog {
    /// An in-memory catalog that persists nothing.
    pub fn in_memory() -> Self {
        Self::default()
    }

    /// A catalog persisted under `data_dir`; returns the objects saved there, to replay.
    ///
    /// The catalog holds the statements as written, literal secrets in `WITH` options
    /// included (a `${ENV}` reference stays a reference), so the file is the owner's only
    /// (0600), as are the directories this creates (0700); a catalog file that others could
    /// read is made private.
    pub fn open(data_dir: &Path) -> Result<(Self, Vec<PersistedObject>)> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(data_dir)
            .map_err(|e| {
                PlanError::Execution(format!(
                    "cannot create data directory '{}': {e}",
                    data_dir.display()
                ))
            })?;
        let file = data_dir.join(CATALOG_FILE);
        if let Ok(meta) = std::fs::metadata(&file)
            && meta.permissions().mode() & 0o077 != 0
        {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).map_err(
                |e| {
                    PlanError::Execution(format!(
                        "cannot make '{}' private (it holds secrets): {e}",
                        file.display()
                    ))
                },
            )?;
        }
        let saved = match std::fs::read(&file) {
            Ok(bytes) => {
                let catalog: PersistedCatalog = serde_json::from_slice(&bytes).map_err(|e| {
                    PlanError::Execution(format!(
                        "catalog file '{}' is damaged: {e}",
                        file.display()
                    ))
                })?;
                catalog.objects
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                return Err(PlanError::Execution(format!(
                    "cannot read '{}': {e}",
                    file.display()
                )));
            }
        };
        Ok((
            Self {
                file: Some(file),
                ..Self::default()
            },
            saved,
        ))
    }

    pub fn get(&self, name: &str) -> Option<&CatalogEntry> {
        self.entries.get(name)
    }

    /// The entry `name`, which must be of `kind`.
    pub fn get_kind(&self, name: &str, kind: ObjectKind) -> Result<&CatalogEntry> {
        match self.entries.get(name) {
            Some(e) if e.kind == kind => Ok(e),
            Some(e) => Err(PlanError::Undefined(format!(
                "\"{name}\" is a {}, not a {kind}",
                e.kind
            ))),
            None => Err(PlanError::undefined(&kind.to_string(), name)),
        }
    }

    /// Checks that `name` is free.
    pub fn check_free(&self, name: &str) -> Result<()> {
        if let Some(existing) = self.entries.get(name) {
            return Err(PlanError::Duplicate {
                kind: existing.kind.to_string(),
                name: name.to_string(),
            });
        }
        if let Some(saved) = self.unrestored.iter().find(|o| o.name == name) {
            return Err(PlanError::Duplicate {
                kind: format!(
                    "{} (saved, not restored at this start; see the log)",
                    saved.kind
                ),
                name: name.to_string(),
            });
        }
        Ok(())
    }

    /// Keeps a saved object that could not be restored now: persisted, name reserved.
    pub fn keep_unrestored(&mut self, object: PersistedObject) {
        self.unrestored.push(object);
    }

    pub fn insert(&mut self, entry: CatalogEntry) -> Result<()> {
        self.check_free(&entry.name)?;
        self.order.push(entry.name.clone());
        self.entries.insert(entry.name.clone(), entry);
        self.persist()
    }

    pub fn remove(&mut self, name: &str) -> Result<Option<CatalogEntry>> {
        let removed = self.entries.remove(name);
        self.order.retain(|n| n != name);
        self.persist()?;
        Ok(removed)
    }

    /// Objects that read from `name`, directly.
    pub fn dependents(&self, name: &str) -> Vec<&CatalogEntry> {
        self.in_order()
            .filter(|e| e.depends_on.iter().any(|d| d == name))
            .collect()
    }

    /// Every object in creation order.
    pub fn in_order(&self) -> impl Iterator<Item = &CatalogEntry> {
        self.order.iter().filter_map(|n| self.entries.get(n))
    }

    pub fn of_kind(&self, kind: ObjectKind) -> impl Iterator<Item = &CatalogEntry> {
        self.in_order().filter(move |e| e.kind == kind)
    }

    fn persist(&self) -> Result<()> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        let catalog = PersistedCatalog {
            version: 1,
            objects: self
                .in_order()
                .map(|e| PersistedObject {
                    kind: e.kind.to_string(),
                    name: e.name.clone(),
                    sql: e.sql.clone(),
                })
                .chain(self.unrestored.iter().cloned())
                .collect(),
        };
        let bytes = serde_json::to_vec_pretty(&catalog)
            .map_err(|e| PlanError::Internal(format!("cannot serialize catalog: {e}")))?;
        write_private(file, &bytes).map_err(|e| {
            PlanError::Execution(format!("cannot write catalog '{}': {e}", file.display()))
        })
    }
}

/// Writes `bytes` to `file` atomically, readable and writable by the owner only.
pub fn write_private(file: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = file.with_extension("json.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    out.write_all(bytes)?;
    out.sync_all()?;
    std::fs::rename(&tmp, file)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path)
            .expect("metadata")
            .permissions()
            .mode()
            & 0o777
    }

    #[test]
    fn the_catalog_file_and_a_new_data_directory_are_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data_dir = dir.path().join("data");
        let (_catalog, saved) = Catalog::open(&data_dir).expect("open");
        assert!(saved.is_empty());
        assert_eq!(mode(&data_dir), 0o700);
        // A catalog an older version wrote readable by all is made private at open.
        let file = data_dir.join(CATALOG_FILE);
        std::fs::write(&file, br#"{"version": 1, "objects": []}"#).expect("write");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        Catalog::open(&data_dir).expect("reopen");
        assert_eq!(mode(&file), 0o600);
        write_private(&file, b"{}").expect("write");
        assert_eq!(mode(&file), 0o600);
    }
}
