//! The key-value data model (etcd's): revisions, versions, ranges, transactions and watch events.

use serde::{Deserialize, Serialize};

use crate::Revision;

/// One key as stored: its value and its MVCC counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct KeyValue {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    /// Revision of the write that created this key (since its last deletion).
    pub create_revision: Revision,
    /// Revision of the last write to this key.
    pub mod_revision: Revision,
    /// Number of writes since creation; 1 for a new key. Reset by deletion.
    pub version: i64,
}

/// A read over one key (`range_end` empty) or over `[key, range_end)`.
/// `range_end == [0]` means "every key >= key", as in etcd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RangeQuery {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub range_end: Vec<u8>,
    /// 0 means no limit.
    pub limit: i64,
    /// 0 means the current revision.
    pub revision: Revision,
    pub keys_only: bool,
    pub count_only: bool,
}

impl RangeQuery {
    /// Does `k` fall within this query's key range?
    pub fn contains(&self, k: &[u8]) -> bool {
        key_in_range(&self.key, &self.range_end, k)
    }
}

/// Is `k` within the etcd-style range `[key, range_end)`?
pub fn key_in_range(key: &[u8], range_end: &[u8], k: &[u8]) -> bool {
    if range_end.is_empty() {
        return k == key;
    }
    if range_end == [0] {
        return k >= key;
    }
    k >= key && k < range_end
}

/// The smallest key greater than every key that starts with `prefix`, as `range_end`.
/// An all-0xff (or empty) prefix has no such key, so the range runs to the end (`[0]`).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RangeResult {
    pub kvs: Vec<KeyValue>,
    /// More keys matched than `limit` allowed.
    pub more: bool,
    /// Number of keys that matched.
    pub count: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Put {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    pub prev_kv: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct PutResult {
    pub prev_kv: Option<KeyValue>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteRange {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub range_end: Vec<u8>,
    pub prev_kv: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DeleteResult {
    pub deleted: i64,
    pub prev_kvs: Vec<KeyValue>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareOp {
    Equal,
    NotEqual,
    Greater,
    Less,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareTarget {
    Version(i64),
    CreateRevision(Revision),
    ModRevision(Revision),
    Value(#[serde(with = "serde_bytes")] Vec<u8>),
}

/// One guard of a transaction. A missing key has version, create and mod revision 0 and an empty
/// value... except that a `Value` compare against a missing key is false, as in etcd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compare {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    pub op: CompareOp,
    pub target: CompareTarget,
}

impl Compare {
    /// Evaluates this guard against the key's current state.
    pub fn holds(&self, current: Option<&KeyValue>) -> bool {
        use std::cmp::Ordering;
        let ord = match (&self.target, current) {
            (CompareTarget::Value(_), None) => return false,
            (CompareTarget::Value(v), Some(kv)) => kv.value.as_slice().cmp(v.as_slice()),
            (CompareTarget::Version(v), kv) => kv.map_or(0, |kv| kv.version).cmp(v),
            (CompareTarget::CreateRevision(r), kv) => kv.map_or(0, |kv| kv.create_revision).cmp(r),
            (CompareTarget::ModRevision(r), kv) => kv.map_or(0, |kv| kv.mod_revision).cmp(r),
        };
        match self.op {
            CompareOp::Equal => ord == Ordering::Equal,
            CompareOp::NotEqual => ord != Ordering::Equal,
            CompareOp::Greater => ord == Ordering::Greater,
            CompareOp::Less => ord == Ordering::Less,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestOp {
    Range(RangeQuery),
    Put(Put),
    DeleteRange(DeleteRange),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpResult {
    Range(RangeResult),
    Put(PutResult),
    DeleteRange(DeleteResult),
}

/// compares -> success ops, else failure ops; executed atomically at one revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Txn {
    pub compare: Vec<Compare>,
    pub success: Vec<RequestOp>,
    pub failure: Vec<RequestOp>,
}

impl Txn {
    /// A transaction that just puts one key.
    pub fn put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Self {
        Txn {
            compare: vec![],
            success: vec![RequestOp::Put(Put { key: key.into(), value: value.into(), prev_kv: false })],
            failure: vec![],
        }
    }

    /// Does any branch of this transaction write?
    pub fn writes(&self) -> bool {
        self.success.iter().chain(&self.failure).any(|op| !matches!(op, RequestOp::Range(_)))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct TxnResult {
    pub succeeded: bool,
    pub responses: Vec<OpResult>,
    /// The store's revision after this transaction.
    pub revision: Revision,
}

/// A state change replicated through Raft. One Raft entry carries a batch of these.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    Txn(Txn),
    /// Forget history at and below this revision.
    Compact {
        revision: Revision,
    },
    /// Recorded once by the master that bootstraps the cluster, so every member (and every data
    /// dir) knows which cluster it belongs to.
    SetClusterId {
        cluster_id: String,
    },
    /// A master was removed from the cluster: its id may never be used again.
    MemberRemoved {
        id: crate::NodeId,
    },
    /// The cluster CA, recorded once by the first leader so that every master (including ones
    /// added later) can sign certificates. Kept in the state machine's metadata, never in the
    /// key space: no client API can read it.
    SetCa {
        ca: ClusterCa,
    },
    /// Superseded by [`Command::Stamped`], whose record is compact: a transaction with its
    /// audit record as a JSON object. Logs written before the change still decode, and apply as
    /// `Stamped` does.
    Audited {
        txn: Txn,
        at_ms: i64,
        record: Vec<u8>,
    },
    /// `berth ca rotate`: the CA that signs from now on replaces the recorded one, if the
    /// recorded one is still `expect_cert_pem`, together with `txn` (the rotation's record, with
    /// the trust bundle), all or nothing: if the CA changed meanwhile or `txn`'s compares fail,
    /// nothing changes. Added last, so logs written before it still decode.
    RotateCa {
        ca: ClusterCa,
        expect_cert_pem: String,
        txn: Txn,
    },
    /// A transaction made on a client's behalf, with the audit record of that call, whose
    /// `seq`, `revision` and `outcome` applying gives. The records commit with their changes,
    /// in the same RocksDB write, but outside the key space: the records of one log entry are
    /// stored once, together, in the audit log (no history copy, no watch event). Added last,
    /// so logs written before it still decode.
    Stamped {
        txn: Txn,
        record: AuditRecord,
    },
    /// Records of calls that changed nothing (refused, invalid, unchanged), each with its
    /// outcome; applying gives them their `seq` and the current revision.
    Audit {
        records: Vec<AuditRecord>,
    },
    /// Retention, decided by the leader: drops the audit log's entries that begin below
    /// `below_seq`.
    TrimAudit {
        below_seq: u64,
    },
}

/// Where earlier versions kept applied audit records in the key space; the audit log has its
/// own place now, and retention deletes what is left here.
pub const AUDIT_PREFIX: &str = "/berth/audit/";

/// One record of the audit log: who made a call, what it did and to what, and what came of it.
/// Stored and replicated with bincode, so no field may be skipped (the JSON form is the
/// master's).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Its place in the audit log, the same on every master: given when applied.
    pub seq: u64,
    pub at_ms: i64,
    pub identity: String,
    pub verb: String,
    pub resource: String,
    pub namespace: String,
    pub name: String,
    /// `ok`, `conflict: ...`, `denied: ...` or `error: ...`.
    pub outcome: String,
    /// The master that took the call.
    pub master: u64,
    /// The revision of the change (the current one, for a call that changed nothing).
    pub revision: Revision,
}

/// The cluster CA's certificate and private key, PEM.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterCa {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCa").field("cert_pem", &self.cert_pem).field("key_pem", &"<redacted>").finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResult {
    Txn(TxnResult),
    Compacted {
        revision: Revision,
    },
    ClusterId {
        cluster_id: String,
    },
    MemberRemoved,
    /// The CA now recorded (the first one wins; a later SetCa returns the recorded one).
    Ca {
        cert_pem: String,
    },
    AuditTrimmed,
}

/// Deterministic failures of a command: every replica reaches the same one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum CommandError {
    #[error(
        "revision {requested} has been compacted (the oldest readable revision is {compacted}); \
         read at a newer revision or watch from {compacted}"
    )]
    Compacted { requested: Revision, compacted: Revision },
    #[error("revision {requested} is in the future (current revision is {current})")]
    FutureRevision { requested: Revision, current: Revision },
    #[error("cluster id is already set to {existing}")]
    ClusterIdAlreadySet { existing: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change in the history, as delivered to watchers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub kind: EventKind,
    /// For a put, the new key-value; for a delete, the key with `mod_revision` set to the deletion's
    /// revision and everything else empty (as etcd does).
    pub kv: KeyValue,
    /// The key-value before this change, if it existed.
    pub prev_kv: Option<KeyValue>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_last_byte() {
        assert_eq!(prefix_end(b"abc"), b"abd".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
        assert_eq!(prefix_end(b""), vec![0]);
    }

    #[test]
    fn ranges_follow_etcd_semantics() {
        assert!(key_in_range(b"a", b"", b"a"));
        assert!(!key_in_range(b"a", b"", b"ab"));
        assert!(key_in_range(b"a", &prefix_end(b"a"), b"ab"));
        assert!(!key_in_range(b"a", &prefix_end(b"a"), b"b"));
        assert!(key_in_range(b"m", &[0], b"zzz"));
        assert!(!key_in_range(b"m", &[0], b"a"));
    }

    #[test]
    fn compares_on_missing_keys() {
        let absent = Compare { key: b"k".to_vec(), op: CompareOp::Equal, target: CompareTarget::ModRevision(0) };
        assert!(absent.holds(None));
        let by_value = Compare { key: b"k".to_vec(), op: CompareOp::Equal, target: CompareTarget::Value(vec![]) };
        assert!(!by_value.holds(None));
        let kv = KeyValue { key: b"k".to_vec(), value: b"v".to_vec(), create_revision: 2, mod_revision: 5, version: 3 };
        assert!(!absent.holds(Some(&kv)));
        let greater = Compare { key: b"k".to_vec(), op: CompareOp::Greater, target: CompareTarget::Version(2) };
        assert!(greater.holds(Some(&kv)));
    }
}
