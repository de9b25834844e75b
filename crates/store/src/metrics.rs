//! The store's own figures: how long log appends, fsyncs and applies take, and what snapshots
//! weigh. The handles are `prometheus-client` metrics (a library, no network code); the master
//! registers them with its endpoint.

use prometheus_client::{
    metrics::{
        counter::Counter,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

/// Shared by the log, the state machine and their readers. Cheap to update: atomics, and one
/// short lock per histogram observation.
#[derive(Debug, Clone)]
pub struct StoreMetrics {
    /// Writing one append's batch into RocksDB (before its fsync).
    pub log_append_seconds: Histogram,
    /// One group fsync of the WAL.
    pub log_fsync_seconds: Histogram,
    /// Appends acknowledged by one fsync.
    pub log_fsync_appends: Histogram,
    /// One apply call (one or more committed entries) into the state machine.
    pub apply_seconds: Histogram,
    /// Commands applied (a Raft entry carries a batch of them).
    pub applied_commands: Counter,
    /// Raft log entries appended to this master's log.
    pub log_entries: Counter,
    /// Bytes of those entries, as stored.
    pub log_bytes: Counter,
    /// Size of the last snapshot built or installed.
    pub snapshot_bytes: Gauge,
    pub snapshots_built: Counter,
    pub snapshots_installed: Counter,
}

impl Default for StoreMetrics {
    fn default() -> Self {
        let seconds = || Histogram::new(exponential_buckets(0.00005, 2.0, 18));
        StoreMetrics {
            log_append_seconds: seconds(),
            log_fsync_seconds: seconds(),
            log_fsync_appends: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            apply_seconds: seconds(),
            applied_commands: Counter::default(),
            log_entries: Counter::default(),
            log_bytes: Counter::default(),
            snapshot_bytes: Gauge::default(),
            snapshots_built: Counter::default(),
            snapshots_installed: Counter::default(),
        }
    }
}

impl StoreMetrics {
    /// Registers every figure under `berth_raft_` (log and snapshots) and `berth_store_` (apply).
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "berth_raft_log_append_seconds",
            "Time to write one batch of Raft log entries into RocksDB, before its fsync",
            self.log_append_seconds.clone(),
        );
        r.register(
            "berth_raft_log_fsync_seconds",
            "Time of one group fsync of the Raft log (RocksDB's WAL)",
            self.log_fsync_seconds.clone(),
        );
        r.register(
            "berth_raft_log_fsync_appends",
            "Log appends made durable by one fsync",
            self.log_fsync_appends.clone(),
        );
        r.register(
            "berth_store_apply_seconds",
            "Time to apply committed entries to the state machine (one apply call)",
            self.apply_seconds.clone(),
        );
        r.register(
            "berth_store_applied_commands",
            "Commands applied to the state machine",
            self.applied_commands.clone(),
        );
        r.register(
            "berth_raft_log_entries",
            "Raft log entries appended to this master's log",
            self.log_entries.clone(),
        );
        r.register("berth_raft_log_bytes", "Bytes of the Raft log entries appended, as stored", self.log_bytes.clone());
        r.register(
            "berth_raft_snapshot_bytes",
            "Size of the last snapshot this master built or installed",
            self.snapshot_bytes.clone(),
        );
        r.register("berth_raft_snapshots_built", "Snapshots this master built", self.snapshots_built.clone());
        r.register(
            "berth_raft_snapshots_installed",
            "Snapshots this master installed from a leader",
            self.snapshots_installed.clone(),
        );
    }
}
