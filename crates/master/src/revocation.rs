//! Certificate revocation: revoked serials and revoked identities, in the replicated state, and
//! every master's copy of them, checked at each TLS handshake (gRPC and QUIC) and at each client
//! API request, so that a revocation applies to connections already open too.
//!
//! - `/berth/revoked/serial/<hex>`: that one certificate.
//! - `/berth/revoked/identity/<role>/<id>`: every certificate of the identity issued before the
//!   revocation (a removed master's, a removed user's). One issued later (the same name given to
//!   someone new) is valid.
//!
//! Each master follows the prefix with a watch (`authz::follow`, which also follows users,
//! roles and bindings) and swaps its copy on every change:
//! a revocation committed by the leader applies on a master as soon as that master applies it.

use std::{
    collections::{HashMap, HashSet},
    sync::RwLock,
};

use berth_pki::{CertInfo, Identity};
use berth_types::{Command, CommandResult};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::node::Ctx;

pub(crate) const PREFIX: &str = "/berth/revoked/";
const SERIALS: &str = "/berth/revoked/serial/";
const IDENTITIES: &str = "/berth/revoked/identity/";

/// One revocation, as stored (JSON).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Revocation {
    /// When it was made (ms); for an identity, certificates issued before this are revoked.
    pub at_ms: i64,
    /// Who made it (the client's identity).
    pub by: String,
    #[serde(default)]
    pub reason: String,
}

/// What is revoked, as this master last read it.
#[derive(Default)]
pub(crate) struct Revoked {
    sets: RwLock<Sets>,
    /// Counts the changes: a session sends agents the list again when it moved.
    generation: std::sync::atomic::AtomicU64,
}

#[derive(Default, Debug, Clone, PartialEq, Eq)]
struct Sets {
    serials: HashSet<String>,
    /// identity -> certificates that became valid before this (ms) are revoked.
    identities: HashMap<String, i64>,
}

impl Revoked {
    /// Why the certificate `info` describes may not be used, or Ok.
    pub(crate) fn check(&self, info: &CertInfo) -> Result<(), String> {
        let sets = self.sets.read().expect("revoked lock");
        if sets.serials.contains(&info.serial) {
            return Err(format!("certificate {} of {} was revoked", info.serial, info.identity));
        }
        if let Some(at) = sets.identities.get(&info.identity.to_string())
            && info.not_before_ms <= *at
        {
            return Err(format!("the certificates of {} were revoked", info.identity));
        }
        Ok(())
    }

    fn replace(&self, sets: Sets) {
        let mut current = self.sets.write().expect("revoked lock");
        if *current != sets {
            *current = sets;
            self.generation.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Which version of the list this master holds (see [`Revoked::to_agents`]).
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The list as agents get it, to check masters' certificates in their handshakes.
    pub(crate) fn to_agents(&self) -> berth_api::pb::agent::Revocations {
        let sets = self.sets.read().expect("revoked lock");
        let mut serials: Vec<String> = sets.serials.iter().cloned().collect();
        serials.sort();
        let mut identities: Vec<_> = sets
            .identities
            .iter()
            .map(|(identity, at_ms)| berth_api::pb::agent::RevokedIdentity {
                identity: identity.clone(),
                at_ms: *at_ms,
            })
            .collect();
        identities.sort_by(|a, b| a.identity.cmp(&b.identity));
        berth_api::pb::agent::Revocations { serials, identities }
    }
}

/// Every revocation in the state, as (what, record): `serial <hex>` or `identity <role/id>`.
pub(crate) fn list(reader: &berth_store::KvReader) -> Result<Vec<(String, Revocation)>, String> {
    let q = berth_types::RangeQuery {
        key: PREFIX.as_bytes().to_vec(),
        range_end: berth_types::prefix_end(PREFIX.as_bytes()),
        ..Default::default()
    };
    let (res, _) = reader.range(&q).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for kv in res.kvs {
        let key = String::from_utf8_lossy(&kv.key).into_owned();
        let Ok(rec) = serde_json::from_slice::<Revocation>(&kv.value) else {
            warn!(key, "ignoring a revocation record that does not parse");
            continue;
        };
        if let Some(serial) = key.strip_prefix(SERIALS) {
            out.push((format!("serial {serial}"), rec));
        } else if let Some(ident) = key.strip_prefix(IDENTITIES) {
            out.push((format!("identity {ident}"), rec));
        }
    }
    Ok(out)
}

fn load(reader: &berth_store::KvReader) -> Result<Sets, String> {
    let mut sets = Sets::default();
    for (what, rec) in list(reader)? {
        if let Some(serial) = what.strip_prefix("serial ") {
            sets.serials.insert(serial.to_string());
        } else if let Some(ident) = what.strip_prefix("identity ") {
            sets.identities.insert(ident.to_string(), rec.at_ms);
        }
    }
    Ok(sets)
}

/// Reads the revocations into `ctx.revoked` now.
pub(crate) fn refresh(ctx: &Ctx) {
    match load(&ctx.reader) {
        Ok(sets) => ctx.revoked.replace(sets),
        Err(e) => warn!("cannot read the revocations: {e}"),
    }
}

/// What `berth cert revoke` names: a serial (hex) or an identity (`role/id`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    Serial(String),
    Identity(Identity),
}

impl Target {
    pub(crate) fn parse(text: &str) -> Result<Target, String> {
        if text.contains('/') {
            let ident: Identity = text.parse().map_err(|e| format!("{text:?} is not an identity (ROLE/ID): {e}"))?;
            return Ok(Target::Identity(ident));
        }
        berth_pki::normalize_serial(text).map(Target::Serial).ok_or_else(|| {
            format!("{text:?} is neither a certificate serial (hex, as `openssl x509 -serial` prints it) nor an identity (ROLE/ID, e.g. admin/alice)")
        })
    }

    pub(crate) fn key(&self) -> String {
        match self {
            Target::Serial(s) => format!("{SERIALS}{s}"),
            Target::Identity(i) => format!("{IDENTITIES}{i}"),
        }
    }
}

/// Commits a revocation (a put of its record). Idempotent: revoking again keeps the first
/// record.
pub(crate) async fn revoke(ctx: &Ctx, target: &Target, by: &str, reason: &str) -> Result<bool, tonic::Status> {
    let rec = Revocation { at_ms: crate::objects::now_ms(), by: by.to_string(), reason: reason.to_string() };
    let value = serde_json::to_vec(&rec).expect("a revocation serializes");
    let txn = crate::objects::txn_of(vec![crate::objects::cas_put(target.key().into_bytes(), 0, value)]);
    match ctx.write(Command::Txn(txn)).await? {
        CommandResult::Txn(r) => {
            if r.succeeded {
                info!(target = ?target, by, "certificate revoked");
            }
            Ok(r.succeeded)
        }
        other => Err(tonic::Status::internal(format!("unexpected result {other:?} for a revocation"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(ident: &str, serial: &str, not_before_ms: i64) -> CertInfo {
        CertInfo { identity: ident.parse().unwrap(), serial: serial.into(), not_before_ms }
    }

    #[test]
    fn serials_and_identities_are_checked() {
        let r = Revoked::default();
        r.replace(Sets {
            serials: ["ab12".to_string()].into(),
            identities: [("admin/alice".to_string(), 1_000)].into(),
        });
        assert!(r.check(&info("admin/bob", "ab12", 0)).unwrap_err().contains("ab12"));
        assert!(r.check(&info("admin/bob", "ab13", 0)).is_ok());
        assert!(r.check(&info("admin/alice", "1", 999)).unwrap_err().contains("admin/alice"));
        // A certificate issued after the revocation is the identity's new one.
        assert!(r.check(&info("admin/alice", "2", 1_001)).is_ok());
    }

    #[test]
    fn targets_parse() {
        assert_eq!(Target::parse("3A:5F:00").unwrap(), Target::Serial("3a5f00".into()));
        assert_eq!(Target::parse("0x003a").unwrap(), Target::Serial("3a".into()));
        assert!(matches!(Target::parse("admin/alice").unwrap(), Target::Identity(_)));
        assert!(Target::parse("zz").unwrap_err().contains("neither"));
        assert!(Target::parse("nobody/x").is_err());
    }
}
