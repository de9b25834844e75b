//! The replicated state machine (openraft `RaftStateMachine`) and read access to it.

use std::{
    io,
    path::{Path, PathBuf},
    sync::Arc,
};

use berth_types::{Event, KeyValue, RangeQuery, RangeResult, Revision, key_in_range};
use futures::TryStreamExt;
use openraft::{
    EntryPayload, OptionalSend, StoredMembership,
    alias::{LogIdOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf},
    storage::{EntryResponder, RaftSnapshotBuilder, RaftStateMachine, Snapshot},
};
use rocksdb::DB;
use tokio::sync::{broadcast, oneshot};

use crate::{
    BatchResponse, StoreError, StoreMetrics, TypeConfig,
    db::{CF_SM, cf},
    envelope::encode,
    mvcc::{self, Apply, Counters, SnapView},
    snapshot::{self, SM_APPLIED, SM_MEMBERSHIP, SnapshotFile, SnapshotHeader},
};

/// The changes of one applied batch, broadcast to watchers.
#[derive(Debug, Clone)]
pub struct WatchBatch {
    pub events: Vec<(Revision, Event)>,
    /// The store was replaced by a snapshot: watchers must start over.
    pub reset: bool,
    /// The batch changed more than [`WATCH_BATCH_BYTES`] through this revision: its events are
    /// not in `events`, and watchers read them from the history.
    pub omitted_through: Revision,
}

/// Batches the watch broadcast keeps for watchers that are behind. A watcher that falls further
/// back reads what it missed from the history.
const WATCH_SLOTS: usize = 128;
/// The most bytes of keys and values one broadcast batch carries. The broadcast keeps its last
/// [`WATCH_SLOTS`] batches whether or not anyone still needs them, so this bounds what it holds
/// (with 1,024 unbounded slots a 100,000-task run kept gigabytes of old task records on every
/// master). A larger batch (a big apply, a burst of status commits) is read from the history by
/// each watcher instead.
const WATCH_BATCH_BYTES: usize = 128 * 1024;

impl WatchBatch {
    /// What to broadcast of an applied batch's events: them, or where they end when they are too
    /// many bytes. None for no events.
    fn of(events: Vec<(Revision, u32, Event)>) -> Option<WatchBatch> {
        let (last, _, _) = events.last()?;
        let kv = |kv: &KeyValue| kv.key.len() + kv.value.len() + 48;
        let bytes: usize = events.iter().map(|(_, _, e)| kv(&e.kv) + e.prev_kv.as_ref().map_or(0, kv)).sum();
        Some(if bytes > WATCH_BATCH_BYTES {
            WatchBatch { events: Vec::new(), reset: false, omitted_through: *last }
        } else {
            WatchBatch {
                events: events.into_iter().map(|(rev, _, e)| (rev, e)).collect(),
                reset: false,
                omitted_through: 0,
            }
        })
    }
}

struct Shared {
    db: Arc<DB>,
    snap_dir: PathBuf,
    watch_tx: broadcast::Sender<Arc<WatchBatch>>,
    /// Audit records as they are applied, for the audit log's followers.
    audit_tx: broadcast::Sender<Arc<AuditAppended>>,
    metrics: StoreMetrics,
}

/// Audit records an apply call stored (none after a snapshot install), and the `seq` of the
/// next one: a follower that missed some (it lagged, or a snapshot replaced the log) reads them
/// from the store.
#[derive(Debug)]
pub struct AuditAppended {
    pub records: Vec<berth_types::AuditRecord>,
    pub next: u64,
}

/// The state machine handed to openraft.
pub struct StateMachine {
    shared: Arc<Shared>,
}

/// Read-only access to the state machine, for API servers. Cheap to clone.
#[derive(Clone)]
pub struct KvReader {
    shared: Arc<Shared>,
}

impl StateMachine {
    pub(crate) fn new(db: Arc<DB>, snap_dir: PathBuf, metrics: StoreMetrics) -> Result<Self, StoreError> {
        std::fs::create_dir_all(&snap_dir)?;
        snapshot::list(&snap_dir)?; // clears temp files a crash may have left
        let (watch_tx, _) = broadcast::channel(WATCH_SLOTS);
        let (audit_tx, _) = broadcast::channel(256);
        Ok(StateMachine { shared: Arc::new(Shared { db, snap_dir, watch_tx, audit_tx, metrics }) })
    }

    pub fn reader(&self) -> KvReader {
        KvReader { shared: self.shared.clone() }
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotFile;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogIdOf<TypeConfig>>, StoredMembershipOf<TypeConfig>), io::Error> {
        let db = &*self.shared.db;
        Ok((snapshot::read_applied(db)?, snapshot::read_membership(db)?))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: futures::Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        let db = &*self.shared.db;
        let started = std::time::Instant::now();
        let mut apply = Apply::new(db)?;
        let mut applied = None;
        let mut membership = None;
        let mut responders = Vec::new();
        while let Some((entry, responder)) = entries.try_next().await? {
            let resp = match entry.payload {
                EntryPayload::Blank => BatchResponse::default(),
                EntryPayload::Normal(batch) => {
                    self.shared.metrics.applied_commands.inc_by(batch.commands.len() as u64);
                    BatchResponse { results: apply.entry(batch.commands)? }
                }
                EntryPayload::Membership(m) => {
                    membership = Some(StoredMembership::new(Some(entry.log_id), m));
                    BatchResponse::default()
                }
            };
            applied = Some(entry.log_id);
            if let Some(r) = responder {
                responders.push((r, resp));
            }
        }
        apply.finish();
        let sm = cf(db, CF_SM);
        apply.batch.put_cf(sm, SM_APPLIED, encode(&applied));
        if let Some(m) = &membership {
            apply.batch.put_cf(sm, SM_MEMBERSHIP, encode(m));
        }
        let events = std::mem::take(&mut apply.events);
        db.write(std::mem::take(&mut apply.batch))
            .map_err(|e| io::Error::other(format!("applying to the state machine failed: {e}")))?;
        self.shared.metrics.apply_seconds.observe(started.elapsed().as_secs_f64());
        if let Some(next) = apply.audit_next() {
            let records = std::mem::take(&mut apply.audit_appended);
            let _ = self.shared.audit_tx.send(Arc::new(AuditAppended { records, next }));
        }
        // The writers hear first, the watchers after: waking every watcher (controllers, the
        // audit file, clients' watches) before the answer put them ahead of it on a busy host.
        for (r, resp) in responders {
            r.send(resp);
        }
        if let Some(batch) = WatchBatch::of(events) {
            let _ = self.shared.watch_tx.send(Arc::new(batch));
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder::start(self.shared.clone())
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMetaOf<TypeConfig>,
        snapshot: SnapshotFile,
    ) -> Result<(), io::Error> {
        let shared = self.shared.clone();
        let meta = meta.clone();
        tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
            let header = snapshot::load_into_db(
                &shared.db,
                &snapshot.path,
                meta.last_log_id,
                meta.last_membership.clone(),
                None,
            )?;
            let adopted = snapshot::adopt(&snapshot.path, &shared.snap_dir, &header)?;
            snapshot::prune(&shared.snap_dir)?;
            shared.metrics.snapshots_installed.inc();
            if let Ok(m) = std::fs::metadata(&adopted) {
                shared.metrics.snapshot_bytes.set(m.len() as i64);
            }
            Ok(())
        })
        .await
        .map_err(io::Error::other)??;
        let _ = self.shared.watch_tx.send(Arc::new(WatchBatch { events: vec![], reset: true, omitted_through: 0 }));
        let next = crate::audit::read_next(&*self.shared.db)?;
        let _ = self.shared.audit_tx.send(Arc::new(AuditAppended { records: vec![], next }));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<SnapshotOf<TypeConfig, SnapshotFile>>, io::Error> {
        let Some(path) = snapshot::list(&self.shared.snap_dir)?.pop() else {
            return Ok(None);
        };
        let header = snapshot::read_header(&path)?;
        Ok(Some(Snapshot { meta: header.meta, snapshot: SnapshotFile { path } }))
    }
}

/// Builds a snapshot on its own thread from a RocksDB snapshot taken when the builder is created,
/// so that it is consistent with the applied state at that moment while `apply` goes on.
pub struct SnapshotBuilder {
    result: Option<oneshot::Receiver<Result<(PathBuf, SnapshotHeader), StoreError>>>,
    snap_dir: PathBuf,
    metrics: StoreMetrics,
}

impl SnapshotBuilder {
    fn start(shared: Arc<Shared>) -> Self {
        let (taken_tx, taken_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = oneshot::channel();
        let snap_dir = shared.snap_dir.clone();
        let metrics = shared.metrics.clone();
        std::thread::Builder::new()
            .name("snapshot-builder".into())
            .spawn(move || {
                let view = SnapView::new(&shared.db);
                let _ = taken_tx.send(());
                let res = snapshot::write_snapshot(&view, &shared.snap_dir, snapshot::Purpose::Replication);
                let _ = done_tx.send(res);
            })
            .expect("spawning the snapshot builder thread");
        // Wait until the RocksDB snapshot exists: from here on, apply may continue.
        let _ = taken_rx.recv();
        SnapshotBuilder { result: Some(done_rx), snap_dir, metrics }
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = SnapshotFile;

    async fn build_snapshot(&mut self) -> Result<SnapshotOf<TypeConfig, SnapshotFile>, io::Error> {
        let rx = self.result.take().ok_or_else(|| io::Error::other("snapshot builder used twice"))?;
        let (path, header) = rx.await.map_err(|_| io::Error::other("snapshot builder thread died"))??;
        snapshot::prune(&self.snap_dir)?;
        self.metrics.snapshots_built.inc();
        if let Ok(m) = std::fs::metadata(&path) {
            self.metrics.snapshot_bytes.set(m.len() as i64);
        }
        Ok(Snapshot { meta: header.meta, snapshot: SnapshotFile { path } })
    }
}

/// What a watcher receives next.
#[derive(Debug)]
pub enum WatchEvents {
    Events(Vec<(Revision, Event)>),
    /// The requested revision is no longer in the history.
    Compacted {
        compact_revision: Revision,
    },
    /// This master's state was replaced by a snapshot; start over from `revision`.
    Reset {
        revision: Revision,
    },
}

/// A live watch over a key range from a revision, built on history + the apply broadcast.
pub struct Watcher {
    reader: KvReader,
    key: Vec<u8>,
    range_end: Vec<u8>,
    rx: broadcast::Receiver<Arc<WatchBatch>>,
    /// Highest revision delivered (or skipped as not matching).
    last: Revision,
    pending: Option<WatchEvents>,
}

impl Watcher {
    pub fn last_revision(&self) -> Revision {
        self.last
    }

    fn catch_up(&mut self, from: Revision) -> Result<WatchEvents, StoreError> {
        let view = SnapView::new(&self.reader.shared.db);
        let counters = mvcc::read_counters(&view)?;
        let compacted = mvcc::readable_from(&view, &counters)?;
        if from <= compacted {
            return Ok(WatchEvents::Compacted { compact_revision: compacted });
        }
        let mut events = Vec::new();
        mvcc::history_from(&view, from, &mut |rev, e| {
            if rev > counters.revision {
                return Ok(false);
            }
            if key_in_range(&self.key, &self.range_end, &e.kv.key) {
                events.push((rev, e));
            }
            Ok(true)
        })?;
        self.last = counters.revision.max(self.last);
        Ok(WatchEvents::Events(events))
    }

    /// What the broadcast did not bring since the last revision delivered, from the history;
    /// None when none of it is in this watch's range.
    fn catch_up_missed(&mut self) -> Result<Option<WatchEvents>, StoreError> {
        Ok(match self.catch_up(self.last + 1)? {
            WatchEvents::Events(ev) if ev.is_empty() => None,
            other => Some(other),
        })
    }

    /// The next events (never empty), a compaction or a reset.
    pub async fn next(&mut self) -> Result<WatchEvents, StoreError> {
        if let Some(p) = self.pending.take() {
            match p {
                WatchEvents::Events(ev) if ev.is_empty() => {}
                other => return Ok(other),
            }
        }
        loop {
            match self.rx.recv().await {
                Ok(batch) => {
                    if batch.reset {
                        let c = self.reader.counters()?;
                        self.last = c.revision;
                        return Ok(WatchEvents::Reset { revision: c.revision });
                    }
                    if batch.omitted_through > self.last {
                        // Too large to broadcast: read from the history (already written).
                        if let Some(out) = self.catch_up_missed()? {
                            return Ok(out);
                        }
                        continue;
                    }
                    let mut out = Vec::new();
                    for (rev, e) in batch.events.iter() {
                        if *rev > self.last && key_in_range(&self.key, &self.range_end, &e.kv.key) {
                            out.push((*rev, e.clone()));
                        }
                    }
                    if let Some((rev, _)) = batch.events.last() {
                        self.last = self.last.max(*rev);
                    }
                    if !out.is_empty() {
                        return Ok(WatchEvents::Events(out));
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    // We fell behind the broadcast: read what we missed from the history.
                    if let Some(out) = self.catch_up_missed()? {
                        return Ok(out);
                    }
                }
                Err(broadcast::error::RecvError::Closed) => {
                    return Err(StoreError::Io(io::Error::other("the state machine was shut down")));
                }
            }
        }
    }
}

impl KvReader {
    /// A range read against a consistent view of the applied state.
    pub fn range(&self, q: &RangeQuery) -> Result<(RangeResult, Counters), StoreError> {
        let view = SnapView::new(&self.shared.db);
        mvcc::range(&view, q)
    }

    pub fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, StoreError> {
        let q = RangeQuery { key: key.to_vec(), ..Default::default() };
        Ok(self.range(&q)?.0.kvs.pop())
    }

    pub fn counters(&self) -> Result<Counters, StoreError> {
        mvcc::read_counters(&*self.shared.db)
    }

    pub fn cluster_id(&self) -> Result<Option<String>, StoreError> {
        mvcc::read_cluster_id(&*self.shared.db)
    }

    /// The cluster CA, once the first leader has recorded it.
    pub fn ca(&self) -> Result<Option<berth_types::ClusterCa>, StoreError> {
        mvcc::read_ca(&*self.shared.db)
    }

    /// The audit records from `from` on, oldest first: whole log entries' worth, until at
    /// least `limit` of them (see [`berth_types::Command::Stamped`]).
    pub fn audit_from(&self, from: u64, limit: usize) -> Result<Vec<berth_types::AuditRecord>, StoreError> {
        crate::audit::read_from(&self.shared.db, from, limit)
    }

    /// The audit records made at or after `since_ms`, oldest first.
    pub fn audit_since(&self, since_ms: i64) -> Result<Vec<berth_types::AuditRecord>, StoreError> {
        crate::audit::read_since(&self.shared.db, since_ms)
    }

    /// The `seq` of the next audit record.
    pub fn audit_next(&self) -> Result<u64, StoreError> {
        crate::audit::read_next(&*self.shared.db)
    }

    /// The `seq` of the oldest audit record kept, and of the next one to come.
    pub fn audit_bounds(&self) -> Result<(u64, u64), StoreError> {
        crate::audit::bounds(&self.shared.db)
    }

    /// The `seq` that begins the oldest stored group of audit records holding one made at or
    /// after `ms`: retention may drop everything below it.
    pub fn audit_first_since(&self, ms: i64) -> Result<u64, StoreError> {
        crate::audit::first_entry_since(&self.shared.db, ms)
    }

    /// The audit records as they are applied (see [`AuditAppended`]).
    pub fn audit_subscribe(&self) -> broadcast::Receiver<Arc<AuditAppended>> {
        self.shared.audit_tx.subscribe()
    }

    /// Ids of masters removed from the cluster; they are never accepted again.
    pub fn removed_members(&self) -> Result<std::collections::BTreeSet<u64>, StoreError> {
        mvcc::read_removed(&*self.shared.db)
    }

    pub fn applied(&self) -> Result<Option<LogIdOf<TypeConfig>>, StoreError> {
        snapshot::read_applied(&*self.shared.db)
    }

    pub fn membership(&self) -> Result<StoredMembershipOf<TypeConfig>, StoreError> {
        snapshot::read_membership(&*self.shared.db)
    }

    pub fn db_size(&self) -> u64 {
        crate::db::db_size(&self.shared.db)
    }

    /// RocksDB's estimate of the live keys in the key space (cheap: no scan).
    pub fn estimate_keys(&self) -> u64 {
        crate::db::estimate_keys(&self.shared.db)
    }

    /// The store's latency and snapshot figures, to register with a metrics endpoint.
    pub fn metrics(&self) -> &StoreMetrics {
        &self.shared.metrics
    }

    /// Starts a watch on `[key, range_end)` from `start_revision` (0 = from now on).
    /// The first call to `next` returns the history since `start_revision`, if any.
    pub fn watch(&self, key: Vec<u8>, range_end: Vec<u8>, start_revision: Revision) -> Result<Watcher, StoreError> {
        // Subscribe first, then read history, so that nothing falls between the two.
        let rx = self.shared.watch_tx.subscribe();
        // Nothing below `start_revision` is ever delivered, also on a master that has not yet
        // applied that far: its catch-up finds nothing, and the live events that then arrive
        // must not include the ones the client already has. (Starting from 0 here once re-sent
        // them to a client resuming on a lagging master: found by the chaos suite.)
        let last = start_revision.saturating_sub(1).max(0);
        let mut w = Watcher { reader: self.clone(), key, range_end, rx, last, pending: None };
        if start_revision > 0 {
            w.pending = Some(w.catch_up(start_revision)?);
        } else {
            w.last = self.counters()?.revision;
        }
        Ok(w)
    }

    /// Writes a consistent backup of the applied state into `dir` and returns its path and header.
    pub fn backup(&self, dir: &Path) -> Result<(PathBuf, SnapshotHeader), StoreError> {
        let view = SnapView::new(&self.shared.db);
        snapshot::write_snapshot(&view, dir, snapshot::Purpose::Backup)
    }
}

#[cfg(test)]
mod tests {
    use berth_types::{EventKind, KeyValue};

    use super::*;

    fn event(rev: Revision, key: &str) -> (Revision, Event) {
        let kv = KeyValue {
            key: key.as_bytes().to_vec(),
            value: b"v".to_vec(),
            create_revision: rev,
            mod_revision: rev,
            version: 1,
        };
        (rev, Event { kind: EventKind::Put, kv, prev_kv: None })
    }

    /// Regression (found by the chaos suite): a client that resumes a watch from revision R on a
    /// master that has applied less than R must not get the events below R again when that master
    /// catches up.
    #[tokio::test]
    async fn a_watch_from_a_future_revision_skips_what_came_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let (_log, sm) = crate::open(dir.path()).unwrap();
        let reader = sm.reader();
        assert_eq!(reader.counters().unwrap().revision, 0);
        let mut w = reader.watch(b"k".to_vec(), b"l".to_vec(), 6).unwrap();
        assert_eq!(w.last_revision(), 5, "the watch starts after the revision before its start");
        let batch = WatchBatch { events: (1..=7).map(|r| event(r, "k1")).collect(), reset: false, omitted_through: 0 };
        sm.shared.watch_tx.send(Arc::new(batch)).unwrap();
        let WatchEvents::Events(got) = w.next().await.unwrap() else { panic!("expected events") };
        let revs: Vec<Revision> = got.iter().map(|(r, _)| *r).collect();
        assert_eq!(revs, vec![6, 7]);
    }

    // A batch too large for the broadcast reaches a watcher through the history, whole, in order,
    // and filtered to its range; a small one after it still comes from the broadcast.
    #[tokio::test]
    async fn a_batch_too_large_to_broadcast_is_read_from_the_history() {
        use berth_types::{Command, Txn};
        let dir = tempfile::tempdir().unwrap();
        let (_log, sm) = crate::open(dir.path()).unwrap();
        let reader = sm.reader();
        let mut w = reader.watch(b"k".to_vec(), b"l".to_vec(), 0).unwrap();
        let db = &*sm.shared.db;
        let big = "x".repeat(WATCH_BATCH_BYTES);
        let applied = |cmds: Vec<Command>| {
            let mut a = Apply::new(db).unwrap();
            a.entry(cmds).unwrap();
            a.finish();
            let events = std::mem::take(&mut a.events);
            db.write(std::mem::take(&mut a.batch)).unwrap();
            WatchBatch::of(events).unwrap()
        };
        let batch = applied(vec![
            Command::Txn(Txn::put("k1", big.as_str())),
            Command::Txn(Txn::put("other", "no")),
            Command::Txn(Txn::put("k2", "small")),
        ]);
        assert!(batch.events.is_empty() && batch.omitted_through == 3, "{batch:?}");
        sm.shared.watch_tx.send(Arc::new(batch)).unwrap();
        let small = applied(vec![Command::Txn(Txn::put("k3", "small"))]);
        assert_eq!(small.events.len(), 1);
        sm.shared.watch_tx.send(Arc::new(small)).unwrap();
        let mut got = Vec::new();
        while got.len() < 3 {
            let WatchEvents::Events(ev) = w.next().await.unwrap() else { panic!("expected events") };
            got.extend(ev.into_iter().map(|(rev, e)| (rev, String::from_utf8(e.kv.key).unwrap(), e.kv.value.len())));
        }
        let want = vec![(1, "k1".to_string(), WATCH_BATCH_BYTES), (3, "k2".into(), 5), (4, "k3".into(), 5)];
        assert_eq!(got, want);
    }
}
