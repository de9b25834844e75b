//! The node certificate on disk: loading it (finishing an interrupted renewal), and replacing it
//! after a renewal.

use std::path::Path;
use std::time::SystemTime;

use berth_pki::tls::TlsFiles;
use berth_pki::{CertifiedKey, Identity};
use tracing::{info, warn};

use crate::AgentError;
use crate::state::{self, CA_FILE, CERT_FILE, KEY_FILE};

fn pending_name(name: &str) -> String {
    format!("{name}.new")
}

/// Finishes a renewal that was interrupted between writing the new files and renaming them:
/// both `.new` files are complete (fsynced) before the first rename, so completing is safe.
fn finish_interrupted_renewal(dir: &Path) -> Result<(), AgentError> {
    let crt_new = dir.join(pending_name(CERT_FILE));
    if !crt_new.exists() {
        // A key written without its certificate is useless: the renewal never got that far.
        let key_new = dir.join(pending_name(KEY_FILE));
        if key_new.exists() {
            let _ = std::fs::remove_file(&key_new);
        }
        return Ok(());
    }
    warn!(dir = %dir.display(), "finishing an interrupted certificate renewal");
    let key_new = dir.join(pending_name(KEY_FILE));
    if key_new.exists() {
        std::fs::rename(&key_new, dir.join(KEY_FILE))
            .map_err(|e| AgentError::io("cannot rename into place", &key_new, e))?;
    }
    std::fs::rename(&crt_new, dir.join(CERT_FILE))
        .map_err(|e| AgentError::io("cannot rename into place", &crt_new, e))?;
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| AgentError::io("cannot sync directory", dir, e))
}

/// Reads ca.crt, node.crt and node.key and checks they belong to `node_id`.
pub fn load(dir: &Path, node_id: &str) -> Result<TlsFiles, AgentError> {
    finish_interrupted_renewal(dir)?;
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).map_err(|e| AgentError::io("cannot read", path, e))
    };
    let files = TlsFiles::new(read(CA_FILE)?, CertifiedKey::new(read(CERT_FILE)?, read(KEY_FILE)?));
    let identity = files.cert.identity()?;
    if identity != Identity::agent(node_id) {
        return Err(AgentError::CorruptState {
            path: dir.join(CERT_FILE),
            reason: format!("it is the certificate of {identity}, but the state is of node {node_id}"),
        });
    }
    if let Ok(not_after) = files.cert.not_after()
        && not_after < SystemTime::now()
    {
        warn!(
            dir = %dir.display(),
            "the node certificate has expired: the masters will refuse it; move the directory away and join again \
             with a new token"
        );
    }
    Ok(files)
}

/// What the masters last said is revoked, shared with the handshake check of every connection.
pub type SharedRevoked = std::sync::Arc<std::sync::RwLock<Revoked>>;

/// Revoked serials, and identities revoked up to a time (ms).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Revoked {
    pub serials: std::collections::BTreeSet<String>,
    pub identities: std::collections::BTreeMap<String, i64>,
}

impl Revoked {
    pub fn from_masters(list: &berth_api::pb::agent::Revocations) -> Self {
        Revoked {
            serials: list.serials.iter().cloned().collect(),
            identities: list.identities.iter().map(|i| (i.identity.clone(), i.at_ms)).collect(),
        }
    }

    /// Why a master's certificate may not be used, or Ok.
    pub fn check(&self, info: &berth_pki::CertInfo) -> Result<(), String> {
        if self.serials.contains(&info.serial) {
            return Err(format!("certificate {} of {} was revoked", info.serial, info.identity));
        }
        if self.identities.get(&info.identity.to_string()).is_some_and(|at| info.not_before_ms <= *at) {
            return Err(format!("the certificates of {} were revoked", info.identity));
        }
        Ok(())
    }
}

/// The QUIC mTLS client configuration for `files`; the handshake refuses a master whose
/// certificate `revoked` lists.
pub fn client_config(files: &TlsFiles, revoked: &SharedRevoked) -> Result<quinn::ClientConfig, AgentError> {
    let revoked = revoked.clone();
    let check: berth_pki::tls::RevocationCheck =
        std::sync::Arc::new(move |info| revoked.read().expect("revoked lock").check(info));
    let tls = berth_pki::tls::client_config_checked(files, &[berth_channel::ALPN], check)?;
    Ok(berth_channel::client_config(tls)?)
}

/// What an agent reports of its CAs in heartbeats: the digest of the CAs it trusts, and of the
/// one that issued its certificate (empty if none of them did).
pub fn ca_report(files: &TlsFiles) -> (String, String) {
    let bundle = berth_pki::bundle_digest(&files.ca_pem).map(|d| d.to_string()).unwrap_or_default();
    let issuer = files.cert.issuer_in(&files.ca_pem).map(|d| d.to_string()).unwrap_or_default();
    (bundle, issuer)
}

/// Replaces the CA certificates (a CA rotation's trust list).
pub fn replace_ca(dir: &Path, ca_pem: &str) -> Result<(), AgentError> {
    berth_pki::bundle_certs(ca_pem)?;
    state::write_atomic(dir, CA_FILE, ca_pem.as_bytes(), 0o644)?;
    info!("now trusting the CA certificates the masters sent (a CA rotation)");
    Ok(())
}

/// Replaces the node certificate and key (and the CA certificate if it changed): both new files
/// are written and fsynced under `.new` names, then renamed into place (key first).
pub fn replace(dir: &Path, old: &TlsFiles, new: &TlsFiles) -> Result<(), AgentError> {
    if new.ca_pem != old.ca_pem {
        state::write_atomic(dir, CA_FILE, new.ca_pem.as_bytes(), 0o644)?;
    }
    state::write_atomic(dir, &pending_name(KEY_FILE), new.cert.key_pem.as_bytes(), 0o600)?;
    state::write_atomic(dir, &pending_name(CERT_FILE), new.cert.cert_pem.as_bytes(), 0o644)?;
    finish_interrupted_renewal(dir)?;
    info!("node certificate renewed");
    Ok(())
}

/// When to ask for a new certificate.
pub fn renew_at(files: &TlsFiles) -> SystemTime {
    files.cert.renew_at().unwrap_or_else(|e| {
        warn!("cannot read the node certificate's validity ({e}); renewing now");
        SystemTime::now()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interrupted_renewal_is_finished_on_load() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join(CERT_FILE), "old cert").unwrap();
        std::fs::write(d.join(KEY_FILE), "old key").unwrap();
        // Crash after the key was renamed but before the certificate was.
        std::fs::write(d.join(pending_name(CERT_FILE)), "new cert").unwrap();
        std::fs::write(d.join(KEY_FILE), "new key").unwrap();
        finish_interrupted_renewal(d).unwrap();
        assert_eq!(std::fs::read_to_string(d.join(CERT_FILE)).unwrap(), "new cert");
        assert_eq!(std::fs::read_to_string(d.join(KEY_FILE)).unwrap(), "new key");
        assert!(!d.join(pending_name(CERT_FILE)).exists());

        // Crash before any rename: both are completed.
        std::fs::write(d.join(pending_name(CERT_FILE)), "newer cert").unwrap();
        std::fs::write(d.join(pending_name(KEY_FILE)), "newer key").unwrap();
        finish_interrupted_renewal(d).unwrap();
        assert_eq!(std::fs::read_to_string(d.join(CERT_FILE)).unwrap(), "newer cert");
        assert_eq!(std::fs::read_to_string(d.join(KEY_FILE)).unwrap(), "newer key");

        // A lone new key (crash while writing the certificate) is dropped.
        std::fs::write(d.join(pending_name(KEY_FILE)), "orphan key").unwrap();
        finish_interrupted_renewal(d).unwrap();
        assert_eq!(std::fs::read_to_string(d.join(KEY_FILE)).unwrap(), "newer key");
        assert!(!d.join(pending_name(KEY_FILE)).exists());
    }
}
