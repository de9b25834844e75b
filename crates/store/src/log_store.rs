//! The Raft log on RocksDB (openraft `RaftLogStorage`).

use std::{fmt::Debug, io, ops::RangeBounds, sync::Arc};

use openraft::{
    OptionalSend,
    alias::{EntryOf, LogIdOf, VoteOf},
    entry::RaftEntry,
    storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage},
};
use rocksdb::{DB, Direction, IteratorMode, WriteBatch, WriteOptions};

use crate::{
    StoreError, StoreMetrics, TypeConfig,
    db::{CF_LOG, CF_RAFT, cf, log_key, log_key_index},
    envelope::{decode, encode},
};

const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_PURGED: &[u8] = b"purged";

/// The Raft log. Cheap to clone: it is a handle on the shared RocksDB.
///
/// Appends are group-committed: `append` writes its WriteBatch to RocksDB (WAL included, so the
/// entries are readable at once) and hands the flush callback to the syncer thread, which syncs the
/// WAL once for every callback waiting and only then acknowledges them. Replication to followers can
/// thus start while the leader's own fsync is in flight, and concurrent appends share one fsync.
/// Until then the entries may be only in RocksDB's WAL buffer, lost if the process dies; that is
/// safe because a restarted leader must win a new term (`enable_leader_restore` off, see
/// `raft_config`).
#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
    metrics: StoreMetrics,
    syncer: std::sync::mpsc::Sender<IOFlushed<TypeConfig>>,
}

/// Syncs the WAL for every waiting append, then acknowledges them, in order.
///
/// It holds the DB only weakly (and strongly only while syncing), so the DB closes when its
/// owners drop it, not whenever this thread gets round to it: a RocksDB still open while the
/// process exits aborts in its static destructors.
fn run_syncer(db: std::sync::Weak<DB>, rx: std::sync::mpsc::Receiver<IOFlushed<TypeConfig>>, metrics: StoreMetrics) {
    while let Ok(first) = rx.recv() {
        let mut waiting = vec![first];
        while let Ok(cb) = rx.try_recv() {
            waiting.push(cb);
        }
        let started = std::time::Instant::now();
        let res = match db.upgrade() {
            Some(db) => db.flush_wal(true).map_err(|e| e.to_string()),
            None => Err("the database was closed".to_string()),
        };
        metrics.log_fsync_seconds.observe(started.elapsed().as_secs_f64());
        metrics.log_fsync_appends.observe(waiting.len() as f64);
        for cb in waiting {
            cb.io_completed(
                res.clone().map_err(|e| io::Error::other(format!("syncing the Raft log to disk failed: {e}"))),
            );
        }
    }
}

fn synced() -> WriteOptions {
    let mut o = WriteOptions::default();
    o.set_sync(true);
    o
}

impl LogStore {
    pub(crate) fn new(db: Arc<DB>, metrics: StoreMetrics) -> Result<Self, StoreError> {
        let (syncer, rx) = std::sync::mpsc::channel();
        let sync_db = Arc::downgrade(&db);
        let sync_metrics = metrics.clone();
        std::thread::Builder::new()
            .name("raft-log-sync".into())
            .spawn(move || run_syncer(sync_db, rx, sync_metrics))?;
        Ok(LogStore { db, metrics, syncer })
    }

    fn get_meta<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StoreError> {
        self.db
            .get_cf(cf(&self.db, CF_RAFT), key)?
            .map(|b| decode(&b, std::str::from_utf8(key).unwrap_or("raft meta")))
            .transpose()
    }

    /// Writes a batch with `sync = true` on a blocking thread, so the runtime keeps serving.
    async fn write_synced(&self, batch: WriteBatch) -> Result<(), io::Error> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.write_opt(batch, &synced()))
            .await
            .map_err(io::Error::other)?
            .map_err(|e| io::Error::other(format!("RocksDB write of the Raft log failed: {e}")))
    }

    fn last_entry_log_id(&self) -> Result<Option<LogIdOf<TypeConfig>>, StoreError> {
        let mut it = self.db.iterator_cf(cf(&self.db, CF_LOG), IteratorMode::End);
        match it.next() {
            Some(item) => {
                let (_, v) = item?;
                let e: EntryOf<TypeConfig> = decode(&v, "log entry")?;
                Ok(Some(e.log_id()))
            }
            None => Ok(None),
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<EntryOf<TypeConfig>>, io::Error> {
        use std::ops::Bound;
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s + 1,
            Bound::Unbounded => 0,
        };
        let mut out = Vec::new();
        let it = self.db.iterator_cf(cf(&self.db, CF_LOG), IteratorMode::From(&log_key(start), Direction::Forward));
        for item in it {
            let (k, v) = item.map_err(|e| io::Error::other(e.to_string()))?;
            let idx = log_key_index(&k);
            if !range.contains(&idx) {
                break;
            }
            out.push(decode(&v, "log entry")?);
        }
        Ok(out)
    }

    async fn read_vote(&mut self) -> Result<Option<VoteOf<TypeConfig>>, io::Error> {
        Ok(self.get_meta(KEY_VOTE)?)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let last_purged_log_id: Option<LogIdOf<TypeConfig>> = self.get_meta(KEY_PURGED)?;
        let last_log_id = self.last_entry_log_id()?.or(last_purged_log_id);
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &VoteOf<TypeConfig>) -> Result<(), io::Error> {
        let mut b = WriteBatch::default();
        b.put_cf(cf(&self.db, CF_RAFT), KEY_VOTE, encode(vote));
        self.write_synced(b).await
    }

    async fn save_committed(&mut self, committed: Option<LogIdOf<TypeConfig>>) -> Result<(), io::Error> {
        // Not synced on its own: losing it only means re-applying committed entries after a crash.
        self.db
            .put_cf(cf(&self.db, CF_RAFT), KEY_COMMITTED, encode(&committed))
            .map_err(|e| io::Error::other(e.to_string()))
    }

    async fn read_committed(&mut self) -> Result<Option<LogIdOf<TypeConfig>>, io::Error> {
        Ok(self.get_meta::<Option<LogIdOf<TypeConfig>>>(KEY_COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = EntryOf<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut b = WriteBatch::default();
        let log_cf = cf(&self.db, CF_LOG);
        let (mut n, mut bytes) = (0u64, 0u64);
        for e in entries {
            let v = encode(&e);
            n += 1;
            bytes += v.len() as u64;
            b.put_cf(log_cf, log_key(e.index()), v);
        }
        // Readable as soon as this returns; durable (and acknowledged) once the syncer has synced
        // the WAL.
        let started = std::time::Instant::now();
        self.db.write(b).map_err(|e| io::Error::other(format!("writing the Raft log failed: {e}")))?;
        self.metrics.log_append_seconds.observe(started.elapsed().as_secs_f64());
        self.metrics.log_entries.inc_by(n);
        self.metrics.log_bytes.inc_by(bytes);
        self.syncer.send(callback).map_err(|_| io::Error::other("the Raft log syncer thread has stopped"))?;
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogIdOf<TypeConfig>>) -> Result<(), io::Error> {
        let from = last_log_id.map_or(0, |l| l.index() + 1);
        let mut b = WriteBatch::default();
        b.delete_range_cf(cf(&self.db, CF_LOG), log_key(from), log_key(u64::MAX));
        if from == u64::MAX {
            return Ok(());
        }
        self.write_synced(b).await
    }

    async fn purge(&mut self, log_id: LogIdOf<TypeConfig>) -> Result<(), io::Error> {
        let mut b = WriteBatch::default();
        b.put_cf(cf(&self.db, CF_RAFT), KEY_PURGED, encode(&log_id));
        b.delete_range_cf(cf(&self.db, CF_LOG), log_key(0), log_key(log_id.index() + 1));
        self.write_synced(b).await
    }
}
