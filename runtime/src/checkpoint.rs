//! Checkpoints: what a job saved at one epoch, and the store that keeps the last few.
//!
//! A checkpoint is every participant's [`Snapshot`] (a source's positions, an operator's
//! panes, a sink's pending files) for one epoch, plus each pipeline's plan fingerprint. The
//! [`CheckpointStore`] writes it under `<root>/<job>/<epoch>/`: one `state-<id>.bin` holding
//! the snapshots' batches as Arrow IPC streams, then `_manifest.json`, which names that file
//! and says where each batch is in it. The manifest is written last, only if absent, and
//! alone makes a checkpoint complete, so a checkpoint cut short by a crash is never read
//! (it is deleted at the next recovery). Each write's state file has a name of its own, so a
//! second writer of an epoch (fenced: its manifest is refused) never touches the bytes the
//! first writer's manifest points into.
//! The store is any `object_store`: a local directory, `s3://`, `gs://`, `az://`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use arrow::record_batch::RecordBatch;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::storage::{Location, parse_location};

/// What one participant saved for a checkpoint: small facts as JSON (positions, watermark,
/// counters) and bulk state as Arrow batches (window panes, a view's rows), so that state
/// survives an upgrade of anything but Arrow's stable IPC format.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub meta: serde_json::Value,
    pub batches: Vec<RecordBatch>,
    /// Not saved, set at restore: the participant (a sink) had finished committing this
    /// checkpoint before the restart ([`CheckpointStore::record_commit`]), so what it
    /// publishes at commit is out already.
    pub committed: bool,
}

impl Snapshot {
    pub fn meta(meta: serde_json::Value) -> Self {
        Self::new(meta, Vec::new())
    }

    pub fn new(meta: serde_json::Value, batches: Vec<RecordBatch>) -> Self {
        Self {
            meta,
            batches,
            committed: false,
        }
    }

    /// Approximate bytes in memory.
    pub fn size(&self) -> usize {
        self.batches
            .iter()
            .map(RecordBatch::get_array_memory_size)
            .sum()
    }
}

/// A job's state at one epoch.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Checkpoint {
    pub epoch: u64,
    /// Wall-clock time the checkpoint was started, ms since the Unix epoch.
    pub started_ms: i64,
    /// Per pipeline of the job, a fingerprint of its plan: state saved under another plan is
    /// not restored.
    pub fingerprints: BTreeMap<String, String>,
    /// Per participant id (`<pipeline>/source`, `<pipeline>/op<i>`, `<pipeline>/sink`).
    pub snapshots: BTreeMap<String, Snapshot>,
}

/// How one write went, for `SHOW QUERIES` and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteStats {
    pub bytes: u64,
    pub duration: Duration,
}

#[derive(Serialize, Deserialize)]
struct Manifest {
    version: u32,
    epoch: u64,
    started_ms: i64,
    fingerprints: BTreeMap<String, String>,
    snapshots: BTreeMap<String, ManifestEntry>,
    /// The epoch's state file, if it has batches. Absent in manifests written before state
    /// files had names of their own: those are `state.bin`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    state: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct ManifestEntry {
    meta: serde_json::Value,
    /// Byte ranges `[start, end)` in the epoch's state file, one IPC stream per batch.
    batches: Vec<(u64, u64)>,
}

const MANIFEST: &str = "_manifest.json";
/// Under a job: one object per sink, the last epoch it finished committing.
const COMMITS: &str = "_commits";
/// The state file of manifests that do not name theirs.
const STATE_UNNAMED: &str = "state.bin";
const FORMAT_VERSION: u32 = 1;

/// Where a sink records the epochs it has finished committing: its job's store.
#[derive(Debug, Clone)]
pub struct CommitLog {
    pub store: CheckpointStore,
    pub job: String,
}

/// Where checkpoints are kept, and how many.
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    store: Arc<dyn ObjectStore>,
    root: Path,
    retain: usize,
    location: String,
    /// For a local directory: where it is, to remove an emptied epoch's directory (an
    /// object store has no directories to leave behind).
    local: Option<std::path::PathBuf>,
    /// Per job, the complete epochs this process knows are in the store (oldest first), so
    /// that keeping the newest `retain` deletes one known epoch per write instead of
    /// listing the job's directory and reading every epoch's manifest each time. Filled by
    /// one listing at a job's first write after it starts (or restores); a job restored
    /// here lists again, since another process may have written it meanwhile.
    written:
        Arc<std::sync::Mutex<std::collections::HashMap<String, std::collections::VecDeque<Known>>>>,
}

/// A complete epoch retention will delete when it falls out.
#[derive(Debug, Clone)]
enum Known {
    /// Written by this process: its files are known by name.
    Written { epoch: u64, state: Option<String> },
    /// Found by listing: its files are listed when it is deleted.
    Listed(u64),
}

impl CheckpointStore {
    /// A store at `location`: a local directory (created if missing), `file:///dir`, or an
    /// object store URL. Credentials and endpoints for object stores come from the usual
    /// environment variables (`AWS_ACCESS_KEY_ID`, `AWS_ENDPOINT`, `AWS_ALLOW_HTTP`,
    /// `GOOGLE_SERVICE_ACCOUNT`, `AZURE_STORAGE_ACCOUNT_NAME`, ...).
    pub fn open(location: &str, retain: usize) -> Result<Self> {
        let (store, root) = match parse_location(location)
            .map_err(|e| Error::Execution(format!("checkpoint store {location:?}: {e}")))?
        {
            Location::Local(dir) => return Self::local(&dir, retain),
            Location::Remote { store, root } => (store as Arc<dyn ObjectStore>, root),
        };
        Ok(Self {
            store,
            root,
            retain: retain.max(1),
            location: location.to_string(),
            local: None,
            written: Arc::default(),
        })
    }

    /// A store in a local directory, created if missing.
    pub fn local(dir: &std::path::Path, retain: usize) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir.display().to_string(), e))?;
        let store = object_store::local::LocalFileSystem::new_with_prefix(dir)
            .map_err(|e| Error::Execution(format!("checkpoint store {}: {e}", dir.display())))?;
        Ok(Self {
            store: Arc::new(store),
            root: Path::default(),
            retain: retain.max(1),
            location: dir.display().to_string(),
            local: Some(dir.to_path_buf()),
            written: Arc::default(),
        })
    }

    /// Where the store is, for messages.
    pub fn location(&self) -> &str {
        &self.location
    }

    /// A job's directory: `v`, or `v/p3` for an instance of `v` on a cluster (nested, so
    /// that deleting `v` finds its instances).
    fn job_dir(&self, job: &str) -> Path {
        job.split('/')
            .filter(|s| !s.is_empty())
            .fold(self.root.clone(), |dir, segment| dir.join(segment))
    }

    fn epoch_dir(&self, job: &str, epoch: u64) -> Path {
        // Zero-padded, so that names sort as numbers.
        self.job_dir(job).join(format!("{epoch:020}"))
    }

    /// Writes `checkpoint` for `job`; once this returns, [`CheckpointStore::latest`] finds
    /// it. Then deletes checkpoints beyond the last `retain` complete ones. An error if the
    /// epoch is complete already (see [`CheckpointStore::write_new`]).
    pub async fn write(&self, job: &str, checkpoint: &Checkpoint) -> Result<WriteStats> {
        self.write_new(job, checkpoint).await?.ok_or_else(|| {
            Error::Execution(format!(
                "checkpoint {} of {job} was written by another process",
                checkpoint.epoch
            ))
        })
    }

    /// As [`CheckpointStore::write`], but `None` when the epoch is complete already: another
    /// process wrote it (a cluster's partition whose ownership moved while this process
    /// still ran it). The manifest is created only if absent, so an epoch is committed
    /// once: the process that loses must stop and restore what the winner committed. A
    /// store that cannot create conditionally (S3 with conditional puts disabled) writes
    /// unconditionally.
    pub async fn write_new(
        &self,
        job: &str,
        checkpoint: &Checkpoint,
    ) -> Result<Option<WriteStats>> {
        let started = Instant::now();
        let dir = self.epoch_dir(job, checkpoint.epoch);
        let mut state = Vec::new();
        let mut snapshots = BTreeMap::new();
        for (id, snapshot) in &checkpoint.snapshots {
            let mut ranges = Vec::with_capacity(snapshot.batches.len());
            for batch in &snapshot.batches {
                let start = state.len() as u64;
                let mut writer = StreamWriter::try_new(&mut state, &batch.schema())?;
                writer.write(batch)?;
                writer.finish()?;
                drop(writer);
                ranges.push((start, state.len() as u64));
            }
            snapshots.insert(
                id.clone(),
                ManifestEntry {
                    meta: snapshot.meta.clone(),
                    batches: ranges,
                },
            );
        }
        // No batches (a source's offsets, a writer's epoch): the manifest says it all.
        // Otherwise a file of this write's own: a fenced writer of the same epoch writes
        // another, and the manifest that wins names the winner's.
        let state_name =
            (!state.is_empty()).then(|| format!("state-{:016x}.bin", rand::random::<u64>()));
        let manifest = Manifest {
            version: FORMAT_VERSION,
            epoch: checkpoint.epoch,
            started_ms: checkpoint.started_ms,
            fingerprints: checkpoint.fingerprints.clone(),
            snapshots,
            state: state_name.clone(),
        };
        let manifest = serde_json::to_vec(&manifest)
            .map_err(|e| Error::Internal(format!("cannot encode a checkpoint manifest: {e}")))?;
        let bytes = (state.len() + manifest.len()) as u64;
        if let Some(name) = &state_name {
            self.put(&dir.clone().join(name.as_str()), state).await?;
        }
        match self.create(&dir.clone().join(MANIFEST), manifest).await {
            Ok(true) => {}
            Ok(false) => {
                // Fenced: the epoch is another writer's. Its files stay; this one's go.
                self.abandon(job, checkpoint.epoch, state_name.as_deref())
                    .await;
                return Ok(None);
            }
            Err(e) => {
                self.abandon(job, checkpoint.epoch, state_name.as_deref())
                    .await;
                return Err(e);
            }
        }
        self.retain(job, checkpoint.epoch, state_name).await?;
        Ok(Some(WriteStats {
            bytes,
            duration: started.elapsed(),
        }))
    }

    /// Deletes what a write that did not complete left (its state file, and its epoch's
    /// directory if nothing else is in it), so that retention, which only knows complete
    /// epochs, leaves nothing behind. On failure the next restore of the job deletes it.
    async fn abandon(&self, job: &str, epoch: u64, state: Option<&str>) {
        let dir = self.epoch_dir(job, epoch);
        let state = match state {
            Some(name) => self.delete(&dir.join(name)).await,
            None => Ok(()),
        };
        if let Err(e) = state {
            tracing::warn!(job, epoch, store = %self.location, error = %e,
                "cannot delete the state of a checkpoint that did not complete; the job's next restore will");
        }
        if let Some(root) = &self.local {
            // Not empty when another writer completed the epoch: left alone.
            let _ = std::fs::remove_dir(root.join(job).join(format!("{epoch:020}")));
        }
    }

    /// Writes `path` unless it exists; `false` if it did.
    /// The contents of `name` (a path under the store's root, e.g. `.cluster/c/secret`),
    /// created with `initial` if absent: of several processes asking at once, the first
    /// decides it for all (on a store that can create conditionally).
    pub async fn shared_file(&self, name: &str, initial: Vec<u8>) -> Result<bytes::Bytes> {
        let path = self.job_dir(name);
        self.create(&path, initial).await?;
        self.get(&path).await
    }

    async fn create(&self, path: &Path, bytes: Vec<u8>) -> Result<bool> {
        let options = object_store::PutOptions::from(object_store::PutMode::Create);
        match self
            .store
            .put_opts(path, PutPayload::from(bytes.clone()), options)
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(object_store::Error::NotImplemented { .. }) => {
                self.put(path, bytes).await.map(|()| true)
            }
            Err(e) => Err(self.error("write", path, e)),
        }
    }

    async fn put(&self, path: &Path, bytes: Vec<u8>) -> Result<()> {
        self.store
            .put(path, PutPayload::from(bytes))
            .await
            .map(|_| ())
            .map_err(|e| self.error("write", path, e))
    }

    /// Every object under `dir`.
    async fn list(&self, dir: &Path) -> Result<Vec<object_store::ObjectMeta>> {
        self.store
            .list(Some(dir))
            .try_collect()
            .await
            .map_err(|e| self.error("list", dir, e))
    }

    /// The directories right under `dir`.
    async fn subdirectories(&self, dir: &Path) -> Result<Vec<Path>> {
        let listing = self
            .store
            .list_with_delimiter(Some(dir))
            .await
            .map_err(|e| self.error("list", dir, e))?;
        Ok(listing.common_prefixes)
    }

    /// Deletes `path`; gone already is fine.
    async fn delete(&self, path: &Path) -> Result<()> {
        match self.store.delete(path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error("delete", path, e)),
        }
    }

    fn error(&self, what: &str, path: &Path, e: object_store::Error) -> Error {
        let message = format!(
            "checkpoint store {}: cannot {what} {path}: {e}",
            self.location
        );
        crate::storage::store_error(e, message)
    }

    /// The epochs of `job` with a directory in the store, newest first, and whether each
    /// is complete.
    async fn epochs(&self, job: &str) -> Result<Vec<(u64, bool)>> {
        let mut epochs = Vec::new();
        for prefix in self.subdirectories(&self.job_dir(job)).await? {
            let Some(epoch) = prefix.filename().and_then(|n| n.parse::<u64>().ok()) else {
                continue;
            };
            let complete = match self.store.head(&prefix.clone().join(MANIFEST)).await {
                Ok(_) => true,
                Err(object_store::Error::NotFound { .. }) => false,
                Err(e) => return Err(self.error("read", &prefix, e)),
            };
            epochs.push((epoch, complete));
        }
        epochs.sort_unstable_by_key(|e| std::cmp::Reverse(e.0));
        Ok(epochs)
    }

    /// The newest complete checkpoint of `job`, if any. Checkpoints newer than it were cut
    /// short and are deleted.
    pub async fn latest(&self, job: &str) -> Result<Option<Checkpoint>> {
        // The job starts here again: what another process wrote meanwhile is not known.
        self.forget(job);
        for (epoch, complete) in self.epochs(job).await? {
            if complete {
                return self.read(job, epoch).await.map(Some);
            }
            tracing::info!(job, epoch, store = %self.location,
                "deleting a checkpoint that was not completed");
            self.delete_epoch(job, epoch).await?;
        }
        Ok(None)
    }

    /// The fingerprints `job`'s checkpoint `epoch` was taken with (its manifest only).
    pub async fn fingerprints(&self, job: &str, epoch: u64) -> Result<BTreeMap<String, String>> {
        let path = self.epoch_dir(job, epoch).join(MANIFEST);
        let manifest: Manifest = serde_json::from_slice(&self.get(&path).await?)
            .map_err(|e| Error::Execution(format!("checkpoint {path} is unreadable: {e}")))?;
        Ok(manifest.fingerprints)
    }

    async fn read(&self, job: &str, epoch: u64) -> Result<Checkpoint> {
        let dir = self.epoch_dir(job, epoch);
        let manifest_path = dir.clone().join(MANIFEST);
        let manifest = self.get(&manifest_path).await?;
        let manifest: Manifest = serde_json::from_slice(&manifest).map_err(|e| {
            Error::Execution(format!("checkpoint {manifest_path} is unreadable: {e}"))
        })?;
        if manifest.version != FORMAT_VERSION {
            return Err(Error::Execution(format!(
                "checkpoint {manifest_path} has format version {}; this Weir reads {FORMAT_VERSION}",
                manifest.version
            )));
        }
        let needs_state = manifest.snapshots.values().any(|s| !s.batches.is_empty());
        let state = if needs_state {
            let name = manifest.state.as_deref().unwrap_or(STATE_UNNAMED);
            self.get(&dir.join(name)).await?
        } else {
            bytes::Bytes::new()
        };
        let commits = self.commits(job).await?;
        let mut snapshots = BTreeMap::new();
        for (id, entry) in manifest.snapshots {
            let mut batches = Vec::with_capacity(entry.batches.len());
            for (start, end) in entry.batches {
                let bytes = usize::try_from(start)
                    .ok()
                    .zip(usize::try_from(end).ok())
                    .and_then(|(s, e)| state.get(s..e))
                    .ok_or_else(|| {
                        Error::Execution(format!(
                            "checkpoint {manifest_path}: state of {id} is truncated"
                        ))
                    })?;
                for batch in StreamReader::try_new(std::io::Cursor::new(bytes), None)? {
                    batches.push(batch?);
                }
            }
            let mut snapshot = Snapshot::new(entry.meta, batches);
            snapshot.committed = commits
                .get(&commit_name(&id).to_string())
                .is_some_and(|&e| e >= manifest.epoch);
            snapshots.insert(id, snapshot);
        }
        Ok(Checkpoint {
            epoch: manifest.epoch,
            started_ms: manifest.started_ms,
            fingerprints: manifest.fingerprints,
            snapshots,
        })
    }

    async fn get(&self, path: &Path) -> Result<bytes::Bytes> {
        let result = self
            .store
            .get(path)
            .await
            .map_err(|e| self.error("read", path, e))?;
        result
            .bytes()
            .await
            .map_err(|e| self.error("read", path, e))
    }

    /// After `written` was committed: keeps the newest `retain` complete checkpoints and
    /// anything newer (one being written), and deletes the rest. The first time for a job
    /// (since it started here) this lists the job's epochs; after that it deletes the one
    /// epoch that fell out, known from memory.
    async fn retain(&self, job: &str, written: u64, state: Option<String>) -> Result<()> {
        let due = {
            let mut known = self.written.lock().unwrap_or_else(|e| e.into_inner());
            known.get_mut(job).map(|epochs| {
                epochs.push_back(Known::Written {
                    epoch: written,
                    state,
                });
                let over = epochs.len().saturating_sub(self.retain);
                epochs.drain(..over).collect::<Vec<_>>()
            })
        };
        if let Some(due) = due {
            for known in due {
                match known {
                    Known::Written { epoch, state } => {
                        self.delete_known_epoch(job, epoch, state.as_deref())
                            .await?
                    }
                    Known::Listed(epoch) => self.delete_epoch(job, epoch).await?,
                }
            }
            return Ok(());
        }
        let mut kept = std::collections::VecDeque::new();
        for (epoch, is_complete) in self.epochs(job).await? {
            if kept.len() >= self.retain {
                self.delete_epoch(job, epoch).await?;
            } else if is_complete {
                kept.push_front(Known::Listed(epoch));
            }
        }
        self.written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(job.to_string(), kept);
        Ok(())
    }

    /// Forgets what [`CheckpointStore::retain`] knew of `job`'s epochs.
    fn forget(&self, job: &str) {
        self.written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(job);
    }

    async fn delete_epoch(&self, job: &str, epoch: u64) -> Result<()> {
        let dir = self.epoch_dir(job, epoch);
        let objects = self.list(&dir).await?;
        // The manifest first: a checkpoint half deleted is an incomplete one, never a
        // complete one with state missing.
        let (manifest, rest): (Vec<_>, Vec<_>) = objects
            .into_iter()
            .partition(|o| o.location.filename() == Some(MANIFEST));
        for object in manifest.into_iter().chain(rest) {
            self.delete(&object.location).await?;
        }
        self.remove_epoch_dir(job, epoch)
    }

    /// Deletes a complete epoch this store wrote: its objects by name, no listing.
    async fn delete_known_epoch(&self, job: &str, epoch: u64, state: Option<&str>) -> Result<()> {
        let dir = self.epoch_dir(job, epoch);
        // The manifest first, as in `delete_epoch`.
        self.delete(&dir.clone().join(MANIFEST)).await?;
        if let Some(name) = state {
            self.delete(&dir.join(name)).await?;
        }
        self.remove_epoch_dir(job, epoch)
    }

    fn remove_epoch_dir(&self, job: &str, epoch: u64) -> Result<()> {
        if let Some(root) = &self.local {
            let dir = root.join(job).join(format!("{epoch:020}"));
            match std::fs::remove_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(dir.display().to_string(), e)),
            }
        }
        Ok(())
    }

    /// Records that `participant` of `job` (a sink, `<pipeline>/sink`) finished committing
    /// `epoch`: a restore from that checkpoint tells it so ([`Snapshot::committed`]), and a
    /// sink whose commit sends to a receiver that refuses repeats (Prometheus) does not send
    /// the checkpoint's rows again.
    pub async fn record_commit(&self, job: &str, participant: &str, epoch: u64) -> Result<()> {
        let dir = self.job_dir(job).join(COMMITS);
        let path = Path::from_iter(dir.parts().chain(commit_name(participant).parts()));
        self.put(&path, epoch.to_string().into_bytes()).await
    }

    /// The last epoch each participant of `job` recorded as committed, by [`commit_name`].
    async fn commits(&self, job: &str) -> Result<BTreeMap<String, u64>> {
        let dir = self.job_dir(job).join(COMMITS);
        let objects = self.list(&dir).await?;
        let mut commits = BTreeMap::new();
        for object in objects {
            let Some(parts) = object.location.prefix_match(&dir) else {
                continue;
            };
            let participant = Path::from_iter(parts).to_string();
            let text = self.get(&object.location).await?;
            if let Some(epoch) = std::str::from_utf8(&text)
                .ok()
                .and_then(|t| t.trim().parse().ok())
            {
                commits.insert(participant, epoch);
            }
        }
        Ok(commits)
    }

    /// Deletes every checkpoint of `job` (its pipelines were dropped).
    pub async fn delete_job(&self, job: &str) -> Result<()> {
        self.forget(job);
        // A cluster's instances of the job first (`<job>/p3`, `<job>/r0`).
        for prefix in self.subdirectories(&self.job_dir(job)).await? {
            let Some(name) = prefix.filename() else {
                continue;
            };
            if name != COMMITS && name.parse::<u64>().is_err() {
                Box::pin(self.delete_job(&format!("{job}/{name}"))).await?;
            }
        }
        for (epoch, _) in self.epochs(job).await? {
            self.delete_epoch(job, epoch).await?;
        }
        let dir = self.job_dir(job).join(COMMITS);
        for record in self.list(&dir).await? {
            self.delete(&record.location).await?;
        }
        if let Some(root) = &self.local {
            // The records' directories, empty now.
            let dir = root.join(job).join(COMMITS);
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(dir.display().to_string(), e)),
            }
        }
        // An object store has no directories; a local one keeps the job's, empty, otherwise.
        if let Some(root) = &self.local {
            let dir = root.join(job);
            match std::fs::remove_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(dir.display().to_string(), e)),
            }
        }
        Ok(())
    }
}

/// Where under `<job>/_commits/` the commit record of `participant` is: its id's segments
/// (`<pipeline>/sink`).
fn commit_name(participant: &str) -> Path {
    Path::from(participant)
}

/// `snapshot` after a trip through the store's encoding (IPC and JSON), as a restore
/// would see it.
#[cfg(test)]
pub(crate) fn round_trip(snapshot: &Snapshot) -> Snapshot {
    let meta = serde_json::to_string(&snapshot.meta).expect("json");
    let batches = snapshot
        .batches
        .iter()
        .map(|batch| {
            let mut bytes = Vec::new();
            let mut writer = StreamWriter::try_new(&mut bytes, &batch.schema()).expect("ipc");
            writer.write(batch).expect("write");
            writer.finish().expect("finish");
            drop(writer);
            let mut reader =
                StreamReader::try_new(std::io::Cursor::new(bytes), None).expect("read");
            reader.next().expect("one batch").expect("batch")
        })
        .collect();
    Snapshot::new(serde_json::from_str(&meta).expect("json"), batches)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};

    fn batch(values: &[i64]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("n", DataType::Int64, false),
            Field::new("s", DataType::Utf8, true),
        ]));
        let names: Vec<Option<String>> = values.iter().map(|v| Some(v.to_string())).collect();
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from(values.to_vec())),
                Arc::new(StringArray::from(names)),
            ],
        )
        .expect("batch")
    }

    fn checkpoint(epoch: u64) -> Checkpoint {
        let mut snapshots = BTreeMap::new();
        snapshots.insert(
            "p/source".to_string(),
            Snapshot::meta(serde_json::json!({"offsets": {"0": epoch * 10}})),
        );
        snapshots.insert(
            "p/op2".to_string(),
            Snapshot::new(
                serde_json::json!({"watermark": 1000}),
                vec![batch(&[1, 2, 3]), batch(&[epoch as i64])],
            ),
        );
        Checkpoint {
            epoch,
            started_ms: 1_700_000_000_000,
            fingerprints: BTreeMap::from([("p".to_string(), "abc".to_string())]),
            snapshots,
        }
    }

    #[tokio::test]
    async fn a_written_checkpoint_reads_back_equal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = CheckpointStore::local(dir.path(), 3).expect("store");
        assert_eq!(store.latest("job").await.expect("latest"), None);
        let written = checkpoint(4);
        let stats = store.write("job", &written).await.expect("write");
        assert!(stats.bytes > 0);
        assert_eq!(store.latest("job").await.expect("latest"), Some(written));
    }

    #[tokio::test]
    async fn only_the_last_complete_checkpoints_are_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = CheckpointStore::local(dir.path(), 2).expect("store");
        for epoch in 1..=5 {
            store.write("job", &checkpoint(epoch)).await.expect("write");
        }
        let epochs = store.epochs("job").await.expect("epochs");
        assert_eq!(epochs, vec![(5, true), (4, true)]);
        // Jobs are independent.
        store.write("other", &checkpoint(1)).await.expect("write");
        assert_eq!(store.epochs("job").await.expect("epochs").len(), 2);
        store.delete_job("job").await.expect("delete");
        assert_eq!(store.latest("job").await.expect("latest"), None);
        assert_eq!(
            store
                .latest("other")
                .await
                .expect("latest")
                .map(|c| c.epoch),
            Some(1)
        );
    }

    /// Retention deletes by memory after a job's first write here, and lists again when
    /// the job is restored here: a job another process ran meanwhile (a cluster's
    /// partition that moved away and back) keeps only its newest epochs, whoever wrote
    /// them, and no epoch directory is left behind. A checkpoint without batches writes
    /// no state file, and reads back the same.
    #[tokio::test]
    async fn retention_follows_a_job_that_moved_between_processes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let here = CheckpointStore::local(dir.path(), 2).expect("store");
        let there = CheckpointStore::local(dir.path(), 2).expect("store");
        let files = |epoch: u64| -> Vec<String> {
            let mut names: Vec<String> =
                std::fs::read_dir(dir.path().join(format!("job/{epoch:020}")))
                    .map(|d| {
                        d.map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
                            .collect()
                    })
                    .unwrap_or_default();
            names.sort();
            names
        };
        let offsets = |epoch: u64| Checkpoint {
            snapshots: BTreeMap::from([(
                "p/source".to_string(),
                Snapshot::meta(serde_json::json!({"offsets": {"0": epoch}})),
            )]),
            ..checkpoint(epoch)
        };
        for epoch in 1..=3 {
            here.write("job", &offsets(epoch)).await.expect("write");
        }
        assert_eq!(
            files(3),
            vec![MANIFEST.to_string()],
            "no state file without batches"
        );
        assert_eq!(here.latest("job").await.expect("latest"), Some(offsets(3)));
        // The job moves: the other process restores it and writes on, with batches.
        assert_eq!(
            there.latest("job").await.expect("latest").map(|c| c.epoch),
            Some(3)
        );
        for epoch in 4..=6 {
            there.write("job", &checkpoint(epoch)).await.expect("write");
        }
        let six = files(6);
        assert!(
            six.len() == 2 && six[0] == MANIFEST && six[1].starts_with("state-"),
            "{six:?}"
        );
        // And back: this process knew epochs 2 and 3 only.
        assert_eq!(
            here.latest("job").await.expect("latest").map(|c| c.epoch),
            Some(6)
        );
        here.write("job", &offsets(7)).await.expect("write");
        here.write("job", &offsets(8)).await.expect("write");
        let mut left: Vec<String> = std::fs::read_dir(dir.path().join("job"))
            .expect("job dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, vec![format!("{:020}", 7), format!("{:020}", 8)]);
    }

    /// An epoch is committed once: a second writer of it (a process that still ran a
    /// partition another one owns now) is told so, and the first checkpoint stands whole:
    /// the second's state, written before it was refused, went to a file of its own and is
    /// gone, never over the bytes the first's manifest points into.
    #[tokio::test]
    async fn a_second_writer_of_an_epoch_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let winner = CheckpointStore::local(dir.path(), 3).expect("store");
        let loser = CheckpointStore::local(dir.path(), 3).expect("store");
        let mut first = checkpoint(5);
        first.started_ms = 1;
        let mut second = checkpoint(5);
        second.started_ms = 2;
        second.snapshots.insert(
            "p/op2".to_string(),
            Snapshot::new(
                serde_json::json!({"watermark": 2000}),
                vec![batch(&[9; 100]), batch(&[8, 7])],
            ),
        );
        assert!(
            winner
                .write_new("v/r0", &first)
                .await
                .expect("write")
                .is_some()
        );
        assert!(
            loser
                .write_new("v/r0", &second)
                .await
                .expect("write")
                .is_none()
        );
        let latest = winner.latest("v/r0").await.expect("latest");
        assert_eq!(latest, Some(first), "the first writer's checkpoint stands");
        let epoch = dir.path().join(format!("v/r0/{:020}", 5));
        assert_eq!(
            std::fs::read_dir(epoch).expect("epoch").count(),
            2,
            "the winner's manifest and state, nothing of the loser's"
        );
        assert!(loser.write("v/r0", &second).await.is_err());
    }

    /// Manifests written before state files had names of their own read `state.bin`.
    #[tokio::test]
    async fn a_checkpoint_with_an_unnamed_state_file_reads_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = CheckpointStore::local(dir.path(), 3).expect("store");
        let written = checkpoint(1);
        store.write("job", &written).await.expect("write");
        let epoch = dir.path().join(format!("job/{:020}", 1));
        let state = std::fs::read_dir(&epoch)
            .expect("epoch")
            .map(|e| e.expect("entry").path())
            .find(|p| p.file_name() != Some(MANIFEST.as_ref()))
            .expect("a state file");
        std::fs::rename(&state, epoch.join(STATE_UNNAMED)).expect("rename");
        let manifest = epoch.join(MANIFEST);
        let mut json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&manifest).expect("read")).expect("json");
        json.as_object_mut().expect("object").remove("state");
        std::fs::write(&manifest, serde_json::to_vec(&json).expect("json")).expect("write");
        assert_eq!(store.latest("job").await.expect("latest"), Some(written));
    }

    /// A write whose manifest cannot be created leaves nothing behind, though retention
    /// (which knows complete epochs only) would never see it.
    #[tokio::test]
    async fn a_write_that_fails_leaves_no_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = CheckpointStore::local(dir.path(), 3).expect("store");
        store.write("job", &checkpoint(1)).await.expect("write");
        // Epoch 2's manifest cannot be created: a directory is in its way.
        let epoch2 = dir.path().join(format!("job/{:020}", 2));
        std::fs::create_dir_all(epoch2.join(MANIFEST).join("x")).expect("mkdir");
        assert!(store.write("job", &checkpoint(2)).await.is_err());
        let left: Vec<_> = std::fs::read_dir(&epoch2)
            .expect("epoch")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(
            left,
            vec![std::ffi::OsString::from(MANIFEST)],
            "no state file"
        );
    }

    /// A cluster's instances (`v/p0`, `v/r1`) keep checkpoints of their own, nested under
    /// their pipeline's, apart from the pipeline's own; deleting the pipeline deletes them.
    #[tokio::test]
    async fn instances_checkpoint_under_their_pipeline_and_go_with_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = CheckpointStore::local(dir.path(), 2).expect("store");
        for epoch in 1..=3 {
            store
                .write("v/p0", &checkpoint(epoch))
                .await
                .expect("write");
        }
        store.write("v/r1", &checkpoint(7)).await.expect("write");
        store
            .record_commit("v/r1", "v/r1/sink", 7)
            .await
            .expect("record");
        store.write("v", &checkpoint(1)).await.expect("write");
        let epoch = |job: &'static str| {
            let store = store.clone();
            async move { store.latest(job).await.expect("latest").map(|c| c.epoch) }
        };
        assert_eq!(epoch("v/p0").await, Some(3));
        assert_eq!(epoch("v/r1").await, Some(7));
        assert_eq!(
            epoch("v").await,
            Some(1),
            "instances are not the pipeline's epochs"
        );
        assert!(
            dir.path().join("v/p0").is_dir(),
            "nested under the pipeline"
        );
        assert_eq!(
            std::fs::read_dir(dir.path().join("v/p0"))
                .expect("dir")
                .count(),
            2,
            "retention removes old epochs' directories"
        );
        store.delete_job("v").await.expect("delete");
        assert!(
            !dir.path().join("v").exists(),
            "nothing left of the pipeline"
        );
    }

    /// A sink's commit record says whether the checkpoint restored was committed by it
    /// before the restart; DROP deletes the records with the checkpoints.
    #[tokio::test]
    async fn a_restore_knows_which_sinks_finished_committing_the_checkpoint() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = CheckpointStore::local(dir.path(), 3).expect("store");
        let mut written = checkpoint(4);
        for sink in ["p/sink", "q/sink"] {
            written
                .snapshots
                .insert(sink.to_string(), Snapshot::meta(serde_json::json!(null)));
        }
        store.write("job", &written).await.expect("write");
        let committed = |c: &Checkpoint, id: &str| c.snapshots[id].committed;
        let latest = store.latest("job").await.expect("latest").expect("one");
        assert!(!committed(&latest, "p/sink") && !committed(&latest, "q/sink"));
        store
            .record_commit("job", "p/sink", 4)
            .await
            .expect("record");
        store
            .record_commit("job", "q/sink", 3)
            .await
            .expect("record");
        let latest = store.latest("job").await.expect("latest").expect("one");
        assert!(committed(&latest, "p/sink"), "p committed epoch 4");
        assert!(!committed(&latest, "q/sink"), "q only got to epoch 3");
        assert!(!committed(&latest, "p/source"));
        store.delete_job("job").await.expect("delete");
        assert!(!dir.path().join("job").exists(), "nothing left of the job");
    }

    #[tokio::test]
    async fn a_checkpoint_cut_short_is_never_read_and_is_cleaned_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = CheckpointStore::local(dir.path(), 3).expect("store");
        store.write("job", &checkpoint(1)).await.expect("write");
        // A crash between the state and the manifest of epoch 2.
        let epoch2 = dir.path().join("job").join(format!("{:020}", 2));
        std::fs::create_dir_all(&epoch2).expect("mkdir");
        std::fs::write(epoch2.join("state-0.bin"), b"half").expect("write");
        let latest = store.latest("job").await.expect("latest");
        assert_eq!(latest.map(|c| c.epoch), Some(1));
        assert!(!epoch2.exists(), "the torn checkpoint is deleted");
    }

    #[tokio::test]
    async fn a_corrupt_state_file_is_an_error_not_a_silent_empty_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = CheckpointStore::local(dir.path(), 3).expect("store");
        store.write("job", &checkpoint(1)).await.expect("write");
        let epoch = dir.path().join("job").join(format!("{:020}", 1));
        let state = std::fs::read_dir(&epoch)
            .expect("epoch")
            .map(|e| e.expect("entry").path())
            .find(|p| p.file_name() != Some(MANIFEST.as_ref()))
            .expect("a state file");
        std::fs::write(&state, b"short").expect("truncate");
        let err = store.latest("job").await.expect_err("corrupt");
        assert!(err.to_string().contains("truncated"), "{err}");
    }

    #[test]
    fn unknown_schemes_are_refused() {
        let err = CheckpointStore::open("ftp://host/x", 3).expect_err("ftp");
        assert!(err.to_string().contains("unsupported scheme"), "{err}");
    }
}
