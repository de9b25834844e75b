//! The crate-local model: what the scheduler reads and what it returns.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::constraint::Constraint;

/// Whether a node accepts new tasks (set by the operator).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Availability {
    /// Accepts new tasks.
    #[default]
    Active,
    /// Keeps its tasks, accepts no new ones.
    Pause,
    /// Its tasks are moved away; accepts no new ones.
    Drain,
}

/// A node as the scheduler sees it: identity, labels, health and capacity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub id: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// The node monitor considers the node up.
    pub ready: bool,
    pub availability: Availability,
    /// Schedulable CPU in millicpus (1000 = one core).
    pub cpu_millis: u64,
    /// Schedulable memory in bytes.
    pub memory_bytes: u64,
    /// The node's agent can attach tasks to networks (it runs as root with the overlay data
    /// plane).
    #[serde(default)]
    pub networks: bool,
    /// The host-path prefixes the node's agent lets `host` volumes use.
    #[serde(default)]
    pub host_paths: Vec<String>,
}

/// The address blocks of one network: which nodes hold one, and how many are still free. A
/// task joins a network on a node only if the node holds a block or one is free.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct NetworkRoom {
    /// `namespace/name`.
    pub network: String,
    pub nodes_with_block: Vec<String>,
    pub free_blocks: u32,
}

/// A pending task waiting for a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct TaskRequest {
    pub task_id: String,
    /// The owning service, `namespace/name`.
    pub service: String,
    pub slot: u64,
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub host_ports: Vec<u16>,
    pub constraints: Vec<Constraint>,
    /// Label keys (such as `zone`) over whose values the service's tasks are spread.
    pub spread: Vec<String>,
    pub max_replicas_per_node: Option<u32>,
    /// Services whose tasks must not share a node with this task.
    pub anti_affinity: Vec<String>,
    /// Services of which a node must already run at least one task each.
    pub affinity: Vec<String>,
    /// Networks (`namespace/name`) the task joins: only nodes that can attach networks, and that
    /// hold or can get an address block of each, are eligible.
    #[serde(default)]
    pub networks: Vec<String>,
    /// Volumes the task mounts that restrict its node.
    #[serde(default)]
    pub volumes: Vec<VolumeNeed>,
}

/// What a task's volume asks of its node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct VolumeNeed {
    /// `namespace/name`.
    pub volume: String,
    /// A local volume: the node that holds its data, or `None` for one not created yet (the
    /// first task placed creates it, and later tasks of the batch follow it there).
    pub local: bool,
    pub node: Option<String>,
    /// A host volume: the path, which the node's agent must allow.
    pub host_path: Option<String>,
}

/// Whether `path` lies under one of `prefixes`, compared by whole path components (`/srv/a` is
/// under `/srv` and `/srv/a`, not under `/srv/ab`). Both are absolute and normalised.
pub fn host_path_allowed(prefixes: &[String], path: &str) -> bool {
    prefixes.iter().any(|prefix| {
        let prefix = prefix.trim_end_matches('/');
        prefix.is_empty() || path == prefix || path.strip_prefix(prefix).is_some_and(|rest| rest.starts_with('/'))
    })
}

/// A task already bound to a node; it uses that node's resources and ports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Placed {
    pub task_id: String,
    pub service: String,
    pub node_id: String,
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub host_ports: Vec<u16>,
}

/// How the scheduler chooses among eligible nodes (after spread labels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Fewest tasks of the service on the node, then the most free resources.
    #[default]
    Spread,
    /// The least free resources: fill a node before using the next.
    Binpack,
}

/// The decision for one task.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Placement {
    pub task_id: String,
    pub node_id: String,
}

/// A task no node could take, with a human reason listing why nodes were rejected.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Unplaced {
    pub task_id: String,
    pub reason: String,
}
