//! berth's storage: the Raft log, the MVCC state machine and its snapshots, all in one RocksDB
//! instance per master, behind openraft's storage traits.
//!
//! This crate must not depend on tonic, quinn or any network code: it is storage only. The
//! openraft type configuration lives here because the log and state machine are defined by it.
//!
//! Durability: a log append is acknowledged to openraft only after its WriteBatch is written with
//! `sync = true`; votes, truncations and purges are synced too. State machine writes are not
//! synced on their own: the log they come from is durable, and every later synced write flushes
//! them, so a crash at worst re-applies committed entries, which the applied log id makes exact.

mod audit;
mod db;
mod envelope;
/// The stored-record envelope (a format byte, then bincode with a decode limit).
pub use envelope::{DECODE_LIMIT, decode as decode_record, encode as encode_record};
mod error;
mod log_store;
mod metrics;
mod mvcc;
mod snapshot;
mod state_machine;

use std::{fmt, path::Path};

pub use db::db_size;
pub use error::StoreError;
pub use log_store::LogStore;
pub use metrics::StoreMetrics;
pub use mvcc::{Counters, HISTORY_WINDOW};
pub use snapshot::{SnapshotFile, SnapshotHeader, read_header, restore_into};
pub use state_machine::{AuditAppended, KvReader, StateMachine, WatchBatch, WatchEvents};

use berth_types::{Command, CommandError, CommandResult};
use serde::{Deserialize, Serialize};

/// What one Raft entry carries: a batch of commands, so that many client writes share one entry,
/// one fsync and one AppendEntries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Batch {
    pub commands: Vec<Command>,
}

impl fmt::Display for Batch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "batch of {} commands", self.commands.len())
    }
}

/// The result of each command of a [`Batch`], in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct BatchResponse {
    pub results: Vec<Result<CommandResult, CommandError>>,
}

openraft::declare_raft_types!(
    /// berth's openraft configuration.
    pub TypeConfig:
        D = Batch,
        R = BatchResponse,
        NodeId = u64,
        Node = openraft::BasicNode,
);

pub type Raft = openraft::Raft<TypeConfig, StateMachine>;

/// Opens (or creates) the store under `dir`: RocksDB in `dir/db`, snapshots in `dir/snapshots`.
pub fn open(dir: &Path) -> Result<(LogStore, StateMachine), StoreError> {
    let db = db::open(&dir.join("db"))?;
    let metrics = StoreMetrics::default();
    let log = LogStore::new(db.clone(), metrics.clone())?;
    let sm = StateMachine::new(db, dir.join("snapshots"), metrics)?;
    Ok((log, sm))
}

#[cfg(test)]
mod suite_tests;
