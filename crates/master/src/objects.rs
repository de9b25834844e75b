//! Typed objects (nodes, join tokens) kept as protobuf messages under `/berth/` in the replicated
//! key space. Writes are transactions that compare mod_revision, so concurrent writers (a leader
//! that just lost leadership, two admins) never overwrite each other's changes unseen.

use berth_api::pb::{JoinTokenRecord, Node};
use berth_store::KvReader;
use berth_types::{
    Compare, CompareOp, CompareTarget, DeleteRange, Put, RangeQuery, RequestOp, Revision, Txn, prefix_end,
};
use prost::Message;
use tonic::Status;

pub(crate) const NODES_PREFIX: &str = "/berth/nodes/";
pub(crate) const TOKENS_PREFIX: &str = "/berth/tokens/";

pub(crate) fn node_key(id: &str) -> Vec<u8> {
    format!("{NODES_PREFIX}{id}").into_bytes()
}

/// Name index: `/berth/node-names/<name>` holds the node id, so joins check uniqueness in O(1)
/// and atomically (the join transaction requires the key to be absent).
pub(crate) fn node_name_key(name: &str) -> Vec<u8> {
    format!("/berth/node-names/{name}").into_bytes()
}

pub(crate) fn token_key(id: &str) -> Vec<u8> {
    format!("{TOKENS_PREFIX}{id}").into_bytes()
}

/// An object and the mod_revision it was read at (0: absent).
#[derive(Debug, Clone)]
pub(crate) struct Versioned<T> {
    pub obj: T,
    pub mod_revision: Revision,
}

fn store_err(e: berth_store::StoreError) -> Status {
    Status::internal(format!("reading the replicated state failed: {e}"))
}

pub(crate) fn get<T: Message + Default>(reader: &KvReader, key: &[u8]) -> Result<Option<Versioned<T>>, Status> {
    let Some(kv) = reader.get(key).map_err(store_err)? else { return Ok(None) };
    let obj = T::decode(kv.value.as_slice())
        .map_err(|e| Status::data_loss(format!("object {} is undecodable: {e}", String::from_utf8_lossy(key))))?;
    Ok(Some(Versioned { obj, mod_revision: kv.mod_revision }))
}

pub(crate) fn list<T: Message + Default>(reader: &KvReader, prefix: &str) -> Result<Vec<Versioned<T>>, Status> {
    let q =
        RangeQuery { key: prefix.as_bytes().to_vec(), range_end: prefix_end(prefix.as_bytes()), ..Default::default() };
    let (res, _) = reader.range(&q).map_err(store_err)?;
    res.kvs
        .into_iter()
        .map(|kv| {
            let obj = T::decode(kv.value.as_slice()).map_err(|e| {
                Status::data_loss(format!("object {} is undecodable: {e}", String::from_utf8_lossy(&kv.key)))
            })?;
            Ok(Versioned { obj, mod_revision: kv.mod_revision })
        })
        .collect()
}

/// A put of `obj` at `key` that only happens if the key's mod_revision is still `expected`
/// (0: the key must not exist).
pub(crate) fn cas_put(key: Vec<u8>, expected: Revision, value: Vec<u8>) -> (Compare, RequestOp) {
    (
        Compare { key: key.clone(), op: CompareOp::Equal, target: CompareTarget::ModRevision(expected) },
        RequestOp::Put(Put { key, value, prev_kv: false }),
    )
}

/// A compare and the write it guards.
pub(crate) type GuardedOp = (Compare, RequestOp);

/// A document stored as its canonical JSON at `key`, planned for an apply: `created`,
/// `updated` or `unchanged`, and the compare-and-put to make unless unchanged.
pub(crate) fn plan_document(
    reader: &KvReader,
    key: Vec<u8>,
    json: String,
) -> Result<(&'static str, Option<GuardedOp>), Status> {
    let existing = reader.get(&key).map_err(store_err)?;
    Ok(match existing {
        Some(kv) if kv.value == json.as_bytes() => ("unchanged", None),
        Some(kv) => ("updated", Some(cas_put(key, kv.mod_revision, json.into_bytes()))),
        None => ("created", Some(cas_put(key, 0, json.into_bytes()))),
    })
}

/// One transaction out of several compare-and-puts: all happen or none.
pub(crate) fn txn_of(parts: Vec<(Compare, RequestOp)>) -> Txn {
    let (compare, success) = parts.into_iter().unzip();
    Txn { compare, success, failure: vec![] }
}

pub(crate) fn encode_node(n: &Node) -> Vec<u8> {
    n.encode_to_vec()
}

pub(crate) fn encode_token(t: &JoinTokenRecord) -> Vec<u8> {
    t.encode_to_vec()
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Finds a node by id or by name (through the name index, not a scan).
pub(crate) fn find_node(reader: &KvReader, name_or_id: &str) -> Result<Option<Versioned<Node>>, Status> {
    if let Some(n) = get::<Node>(reader, &node_key(name_or_id))? {
        return Ok(Some(n));
    }
    let Some(id) = reader.get(&node_name_key(name_or_id)).map_err(store_err)? else { return Ok(None) };
    get::<Node>(reader, &node_key(&String::from_utf8_lossy(&id.value)))
}

/// Deletes one key.
pub(crate) fn delete(key: Vec<u8>) -> RequestOp {
    RequestOp::DeleteRange(DeleteRange { key, range_end: vec![], prev_kv: false })
}

/// The mod_revision of `key` (of any value, not only a typed object), if it exists.
pub(crate) fn revision(reader: &KvReader, key: &[u8]) -> Result<Option<Revision>, Status> {
    Ok(reader.get(key).map_err(store_err)?.map(|kv| kv.mod_revision))
}

/// Deletes every key under `prefix`.
pub(crate) fn delete_prefix(prefix: &str) -> RequestOp {
    RequestOp::DeleteRange(DeleteRange {
        key: prefix.as_bytes().to_vec(),
        range_end: prefix_end(prefix.as_bytes()),
        prev_kv: false,
    })
}

/// A delete of `key` that only happens if its mod_revision is still `expected`.
pub(crate) fn cas_delete(key: Vec<u8>, expected: Revision) -> (Compare, RequestOp) {
    (Compare { key: key.clone(), op: CompareOp::Equal, target: CompareTarget::ModRevision(expected) }, delete(key))
}

/// At most one "yes" per period, for a message a loop would otherwise log on every pass.
pub(crate) struct Throttle(std::sync::atomic::AtomicI64);

impl Throttle {
    pub(crate) const fn new() -> Throttle {
        Throttle(std::sync::atomic::AtomicI64::new(0))
    }

    /// True when `period_ms` have passed since it last said so (and once at first).
    pub(crate) fn ready(&self, period_ms: i64) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let now = now_ms();
        let last = self.0.load(Relaxed);
        now - last >= period_ms && self.0.compare_exchange(last, now, Relaxed, Relaxed).is_ok()
    }
}
