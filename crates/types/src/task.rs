//! What an agent is asked to run: the [`RunSpec`] of one task, carried JSON-encoded in the
//! `spec` bytes of an assignment. The master builds it from the service spec; the agent's drivers
//! read it. Plain data, no I/O.

use serde::{Deserialize, Serialize};

use crate::spec::{DisconnectPolicy, TaskSpec};

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
