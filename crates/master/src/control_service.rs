//! ControlService: services and tasks for clients (`berth apply`, `get`, `describe`, `scale`,
//! `rollout`, `delete`, `logs`). Writes are conditional transactions on the service record's
//! mod_revision; the leader's controllers do the rest.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    pin::Pin,
    sync::Arc,
};

use berth_api::pb::{
    self, Rollout, RolloutAction, RolloutState, ServiceRecord, ServiceView, Task,
    agent::{AgentFrame, LogsQuery, MasterFrame, TaskState, agent_frame, master_frame},
    control_service_server::ControlService,
};
use berth_channel::{FrameReader, FrameWriter};
use berth_types::{
    Command, CommandResult, event,
    spec::{self, Document, Service, ServiceMode},
};
use futures::Stream;
use prost::Message;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};
use tracing::info;

use berth_types::spec::access::{Resource, Verb};

use crate::{
    authz::{Caller, Namespaces},
    networks,
    node::Ctx,
    objects::{self, Versioned},
    tasks::{self, SERVICES_PREFIX, Svc, TASKS_PREFIX},
};

pub(crate) struct ControlSvc {
    pub ctx: Arc<Ctx>,
}

type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn check_txn(r: CommandResult, what: &str) -> Result<i64, Status> {
    match r {
        CommandResult::Txn(t) if t.succeeded => Ok(t.revision),
        CommandResult::Txn(_) => Err(Status::aborted(format!(
            "{what} changed while this request was being applied; read it again and retry"
        ))),
        other => Err(Status::internal(format!("unexpected result {other:?}"))),
    }
}

fn load_service(ctx: &Ctx, ns: &str, name: &str) -> Result<Versioned<ServiceRecord>, Status> {
    let ns = if ns.is_empty() { spec::DEFAULT_NAMESPACE } else { ns };
    objects::get::<ServiceRecord>(&ctx.reader, &tasks::service_key(ns, name))?
        .ok_or_else(|| Status::not_found(format!("no service {ns}/{name}: list services with `berth get services`")))
}

fn parse(r: &Versioned<ServiceRecord>) -> Result<Svc, Status> {
    Svc::parse(r.obj.clone(), r.mod_revision).map_err(Status::data_loss)
}

/// Top-level paths where two specs differ (for `apply` and `--dry-run`).
fn changes(old: Option<&str>, new: &str) -> Vec<String> {
    let Some(old) = old else { return vec!["(new service)".into()] };
    let (Ok(a), Ok(b)) =
        (serde_json::from_str::<serde_json::Value>(old), serde_json::from_str::<serde_json::Value>(new))
    else {
        return vec![];
    };
    let mut out = Vec::new();
    diff("", &a, &b, &mut out);
    out
}

fn diff(path: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value::Object;
    if out.len() >= 20 || a == b {
        return;
    }
    match (a, b) {
        (Object(x), Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                let null = serde_json::Value::Null;
                diff(&p, x.get(k).unwrap_or(&null), y.get(k).unwrap_or(&null), out);
            }
        }
        _ => out.push(format!("{path}: {a} -> {b}")),
    }
}

fn view(ctx: &Ctx, svc: &Svc, all_tasks: Option<&[Task]>) -> Result<ServiceView, Status> {
    let owned;
    let list = match all_tasks {
        Some(l) => l,
        None => {
            owned = service_tasks(ctx, &svc.record.namespace, &svc.record.name)?;
            &owned
        }
    };
    let live = |t: &&Task| tasks::desired_of(t) == TaskState::Running;
    let desired = if svc.record.deleting {
        0
    } else if svc.is_global() {
        list.iter().filter(live).count() as u32
    } else {
        svc.replicas()
    };
    let running = list
        .iter()
        .filter(live)
        .filter(|t| t.template_hash == svc.hash && tasks::is_ready(t, svc.has_health()))
        .count() as u32;
    let pending = list.iter().filter(live).filter(|t| t.node_id.is_empty()).count() as u32;
    Ok(ServiceView { record: Some(svc.record.clone()), mod_revision: svc.mod_revision, desired, running, pending })
}

fn service_tasks(ctx: &Ctx, ns: &str, name: &str) -> Result<Vec<Task>, Status> {
    Ok(objects::list::<Task>(&ctx.reader, &format!("{TASKS_PREFIX}{name}."))?
        .into_iter()
        .map(|t| t.obj)
        .filter(|t| t.namespace == ns && t.service == name)
        .collect())
}

fn new_rollout(now: i64, state: RolloutState, message: String) -> Option<Rollout> {
    Some(Rollout { state: state as i32, message, started_at_ms: now, updated_at_ms: 0, failures: 0 })
}

impl ControlSvc {
    async fn write_record(&self, r: &ServiceRecord, expected: i64) -> Result<i64, Status> {
        self.write_record_with(r, expected, None).await
    }

    /// Writes the record and, with `event`, records that event of its rollout (with the
    /// rollout's message) in the same transaction.
    async fn write_record_with(&self, r: &ServiceRecord, expected: i64, event: Option<&str>) -> Result<i64, Status> {
        let key = tasks::service_key(&r.namespace, &r.name);
        let mut txn = objects::txn_of(vec![objects::cas_put(key, expected, r.encode_to_vec())]);
        if let Some(kind) = event {
            let message = r.rollout.as_ref().map(|ro| ro.message.clone()).unwrap_or_default();
            let e = crate::events::new(self.ctx.id, kind, "service", &r.namespace, &r.name, message);
            txn = crate::events::with(txn, &[e]);
        }
        check_txn(self.ctx.write(Command::Txn(txn)).await?, &format!("service {}/{}", r.namespace, r.name))
    }

    async fn respond(&self, ns: &str, name: &str) -> Result<Response<pb::ServiceResponse>, Status> {
        let rec = load_service(&self.ctx, ns, name)?;
        let svc = parse(&rec)?;
        Ok(Response::new(pb::ServiceResponse {
            header: Some(self.ctx.header()),
            service: Some(view(&self.ctx, &svc, None)?),
        }))
    }

    /// A new version of `svc` with `new_spec`, rolling out.
    async fn change_spec(&self, rec: &Versioned<ServiceRecord>, new_spec: &Service, why: &str) -> Result<(), Status> {
        let now = objects::now_ms();
        let mut r = rec.obj.clone();
        r.previous_spec_json = std::mem::replace(&mut r.spec_json, new_spec.canonical_json());
        r.previous_file_versions = r.file_versions.clone();
        r.previous_version = r.version;
        r.version += 1;
        r.updated_at_ms = now;
        r.rollout = new_rollout(now, RolloutState::Updating, format!("{why} (version {})", r.version));
        self.write_record_with(&r, rec.mod_revision, Some(event::ROLLOUT_STARTED)).await.map(|_| ())
    }
}

/// The namespace a request names, `default` when it names none.
fn ns_of(ns: &str) -> &str {
    if ns.is_empty() { spec::DEFAULT_NAMESPACE } else { ns }
}

/// The resource a document of `apply` is, and its namespace (None for the cluster's).
fn document_scope(doc: &Document) -> (Resource, Option<&str>) {
    match doc {
        Document::Service(s) => (Resource::Services, Some(&s.metadata.namespace)),
        Document::Network(n) => (Resource::Networks, Some(&n.metadata.namespace)),
        Document::Volume(v) => (Resource::Volumes, Some(&v.metadata.namespace)),
        Document::Route(r) => (Resource::Routes, Some(&r.metadata.namespace)),
        Document::Role(_) | Document::RoleBinding(_) => (Resource::Roles, None),
        Document::Namespace(_) => (Resource::Namespaces, None),
    }
}

fn file_resource(kind: spec::FileKind) -> Resource {
    match kind {
        spec::FileKind::Secret => Resource::Secrets,
        spec::FileKind::Config => Resource::Configs,
    }
}

impl ControlSvc {
    async fn scale_call(&self, r: pb::ScaleRequest) -> Result<Response<pb::ServiceResponse>, Status> {
        let s = r.service.unwrap_or_default();
        self.ctx.read_barrier().await?;
        let rec = load_service(&self.ctx, &s.namespace, &s.name)?;
        let svc = parse(&rec)?;
        if svc.spec.spec.mode == ServiceMode::Global {
            return Err(Status::failed_precondition(format!(
                "service {} is global (one task per eligible node); only replicated services scale",
                svc.key()
            )));
        }
        if r.replicas > spec::MAX_REPLICAS {
            return Err(Status::invalid_argument(format!(
                "replicas {} is over the limit of {}",
                r.replicas,
                spec::MAX_REPLICAS
            )));
        }
        if svc.spec.spec.replicas != Some(r.replicas) {
            let mut n = svc.spec.clone();
            n.spec.replicas = Some(r.replicas);
            crate::quotas::check_service_change(&self.ctx.reader, &svc.spec, &n)?;
            self.change_spec(&rec, &n, &format!("scaled to {}", r.replicas)).await?;
        }
        self.respond(&rec.obj.namespace, &rec.obj.name).await
    }

    async fn rollout_call(&self, r: pb::RolloutRequest) -> Result<Response<pb::ServiceResponse>, Status> {
        let s = r.service.unwrap_or_default();
        self.ctx.read_barrier().await?;
        let rec = load_service(&self.ctx, &s.namespace, &s.name)?;
        let now = objects::now_ms();
        let state = rec.obj.rollout.as_ref().map_or(RolloutState::Unspecified, |r| r.state());
        match RolloutAction::try_from(r.action).unwrap_or(RolloutAction::Unspecified) {
            RolloutAction::Status | RolloutAction::Unspecified => {}
            // Pausing a paused rollout and resuming a running one change nothing, so that a
            // client may send either again when it did not hear the first answer.
            RolloutAction::Pause if state == RolloutState::Paused => {}
            RolloutAction::Resume if matches!(state, RolloutState::Updating | RolloutState::RollingBack) => {}
            RolloutAction::Pause => {
                if !matches!(state, RolloutState::Updating | RolloutState::RollingBack) {
                    return Err(Status::failed_precondition(
                        "no rollout is in progress to pause: see `berth rollout status NAME`",
                    ));
                }
                let mut n = rec.obj.clone();
                if let Some(ro) = n.rollout.as_mut() {
                    ro.state = RolloutState::Paused as i32;
                    ro.message = "paused by `berth rollout pause`".into();
                    ro.updated_at_ms = now;
                }
                self.write_record_with(&n, rec.mod_revision, Some(event::ROLLOUT_PAUSED)).await?;
            }
            RolloutAction::Resume => {
                if state != RolloutState::Paused {
                    return Err(Status::failed_precondition(
                        "the rollout is not paused, so there is nothing to resume: see `berth rollout status NAME`",
                    ));
                }
                let mut n = rec.obj.clone();
                n.rollout =
                    new_rollout(now, RolloutState::Updating, format!("resumed: rolling out version {}", n.version));
                self.write_record_with(&n, rec.mod_revision, Some(event::ROLLOUT_RESUMED)).await?;
            }
            RolloutAction::Undo => {
                if rec.obj.previous_spec_json.is_empty() {
                    return Err(Status::failed_precondition("the service has no previous version to go back to"));
                }
                let mut n = rec.obj.clone();
                std::mem::swap(&mut n.spec_json, &mut n.previous_spec_json);
                std::mem::swap(&mut n.file_versions, &mut n.previous_file_versions);
                n.previous_version = n.version;
                n.version += 1;
                n.updated_at_ms = now;
                n.rollout = new_rollout(now, RolloutState::RollingBack, "undo: back to the previous spec".into());
                self.write_record_with(&n, rec.mod_revision, Some(event::ROLLBACK_STARTED)).await?;
            }
        }
        self.respond(&rec.obj.namespace, &rec.obj.name).await
    }

    async fn apply_call(
        &self,
        caller: &Caller,
        r: pb::ApplyRequest,
        documents: Vec<Document>,
    ) -> Result<Response<pb::ApplyResponse>, Status> {
        if r.expected_revision != 0 && documents.len() != 1 {
            return Err(Status::invalid_argument("expected_revision needs exactly one document"));
        }
        self.ctx.read_barrier().await?;
        let now = objects::now_ms();
        let mut results = Vec::new();
        let mut parts = Vec::new();
        let mut events = Vec::new();
        // Namespaces (and their quotas) first: the apply's other documents count against them.
        for doc in &documents {
            let Document::Namespace(n) = doc else { continue };
            if r.expected_revision != 0 {
                return Err(Status::invalid_argument("expected_revision applies to a Service document only"));
            }
            let key = crate::quotas::key(&n.metadata.name);
            let (action, part) = objects::plan_document(&self.ctx.reader, key, n.canonical_json())?;
            if !r.dry_run {
                parts.extend(part);
            }
            results.push(pb::ApplyResult {
                namespace: String::new(),
                name: n.metadata.name.clone(),
                action: if r.dry_run { format!("would be {action}") } else { action.to_string() },
                version: 0,
                revision: 0,
                changes: vec![],
                kind: "Namespace".into(),
            });
        }
        crate::quotas::check_apply(&self.ctx.reader, &documents)?;
        // Roles and bindings depend on nothing else in the apply.
        let roles: Vec<&spec::access::Role> =
            documents.iter().filter_map(|d| if let Document::Role(r) = d { Some(r) } else { None }).collect();
        let bindings: Vec<&spec::access::RoleBinding> =
            documents.iter().filter_map(|d| if let Document::RoleBinding(b) = d { Some(b) } else { None }).collect();
        if !roles.is_empty() || !bindings.is_empty() {
            if r.expected_revision != 0 {
                return Err(Status::invalid_argument("expected_revision applies to a Service document only"));
            }
            let access = crate::authz::plan_access(&self.ctx, caller, &roles, &bindings)?;
            for (kind, name, action) in access.results {
                let action = if r.dry_run { format!("would be {action}") } else { action.to_string() };
                results.push(pb::ApplyResult {
                    namespace: String::new(),
                    name,
                    action,
                    version: 0,
                    revision: 0,
                    changes: vec![],
                    kind: kind.into(),
                });
            }
            if !r.dry_run {
                parts.extend(access.parts);
            }
        }
        // Networks first, so that services of the same apply may join them.
        let mut plan = networks::Plan::new(&self.ctx.reader)?;
        for doc in &documents {
            let Document::Network(n) = doc else { continue };
            if r.expected_revision != 0 {
                return Err(Status::invalid_argument("expected_revision applies to a Service document only"));
            }
            let (action, change) = plan.network(n, now)?;
            let action = if r.dry_run { format!("would be {action}") } else { action.to_string() };
            results.push(pb::ApplyResult {
                namespace: n.metadata.namespace.clone(),
                name: n.metadata.name.clone(),
                action,
                version: 0,
                revision: 0,
                changes: change,
                kind: "Network".into(),
            });
        }
        // Volumes next, so that services of the same apply may mount them.
        let applied: Vec<&spec::Volume> =
            documents.iter().filter_map(|d| if let Document::Volume(v) = d { Some(v) } else { None }).collect();
        for v in &applied {
            if r.expected_revision != 0 {
                return Err(Status::invalid_argument("expected_revision applies to a Service document only"));
            }
            let (action, change, part) = crate::volumes::plan(&self.ctx.reader, v, now)?;
            if let Some(part) = part
                && !r.dry_run
            {
                parts.push(part);
            }
            let action = if r.dry_run { format!("would be {action}") } else { action.to_string() };
            results.push(pb::ApplyResult {
                namespace: v.metadata.namespace.clone(),
                name: v.metadata.name.clone(),
                action,
                version: 0,
                revision: 0,
                changes: change,
                kind: "Volume".into(),
            });
        }
        let publishing = documents
            .iter()
            .any(|d| matches!(d, Document::Service(s) if s.spec.task.ports.iter().any(|p| p.published.is_some())));
        let mut ports = crate::ports::PortCheck::new(&self.ctx.reader, plan.has_pools(), publishing)?;
        for doc in &documents {
            let Document::Service(s) = doc else { continue };
            plan.service(s, now)?;
            ports.service(s)?;
            crate::volumes::check_service(&self.ctx.reader, s, &applied)?;
            let file_versions = crate::secrets::resolve_versions(&self.ctx.reader, s)?;
            let (ns, name) = (&s.metadata.namespace, &s.metadata.name);
            let key = tasks::service_key(ns, name);
            let existing = objects::get::<ServiceRecord>(&self.ctx.reader, &key)?;
            let expected = existing.as_ref().map_or(0, |e| e.mod_revision);
            if r.expected_revision != 0 && r.expected_revision != expected {
                return Err(Status::failed_precondition(format!(
                    "service {ns}/{name} is at revision {expected}, not {}: read it again and re-apply",
                    r.expected_revision
                )));
            }
            let json = s.canonical_json();
            let old_json = existing.as_ref().filter(|e| !e.obj.deleting).map(|e| e.obj.spec_json.as_str());
            let change = changes(old_json, &json);
            let current_vip = existing.as_ref().filter(|e| !e.obj.deleting).map_or("", |e| e.obj.vip.as_str());
            let vip = plan.vip(&self.ctx.reader, s, current_vip)?;
            let current_files: BTreeMap<String, u64> = existing
                .as_ref()
                .filter(|e| !e.obj.deleting)
                .map(|e| e.obj.file_versions.iter().map(|(k, v)| (k.clone(), *v)).collect())
                .unwrap_or_default();
            let unchanged = old_json == Some(json.as_str()) && vip == current_vip && file_versions == current_files;
            let (action, version) = match &existing {
                Some(_) if unchanged => ("unchanged", existing.as_ref().map_or(0, |e| e.obj.version)),
                Some(e) if !e.obj.deleting => ("updated", e.obj.version + 1),
                Some(e) => ("created", e.obj.version + 1),
                None => ("created", 1),
            };
            if !unchanged && !r.dry_run {
                let mut rec = existing.as_ref().map(|e| e.obj.clone()).unwrap_or(ServiceRecord {
                    namespace: ns.clone(),
                    name: name.clone(),
                    created_at_ms: now,
                    ..Default::default()
                });
                if rec.deleting {
                    rec.deleting = false;
                    rec.spec_json.clear();
                }
                rec.previous_spec_json = std::mem::replace(&mut rec.spec_json, json.clone());
                rec.previous_file_versions = std::mem::take(&mut rec.file_versions);
                rec.file_versions = file_versions.into_iter().collect();
                rec.previous_version = rec.version;
                rec.version = version;
                rec.updated_at_ms = now;
                rec.vip = vip;
                rec.rollout = new_rollout(now, RolloutState::Updating, format!("rolling out version {version}"));
                parts.push(objects::cas_put(key, expected, rec.encode_to_vec()));
                events.push(crate::events::new(
                    self.ctx.id,
                    event::ROLLOUT_STARTED,
                    "service",
                    ns,
                    name,
                    format!("rolling out version {version} ({action})"),
                ));
            }
            let action = if r.dry_run { format!("would be {action}") } else { action.to_string() };
            results.push(pb::ApplyResult {
                namespace: ns.clone(),
                name: name.clone(),
                action,
                version,
                revision: 0,
                changes: if unchanged { vec![] } else { change },
                kind: "Service".into(),
            });
        }
        // Routes last: they name services, which may be in the same apply.
        let services: Vec<&spec::Service> =
            documents.iter().filter_map(|d| if let Document::Service(s) = d { Some(&**s) } else { None }).collect();
        let mut routes = crate::routes::RoutePlan::new(&self.ctx.reader)?;
        for doc in &documents {
            let Document::Route(rt) = doc else { continue };
            if r.expected_revision != 0 {
                return Err(Status::invalid_argument("expected_revision applies to a Service document only"));
            }
            let (action, change) = routes.route(&self.ctx, rt, &services, now)?;
            let action = if r.dry_run { format!("would be {action}") } else { action.to_string() };
            results.push(pb::ApplyResult {
                namespace: rt.metadata.namespace.clone(),
                name: rt.metadata.name.clone(),
                action,
                version: 0,
                revision: 0,
                changes: change,
                kind: "Route".into(),
            });
        }
        if !r.dry_run {
            parts.extend(plan.into_parts());
            parts.extend(ports.into_parts(now));
            parts.extend(routes.into_parts(now));
        }
        let writes = parts.iter().any(|(_, op)| !matches!(op, berth_types::RequestOp::Range(_)));
        if writes {
            let mut txn = objects::txn_of(parts);
            // The rollouts' events commit with them, unless they would take the transaction
            // past its size limit (the apply itself matters more than its record).
            if txn.compare.len() + txn.success.len() + events.len() <= self.ctx.limits.max_txn_ops {
                txn = crate::events::with(txn, &events);
            } else if !events.is_empty() {
                info!(events = events.len(), "apply: the rollouts' events are not recorded (the transaction is full)");
            }
            let rev = check_txn(self.ctx.write(Command::Txn(txn)).await?, "a service or network")?;
            for res in &mut results {
                res.revision = rev;
                if !res.action.starts_with("unchanged") {
                    info!(kind = %res.kind, name = %format!("{}/{}", res.namespace, res.name), version = res.version, "{}", res.action);
                }
            }
        }
        Ok(Response::new(pb::ApplyResponse { header: Some(self.ctx.header()), results }))
    }

    /// Checks a read of one object; a denial is audited.
    async fn allow(&self, caller: &Caller, verb: Verb, res: Resource, ns: &str, name: &str) -> Result<(), Status> {
        crate::audit::authorize(&self.ctx, caller, verb, res, Some(ns_of(ns)), name).await
    }

    /// For a list or watch: the namespaces its results may show (a request that names one
    /// namespace is checked for it; one that names none shows the namespaces the caller may read).
    async fn scope(&self, caller: &Caller, verb: Verb, res: Resource, ns: &str) -> Result<Namespaces, Status> {
        if ns.is_empty() {
            crate::audit::namespaces(&self.ctx, caller, verb, res).await
        } else {
            crate::audit::authorize(&self.ctx, caller, verb, res, Some(ns), "").await?;
            Ok(Namespaces::All)
        }
    }
}

#[tonic::async_trait]
impl ControlService for ControlSvc {
    async fn list_networks(
        &self,
        r: Request<pb::ListNetworksRequest>,
    ) -> Result<Response<pb::ListNetworksResponse>, Status> {
        let caller = Caller::of(&r)?;
        let r = r.into_inner();
        let scope = self.scope(&caller, Verb::List, Resource::Networks, &r.namespace).await?;
        self.ctx.read_barrier().await?;
        let mut networks = networks::list(&self.ctx.reader, &r.namespace)?;
        networks.retain(|n| n.record.as_ref().is_some_and(|r| scope.allows(&r.namespace)));
        Ok(Response::new(pb::ListNetworksResponse { header: Some(self.ctx.header()), networks }))
    }

    async fn get_network(&self, r: Request<pb::NetworkRef>) -> Result<Response<pb::NetworkResponse>, Status> {
        let caller = Caller::of(&r)?;
        let r = r.into_inner();
        self.allow(&caller, Verb::Get, Resource::Networks, &r.namespace, &r.name).await?;
        let ns = if r.namespace.is_empty() { spec::DEFAULT_NAMESPACE } else { &r.namespace };
        self.ctx.read_barrier().await?;
        let rec = networks::load(&self.ctx.reader, ns, &r.name)?;
        let network = networks::view(&self.ctx.reader, rec)?;
        Ok(Response::new(pb::NetworkResponse { header: Some(self.ctx.header()), network: Some(network) }))
    }

    async fn list_volumes(
        &self,
        r: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let caller = Caller::of(&r)?;
        let r = r.into_inner();
        let scope = self.scope(&caller, Verb::List, Resource::Volumes, &r.namespace).await?;
        self.ctx.read_barrier().await?;
        let mut volumes = crate::volumes::list(&self.ctx.reader, &r.namespace)?;
        volumes.retain(|v| v.record.as_ref().is_some_and(|r| scope.allows(&r.namespace)));
        Ok(Response::new(pb::ListVolumesResponse { header: Some(self.ctx.header()), volumes }))
    }

    async fn get_volume(&self, r: Request<pb::VolumeRef>) -> Result<Response<pb::VolumeResponse>, Status> {
        let caller = Caller::of(&r)?;
        let r = r.into_inner();
        self.allow(&caller, Verb::Get, Resource::Volumes, &r.namespace, &r.name).await?;
        self.ctx.read_barrier().await?;
        let volume = crate::volumes::get(&self.ctx.reader, &r.namespace, &r.name)?;
        Ok(Response::new(pb::VolumeResponse { header: Some(self.ctx.header()), volume: Some(volume) }))
    }

    async fn delete_volume(&self, r: Request<pb::VolumeRef>) -> Result<Response<pb::VolumeResponse>, Status> {
        let caller = Caller::of(&r)?;
        let r = r.into_inner();
        let ns = Some(ns_of(&r.namespace));
        let volume = crate::audit::mutate(&self.ctx, &caller, Verb::Delete, Resource::Volumes, ns, &r.name, async {
            crate::volumes::delete(&self.ctx, &r.namespace, &r.name).await
        })
        .await?;
        Ok(Response::new(pb::VolumeResponse { header: Some(self.ctx.header()), volume: Some(volume) }))
    }

    async fn put_file(&self, r: Request<pb::PutFileRequest>) -> Result<Response<pb::FileResponse>, Status> {
        let caller = Caller::of(&r)?;
        let r = r.into_inner();
        let res = file_resource(crate::secrets::kind_of(r.kind)?);
        let (ns, name) = (ns_of(&r.namespace).to_string(), r.name.clone());
        // Create or update: a new version either way.
        let file = crate::audit::mutate(&self.ctx, &caller, Verb::Update, res, Some(&ns), &name, async {
            if res == Resource::Secrets {
                self.ctx.read_barrier().await?;
                crate::quotas::check_new_secret(&self.ctx.reader, &ns, &name)?;
            }
            crate::secrets::put(&self.ctx, r).await
        })
        .await?;
        Ok(Response::new(pb::FileResponse { header: Some(self.ctx.header()), file: Some(file) }))
    }

    async fn list_files(&self, r: Request<pb::ListFilesRequest>) -> Result<Response<pb::ListFilesResponse>, Status> {
        let caller = Caller::of(&r)?;
        let r = r.into_inner();
        let kind = crate::secrets::kind_of(r.kind)?;
        let scope = self.scope(&caller, Verb::List, file_resource(kind), &r.namespace).await?;
        self.ctx.read_barrier().await?;
        let mut files = crate::secrets::list(&self.ctx.reader, kind, &r.namespace)?;
        files.retain(|f| scope.allows(&f.namespace));
        Ok(Response::new(pb::ListFilesResponse { header: Some(self.ctx.header()), files }))
    }

    async fn delete_file(&self, r: Request<pb::FileRef>) -> Result<Response<pb::FileResponse>, Status> {
        let caller = Caller::of(&r)?;
        let r = r.into_inner();
        let kind = crate::secrets::kind_of(r.kind)?;
        let ns = Some(ns_of(&r.namespace));
        let file = crate::audit::mutate(&self.ctx, &caller, Verb::Delete, file_resource(kind), ns, &r.name, async {
            crate::secrets::delete(&self.ctx, kind, &r.namespace, &r.name).await
        })
        .await?;
        Ok(Response::new(pb::FileResponse { header: Some(self.ctx.header()), file: Some(file) }))
    }

    async fn put_image_blob(
        &self,
        r: Request<tonic::Streaming<pb::ImageBlobChunk>>,
    ) -> Result<Response<pb::ImageBlobResponse>, Status> {
        let caller = Caller::of(&r)?;
        let res = crate::audit::mutate(&self.ctx, &caller, Verb::Create, Resource::Images, None, "blob", async {
            crate::images::put_blob(self.ctx.clone(), r.into_inner()).await
        })
        .await?;
        Ok(Response::new(res))
    }

    async fn put_image(&self, r: Request<pb::PutImageRequest>) -> Result<Response<pb::ImagesResponse>, Status> {
        let caller = Caller::of(&r)?;
        let r = r.into_inner();
        let name = r.references.first().cloned().unwrap_or_else(|| r.digest.clone());
        let images = crate::audit::mutate(&self.ctx, &caller, Verb::Create, Resource::Images, None, &name, async {
            crate::images::put_image(&self.ctx, r).await
        })
        .await?;
        Ok(Response::new(pb::ImagesResponse { header: Some(self.ctx.header()), images }))
    }

    async fn list_images(&self, r: Request<pb::ListImagesRequest>) -> Result<Response<pb::ImagesResponse>, Status> {
        let caller = Caller::of(&r)?;
        crate::audit::authorize(&self.ctx, &caller, Verb::List, Resource::Images, None, "").await?;
        self.ctx.read_barrier().await?;
        let images = crate::images::list(&self.ctx.reader)?;
        Ok(Response::new(pb::ImagesResponse { header: Some(self.ctx.header()), images }))
    }

    async fn delete_image(&self, r: Request<pb::ImageRef>) -> Result<Response<pb::ImagesResponse>, Status> {
        let caller = Caller::of(&r)?;
        let reference = r.into_inner().reference;
        let image = crate::audit::mutate(&self.ctx, &caller, Verb::Delete, Resource::Images, None, &reference, async {
            crate::images::delete(&self.ctx, &reference).await
        })
        .await?;
        Ok(Response::new(pb::ImagesResponse { header: Some(self.ctx.header()), images: vec![image] }))
    }

    async fn delete_network(&self, r: Request<pb::NetworkRef>) -> Result<Response<pb::NetworkResponse>, Status> {
        let caller = Caller::of(&r)?;
        let r = r.into_inner();
        let ns = ns_of(&r.namespace);
        let network =
            crate::audit::mutate(&self.ctx, &caller, Verb::Delete, Resource::Networks, Some(ns), &r.name, async {
                networks::delete(&self.ctx, ns, &r.name).await
            })
            .await?;
        Ok(Response::new(pb::NetworkResponse { header: Some(self.ctx.header()), network: Some(network) }))
    }

    async fn list_routes(&self, r: Request<pb::ListRoutesRequest>) -> Result<Response<pb::ListRoutesResponse>, Status> {
        let caller = Caller::of(&r)?;
        let r = r.into_inner();
        let scope = self.scope(&caller, Verb::List, Resource::Routes, &r.namespace).await?;
        self.ctx.read_barrier().await?;
        let mut routes = crate::routes::list(&self.ctx.reader, &r.namespace)?;
        routes.retain(|rt| rt.record.as_ref().is_some_and(|r| scope.allows(&r.namespace)));
        Ok(Response::new(pb::ListRoutesResponse { header: Some(self.ctx.header()), routes }))
    }

    async fn get_route(&self, r: Request<pb::RouteRef>) -> Result<Response<pb::RouteResponse>, Status> {
        let caller = Caller::of(&r)?;
        let r = r.into_inner();
        self.allow(&caller, Verb::Get, Resource::Routes, &r.namespace, &r.name).await?;
        self.ctx.read_barrier().await?;
        let route = crate::routes::get(&self.ctx.reader, &r.namespace, &r.name)?;
        Ok(Response::new(pb::RouteResponse { header: Some(self.ctx.header()), route: Some(route) }))
    }

    async fn delete_route(&self, r: Request<pb::RouteRef>) -> Result<Response<pb::RouteResponse>, Status> {
        let caller = Caller::of(&r)?;
        let r = r.into_inner();
        let ns = Some(ns_of(&r.namespace));
        let route = crate::audit::mutate(&self.ctx, &caller, Verb::Delete, Resource::Routes, ns, &r.name, async {
            crate::routes::delete(&self.ctx, &r.namespace, &r.name).await
        })
        .await?;
        Ok(Response::new(pb::RouteResponse { header: Some(self.ctx.header()), route: Some(route) }))
    }

    async fn apply(&self, r: Request<pb::ApplyRequest>) -> Result<Response<pb::ApplyResponse>, Status> {
        let caller = Caller::of(&r)?;
        let r = r.into_inner();
        let documents = spec::parse_all(&r.documents).map_err(|e| Status::invalid_argument(e.to_string()))?;
        // Apply creates or updates: each document needs both rights where it lives.
        for doc in &documents {
            let (res, ns) = document_scope(doc);
            for verb in [Verb::Create, Verb::Update] {
                crate::audit::authorize(&self.ctx, &caller, verb, res, ns, &doc.key()).await?;
            }
        }
        let (res, ns) = document_scope(&documents[0]);
        let ns = ns.map(str::to_string);
        let names: Vec<String> = documents.iter().map(|d| format!("{:?} {}", d.kind(), d.key())).collect();
        crate::audit::mutate(&self.ctx, &caller, Verb::Update, res, ns.as_deref(), &names.join(", "), async {
            self.apply_call(&caller, r, documents).await
        })
        .await
    }

    async fn get_service(&self, r: Request<pb::ServiceRef>) -> Result<Response<pb::GetServiceResponse>, Status> {
        let caller = Caller::of(&r)?;
        let r = r.into_inner();
        self.allow(&caller, Verb::Get, Resource::Services, &r.namespace, &r.name).await?;
        self.ctx.read_barrier().await?;
        let rec = load_service(&self.ctx, &r.namespace, &r.name)?;
        let svc = parse(&rec)?;
        let mut list = service_tasks(&self.ctx, &svc.record.namespace, &svc.record.name)?;
        list.sort_by(|a, b| (a.slot, &a.pinned_node, a.created_at_ms).cmp(&(b.slot, &b.pinned_node, b.created_at_ms)));
        let v = view(&self.ctx, &svc, Some(&list))?;
        Ok(Response::new(pb::GetServiceResponse { header: Some(self.ctx.header()), service: Some(v), tasks: list }))
    }

    async fn list_services(
        &self,
        r: Request<pb::ListServicesRequest>,
    ) -> Result<Response<pb::ListServicesResponse>, Status> {
        let caller = Caller::of(&r)?;
        let r = r.into_inner();
        let scope = self.scope(&caller, Verb::List, Resource::Services, &r.namespace).await?;
        self.ctx.read_barrier().await?;
        let prefix = if r.namespace.is_empty() {
            SERVICES_PREFIX.to_string()
        } else {
            format!("{SERVICES_PREFIX}{}/", r.namespace)
        };
        let all_tasks: Vec<Task> =
            objects::list::<Task>(&self.ctx.reader, TASKS_PREFIX)?.into_iter().map(|t| t.obj).collect();
        let mut by_service: HashMap<(String, String), Vec<Task>> = HashMap::new();
        for t in all_tasks {
            by_service.entry((t.namespace.clone(), t.service.clone())).or_default().push(t);
        }
        let mut services = Vec::new();
        for rec in objects::list::<ServiceRecord>(&self.ctx.reader, &prefix)? {
            if !scope.allows(&rec.obj.namespace) {
                continue;
            }
            let svc = parse(&rec)?;
            let list = by_service.remove(&(svc.record.namespace.clone(), svc.record.name.clone())).unwrap_or_default();
            services.push(view(&self.ctx, &svc, Some(&list))?);
        }
        Ok(Response::new(pb::ListServicesResponse { header: Some(self.ctx.header()), services }))
    }

    type WatchServicesStream = Stream_<pb::ServiceEvent>;

    async fn watch_services(
        &self,
        r: Request<pb::WatchServicesRequest>,
    ) -> Result<Response<Self::WatchServicesStream>, Status> {
        let caller = Caller::of(&r)?;
        let slot = self.ctx.streams.open(&r, "watch", crate::streams::MAX_WATCHES)?;
        let r = r.into_inner();
        let scope = self.scope(&caller, Verb::Watch, Resource::Services, &r.namespace).await?;
        let ctx = self.ctx.clone();
        ctx.read_barrier().await?;
        let prefix = if r.namespace.is_empty() {
            SERVICES_PREFIX.to_string()
        } else {
            format!("{SERVICES_PREFIX}{}/", r.namespace)
        };
        let key = prefix.as_bytes().to_vec();
        // Services and their tasks both change what a service view shows.
        let mut watcher = ctx
            .reader
            .watch(b"/berth/".to_vec(), berth_types::prefix_end(b"/berth/"), 0)
            .map_err(|e| Status::internal(e.to_string()))?;
        let out = async_stream::try_stream! {
            let _slot = slot;
            let mut last: HashMap<String, ServiceView> = HashMap::new();
            // The names of the services whose tasks changed since the last look (None: look at
            // every service). A view costs a read of its service's tasks, so only these, and
            // services whose record changed, are counted again.
            let mut touched: Option<HashSet<String>> = None;
            loop {
                let mut now: HashMap<String, ServiceView> = HashMap::new();
                for rec in objects::list::<ServiceRecord>(&ctx.reader, &prefix)? {
                    if !scope.allows(&rec.obj.namespace) {
                        continue;
                    }
                    let svc_key = format!("{}/{}", rec.obj.namespace, rec.obj.name);
                    let unchanged = touched.as_ref().is_some_and(|t| !t.contains(&rec.obj.name));
                    let v = match last.get(&svc_key) {
                        Some(v) if unchanged && v.mod_revision == rec.mod_revision => v.clone(),
                        _ => view(&ctx, &parse(&rec)?, None)?,
                    };
                    now.insert(svc_key, v);
                }
                for (k, v) in &now {
                    if last.get(k) != Some(v) {
                        yield pb::ServiceEvent { kind: "put".into(), service: Some(v.clone()) };
                    }
                }
                for (k, v) in &last {
                    if !now.contains_key(k) {
                        yield pb::ServiceEvent { kind: "delete".into(), service: Some(v.clone()) };
                    }
                }
                last = now;
                let mut names = HashSet::new();
                loop {
                    match watcher.next().await {
                        Ok(berth_store::WatchEvents::Events(ev)) => {
                            let mut relevant = false;
                            for (_, e) in &ev {
                                if let Some(name) = tasks::service_of_task_key(&e.kv.key) {
                                    names.insert(String::from_utf8_lossy(name).into_owned());
                                    relevant = true;
                                } else {
                                    relevant |= e.kv.key.starts_with(&key);
                                }
                            }
                            if relevant {
                                touched = Some(names);
                                break;
                            }
                        }
                        // Anything else (the watch fell behind and restarted): look at everything.
                        Ok(_) => {
                            touched = None;
                            break;
                        }
                        Err(e) => Err(Status::internal(e.to_string()))?,
                    }
                }
            }
        };
        Ok(Response::new(Box::pin(out)))
    }

    async fn delete_service(&self, r: Request<pb::ServiceRef>) -> Result<Response<pb::ServiceResponse>, Status> {
        let caller = Caller::of(&r)?;
        let r = r.into_inner();
        let ns = Some(ns_of(&r.namespace));
        crate::audit::mutate(&self.ctx, &caller, Verb::Delete, Resource::Services, ns, &r.name, async {
            self.ctx.read_barrier().await?;
            let rec = load_service(&self.ctx, &r.namespace, &r.name)?;
            if !rec.obj.deleting {
                let mut n = rec.obj.clone();
                n.deleting = true;
                n.updated_at_ms = objects::now_ms();
                self.write_record(&n, rec.mod_revision).await?;
                info!(service = %format!("{}/{}", n.namespace, n.name), "service deleting");
            }
            self.respond(&rec.obj.namespace, &rec.obj.name).await
        })
        .await
    }

    async fn scale(&self, r: Request<pb::ScaleRequest>) -> Result<Response<pb::ServiceResponse>, Status> {
        let caller = Caller::of(&r)?;
        let r = r.into_inner();
        let s = r.service.clone().unwrap_or_default();
        let ns = Some(ns_of(&s.namespace));
        crate::audit::mutate(&self.ctx, &caller, Verb::Update, Resource::Services, ns, &s.name, self.scale_call(r))
            .await
    }

    async fn rollout(&self, r: Request<pb::RolloutRequest>) -> Result<Response<pb::ServiceResponse>, Status> {
        let caller = Caller::of(&r)?;
        let r = r.into_inner();
        let s = r.service.clone().unwrap_or_default();
        let ns = ns_of(&s.namespace);
        let action = RolloutAction::try_from(r.action).unwrap_or(RolloutAction::Unspecified);
        if matches!(action, RolloutAction::Status | RolloutAction::Unspecified) {
            self.allow(&caller, Verb::Get, Resource::Services, ns, &s.name).await?;
            return self.rollout_call(r).await;
        }
        crate::audit::mutate(
            &self.ctx,
            &caller,
            Verb::Update,
            Resource::Services,
            Some(ns),
            &s.name,
            self.rollout_call(r),
        )
        .await
    }

    async fn list_tasks(&self, r: Request<pb::ListTasksRequest>) -> Result<Response<pb::ListTasksResponse>, Status> {
        let caller = Caller::of(&r)?;
        let r = r.into_inner();
        let scope = self.scope(&caller, Verb::List, Resource::Tasks, &r.namespace).await?;
        self.ctx.read_barrier().await?;
        let prefix =
            if r.service.is_empty() { TASKS_PREFIX.to_string() } else { format!("{TASKS_PREFIX}{}.", r.service) };
        let mut list: Vec<Task> = objects::list::<Task>(&self.ctx.reader, &prefix)?
            .into_iter()
            .map(|t| t.obj)
            .filter(|t| (r.namespace.is_empty() || t.namespace == r.namespace) && scope.allows(&t.namespace))
            .filter(|t| r.service.is_empty() || t.service == r.service)
            .filter(|t| r.all || tasks::desired_of(t) == TaskState::Running || !tasks::is_terminal(tasks::state_of(t)))
            .collect();
        list.sort_by(|a, b| {
            (&a.namespace, &a.service, a.slot, &a.pinned_node, a.created_at_ms).cmp(&(
                &b.namespace,
                &b.service,
                b.slot,
                &b.pinned_node,
                b.created_at_ms,
            ))
        });
        Ok(Response::new(pb::ListTasksResponse { header: Some(self.ctx.header()), tasks: list }))
    }

    async fn list_namespaces(
        &self,
        r: Request<pb::ListNamespacesRequest>,
    ) -> Result<Response<pb::ListNamespacesResponse>, Status> {
        let caller = Caller::of(&r)?;
        // Everyone sees the namespaces whose services they may list; a cluster-admin, all.
        let scope = self.scope(&caller, Verb::List, Resource::Services, "").await?;
        self.ctx.read_barrier().await?;
        let namespaces = crate::quotas::overview(&self.ctx.reader)?
            .into_iter()
            .filter(|(name, _, _)| scope.allows(name))
            .map(|(name, usage, doc)| pb::NamespaceView {
                name,
                declared: doc.is_some(),
                quota_json: doc
                    .map(|d| serde_json::to_string(&d.spec.quota).expect("a quota serializes"))
                    .unwrap_or_default(),
                usage_json: serde_json::to_string(&usage).expect("a usage serializes"),
            })
            .collect();
        Ok(Response::new(pb::ListNamespacesResponse { header: Some(self.ctx.header()), namespaces }))
    }

    type LogsStream = Stream_<pb::LogEntry>;

    async fn logs(&self, r: Request<pb::LogsRequest>) -> Result<Response<Self::LogsStream>, Status> {
        let caller = Caller::of(&r)?;
        let slot = self.ctx.streams.open(&r, "log", crate::streams::MAX_LOG_STREAMS)?;
        let req = r.into_inner();
        let ctx = self.ctx.clone();
        // A task id names its namespace; a service name is in the request's.
        let task_ns = objects::get::<Task>(&ctx.reader, &tasks::task_key(&req.target))?.map(|t| t.obj.namespace);
        self.allow(&caller, Verb::Get, Resource::Tasks, task_ns.as_deref().unwrap_or(&req.namespace), &req.target)
            .await?;
        if !ctx.is_leader() {
            // Only the leader holds the agents' sessions: relay through it.
            let (_, addr) = ctx.leader().ok_or_else(|| berth_api::not_applied("no leader is known yet; retry"))?;
            let ch = ctx.peers.channel(&addr).map_err(Status::unavailable)?;
            let mut client = pb::control_service_client::ControlServiceClient::new(ch);
            let stream = client.logs(req).await?.into_inner();
            return Ok(Response::new(Box::pin(crate::streams::holding(stream, slot))));
        }
        let ns = if req.namespace.is_empty() { spec::DEFAULT_NAMESPACE.to_string() } else { req.namespace.clone() };
        let targets: Vec<Task> = match objects::get::<Task>(&ctx.reader, &tasks::task_key(&req.target))? {
            Some(t) => vec![t.obj],
            None => {
                load_service(&ctx, &ns, &req.target)?;
                let mut l = service_tasks(&ctx, &ns, &req.target)?;
                l.retain(|t| !t.node_id.is_empty() && (tasks::desired_of(t) == TaskState::Running || !req.follow));
                l
            }
        };
        if targets.is_empty() {
            return Err(Status::not_found(format!("{} has no placed tasks to read logs from", req.target)));
        }
        let (tx, rx) = mpsc::channel::<Result<pb::LogEntry, Status>>(256);
        for t in targets {
            let Some(conn) = ctx.assignments.conn(&t.node_id) else {
                let _ = tx
                    .send(Err(Status::unavailable(format!(
                        "task {}'s node {} has no session with the leader; its logs are unreachable now",
                        t.id, t.node_id
                    ))))
                    .await;
                continue;
            };
            let tx = tx.clone();
            let q = LogsQuery { task_id: t.id.clone(), follow: req.follow, tail: req.tail, since_ms: req.since_ms };
            tokio::spawn(async move {
                if let Err(e) = relay_logs(conn, q, &tx).await {
                    let _ = tx.send(Err(Status::unavailable(format!("logs of task {}: {e}", t.id)))).await;
                }
            });
        }
        drop(tx);
        Ok(Response::new(Box::pin(crate::streams::holding(tokio_stream::wrappers::ReceiverStream::new(rx), slot))))
    }
}

/// Opens a log stream on the agent's connection and relays its lines until the end.
async fn relay_logs(
    conn: quinn::Connection,
    q: LogsQuery,
    tx: &mpsc::Sender<Result<pb::LogEntry, Status>>,
) -> Result<(), String> {
    let task_id = q.task_id.clone();
    let (send, recv) = conn.open_bi().await.map_err(|e| format!("opening a stream to the agent failed: {e}"))?;
    let mut writer = FrameWriter::new(send);
    let mut reader = FrameReader::new(recv);
    writer.send(&MasterFrame { body: Some(master_frame::Body::Logs(q)) }).await.map_err(|e| e.to_string())?;
    loop {
        let frame = tokio::select! {
            f = reader.recv::<AgentFrame>() => f.map_err(|e| e.to_string())?,
            _ = tx.closed() => return Ok(()),
        };
        let Some(AgentFrame { body: Some(agent_frame::Body::LogChunk(chunk)) }) = frame else {
            return Err("the agent ended the log stream".into());
        };
        for l in chunk.lines {
            let e = pb::LogEntry { task_id: task_id.clone(), ts_ms: l.ts_ms, stream: l.stream, line: l.line };
            if tx.send(Ok(e)).await.is_err() {
                return Ok(());
            }
        }
        if !chunk.error.is_empty() {
            return Err(chunk.error);
        }
        if chunk.end {
            return Ok(());
        }
    }
}
