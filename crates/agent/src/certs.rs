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

/// The QUIC mTLS client configuration for `files`.
pub fn client_config(files: &TlsFiles) -> Result<quinn::ClientConfig, AgentError> {
    let tls = berth_pki::tls::client_config(files, &[berth_channel::ALPN])?;
    Ok(berth_channel::client_config(tls)?)
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
