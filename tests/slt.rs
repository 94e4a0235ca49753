//! Runs every `.slt` file under `tests/slt/` against an in-process engine.
//!
//! Errors are reported as `[SQLSTATE] message`, so a test can match the class:
//! `statement error \[42P07\]`. Live tails over a bounded `datagen` stream are deterministic
//! (fixed `seed` and `start_time`) and can be queried like tables.
//!
//! `cargo test -p weir-tests --test slt -- --complete` rewrites the expected results.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::util::display::{ArrayFormatter, FormatOptions};
use async_trait::async_trait;
use sqllogictest::{DBOutput, DefaultColumnType};
use weir_connectors::Connectors;
use weir_server::engine::{Engine, EngineConfig, Output};

struct Weir {
    engine: Arc<Engine>,
}

#[derive(Debug)]
struct SltError(String);

impl std::fmt::Display for SltError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SltError {}

#[async_trait]
impl sqllogictest::AsyncDB for Weir {
    type Error = SltError;
    type ColumnType = DefaultColumnType;

    async fn run(&mut self, sql: &str) -> Result<DBOutput<DefaultColumnType>, SltError> {
        let mut outputs = self.engine.execute(sql).await;
        let last = outputs
            .pop()
            .ok_or_else(|| SltError("no statement".into()))?;
        for earlier in outputs {
            earlier.map_err(|e| SltError(format!("[{}] {e}", e.sqlstate())))?;
        }
        let output = last.map_err(|e| SltError(format!("[{}] {e}", e.sqlstate())))?;
        let (schema, batches) = match output {
            Output::Command(_) => return Ok(DBOutput::StatementComplete(0)),
            Output::Rows { schema, batches } => (schema, batches),
            Output::Tail(mut tail) => {
                let schema = tail.schema.clone();
                let mut batches = Vec::new();
                let mut returned = 0;
                while let Some(batch) = tail.next_batch(&mut returned).await {
                    batches.push(batch);
                }
                (schema, batches)
            }
        };
        let options = FormatOptions::default().with_null("NULL");
        let mut rows = Vec::new();
        for batch in &batches {
            if batch.num_columns() != schema.fields().len() {
                return Err(SltError(format!(
                    "a batch has {} columns but the result declares {}",
                    batch.num_columns(),
                    schema.fields().len()
                )));
            }
            let formatters = batch
                .columns()
                .iter()
                .map(|c| ArrayFormatter::try_new(c.as_ref(), &options))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| SltError(e.to_string()))?;
            for row in 0..batch.num_rows() {
                rows.push(
                    formatters
                        .iter()
                        .map(|f| f.value(row).to_string())
                        .collect(),
                );
            }
        }
        Ok(DBOutput::Rows {
            types: vec![DefaultColumnType::Any; schema.fields().len()],
            rows,
        })
    }

    async fn shutdown(&mut self) {
        self.engine
            .shutdown(std::time::Duration::from_secs(5))
            .await;
    }

    fn engine_name(&self) -> &str {
        "weir"
    }
}

fn slt_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            slt_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "slt") {
            out.push(path);
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let complete = std::env::args().any(|a| a == "--complete");
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("slt");
    let mut files = Vec::new();
    slt_files(&root, &mut files);
    files.sort();
    let (mut passed, mut failed) = (0usize, 0usize);
    for file in files {
        let name = file
            .strip_prefix(&root)
            .unwrap_or(&file)
            .display()
            .to_string();
        if filter.as_ref().is_some_and(|f| !name.contains(f.as_str())) {
            continue;
        }
        // Each file gets a fresh engine; relative paths in files resolve from tests/.
        let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("data");
        let make_db = || async {
            let engine = Engine::open(EngineConfig::default(), Arc::new(Connectors::default()))
                .await
                .expect("engine");
            engine.start_all().await.expect("start");
            Ok::<_, SltError>(Weir { engine })
        };
        let mut runner = sqllogictest::Runner::new(make_db);
        runner.set_var("DATA".to_string(), data.display().to_string());
        let result = if complete {
            let col_separator = " ";
            runner
                .update_test_file(
                    &file,
                    col_separator,
                    sqllogictest::default_validator,
                    sqllogictest::default_normalizer,
                    sqllogictest::default_column_validator,
                )
                .await
                .map_err(|e| e.to_string())
        } else {
            runner
                .run_file_async(&file)
                .await
                .map_err(|e| e.display(true).to_string())
        };
        match result {
            Ok(()) => {
                passed += 1;
                println!("ok     {name}");
            }
            Err(e) => {
                failed += 1;
                println!("FAILED {name}\n{e}");
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
}
