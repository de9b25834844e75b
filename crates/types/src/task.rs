//! What an agent is asked to run: the [`RunSpec`] of one task, carried JSON-encoded in the
//! `spec` bytes of an assignment. The master builds it from the service spec; the agent's drivers
//! read it. Plain data, no I/O.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::spec::{DisconnectPolicy, FileKind, TaskSpec};

/// One task as its agent sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunSpec {
    /// Service name.
    pub service: String,
    /// Service namespace.
    pub namespace: String,
    /// Replica slot (replicated services, from 1) or 0 (global services: one task per node).
    pub slot: u32,
    /// The service's spec version this task was made from (grows on every changed apply).
    pub spec_version: u64,
    /// What to run.
    pub task: TaskSpec,
    /// What the agent does when it loses the leader: `replace` keeps the task running;
    /// `at-most-once` stops it after `fence_timeout_ms`.
    pub disconnect: DisconnectPolicy,
    /// For `at-most-once`: how long the agent may run the task without hearing from the leader.
    /// Always shorter than the masters' node-down grace.
    pub fence_timeout_ms: u64,
    /// The networks the task joins, by name in its namespace, as the masters resolved them
    /// (the service's list, or `default`); empty: the host's network (a cluster without pools).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub networks: Vec<String>,
    /// Filled in by the agent, never by the masters: the task's network namespace and what
    /// its runtime needs to put the task in it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attachment: Option<Attachment>,
    /// The task's volumes, as the masters resolved them (`spec.task.volumes`, with `{slot}`
    /// replaced).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<Mount>,
    /// The secrets and configs the task mounts, each at the version the task was made with. Their
    /// contents are never here: they travel beside the assignment and stay in the agent's memory
    /// and on a tmpfs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<TaskFile>,
}

/// One volume mounted into a task.
impl RunSpec {
    /// Slot 1 of version 1 of `service` in namespace `default`, running `task`, with nothing
    /// resolved by the masters (no networks, mounts or files): for tests and benchmarks.
    pub fn standalone(service: &str, task: TaskSpec) -> RunSpec {
        RunSpec {
            service: service.to_string(),
            namespace: "default".into(),
            slot: 1,
            spec_version: 1,
            task,
            disconnect: Default::default(),
            fence_timeout_ms: 0,
            networks: Vec::new(),
            attachment: None,
            mounts: Vec::new(),
            files: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    /// The volume's name in the task's namespace.
    pub volume: String,
    /// Absolute path in the task.
    pub target: String,
    /// Mounted read-only.
    #[serde(default)]
    pub read_only: bool,
    /// Where the data is.
    pub source: MountSource,
}

/// Where a volume's data is, per driver.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "driver", rename_all = "kebab-case")]
pub enum MountSource {
    /// Under the agent's data dir; `size`: a filesystem image of that many bytes.
    Local {
        /// Enforced size in bytes; none: a plain directory.
        #[serde(default)]
        size: Option<u64>,
    },
    /// A path on the node.
    Host {
        /// Absolute path.
        path: String,
    },
    /// A GlusterFS volume, mounted through FUSE.
    Glusterfs {
        /// Volume file servers.
        servers: Vec<String>,
        /// The GlusterFS volume's name.
        volume: String,
    },
}

/// A secret or config a task mounts as a file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskFile {
    /// Secret or config.
    pub kind: FileKind,
    /// Its name in the task's namespace.
    pub name: String,
    /// The version the task uses.
    pub version: u64,
    /// Absolute path of the file in the task.
    pub target: String,
    /// Permission bits.
    pub mode: u32,
}

impl TaskFile {
    /// `kind/name@version`: how the assignment's contents name it.
    pub fn id(&self) -> String {
        format!("{}/{}@{}", self.kind, self.name, self.version)
    }
}

/// A task's place on its networks, made by its node's agent before the task starts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// The network namespace file the task runs in.
    pub netns: String,
    /// The text of the task's `/etc/resolv.conf` (the node's DNS on the network's gateway).
    pub resolv_conf: String,
    /// Network name -> the task's address.
    pub addresses: BTreeMap<String, String>,
}

impl RunSpec {
    /// JSON, as carried in an assignment.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a RunSpec always serializes")
    }

    /// Reads an assignment's spec bytes.
    pub fn decode(bytes: &[u8]) -> Result<RunSpec, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("the task's run spec is undecodable: {e}"))
    }

    /// The program and arguments (`command` then `args`).
    pub fn argv(&self) -> Vec<String> {
        self.task.command.iter().chain(self.task.args.iter()).cloned().collect()
    }
}

/// How an agent's message starts when it stopped an at-most-once task because the leader fell
/// silent (the fence). Such a stop is not the task's failure: the masters restart the slot without
/// growing its crash-loop backoff.
pub const FENCE_STOP_PREFIX: &str = "fenced:";

/// Whether a task's final message says the fence stopped it.
pub fn is_fence_stop(message: &str) -> bool {
    message.starts_with(FENCE_STOP_PREFIX)
}
