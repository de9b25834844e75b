//! berth's gRPC API: the code generated from `proto/` (fenced in [`pb`]), conversions between the
//! wire messages and [`berth_types`], and the one place where errors become gRPC statuses.
//!
//! This crate knows nothing about storage or Raft; it depends on `berth-types` only.

mod convert;
mod status;
pub mod version;

/// Generated protobuf and gRPC code. Nothing else in this crate is generated.
pub mod pb {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("berth.v1");

    pub mod raft {
        #![allow(clippy::all, clippy::pedantic, missing_docs)]
        tonic::include_proto!("berth.v1.raft");
    }

    /// The master <-> agent protocol (QUIC frames, not gRPC).
    pub mod agent {
        #![allow(clippy::all, clippy::pedantic, missing_docs)]
        tonic::include_proto!("berth.v1.agent");
    }
}

/// A task state's name as people read it (`berth get tasks`, the agents' metrics).
pub fn task_state_name(s: i32) -> &'static str {
    use pb::agent::TaskState;
    match TaskState::try_from(s).unwrap_or(TaskState::Unspecified) {
        TaskState::Unspecified => "unknown",
        TaskState::New => "new",
        TaskState::Pending => "pending",
        TaskState::Assigned => "assigned",
        TaskState::Starting => "starting",
        TaskState::Running => "running",
        TaskState::Complete => "complete",
        TaskState::Failed => "failed",
        TaskState::Shutdown => "shutdown",
        TaskState::Orphaned => "orphaned",
    }
}

/// The encoded descriptor set of every berth proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("berth_descriptor");

pub use convert::{ConvertError, range_query_from_pb, range_result_to_pb, txn_from_pb, txn_result_to_pb};
pub use status::{
    LEADER_HINT_KEY, NOT_APPLIED, NOT_LEADER_PREFIX, OUTCOME_KEY, OUTCOME_UNKNOWN, Outcome, leader_hint, not_applied,
    not_leader, outcome, outcome_unknown, with_outcome,
};
