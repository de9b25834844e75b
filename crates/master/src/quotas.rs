//! Namespaces and their quotas: `/berth/namespaces/<name>` holds a `kind: Namespace` document
//! (canonical JSON). A namespace's usage is computed from the state when a change is checked:
//! its services (not being deleted), their tasks (replicas; a global service counts one per
//! node), the CPU and memory those tasks request, its volumes and its secrets. `apply`, `scale`
//! and `secret create` compare the usage before and after the change with the quota, and refuse a
//! change that goes past it, saying the usage and the limit.
//!
//! Two changes checked at the same moment may both pass (as two admissions may race in
//! Kubernetes): the quota bounds what a tenant can do through the API, it is not a lock.

use std::collections::{BTreeMap, BTreeSet};

use berth_api::pb::{ServiceRecord, VolumeRecord};
use berth_types::spec::{
    Document, Service, ServiceMode,
    namespace::{Namespace, Usage},
};
use tonic::Status;

use crate::objects;

pub(crate) const PREFIX: &str = "/berth/namespaces/";

pub(crate) fn key(name: &str) -> Vec<u8> {
    format!("{PREFIX}{name}").into_bytes()
}

/// Every namespace document, by name.
pub(crate) fn list(reader: &berth_store::KvReader) -> Result<BTreeMap<String, Namespace>, Status> {
    let mut out = BTreeMap::new();
    for (name, value) in crate::authz::range_prefix(reader, PREFIX).map_err(Status::internal)? {
        let ns: Namespace = serde_json::from_slice(&value)
            .map_err(|e| Status::data_loss(format!("namespace record {name} does not parse: {e}")))?;
        out.insert(name, ns);
    }
    Ok(out)
}

/// One namespace's document, if it has one.
pub(crate) fn get(reader: &berth_store::KvReader, name: &str) -> Result<Option<Namespace>, Status> {
    let Some(kv) = reader.get(&key(name)).map_err(|e| Status::internal(e.to_string()))? else { return Ok(None) };
    serde_json::from_slice(&kv.value)
        .map(Some)
        .map_err(|e| Status::data_loss(format!("namespace record {name} does not parse: {e}")))
}

/// What one service of this spec counts for: its tasks, their CPU and memory requests.
pub(crate) fn service_usage(spec: &Service, nodes: u64) -> Usage {
    let tasks = match spec.spec.mode {
        ServiceMode::Global => nodes,
        ServiceMode::Replicated => u64::from(spec.spec.replicas.unwrap_or(0)),
    };
    let r = &spec.spec.task.resources;
    Usage {
        cpu: tasks.saturating_mul(r.cpu.millis()),
        memory: tasks.saturating_mul(r.memory.bytes()),
        tasks,
        services: 1,
        volumes: 0,
        secrets: 0,
    }
}

pub(crate) fn add(a: &mut Usage, b: &Usage) {
    a.cpu = a.cpu.saturating_add(b.cpu);
    a.memory = a.memory.saturating_add(b.memory);
    a.tasks = a.tasks.saturating_add(b.tasks);
    a.services = a.services.saturating_add(b.services);
    a.volumes = a.volumes.saturating_add(b.volumes);
    a.secrets = a.secrets.saturating_add(b.secrets);
}

pub(crate) fn sub(a: &mut Usage, b: &Usage) {
    a.cpu = a.cpu.saturating_sub(b.cpu);
    a.memory = a.memory.saturating_sub(b.memory);
    a.tasks = a.tasks.saturating_sub(b.tasks);
    a.services = a.services.saturating_sub(b.services);
    a.volumes = a.volumes.saturating_sub(b.volumes);
    a.secrets = a.secrets.saturating_sub(b.secrets);
}

/// The nodes a global service runs on at most.
pub(crate) fn node_count(reader: &berth_store::KvReader) -> Result<u64, Status> {
    count(reader, objects::NODES_PREFIX)
}

fn count(reader: &berth_store::KvReader, prefix: &str) -> Result<u64, Status> {
    let q = berth_types::RangeQuery {
        key: prefix.as_bytes().to_vec(),
        range_end: berth_types::prefix_end(prefix.as_bytes()),
        count_only: true,
        ..Default::default()
    };
    let (res, _) = reader.range(&q).map_err(|e| Status::internal(e.to_string()))?;
    Ok(u64::try_from(res.count).unwrap_or(0))
}

/// What namespace `ns` holds now.
pub(crate) fn usage(reader: &berth_store::KvReader, ns: &str, nodes: u64) -> Result<Usage, Status> {
    let mut u = Usage::default();
    for rec in objects::list::<ServiceRecord>(reader, &format!("{}{ns}/", crate::tasks::SERVICES_PREFIX))? {
        if rec.obj.deleting {
            continue;
        }
        let spec: Service = serde_json::from_str(&rec.obj.spec_json)
            .map_err(|e| Status::data_loss(format!("service {ns}/{} has an unreadable spec: {e}", rec.obj.name)))?;
        add(&mut u, &service_usage(&spec, nodes));
    }
    u.volumes =
        objects::list::<VolumeRecord>(reader, &format!("{}{ns}/", crate::volumes::VOLUMES_PREFIX))?.len() as u64;
    u.secrets = count(reader, &format!("{}{ns}/", crate::secrets::SECRETS_PREFIX))?;
    Ok(u)
}

/// Refuses a change of namespace `ns` from `before` to `after` that goes past its quota.
pub(crate) fn check(ns: &str, quota: Option<&Namespace>, before: &Usage, after: &Usage) -> Result<(), Status> {
    let Some(doc) = quota else { return Ok(()) };
    let over = doc.spec.quota.exceeded(before, after);
    if over.is_empty() {
        return Ok(());
    }
    let what: Vec<String> = over.iter().map(ToString::to_string).collect();
    Err(Status::resource_exhausted(format!(
        "namespace {ns}'s quota: {}; nothing was changed: ask for less, free some up, or have a cluster-admin raise \
         the quota (`kind: Namespace`)",
        what.join("; ")
    )))
}

fn stored_service(reader: &berth_store::KvReader, ns: &str, name: &str) -> Result<Option<Service>, Status> {
    let Some(rec) = objects::get::<ServiceRecord>(reader, &crate::tasks::service_key(ns, name))? else {
        return Ok(None);
    };
    if rec.obj.deleting {
        return Ok(None);
    }
    serde_json::from_str(&rec.obj.spec_json)
        .map(Some)
        .map_err(|e| Status::data_loss(format!("service {ns}/{name} has an unreadable spec: {e}")))
}

/// Checks an apply's services and volumes against the quotas of their namespaces (a Namespace
/// document of the same apply is the quota that counts).
pub(crate) fn check_apply(reader: &berth_store::KvReader, documents: &[Document]) -> Result<(), Status> {
    let declared: BTreeMap<&str, &Namespace> = documents
        .iter()
        .filter_map(|d| if let Document::Namespace(n) = d { Some((n.metadata.name.as_str(), n)) } else { None })
        .collect();
    let touched: BTreeSet<&str> = documents
        .iter()
        .filter_map(|d| match d {
            Document::Service(s) => Some(s.metadata.namespace.as_str()),
            Document::Volume(v) => Some(v.metadata.namespace.as_str()),
            _ => None,
        })
        .collect();
    let mut nodes = None;
    for ns in touched {
        let quota = match declared.get(ns) {
            Some(n) => Some((*n).clone()),
            None => get(reader, ns)?,
        };
        if quota.is_none() {
            continue;
        }
        let nodes = match nodes {
            Some(n) => n,
            None => *nodes.insert(node_count(reader)?),
        };
        let before = usage(reader, ns, nodes)?;
        let mut after = before;
        for doc in documents {
            match doc {
                Document::Service(s) if s.metadata.namespace == ns => {
                    if let Some(old) = stored_service(reader, ns, &s.metadata.name)? {
                        sub(&mut after, &service_usage(&old, nodes));
                    }
                    add(&mut after, &service_usage(s, nodes));
                }
                Document::Volume(v) if v.metadata.namespace == ns => {
                    let key = crate::volumes::volume_key(ns, &v.metadata.name);
                    if reader.get(&key).map_err(|e| Status::internal(e.to_string()))?.is_none() {
                        after.volumes += 1;
                    }
                }
                _ => {}
            }
        }
        check(ns, quota.as_ref(), &before, &after)?;
    }
    Ok(())
}

/// Checks a service's new spec (a scale) against its namespace's quota.
pub(crate) fn check_service_change(reader: &berth_store::KvReader, old: &Service, new: &Service) -> Result<(), Status> {
    let ns = new.metadata.namespace.as_str();
    let Some(quota) = get(reader, ns)? else { return Ok(()) };
    let nodes = node_count(reader)?;
    let before = usage(reader, ns, nodes)?;
    let mut after = before;
    sub(&mut after, &service_usage(old, nodes));
    add(&mut after, &service_usage(new, nodes));
    check(ns, Some(&quota), &before, &after)
}

/// Checks one more secret in `ns`, when `name` is new there.
pub(crate) fn check_new_secret(reader: &berth_store::KvReader, ns: &str, name: &str) -> Result<(), Status> {
    let Some(quota) = get(reader, ns)? else { return Ok(()) };
    let key = crate::secrets::file_key(berth_types::spec::FileKind::Secret, ns, name);
    if reader.get(&key).map_err(|e| Status::internal(e.to_string()))?.is_some() {
        return Ok(());
    }
    let before = usage(reader, ns, 0)?;
    let after = Usage { secrets: before.secrets + 1, ..before };
    check(ns, Some(&quota), &before, &after)
}

/// Every namespace in use or declared, with its usage and its document.
pub(crate) fn overview(reader: &berth_store::KvReader) -> Result<Vec<(String, Usage, Option<Namespace>)>, Status> {
    let declared = list(reader)?;
    let mut names: BTreeSet<String> = declared.keys().cloned().collect();
    for prefix in [crate::tasks::SERVICES_PREFIX, crate::volumes::VOLUMES_PREFIX, crate::secrets::SECRETS_PREFIX] {
        for (rest, _) in crate::authz::range_prefix(reader, prefix).map_err(Status::internal)? {
            if let Some((ns, _)) = rest.split_once('/') {
                names.insert(ns.to_string());
            }
        }
    }
    let nodes = node_count(reader)?;
    let mut out = Vec::new();
    for name in names {
        let u = usage(reader, &name, nodes)?;
        out.push((name.clone(), u, declared.get(&name).cloned()));
    }
    Ok(out)
}
