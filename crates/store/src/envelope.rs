//! Every record berth stores is bincode inside a one-byte versioned envelope, so that a future
//! format can be recognised (and an old binary refuses it instead of misreading it).

use serde::{Serialize, de::DeserializeOwned};

use crate::StoreError;

/// The record format this build writes and the newest one it can read.
pub const RECORD_FORMAT: u8 = 1;

/// Bound on what one decode may allocate. Records are our own, but a corrupt length prefix must
/// not make us allocate gigabytes.
pub const DECODE_LIMIT: usize = 256 * 1024 * 1024;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<DECODE_LIMIT>()
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.push(RECORD_FORMAT);
    // Encoding our own plain data types into a Vec cannot fail.
    bincode::serde::encode_into_std_write(value, &mut out, config())
        .expect("bincode encoding of an in-memory value into a Vec");
    out
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, StoreError> {
    match bytes.first() {
        None => Err(StoreError::Corrupt(format!("{what}: empty record"))),
        Some(&v) if v > RECORD_FORMAT => {
            Err(StoreError::NewerFormat { what: what.to_string(), found: v, supported: RECORD_FORMAT })
        }
        Some(0) => Err(StoreError::Corrupt(format!("{what}: record format 0 is not valid"))),
        Some(_) => bincode::serde::decode_from_slice(&bytes[1..], config())
            .map(|(v, _)| v)
            .map_err(|e| StoreError::Corrupt(format!("{what}: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Byte fields are encoded with serde_bytes (one copy instead of a visit per byte); the
    /// encoding must stay the one written before, a length then the bytes.
    #[test]
    fn byte_fields_keep_the_stored_encoding() {
        #[derive(serde::Serialize, serde::Deserialize)]
        struct OldKeyValue {
            key: Vec<u8>,
            value: Vec<u8>,
            create_revision: i64,
            mod_revision: i64,
            version: i64,
        }
        let old = OldKeyValue {
            key: b"/k".to_vec(),
            value: (0..=255).collect(),
            create_revision: 3,
            mod_revision: 9,
            version: 2,
        };
        let new = berth_types::KeyValue {
            key: old.key.clone(),
            value: old.value.clone(),
            create_revision: 3,
            mod_revision: 9,
            version: 2,
        };
        let written_before = encode(&old);
        assert_eq!(written_before, encode(&new));
        let read: berth_types::KeyValue = decode(&written_before, "kv").unwrap();
        assert_eq!(read, new);
        #[derive(serde::Serialize)]
        #[allow(dead_code)]
        enum OldTarget {
            Version(i64),
            CreateRevision(i64),
            ModRevision(i64),
            Value(Vec<u8>),
        }
        assert_eq!(encode(&OldTarget::Value(vec![1, 2, 3])), encode(&berth_types::CompareTarget::Value(vec![1, 2, 3])));
    }

    #[test]
    fn round_trip_and_newer_format_refused() {
        let bytes = encode(&(7u64, "x".to_string()));
        assert_eq!(bytes[0], RECORD_FORMAT);
        let back: (u64, String) = decode(&bytes, "test").unwrap();
        assert_eq!(back, (7, "x".into()));
        let mut newer = bytes.clone();
        newer[0] = RECORD_FORMAT + 1;
        assert!(matches!(decode::<(u64, String)>(&newer, "test"), Err(StoreError::NewerFormat { .. })));
        assert!(matches!(decode::<(u64, String)>(&[], "test"), Err(StoreError::Corrupt(_))));
    }
}
