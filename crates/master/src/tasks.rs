//! Services and tasks in the replicated key space, and the conversions the controllers need.
//!
//! - `/berth/services/<namespace>/<name>`: a [`ServiceRecord`] (the canonical JSON of the spec,
//!   its version, the previous spec for rollback, the rollout's progress).
//! - `/berth/tasks/<id>`: a [`Task`]. A task never moves; replacing one makes a new task.
//! - `/berth/slots/<namespace>/<name>/<slot>`: the id of the slot's current task. Every write that
//!   gives a slot a new task compares this key's mod_revision, so two leaders (or two rounds) can
//!   never create two tasks for one slot.

use std::collections::BTreeMap;

use berth_api::pb::{
    Node, NodeAvailability, NodeStatus, ServiceRecord, Task,
    agent::{TaskHealth, TaskState},
};
use berth_scheduler::{Availability, Constraint as SchedConstraint, Field, NodeInfo, Op, Placed, TaskRequest};
use berth_types::{
    spec::{ConstraintField, ConstraintOp, Service, ServiceMode},
    task::RunSpec,
};
use sha2::{Digest, Sha256};

pub(crate) const SERVICES_PREFIX: &str = "/berth/services/";
pub(crate) const TASKS_PREFIX: &str = "/berth/tasks/";
pub(crate) const SLOTS_PREFIX: &str = "/berth/slots/";

pub(crate) fn service_key(ns: &str, name: &str) -> Vec<u8> {
    format!("{SERVICES_PREFIX}{ns}/{name}").into_bytes()
}

pub(crate) fn task_key(id: &str) -> Vec<u8> {
    format!("{TASKS_PREFIX}{id}").into_bytes()
}

pub(crate) fn slot_key(ns: &str, name: &str, slot: &str) -> Vec<u8> {
    format!("{SLOTS_PREFIX}{ns}/{name}/{slot}").into_bytes()
}

/// The slot a task fills: its replica number, or `node-<id>` for a global service's task.
pub(crate) fn slot_name(t: &Task) -> String {
    if t.slot > 0 { t.slot.to_string() } else { format!("node-{}", t.pinned_node) }
}

/// A new task id: `<service>.<slot>.<random>`, readable in listings and unique.
pub(crate) fn new_task_id(service: &str, slot: &str) -> String {
    let r = uuid::Uuid::new_v4().simple().to_string();
    format!("{service}.{slot}.{}", &r[..10])
}

/// The name of the service of the task a key under [`TASKS_PREFIX`] holds (see [`new_task_id`];
/// service names have no dots). None for a key outside the prefix.
pub(crate) fn service_of_task_key(key: &[u8]) -> Option<&[u8]> {
    let id = key.strip_prefix(TASKS_PREFIX.as_bytes())?;
    id.split(|b| *b == b'.').next()
}

pub(crate) fn state_of(t: &Task) -> TaskState {
    TaskState::try_from(t.state).unwrap_or(TaskState::Unspecified)
}

pub(crate) fn desired_of(t: &Task) -> TaskState {
    TaskState::try_from(t.desired_state).unwrap_or(TaskState::Unspecified)
}

/// A state the task never leaves.
pub(crate) fn is_terminal(s: TaskState) -> bool {
    matches!(s, TaskState::Complete | TaskState::Failed | TaskState::Shutdown | TaskState::Orphaned)
}

/// Running, and healthy when the service has a health check.
pub(crate) fn is_ready(t: &Task, has_health: bool) -> bool {
    state_of(t) == TaskState::Running && (!has_health || t.health == TaskHealth::Healthy as i32)
}

/// A service record with its parsed spec.
#[derive(Debug, Clone)]
pub(crate) struct Svc {
    pub record: ServiceRecord,
    pub mod_revision: i64,
    pub spec: Service,
    pub hash: String,
}

impl Svc {
    pub fn parse(record: ServiceRecord, mod_revision: i64) -> Result<Svc, String> {
        let spec: Service = serde_json::from_str(&record.spec_json)
            .map_err(|e| format!("service {}/{} has an unreadable spec: {e}", record.namespace, record.name))?;
        let hash = template_hash(&spec, &record.file_versions);
        Ok(Svc { record, mod_revision, spec, hash })
    }

    pub fn key(&self) -> String {
        format!("{}/{}", self.record.namespace, self.record.name)
    }

    pub fn has_health(&self) -> bool {
        self.spec.spec.task.health.is_some()
    }

    /// Whether the service publishes a port on the routing mesh (meaningful with pools only).
    pub fn has_ingress(&self) -> bool {
        self.spec.spec.task.ports.iter().any(|p| p.published_mode(true) == Some(berth_types::spec::PortMode::Ingress))
    }

    pub fn is_global(&self) -> bool {
        self.spec.spec.mode == ServiceMode::Global
    }

    pub fn replicas(&self) -> u32 {
        self.spec.spec.replicas.unwrap_or(0)
    }
}

/// Hash of what a task runs: the task template, the disconnect policy and the versions of the
/// secrets and configs it mounts (so a new version rolls the service). Without files, the hash
/// is what it was before files existed.
pub(crate) fn template_hash(s: &Service, file_versions: &std::collections::HashMap<String, u64>) -> String {
    let json = if file_versions.is_empty() {
        serde_json::to_string(&(&s.spec.task, &s.spec.disconnect))
    } else {
        let versions: BTreeMap<&String, &u64> = file_versions.iter().collect();
        serde_json::to_string(&(&s.spec.task, &s.spec.disconnect, versions))
    }
    .unwrap_or_default();
    hex::encode(&Sha256::digest(json.as_bytes())[..8])
}

/// What a task of `svc` runs; `with_networks` on a cluster with pools (then it joins the
/// service's networks, or its namespace's default).
pub(crate) fn run_spec(
    svc: &Svc,
    slot: u32,
    fence_timeout_ms: u64,
    with_networks: bool,
    volumes: &std::collections::HashMap<String, crate::objects::Versioned<berth_api::pb::VolumeRecord>>,
) -> RunSpec {
    let versions: BTreeMap<String, u64> = svc.record.file_versions.iter().map(|(k, v)| (k.clone(), *v)).collect();
    RunSpec {
        service: svc.record.name.clone(),
        namespace: svc.record.namespace.clone(),
        slot,
        spec_version: svc.record.version,
        task: svc.spec.spec.task.clone(),
        disconnect: svc.spec.spec.disconnect,
        fence_timeout_ms,
        networks: if with_networks { crate::networks::service_networks(&svc.spec) } else { Vec::new() },
        attachment: None,
        mounts: crate::volumes::mounts(&svc.spec, slot, volumes),
        files: crate::secrets::task_files(&svc.spec, &versions),
    }
}

/// The scheduler's view of a node.
pub(crate) fn node_info(n: &Node) -> NodeInfo {
    let r = n.resources.unwrap_or_default();
    NodeInfo {
        id: n.id.clone(),
        name: n.name.clone(),
        labels: n.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect::<BTreeMap<_, _>>(),
        ready: n.status == NodeStatus::Ready as i32,
        availability: match NodeAvailability::try_from(n.availability) {
            Ok(NodeAvailability::Pause) => Availability::Pause,
            Ok(NodeAvailability::Drain) => Availability::Drain,
            _ => Availability::Active,
        },
        cpu_millis: r.cpu_millis,
        memory_bytes: r.memory_bytes,
        networks: n.networks,
        host_paths: n.host_paths.clone(),
    }
}

fn constraints(svc: &Svc) -> Vec<SchedConstraint> {
    svc.spec
        .spec
        .placement
        .constraints()
        .iter()
        .map(|c| SchedConstraint {
            field: match &c.field {
                ConstraintField::Label(k) => Field::Label(k.clone()),
                ConstraintField::NodeName => Field::NodeName,
                ConstraintField::NodeId => Field::NodeId,
            },
            op: match c.op {
                ConstraintOp::Eq => Op::Eq,
                ConstraintOp::Ne => Op::Ne,
            },
            value: c.value.clone(),
        })
        .collect()
}

/// Whether a node satisfies every constraint of the service (for global services).
pub(crate) fn node_matches(svc: &Svc, node: &NodeInfo) -> bool {
    constraints(svc).iter().all(|c| c.matches(node))
}

/// The ports a task holds on its node: host-mode published ports. Ingress ports are the
/// routing mesh's, open on every node whatever runs there, so they never keep a task off one.
fn host_ports(svc: &Svc, with_networks: bool) -> Vec<u16> {
    svc.spec
        .spec
        .task
        .ports
        .iter()
        .filter(|p| p.published_mode(with_networks) == Some(berth_types::spec::PortMode::Host))
        .filter_map(|p| p.published)
        .collect()
}

/// What the scheduler needs of a pending task; `with_networks` on a cluster with pools.
pub(crate) fn task_request(t: &Task, svc: &Svc, with_networks: bool) -> TaskRequest {
    let p = &svc.spec.spec.placement;
    let mut constraints = constraints(svc);
    if t.slot == 0 {
        // A global task belongs to its node: pin it there.
        constraints.push(SchedConstraint { field: Field::NodeId, op: Op::Eq, value: t.pinned_node.clone() });
    }
    TaskRequest {
        task_id: t.id.clone(),
        service: svc.key(),
        slot: u64::from(t.slot),
        cpu_millis: svc.spec.spec.task.resources.cpu.millis(),
        memory_bytes: svc.spec.spec.task.resources.memory.bytes(),
        host_ports: host_ports(svc, with_networks),
        constraints,
        spread: p.spread_labels().map(str::to_string).collect(),
        max_replicas_per_node: p.max_replicas_per_node,
        anti_affinity: p.anti_affinity.iter().map(|s| qualify(s, &svc.record.namespace)).collect(),
        affinity: p.affinity.iter().map(|s| qualify(s, &svc.record.namespace)).collect(),
        networks: if with_networks {
            crate::networks::service_networks(&svc.spec)
                .into_iter()
                .map(|n| format!("{}/{n}", svc.record.namespace))
                .collect()
        } else {
            Vec::new()
        },
        volumes: Vec::new(),
    }
}

/// `name` means `<namespace>/name` in the service's own namespace.
fn qualify(s: &str, ns: &str) -> String {
    if s.contains('/') { s.to_string() } else { format!("{ns}/{s}") }
}

pub(crate) fn placed(t: &Task, svc: Option<&Svc>, with_networks: bool) -> Placed {
    Placed {
        task_id: t.id.clone(),
        service: format!("{}/{}", t.namespace, t.service),
        node_id: t.node_id.clone(),
        cpu_millis: svc.map_or(0, |s| s.spec.spec.task.resources.cpu.millis()),
        memory_bytes: svc.map_or(0, |s| s.spec.spec.task.resources.memory.bytes()),
        host_ports: svc.map(|s| host_ports(s, with_networks)).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_key_names_its_service() {
        let key = task_key(&new_task_id("web", "3"));
        assert_eq!(service_of_task_key(&key), Some(&b"web"[..]));
        assert_eq!(service_of_task_key(&task_key(&new_task_id("db", "node-n1"))), Some(&b"db"[..]));
        assert_eq!(service_of_task_key(b"/berth/services/default/web"), None);
    }
}
