//! The client KV API, and the one gRPC server that carries every service of a master.

use std::{path::PathBuf, pin::Pin, sync::Arc};

use berth_api::pb::{self, kv_server};
use berth_store::WatchEvents;
use berth_types::{
    Command, CommandResult, DeleteRange, Put, RequestOp, Txn,
    spec::access::{Resource, Verb},
};
use futures::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, service::interceptor::InterceptedService};

use crate::{MasterError, cluster_service::ClusterService, node::Ctx, raft_service::RaftService};

const CLIENT_MESSAGE_LIMIT: usize = 16 * 1024 * 1024;
const RAFT_MESSAGE_LIMIT: usize = 512 * 1024 * 1024;

/// Serves KV, Cluster, Raft and reflection on `listener` until `token` fires. Every service
/// checks the client's certificate from the request's head, before reading its body.
pub(crate) async fn serve(
    ctx: Arc<Ctx>,
    listener: tokio::net::TcpListener,
    snap_dir: PathBuf,
    token: CancellationToken,
) -> Result<(), MasterError> {
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(berth_api::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| MasterError::Serve(e.to_string()))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(berth_api::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| MasterError::Serve(e.to_string()))?;
    let request_metrics = crate::metrics::RequestMetricsLayer::new(&ctx.meters);
    let kv = kv_server::KvServer::new(KvService { ctx: ctx.clone() })
        .max_decoding_message_size(CLIENT_MESSAGE_LIMIT)
        .max_encoding_message_size(CLIENT_MESSAGE_LIMIT);
    let require_client = {
        let ctx = ctx.clone();
        move |req: Request<()>| authorize(&ctx, req, false)
    };
    let require_master = {
        let ctx = ctx.clone();
        move |req: Request<()>| authorize(&ctx, req, true)
    };
    let kv = InterceptedService::new(kv, require_client.clone());
    let cluster = pb::cluster_server::ClusterServer::new(ClusterService { ctx: ctx.clone() })
        .max_decoding_message_size(CLIENT_MESSAGE_LIMIT);
    let cluster = InterceptedService::new(cluster, require_client.clone());
    let nodes = InterceptedService::new(
        pb::nodes_server::NodesServer::new(crate::nodes_service::NodesService { ctx: ctx.clone() }),
        require_client.clone(),
    );
    let control = InterceptedService::new(
        pb::control_service_server::ControlServiceServer::new(crate::control_service::ControlSvc { ctx: ctx.clone() })
            .max_decoding_message_size(CLIENT_MESSAGE_LIMIT)
            .max_encoding_message_size(CLIENT_MESSAGE_LIMIT),
        require_client.clone(),
    );
    let access = InterceptedService::new(
        pb::access_server::AccessServer::new(crate::access_service::AccessService { ctx: ctx.clone() }),
        require_client.clone(),
    );
    let pki = ctx.pki.clone();
    // Raft messages may be large (RAFT_MESSAGE_LIMIT): the certificate is checked from the
    // request's head, before any of its body is read, so only a master can make a master read one.
    let raft = InterceptedService::new(
        pb::raft::raft_server::RaftServer::new(RaftService { ctx, snap_dir })
            .max_decoding_message_size(RAFT_MESSAGE_LIMIT)
            .max_encoding_message_size(RAFT_MESSAGE_LIMIT),
        require_master,
    );
    let reflection_v1 = InterceptedService::new(reflection_v1, require_client.clone());
    let reflection_v1alpha = InterceptedService::new(reflection_v1alpha, require_client);
    // Every connection is TLS 1.3 with a client certificate from the cluster CA (checked in the
    // handshake); which services a certificate may use is checked per request. TCP_NODELAY is set
    // on every accepted socket: Nagle plus delayed ACKs would stall small request/response pairs.
    let incoming = crate::tls::tls_incoming(listener, pki, token.clone());
    tonic::transport::Server::builder()
        .layer(request_metrics)
        .layer(crate::deadline::DeadlineLayer)
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(5)))
        .add_service(kv)
        .add_service(cluster)
        .add_service(nodes)
        .add_service(control)
        .add_service(access)
        .add_service(raft)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(incoming, token.cancelled_owned())
        .await
        .map_err(|e| MasterError::Serve(e.to_string()))
}

/// Who may use a service, checked from the request's head (before its body is read) on every
/// request, so that a revocation applies to connections already open: the client APIs are for
/// admins, users (what each call may do is then checked by its handler, `authz`) and masters
/// forwarding on a client's behalf; agents have their own protocol over QUIC. Raft is for
/// masters only. A revoked certificate and a removed master's are refused. The caller's
/// identity is handed to the handlers as a request extension.
fn authorize(ctx: &crate::node::Ctx, mut req: Request<()>, masters_only: bool) -> Result<Request<()>, Status> {
    // One parse of the certificate per request: identity, serial and start of validity.
    let certs = req.peer_certs();
    let Some(leaf) = certs.as_ref().and_then(|c| c.first()) else {
        return Err(Status::unauthenticated("no client certificate from the cluster CA"));
    };
    let Ok(info) = berth_pki::cert_info_of_der(leaf.as_ref()) else {
        return Err(Status::unauthenticated("the client certificate carries no berth identity"));
    };
    let ident = &info.identity;
    match ident.role {
        berth_pki::Role::Master => {}
        berth_pki::Role::Admin | berth_pki::Role::User if !masters_only => {}
        _ if masters_only => {
            return Err(Status::permission_denied(format!(
                "the Raft service is for masters only, and this client's certificate is {ident}"
            )));
        }
        _ => {
            return Err(Status::permission_denied(format!(
                "certificate {ident} may not use the client API: agents speak QUIC; use an admin certificate \
                 (`berth pki init`) or a user's (`berth user add`)"
            )));
        }
    }
    // (Not on Raft: openraft decides what a removed member's messages are worth, and a leader
    // removing itself still replicates that change.)
    if !masters_only
        && let Some(id) = ident.master_id()
        && ctx.is_removed(id)
    {
        return Err(Status::permission_denied(format!(
            "master {id} was removed from the cluster: its certificate no longer opens any API"
        )));
    }
    ctx.revoked
        .check(&info)
        .map_err(|e| Status::permission_denied(format!("{e}: ask an admin for a new certificate")))?;
    req.extensions_mut().insert(crate::authz::Caller { identity: info.identity });
    Ok(req)
}

pub(crate) struct KvService {
    pub ctx: Arc<Ctx>,
}

fn store_err(e: berth_store::StoreError) -> Status {
    match e {
        berth_store::StoreError::Command(c) => crate::node::command_result(Err(c)).unwrap_err(),
        other => Status::internal(other.to_string()),
    }
}

/// berth's own records live under this prefix; only the masters write them.
const RESERVED: &[u8] = b"/berth/";

/// Whether the range [key, range_end) (etcd's conventions: empty end is the key alone, "\0" is
/// every key from it) overlaps berth's own records.
fn overlaps_reserved(key: &[u8], range_end: &[u8]) -> bool {
    if range_end.is_empty() {
        return key.starts_with(RESERVED);
    }
    let end = berth_types::prefix_end(RESERVED);
    let to_end = range_end == [0];
    key < end.as_slice() && (to_end || range_end > RESERVED)
}

fn reserved_write(key: &[u8]) -> Status {
    Status::permission_denied(format!(
        "{:?} is under /berth/, berth's own records: they change only through berth's commands (apply, node, \
         token, ...), never through KV writes",
        String::from_utf8_lossy(key)
    ))
}

fn reserved_read(caller: &crate::authz::Caller, key: &[u8]) -> Status {
    Status::permission_denied(format!(
        "{} may not read {:?}: keys under /berth/ are berth's own records (tokens, users, secrets' metadata), \
         readable through KV by a cluster-admin only; use berth's commands (get, describe, ...) instead",
        caller.identity,
        String::from_utf8_lossy(key)
    ))
}

/// Refuses a KV transaction that would touch berth's own records (`/berth/`): a put of such a
/// key or a delete whose range overlaps the prefix, always (the masters write them through their
/// own commands; through KV, a client could forge a node, a token or a task); a read of them
/// unless `may_read` (a cluster-admin).
fn refuse_reserved(txn: &Txn, caller: &crate::authz::Caller, may_read: bool) -> Result<(), Status> {
    for op in txn.success.iter().chain(txn.failure.iter()) {
        match op {
            RequestOp::Put(p) if p.key.starts_with(RESERVED) => return Err(reserved_write(&p.key)),
            RequestOp::DeleteRange(d) if overlaps_reserved(&d.key, &d.range_end) => return Err(reserved_write(&d.key)),
            RequestOp::Range(q) if !may_read && overlaps_reserved(&q.key, &q.range_end) => {
                return Err(reserved_read(caller, &q.key));
            }
            _ => {}
        }
    }
    Ok(())
}

/// What a transaction does, for authorization: `update` when it writes, `get` when it only
/// reads; and the first key it names.
fn txn_verb(txn: &Txn) -> (Verb, Vec<u8>) {
    let writes = txn.success.iter().chain(txn.failure.iter()).any(|op| !matches!(op, RequestOp::Range(_)));
    let first = txn.success.iter().chain(txn.failure.iter()).next().map(|op| match op {
        RequestOp::Put(p) => p.key.clone(),
        RequestOp::DeleteRange(d) => d.key.clone(),
        RequestOp::Range(q) => q.key.clone(),
    });
    (if writes { Verb::Update } else { Verb::Get }, first.unwrap_or_default())
}

fn key_name(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}

impl KvService {
    /// Checks and commits a transaction on `caller`'s behalf; one that writes is audited.
    async fn txn(&self, caller: &crate::authz::Caller, verb: Verb, txn: Txn) -> Result<berth_types::TxnResult, Status> {
        let (txn_verb, key) = txn_verb(&txn);
        let verb = if txn_verb == Verb::Get { Verb::Get } else { verb };
        let name = key_name(&key);
        if !verb.mutates() {
            crate::audit::authorize(&self.ctx, caller, verb, Resource::Kv, None, &name).await?;
        }
        let check = || refuse_reserved(&txn, caller, self.ctx.rbac.is_cluster_admin(caller));
        let commit = async {
            check()?;
            match self.ctx.write(Command::Txn(txn.clone())).await? {
                CommandResult::Txn(r) => Ok(r),
                other => Err(Status::internal(format!("unexpected result {other:?} for a transaction"))),
            }
        };
        if verb.mutates() {
            crate::audit::mutate(&self.ctx, caller, verb, Resource::Kv, None, &name, commit).await
        } else {
            commit.await
        }
    }

    fn header_at(&self, revision: i64) -> pb::ResponseHeader {
        self.ctx.header_at(revision)
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl kv_server::Kv for KvService {
    async fn range(&self, r: Request<pb::RangeRequest>) -> Result<Response<pb::RangeResponse>, Status> {
        let caller = crate::authz::Caller::of(&r)?;
        let r = r.into_inner();
        let q = berth_api::range_query_from_pb(&r)?;
        crate::audit::authorize(&self.ctx, &caller, Verb::Get, Resource::Kv, None, &key_name(&q.key)).await?;
        if overlaps_reserved(&q.key, &q.range_end) && !self.ctx.rbac.is_cluster_admin(&caller) {
            return Err(reserved_read(&caller, &q.key));
        }
        self.ctx.limits.check_key(&q.key).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if !r.serializable {
            self.ctx.read_barrier().await?;
        }
        let reader = self.ctx.reader.clone();
        let (res, counters) = tokio::task::spawn_blocking(move || reader.range(&q))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(store_err)?;
        Ok(Response::new(berth_api::range_result_to_pb(res, &self.header_at(counters.revision))))
    }

    async fn put(&self, r: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        let caller = crate::authz::Caller::of(&r)?;
        let r = r.into_inner();
        let txn = Txn {
            success: vec![RequestOp::Put(Put { key: r.key, value: r.value, prev_kv: r.prev_kv })],
            ..Default::default()
        };
        let res = self.txn(&caller, Verb::Update, txn).await?;
        let prev_kv = match res.responses.into_iter().next() {
            Some(berth_types::OpResult::Put(p)) => p.prev_kv.map(Into::into),
            _ => None,
        };
        Ok(Response::new(pb::PutResponse { header: Some(self.header_at(res.revision)), prev_kv }))
    }

    async fn delete_range(
        &self,
        r: Request<pb::DeleteRangeRequest>,
    ) -> Result<Response<pb::DeleteRangeResponse>, Status> {
        let caller = crate::authz::Caller::of(&r)?;
        let r = r.into_inner();
        let txn = Txn {
            success: vec![RequestOp::DeleteRange(DeleteRange {
                key: r.key,
                range_end: r.range_end,
                prev_kv: r.prev_kv,
            })],
            ..Default::default()
        };
        let res = self.txn(&caller, Verb::Delete, txn).await?;
        let header = self.header_at(res.revision);
        match res.responses.into_iter().next() {
            Some(berth_types::OpResult::DeleteRange(d)) => Ok(Response::new(pb::DeleteRangeResponse {
                header: Some(header),
                deleted: d.deleted,
                prev_kvs: d.prev_kvs.into_iter().map(Into::into).collect(),
            })),
            _ => Err(Status::internal("delete returned no result")),
        }
    }

    async fn txn(&self, r: Request<pb::TxnRequest>) -> Result<Response<pb::TxnResponse>, Status> {
        // Every transaction, read-only ones included, goes through the log: that alone makes it
        // linearizable, so no read-index round is needed on top.
        let caller = crate::authz::Caller::of(&r)?;
        let txn = berth_api::txn_from_pb(r.into_inner())?;
        let res = self.txn(&caller, Verb::Update, txn).await?;
        let header = self.header_at(res.revision);
        Ok(Response::new(berth_api::txn_result_to_pb(res, &header)))
    }

    async fn compact(&self, r: Request<pb::CompactionRequest>) -> Result<Response<pb::CompactionResponse>, Status> {
        let caller = crate::authz::Caller::of(&r)?;
        let revision = r.into_inner().revision;
        crate::audit::mutate(
            &self.ctx,
            &caller,
            Verb::Delete,
            Resource::Kv,
            None,
            &format!("history to {revision}"),
            async { self.ctx.write(Command::Compact { revision }).await },
        )
        .await?;
        Ok(Response::new(pb::CompactionResponse { header: Some(self.ctx.header()) }))
    }

    type WatchStream = WatchStream;

    async fn watch(&self, r: Request<pb::WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let caller = crate::authz::Caller::of(&r)?;
        let slot = self.ctx.streams.open(&r, "watch", crate::streams::MAX_WATCHES)?;
        let r = r.into_inner();
        crate::audit::authorize(&self.ctx, &caller, Verb::Watch, Resource::Kv, None, &key_name(&r.key)).await?;
        if overlaps_reserved(&r.key, &r.range_end) && !self.ctx.rbac.is_cluster_admin(&caller) {
            return Err(reserved_read(&caller, &r.key));
        }
        if r.start_revision < 0 {
            return Err(Status::invalid_argument("start_revision must be >= 0"));
        }
        self.ctx.limits.check_key(&r.key).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let mut watcher = self.ctx.reader.watch(r.key, r.range_end, r.start_revision).map_err(store_err)?;
        let ctx = self.ctx.clone();
        let want_prev = r.prev_kv;
        let stream = async_stream::try_stream! {
            // Held as long as the stream lives.
            let _slot = slot;
            // The first message confirms the watch and names the revision it starts after.
            yield pb::WatchResponse {
                header: Some(ctx.header_at(watcher.last_revision())),
                ..Default::default()
            };
            loop {
                match watcher.next().await.map_err(store_err)? {
                    WatchEvents::Events(events) => {
                        let rev = events.last().map_or(0, |(r, _)| *r);
                        let events = events.into_iter().map(|(_, mut e)| {
                            if !want_prev { e.prev_kv = None; }
                            pb::Event::from(e)
                        }).collect();
                        yield pb::WatchResponse {
                            header: Some(ctx.header_at(rev)),
                            events,
                            ..Default::default()
                        };
                    }
                    WatchEvents::Compacted { compact_revision } => {
                        yield pb::WatchResponse {
                            header: Some(ctx.header()),
                            compact_revision,
                            canceled: true,
                            cancel_reason: format!(
                                "the requested start revision has been compacted; watch again from revision {} or later",
                                compact_revision + 1
                            ),
                            ..Default::default()
                        };
                        break;
                    }
                    WatchEvents::Reset { revision } => {
                        yield pb::WatchResponse {
                            header: Some(ctx.header()),
                            canceled: true,
                            cancel_reason: format!(
                                "this master replaced its state with a snapshot from the leader; watch again from revision {revision}"
                            ),
                            ..Default::default()
                        };
                        break;
                    }
                }
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }
}

#[cfg(test)]
mod tests {
    use berth_types::{DeleteRange, Put, RangeQuery, RequestOp, Txn};

    use super::refuse_reserved as refuse;
    use crate::authz::Caller;

    fn refuse_reserved(txn: &Txn) -> Result<(), tonic::Status> {
        refuse(txn, &Caller { identity: berth_pki::Identity::user("u") }, false)
    }

    fn put(key: &str) -> Txn {
        Txn {
            success: vec![RequestOp::Put(Put { key: key.into(), value: vec![], prev_kv: false })],
            ..Default::default()
        }
    }

    fn del(key: &str, end: &[u8]) -> Txn {
        Txn {
            failure: vec![RequestOp::DeleteRange(DeleteRange {
                key: key.into(),
                range_end: end.to_vec(),
                prev_kv: false,
            })],
            ..Default::default()
        }
    }

    #[test]
    fn kv_writes_cannot_touch_berths_records() {
        assert!(refuse_reserved(&put("/berth/tokens/x")).unwrap_err().message().contains("berth's own records"));
        assert!(refuse_reserved(&put("/berthday")).is_ok());
        assert!(refuse_reserved(&put("app/x")).is_ok());
        assert!(refuse_reserved(&del("/berth/nodes/a", b"")).is_err());
        assert!(refuse_reserved(&del("/a", b"/c")).is_err(), "a range over the prefix");
        assert!(refuse_reserved(&del("/", b"\0")).is_err(), "everything from '/'");
        assert!(refuse_reserved(&del("/berth/", b"/berth0")).is_err());
        assert!(refuse_reserved(&del("app/", b"app0")).is_ok());
        assert!(refuse_reserved(&del("/berth0", b"\0")).is_ok(), "after the prefix");
        assert!(refuse_reserved(&del("/a", b"/berth/")).is_ok(), "ends where the prefix starts");
    }

    #[test]
    fn only_a_cluster_admin_reads_berths_records() {
        let read = |key: &str, end: &[u8]| Txn {
            success: vec![RequestOp::Range(RangeQuery {
                key: key.into(),
                range_end: end.to_vec(),
                ..Default::default()
            })],
            ..Default::default()
        };
        let user = Caller { identity: berth_pki::Identity::user("u") };
        let e = refuse(&read("/berth/tokens/", b"/berth/tokens0"), &user, false).unwrap_err();
        assert!(
            e.message().contains("user/u may not read") && e.message().contains("cluster-admin"),
            "{}",
            e.message()
        );
        assert!(refuse(&read("/", b"\0"), &user, false).is_err(), "everything from '/'");
        assert!(refuse(&read("app/x", b""), &user, false).is_ok());
        assert!(refuse(&read("/berth/tokens/", b"/berth/tokens0"), &user, true).is_ok());
    }
}
