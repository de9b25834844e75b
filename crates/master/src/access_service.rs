//! The Access API: users (`berth user add|ls|rm`), roles and bindings (`berth role ls|rm`; they
//! are applied as documents), and the audit log (`berth audit`).

use std::{pin::Pin, sync::Arc, time::Duration};

use berth_api::pb::{self, access_server::Access};
use berth_types::{
    Command, CommandResult, DeleteRange, RequestOp,
    spec::access::{self, Resource, Verb},
};
use futures::Stream;
use tonic::{Request, Response, Status};
use tracing::info;

use crate::{
    audit,
    authz::{self, BINDINGS, Caller, ROLES, USERS, UserRecord},
    node::Ctx,
};

pub(crate) struct AccessService {
    pub ctx: Arc<Ctx>,
}

/// A user's certificate lives a year unless asked otherwise; at most ten.
const DEFAULT_USER_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
const MAX_USER_VALIDITY: Duration = Duration::from_secs(10 * 366 * 24 * 3600);

/// The binding `berth user add` makes for a user's role.
fn user_binding(name: &str) -> String {
    format!("user-{name}")
}

pub(crate) fn txn_ok(r: CommandResult, what: &str) -> Result<i64, Status> {
    match r {
        CommandResult::Txn(t) if t.succeeded => Ok(t.revision),
        CommandResult::Txn(_) => Err(Status::aborted(format!("{what} changed concurrently; run the command again"))),
        other => Err(Status::internal(format!("unexpected result {other:?}"))),
    }
}

/// The serial of a certificate (PEM) the masters just issued.
fn serial_of(cert_pem: &str) -> Result<String, Status> {
    let der = berth_pki::CertifiedKey::new(cert_pem.to_string(), String::new())
        .cert_der()
        .map_err(|e| Status::internal(e.to_string()))?;
    Ok(berth_pki::cert_info_of_der(&der).map_err(|e| Status::internal(e.to_string()))?.serial)
}

/// The write that adds a certificate's serial to user `name`'s record (so that `berth user rm`
/// revokes it too), comparing the record as read now.
pub(crate) fn add_serial(ctx: &Ctx, name: &str, cert_pem: &str) -> Result<(berth_types::Compare, RequestOp), Status> {
    let key = format!("{USERS}{name}");
    let Some(kv) = ctx.reader.get(key.as_bytes()).map_err(|e| Status::internal(e.to_string()))? else {
        return Err(Status::not_found(format!("there is no user {name:?} (see `berth user ls`)")));
    };
    let mut rec: UserRecord = serde_json::from_slice(&kv.value)
        .map_err(|e| Status::data_loss(format!("the record of user {name} does not parse: {e}")))?;
    rec.serials.push(serial_of(cert_pem)?);
    Ok(crate::objects::cas_put(
        key.into_bytes(),
        kv.mod_revision,
        serde_json::to_vec(&rec).expect("a user record serializes"),
    ))
}

impl AccessService {
    /// `berth user add NAME --renew`: another certificate for an existing user, from the CA that
    /// signs now; its bindings stay as they are.
    async fn user_renew_call(&self, r: pb::UserAddRequest, validity: Duration) -> Result<pb::UserAddResponse, Status> {
        self.ctx.read_barrier().await?;
        let Some(ca) = self.ctx.pki.ca() else {
            return Err(berth_api::not_applied("this master does not hold the CA key yet; ask another master"));
        };
        let cert_pem = ca
            .sign_csr_with(&r.csr_pem, &berth_pki::Identity::user(&r.name), &[], &[], validity)
            .map_err(|e| Status::invalid_argument(format!("the certificate signing request: {e}")))?;
        let part = add_serial(&self.ctx, &r.name, &cert_pem)?;
        txn_ok(self.ctx.write(Command::Txn(crate::objects::txn_of(vec![part]))).await?, "the user")?;
        let serial = serial_of(&cert_pem)?;
        info!(user = r.name, serial, "user certificate renewed");
        Ok(pb::UserAddResponse {
            header: Some(self.ctx.header()),
            cert_pem,
            ca_pem: self.ctx.pki.ca_pem(),
            serial,
            binding: String::new(),
        })
    }

    async fn user_add_call(&self, caller: &Caller, r: pb::UserAddRequest) -> Result<pb::UserAddResponse, Status> {
        access::check_user_name("name", &r.name).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let namespace = (!r.namespace.is_empty()).then(|| r.namespace.clone());
        let binding = access::RoleBinding {
            kind: berth_types::spec::Kind::RoleBinding,
            metadata: access::ClusterMetadata { name: user_binding(&r.name) },
            spec: access::BindingSpec { role: r.role.clone(), users: vec![r.name.clone()], namespace },
        };
        binding.validate().map_err(|e| Status::invalid_argument(e.to_string()))?;
        if r.csr_pem.trim().is_empty() {
            return Err(Status::invalid_argument(
                "no certificate signing request: the user's key is made where the user works (`berth user add` \
                 does that, or give --csr FILE), and only its CSR is sent",
            ));
        }
        let validity = match r.validity_secs {
            0 => DEFAULT_USER_VALIDITY,
            s => Duration::from_secs(s),
        };
        if validity > MAX_USER_VALIDITY {
            return Err(Status::invalid_argument("a user's certificate is valid for 10 years at most"));
        }
        if r.renew {
            return self.user_renew_call(r, validity).await;
        }
        self.ctx.read_barrier().await?;
        let user_key = format!("{USERS}{}", r.name);
        if self.ctx.reader.get(user_key.as_bytes()).map_err(|e| Status::internal(e.to_string()))?.is_some() {
            return Err(Status::already_exists(format!(
                "user {} exists: remove it first (`berth user rm {}`), or bind it to more roles with a `kind: \
                 RoleBinding`",
                r.name, r.name
            )));
        }
        // The role must exist, and the caller must hold what it gives (checked as for a binding).
        let plan = authz::plan_access(&self.ctx, caller, &[], &[&binding])?;
        let Some(ca) = self.ctx.pki.ca() else {
            return Err(berth_api::not_applied("this master does not hold the CA key yet; ask another master"));
        };
        let identity = berth_pki::Identity::user(&r.name);
        let cert_pem = ca
            .sign_csr_with(&r.csr_pem, &identity, &[], &[], validity)
            .map_err(|e| Status::invalid_argument(format!("the certificate signing request: {e}")))?;
        let serial = serial_of(&cert_pem)?;
        let rec = UserRecord {
            name: r.name.clone(),
            created_ms: crate::objects::now_ms(),
            by: caller.identity.to_string(),
            serials: vec![serial.clone()],
        };
        let mut parts = vec![crate::objects::cas_put(
            user_key.into_bytes(),
            0,
            serde_json::to_vec(&rec).expect("a user record serializes"),
        )];
        parts.extend(plan.parts);
        let txn = crate::objects::txn_of(parts);
        txn_ok(self.ctx.write(Command::Txn(txn)).await?, "the user or its binding")?;
        info!(user = r.name, role = r.role, namespace = r.namespace, serial, "user added");
        Ok(pb::UserAddResponse {
            header: Some(self.ctx.header()),
            cert_pem,
            ca_pem: self.ctx.pki.ca_pem(),
            serial,
            binding: binding.metadata.name,
        })
    }

    async fn user_remove_call(&self, r: pb::UserRemoveRequest) -> Result<pb::UserRemoveResponse, Status> {
        self.ctx.read_barrier().await?;
        let key = format!("{USERS}{}", r.name);
        let Some(kv) = self.ctx.reader.get(key.as_bytes()).map_err(|e| Status::internal(e.to_string()))? else {
            return Err(Status::not_found(format!("there is no user {:?} (see `berth user ls`)", r.name)));
        };
        let rec: UserRecord = serde_json::from_slice(&kv.value)
            .map_err(|e| Status::data_loss(format!("the record of user {} does not parse: {e}", r.name)))?;
        let mut parts = vec![(
            berth_types::Compare {
                key: key.clone().into_bytes(),
                op: berth_types::CompareOp::Equal,
                target: berth_types::CompareTarget::ModRevision(kv.mod_revision),
            },
            RequestOp::DeleteRange(DeleteRange { key: key.into_bytes(), range_end: vec![], prev_kv: false }),
        )];
        // Its certificates are revoked by serial (not by identity, so that the name can be given
        // to someone new later), in the same transaction.
        let now = crate::objects::now_ms();
        for serial in &rec.serials {
            let rev = crate::revocation::Revocation {
                at_ms: now,
                by: "berth user rm".into(),
                reason: format!("user {} was removed", rec.name),
            };
            let key = crate::revocation::Target::Serial(serial.clone()).key().into_bytes();
            // A serial already revoked by hand keeps its record.
            if self.ctx.reader.get(&key).map_err(|e| Status::internal(e.to_string()))?.is_none() {
                parts.push(crate::objects::cas_put(key, 0, serde_json::to_vec(&rev).expect("a revocation serializes")));
            }
        }
        // Bindings that named only this user go; the others lose the name.
        let (_, bindings) = authz::read_documents(&self.ctx.reader).map_err(Status::internal)?;
        let mut gone = Vec::new();
        for mut b in bindings.into_iter().filter(|b| b.spec.users.contains(&rec.name)) {
            let bkey = format!("{BINDINGS}{}", b.metadata.name).into_bytes();
            let Some(cur) = self.ctx.reader.get(&bkey).map_err(|e| Status::internal(e.to_string()))? else {
                continue;
            };
            b.spec.users.retain(|u| u != &rec.name);
            let cmp = berth_types::Compare {
                key: bkey.clone(),
                op: berth_types::CompareOp::Equal,
                target: berth_types::CompareTarget::ModRevision(cur.mod_revision),
            };
            if b.spec.users.is_empty() {
                gone.push(b.metadata.name.clone());
                parts.push((cmp, RequestOp::DeleteRange(DeleteRange { key: bkey, range_end: vec![], prev_kv: false })));
            } else {
                parts.push((
                    cmp,
                    RequestOp::Put(berth_types::Put {
                        key: bkey,
                        value: b.canonical_json().into_bytes(),
                        prev_kv: false,
                    }),
                ));
            }
        }
        let txn = crate::objects::txn_of(parts);
        txn_ok(self.ctx.write(Command::Txn(txn)).await?, "the user")?;
        info!(user = rec.name, revoked = ?rec.serials, "user removed");
        Ok(pb::UserRemoveResponse { header: Some(self.ctx.header()), revoked: rec.serials, bindings: gone })
    }

    async fn role_delete_call(&self, r: pb::RoleDeleteRequest) -> Result<pb::RoleDeleteResponse, Status> {
        let prefix = match r.kind.as_str() {
            "Role" | "role" => ROLES,
            "RoleBinding" | "rolebinding" | "binding" => BINDINGS,
            other => {
                return Err(Status::invalid_argument(format!("kind {other:?}: expected Role or RoleBinding")));
            }
        };
        if prefix == ROLES && access::BUILTIN_ROLES.contains(&r.name.as_str()) {
            return Err(Status::invalid_argument(format!("{} is a built-in role: it cannot be deleted", r.name)));
        }
        if prefix == ROLES {
            let (_, bindings) = authz::read_documents(&self.ctx.reader).map_err(Status::internal)?;
            let users: Vec<&str> =
                bindings.iter().filter(|b| b.spec.role == r.name).map(|b| b.metadata.name.as_str()).collect();
            if !users.is_empty() {
                return Err(Status::failed_precondition(format!(
                    "role {} is bound by {}: delete or change those bindings first",
                    r.name,
                    users.join(", ")
                )));
            }
        }
        let key = format!("{prefix}{}", r.name).into_bytes();
        let txn = berth_types::Txn {
            compare: vec![],
            success: vec![RequestOp::DeleteRange(DeleteRange { key, range_end: vec![], prev_kv: false })],
            failure: vec![],
        };
        let deleted = match self.ctx.write(Command::Txn(txn)).await? {
            CommandResult::Txn(t) => {
                matches!(t.responses.first(), Some(berth_types::OpResult::DeleteRange(d)) if d.deleted > 0)
            }
            other => return Err(Status::internal(format!("unexpected result {other:?}"))),
        };
        if !deleted {
            return Err(Status::not_found(format!("there is no {} {:?} (see `berth role ls`)", r.kind, r.name)));
        }
        Ok(pb::RoleDeleteResponse { header: Some(self.ctx.header()), deleted })
    }
}

fn rule_view(rule: &access::Rule) -> pb::RoleRule {
    pb::RoleRule { verbs: rule.verbs.clone(), resources: rule.resources.clone() }
}

fn entry(rec: berth_types::AuditRecord) -> pb::AuditEntry {
    pb::AuditEntry {
        at_ms: rec.at_ms,
        identity: rec.identity,
        verb: rec.verb,
        resource: rec.resource,
        namespace: rec.namespace,
        name: rec.name,
        outcome: rec.outcome,
        revision: rec.revision,
        master: rec.master,
        seq: rec.seq,
    }
}

type AuditStream = Pin<Box<dyn Stream<Item = Result<pb::AuditEntry, Status>> + Send>>;

#[tonic::async_trait]
impl Access for AccessService {
    async fn user_add(&self, r: Request<pb::UserAddRequest>) -> Result<Response<pb::UserAddResponse>, Status> {
        let caller = Caller::of(&r)?;
        let r = r.into_inner();
        let name = r.name.clone();
        audit::mutate(&self.ctx, &caller, Verb::Create, Resource::Users, None, &name, self.user_add_call(&caller, r))
            .await
            .map(Response::new)
    }

    async fn ca_rotate(&self, r: Request<pb::CaRotateRequest>) -> Result<Response<pb::CaRotateResponse>, Status> {
        let caller = Caller::of(&r)?;
        let r = r.into_inner();
        let call = crate::ca_rotation::start(&self.ctx, &caller, &r.csr_pem);
        audit::mutate(&self.ctx, &caller, Verb::Create, Resource::Certificates, None, "ca", call)
            .await
            .map(Response::new)
    }

    async fn ca_status(&self, r: Request<pb::CaStatusRequest>) -> Result<Response<pb::CaStatusResponse>, Status> {
        let caller = Caller::of(&r)?;
        audit::authorize(&self.ctx, &caller, Verb::Get, Resource::Certificates, None, "ca").await?;
        self.ctx.read_barrier().await?;
        crate::ca_rotation::status(&self.ctx).map(Response::new)
    }

    async fn user_list(&self, r: Request<pb::UserListRequest>) -> Result<Response<pb::UserListResponse>, Status> {
        let caller = Caller::of(&r)?;
        audit::authorize(&self.ctx, &caller, Verb::List, Resource::Users, None, "").await?;
        self.ctx.read_barrier().await?;
        let users = authz::read_users(&self.ctx.reader)
            .map_err(Status::internal)?
            .into_iter()
            .map(|u| pb::UserView {
                bindings: self
                    .ctx
                    .rbac
                    .bindings_of(&u.name)
                    .into_iter()
                    .map(|(binding, role, ns)| pb::UserBinding { binding, role, namespace: ns.unwrap_or_default() })
                    .collect(),
                name: u.name,
                created_ms: u.created_ms,
                by: u.by,
                serials: u.serials,
            })
            .collect();
        Ok(Response::new(pb::UserListResponse { header: Some(self.ctx.header()), users }))
    }

    async fn user_remove(&self, r: Request<pb::UserRemoveRequest>) -> Result<Response<pb::UserRemoveResponse>, Status> {
        let caller = Caller::of(&r)?;
        let r = r.into_inner();
        if caller.identity == berth_pki::Identity::user(&r.name) {
            return Err(Status::failed_precondition(format!(
                "{} is the identity of this request: removing it would lock you out; remove it with another \
                 cluster-admin's certificate",
                caller.identity
            )));
        }
        let name = r.name.clone();
        audit::mutate(&self.ctx, &caller, Verb::Delete, Resource::Users, None, &name, self.user_remove_call(r))
            .await
            .map(Response::new)
    }

    async fn role_list(&self, r: Request<pb::RoleListRequest>) -> Result<Response<pb::RoleListResponse>, Status> {
        let caller = Caller::of(&r)?;
        audit::authorize(&self.ctx, &caller, Verb::List, Resource::Roles, None, "").await?;
        self.ctx.read_barrier().await?;
        let (custom, bindings) = authz::read_documents(&self.ctx.reader).map_err(Status::internal)?;
        let mut roles: Vec<pb::RoleView> = access::BUILTIN_ROLES
            .iter()
            .map(|n| pb::RoleView {
                name: n.to_string(),
                builtin: true,
                rules: authz::builtin(n).unwrap_or_default().iter().map(rule_view).collect(),
            })
            .collect();
        roles.extend(custom.iter().map(|r| pb::RoleView {
            name: r.metadata.name.clone(),
            builtin: false,
            rules: r.spec.rules.iter().map(rule_view).collect(),
        }));
        let bindings = bindings
            .into_iter()
            .map(|b| pb::BindingView {
                name: b.metadata.name,
                role: b.spec.role,
                users: b.spec.users,
                namespace: b.spec.namespace.unwrap_or_default(),
            })
            .collect();
        Ok(Response::new(pb::RoleListResponse { header: Some(self.ctx.header()), roles, bindings }))
    }

    async fn role_delete(&self, r: Request<pb::RoleDeleteRequest>) -> Result<Response<pb::RoleDeleteResponse>, Status> {
        let caller = Caller::of(&r)?;
        let r = r.into_inner();
        let name = format!("{} {}", r.kind, r.name);
        audit::mutate(&self.ctx, &caller, Verb::Delete, Resource::Roles, None, &name, self.role_delete_call(r))
            .await
            .map(Response::new)
    }

    type AuditStream = AuditStream;

    async fn audit(&self, r: Request<pb::AuditRequest>) -> Result<Response<Self::AuditStream>, Status> {
        let caller = Caller::of(&r)?;
        let slot = self.ctx.streams.open(&r, "watch", crate::streams::MAX_WATCHES)?;
        let r = r.into_inner();
        // A namespace's admins read its records; the cluster's own need rights everywhere.
        let scope = audit::namespaces(&self.ctx, &caller, Verb::List, Resource::Audit).await?;
        if !r.identity.is_empty() {
            r.identity
                .parse::<berth_pki::Identity>()
                .map_err(|e| Status::invalid_argument(format!("--identity {:?}: {e}", r.identity)))?;
        }
        self.ctx.read_barrier().await?;
        // Following from before the records so far are read, so that none falls between.
        let next = self.ctx.reader.audit_next().map_err(|e| Status::internal(e.to_string()))?;
        let mut follower = r.follow.then(|| audit::Follower::new(&self.ctx.reader, next));
        let records = audit::read(&self.ctx.reader, r.since_ms)?;
        if let (Some(f), Some(last)) = (follower.as_mut(), records.last()) {
            f.skip_to(last.seq + 1);
        }
        let wanted = move |rec: &berth_types::AuditRecord| {
            rec.at_ms >= r.since_ms
                && (r.identity.is_empty() || rec.identity == r.identity)
                && match &scope {
                    authz::Namespaces::All => true,
                    only => !rec.namespace.is_empty() && only.allows(&rec.namespace),
                }
        };
        let out = async_stream::try_stream! {
            let _slot = slot;
            for rec in records.into_iter().filter(|r| wanted(r)) {
                yield entry(rec);
            }
            if let Some(follower) = follower.as_mut() {
                loop {
                    let Some(records) = follower.next().await? else {
                        Err(Status::unavailable("this master is stopping: run `berth audit -f` again"))?;
                        break;
                    };
                    for rec in records.iter().filter(|r| wanted(r)) {
                        yield entry(rec.clone());
                    }
                }
            }
        };
        Ok(Response::new(Box::pin(out)))
    }

    async fn console_token_create(
        &self,
        r: Request<pb::ConsoleTokenCreateRequest>,
    ) -> Result<Response<pb::ConsoleTokenCreateResponse>, Status> {
        let caller = Caller::of(&r)?;
        let r = r.into_inner();
        let name = if r.user.is_empty() { caller.identity.to_string() } else { r.user.clone() };
        let call = crate::console::tokens::create(&self.ctx, &caller, r);
        audit::mutate(&self.ctx, &caller, Verb::Create, Resource::Users, None, &name, call).await.map(Response::new)
    }

    async fn console_token_list(
        &self,
        r: Request<pb::ConsoleTokenListRequest>,
    ) -> Result<Response<pb::ConsoleTokenListResponse>, Status> {
        let caller = Caller::of(&r)?;
        audit::authorize(&self.ctx, &caller, Verb::List, Resource::Users, None, "").await?;
        crate::console::tokens::list(&self.ctx).await.map(Response::new)
    }

    async fn console_token_revoke(
        &self,
        r: Request<pb::ConsoleTokenRevokeRequest>,
    ) -> Result<Response<pb::ConsoleTokenRevokeResponse>, Status> {
        let caller = Caller::of(&r)?;
        let id = r.into_inner().id;
        let call = crate::console::tokens::revoke(&self.ctx, &id);
        audit::mutate(&self.ctx, &caller, Verb::Delete, Resource::Users, None, &id, call).await.map(Response::new)
    }
}
