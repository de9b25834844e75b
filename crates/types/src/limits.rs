//! Size limits for client requests, checked before anything is proposed.

use crate::{AUDIT_PREFIX, AuditRecord, Command, RequestOp, Txn};

/// Limits on what a client may write. The defaults follow etcd's (1.5 MiB requests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_key_bytes: usize,
    pub max_value_bytes: usize,
    pub max_txn_ops: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_key_bytes: 4 * 1024, max_value_bytes: 1024 * 1024, max_txn_ops: 128 }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    #[error("key is empty: every key needs at least one byte")]
    EmptyKey,
    #[error("key is {size} bytes, over the limit of {limit} bytes: use a shorter key")]
    KeyTooLarge { size: usize, limit: usize },
    #[error(
        "value for key {key:?} is {size} bytes, over the limit of {limit} bytes: store large \
         data elsewhere and keep a reference in berth"
    )]
    ValueTooLarge { key: String, size: usize, limit: usize },
    #[error("transaction has {count} operations, over the limit of {limit}: split it")]
    TooManyOps { count: usize, limit: usize },
    #[error("compact revision must be positive, got {0}")]
    BadCompactRevision(i64),
    #[error(
        "a read inside a transaction asks for revision {0}: it always reads at the transaction's own \
         revision, so send revision 0 (read an older revision with a plain range request)"
    )]
    RevisionInTxn(i64),
    #[error("range_end {range_end:?} is below key {key:?}: the range would be empty")]
    InvertedRange { key: String, range_end: String },
}

impl Limits {
    pub fn check_key(&self, key: &[u8]) -> Result<(), ValidationError> {
        if key.is_empty() {
            return Err(ValidationError::EmptyKey);
        }
        if key.len() > self.max_key_bytes {
            return Err(ValidationError::KeyTooLarge { size: key.len(), limit: self.max_key_bytes });
        }
        Ok(())
    }

    fn check_range(&self, key: &[u8], range_end: &[u8]) -> Result<(), ValidationError> {
        self.check_key(key)?;
        if !range_end.is_empty() && range_end != [0] && range_end < key {
            return Err(ValidationError::InvertedRange {
                key: String::from_utf8_lossy(key).into_owned(),
                range_end: String::from_utf8_lossy(range_end).into_owned(),
            });
        }
        Ok(())
    }

    /// An audit record is small: its text is at most a sixteenth of a value.
    pub fn check_record(&self, r: &AuditRecord) -> Result<(), ValidationError> {
        let size = [&r.identity, &r.verb, &r.resource, &r.namespace, &r.name, &r.outcome].iter().map(|s| s.len()).sum();
        if size > self.max_value_bytes / 16 {
            return Err(ValidationError::ValueTooLarge {
                key: "an audit record".to_string(),
                size,
                limit: self.max_value_bytes / 16,
            });
        }
        Ok(())
    }

    pub fn check_txn(&self, txn: &Txn) -> Result<(), ValidationError> {
        let count = txn.compare.len() + txn.success.len() + txn.failure.len();
        if count > self.max_txn_ops {
            return Err(ValidationError::TooManyOps { count, limit: self.max_txn_ops });
        }
        for c in &txn.compare {
            self.check_key(&c.key)?;
        }
        for op in txn.success.iter().chain(&txn.failure) {
            match op {
                RequestOp::Range(r) => {
                    // Whether an old revision is still readable differs between masters (one that
                    // caught up by snapshot has no history before it), so it must not decide how
                    // a replicated transaction applies.
                    if r.revision != 0 {
                        return Err(ValidationError::RevisionInTxn(r.revision));
                    }
                    self.check_range(&r.key, &r.range_end)?
                }
                RequestOp::DeleteRange(d) => self.check_range(&d.key, &d.range_end)?,
                RequestOp::Put(p) => {
                    self.check_key(&p.key)?;
                    if p.value.len() > self.max_value_bytes {
                        return Err(ValidationError::ValueTooLarge {
                            key: String::from_utf8_lossy(&p.key).into_owned(),
                            size: p.value.len(),
                            limit: self.max_value_bytes,
                        });
                    }
                }
            }
        }
        Ok(())
    }

    pub fn check_command(&self, cmd: &Command) -> Result<(), ValidationError> {
        match cmd {
            Command::Txn(t) => self.check_txn(t),
            Command::Audited { txn, record, .. } => {
                if record.len() > self.max_value_bytes / 16 {
                    return Err(ValidationError::ValueTooLarge {
                        key: AUDIT_PREFIX.to_string(),
                        size: record.len(),
                        limit: self.max_value_bytes / 16,
                    });
                }
                self.check_txn(txn)
            }
            Command::Stamped { txn, record } => {
                self.check_record(record)?;
                self.check_txn(txn)
            }
            Command::Audit { records } => records.iter().try_for_each(|r| self.check_record(r)),
            Command::RotateCa { txn, .. } => self.check_txn(txn),
            Command::Compact { revision } if *revision <= 0 => Err(ValidationError::BadCompactRevision(*revision)),
            Command::Compact { .. }
            | Command::SetClusterId { .. }
            | Command::MemberRemoved { .. }
            | Command::SetCa { .. }
            | Command::TrimAudit { .. } => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversized_value_is_refused_with_sizes() {
        let limits = Limits::default();
        let txn = Txn::put("k", vec![0u8; limits.max_value_bytes + 1]);
        let err = limits.check_txn(&txn).unwrap_err();
        assert!(matches!(err, ValidationError::ValueTooLarge { size, .. } if size == limits.max_value_bytes + 1));
        assert!(err.to_string().contains("over the limit"));
        assert!(limits.check_txn(&Txn::put("k", vec![0u8; limits.max_value_bytes])).is_ok());
    }

    #[test]
    fn a_read_at_an_old_revision_inside_a_transaction_is_refused() {
        let read =
            |revision| RequestOp::Range(crate::RangeQuery { key: b"k".to_vec(), revision, ..Default::default() });
        let txn = Txn { success: vec![read(7)], ..Default::default() };
        let err = Limits::default().check_txn(&txn).unwrap_err();
        assert_eq!(err, ValidationError::RevisionInTxn(7));
        assert!(err.to_string().contains("send revision 0"), "{err}");
        assert!(Limits::default().check_txn(&Txn { success: vec![read(0)], ..Default::default() }).is_ok());
    }

    #[test]
    fn empty_key_is_refused() {
        assert_eq!(Limits::default().check_txn(&Txn::put("", "v")), Err(ValidationError::EmptyKey));
    }
}
