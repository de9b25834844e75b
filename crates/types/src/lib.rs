//! berth's domain model: identifiers, the commands the replicated state machine understands, their
//! results, validation limits and the reserved key layout.
//!
//! This crate does no I/O and must not depend on any runtime crate (tokio, tonic, rocksdb, quinn).
//! Everything here is plain data plus pure functions, so that every other crate can share it.

pub mod event;
pub mod image;
mod kv;
mod limits;
pub mod spec;
pub mod task;

pub use kv::{
    AUDIT_PREFIX, AuditRecord, ClusterCa, Command, CommandError, CommandResult, Compare, CompareOp, CompareTarget,
    DeleteRange, DeleteResult, Event, EventKind, KeyValue, OpResult, Put, PutResult, RangeQuery, RangeResult,
    RequestOp, Txn, TxnResult, key_in_range, prefix_end,
};
pub use limits::{Limits, ValidationError};

/// A master's Raft node id. Ids are never reused: a removed id is refused forever.
pub type NodeId = u64;

/// A cluster-wide revision, as in etcd: it grows by one with every committed write transaction.
pub type Revision = i64;
