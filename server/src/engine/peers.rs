//! Peers on a cluster: how a process finds the others, and how a `SELECT` on a materialized
//! view gathers the view's rows from every process.
//!
//! - **Finding peers:** each process appends `{"http": "<address>"}` under its member id
//!   (random per start) to the topic `weir-<cluster>-members` (one partition, kept forever)
//!   in the Kafka its views read. A reader takes the latest record per member. A process
//!   that stopped or was killed leaves its record behind: asking it fails to connect and is
//!   skipped, which is safe because of the next point.
//! - **Whole answers or none:** a view's rows live in parts, one per instance feeding it
//!   (`r0` .. `r<n-1>`), each in the process running that instance. The gatherer knows
//!   every part's name; it answers only when each came back exactly once, and otherwise
//!   asks again (an instance moving between processes is missing for a moment), then fails
//!   with an error to retry. A `SELECT` never returns a partial view silently.
//! - **Who may ask:** the rows are served on the HTTP port (`GET /cluster/views/<view>`)
//!   only to a caller presenting the cluster's secret, a random token the first process
//!   creates in the checkpoint store (which holds every view's rows already, so the secret
//!   grants nothing the store does not).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use arrow::datatypes::SchemaRef;
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use weir_runtime::connector::PartitionedSource;
use weir_runtime::error::External;
use weir_runtime::mv_store::{Gather, MvStore};
use weir_runtime::{CheckpointStore, Error, Result};

/// The response header naming the parts a process returned.
pub const PARTS_HEADER: &str = "x-weir-parts";
/// How many times a gather asks before giving up on a view whose parts are moving.
const ATTEMPTS: u32 = 5;
/// How long one peer may take to answer.
const PEER_TIMEOUT: Duration = Duration::from_secs(10);

/// This process's place in the cluster: its id, where peers reach it, and the secret.
#[derive(Debug)]
pub struct Peers {
    cluster: String,
    member: String,
    /// Where peers reach this process's HTTP port; `None` in `weir run` (no HTTP server:
    /// its views cannot be gathered).
    advertise: Option<String>,
    store: CheckpointStore,
    secret: tokio::sync::OnceCell<String>,
    client: reqwest::Client,
}

/// A member's record in the directory topic.
#[derive(Debug, Serialize, Deserialize)]
struct MemberRecord {
    http: Option<String>,
}

impl Peers {
    pub fn new(cluster: &str, advertise: Option<String>, store: CheckpointStore) -> Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(PEER_TIMEOUT)
            .connect_timeout(Duration::from_secs(2))
            .build()
            .map_err(|e| Error::Internal(format!("cannot build an HTTP client: {e}")))?;
        Ok(Self {
            cluster: cluster.to_string(),
            member: random_hex(8)?,
            advertise,
            store,
            secret: tokio::sync::OnceCell::new(),
            client,
        })
    }

    /// The cluster's secret, created in the checkpoint store by the first process to ask.
    async fn secret(&self) -> Result<&str> {
        self.secret
            .get_or_try_init(|| async {
                let fresh = random_hex(32)?;
                let name = format!(".cluster/{}/secret", self.cluster);
                let bytes = self.store.shared_file(&name, fresh.into_bytes()).await?;
                String::from_utf8(bytes.to_vec()).map_err(|_| {
                    Error::Execution(format!("{name} in the checkpoint store is not text"))
                })
            })
            .await
            .map(String::as_str)
    }

    /// Whether `token` is the cluster's secret (compared in constant time).
    pub async fn authorized(&self, token: Option<&str>) -> Result<bool> {
        let Some(token) = token else {
            return Ok(false);
        };
        let secret = self.secret().await?.as_bytes();
        let token = token.as_bytes();
        let differ = secret
            .iter()
            .zip(token)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        Ok(secret.len() == token.len() && differ == 0)
    }

    fn directory(&self) -> String {
        format!("weir-{}-members", self.cluster)
    }

    /// Records this process in the directory on `input`'s Kafka (nothing without an HTTP
    /// address to give).
    pub async fn announce(&self, input: Arc<dyn PartitionedSource>) -> Result<()> {
        let Some(http) = self.advertise.clone() else {
            return Ok(());
        };
        self.secret().await?;
        let record = serde_json::to_vec(&MemberRecord { http: Some(http) })
            .map_err(|e| Error::Internal(e.to_string()))?;
        let (topic, member) = (self.directory(), self.member.clone());
        blocking(move || input.publish(&topic, &member, &record)).await
    }

    /// The HTTP addresses of the other members in the directory, each once.
    async fn others(&self, input: Arc<dyn PartitionedSource>) -> Result<BTreeSet<String>> {
        let topic = self.directory();
        let records = blocking(move || input.read_all(&topic)).await?;
        let mut latest: BTreeMap<String, Option<String>> = BTreeMap::new();
        for (member, value) in records {
            match serde_json::from_slice::<MemberRecord>(&value) {
                Ok(record) => {
                    latest.insert(member, record.http);
                }
                Err(e) => tracing::warn!(%member, error = %e, "an unreadable member record"),
            }
        }
        latest.remove(&self.member);
        Ok(latest
            .into_values()
            .flatten()
            .filter(|http| Some(http) != self.advertise.as_ref())
            .collect())
    }

    /// The parts of `view` held by the process at `address` and their rows; `None` when it
    /// cannot be reached or does not serve it (a process gone, or one of another cluster
    /// now on its address).
    async fn fetch(
        &self,
        address: &str,
        view: &str,
    ) -> Result<Option<(Vec<String>, Vec<RecordBatch>)>> {
        let url = format!("http://{address}/cluster/views/{view}");
        let secret = self.secret().await?;
        let response = match self.client.get(&url).bearer_auth(secret).send().await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(%address, error = %e, "a peer in the directory did not answer");
                return Ok(None);
            }
        };
        if !response.status().is_success() {
            tracing::debug!(%address, status = %response.status(), "a peer refused");
            return Ok(None);
        }
        let parts: Vec<String> = response
            .headers()
            .get(PARTS_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .split(',')
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .collect();
        let body = response.bytes().await.map_err(|e| {
            Error::external(
                External::Connection,
                format!("peer {address} broke off sending view {view}: {e}"),
            )
        })?;
        let batches = StreamReader::try_new(std::io::Cursor::new(body), None)?
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(Some((parts, batches)))
    }
}

/// `view`'s parts in this process as an Arrow IPC stream, and their names.
pub fn encode_parts(view: &MvStore) -> Result<(String, Vec<u8>)> {
    let mut names = Vec::new();
    let mut body = Vec::new();
    let schema: SchemaRef = view.schema();
    let mut writer = StreamWriter::try_new(&mut body, &schema)?;
    for (name, batches) in view.local_parts() {
        for batch in &batches {
            writer.write(batch)?;
        }
        names.push(name);
    }
    writer.finish()?;
    drop(writer);
    Ok((names.join(","), body))
}

/// Gathers a view's rows from every process of the cluster.
#[derive(Debug)]
pub(super) struct ViewGather {
    pub peers: Arc<Peers>,
    pub view: String,
    pub input: Arc<dyn PartitionedSource>,
    /// Every part of the view (`r0` .. `r<n-1>`).
    pub parts: BTreeSet<String>,
}

#[async_trait]
impl Gather for ViewGather {
    async fn gather(&self, view: &MvStore) -> Result<Vec<RecordBatch>> {
        let mut missing = Vec::new();
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
            }
            let others = self.peers.others(self.input.clone()).await?;
            let fetched = futures::future::join_all(
                others
                    .iter()
                    .map(|address| self.peers.fetch(address, &self.view)),
            )
            .await;
            let local = view.local_parts();
            let mut answers = vec![(
                local
                    .iter()
                    .map(|(name, _)| name.clone())
                    .collect::<Vec<_>>(),
                local
                    .into_iter()
                    .flat_map(|(_, rows)| rows)
                    .collect::<Vec<_>>(),
            )];
            for answer in fetched {
                answers.extend(answer?);
            }
            match complete(&self.parts, answers) {
                Ok(rows) => return Ok(rows),
                Err(absent) => missing = absent,
            }
            tracing::debug!(view = %self.view, ?missing, attempt, "parts missing or doubled; asking again");
        }
        Err(Error::external(
            External::Refused,
            format!(
                "view {}: the parts {} are not held by exactly one reachable process of cluster {} (moving between processes, or on a `weir run` process); try again",
                self.view,
                missing.join(", "),
                self.peers.cluster
            ),
        ))
    }
}

/// The rows of `answers` (each a process's part names and rows) when every part of
/// `parts` came back exactly once; else the parts missing or doubled.
fn complete(
    parts: &BTreeSet<String>,
    answers: Vec<(Vec<String>, Vec<RecordBatch>)>,
) -> std::result::Result<Vec<RecordBatch>, Vec<String>> {
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for (names, _) in &answers {
        for name in names {
            *seen.entry(name.as_str()).or_default() += 1;
        }
    }
    let wrong: Vec<String> = parts
        .iter()
        .filter(|p| seen.get(p.as_str()) != Some(&1))
        .cloned()
        .collect();
    if !wrong.is_empty() {
        return Err(wrong);
    }
    Ok(answers.into_iter().flat_map(|(_, rows)| rows).collect())
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(e.to_string()))?
}

/// `bytes` random bytes from the system's generator, in hex.
fn random_hex(bytes: usize) -> Result<String> {
    use ring::rand::SecureRandom;
    let mut buf = vec![0u8; bytes];
    ring::rand::SystemRandom::new()
        .fill(&mut buf)
        .map_err(|_| Error::Internal("the system's random number generator failed".into()))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(names: &[&str]) -> (Vec<String>, Vec<RecordBatch>) {
        let schema = Arc::new(arrow::datatypes::Schema::empty());
        let rows = RecordBatch::try_new_with_options(
            schema,
            vec![],
            &arrow::record_batch::RecordBatchOptions::new().with_row_count(Some(names.len())),
        )
        .expect("batch");
        (names.iter().map(|n| n.to_string()).collect(), vec![rows])
    }

    /// A view is answered only when every part came back exactly once: a part moving
    /// between processes (missing, or held by two for a moment) is named instead.
    #[test]
    fn a_view_is_whole_or_the_wrong_parts_are_named() {
        let parts: BTreeSet<String> = ["r0", "r1", "r2"].map(String::from).into();
        let rows = complete(&parts, vec![answer(&["r0", "r2"]), answer(&["r1"])]).expect("whole");
        assert_eq!(rows.iter().map(RecordBatch::num_rows).sum::<usize>(), 3);
        assert_eq!(
            complete(&parts, vec![answer(&["r0"]), answer(&["r2"])]).map(|_| ()),
            Err(vec!["r1".to_string()]),
            "missing"
        );
        assert_eq!(
            complete(&parts, vec![answer(&["r0", "r1"]), answer(&["r1", "r2"])]).map(|_| ()),
            Err(vec!["r1".to_string()]),
            "doubled"
        );
    }
}
