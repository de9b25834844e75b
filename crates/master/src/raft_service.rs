//! Raft between masters, server side: the internal gRPC service.

use std::{path::PathBuf, sync::Arc};

use berth_api::pb::raft::{
    LocalStatusRequest, LocalStatusResponse, RaftHeader, RaftRequest, RaftResponse, ReadIndexRequest,
    ReadIndexResponse, SnapshotChunk, raft_server,
};
use berth_store::{SnapshotFile, TypeConfig};
use berth_types::Command;
use openraft::{
    ReadPolicy,
    alias::{SnapshotMetaOf, VoteOf},
    raft::{AppendEntriesRequest, AppendEntriesResponse, TransferLeaderRequest, VoteRequest},
    storage::Snapshot,
};
use tokio::io::AsyncWriteExt;
use tonic::{Request, Response, Status, Streaming};

use crate::{
    network::{decode, encode},
    node::Ctx,
    proposer::ProposeError,
};

pub(crate) struct RaftService {
    pub ctx: Arc<Ctx>,
    pub snap_dir: PathBuf,
}

fn reply<T: serde::Serialize>(v: &T) -> Result<Response<RaftResponse>, Status> {
    Ok(Response::new(RaftResponse { payload: encode(v), id: 0 }))
}

/// The master id in the peer's client certificate. The Raft service is for masters only.
fn peer_master<T>(r: &Request<T>) -> Result<u64, Status> {
    match crate::tls::peer_identity(r) {
        Some(ident) => ident.master_id().ok_or_else(|| {
            Status::permission_denied(format!(
                "the Raft service is for masters only, and this client's certificate is {ident}"
            ))
        }),
        None => Err(Status::unauthenticated("no client certificate from the cluster CA")),
    }
}

/// A write forwarded by a follower: proposed here if this master leads, else refused with a hint.
async fn propose_forwarded(ctx: &Ctx, cmd: Command) -> Result<crate::proposer::CmdResult, ProposeError> {
    if !ctx.is_leader() {
        return Err(ProposeError::NotLeader { leader: ctx.leader() });
    }
    match tokio::time::timeout(crate::node::COMMIT_TIMEOUT, ctx.proposer.propose(cmd)).await {
        Ok(r) => r,
        Err(_) => Err(ProposeError::OutcomeUnknown(format!(
            "the write was not committed within {:?}: a majority of masters is probably \
             unreachable; it may still be applied if they return, so read it back before retrying",
            crate::node::COMMIT_TIMEOUT
        ))),
    }
}

/// A stream of Raft responses, for AppendStream and ProposeStream.
type AppendStreamOut = std::pin::Pin<Box<dyn futures::Stream<Item = Result<RaftResponse, Status>> + Send + 'static>>;

impl RaftService {
    /// Refuses messages not meant for this master: a sender whose certificate is not the member
    /// the message claims to be from, wrong target id (a master replaced at the same address),
    /// another cluster, or a sender whose id was removed.
    fn check(&self, h: Option<&RaftHeader>, peer: u64) -> Result<(), Status> {
        let h = h.ok_or_else(|| Status::invalid_argument("Raft message without a header"))?;
        if h.from != peer {
            return Err(Status::permission_denied(format!(
                "a Raft message claims to come from master {} but its sender's certificate is master {peer}",
                h.from
            )));
        }
        let me = self.ctx.id;
        if h.to != me {
            return Err(Status::failed_precondition(format!(
                "message for master {} reached master {me}: the address now belongs to another \
                 member; update the membership with `berth member remove {}`",
                h.to, h.to
            )));
        }
        let ours = self.ctx.peers.cluster_id.get();
        if !ours.is_empty() && !h.cluster_id.is_empty() && ours != h.cluster_id {
            return Err(Status::failed_precondition(format!(
                "master {} belongs to cluster {}, but this master belongs to cluster {ours}: it was \
                 pointed at the wrong cluster or started on another cluster's data dir",
                h.from, h.cluster_id
            )));
        }
        // Versions too far apart are refused, never misread (the skew policy in berth_api::version).
        if h.version != berth_api::version::VERSION
            && let Err(why) = berth_api::version::master_allowed(&h.version, &berth_api::version::Version::this())
        {
            return Err(Status::failed_precondition(format!("refusing Raft messages from master {}: {why}", h.from)));
        }
        if self.ctx.is_removed(h.from) {
            return Err(Status::permission_denied(format!(
                "master {} was removed from this cluster and its id can never rejoin: wipe its data \
                 dir and add it again under a new id",
                h.from
            )));
        }
        Ok(())
    }

    fn decode_req<T: serde::de::DeserializeOwned>(&self, r: Request<RaftRequest>) -> Result<T, Status> {
        let peer = peer_master(&r)?;
        let r = r.into_inner();
        self.check(r.header.as_ref(), peer)?;
        decode(&r.payload).map_err(Status::invalid_argument)
    }
}

/// Dropped with an AppendStream: starts the fast-failover check for its sender.
struct StreamEnd {
    ctx: Arc<Ctx>,
    peer: u64,
}

impl Drop for StreamEnd {
    fn drop(&mut self) {
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(crate::failover::append_stream_ended(self.ctx.clone(), self.peer));
        }
    }
}

#[tonic::async_trait]
impl raft_server::Raft for RaftService {
    async fn vote(&self, r: Request<RaftRequest>) -> Result<Response<RaftResponse>, Status> {
        let gone: Option<u64> = r
            .metadata()
            .get(crate::failover::LEADER_GONE_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let mut req: VoteRequest<TypeConfig> = self.decode_req(r)?;
        // The candidate found the leader's process gone: if this master finds the same, the
        // leader's lease protects nobody, and the vote is decided now ([`crate::failover`]).
        if let Some(leader) = gone
            && !req.leadership_transfer
            && crate::failover::leader_is_gone(&self.ctx, leader).await
        {
            tracing::info!(leader, candidate = ?req.vote, "the leader's process is gone here too: voting without its lease");
            req.leadership_transfer = true;
        }
        reply(&self.ctx.raft.vote(req).await.map_err(|e| e.to_string()))
    }

    async fn pre_vote(&self, r: Request<RaftRequest>) -> Result<Response<RaftResponse>, Status> {
        let req: VoteRequest<TypeConfig> = self.decode_req(r)?;
        reply(&self.ctx.raft.pre_vote(req).await.map_err(|e| e.to_string()))
    }

    type AppendStreamStream = AppendStreamOut;

    async fn append_stream(
        &self,
        r: Request<Streaming<RaftRequest>>,
    ) -> Result<Response<Self::AppendStreamStream>, Status> {
        let peer = peer_master(&r)?;
        let mut inbound = r.into_inner();
        let svc = RaftService { ctx: self.ctx.clone(), snap_dir: self.snap_dir.clone() };
        // When the stream ends (its sender died, or dropped it), look whether the leader is gone.
        let ended = StreamEnd { ctx: self.ctx.clone(), peer };
        // Answered one at a time, in order: the sender waits for each answer anyway.
        let out = async_stream::try_stream! {
            let _ended = ended;
            while let Some(req) = inbound.message().await? {
                svc.check(req.header.as_ref(), peer)?;
                let id = req.id;
                let req: AppendEntriesRequest<TypeConfig> = decode(&req.payload).map_err(Status::invalid_argument)?;
                let res = svc.ctx.raft.append_entries(req).await.map_err(|e| e.to_string());
                // Accepted (not refused for a higher vote): the sender leads, and is alive now.
                // Followers route client requests only to a leader heard from recently.
                if matches!(&res, Ok(r) if !matches!(r, AppendEntriesResponse::HigherVote(_))) {
                    svc.ctx.leader_contact.heard_from(peer);
                }
                // The id lets the sender tell this answer from a late one to a request it gave up on.
                yield RaftResponse { payload: encode(&res), id };
            }
        };
        Ok(Response::new(Box::pin(out)))
    }

    async fn transfer_leader(&self, r: Request<RaftRequest>) -> Result<Response<RaftResponse>, Status> {
        let req: TransferLeaderRequest<TypeConfig> = self.decode_req(r)?;
        reply(&self.ctx.raft.handle_transfer_leader(req).await.map_err(|e| e.to_string()))
    }

    async fn install_snapshot(&self, r: Request<Streaming<SnapshotChunk>>) -> Result<Response<RaftResponse>, Status> {
        let peer = peer_master(&r)?;
        let mut stream = r.into_inner();
        let first = stream.message().await?.ok_or_else(|| Status::invalid_argument("empty snapshot stream"))?;
        self.check(first.header.as_ref(), peer)?;
        let vote: VoteOf<TypeConfig> = decode(&first.vote).map_err(Status::invalid_argument)?;
        let meta: SnapshotMetaOf<TypeConfig> = decode(&first.meta).map_err(Status::invalid_argument)?;
        tokio::fs::create_dir_all(&self.snap_dir).await?;
        let path = self.snap_dir.join(format!("recv-{}.incoming", uuid::Uuid::new_v4()));
        let received = async {
            // It carries the CA key: owner-only.
            let mut f = tokio::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path).await?;
            let mut done = first.done;
            while !done {
                let chunk = stream.message().await?.ok_or_else(|| {
                    Status::aborted("snapshot stream ended before its last chunk: the sender went away")
                })?;
                f.write_all(&chunk.data).await?;
                done = chunk.done;
            }
            f.sync_all().await?;
            // Refuse a damaged file here, before openraft sees it.
            let p = path.clone();
            tokio::task::spawn_blocking(move || berth_store::read_header(&p))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(|e| Status::data_loss(e.to_string()))?;
            Ok::<(), Status>(())
        };
        if let Err(e) = received.await {
            let _ = tokio::fs::remove_file(&path).await;
            return Err(e);
        }
        let snapshot = Snapshot { meta, snapshot: SnapshotFile { path: path.clone() } };
        let res = self.ctx.raft.install_full_snapshot(vote, snapshot).await.map_err(|e| e.to_string());
        // Adopted snapshots were renamed away; anything left here was not installed.
        let _ = tokio::fs::remove_file(&path).await;
        reply(&res)
    }

    async fn read_index(&self, r: Request<ReadIndexRequest>) -> Result<Response<ReadIndexResponse>, Status> {
        self.check(r.get_ref().header.as_ref(), peer_master(&r)?)?;
        match self.ctx.raft.get_read_log_id(ReadPolicy::ReadIndex).await {
            Ok((read_log_id, _)) => Ok(Response::new(ReadIndexResponse { read_index: read_log_id.index() })),
            Err(e) => Err(match e.forward_to_leader() {
                Some(_) => berth_api::not_leader(self.ctx.leader().as_ref().map(|(i, e)| (*i, e.as_str()))),
                None => Status::unavailable(format!("read index failed: {e}")),
            }),
        }
    }

    async fn local_status(&self, r: Request<LocalStatusRequest>) -> Result<Response<LocalStatusResponse>, Status> {
        peer_master(&r)?;
        Ok(Response::new(self.ctx.local_status()))
    }

    type ProposeStreamStream = AppendStreamOut;

    async fn propose_stream(
        &self,
        r: Request<Streaming<RaftRequest>>,
    ) -> Result<Response<Self::ProposeStreamStream>, Status> {
        let peer = peer_master(&r)?;
        let mut inbound = r.into_inner();
        let svc = RaftService { ctx: self.ctx.clone(), snap_dir: self.snap_dir.clone() };
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<RaftResponse, Status>>(1024);
        // Every forwarded write is proposed concurrently (the proposer batches them); answers go
        // back by id as they complete.
        tokio::spawn(async move {
            loop {
                let req = match inbound.message().await {
                    Ok(Some(req)) => req,
                    Ok(None) => return,
                    Err(s) => {
                        let _ = tx.send(Err(s)).await;
                        return;
                    }
                };
                if let Err(s) = svc.check(req.header.as_ref(), peer) {
                    let _ = tx.send(Err(s)).await;
                    return;
                }
                let id = req.id;
                let cmd: Command = match decode(&req.payload) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = tx.send(Err(Status::invalid_argument(e))).await;
                        return;
                    }
                };
                let ctx = svc.ctx.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let res = propose_forwarded(&ctx, cmd).await;
                    let _ = tx.send(Ok(RaftResponse { payload: encode(&res), id })).await;
                });
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}
