//! Placement for berth: given the cluster's nodes and the tasks already placed, decide a node for
//! each pending task.
//!
//! The crate is a set of pure functions over crate-local types ([`NodeInfo`], [`TaskRequest`],
//! [`Placed`]); the master converts its protobuf objects into these and writes the resulting
//! [`Placement`]s itself. It does no I/O and depends on no runtime crate (no tokio, no RocksDB, no
//! tonic): only `serde` and `thiserror`.
//!
//! A node is eligible for a task only if every filter passes: ready, availability `Active`, free CPU
//! and memory fit, every constraint holds, fewer than `max_replicas_per_node` tasks of the service on
//! the node, no task of an anti-affinity service on the node, host ports free, and (if any) at least
//! one task of each affinity service on the node, and for a task that joins networks, a node whose
//! agent attaches networks and that holds or can still get an address block of each. Among eligible nodes the lowest score tuple wins:
//! first the spread label groups (fewest tasks of the service in the node's group for each key), then
//! the strategy ([`Strategy::Spread`]: fewest tasks of the service, then most free resources;
//! [`Strategy::Binpack`]: least free resources), then the node id. Output is deterministic for equal
//! input.
//!
//! Cost: [`Scheduler::schedule`] is O(tasks x nodes) with small constants; counters (per-node usage,
//! per-node and per-label-value task counts per service, used host ports) are updated incrementally,
//! never recomputed by scanning placed tasks. [`bench`] measures it on a synthetic cluster.

mod bench;
mod constraint;
mod model;
mod scheduler;

pub use bench::{BenchResult, bench};
pub use constraint::{Constraint, ConstraintError, Field, Op};
pub use model::{
    Availability, NetworkRoom, NodeInfo, Placed, Placement, Strategy, TaskRequest, Unplaced, VolumeNeed,
    host_path_allowed,
};
pub use scheduler::Scheduler;

#[cfg(test)]
mod tests;
