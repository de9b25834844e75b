//! Joins commit in batches, so that many agents join at once with exact token use counts.
//!
//! Each join's own checks (token id and secret, name, labels, CSR signing) run concurrently on
//! the leader; what must be exact runs in one place: a join queues its node, and one waiting join
//! at a time becomes the committer (group commit, no background task). The committer takes as
//! many queued joins as one transaction holds ([`joins_per_txn`]), re-reads each token, accepts as many as it has uses left
//! and whose names are free (in the state and in the batch), and writes them in one transaction
//! that compares the token's revision: the token's new count, each node and its name, a
//! `TokenUsed` event each. A conflict (the token revoked, a node named meanwhile through another
//! path) re-reads and tries again. One Raft entry for a batch, instead of one per join, and the
//! count stays exact because only one batch is written at a time.

use std::{
    collections::{BTreeMap, HashSet},
    sync::Mutex,
};

use berth_api::pb::{
    JoinTokenRecord, Node,
    agent::{JoinAccepted, JoinError, master_frame},
};
use berth_types::{Command, CommandResult, event};
use tokio::sync::oneshot;
use tracing::info;

use crate::{node::Ctx, objects};

/// What a transaction holds for each join: the node's and its name's compare and put, and an
/// event; and for the token: its compare and put.
const OPS_PER_JOIN: usize = 5;
const OPS_PER_TOKEN: usize = 2;
/// How often a batch that conflicted is read and written again before its joins are told to retry.
const ATTEMPTS: usize = 4;

/// A join that passed its own checks, waiting for its batch.
pub(crate) struct Pending {
    pub token_id: String,
    pub node: Node,
    pub cert_pem: String,
    reply: oneshot::Sender<Option<master_frame::Body>>,
}

/// The queue of joins and the turn to commit them.
#[derive(Default)]
pub(crate) struct JoinQueue {
    pending: Mutex<Vec<Pending>>,
    committing: tokio::sync::Mutex<()>,
}

impl JoinQueue {
    /// Queues `node` (joined with `token_id`, certificate `cert_pem`) and waits until a batch
    /// decided it: the answer for the agent.
    pub(crate) async fn join(
        &self,
        ctx: &Ctx,
        token_id: String,
        node: Node,
        cert_pem: String,
    ) -> Option<master_frame::Body> {
        let (tx, mut rx) = oneshot::channel();
        self.pending.lock().expect("join queue lock").push(Pending { token_id, node, cert_pem, reply: tx });
        loop {
            let _turn = self.committing.lock().await;
            // Decided by a batch another join committed while this one waited for its turn.
            match rx.try_recv() {
                Ok(answer) => return answer,
                Err(oneshot::error::TryRecvError::Closed) => {
                    return super::dispatcher::rejected(JoinError::Unavailable, "the join was dropped; retry");
                }
                Err(oneshot::error::TryRecvError::Empty) => {}
            }
            let batch: Vec<Pending> = {
                let mut q = self.pending.lock().expect("join queue lock");
                let n = q.len().min(joins_per_txn(ctx));
                q.drain(..n).collect()
            };
            commit(ctx, batch).await;
        }
    }
}

/// The most joins one transaction holds (25 under the default limit of 128 operations).
pub(crate) fn joins_per_txn(ctx: &Ctx) -> usize {
    (ctx.limits.max_txn_ops.saturating_sub(OPS_PER_TOKEN) / OPS_PER_JOIN).max(1)
}

/// Decides a batch: every join in it gets its answer.
async fn commit(ctx: &Ctx, batch: Vec<Pending>) {
    let mut by_token: BTreeMap<String, Vec<Pending>> = BTreeMap::new();
    for p in batch {
        by_token.entry(p.token_id.clone()).or_default().push(p);
    }
    for (token_id, joins) in by_token {
        commit_token(ctx, &token_id, joins).await;
    }
}

fn answer(p: Pending, body: Option<master_frame::Body>) {
    let _ = p.reply.send(body);
}

fn refuse(p: Pending, error: JoinError, message: impl Into<String>) {
    answer(p, super::dispatcher::rejected(error, message));
}

/// The joins of one token.
async fn commit_token(ctx: &Ctx, token_id: &str, mut joins: Vec<Pending>) {
    for attempt in 1..=ATTEMPTS {
        if !ctx.is_leader() {
            for p in joins {
                refuse(p, JoinError::NotLeader, "this master stopped leading during the join; join through the leader");
            }
            return;
        }
        let rec = match objects::get::<JoinTokenRecord>(&ctx.reader, &objects::token_key(token_id)) {
            Ok(Some(r)) => r,
            Ok(None) => {
                for p in joins {
                    refuse(p, JoinError::TokenRevoked, "the token was deleted during the join: create a new one");
                }
                return;
            }
            Err(e) => {
                for p in joins {
                    refuse(p, JoinError::Unavailable, e.message().to_string());
                }
                return;
            }
        };
        if rec.obj.revoked {
            for p in joins {
                refuse(p, JoinError::TokenRevoked, "the token was revoked: create a new one with `berth token create`");
            }
            return;
        }
        // Who gets a use: in queue order, those whose names are free, while uses last.
        let unlimited = rec.obj.uses_left < 0;
        let mut left = rec.obj.uses_left;
        let mut names = HashSet::new();
        let mut accepted = Vec::new();
        for p in joins.drain(..) {
            let taken = !names.insert(p.node.name.clone())
                || matches!(ctx.reader.get(&objects::node_name_key(&p.node.name)), Ok(Some(_)));
            if taken {
                let name = p.node.name.clone();
                refuse(
                    p,
                    JoinError::NameTaken,
                    format!(
                        "a node named {name:?} is already in the cluster: pick another --name, or remove the old \
                         node with `berth node rm {name}`"
                    ),
                );
            } else if !unlimited && left == 0 {
                refuse(
                    p,
                    JoinError::TokenUsedUp,
                    "the token has no uses left: create a new one with `berth token create --uses N`",
                );
            } else {
                if !unlimited {
                    left -= 1;
                }
                accepted.push(p);
            }
        }
        if accepted.is_empty() {
            return;
        }
        let mut token = rec.obj.clone();
        token.uses_left = left;
        let mut ops =
            vec![objects::cas_put(objects::token_key(token_id), rec.mod_revision, objects::encode_token(&token))];
        let mut used = Vec::new();
        for (i, p) in accepted.iter().enumerate() {
            ops.push(objects::cas_put(objects::node_key(&p.node.id), 0, objects::encode_node(&p.node)));
            ops.push(objects::cas_put(objects::node_name_key(&p.node.name), 0, p.node.id.clone().into_bytes()));
            // The uses left after this node, as if the batch's joins had come one by one.
            let after = if unlimited { -1 } else { rec.obj.uses_left - 1 - i as i64 };
            used.push(crate::events::new(
                ctx.id,
                event::TOKEN_USED,
                "token",
                "",
                token_id,
                format!("node {} ({}) joined; {after} use(s) left", p.node.name, p.node.id),
            ));
        }
        let txn = crate::events::with(objects::txn_of(ops), &used);
        match ctx.write(Command::Txn(txn)).await {
            Ok(CommandResult::Txn(r)) if r.succeeded => {
                info!(token = token_id, joined = accepted.len(), uses_left = left, "nodes joined");
                let (ca_pem, masters) = (ctx.pki.ca_pem(), super::dispatcher::master_endpoints(ctx));
                for p in accepted {
                    info!(node = %p.node.id, name = %p.node.name, token = token_id, "node joined");
                    let body = master_frame::Body::JoinAccepted(JoinAccepted {
                        node_id: p.node.id.clone(),
                        cert_pem: p.cert_pem.clone(),
                        ca_pem: ca_pem.clone(),
                        masters: masters.clone(),
                    });
                    answer(p, Some(body));
                }
                return;
            }
            // The token or a name changed since they were read: read again.
            Ok(_) if attempt < ATTEMPTS => joins = accepted,
            Ok(_) => {
                for p in accepted {
                    refuse(p, JoinError::Unavailable, "the token kept changing during the join; retry");
                }
                return;
            }
            Err(s) => {
                tracing::warn!(
                    token = token_id,
                    joins = accepted.len(),
                    "recording joined nodes failed: {}",
                    s.message()
                );
                for p in accepted {
                    refuse(p, JoinError::Unavailable, format!("recording the node failed: {}", s.message()));
                }
                return;
            }
        }
    }
}
