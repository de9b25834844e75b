//! The audit log's storage: the records of one log entry are stored once, together, under the
//! `seq` of the first of them (column family `audit`), outside the MVCC key space. They commit in
//! the same RocksDB write as the changes they record, but cost no history copy, no watch event
//! and no revision of their own. `seq` numbers every record in the order applied, the same on
//! every master; the next one is kept in the state machine's metadata, and snapshots carry both.

use berth_types::AuditRecord;
use rocksdb::DB;

use crate::{
    StoreError,
    db::{CF_AUDIT, CF_SM, audit_key, cf},
    envelope::decode,
    mvcc::View,
};

pub(crate) const SM_AUDIT_NEXT: &[u8] = b"audit_next";
/// Masters' clocks differ: a read from a time looks this much further back for entries that
/// hold a record from it.
const CLOCK_SKEW_MS: i64 = 5 * 60 * 1000;

/// The `seq` the next record gets.
pub(crate) fn read_next(v: &dyn View) -> Result<u64, StoreError> {
    Ok(v.get(CF_SM, SM_AUDIT_NEXT)?.map(|b| decode(&b, "next audit seq")).transpose()?.unwrap_or(0))
}

pub(crate) fn decode_entry(value: &[u8]) -> Result<Vec<AuditRecord>, StoreError> {
    decode(value, "audit records")
}

/// The records from `from` on, oldest first: whole entries, until at least `limit` records.
pub(crate) fn read_from(db: &DB, from: u64, limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
    let mut it = db.raw_iterator_cf(cf(db, CF_AUDIT));
    // The entry that holds `from` begins at or before it.
    it.seek_for_prev(audit_key(from));
    if !it.valid() {
        it.seek_to_first();
    }
    let mut out = Vec::new();
    while let Some(value) = it.value() {
        out.extend(decode_entry(value)?.into_iter().filter(|r| r.seq >= from));
        if out.len() >= limit {
            break;
        }
        it.next();
    }
    it.status()?;
    Ok(out)
}

/// The records made at or after `since_ms`, oldest first, read from the newest back.
pub(crate) fn read_since(db: &DB, since_ms: i64) -> Result<Vec<AuditRecord>, StoreError> {
    let mut it = db.raw_iterator_cf(cf(db, CF_AUDIT));
    it.seek_to_last();
    let mut entries = Vec::new();
    while let Some(value) = it.value() {
        let records = decode_entry(value)?;
        let newest = records.iter().map(|r| r.at_ms).max().unwrap_or(i64::MIN);
        if newest < since_ms.saturating_sub(CLOCK_SKEW_MS) {
            break;
        }
        entries.push(records);
        it.prev();
    }
    it.status()?;
    Ok(entries.into_iter().rev().flatten().filter(|r| r.at_ms >= since_ms).collect())
}

/// The `seq` an entry's key names: its first record's.
fn key_seq(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.try_into().ok()?))
}

/// The `seq` of the oldest record kept (the next one's when there is none), and the next one's.
pub(crate) fn bounds(db: &DB) -> Result<(u64, u64), StoreError> {
    let next = read_next(db)?;
    let mut it = db.raw_iterator_cf(cf(db, CF_AUDIT));
    it.seek_to_first();
    let first = it.key().and_then(key_seq).unwrap_or(next);
    it.status()?;
    Ok((first, next))
}

/// The `seq` that begins the oldest entry holding a record made at or after `ms` (the next
/// record's when there is none): retention drops what is below it.
pub(crate) fn first_entry_since(db: &DB, ms: i64) -> Result<u64, StoreError> {
    let mut it = db.raw_iterator_cf(cf(db, CF_AUDIT));
    it.seek_to_first();
    while let (Some(key), Some(value)) = (it.key(), it.value()) {
        if decode_entry(value)?.iter().any(|r| r.at_ms >= ms) {
            return Ok(key_seq(key).unwrap_or(0));
        }
        it.next();
    }
    it.status()?;
    read_next(db)
}
