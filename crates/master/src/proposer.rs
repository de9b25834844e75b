//! Write batching on the leader: every client write waiting at the same moment goes into one Raft
//! entry, so that many writes share one fsync and one AppendEntries. A small, bounded number of
//! entries is in flight at once; while they commit, the next batch fills up.

use std::sync::Arc;

use berth_metrics::prometheus_client::metrics::histogram::Histogram;
use berth_store::{Batch, Raft};
use berth_types::{Command, CommandError, CommandResult, RequestOp};
use openraft::errors::ClientWriteError;
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc, oneshot};

pub(crate) type CmdResult = Result<CommandResult, CommandError>;

/// Entries proposed but not yet committed, at most.
const MAX_IN_FLIGHT: usize = 8;
/// Commands in one entry, at most.
const MAX_BATCH_COMMANDS: usize = 2048;
/// Payload bytes in one entry, at most (one command may exceed it alone).
const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;

/// Why a proposal did not produce a result. Crosses the wire when a follower forwards a write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum ProposeError {
    /// This master is not the leader; the leader's id and endpoint when known.
    NotLeader { leader: Option<(u64, String)> },
    /// Leadership changed while the write was in flight: it may or may not have been committed.
    OutcomeUnknown(String),
    /// The Raft node has stopped (shutdown or storage failure).
    Fatal(String),
}

struct Pending {
    cmd: Command,
    reply: oneshot::Sender<Result<CmdResult, ProposeError>>,
}

#[derive(Clone)]
pub(crate) struct Proposer {
    tx: mpsc::Sender<Pending>,
}

fn approx_size(cmd: &Command) -> usize {
    match cmd {
        Command::Txn(t) => txn_size(t),
        Command::Audited { txn, record, .. } => txn_size(txn) + record.len() + 16,
        Command::Stamped { txn, record } => txn_size(txn) + record_size(record),
        Command::Audit { records } => records.iter().map(record_size).sum(),
        Command::RotateCa { ca, txn, .. } => txn_size(txn) + ca.cert_pem.len() * 2 + ca.key_pem.len(),
        _ => 32,
    }
}

fn record_size(r: &berth_types::AuditRecord) -> usize {
    r.identity.len() + r.verb.len() + r.resource.len() + r.namespace.len() + r.name.len() + r.outcome.len() + 32
}

fn txn_size(t: &berth_types::Txn) -> usize {
    t.success
        .iter()
        .chain(&t.failure)
        .map(|op| match op {
            RequestOp::Put(p) => p.key.len() + p.value.len() + 16,
            RequestOp::Range(r) => r.key.len() + r.range_end.len() + 16,
            RequestOp::DeleteRange(d) => d.key.len() + d.range_end.len() + 16,
        })
        .sum::<usize>()
        + t.compare.len() * 32
}

impl Proposer {
    pub fn start(raft: Raft, meters: &crate::metrics::Metrics) -> Self {
        let (tx, rx) = mpsc::channel(65536);
        // Ends when every Proposer handle is dropped (the channel closes).
        tokio::spawn(run(raft, rx, meters.proposal_commands.clone(), meters.proposal_seconds.clone()));
        Proposer { tx }
    }

    pub async fn propose(&self, cmd: Command) -> Result<CmdResult, ProposeError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Pending { cmd, reply })
            .await
            .map_err(|_| ProposeError::Fatal("the proposer has stopped (master shutting down)".into()))?;
        rx.await.map_err(|_| ProposeError::Fatal("the proposer dropped the write (master shutting down)".into()))?
    }
}

async fn run(raft: Raft, mut rx: mpsc::Receiver<Pending>, batch_commands: Histogram, commit_seconds: Histogram) {
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        let Ok(permit) = slots.clone().acquire_owned().await else { return };
        // Everything that queued while we waited for a slot joins this entry.
        let mut bytes = approx_size(&first.cmd);
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH_COMMANDS && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(p) => {
                    bytes += approx_size(&p.cmd);
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        let raft = raft.clone();
        batch_commands.observe(batch.len() as f64);
        let commit_seconds = commit_seconds.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let (commands, replies): (Vec<_>, Vec<_>) = batch.into_iter().map(|p| (p.cmd, p.reply)).unzip();
            let started = std::time::Instant::now();
            match raft.client_write(Batch { commands }).await {
                Ok(resp) => {
                    commit_seconds.observe(started.elapsed().as_secs_f64());
                    let mut results = resp.data.results.into_iter();
                    for reply in replies {
                        let r = results
                            .next()
                            .ok_or_else(|| ProposeError::Fatal("state machine returned too few results".into()));
                        let _ = reply.send(r);
                    }
                }
                Err(e) => {
                    let err = classify(&e);
                    for reply in replies {
                        let _ = reply.send(Err(err.clone()));
                    }
                }
            }
        });
    }
}

fn classify(
    e: &openraft::errors::RaftError<berth_store::TypeConfig, ClientWriteError<berth_store::TypeConfig>>,
) -> ProposeError {
    if let Some(ClientWriteError::LogEntryDiscarded(_)) = e.api_error() {
        return ProposeError::OutcomeUnknown(format!(
            "leadership changed while the write was being committed, so it may or may not have \
             been applied ({e}); read it back before retrying"
        ));
    }
    if let Some(f) = e.forward_to_leader() {
        return ProposeError::NotLeader { leader: f.leader_id.zip(f.leader_node.as_ref().map(|n| n.addr.clone())) };
    }
    ProposeError::Fatal(e.to_string())
}
