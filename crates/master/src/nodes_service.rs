//! The Nodes API: bootstrap tokens and the hosts that joined with them.

use std::sync::Arc;

use berth_api::pb::{self, JoinTokenRecord, Node, NodeAvailability, NodeStatus, nodes_server::Nodes};
use berth_pki::token::JoinToken;
use berth_types::spec::access::{Resource, Verb};
use berth_types::{Command, CommandResult};
use tonic::{Request, Response, Status};
use tracing::info;

use crate::{
    node::Ctx,
    objects::{self, NODES_PREFIX, TOKENS_PREFIX},
};

pub(crate) struct NodesService {
    pub ctx: Arc<Ctx>,
}

fn check_txn(r: CommandResult, what: &str) -> Result<(), Status> {
    match r {
        CommandResult::Txn(t) if t.succeeded => Ok(()),
        CommandResult::Txn(_) => Err(Status::aborted(format!("{what} changed concurrently; run the command again"))),
        other => Err(Status::internal(format!("unexpected result {other:?}"))),
    }
}

fn validate_label(k: &str, v: &str) -> Result<(), Status> {
    label_problem(k, v).map_err(Status::invalid_argument)
}

/// Whether `k=v` is a valid node label (for tokens, `node update` and joining agents alike).
pub(crate) fn label_problem(k: &str, v: &str) -> Result<(), String> {
    let ok = |s: &str, max: usize| {
        s.len() <= max && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
    };
    if k.is_empty() || !ok(k, 63) || !ok(v, 63) {
        return Err(format!(
            "label {k}={v} is not valid: keys and values are up to 63 letters, digits, '-', '_', '.' or '/'"
        ));
    }
    Ok(())
}

/// The most hosts one token may admit (a count, not "unlimited": that is 0).
pub(crate) const MAX_TOKEN_USES: u64 = 1_000_000;
/// The longest a token may stay valid: 10 years.
pub(crate) const MAX_TOKEN_TTL_SECONDS: u64 = 10 * 366 * 24 * 3600;

impl NodesService {
    async fn token_create_call(
        &self,
        r: Request<pb::TokenCreateRequest>,
    ) -> Result<Response<pb::TokenCreateResponse>, Status> {
        let r = r.into_inner();
        for (k, v) in &r.labels {
            validate_label(k, v)?;
        }
        if r.description.len() > 256 {
            return Err(Status::invalid_argument("the description is longer than 256 characters"));
        }
        if r.uses > MAX_TOKEN_USES {
            return Err(Status::invalid_argument(format!(
                "uses {} is more than {MAX_TOKEN_USES}: give a smaller number, or 0 for a token any number of hosts may use",
                r.uses
            )));
        }
        if r.ttl_seconds > MAX_TOKEN_TTL_SECONDS {
            return Err(Status::invalid_argument(format!(
                "ttl {} s is more than 10 years ({MAX_TOKEN_TTL_SECONDS} s): give a shorter one, or 0 for a token that never expires",
                r.ttl_seconds
            )));
        }
        let token = JoinToken::generate(self.ctx.pki.digest());
        let now = objects::now_ms();
        // Both fit: checked above.
        let ttl_ms = i64::try_from(r.ttl_seconds).unwrap_or(i64::MAX).saturating_mul(1000);
        let record = JoinTokenRecord {
            id: token.id.clone(),
            secret_sha256: token.secret_hash(),
            expires_at_ms: if r.ttl_seconds == 0 { 0 } else { now.saturating_add(ttl_ms) },
            uses_left: if r.uses == 0 { -1 } else { i64::try_from(r.uses).unwrap_or(MAX_TOKEN_USES as i64) },
            labels: r.labels,
            description: r.description,
            created_at_ms: now,
            revoked: false,
        };
        let txn =
            objects::txn_of(vec![objects::cas_put(objects::token_key(&token.id), 0, objects::encode_token(&record))]);
        check_txn(self.ctx.write(Command::Txn(txn)).await?, "the token")?;
        info!(token = %token.id, "join token created");
        Ok(Response::new(pb::TokenCreateResponse {
            header: Some(self.ctx.header()),
            token: token.encode(),
            record: Some(JoinTokenRecord { secret_sha256: String::new(), ..record }),
        }))
    }

    async fn token_list_call(
        &self,
        _r: Request<pb::TokenListRequest>,
    ) -> Result<Response<pb::TokenListResponse>, Status> {
        self.ctx.read_barrier().await?;
        let tokens = objects::list::<JoinTokenRecord>(&self.ctx.reader, TOKENS_PREFIX)?
            .into_iter()
            .map(|t| JoinTokenRecord { secret_sha256: String::new(), ..t.obj })
            .collect();
        Ok(Response::new(pb::TokenListResponse { header: Some(self.ctx.header()), tokens }))
    }

    async fn token_revoke_call(
        &self,
        r: Request<pb::TokenRevokeRequest>,
    ) -> Result<Response<pb::TokenRevokeResponse>, Status> {
        let id = r.into_inner().id;
        self.ctx.read_barrier().await?;
        let Some(t) = objects::get::<JoinTokenRecord>(&self.ctx.reader, &objects::token_key(&id))? else {
            return Err(Status::not_found(format!("no token with id {id:?}: see `berth token list`")));
        };
        let rec = JoinTokenRecord { revoked: true, ..t.obj };
        let txn = objects::txn_of(vec![objects::cas_put(
            objects::token_key(&id),
            t.mod_revision,
            objects::encode_token(&rec),
        )]);
        check_txn(self.ctx.write(Command::Txn(txn)).await?, "the token")?;
        info!(token = %id, "join token revoked");
        Ok(Response::new(pb::TokenRevokeResponse { header: Some(self.ctx.header()) }))
    }

    async fn node_list_call(&self, r: Request<pb::NodeListRequest>) -> Result<Response<pb::NodeListResponse>, Status> {
        // Heartbeat ages live in the leader's memory: ask the leader.
        if !self.ctx.is_leader()
            && let Some((_, addr)) = self.ctx.leader()
        {
            let ch = self.ctx.peers.channel(&addr).map_err(Status::unavailable)?;
            let mut client = pb::nodes_client::NodesClient::new(ch).max_decoding_message_size(64 << 20);
            return client.node_list(r.into_inner()).await;
        }
        self.ctx.read_barrier().await?;
        let nodes = objects::list::<Node>(&self.ctx.reader, NODES_PREFIX)?
            .into_iter()
            .map(|n| {
                let (age, connected) =
                    if self.ctx.is_leader() { self.ctx.liveness.info(&n.obj.id) } else { (-1, false) };
                pb::NodeInfo { node: Some(n.obj), last_heartbeat_age_ms: age, connected }
            })
            .collect();
        Ok(Response::new(pb::NodeListResponse { header: Some(self.ctx.header()), nodes }))
    }

    async fn node_update_call(
        &self,
        r: Request<pb::NodeUpdateRequest>,
    ) -> Result<Response<pb::NodeUpdateResponse>, Status> {
        let r = r.into_inner();
        for (k, v) in &r.label_add {
            validate_label(k, v)?;
        }
        if let Some(a) = r.availability
            && NodeAvailability::try_from(a).is_err()
        {
            return Err(Status::invalid_argument(format!("unknown availability {a}")));
        }
        self.ctx.read_barrier().await?;
        let Some(n) = objects::find_node(&self.ctx.reader, &r.node)? else {
            return Err(Status::not_found(format!("no node named {:?}: see `berth get nodes`", r.node)));
        };
        let mut node = n.obj.clone();
        for k in &r.label_rm {
            node.labels.remove(k);
        }
        node.labels.extend(r.label_add);
        if let Some(a) = r.availability {
            node.availability = a;
        }
        let txn = objects::txn_of(vec![objects::cas_put(
            objects::node_key(&node.id),
            n.mod_revision,
            objects::encode_node(&node),
        )]);
        check_txn(self.ctx.write(Command::Txn(txn)).await?, "the node")?;
        Ok(Response::new(pb::NodeUpdateResponse { header: Some(self.ctx.header()), node: Some(node) }))
    }

    async fn node_remove_call(
        &self,
        r: Request<pb::NodeRemoveRequest>,
    ) -> Result<Response<pb::NodeRemoveResponse>, Status> {
        let r = r.into_inner();
        self.ctx.read_barrier().await?;
        let Some(n) = objects::find_node(&self.ctx.reader, &r.node)? else {
            return Err(Status::not_found(format!("no node named {:?}: see `berth get nodes`", r.node)));
        };
        if n.obj.status() == NodeStatus::Ready && !r.force {
            return Err(Status::failed_precondition(format!(
                "node {} is ready: stop its agent first, or pass --force to remove it anyway (its agent will be \
                 refused from then on)",
                n.obj.name
            )));
        }
        // The node (if unchanged since read), its name in the index and its address blocks, together.
        let mut parts = vec![objects::cas_delete(objects::node_key(&n.obj.id), n.mod_revision)];
        parts.extend(crate::networks::release_blocks(&self.ctx.reader, &n.obj.id)?);
        let mut txn = objects::txn_of(parts);
        txn.success.push(objects::delete(objects::node_name_key(&n.obj.name)));
        check_txn(self.ctx.write(Command::Txn(txn)).await?, "the node")?;
        crate::dispatcher::end_session(&self.ctx, &n.obj.id);
        info!(node = %n.obj.id, name = %n.obj.name, "node removed");
        Ok(Response::new(pb::NodeRemoveResponse { header: Some(self.ctx.header()) }))
    }
}

#[tonic::async_trait]
impl Nodes for NodesService {
    async fn token_create(
        &self,
        r: Request<pb::TokenCreateRequest>,
    ) -> Result<Response<pb::TokenCreateResponse>, Status> {
        let caller = crate::authz::Caller::of(&r)?;
        let name: String = String::new();
        crate::audit::mutate(&self.ctx, &caller, Verb::Create, Resource::Tokens, None, &name, self.token_create_call(r))
            .await
    }

    async fn token_list(&self, r: Request<pb::TokenListRequest>) -> Result<Response<pb::TokenListResponse>, Status> {
        let caller = crate::authz::Caller::of(&r)?;
        crate::audit::authorize(&self.ctx, &caller, Verb::List, Resource::Tokens, None, "").await?;
        self.token_list_call(r).await
    }

    async fn token_revoke(
        &self,
        r: Request<pb::TokenRevokeRequest>,
    ) -> Result<Response<pb::TokenRevokeResponse>, Status> {
        let caller = crate::authz::Caller::of(&r)?;
        let name: String = r.get_ref().id.clone();
        crate::audit::mutate(&self.ctx, &caller, Verb::Delete, Resource::Tokens, None, &name, self.token_revoke_call(r))
            .await
    }

    async fn node_list(&self, r: Request<pb::NodeListRequest>) -> Result<Response<pb::NodeListResponse>, Status> {
        let caller = crate::authz::Caller::of(&r)?;
        crate::audit::authorize(&self.ctx, &caller, Verb::List, Resource::Nodes, None, "").await?;
        self.node_list_call(r).await
    }

    async fn node_update(&self, r: Request<pb::NodeUpdateRequest>) -> Result<Response<pb::NodeUpdateResponse>, Status> {
        let caller = crate::authz::Caller::of(&r)?;
        let name: String = r.get_ref().node.clone();
        crate::audit::mutate(&self.ctx, &caller, Verb::Update, Resource::Nodes, None, &name, self.node_update_call(r))
            .await
    }

    async fn node_remove(&self, r: Request<pb::NodeRemoveRequest>) -> Result<Response<pb::NodeRemoveResponse>, Status> {
        let caller = crate::authz::Caller::of(&r)?;
        let name: String = r.get_ref().node.clone();
        crate::audit::mutate(&self.ctx, &caller, Verb::Delete, Resource::Nodes, None, &name, self.node_remove_call(r))
            .await
    }
}
