//! The MVCC key-value model on RocksDB: current values in `kv`, every change (with the value it
//! replaced) in `hist`. A read at an old revision R starts from the current values and undoes,
//! per key, the first change made after R, so it costs the history since R, which compaction
//! bounds.

use std::collections::BTreeMap;

use berth_types::{
    AuditRecord, Command, CommandError, CommandResult, DeleteResult, Event, EventKind, KeyValue, OpResult, PutResult,
    RangeQuery, RangeResult, RequestOp, Revision, Txn, TxnResult, key_in_range,
};
use rocksdb::{DB, Direction, IteratorMode, SnapshotWithThreadMode, WriteBatch};
use serde::{Deserialize, Serialize};

use crate::{
    StoreError,
    db::{CF_AUDIT, CF_HIST, CF_KV, CF_SM, audit_key, cf, hist_key},
    envelope::{decode, encode},
};

/// How many revisions of history are kept before the oldest are compacted automatically
/// (etcd keeps everything until told; Kubernetes compacts every 5 minutes). Watches and reads at
/// a revision work inside this window. Deterministic, so every replica compacts at the same point.
pub const HISTORY_WINDOW: Revision = 100_000;

pub(crate) const SM_COUNTERS: &[u8] = b"counters";
pub(crate) const SM_CLUSTER_ID: &[u8] = b"cluster_id";
pub(crate) const SM_REMOVED: &[u8] = b"removed_members";
pub(crate) const SM_CA: &[u8] = b"cluster_ca";
/// This replica's own history floor (not replicated): after a snapshot install it holds no
/// history before the snapshot's revision, whatever the cluster's compaction point is.
pub(crate) const SM_HISTORY_FLOOR: &[u8] = b"history_floor";

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub revision: Revision,
    /// The cluster's compaction point: replicated, the same on every master at a given revision.
    /// `Compact` commands and automatic compaction decide on it alone, so that every replica
    /// applies them alike. Reads and watches also respect this replica's history floor.
    pub compact_revision: Revision,
}

/// Visitor of (key, value) pairs in a scan; returns false to stop.
pub(crate) type ScanFn<'a> = dyn FnMut(&[u8], &[u8]) -> Result<bool, StoreError> + 'a;

/// Read access to a consistent view: the live DB (for the single writer) or a RocksDB snapshot.
pub(crate) trait View {
    fn get(&self, cf: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Calls `f` for each entry from `from` on, in key order, until it returns false.
    fn scan(&self, cf: &str, from: &[u8], f: &mut ScanFn<'_>) -> Result<(), StoreError>;
}

impl View for DB {
    fn get(&self, name: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.get_cf(cf(self, name), key)?)
    }

    fn scan(&self, name: &str, from: &[u8], f: &mut ScanFn<'_>) -> Result<(), StoreError> {
        for item in self.iterator_cf(cf(self, name), IteratorMode::From(from, Direction::Forward)) {
            let (k, v) = item?;
            if !f(&k, &v)? {
                break;
            }
        }
        Ok(())
    }
}

/// A RocksDB snapshot together with its DB (the column family handles live on the DB).
pub(crate) struct SnapView<'a> {
    pub db: &'a DB,
    pub snap: SnapshotWithThreadMode<'a, DB>,
}

impl<'a> SnapView<'a> {
    pub fn new(db: &'a DB) -> Self {
        SnapView { db, snap: db.snapshot() }
    }
}

impl View for SnapView<'_> {
    fn get(&self, name: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.snap.get_cf(cf(self.db, name), key)?)
    }

    fn scan(&self, name: &str, from: &[u8], f: &mut ScanFn<'_>) -> Result<(), StoreError> {
        let it = self.snap.iterator_cf(cf(self.db, name), IteratorMode::From(from, Direction::Forward));
        for item in it {
            let (k, v) = item?;
            if !f(&k, &v)? {
                break;
            }
        }
        Ok(())
    }
}

pub(crate) fn read_counters(v: &dyn View) -> Result<Counters, StoreError> {
    match v.get(CF_SM, SM_COUNTERS)? {
        Some(b) => decode(&b, "state machine counters"),
        None => Ok(Counters::default()),
    }
}

/// The revision below which this replica has no history: the cluster's compaction point or, after
/// a snapshot install, the snapshot's revision, whichever is later.
pub(crate) fn readable_from(v: &dyn View, counters: &Counters) -> Result<Revision, StoreError> {
    let floor: Revision =
        v.get(CF_SM, SM_HISTORY_FLOOR)?.map(|b| decode(&b, "history floor")).transpose()?.unwrap_or(0);
    Ok(floor.max(counters.compact_revision))
}

pub(crate) fn read_removed(v: &dyn View) -> Result<std::collections::BTreeSet<u64>, StoreError> {
    Ok(v.get(CF_SM, SM_REMOVED)?.map(|b| decode(&b, "removed members")).transpose()?.unwrap_or_default())
}

pub(crate) fn read_ca(v: &dyn View) -> Result<Option<berth_types::ClusterCa>, StoreError> {
    v.get(CF_SM, SM_CA)?.map(|b| decode(&b, "cluster CA")).transpose()
}

/// The audit record of a log written before [`Command::Stamped`]: a JSON object.
fn legacy_record(at_ms: i64, json: &[u8]) -> AuditRecord {
    #[derive(Deserialize, Default)]
    #[serde(default)]
    struct Legacy {
        identity: String,
        verb: String,
        resource: String,
        namespace: String,
        name: String,
        master: u64,
    }
    let l: Legacy = serde_json::from_slice(json).unwrap_or_default();
    AuditRecord {
        at_ms,
        identity: l.identity,
        verb: l.verb,
        resource: l.resource,
        namespace: l.namespace,
        name: l.name,
        master: l.master,
        ..Default::default()
    }
}

pub(crate) fn read_cluster_id(v: &dyn View) -> Result<Option<String>, StoreError> {
    v.get(CF_SM, SM_CLUSTER_ID)?.map(|b| decode(&b, "cluster id")).transpose()
}

fn get_kv(v: &dyn View, key: &[u8]) -> Result<Option<KeyValue>, StoreError> {
    v.get(CF_KV, key)?.map(|b| decode(&b, "key-value")).transpose()
}

/// Every current key-value in the query's range, in key order (no limit applied).
fn scan_current(
    v: &dyn View,
    q_key: &[u8],
    q_end: &[u8],
    f: &mut dyn FnMut(KeyValue) -> Result<bool, StoreError>,
) -> Result<(), StoreError> {
    if q_end.is_empty() {
        if let Some(kv) = get_kv(v, q_key)? {
            f(kv)?;
        }
        return Ok(());
    }
    v.scan(CF_KV, q_key, &mut |k, val| {
        if !key_in_range(q_key, q_end, k) {
            return Ok(false);
        }
        f(decode(val, "key-value")?)
    })
}

/// Shapes the matched key-values (in key order) into a result: limit, keys_only, count_only.
fn finish_range(q: &RangeQuery, kvs: impl Iterator<Item = KeyValue>) -> RangeResult {
    let mut out = RangeResult::default();
    for mut kv in kvs {
        out.count += 1;
        if q.count_only {
            continue;
        }
        if q.limit > 0 && out.kvs.len() as i64 >= q.limit {
            out.more = true;
            continue;
        }
        if q.keys_only {
            kv.value.clear();
        }
        out.kvs.push(kv);
    }
    out
}

/// A read outside the state machine's apply path, against a snapshot.
pub(crate) fn range(v: &dyn View, q: &RangeQuery) -> Result<(RangeResult, Counters), StoreError> {
    let counters = read_counters(v)?;
    let local = Counters { compact_revision: readable_from(v, &counters)?, ..counters };
    let res = range_at(v, &BTreeMap::new(), &[], local, q)?;
    Ok((res.map_err(StoreError::Command)?, counters))
}

/// Range at the query's revision over `view` + the not-yet-written `overlay` and `pending` events.
fn range_at(
    v: &dyn View,
    overlay: &BTreeMap<Vec<u8>, Option<KeyValue>>,
    pending: &[(Revision, u32, Event)],
    counters: Counters,
    q: &RangeQuery,
) -> Result<Result<RangeResult, CommandError>, StoreError> {
    let at = q.revision;
    if at > counters.revision {
        return Ok(Err(CommandError::FutureRevision { requested: at, current: counters.revision }));
    }
    if at != 0 && at < counters.compact_revision {
        return Ok(Err(CommandError::Compacted { requested: at, compacted: counters.compact_revision }));
    }

    // Current values, as a map so that overlay and history can be folded in.
    let mut current = BTreeMap::new();
    scan_current(v, &q.key, &q.range_end, &mut |kv| {
        current.insert(kv.key.clone(), kv);
        Ok(true)
    })?;
    for (k, val) in overlay.range::<[u8], _>((std::ops::Bound::Included(q.key.as_slice()), std::ops::Bound::Unbounded))
    {
        if !q.contains(k) {
            if q.range_end.is_empty() {
                break;
            }
            continue;
        }
        match val {
            Some(kv) => current.insert(k.clone(), kv.clone()),
            None => current.remove(k),
        };
    }

    if at != 0 && at < counters.revision {
        // Undo changes made after `at`: the first change after `at` to a key holds its value at `at`.
        let mut undone: BTreeMap<Vec<u8>, Option<KeyValue>> = BTreeMap::new();
        let mut visit = |e: &Event| {
            if q.contains(&e.kv.key) && !undone.contains_key(&e.kv.key) {
                undone.insert(e.kv.key.clone(), e.prev_kv.clone());
            }
        };
        v.scan(CF_HIST, &hist_key(at + 1, 0), &mut |_, val| {
            let e: Event = decode(val, "history event")?;
            visit(&e);
            Ok(true)
        })?;
        for (rev, _, e) in pending {
            if *rev > at {
                visit(e);
            }
        }
        for (k, val) in undone {
            match val {
                Some(kv) => current.insert(k, kv),
                None => current.remove(&k),
            };
        }
    }
    Ok(Ok(finish_range(q, current.into_values())))
}

/// Every event with revision >= `from` (in order), for watches. Returns the revisions they cover.
pub(crate) fn history_from(
    v: &dyn View,
    from: Revision,
    f: &mut dyn FnMut(Revision, Event) -> Result<bool, StoreError>,
) -> Result<(), StoreError> {
    v.scan(CF_HIST, &hist_key(from.max(0), 0), &mut |k, val| {
        let rev = crate::db::hist_key_rev(k);
        f(rev, decode(val, "history event")?)
    })
}

/// The changes of one `apply` call, collected in a WriteBatch that is written atomically together
/// with the applied log id.
pub(crate) struct Apply<'a> {
    db: &'a DB,
    pub batch: WriteBatch,
    overlay: BTreeMap<Vec<u8>, Option<KeyValue>>,
    pub events: Vec<(Revision, u32, Event)>,
    pub counters: Counters,
    /// Read lazily: only a `SetClusterId` needs it, and that happens once per cluster.
    cluster_id: Option<Option<String>>,
    removed_pending: std::collections::BTreeSet<u64>,
    /// The CA as this batch left it, read lazily (`SetCa` and `RotateCa` need it).
    ca: Option<Option<berth_types::ClusterCa>>,
    /// The audit records of this entry, written together by [`Apply::flush_audit`].
    audit: Vec<AuditRecord>,
    /// The `seq` of the next audit record, read lazily.
    audit_next: Option<u64>,
    /// The audit records this apply call stored, in order (handed to the audit log's readers).
    pub audit_appended: Vec<AuditRecord>,
}

impl<'a> Apply<'a> {
    pub fn new(db: &'a DB) -> Result<Self, StoreError> {
        Ok(Apply {
            db,
            batch: WriteBatch::default(),
            overlay: BTreeMap::new(),
            events: Vec::new(),
            counters: read_counters(db)?,
            cluster_id: None,
            removed_pending: Default::default(),
            ca: None,
            audit: Vec::new(),
            audit_next: None,
            audit_appended: Vec::new(),
        })
    }

    fn current_cluster_id(&mut self) -> Result<Option<String>, StoreError> {
        if self.cluster_id.is_none() {
            self.cluster_id = Some(read_cluster_id(self.db)?);
        }
        Ok(self.cluster_id.clone().flatten())
    }

    /// The CA as of this point of the batch (a command earlier in it may have replaced it).
    fn current_ca(&mut self) -> Result<Option<berth_types::ClusterCa>, StoreError> {
        if self.ca.is_none() {
            self.ca = Some(read_ca(self.db)?);
        }
        Ok(self.ca.clone().flatten())
    }

    fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, StoreError> {
        match self.overlay.get(key) {
            Some(v) => Ok(v.clone()),
            None => get_kv(self.db, key),
        }
    }

    fn record(&mut self, rev: Revision, sub: u32, event: Event) {
        let cf_kv = cf(self.db, CF_KV);
        match event.kind {
            EventKind::Put => self.batch.put_cf(cf_kv, &event.kv.key, encode(&event.kv)),
            EventKind::Delete => self.batch.delete_cf(cf_kv, &event.kv.key),
        }
        self.batch.put_cf(cf(self.db, CF_HIST), hist_key(rev, sub), encode(&event));
        let now = match event.kind {
            EventKind::Put => Some(event.kv.clone()),
            EventKind::Delete => None,
        };
        self.overlay.insert(event.kv.key.clone(), now);
        self.events.push((rev, sub, event));
    }

    pub fn command(&mut self, cmd: Command) -> Result<Result<CommandResult, CommandError>, StoreError> {
        Ok(match cmd {
            Command::Txn(txn) => self.txn(txn)?.map(CommandResult::Txn),
            Command::Stamped { txn, record } => self.stamped(txn, record)?,
            Command::Audited { txn, at_ms, record } => self.stamped(txn, legacy_record(at_ms, &record))?,
            Command::Audit { records } => {
                let revision = self.counters.revision;
                self.audit.extend(records.into_iter().map(|r| AuditRecord { revision, ..r }));
                Ok(CommandResult::Txn(TxnResult { succeeded: true, responses: vec![], revision }))
            }
            Command::TrimAudit { below_seq } => {
                self.batch.delete_range_cf(cf(self.db, CF_AUDIT), audit_key(0), audit_key(below_seq));
                Ok(CommandResult::AuditTrimmed)
            }
            Command::Compact { revision } => self.compact(revision).map(|()| CommandResult::Compacted { revision }),
            Command::SetClusterId { cluster_id } => match self.current_cluster_id()? {
                Some(existing) if existing != cluster_id => Err(CommandError::ClusterIdAlreadySet { existing }),
                _ => {
                    self.batch.put_cf(cf(self.db, CF_SM), SM_CLUSTER_ID, encode(&cluster_id));
                    self.cluster_id = Some(Some(cluster_id.clone()));
                    Ok(CommandResult::ClusterId { cluster_id })
                }
            },
            Command::MemberRemoved { id } => {
                let mut removed = read_removed(self.db)?;
                removed.extend(self.removed_pending.iter().copied());
                removed.insert(id);
                self.removed_pending.insert(id);
                self.batch.put_cf(cf(self.db, CF_SM), SM_REMOVED, encode(&removed));
                Ok(CommandResult::MemberRemoved)
            }
            Command::SetCa { ca } => match self.current_ca()? {
                Some(existing) => Ok(CommandResult::Ca { cert_pem: existing.cert_pem }),
                None => {
                    self.batch.put_cf(cf(self.db, CF_SM), SM_CA, encode(&ca));
                    let cert_pem = ca.cert_pem.clone();
                    self.ca = Some(Some(ca));
                    Ok(CommandResult::Ca { cert_pem })
                }
            },
            Command::RotateCa { ca, expect_cert_pem, txn } => {
                let current = self.current_ca()?.map(|c| c.cert_pem);
                if current.as_deref() != Some(expect_cert_pem.as_str()) {
                    return Ok(Ok(CommandResult::Ca { cert_pem: current.unwrap_or_default() }));
                }
                let res = self.txn(txn)?;
                if matches!(&res, Ok(r) if r.succeeded) {
                    self.batch.put_cf(cf(self.db, CF_SM), SM_CA, encode(&ca));
                    self.ca = Some(Some(ca));
                }
                res.map(CommandResult::Txn)
            }
        })
    }

    /// Applies a transaction made on a client's behalf and adds its audit record, with the
    /// revision it made and its outcome.
    fn stamped(&mut self, txn: Txn, record: AuditRecord) -> Result<Result<CommandResult, CommandError>, StoreError> {
        let res = self.txn(txn)?;
        let (revision, outcome) = match &res {
            Ok(r) if r.succeeded => (r.revision, "ok".to_string()),
            Ok(r) => (r.revision, "conflict: the state changed since it was read; nothing was written".into()),
            Err(e) => (self.counters.revision, format!("error: {e}")),
        };
        self.audit.push(AuditRecord { revision, outcome, ..record });
        Ok(res.map(CommandResult::Txn))
    }

    fn txn(&mut self, txn: Txn) -> Result<Result<TxnResult, CommandError>, StoreError> {
        let mut succeeded = true;
        for c in &txn.compare {
            if !c.holds(self.get(&c.key)?.as_ref()) {
                succeeded = false;
                break;
            }
        }
        let ops = if succeeded { txn.success } else { txn.failure };
        let rev = self.counters.revision + 1;
        let mut sub = 0u32;
        let mut responses = Vec::with_capacity(ops.len());
        for op in ops {
            responses.push(match op {
                RequestOp::Range(q) => {
                    // A read in a transaction reads at the transaction's own revision (the API
                    // refuses any other). Reading an older one could fail on one master and not on
                    // another (history before a snapshot install is gone), and must never decide
                    // how a replicated command applies; nor may a failure come after writes.
                    let q = RangeQuery { revision: 0, ..q };
                    let view_counters = Counters { revision: if sub > 0 { rev } else { rev - 1 }, ..self.counters };
                    match range_at(self.db, &self.overlay, &self.events, view_counters, &q)? {
                        Ok(r) => OpResult::Range(r),
                        Err(e) => return Ok(Err(e)),
                    }
                }
                RequestOp::Put(p) => {
                    let prev = self.get(&p.key)?;
                    let kv = KeyValue {
                        create_revision: prev.as_ref().map_or(rev, |p| p.create_revision),
                        mod_revision: rev,
                        version: prev.as_ref().map_or(0, |p| p.version) + 1,
                        key: p.key,
                        value: p.value,
                    };
                    self.record(rev, sub, Event { kind: EventKind::Put, kv, prev_kv: prev.clone() });
                    sub += 1;
                    OpResult::Put(PutResult { prev_kv: if p.prev_kv { prev } else { None } })
                }
                RequestOp::DeleteRange(d) => {
                    let q = RangeQuery { key: d.key, range_end: d.range_end, ..Default::default() };
                    let view_counters = Counters { revision: self.counters.revision, ..self.counters };
                    let matched = match range_at(self.db, &self.overlay, &[], view_counters, &q)? {
                        Ok(r) => r.kvs,
                        Err(e) => return Ok(Err(e)),
                    };
                    let mut res = DeleteResult { deleted: matched.len() as i64, prev_kvs: vec![] };
                    for prev in matched {
                        let tomb = KeyValue { key: prev.key.clone(), mod_revision: rev, ..Default::default() };
                        if d.prev_kv {
                            res.prev_kvs.push(prev.clone());
                        }
                        self.record(rev, sub, Event { kind: EventKind::Delete, kv: tomb, prev_kv: Some(prev) });
                        sub += 1;
                    }
                    OpResult::DeleteRange(res)
                }
            });
        }
        if sub > 0 {
            self.counters.revision = rev;
            if self.counters.revision - self.counters.compact_revision > HISTORY_WINDOW + HISTORY_WINDOW / 10 {
                let to = self.counters.revision - HISTORY_WINDOW;
                self.compact(to).expect("automatic compaction target is within range");
            }
        }
        Ok(Ok(TxnResult { succeeded, responses, revision: self.counters.revision }))
    }

    fn compact(&mut self, revision: Revision) -> Result<(), CommandError> {
        if revision > self.counters.revision {
            return Err(CommandError::FutureRevision { requested: revision, current: self.counters.revision });
        }
        if revision <= self.counters.compact_revision {
            return Err(CommandError::Compacted { requested: revision, compacted: self.counters.compact_revision });
        }
        self.batch.delete_range_cf(cf(self.db, CF_HIST), hist_key(0, 0), hist_key(revision + 1, 0));
        self.events.retain(|(r, _, _)| *r > revision);
        self.counters.compact_revision = revision;
        Ok(())
    }

    /// Applies the commands of one log entry, then writes its audit records.
    pub fn entry(&mut self, commands: Vec<Command>) -> Result<Vec<Result<CommandResult, CommandError>>, StoreError> {
        let mut results = Vec::with_capacity(commands.len());
        for c in commands {
            results.push(self.command(c)?);
        }
        self.flush_audit()?;
        Ok(results)
    }

    /// Writes the entry's audit records, if any, under the `seq` of the first. Per entry, not
    /// per apply call: entries are the same on every replica, while how many of them one call
    /// gets is not.
    fn flush_audit(&mut self) -> Result<(), StoreError> {
        if self.audit.is_empty() {
            return Ok(());
        }
        let first = match self.audit_next {
            Some(n) => n,
            None => crate::audit::read_next(self.db)?,
        };
        let mut next = first;
        for r in &mut self.audit {
            r.seq = next;
            next += 1;
        }
        self.batch.put_cf(cf(self.db, CF_AUDIT), audit_key(first), encode(&self.audit));
        self.batch.put_cf(cf(self.db, CF_SM), crate::audit::SM_AUDIT_NEXT, encode(&next));
        self.audit_appended.append(&mut self.audit);
        self.audit_next = Some(next);
        Ok(())
    }

    /// The `seq` of the next audit record, once this call has stored some.
    pub fn audit_next(&self) -> Option<u64> {
        self.audit_next
    }

    /// Stages the counters; the caller adds the applied log id and writes the batch.
    pub fn finish(&mut self) {
        self.batch.put_cf(cf(self.db, CF_SM), SM_COUNTERS, encode(&self.counters));
    }
}

#[cfg(test)]
mod tests {
    use berth_types::{Compare, CompareOp, CompareTarget, DeleteRange, Put, prefix_end};
    use sha2::Digest;

    use super::*;

    fn apply(db: &DB, cmds: Vec<Command>) -> Vec<Result<CommandResult, CommandError>> {
        let mut a = Apply::new(db).unwrap();
        let out = a.entry(cmds).unwrap();
        a.finish();
        db.write(std::mem::take(&mut a.batch)).unwrap();
        out
    }

    fn put(k: &str, v: &str) -> Command {
        Command::Txn(Txn::put(k, v))
    }

    fn get(db: &DB, k: &str, rev: Revision) -> Result<Option<KeyValue>, StoreError> {
        let q = RangeQuery { key: k.into(), revision: rev, ..Default::default() };
        Ok(range(&SnapView::new(db), &q)?.0.kvs.pop())
    }

    fn stamped(txn: Txn, at_ms: i64, who: &str) -> Command {
        let record = AuditRecord { at_ms, identity: who.into(), verb: "update".into(), ..Default::default() };
        Command::Stamped { txn, record }
    }

    fn audit_log(db: &DB) -> Vec<AuditRecord> {
        crate::audit::read_from(db, 0, usize::MAX).unwrap()
    }

    // Stamped transactions apply as transactions; their records (each with its revision and
    // outcome), and those of calls that changed nothing, are stored together for the entry,
    // outside the key space: no key, no history, no watch event, no revision of their own.
    #[test]
    fn an_entrys_audit_records_are_stored_once_outside_the_key_space() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::db::open(dir.path()).unwrap();
        let conflict = Txn {
            compare: vec![Compare { key: b"a".to_vec(), op: CompareOp::Equal, target: CompareTarget::ModRevision(99) }],
            ..Default::default()
        };
        let denied =
            AuditRecord { at_ms: 30, identity: "user/z".into(), outcome: "denied: no".into(), ..Default::default() };
        let mut a = Apply::new(&db).unwrap();
        let out = a
            .entry(vec![
                stamped(Txn::put("a", "1"), 20, "user/x"),
                put("b", "1"),
                stamped(conflict, 10, "user/y"),
                Command::Audit { records: vec![denied] },
            ])
            .unwrap();
        assert_eq!(a.events.len(), 2, "only a and b are watch events");
        assert_eq!(a.audit_appended.len(), 3);
        assert_eq!(a.audit_next(), Some(3));
        a.finish();
        db.write(std::mem::take(&mut a.batch)).unwrap();
        assert!(
            matches!(&out[0], Ok(CommandResult::Txn(t)) if t.succeeded && t.revision == 1 && t.responses.len() == 1)
        );
        assert!(matches!(&out[2], Ok(CommandResult::Txn(t)) if !t.succeeded));
        let everything = RangeQuery { key: vec![0], range_end: vec![0xff], ..Default::default() };
        let (res, counters) = range(&SnapView::new(&db), &everything).unwrap();
        assert_eq!(res.kvs.len(), 2, "a and b, and no audit key");
        assert_eq!(counters.revision, 2, "the records take no revision");
        let log = audit_log(&db);
        let got: Vec<_> = log.iter().map(|r| (r.seq, r.identity.as_str(), r.revision, r.outcome.as_str())).collect();
        assert_eq!(got[..2], [(0, "user/x", 1, "ok"), (1, "user/y", 2, got[1].3)]);
        assert!(got[1].3.starts_with("conflict"), "{got:?}");
        assert_eq!(got[2], (2, "user/z", 2, "denied: no"));
        // An entry without records stores none; the next one continues the numbering, and
        // retention drops whole entries from the oldest.
        apply(&db, vec![put("c", "1")]);
        apply(&db, vec![stamped(Txn::put("d", "1"), 40, "user/x")]);
        assert_eq!(audit_log(&db).iter().map(|r| r.seq).collect::<Vec<_>>(), [0, 1, 2, 3]);
        assert_eq!(crate::audit::bounds(&db).unwrap(), (0, 4));
        assert_eq!(crate::audit::read_since(&db, 35).unwrap().iter().map(|r| r.seq).collect::<Vec<_>>(), [3]);
        assert_eq!(crate::audit::first_entry_since(&db, 35).unwrap(), 3);
        assert!(matches!(apply(&db, vec![Command::TrimAudit { below_seq: 3 }])[0], Ok(CommandResult::AuditTrimmed)));
        assert_eq!(audit_log(&db).iter().map(|r| r.seq).collect::<Vec<_>>(), [3]);
        assert_eq!(crate::audit::bounds(&db).unwrap(), (3, 4));

        // Replicas group entries into apply calls differently: the numbering must not depend
        // on it.
        let entries = || {
            vec![
                vec![stamped(Txn::put("x", "1"), 1, "a")],
                vec![stamped(Txn::put("y", "1"), 2, "b")],
                vec![put("z", "1")],
            ]
        };
        let one_call = tempfile::tempdir().unwrap();
        let one_call = crate::db::open(one_call.path()).unwrap();
        let mut a = Apply::new(&one_call).unwrap();
        for e in entries() {
            a.entry(e).unwrap();
        }
        a.finish();
        one_call.write(std::mem::take(&mut a.batch)).unwrap();
        let call_each = tempfile::tempdir().unwrap();
        let call_each = crate::db::open(call_each.path()).unwrap();
        for e in entries() {
            apply(&call_each, e);
        }
        assert_eq!(audit_log(&one_call), audit_log(&call_each));
        assert_eq!(read_counters(&*one_call).unwrap(), read_counters(&*call_each).unwrap());
        assert_eq!(crate::audit::bounds(&one_call).unwrap(), (0, 2));
    }

    // A log written before `Stamped` carries its records as JSON: they apply alike.
    #[test]
    fn a_legacy_audited_transaction_is_recorded_as_a_stamped_one() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::db::open(dir.path()).unwrap();
        let record = br#"{"at_ms":7,"identity":"user/x","verb":"update","resource":"kv","name":"a","master":2}"#;
        apply(&db, vec![Command::Audited { txn: Txn::put("a", "1"), at_ms: 7, record: record.to_vec() }]);
        let want = AuditRecord {
            seq: 0,
            at_ms: 7,
            identity: "user/x".into(),
            verb: "update".into(),
            resource: "kv".into(),
            name: "a".into(),
            outcome: "ok".into(),
            master: 2,
            revision: 1,
            ..Default::default()
        };
        assert_eq!(audit_log(&db), [want]);
    }

    // Snapshots (and backups) carry the audit log and its numbering; the first snapshot format,
    // without them, still loads.
    #[test]
    fn snapshots_carry_the_audit_log() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::db::open(&dir.path().join("a")).unwrap();
        apply(&db, vec![stamped(Txn::put("a", "1"), 1, "user/x"), stamped(Txn::put("b", "1"), 2, "user/y")]);
        apply(&db, vec![Command::TrimAudit { below_seq: 2 }]);
        apply(&db, vec![stamped(Txn::put("c", "1"), 3, "user/z")]);
        let (path, _) = crate::snapshot::write_snapshot(
            &SnapView::new(&db),
            &dir.path().join("snaps"),
            crate::snapshot::Purpose::Replication,
        )
        .unwrap();
        let other = crate::db::open(&dir.path().join("b")).unwrap();
        apply(&other, vec![stamped(Txn::put("old", "1"), 1, "user/old")]);
        crate::snapshot::load_into_db(&other, &path, None, Default::default(), None).unwrap();
        assert_eq!(audit_log(&other), audit_log(&db));
        assert_eq!(audit_log(&other).iter().map(|r| r.seq).collect::<Vec<_>>(), [2]);
        apply(&other, vec![stamped(Txn::put("d", "1"), 4, "user/z")]);
        assert_eq!(crate::audit::bounds(&other).unwrap(), (2, 4), "the numbering goes on from the snapshot's");

        // The first format: the same file without the audit section, under the old magic.
        let bytes = std::fs::read(&path).unwrap();
        let header_len = u32::from_be_bytes(bytes[8..12].try_into().unwrap()) as usize;
        let mut at = 12 + header_len;
        while u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) != 0 {
            at += 4 + u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        }
        let mut v1 = b"BERTHSNP".to_vec();
        v1.extend_from_slice(&bytes[8..at + 4 + 8]);
        let digest = sha2::Sha256::digest(&v1);
        v1.extend_from_slice(&digest);
        let v1_path = dir.path().join("v1.snap");
        std::fs::write(&v1_path, v1).unwrap();
        let third = crate::db::open(&dir.path().join("c")).unwrap();
        crate::snapshot::load_into_db(&third, &v1_path, None, Default::default(), None).unwrap();
        assert_eq!(get(&third, "c", 0).unwrap().map(|kv| kv.value), Some(b"1".to_vec()));
        assert!(audit_log(&third).is_empty());
    }

    // RotateCa replaces the CA only from the CA it expects, and only with its transaction:
    // both or neither, also when two of them share one batch.
    #[test]
    fn rotate_ca_is_a_compare_and_swap_with_its_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::db::open(dir.path()).unwrap();
        let ca = |n: &str| berth_types::ClusterCa { cert_pem: format!("cert {n}"), key_pem: format!("key {n}") };
        let rotate = |to: &str, from: &str, txn: Txn| Command::RotateCa {
            ca: ca(to),
            expect_cert_pem: format!("cert {from}"),
            txn,
        };
        apply(&db, vec![Command::SetCa { ca: ca("1") }]);
        let out = apply(
            &db,
            vec![
                rotate("2", "1", Txn::put("/berth/ca/rotation", "2")),
                rotate("3", "1", Txn::put("/berth/ca/rotation", "3")),
            ],
        );
        assert!(matches!(&out[0], Ok(CommandResult::Txn(t)) if t.succeeded));
        assert!(matches!(&out[1], Ok(CommandResult::Ca { cert_pem }) if cert_pem == "cert 2"), "{out:?}");
        assert_eq!(read_ca(&*db).unwrap().unwrap().cert_pem, "cert 2");
        assert_eq!(get(&db, "/berth/ca/rotation", 0).unwrap().unwrap().value, b"2");
        let conflict = Txn {
            compare: vec![Compare {
                key: b"/berth/ca/rotation".to_vec(),
                op: CompareOp::Equal,
                target: CompareTarget::ModRevision(99),
            }],
            success: Txn::put("/berth/ca/rotation", "4").success,
            ..Default::default()
        };
        let out = apply(&db, vec![rotate("4", "2", conflict)]);
        assert!(matches!(&out[0], Ok(CommandResult::Txn(t)) if !t.succeeded));
        assert_eq!(read_ca(&*db).unwrap().unwrap().cert_pem, "cert 2", "a failed transaction leaves the CA");
    }

    #[test]
    fn revisions_versions_and_history_reads() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::db::open(dir.path()).unwrap();
        // Two writes in one batch get two revisions; a read at an old revision sees old values.
        apply(&db, vec![put("a", "1"), put("b", "1")]);
        apply(&db, vec![put("a", "2")]);
        let a = get(&db, "a", 0).unwrap().unwrap();
        assert_eq!((a.create_revision, a.mod_revision, a.version, a.value.as_slice()), (1, 3, 2, &b"2"[..]));
        assert_eq!(get(&db, "a", 1).unwrap().unwrap().value, b"1");
        assert_eq!(get(&db, "a", 2).unwrap().unwrap().value, b"1");
        assert!(get(&db, "b", 1).unwrap().is_none(), "b did not exist at revision 1");

        // Delete, then the key is gone now but visible in the past.
        let del = Command::Txn(Txn {
            success: vec![RequestOp::DeleteRange(DeleteRange { key: b"a".to_vec(), range_end: vec![], prev_kv: true })],
            ..Default::default()
        });
        apply(&db, vec![del]);
        assert!(get(&db, "a", 0).unwrap().is_none());
        assert_eq!(get(&db, "a", 3).unwrap().unwrap().value, b"2");
        // Recreated: version restarts and create_revision moves.
        apply(&db, vec![put("a", "3")]);
        let a = get(&db, "a", 0).unwrap().unwrap();
        assert_eq!((a.create_revision, a.version), (5, 1));

        // Future and compacted revisions are refused with their own errors.
        assert!(matches!(get(&db, "a", 99), Err(StoreError::Command(CommandError::FutureRevision { .. }))));
        apply(&db, vec![Command::Compact { revision: 3 }]);
        assert!(matches!(get(&db, "a", 2), Err(StoreError::Command(CommandError::Compacted { .. }))));
        assert_eq!(get(&db, "a", 3).unwrap().unwrap().value, b"2", "the compact revision itself stays readable");
    }

    #[test]
    fn transactions_compare_and_see_their_own_writes() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::db::open(dir.path()).unwrap();
        apply(&db, vec![put("k", "v1")]);
        let cas = |expect: Revision, v: &str| {
            Command::Txn(Txn {
                compare: vec![Compare {
                    key: b"k".to_vec(),
                    op: CompareOp::Equal,
                    target: CompareTarget::ModRevision(expect),
                }],
                success: vec![
                    RequestOp::Put(Put { key: b"k".to_vec(), value: v.into(), prev_kv: true }),
                    RequestOp::Range(RangeQuery { key: b"k".to_vec(), ..Default::default() }),
                ],
                failure: vec![RequestOp::Range(RangeQuery { key: b"k".to_vec(), ..Default::default() })],
            })
        };
        let r = apply(&db, vec![cas(1, "v2"), cas(1, "v3")]);
        let CommandResult::Txn(first) = r[0].clone().unwrap() else { panic!() };
        let CommandResult::Txn(second) = r[1].clone().unwrap() else { panic!() };
        assert!(first.succeeded);
        assert!(!second.succeeded, "the second CAS saw the first one's write");
        match &first.responses[1] {
            OpResult::Range(rr) => assert_eq!(rr.kvs[0].value, b"v2"),
            other => panic!("{other:?}"),
        }
        // A read-only failure branch does not bump the revision.
        assert_eq!(second.revision, first.revision);
    }

    #[test]
    fn a_transaction_applies_the_same_whatever_history_this_replica_still_has() {
        // A master that caught up by snapshot has no history before it; a read at an old revision
        // inside a transaction once failed there (and skipped the writes after it) while it
        // succeeded on the others, and the replicas' revisions drifted apart.
        let dir = tempfile::tempdir().unwrap();
        let db = crate::db::open(dir.path()).unwrap();
        apply(&db, vec![put("a", "1"), put("a", "2"), put("a", "3")]);
        apply(&db, vec![Command::Compact { revision: 3 }]);
        let txn = Command::Txn(Txn {
            success: vec![
                RequestOp::Range(RangeQuery { key: b"a".to_vec(), revision: 1, ..Default::default() }),
                RequestOp::Put(Put { key: b"b".to_vec(), value: b"x".to_vec(), prev_kv: false }),
            ],
            ..Default::default()
        });
        let r = apply(&db, vec![txn]);
        let CommandResult::Txn(res) = r[0].clone().expect("the transaction applies") else { panic!() };
        assert_eq!(res.revision, 4, "its write got the next revision");
        match &res.responses[0] {
            OpResult::Range(rr) => assert_eq!(rr.kvs[0].value, b"3", "the read sees the transaction's revision"),
            other => panic!("{other:?}"),
        }
        assert_eq!(get(&db, "b", 0).unwrap().unwrap().mod_revision, 4);
    }

    #[test]
    fn a_replica_that_caught_up_by_snapshot_compacts_like_the_others() {
        // A master that installed a snapshot once took the snapshot's revision as the cluster's
        // compaction point: a later `Compact` below it was refused there and applied elsewhere.
        let dir = tempfile::tempdir().unwrap();
        let db = crate::db::open(&dir.path().join("a")).unwrap();
        apply(&db, (1..=5).map(|i| put("a", &i.to_string())).collect());
        apply(&db, vec![Command::Compact { revision: 2 }]);
        let (path, header) =
            crate::snapshot::write_snapshot(&*db, &dir.path().join("snaps"), crate::snapshot::Purpose::Replication)
                .unwrap();
        assert_eq!(header.counters, Counters { revision: 5, compact_revision: 2 });
        let caught_up = crate::db::open(&dir.path().join("b")).unwrap();
        crate::snapshot::load_into_db(&caught_up, &path, None, Default::default(), None).unwrap();

        // Both replicas apply the same commands with the same results.
        for replica in [&db, &caught_up] {
            let r = apply(replica, vec![Command::Compact { revision: 4 }, Command::Compact { revision: 3 }]);
            assert!(matches!(r[0], Ok(CommandResult::Compacted { revision: 4 })), "{r:?}");
            assert!(matches!(r[1], Err(CommandError::Compacted { requested: 3, compacted: 4 })), "{r:?}");
            assert_eq!(read_counters(&**replica).unwrap(), Counters { revision: 5, compact_revision: 4 });
        }
        // Before the next compaction, the caught-up replica still refuses reads it has no history
        // for, and says from where it can serve them.
        let dir2 = tempfile::tempdir().unwrap();
        let fresh = crate::db::open(dir2.path()).unwrap();
        crate::snapshot::load_into_db(&fresh, &path, None, Default::default(), None).unwrap();
        match get(&fresh, "a", 4) {
            Err(StoreError::Command(CommandError::Compacted { requested: 4, compacted: 5 })) => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(get(&fresh, "a", 5).unwrap().unwrap().value, b"5");
        assert_eq!(get(&db, "a", 4).unwrap().unwrap().value, b"4", "the original keeps its history");
    }

    #[test]
    fn prefix_ranges_limits_and_history_events() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::db::open(dir.path()).unwrap();
        apply(&db, vec![put("p/1", "a"), put("p/2", "b"), put("p/3", "c"), put("q", "d")]);
        let q = RangeQuery { key: b"p/".to_vec(), range_end: prefix_end(b"p/"), limit: 2, ..Default::default() };
        let (r, _) = range(&SnapView::new(&db), &q).unwrap();
        assert_eq!((r.kvs.len(), r.count, r.more), (2, 3, true));
        let mut seen = vec![];
        history_from(&*db, 2, &mut |rev, e| {
            seen.push((rev, String::from_utf8(e.kv.key).unwrap()));
            Ok(true)
        })
        .unwrap();
        assert_eq!(seen, vec![(2, "p/2".into()), (3, "p/3".into()), (4, "q".into())]);
    }
}
