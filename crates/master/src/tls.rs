//! A master's certificates: where they live, how the first start gets them, renewal, and the
//! rustls configurations of its gRPC server (mTLS), its gRPC clients and its QUIC endpoint.
//!
//! `DATA_DIR/pki/` holds `ca.crt`, `master.crt`, `master.key` and, on masters that have it,
//! `ca.key`. A founding master gets the CA (certificate and key) from `--pki-dir` (written by
//! `berth pki init`) and issues its own certificate; a master added later gets `ca.crt`,
//! `master.crt` and `master.key` from `berth member add --pki-out` and receives the CA key through
//! the replicated state. The first leader records the CA in the replicated state (never in the
//! key space), so any master can sign once it has caught up.

use std::{
    fs,
    io::Write,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use berth_pki::{
    CaDigest, CertificateAuthority, CertifiedKey, Identity, MASTER_SERVER_NAME,
    tls::{self, TlsFiles},
};
use tracing::{info, warn};

use crate::MasterError;

pub(crate) const CA_CERT: &str = "ca.crt";
pub(crate) const CA_KEY: &str = "ca.key";
pub(crate) const MASTER_CERT: &str = "master.crt";
pub(crate) const MASTER_KEY: &str = "master.key";

/// A master's credentials, swappable on renewal and by a CA rotation.
pub struct MasterPki {
    dir: PathBuf,
    id: u64,
    listen: SocketAddr,
    validity: Duration,
    /// The CAs this master trusts (`ca.crt`: one, or two while a rotation is under way) and the
    /// digest of the one that signs (what new join tokens pin).
    trust: RwLock<Trust>,
    cert: RwLock<CertifiedKey>,
    /// The certificate's renewal point, drawn once per certificate (a random 50-80% of its
    /// lifetime): drawn again at every look, a point already passed could read as not yet due.
    renew_point: RwLock<SystemTime>,
    ca: RwLock<Option<CertificateAuthority>>,
    grpc_server: RwLock<Arc<rustls::ServerConfig>>,
    /// The web console's, built at its first connection and dropped whenever the gRPC one is
    /// rebuilt (a renewal, a CA change, the revocation check).
    console_server: RwLock<Option<Arc<rustls::ServerConfig>>>,
    /// The revocation list, checked in every handshake of the gRPC and QUIC servers; set once
    /// the master's context exists.
    check: std::sync::OnceLock<tls::RevocationCheck>,
    /// A CA rotation's `trust` phase: this master holds only the new CA's key, and a certificate
    /// of it would be refused by agents that do not trust it yet, so renewal waits for `switch`
    /// (the current certificate still has at least a fifth of its life).
    hold_renewal: std::sync::atomic::AtomicBool,
}

#[derive(Clone)]
struct Trust {
    bundle: String,
    /// `bundle_digest` of `bundle`: every agent heartbeat compares its own with it.
    bundle_digest: String,
    signing: CaDigest,
}

/// What [`MasterPki::sync`] changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Synced {
    pub trust: bool,
    pub signing: bool,
    pub cert: bool,
}

impl Synced {
    pub fn any(&self) -> bool {
        self.trust || self.signing || self.cert
    }
}

impl std::fmt::Debug for MasterPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MasterPki").field("dir", &self.dir).field("id", &self.id).finish_non_exhaustive()
    }
}

fn pki_err(what: impl std::fmt::Display) -> MasterError {
    MasterError::Pki(what.to_string())
}

fn read(path: &Path) -> Result<String, MasterError> {
    fs::read_to_string(path).map_err(|e| pki_err(format!("reading {}: {e}", path.display())))
}

/// Writes `data` to `path` atomically (temp file, fsync, rename), readable by the owner only
/// when `secret`. The temp file is new (its name is this file's, this process's and a counter's:
/// two writes in one directory never share one, and a leftover is never reused), and its mode is
/// set on the open file before any byte is written, whatever the umask or a leftover's mode.
pub(crate) fn write_atomic(path: &Path, data: &[u8], secret: bool) -> Result<(), MasterError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp =
        path.with_file_name(format!(".{name}.{}.{}.tmp", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed)));
    let mode = if secret { 0o600 } else { 0o644 };
    let written = (|| {
        let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(pki_err(format!("writing {}: {e}", path.display())));
    }
    if let Some(parent) = path.parent() {
        fs::File::open(parent).and_then(|d| d.sync_all()).ok();
    }
    Ok(())
}

/// This master's certificate and key, in one file (`master.pem`: the certificate, then the key)
/// so that a renewal replaces both in one rename: written as two files, a crash between the two
/// renames left a key that does not match its certificate, and a master that cannot start.
pub(crate) const MASTER_BUNDLE: &str = "master.pem";

fn write_bundle(dir: &Path, cert: &CertifiedKey) -> Result<(), MasterError> {
    let text = format!("{}\n{}", cert.cert_pem.trim_end(), cert.key_pem);
    write_atomic(&dir.join(MASTER_BUNDLE), text.as_bytes(), true)
}

/// Reads `master.pem`, or the two files an older berth wrote (`master.crt`, `master.key`),
/// which it then replaces with `master.pem`.
fn read_bundle(dir: &Path) -> Result<CertifiedKey, MasterError> {
    let bundle = dir.join(MASTER_BUNDLE);
    if bundle.exists() {
        let text = read(&bundle)?;
        let at = text
            .match_indices("-----BEGIN ")
            .map(|(i, _)| i)
            .find(|i| text[*i..].lines().next().is_some_and(|l| l.contains("PRIVATE KEY")))
            .ok_or_else(|| pki_err(format!("{} holds no private key", bundle.display())))?;
        return Ok(CertifiedKey {
            cert_pem: text[..at].trim_end().to_string() + "\n",
            key_pem: text[at..].to_string(),
        });
    }
    let cert = CertifiedKey { cert_pem: read(&dir.join(MASTER_CERT))?, key_pem: read(&dir.join(MASTER_KEY))? };
    write_bundle(dir, &cert)?;
    let _ = fs::remove_file(dir.join(MASTER_KEY));
    let _ = fs::remove_file(dir.join(MASTER_CERT));
    Ok(cert)
}

impl MasterPki {
    /// Loads `data_dir/pki`, or on a first start fills it from `pki_dir`.
    pub fn load_or_init(
        data_dir: &Path,
        pki_dir: Option<&Path>,
        id: u64,
        listen: SocketAddr,
        validity: Duration,
    ) -> Result<Arc<Self>, MasterError> {
        let dir = data_dir.join("pki");
        if !dir.join(CA_CERT).exists() {
            let Some(src) = pki_dir else {
                return Err(pki_err(format!(
                    "{} has no certificates: on the first start pass --pki-dir with the files of \
                     `berth pki init` (founding masters) or of `berth member add --pki-out` (a master \
                     added later)",
                    dir.display()
                )));
            };
            Self::init_from(&dir, src, id, listen, validity)?;
        }
        let ca_pem = read(&dir.join(CA_CERT))?;
        let ca = if dir.join(CA_KEY).exists() {
            Some(CertificateAuthority::from_bundle(&ca_pem, &read(&dir.join(CA_KEY))?).map_err(pki_err)?)
        } else {
            None
        };
        let cert = read_bundle(&dir)?;
        let ident = cert.identity().map_err(pki_err)?;
        if ident != Identity::master(id) {
            return Err(pki_err(format!(
                "{} is the certificate of {ident}, not of master {id}: this data dir belongs to another master",
                dir.join(MASTER_BUNDLE).display()
            )));
        }
        // The signing CA: the one whose key this master holds, else the one that issued its
        // certificate (a master added later, before the key reaches it).
        let signing = match &ca {
            Some(ca) => ca.digest(),
            None => match cert.issuer_in(&ca_pem) {
                Some(d) => d,
                None => CaDigest::of_cert_pem(&ca_pem).map_err(pki_err)?,
            },
        };
        let files = TlsFiles { ca_pem: ca_pem.clone(), cert: cert.clone() };
        let grpc = tls::server_config(&files, &[b"h2"]).map_err(pki_err)?;
        let renew_point = cert.renew_at().unwrap_or_else(|_| SystemTime::now());
        let pki = Arc::new(MasterPki {
            dir,
            id,
            listen,
            validity,
            trust: RwLock::new(Trust {
                bundle_digest: berth_pki::bundle_digest(&ca_pem).map_err(pki_err)?.to_string(),
                bundle: ca_pem,
                signing,
            }),
            cert: RwLock::new(cert),
            renew_point: RwLock::new(renew_point),
            ca: RwLock::new(ca),
            grpc_server: RwLock::new(Arc::new(grpc)),
            console_server: RwLock::new(None),
            check: std::sync::OnceLock::new(),
            hold_renewal: Default::default(),
        });
        // A certificate already past its renewal point (the master was down) is renewed now.
        pki.renew_if_due()?;
        Ok(pki)
    }

    fn init_from(dir: &Path, src: &Path, id: u64, listen: SocketAddr, validity: Duration) -> Result<(), MasterError> {
        fs::create_dir_all(dir).map_err(|e| pki_err(format!("creating {}: {e}", dir.display())))?;
        let ca_pem = read(&src.join(CA_CERT))?;
        if src.join(CA_KEY).exists() {
            let key = read(&src.join(CA_KEY))?;
            let ca = CertificateAuthority::from_pem(&ca_pem, &key).map_err(pki_err)?;
            let cert = issue_master(&ca, id, listen, validity)?;
            write_bundle(dir, &cert)?;
            write_atomic(&dir.join(CA_KEY), key.as_bytes(), true)?;
            info!(id, "issued this master's certificate from the cluster CA in {}", src.display());
        } else if src.join(MASTER_CERT).exists() {
            // Written anew rather than copied: a copy keeps the source's mode, and a key given
            // readable by all would stay so.
            write_bundle(
                dir,
                &CertifiedKey { cert_pem: read(&src.join(MASTER_CERT))?, key_pem: read(&src.join(MASTER_KEY))? },
            )?;
        } else {
            return Err(pki_err(format!(
                "{} has neither ca.key (from `berth pki init`) nor master.crt/master.key (from \
                 `berth member add --pki-out`)",
                src.display()
            )));
        }
        // The secrets key-encryption key, when the directory has one (`berth pki init` writes it).
        let kek = src.join(crate::secrets::KEY_FILE);
        if kek.exists() {
            write_atomic(&dir.join(crate::secrets::KEY_FILE), read(&kek)?.as_bytes(), true)?;
        }
        // Written last: its presence marks the directory complete.
        write_atomic(&dir.join(CA_CERT), ca_pem.as_bytes(), false)
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// The digest of the CA that signs: what join tokens pin.
    pub fn digest(&self) -> CaDigest {
        self.trust.read().expect("trust lock").signing.clone()
    }

    /// Whether `digest` names a CA this master trusts (a join token made before a rotation pins
    /// the old CA, which stays good until the rotation retires it).
    pub fn trusts(&self, digest: &CaDigest) -> bool {
        berth_pki::bundle_cert_digests(&self.ca_pem()).is_ok_and(|ds| ds.contains(digest))
    }

    /// The digest of the CAs this master trusts (`berth_pki::bundle_digest`).
    pub fn bundle_digest(&self) -> String {
        self.trust.read().expect("trust lock").bundle_digest.clone()
    }

    /// The CAs this master trusts, PEM: what it gives agents and users as `ca.crt`.
    pub fn ca_pem(&self) -> String {
        self.trust.read().expect("trust lock").bundle.clone()
    }

    /// Checks revocations in every handshake from now on (the gRPC and QUIC servers).
    pub(crate) fn set_revocation_check(&self, check: tls::RevocationCheck) -> Result<(), MasterError> {
        let _ = self.check.set(check);
        self.rebuild_grpc()
    }

    fn rebuild_grpc(&self) -> Result<(), MasterError> {
        let files = self.files();
        let grpc = match self.check.get() {
            Some(check) => tls::server_config_checked(&files, &[b"h2"], false, check.clone()),
            None => tls::server_config(&files, &[b"h2"]),
        }
        .map_err(pki_err)?;
        *self.grpc_server.write().expect("server config lock") = Arc::new(grpc);
        *self.console_server.write().expect("console config lock") = None;
        Ok(())
    }

    /// Follows the CA state a rotation committed: `bundle` is what to trust, `signing` the CA
    /// recorded in the replicated state (its key included), and `present_signing` whether this
    /// master must now present a certificate of the signing CA (it reissues its own if not).
    /// Files are written before memory changes: a crash in between leaves the new state on disk,
    /// which the next start reads.
    pub(crate) fn sync(
        &self,
        bundle: &str,
        signing: &berth_types::ClusterCa,
        present_signing: bool,
    ) -> Result<Synced, MasterError> {
        self.hold_renewal.store(!present_signing, std::sync::atomic::Ordering::Relaxed);
        let mut synced = Synced::default();
        let current = self.trust.read().expect("trust lock").clone();
        let trusted = berth_pki::bundle_digest(bundle).map_err(pki_err)?;
        if current.bundle_digest != trusted.as_str() {
            write_atomic(&self.dir.join(CA_CERT), bundle.as_bytes(), false)?;
            let mut trust = self.trust.write().expect("trust lock");
            trust.bundle = bundle.to_string();
            trust.bundle_digest = trusted.to_string();
            drop(trust);
            synced.trust = true;
            info!(ca_digest = %trusted, "now trusting the CAs of the rotation's bundle");
        }
        let ca = CertificateAuthority::from_pem(&signing.cert_pem, &signing.key_pem).map_err(pki_err)?;
        if self.ca().is_none_or(|held| held.digest() != ca.digest()) {
            write_atomic(&self.dir.join(CA_KEY), signing.key_pem.as_bytes(), true)?;
            self.trust.write().expect("trust lock").signing = ca.digest();
            *self.ca.write().expect("ca lock") = Some(ca.clone());
            synced.signing = true;
            info!(ca = %ca.digest(), "signing with the cluster CA recorded in the replicated state");
        }
        if present_signing && !self.cert.read().expect("cert lock").issued_by(ca.cert_pem()) {
            let cert = issue_master(&ca, self.id, self.listen, self.validity)?;
            write_bundle(&self.dir, &cert)?;
            *self.renew_point.write().expect("renew point lock") =
                cert.renew_at().unwrap_or_else(|_| SystemTime::now());
            *self.cert.write().expect("cert lock") = cert;
            synced.cert = true;
            info!(ca = %ca.digest(), "this master now presents a certificate of the new CA");
        }
        if synced.trust || synced.cert {
            self.rebuild_grpc()?;
        }
        Ok(synced)
    }

    /// The digest of the CA that issued this master's certificate, among those it trusts.
    pub(crate) fn cert_ca_digest(&self) -> Option<CaDigest> {
        self.cert.read().expect("cert lock").issuer_in(&self.ca_pem())
    }

    /// The CA (with its key), if this master has it.
    pub fn ca(&self) -> Option<CertificateAuthority> {
        self.ca.read().expect("ca lock").clone()
    }

    /// Adopts the CA recorded in the replicated state, when this master does not hold it yet.
    pub fn adopt_ca(&self, ca: &berth_types::ClusterCa) -> Result<(), MasterError> {
        if self.ca().is_some() {
            return Ok(());
        }
        let parsed = CertificateAuthority::from_pem(&ca.cert_pem, &ca.key_pem).map_err(pki_err)?;
        if !self.trusts(&parsed.digest()) {
            return Err(pki_err("the CA in the replicated state is not one this master trusts"));
        }
        write_atomic(&self.dir.join(CA_KEY), ca.key_pem.as_bytes(), true)?;
        self.trust.write().expect("trust lock").signing = parsed.digest();
        *self.ca.write().expect("ca lock") = Some(parsed);
        info!("received the cluster CA key through the replicated state");
        Ok(())
    }

    pub fn files(&self) -> TlsFiles {
        TlsFiles { ca_pem: self.ca_pem(), cert: self.cert.read().expect("cert lock").clone() }
    }

    /// The gRPC server configuration (mTLS, TLS 1.3, h2) as of now.
    pub fn grpc_server_config(&self) -> Arc<rustls::ServerConfig> {
        self.grpc_server.read().expect("server config lock").clone()
    }

    /// The QUIC server configuration: client certificates are optional at the TLS level so that
    /// joining agents (which have none yet) can connect; the dispatcher checks identities itself.
    pub fn quic_server_config(&self) -> Result<rustls::ServerConfig, MasterError> {
        match self.check.get() {
            Some(check) => tls::server_config_checked(&self.files(), &[berth_channel::ALPN], true, check.clone()),
            None => tls::server_config_client_auth_optional(&self.files(), &[berth_channel::ALPN]),
        }
        .map_err(pki_err)
    }

    /// The web console's server configuration: this master's certificate, HTTP/1.1, and a client
    /// certificate optional (a browser without one logs in with a token); one it presents must
    /// chain to the cluster CA and not be revoked.
    pub(crate) fn console_server_config(&self) -> Result<Arc<rustls::ServerConfig>, MasterError> {
        if let Some(c) = self.console_server.read().expect("console config lock").as_ref() {
            return Ok(c.clone());
        }
        // Built under the lock a rebuild also takes, so a rebuild in between cannot be undone
        // by storing a configuration made from the files before it.
        let mut cached = self.console_server.write().expect("console config lock");
        if let Some(c) = cached.as_ref() {
            return Ok(c.clone());
        }
        let alpn: &[&[u8]] = &[b"http/1.1"];
        let config = match self.check.get() {
            Some(check) => tls::server_config_checked(&self.files(), alpn, true, check.clone()),
            None => tls::server_config_client_auth_optional(&self.files(), alpn),
        }
        .map(Arc::new)
        .map_err(pki_err)?;
        *cached = Some(config.clone());
        Ok(config)
    }

    /// TLS for this master's gRPC clients (Raft, forwarding).
    pub fn client_tls(&self) -> tonic::transport::ClientTlsConfig {
        client_tls(&self.files())
    }

    /// When this master's certificate should be renewed.
    pub fn renew_at(&self) -> SystemTime {
        *self.renew_point.read().expect("renew point lock")
    }

    /// Renews this master's certificate if its renewal point has passed and the CA is at hand.
    pub fn renew_if_due(&self) -> Result<bool, MasterError> {
        if SystemTime::now() < self.renew_at() || self.hold_renewal.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(false);
        }
        let Some(ca) = self.ca() else {
            warn!("this master's certificate is due for renewal but the CA key has not reached it yet");
            return Ok(false);
        };
        let cert = issue_master(&ca, self.id, self.listen, self.validity)?;
        write_bundle(&self.dir, &cert)?;
        *self.renew_point.write().expect("renew point lock") = cert.renew_at().unwrap_or_else(|_| SystemTime::now());
        *self.cert.write().expect("cert lock") = cert;
        self.rebuild_grpc()?;
        info!(renew_at = ?self.renew_at(), "renewed this master's certificate");
        Ok(true)
    }
}

/// A master certificate: valid for the server name every client checks, plus the listen address.
pub fn issue_master(
    ca: &CertificateAuthority,
    id: u64,
    listen: SocketAddr,
    validity: Duration,
) -> Result<CertifiedKey, MasterError> {
    let ips = if listen.ip().is_unspecified() { vec![] } else { vec![listen.ip()] };
    ca.issue(&Identity::master(id), &[MASTER_SERVER_NAME.to_string()], &ips, validity).map_err(pki_err)
}

/// TLS for a gRPC client of the masters: verifies them against the CA under the masters' server
/// name and presents `files.cert`.
pub fn client_tls(files: &TlsFiles) -> tonic::transport::ClientTlsConfig {
    tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&files.ca_pem))
        .identity(tonic::transport::Identity::from_pem(&files.cert.cert_pem, &files.cert.key_pem))
        .domain_name(MASTER_SERVER_NAME)
}

/// The identity of the peer of a gRPC request, from its client certificate.
pub(crate) fn peer_identity<T>(req: &tonic::Request<T>) -> Option<Identity> {
    let certs = req.peer_certs()?;
    berth_pki::identity_of_der(certs.first()?.as_ref()).ok()
}

/// The next connection on `listener`, or None once `token` fires. A failed accept (out of file
/// descriptors, say) is logged and retried after 50 ms rather than ending the server.
pub(crate) async fn accept(
    listener: &tokio::net::TcpListener,
    token: &tokio_util::sync::CancellationToken,
) -> Option<(tokio::net::TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => return Some(c),
                Err(e) => {
                    warn!("accepting a connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = token.cancelled() => return None,
        }
    }
}

/// Accepts TCP connections and completes TLS handshakes concurrently, yielding the streams tonic
/// serves. A failed handshake (no certificate, another CA) is logged and dropped.
pub(crate) fn tls_incoming(
    listener: tokio::net::TcpListener,
    pki: Arc<MasterPki>,
    token: tokio_util::sync::CancellationToken,
) -> tokio_stream::wrappers::ReceiverStream<
    Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>, std::io::Error>,
> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        while let Some((tcp, peer)) = accept(&listener, &token).await {
            let _ = tcp.set_nodelay(true);
            let acceptor = tokio_rustls::TlsAcceptor::from(pki.grpc_server_config());
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => info!(%peer, "refused a connection: TLS handshake failed: {e}"),
                    Err(_) => info!(%peer, "refused a connection: no TLS handshake within 10s"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    /// A temp file left behind by an earlier write (or planted), readable by all, does not lend
    /// its mode to a key written next to it.
    #[test]
    fn a_leftover_temp_file_does_not_widen_a_key() {
        let dir = tempfile::tempdir().unwrap();
        for leftover in ["master.tmp", "ca.tmp", ".master.key.tmp"] {
            fs::write(dir.path().join(leftover), b"old").unwrap();
            fs::set_permissions(dir.path().join(leftover), fs::Permissions::from_mode(0o644)).unwrap();
        }
        for key in ["master.key", "ca.key"] {
            write_atomic(&dir.path().join(key), b"secret", true).unwrap();
            assert_eq!(mode(&dir.path().join(key)), 0o600, "{key}");
        }
        write_atomic(&dir.path().join("ca.crt"), b"public", false).unwrap();
        assert_eq!(mode(&dir.path().join("ca.crt")), 0o644);
        // No temp file of ours is left.
        let left: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp") && !["master.tmp", "ca.tmp", ".master.key.tmp"].contains(&n.as_str()))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    /// The certificate and key are one file, replaced in one rename; the two files an older
    /// berth wrote are read once and replaced by it.
    #[test]
    fn certificate_and_key_are_one_file() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::generate("test").unwrap();
        let cert = issue_master(&ca, 3, "127.0.0.1:7000".parse().unwrap(), Duration::from_secs(3600)).unwrap();
        fs::write(dir.path().join(MASTER_CERT), &cert.cert_pem).unwrap();
        fs::write(dir.path().join(MASTER_KEY), &cert.key_pem).unwrap();
        let read = read_bundle(dir.path()).unwrap();
        assert_eq!(read.identity().unwrap(), Identity::master(3));
        assert_eq!(read.key_pem, cert.key_pem);
        assert!(!dir.path().join(MASTER_KEY).exists() && !dir.path().join(MASTER_CERT).exists());
        assert_eq!(mode(&dir.path().join(MASTER_BUNDLE)), 0o600);
        let renewed = issue_master(&ca, 3, "127.0.0.1:7000".parse().unwrap(), Duration::from_secs(3600)).unwrap();
        write_bundle(dir.path(), &renewed).unwrap();
        let read = read_bundle(dir.path()).unwrap();
        assert_eq!((read.cert_pem.trim(), read.key_pem.trim()), (renewed.cert_pem.trim(), renewed.key_pem.trim()));
        // Usable as it is read back.
        tls::server_config(&TlsFiles { ca_pem: ca.cert_pem().to_string(), cert: read }, &[b"h2"]).unwrap();
    }
}
