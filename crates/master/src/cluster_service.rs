//! Cluster administration: status, membership, leadership transfer and backups.

use std::{collections::BTreeSet, pin::Pin, sync::Arc, time::Duration};

use berth_api::pb::{self, cluster_server};
use berth_types::Command;
use berth_types::spec::access::{Resource, Verb};
use futures::Stream;
use openraft::{BasicNode, ChangeMembers};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tonic::{Request, Response, Status};

use crate::node::Ctx;

pub(crate) struct ClusterService {
    pub ctx: Arc<Ctx>,
}

impl ClusterService {
    fn require_leader(&self) -> Result<(), Status> {
        if self.ctx.is_leader() {
            Ok(())
        } else {
            Err(berth_api::not_leader(self.ctx.leader().as_ref().map(|(i, e)| (*i, e.as_str()))))
        }
    }

    /// Membership changes go one at a time: a second one is refused while the first runs.
    fn membership_guard(&self) -> Result<tokio::sync::MutexGuard<'_, ()>, Status> {
        self.ctx.membership_lock.try_lock().map_err(|_| {
            Status::failed_precondition(
                "another membership change is in progress; changes go one at a time: retry when it is done",
            )
        })
    }

    /// Every member in the current membership, voters first, with its role as this master sees it.
    fn members(&self) -> Vec<pb::Member> {
        let m = self.ctx.metrics();
        let membership = m.membership_config.membership().clone();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let mut out: Vec<pb::Member> = membership
            .nodes()
            .map(|(id, node)| pb::Member {
                id: *id,
                endpoint: node.addr.clone(),
                role: if m.current_leader == Some(*id) {
                    "leader".into()
                } else if voters.contains(id) {
                    "follower".into()
                } else {
                    "learner".into()
                },
                voter: voters.contains(id),
                ..Default::default()
            })
            .collect();
        out.sort_by_key(|m| m.id);
        out
    }

    fn membership_error(&self, e: impl std::fmt::Display) -> Status {
        let msg = e.to_string();
        if msg.contains("in progress") || msg.contains("InProgress") {
            Status::failed_precondition(format!(
                "another membership change is still in progress ({msg}); changes go one at a time: retry when it is done"
            ))
        } else {
            Status::failed_precondition(format!("membership change refused: {msg}"))
        }
    }
}

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<pb::SnapshotResponse, Status>> + Send>>;

impl ClusterService {
    async fn member_list_call(
        &self,
        _r: Request<pb::MemberListRequest>,
    ) -> Result<Response<pb::MemberListResponse>, Status> {
        let m = self.ctx.metrics();
        Ok(Response::new(pb::MemberListResponse {
            header: Some(self.ctx.header()),
            leader: m.current_leader.unwrap_or(0),
            members: self.members(),
        }))
    }

    /// Records a membership change as an event (after it happened).
    async fn member_event(&self, kind: &str, id: &str, message: String) {
        crate::events::emit(&self.ctx, crate::events::new(self.ctx.id, kind, "master", "", id, message)).await;
    }

    async fn member_add_call(
        &self,
        r: Request<pb::MemberAddRequest>,
    ) -> Result<Response<pb::MemberAddResponse>, Status> {
        let r = r.into_inner();
        self.require_leader()?;
        if r.id == 0 {
            return Err(Status::invalid_argument("master id 0 is reserved; use ids from 1"));
        }
        if r.endpoint.is_empty() || !r.endpoint.contains(':') {
            return Err(Status::invalid_argument(format!("endpoint {:?} is not HOST:PORT", r.endpoint)));
        }
        let _guard = self.membership_guard()?;
        if self.ctx.reader.removed_members().map_err(|e| Status::internal(e.to_string()))?.contains(&r.id) {
            return Err(Status::failed_precondition(format!(
                "master id {} was removed earlier and can never be used again: pick a new id",
                r.id
            )));
        }
        if self.members().iter().any(|m| m.id == r.id) {
            return Err(Status::already_exists(format!("master {} is already a member", r.id)));
        }
        // Blocks until the learner has caught up (by log or, when the log was purged, snapshot).
        self.ctx
            .raft
            .add_learner(r.id, BasicNode::new(r.endpoint.clone()), true)
            .await
            .map_err(|e| self.membership_error(e))?;
        if r.promote {
            self.ctx
                .raft
                .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([r.id])), false)
                .await
                .map_err(|e| self.membership_error(e))?;
        }
        Ok(Response::new(pb::MemberAddResponse { header: Some(self.ctx.header()), members: self.members() }))
    }

    async fn member_certificate_call(
        &self,
        r: Request<pb::MemberCertificateRequest>,
    ) -> Result<Response<pb::MemberCertificateResponse>, Status> {
        let r = r.into_inner();
        if r.id == 0 {
            return Err(Status::invalid_argument("master id 0 is reserved; use ids from 1"));
        }
        let addr: std::net::SocketAddr = r
            .endpoint
            .parse()
            .map_err(|_| Status::invalid_argument(format!("endpoint {:?} is not IP:PORT", r.endpoint)))?;
        if self.ctx.reader.removed_members().map_err(|e| Status::internal(e.to_string()))?.contains(&r.id) {
            return Err(Status::failed_precondition(format!(
                "master id {} was removed earlier and can never be used again: pick a new id",
                r.id
            )));
        }
        // A member's certificate renews itself on that member: minting another one for its id
        // would give its identity to whoever asked.
        let membership = self.ctx.metrics().membership_config.membership().clone();
        if membership.nodes().any(|(id, _)| *id == r.id) {
            return Err(Status::failed_precondition(format!(
                "master {} is a member of the cluster: its certificate renews itself; a new master needs a new id",
                r.id
            )));
        }
        if r.csr_pem.trim().is_empty() {
            return Err(Status::invalid_argument(
                "no certificate signing request: the new master's key is made where it will run \
                 (`berth member certificate` does that), and only its CSR is sent",
            ));
        }
        let Some(ca) = self.ctx.pki.ca() else {
            return Err(berth_api::not_applied("this master does not hold the CA key yet; ask another master"));
        };
        let ips = if addr.ip().is_unspecified() { vec![] } else { vec![addr.ip()] };
        let cert_pem = ca
            .sign_csr_with(
                &r.csr_pem,
                &berth_pki::Identity::master(r.id),
                &[berth_pki::MASTER_SERVER_NAME.to_string()],
                &ips,
                self.ctx.cert_validity,
            )
            .map_err(|e| Status::invalid_argument(format!("the certificate signing request: {e}")))?;
        Ok(Response::new(pb::MemberCertificateResponse {
            header: Some(self.ctx.header()),
            ca_pem: self.ctx.pki.ca_pem(),
            cert_pem,
        }))
    }

    async fn revoke_certificate_call(
        &self,
        r: Request<pb::RevokeCertificateRequest>,
    ) -> Result<Response<pb::RevokeCertificateResponse>, Status> {
        let caller = crate::tls::peer_identity(&r).map(|i| i.to_string()).unwrap_or_default();
        let r = r.into_inner();
        let target = crate::revocation::Target::parse(&r.target).map_err(Status::invalid_argument)?;
        if r.reason.len() > 256 {
            return Err(Status::invalid_argument("the reason is longer than 256 characters"));
        }
        if let crate::revocation::Target::Identity(ident) = &target {
            if ident.to_string() == caller {
                return Err(Status::failed_precondition(format!(
                    "{caller} is the identity of this request: revoking it would lock you out; revoke it with \
                     another admin's certificate"
                )));
            }
            if let Some(id) = ident.master_id()
                && self.members().iter().any(|m| m.id == id)
            {
                return Err(Status::failed_precondition(format!(
                    "master {id} is a member: revoking its certificates would cut it off the cluster; remove it \
                     with `berth member remove {id}` (that ends its access to the API)"
                )));
            }
        }
        let revoked = crate::revocation::revoke(&self.ctx, &target, &caller, &r.reason).await?;
        Ok(Response::new(pb::RevokeCertificateResponse { header: Some(self.ctx.header()), revoked }))
    }

    async fn list_revoked_call(
        &self,
        _r: Request<pb::ListRevokedRequest>,
    ) -> Result<Response<pb::ListRevokedResponse>, Status> {
        self.ctx.read_barrier().await?;
        let revocations = crate::revocation::list(&self.ctx.reader)
            .map_err(Status::internal)?
            .into_iter()
            .map(|(target, rec)| pb::Revocation { target, at_ms: rec.at_ms, by: rec.by, reason: rec.reason })
            .collect();
        Ok(Response::new(pb::ListRevokedResponse { header: Some(self.ctx.header()), revocations }))
    }

    async fn member_promote_call(
        &self,
        r: Request<pb::MemberPromoteRequest>,
    ) -> Result<Response<pb::MemberPromoteResponse>, Status> {
        let id = r.into_inner().id;
        self.require_leader()?;
        let _guard = self.membership_guard()?;
        let member = self.members().into_iter().find(|m| m.id == id);
        match member {
            None => {
                return Err(Status::not_found(format!(
                    "master {id} is not a member: add it first with `berth member add`"
                )));
            }
            Some(m) if m.voter => return Err(Status::already_exists(format!("master {id} is already a voter"))),
            Some(_) => {}
        }
        // Wait (bounded) for the learner to catch up before it counts towards quorum.
        let leader_last = self.ctx.metrics().last_log_index;
        let caught_up = self
            .ctx
            .raft
            .wait(Some(Duration::from_secs(30)))
            .metrics(
                |m| m.replication.as_ref().and_then(|r| r.get(&id).cloned().flatten()).map(|l| l.index) >= leader_last,
                "learner caught up",
            )
            .await;
        if caught_up.is_err() {
            return Err(Status::failed_precondition(format!(
                "master {id} has not caught up with the leader within 30s; check that it is running, then retry"
            )));
        }
        self.ctx
            .raft
            .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
            .await
            .map_err(|e| self.membership_error(e))?;
        Ok(Response::new(pb::MemberPromoteResponse { header: Some(self.ctx.header()), members: self.members() }))
    }

    async fn member_remove_call(
        &self,
        r: Request<pb::MemberRemoveRequest>,
    ) -> Result<Response<pb::MemberRemoveResponse>, Status> {
        let id = r.into_inner().id;
        self.require_leader()?;
        let _guard = self.membership_guard()?;
        let members = self.members();
        let Some(member) = members.iter().find(|m| m.id == id) else {
            return Err(Status::not_found(format!("master {id} is not a member")));
        };
        if member.voter && members.iter().filter(|m| m.voter).count() == 1 {
            return Err(Status::failed_precondition("cannot remove the last voter of the cluster"));
        }
        // Record the id as removed first, so it can never come back even if we stop halfway.
        self.ctx.write(Command::MemberRemoved { id }).await?;
        let change = if member.voter {
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        };
        self.ctx.raft.change_membership(change, false).await.map_err(|e| self.membership_error(e))?;
        // Its certificates go with it (the API already refuses a removed master's; this makes
        // the refusal explicit in `berth cert revoked` and on every handshake).
        let target = crate::revocation::Target::Identity(berth_pki::Identity::master(id));
        crate::revocation::revoke(&self.ctx, &target, "berth member remove", "the master was removed").await?;
        Ok(Response::new(pb::MemberRemoveResponse { header: Some(self.ctx.header()), members: self.members() }))
    }

    async fn transfer_leader_call(
        &self,
        r: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::TransferLeaderResponse>, Status> {
        let target = r.into_inner().target;
        self.require_leader()?;
        let m = self.ctx.metrics();
        let voters: Vec<u64> = m.membership_config.membership().voter_ids().filter(|v| *v != self.ctx.id).collect();
        let target = if target == 0 {
            *voters
                .first()
                .ok_or_else(|| Status::failed_precondition("there is no other voter to hand leadership to"))?
        } else if voters.contains(&target) {
            target
        } else {
            return Err(Status::invalid_argument(format!("master {target} is not another voter of this cluster")));
        };
        self.ctx.raft.trigger().transfer_leader(target).await.map_err(|e| Status::unavailable(e.to_string()))?;
        let m = self
            .ctx
            .raft
            .wait(Some(self.ctx.election_timeout * 3))
            .metrics(|m| m.current_leader == Some(target), "leadership transferred")
            .await
            .map_err(|e| Status::deadline_exceeded(format!("leadership did not move to master {target}: {e}")))?;
        Ok(Response::new(pb::TransferLeaderResponse {
            header: Some(self.ctx.header()),
            leader: m.current_leader.unwrap_or(0),
        }))
    }

    async fn snapshot_call(&self, _r: Request<pb::SnapshotRequest>) -> Result<Response<SnapshotStream>, Status> {
        let reader = self.ctx.reader.clone();
        let dir = self.ctx.data_dir.join("backups");
        let (path, _) = tokio::task::spawn_blocking(move || reader.backup(&dir))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(format!("could not write the backup: {e}")))?;
        let header = self.ctx.header();
        let stream = async_stream::try_stream! {
            let mut f = tokio::fs::File::open(&path).await?;
            let total = f.metadata().await?.len();
            let mut hasher = Sha256::new();
            let mut first = true;
            loop {
                let mut buf = vec![0u8; 1024 * 1024];
                let n = f.read(&mut buf).await?;
                buf.truncate(n);
                hasher.update(&buf);
                let done = n == 0;
                yield pb::SnapshotResponse {
                    header: if first { Some(header.clone()) } else { None },
                    total_bytes: if first { total } else { 0 },
                    blob: buf,
                    done,
                    sha256: if done { hex::encode(hasher.clone().finalize()) } else { String::new() },
                };
                first = false;
                if done { break; }
            }
            let _ = tokio::fs::remove_file(&path).await;
        };
        Ok(Response::new(Box::pin(stream)))
    }
}

#[tonic::async_trait]
impl cluster_server::Cluster for ClusterService {
    async fn status(&self, _r: Request<pb::StatusRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        let m = self.ctx.metrics();
        let mut members = self.members();
        // Ask every member for its own figures, in parallel and briefly.
        let asks = members.iter().map(|mem| {
            let ctx = self.ctx.clone();
            let (id, ep) = (mem.id, mem.endpoint.clone());
            async move {
                if id == ctx.id {
                    return Ok(ctx.local_status());
                }
                let ch = ctx.peers.channel(&ep).map_err(Status::unavailable)?;
                let mut client = pb::raft::raft_client::RaftClient::new(ch);
                let mut req = Request::new(pb::raft::LocalStatusRequest {});
                req.set_timeout(Duration::from_millis(800));
                match tokio::time::timeout(Duration::from_secs(1), client.local_status(req)).await {
                    Ok(r) => r.map(Response::into_inner),
                    Err(_) => Err(Status::deadline_exceeded("no answer within 1s")),
                }
            }
        });
        let answers = futures::future::join_all(asks).await;
        for (mem, ans) in members.iter_mut().zip(answers) {
            match ans {
                Ok(s) => {
                    mem.last_log_index = s.last_log_index;
                    mem.applied_index = s.applied_index;
                    mem.db_size_bytes = s.db_size_bytes;
                    mem.version = s.version;
                    // The member's own view of its role is the authoritative one.
                    mem.role = s.role;
                }
                Err(e) => {
                    mem.role = "unreachable".into();
                    mem.error = e.message().to_string();
                }
            }
        }
        Ok(Response::new(pb::StatusResponse {
            header: Some(self.ctx.header()),
            leader: m.current_leader.unwrap_or(0),
            term: m.current_term,
            members,
        }))
    }

    async fn member_list(&self, r: Request<pb::MemberListRequest>) -> Result<Response<pb::MemberListResponse>, Status> {
        let caller = crate::authz::Caller::of(&r)?;
        crate::audit::authorize(&self.ctx, &caller, Verb::List, Resource::Members, None, "").await?;
        self.member_list_call(r).await
    }

    async fn member_add(&self, r: Request<pb::MemberAddRequest>) -> Result<Response<pb::MemberAddResponse>, Status> {
        let caller = crate::authz::Caller::of(&r)?;
        let name: String = r.get_ref().id.to_string();
        let endpoint = r.get_ref().endpoint.clone();
        let res = crate::audit::mutate(
            &self.ctx,
            &caller,
            Verb::Create,
            Resource::Members,
            None,
            &name,
            self.member_add_call(r),
        )
        .await;
        if res.is_ok() {
            let message = format!("master {name} at {endpoint} added as a learner");
            self.member_event(berth_types::event::MEMBER_ADDED, &name, message).await;
        }
        res
    }

    async fn member_certificate(
        &self,
        r: Request<pb::MemberCertificateRequest>,
    ) -> Result<Response<pb::MemberCertificateResponse>, Status> {
        let caller = crate::authz::Caller::of(&r)?;
        let name: String = r.get_ref().id.to_string();
        crate::audit::mutate(
            &self.ctx,
            &caller,
            Verb::Create,
            Resource::Members,
            None,
            &name,
            self.member_certificate_call(r),
        )
        .await
    }

    async fn revoke_certificate(
        &self,
        r: Request<pb::RevokeCertificateRequest>,
    ) -> Result<Response<pb::RevokeCertificateResponse>, Status> {
        let caller = crate::authz::Caller::of(&r)?;
        let name: String = r.get_ref().target.clone();
        crate::audit::mutate(
            &self.ctx,
            &caller,
            Verb::Create,
            Resource::Certificates,
            None,
            &name,
            self.revoke_certificate_call(r),
        )
        .await
    }

    async fn list_revoked(
        &self,
        r: Request<pb::ListRevokedRequest>,
    ) -> Result<Response<pb::ListRevokedResponse>, Status> {
        let caller = crate::authz::Caller::of(&r)?;
        crate::audit::authorize(&self.ctx, &caller, Verb::List, Resource::Certificates, None, "").await?;
        self.list_revoked_call(r).await
    }

    async fn member_promote(
        &self,
        r: Request<pb::MemberPromoteRequest>,
    ) -> Result<Response<pb::MemberPromoteResponse>, Status> {
        let caller = crate::authz::Caller::of(&r)?;
        let name: String = r.get_ref().id.to_string();
        crate::audit::mutate(
            &self.ctx,
            &caller,
            Verb::Update,
            Resource::Members,
            None,
            &name,
            self.member_promote_call(r),
        )
        .await
    }

    async fn member_remove(
        &self,
        r: Request<pb::MemberRemoveRequest>,
    ) -> Result<Response<pb::MemberRemoveResponse>, Status> {
        let caller = crate::authz::Caller::of(&r)?;
        let name: String = r.get_ref().id.to_string();
        let res = crate::audit::mutate(
            &self.ctx,
            &caller,
            Verb::Delete,
            Resource::Members,
            None,
            &name,
            self.member_remove_call(r),
        )
        .await;
        if res.is_ok() {
            let message = format!("master {name} removed from the cluster (its id is never reused)");
            self.member_event(berth_types::event::MEMBER_REMOVED, &name, message).await;
        }
        res
    }

    async fn transfer_leader(
        &self,
        r: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::TransferLeaderResponse>, Status> {
        let caller = crate::authz::Caller::of(&r)?;
        let name: String = r.get_ref().target.to_string();
        crate::audit::mutate(
            &self.ctx,
            &caller,
            Verb::Update,
            Resource::Members,
            None,
            &name,
            self.transfer_leader_call(r),
        )
        .await
    }

    type SnapshotStream = SnapshotStream;

    async fn snapshot(&self, r: Request<pb::SnapshotRequest>) -> Result<Response<Self::SnapshotStream>, Status> {
        let caller = crate::authz::Caller::of(&r)?;
        if !self.ctx.rbac.is_cluster_admin(&caller) {
            crate::audit::authorize(&self.ctx, &caller, Verb::Get, Resource::Kv, None, "backup").await?;
            return Err(Status::permission_denied(format!(
                "{} may not take a backup: it holds every record and key of the cluster, so only a cluster-admin may",
                caller.identity
            )));
        }
        self.snapshot_call(r).await
    }
}
