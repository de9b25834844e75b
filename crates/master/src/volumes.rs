//! Volumes in the replicated state, and the decisions the controllers make about them.
//!
//! `/berth/volumes/<ns>/<name>` holds a [`VolumeRecord`]: the canonical spec, and for a `local`
//! volume the node holding its data (empty until a task first uses it; the placement that
//! chooses the node writes it in the same transaction). A per-slot mount (`db-{slot}`) creates
//! its slot's record the same way, from the mount's template, so a slot always finds its own
//! volume, on its node, again. Access modes are the scheduler's: a `single-node-writer` volume is
//! held by the task that mounts it until that task has ended ([`holders`]).

use std::collections::{BTreeMap, HashMap};

use berth_api::pb::{Node, NodeStatus, ServiceRecord, Task, VolumeRecord, VolumeTask, VolumeView, agent::TaskState};
use berth_scheduler::{VolumeNeed, host_path_allowed};
use berth_store::KvReader;
use berth_types::{
    Command, CommandResult, Compare, RequestOp,
    spec::{self, AccessMode, DisconnectPolicy, Service, Volume, VolumeDriver, VolumeSpec},
    task::{Mount, MountSource, RunSpec},
};
use prost::Message;
use tonic::Status;
use tracing::info;

use crate::node::Ctx;
use crate::objects::{self, NODES_PREFIX, Versioned};
use crate::tasks::{self, SERVICES_PREFIX, TASKS_PREFIX};

pub(crate) const VOLUMES_PREFIX: &str = "/berth/volumes/";

pub(crate) fn volume_key(ns: &str, name: &str) -> Vec<u8> {
    format!("{VOLUMES_PREFIX}{ns}/{name}").into_bytes()
}

/// A record's spec.
pub(crate) fn spec_of(rec: &VolumeRecord) -> Result<VolumeSpec, String> {
    serde_json::from_str(&rec.spec_json)
        .map_err(|e| format!("volume {}/{} has an unreadable spec: {e}", rec.namespace, rec.name))
}

/// Every volume record, by `namespace/name`.
pub(crate) fn load_all(reader: &KvReader) -> Result<HashMap<String, Versioned<VolumeRecord>>, Status> {
    Ok(objects::list::<VolumeRecord>(reader, VOLUMES_PREFIX)?
        .into_iter()
        .map(|v| (format!("{}/{}", v.obj.namespace, v.obj.name), v))
        .collect())
}

fn source_of(spec: &VolumeSpec) -> MountSource {
    match spec.driver {
        VolumeDriver::Local => MountSource::Local { size: spec.size.map(|s| s.bytes()) },
        VolumeDriver::Host => MountSource::Host { path: spec.path.clone().unwrap_or_default() },
        VolumeDriver::Glusterfs => {
            MountSource::Glusterfs { servers: spec.servers.clone(), volume: spec.volume.clone().unwrap_or_default() }
        }
    }
}

/// The mounts of a task of `svc` in `slot`, resolved against the volume records (a per-slot
/// volume not made yet comes from its mount's template). A volume that does not exist is left
/// out here; the scheduler keeps such a task pending ([`needs`]).
pub(crate) fn mounts(svc: &Service, slot: u32, volumes: &HashMap<String, Versioned<VolumeRecord>>) -> Vec<Mount> {
    let ns = &svc.metadata.namespace;
    svc.spec
        .task
        .volumes
        .iter()
        .filter_map(|m| {
            let name = m.volume_name(slot);
            let spec = match volumes.get(&format!("{ns}/{name}")) {
                Some(rec) => spec_of(&rec.obj).ok()?,
                None if m.per_slot() => m.template(),
                None => return None,
            };
            Some(Mount { volume: name, target: m.target.clone(), read_only: m.read_only, source: source_of(&spec) })
        })
        .collect()
}

/// Whether a task's run spec mounts volumes (a byte search: most tasks mount none, and the
/// controller asks of every task every round).
pub(crate) fn has_mounts(t: &Task) -> bool {
    t.run_spec.windows(9).any(|w| w == b"\"mounts\":")
}

/// The single-node-writer volumes (`namespace/name`) held by tasks that may still run, with the
/// holding task. A task holds its volumes from placement until it has ended; one on a node that
/// is down still holds them (it may be running behind a partition), unless it is `at-most-once`
/// (its agent stopped it by the fence) or its node is gone.
pub(crate) fn holders<'a>(
    tasks: impl Iterator<Item = &'a Task>,
    nodes: &HashMap<String, Node>,
    volumes: &HashMap<String, Versioned<VolumeRecord>>,
) -> HashMap<String, &'a Task> {
    let mut out = HashMap::new();
    for t in tasks {
        if t.node_id.is_empty() || tasks::is_terminal(tasks::state_of(t)) {
            continue;
        }
        if !has_mounts(t) {
            continue;
        }
        let Some(node) = nodes.get(&t.node_id) else { continue };
        let Ok(rs) = RunSpec::decode(&t.run_spec) else { continue };
        if rs.mounts.is_empty() {
            continue;
        }
        if node.status != NodeStatus::Ready as i32 && rs.disconnect == DisconnectPolicy::AtMostOnce {
            continue;
        }
        for m in &rs.mounts {
            let key = format!("{}/{}", t.namespace, m.volume);
            if access(volumes.get(&key), &rs, m) == AccessMode::SingleNodeWriter {
                out.entry(key).or_insert(t);
            }
        }
    }
    out
}

/// A mount's access mode: its volume's, or its per-slot template's.
fn access(rec: Option<&Versioned<VolumeRecord>>, rs: &RunSpec, m: &Mount) -> AccessMode {
    if let Some(spec) = rec.and_then(|r| spec_of(&r.obj).ok()) {
        return spec.access;
    }
    rs.task.volumes.iter().find(|v| v.target == m.target).and_then(|v| v.access).unwrap_or_default()
}

/// What a pending task's mounts ask of its node, with the single-node-writer volumes it will
/// hold, or why it cannot be placed at all (a volume that does not exist, or a
/// single-node-writer volume another task holds).
pub(crate) fn needs(
    t: &Task,
    volumes: &HashMap<String, Versioned<VolumeRecord>>,
    held: &HashMap<String, &Task>,
    nodes: &HashMap<String, Node>,
) -> Result<(Vec<VolumeNeed>, Vec<String>), String> {
    let Ok(rs) = RunSpec::decode(&t.run_spec) else { return Ok((Vec::new(), Vec::new())) };
    let mut out = Vec::new();
    let mut exclusive = Vec::new();
    for v in &rs.task.volumes {
        let name = v.volume_name(rs.slot);
        let key = format!("{}/{name}", t.namespace);
        let rec = volumes.get(&key);
        if rec.is_none() && !v.per_slot() {
            return Err(format!("volume {key} does not exist; create it with a `kind: Volume` document"));
        }
        if let Some(h) = held.get(&key)
            && h.id != t.id
        {
            let on = nodes.get(&h.node_id).map_or(h.node_id.as_str(), |n| n.name.as_str());
            return Err(format!(
                "volume {key} (single-node-writer) is in use by task {} on {on}; waiting for it to end",
                h.id
            ));
        }
        let Some(m) = rs.mounts.iter().find(|m| m.volume == name) else { continue };
        if access(rec, &rs, m) == AccessMode::SingleNodeWriter {
            exclusive.push(key.clone());
        }
        out.push(match &m.source {
            MountSource::Local { .. } => VolumeNeed {
                volume: key,
                local: true,
                node: rec.map(|r| r.obj.node_id.clone()).filter(|n| !n.is_empty()),
                host_path: None,
            },
            MountSource::Host { path } => {
                VolumeNeed { volume: key, local: false, node: None, host_path: Some(path.clone()) }
            }
            MountSource::Glusterfs { .. } => continue,
        });
    }
    Ok((out, exclusive))
}

/// The writes that pin a placed task's new local volumes to its node: a record made from the
/// mount's template (per-slot), or the node set on a declared volume not used before. Each
/// compares the record's mod_revision, so two placements can never pin one volume to two nodes.
pub(crate) fn pin(
    t: &Task,
    node: &str,
    volumes: &HashMap<String, Versioned<VolumeRecord>>,
    now: i64,
) -> Vec<(Compare, RequestOp)> {
    let Ok(rs) = RunSpec::decode(&t.run_spec) else { return Vec::new() };
    let mut out = Vec::new();
    for v in &rs.task.volumes {
        let name = v.volume_name(rs.slot);
        let key = format!("{}/{name}", t.namespace);
        match volumes.get(&key) {
            Some(rec) => {
                let Ok(spec) = spec_of(&rec.obj) else { continue };
                if spec.driver == VolumeDriver::Local && rec.obj.node_id.is_empty() {
                    let mut n = rec.obj.clone();
                    n.node_id = node.to_string();
                    n.updated_at_ms = now;
                    out.push(objects::cas_put(volume_key(&t.namespace, &name), rec.mod_revision, n.encode_to_vec()));
                }
            }
            None if v.per_slot() => {
                let spec = v.template();
                let rec = VolumeRecord {
                    namespace: t.namespace.clone(),
                    name: name.clone(),
                    spec_json: serde_json::to_string(&spec).unwrap_or_default(),
                    node_id: node.to_string(),
                    created_at_ms: now,
                    updated_at_ms: now,
                    created_by_service: t.service.clone(),
                    ..Default::default()
                };
                out.push(objects::cas_put(volume_key(&t.namespace, &name), 0, rec.encode_to_vec()));
            }
            None => {}
        }
    }
    out
}

/// What applying one volume document does: the action, the changed fields, and the write (none
/// when unchanged).
pub(crate) type VolumePlan = (&'static str, Vec<String>, Option<(Compare, RequestOp)>);

/// `apply` of a `kind: Volume` document: the action, the changed fields, and the write. Its
/// driver and location cannot change (the data would be left behind); its access mode and
/// labels may. A host path must be allowed by at least one node's agent.
pub(crate) fn plan(reader: &KvReader, doc: &Volume, now: i64) -> Result<VolumePlan, Status> {
    let (ns, name) = (&doc.metadata.namespace, &doc.metadata.name);
    if let Some(path) = doc.spec.path.as_deref().filter(|_| doc.spec.driver == VolumeDriver::Host) {
        check_host_path(reader, &doc.key(), path)?;
    }
    let json = serde_json::to_string(&doc.spec).unwrap_or_default();
    let key = volume_key(ns, name);
    let existing = objects::get::<VolumeRecord>(reader, &key)?;
    let Some(e) = existing else {
        let rec = VolumeRecord {
            namespace: ns.clone(),
            name: name.clone(),
            spec_json: json,
            created_at_ms: now,
            updated_at_ms: now,
            ..Default::default()
        };
        return Ok(("created", vec![], Some(objects::cas_put(key, 0, rec.encode_to_vec()))));
    };
    if e.obj.spec_json == json {
        return Ok(("unchanged", vec![], None));
    }
    let old = spec_of(&e.obj).map_err(Status::internal)?;
    let fixed = |s: &VolumeSpec| (s.driver, s.size, s.path.clone(), s.servers.clone(), s.volume.clone());
    if fixed(&old) != fixed(&doc.spec) {
        return Err(Status::failed_precondition(format!(
            "volume {ns}/{name} exists as a `{}` volume{}; its driver, size, path, servers and volume cannot change \
             (the data would stay behind): delete it and apply it again, or give the new one another name",
            old.driver,
            old.size.map(|s| format!(" of {} bytes", s.bytes())).unwrap_or_default()
        )));
    }
    let mut changes = Vec::new();
    if old.access != doc.spec.access {
        changes.push(format!("spec.access: {} -> {}", old.access, doc.spec.access));
    }
    let mut rec = e.obj.clone();
    rec.spec_json = json;
    rec.updated_at_ms = now;
    Ok(("updated", changes, Some(objects::cas_put(key, e.mod_revision, rec.encode_to_vec()))))
}

/// Refuses a host path no node's agent allows (`--allow-host-path`).
fn check_host_path(reader: &KvReader, key: &str, path: &str) -> Result<(), Status> {
    let nodes = objects::list::<Node>(reader, NODES_PREFIX)?;
    if nodes.iter().any(|n| host_path_allowed(&n.obj.host_paths, path)) {
        return Ok(());
    }
    let mut allowed: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for n in &nodes {
        for p in &n.obj.host_paths {
            allowed.entry(p.as_str()).or_default().push(n.obj.name.as_str());
        }
    }
    let have = if allowed.is_empty() {
        "no node allows any host path".to_string()
    } else {
        let list: Vec<String> = allowed.iter().map(|(p, ns)| format!("{p} (on {})", ns.join(", "))).collect();
        format!("nodes allow: {}", list.join("; "))
    };
    Err(Status::invalid_argument(format!(
        "volume {key}: host path {path} is not under any agent's --allow-host-path ({have}); choose a path under \
         those, or start an agent with --allow-host-path covering it"
    )))
}

/// Checks a service's mounts at apply time against the volumes that exist (or that the same
/// apply creates): every volume named exists, and a multi-node-reader volume is mounted read-only.
pub(crate) fn check_service(reader: &KvReader, svc: &Service, applied: &[&Volume]) -> Result<(), Status> {
    let ns = &svc.metadata.namespace;
    for (i, m) in svc.spec.task.volumes.iter().enumerate() {
        if m.per_slot() {
            continue;
        }
        let spec = match applied.iter().find(|v| v.metadata.namespace == *ns && v.metadata.name == m.source) {
            Some(v) => v.spec.clone(),
            None => match objects::get::<VolumeRecord>(reader, &volume_key(ns, &m.source))? {
                Some(rec) => spec_of(&rec.obj).map_err(Status::internal)?,
                None => {
                    return Err(Status::failed_precondition(format!(
                        "service {ns}/{}: spec.task.volumes[{i}].source: volume `{}` does not exist in namespace \
                         {ns}; apply a `kind: Volume` document for it first (or in the same file)",
                        svc.metadata.name, m.source
                    )));
                }
            },
        };
        if spec.access == AccessMode::MultiNodeReader && !m.read_only {
            return Err(Status::invalid_argument(format!(
                "service {ns}/{}: spec.task.volumes[{i}]: volume `{}` is multi-node-reader; mount it with \
                 `read_only: true`",
                svc.metadata.name, m.source
            )));
        }
    }
    Ok(())
}

/// Tasks that have not ended, by the volume (`namespace/name`) they mount.
fn tasks_by_volume(reader: &KvReader) -> Result<HashMap<String, Vec<VolumeTask>>, Status> {
    let mut out: HashMap<String, Vec<VolumeTask>> = HashMap::new();
    for t in objects::list::<Task>(reader, TASKS_PREFIX)? {
        let t = t.obj;
        if tasks::is_terminal(tasks::state_of(&t)) {
            continue;
        }
        let Ok(rs) = RunSpec::decode(&t.run_spec) else { continue };
        for m in &rs.mounts {
            out.entry(format!("{}/{}", t.namespace, m.volume)).or_default().push(VolumeTask {
                task_id: t.id.clone(),
                service: t.service.clone(),
                node_id: t.node_id.clone(),
                state: t.state,
                target: m.target.clone(),
                read_only: m.read_only,
            });
        }
    }
    Ok(out)
}

/// Services (by `namespace/name` of the volume) whose spec mounts a declared volume.
fn services_by_volume(reader: &KvReader) -> Result<HashMap<String, Vec<String>>, Status> {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for rec in objects::list::<ServiceRecord>(reader, SERVICES_PREFIX)? {
        if rec.obj.deleting {
            continue;
        }
        let Ok(svc) = serde_json::from_str::<Service>(&rec.obj.spec_json) else { continue };
        for m in svc.spec.task.volumes.iter().filter(|m| !m.per_slot()) {
            out.entry(format!("{}/{}", rec.obj.namespace, m.source)).or_default().push(rec.obj.name.clone());
        }
    }
    Ok(out)
}

/// All volumes, or those of one namespace, with the tasks and services that use each.
pub(crate) fn list(reader: &KvReader, ns: &str) -> Result<Vec<VolumeView>, Status> {
    let prefix = if ns.is_empty() { VOLUMES_PREFIX.to_string() } else { format!("{VOLUMES_PREFIX}{ns}/") };
    let mut by_task = tasks_by_volume(reader)?;
    let mut by_service = services_by_volume(reader)?;
    Ok(objects::list::<VolumeRecord>(reader, &prefix)?
        .into_iter()
        .map(|r| {
            let key = format!("{}/{}", r.obj.namespace, r.obj.name);
            VolumeView {
                tasks: by_task.remove(&key).unwrap_or_default(),
                services: by_service.remove(&key).unwrap_or_default(),
                record: Some(r.obj),
                mod_revision: r.mod_revision,
            }
        })
        .collect())
}

/// One volume.
pub(crate) fn get(reader: &KvReader, ns: &str, name: &str) -> Result<VolumeView, Status> {
    let ns = if ns.is_empty() { spec::DEFAULT_NAMESPACE } else { ns };
    let rec = objects::get::<VolumeRecord>(reader, &volume_key(ns, name))?
        .ok_or_else(|| Status::not_found(format!("no volume {ns}/{name}: list them with `berth get volumes`")))?;
    let key = format!("{ns}/{name}");
    Ok(VolumeView {
        tasks: tasks_by_volume(reader)?.remove(&key).unwrap_or_default(),
        services: services_by_volume(reader)?.remove(&key).unwrap_or_default(),
        record: Some(rec.obj),
        mod_revision: rec.mod_revision,
    })
}

/// `berth delete volume`: refused while a task that has not ended mounts it, or a service's
/// spec names it. The record goes; the node keeps the data directory of a local volume until
/// its agent is told to remove it (not built yet: see ARCHITECTURE.md).
pub(crate) async fn delete(ctx: &Ctx, ns: &str, name: &str) -> Result<VolumeView, Status> {
    ctx.read_barrier().await?;
    let view = get(&ctx.reader, ns, name)?;
    let ns = if ns.is_empty() { spec::DEFAULT_NAMESPACE } else { ns };
    if !view.tasks.is_empty() {
        let list: Vec<String> = view
            .tasks
            .iter()
            .map(|t| format!("{} ({})", t.task_id, TaskState::try_from(t.state).map_or("?", |s| s.as_str_name())))
            .collect();
        return Err(Status::failed_precondition(format!(
            "volume {ns}/{name} is in use by task{} {}; scale or delete their services, and wait for them to stop, \
             first",
            if list.len() == 1 { "" } else { "s" },
            list.join(", ")
        )));
    }
    if !view.services.is_empty() {
        return Err(Status::failed_precondition(format!(
            "volume {ns}/{name} is named by service{} {}; remove it from their spec.task.volumes and apply them, or \
             delete them, first",
            if view.services.len() == 1 { "" } else { "s" },
            view.services.join(", ")
        )));
    }
    let txn = objects::txn_of(vec![objects::cas_delete(volume_key(ns, name), view.mod_revision)]);
    match ctx.write(Command::Txn(txn)).await? {
        CommandResult::Txn(t) if t.succeeded => {
            info!(volume = %format!("{ns}/{name}"), "volume deleted");
            Ok(view)
        }
        _ => Err(Status::aborted(format!(
            "volume {ns}/{name} changed while it was being deleted; run the command again"
        ))),
    }
}

/// Records the usage a node reported for its volumes, when it moved by more than 1% of the
/// capacity (or 1 MiB) or a minute passed: `describe volume` shows it from any master.
pub(crate) fn usage_updates(
    reader: &KvReader,
    node: &str,
    usage: &[berth_api::pb::agent::VolumeUsage],
    now: i64,
) -> Vec<(Compare, RequestOp)> {
    let mut out = Vec::new();
    for u in usage {
        let Some((ns, name)) = u.key.split_once('/') else { continue };
        let Ok(Some(rec)) = objects::get::<VolumeRecord>(reader, &volume_key(ns, name)) else { continue };
        let r = &rec.obj;
        // A local volume's usage comes from the node holding it (another node may still have a
        // directory of an earlier volume of that name); a shared one's from any node.
        let local = spec_of(r).is_ok_and(|s| s.driver == VolumeDriver::Local);
        if local && r.node_id != node {
            continue;
        }
        let step = (u.capacity_bytes / 100).max(1 << 20);
        let moved = r.used_bytes.abs_diff(u.used_bytes) >= step || r.capacity_bytes != u.capacity_bytes;
        if !moved && now - r.usage_at_ms < 60_000 {
            continue;
        }
        let mut n = r.clone();
        n.used_bytes = u.used_bytes;
        n.capacity_bytes = u.capacity_bytes;
        n.usage_at_ms = now;
        out.push(objects::cas_put(volume_key(ns, name), rec.mod_revision, n.encode_to_vec()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(yaml: &str) -> Service {
        spec::parse_documents(yaml).unwrap().remove(0)
    }

    fn task_of(
        s: &Service,
        id: &str,
        slot: u32,
        node: &str,
        state: TaskState,
        volumes: &HashMap<String, Versioned<VolumeRecord>>,
    ) -> Task {
        let rs = RunSpec {
            service: s.metadata.name.clone(),
            namespace: s.metadata.namespace.clone(),
            slot,
            spec_version: 1,
            task: s.spec.task.clone(),
            disconnect: s.spec.disconnect,
            fence_timeout_ms: 0,
            networks: vec![],
            attachment: None,
            mounts: mounts(s, slot, volumes),
            files: vec![],
        };
        Task {
            id: id.into(),
            namespace: s.metadata.namespace.clone(),
            service: s.metadata.name.clone(),
            slot,
            node_id: node.into(),
            state: state as i32,
            run_spec: rs.encode(),
            ..Default::default()
        }
    }

    const DB: &str = "kind: Service\nmetadata: {name: db}\nspec:\n  replicas: 3\n  task:\n    runtime: process\n    \
                      command: [sh]\n    volumes: [{source: \"data-{slot}\", target: /data, size: 64Mi}]\n";

    #[test]
    fn per_slot_mounts_resolve_to_the_slots_own_volume() {
        let s = svc(DB);
        let m = mounts(&s, 2, &HashMap::new());
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].volume, "data-2");
        assert_eq!(m[0].source, MountSource::Local { size: Some(64 << 20) });
        let t = task_of(&s, "db.2.x", 2, "", TaskState::Pending, &HashMap::new());
        let pins = pin(&t, "n1", &HashMap::new(), 5);
        assert_eq!(pins.len(), 1, "a per-slot volume is made when its task is placed");
        let (needs, exclusive) = needs(&t, &HashMap::new(), &HashMap::new(), &HashMap::new()).unwrap();
        assert_eq!(exclusive, vec!["default/data-2".to_string()]);
        assert_eq!(needs[0].volume, "default/data-2");
        assert!(needs[0].local && needs[0].node.is_none());
    }

    #[test]
    fn a_single_node_writer_volume_is_held_until_its_task_ends() {
        let s = svc(DB);
        let rec = VolumeRecord {
            namespace: "default".into(),
            name: "data-1".into(),
            spec_json: serde_json::to_string(&s.spec.task.volumes[0].template()).unwrap(),
            node_id: "n1".into(),
            ..Default::default()
        };
        let volumes: HashMap<_, _> = [("default/data-1".to_string(), Versioned { obj: rec, mod_revision: 3 })].into();
        let nodes: HashMap<_, _> = [(
            "n1".to_string(),
            Node { id: "n1".into(), name: "host-a".into(), status: NodeStatus::Ready as i32, ..Default::default() },
        )]
        .into();
        let old = task_of(&s, "db.1.old", 1, "n1", TaskState::Running, &volumes);
        let new = task_of(&s, "db.1.new", 1, "", TaskState::Pending, &volumes);
        let tasks = [old.clone(), new.clone()];
        let held = holders(tasks.iter(), &nodes, &volumes);
        let why = needs(&new, &volumes, &held, &nodes).unwrap_err();
        assert!(why.contains("in use by task db.1.old on host-a"), "{why}");
        // Ended: free.
        let ended = Task { state: TaskState::Failed as i32, ..old };
        let tasks = [ended, new.clone()];
        let held = holders(tasks.iter(), &nodes, &volumes);
        let (need, _) = needs(&new, &volumes, &held, &nodes).unwrap();
        assert_eq!(need[0].node.as_deref(), Some("n1"), "it goes back to the node with its data");
        assert!(pin(&new, "n1", &volumes, 5).is_empty(), "already pinned");
    }

    #[test]
    fn a_missing_declared_volume_keeps_the_task_pending() {
        let s = svc("kind: Service\nmetadata: {name: web}\nspec:\n  replicas: 1\n  task:\n    runtime: process\n    \
                     command: [sh]\n    volumes: [{source: shared, target: /data}]\n");
        let t = task_of(&s, "web.1.x", 1, "", TaskState::Pending, &HashMap::new());
        let why = needs(&t, &HashMap::new(), &HashMap::new(), &HashMap::new()).unwrap_err();
        assert!(why.contains("volume default/shared does not exist"), "{why}");
    }
}
