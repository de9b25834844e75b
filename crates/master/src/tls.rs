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

/// A master's credentials, swappable on renewal.
pub struct MasterPki {
    dir: PathBuf,
    id: u64,
    listen: SocketAddr,
    validity: Duration,
    digest: CaDigest,
    ca_pem: String,
    cert: RwLock<CertifiedKey>,
    /// The certificate's renewal point, drawn once per certificate (a random 50-80% of its
    /// lifetime): drawn again at every look, a point already passed could read as not yet due.
    renew_point: RwLock<SystemTime>,
    ca: RwLock<Option<CertificateAuthority>>,
    grpc_server: RwLock<Arc<rustls::ServerConfig>>,
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
/// when `secret`.
pub(crate) fn write_atomic(path: &Path, data: &[u8], secret: bool) -> Result<(), MasterError> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true).mode(if secret { 0o600 } else { 0o644 });
    let mut f = opts.open(&tmp).map_err(|e| pki_err(format!("writing {}: {e}", tmp.display())))?;
    f.write_all(data).and_then(|()| f.sync_all()).map_err(|e| pki_err(format!("writing {}: {e}", tmp.display())))?;
    fs::rename(&tmp, path).map_err(|e| pki_err(format!("renaming {}: {e}", tmp.display())))?;
    if let Some(parent) = path.parent() {
        fs::File::open(parent).and_then(|d| d.sync_all()).ok();
    }
    Ok(())
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
            Some(CertificateAuthority::from_pem(&ca_pem, &read(&dir.join(CA_KEY))?).map_err(pki_err)?)
        } else {
            None
        };
        let cert = CertifiedKey { cert_pem: read(&dir.join(MASTER_CERT))?, key_pem: read(&dir.join(MASTER_KEY))? };
        let ident = cert.identity().map_err(pki_err)?;
        if ident != Identity::master(id) {
            return Err(pki_err(format!(
                "{} is the certificate of {ident}, not of master {id}: this data dir belongs to another master",
                dir.join(MASTER_CERT).display()
            )));
        }
        let digest = CaDigest::of_cert_pem(&ca_pem).map_err(pki_err)?;
        let files = TlsFiles { ca_pem: ca_pem.clone(), cert: cert.clone() };
        let grpc = tls::server_config(&files, &[b"h2"]).map_err(pki_err)?;
        let renew_point = cert.renew_at().unwrap_or_else(|_| SystemTime::now());
        let pki = Arc::new(MasterPki {
            dir,
            id,
            listen,
            validity,
            digest,
            ca_pem,
            cert: RwLock::new(cert),
            renew_point: RwLock::new(renew_point),
            ca: RwLock::new(ca),
            grpc_server: RwLock::new(Arc::new(grpc)),
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
            write_atomic(&dir.join(MASTER_CERT), cert.cert_pem.as_bytes(), false)?;
            write_atomic(&dir.join(MASTER_KEY), cert.key_pem.as_bytes(), true)?;
            write_atomic(&dir.join(CA_KEY), key.as_bytes(), true)?;
            info!(id, "issued this master's certificate from the cluster CA in {}", src.display());
        } else if src.join(MASTER_CERT).exists() {
            fs::copy(src.join(MASTER_CERT), dir.join(MASTER_CERT))
                .and_then(|_| fs::copy(src.join(MASTER_KEY), dir.join(MASTER_KEY)))
                .map_err(|e| pki_err(format!("copying the master certificate from {}: {e}", src.display())))?;
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

    pub fn digest(&self) -> &CaDigest {
        &self.digest
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
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
        if ca.cert_pem.trim() != self.ca_pem.trim() {
            return Err(pki_err("the CA in the replicated state is not the CA of this master's certificate"));
        }
        let parsed = CertificateAuthority::from_pem(&ca.cert_pem, &ca.key_pem).map_err(pki_err)?;
        write_atomic(&self.dir.join(CA_KEY), ca.key_pem.as_bytes(), true)?;
        *self.ca.write().expect("ca lock") = Some(parsed);
        info!("received the cluster CA key through the replicated state");
        Ok(())
    }

    pub fn files(&self) -> TlsFiles {
        TlsFiles { ca_pem: self.ca_pem.clone(), cert: self.cert.read().expect("cert lock").clone() }
    }

    /// The gRPC server configuration (mTLS, TLS 1.3, h2) as of now.
    pub fn grpc_server_config(&self) -> Arc<rustls::ServerConfig> {
        self.grpc_server.read().expect("server config lock").clone()
    }

    /// The QUIC server configuration: client certificates are optional at the TLS level so that
    /// joining agents (which have none yet) can connect; the dispatcher checks identities itself.
    pub fn quic_server_config(&self) -> Result<rustls::ServerConfig, MasterError> {
        tls::server_config_client_auth_optional(&self.files(), &[berth_channel::ALPN]).map_err(pki_err)
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
        if SystemTime::now() < self.renew_at() {
            return Ok(false);
        }
        let Some(ca) = self.ca() else {
            warn!("this master's certificate is due for renewal but the CA key has not reached it yet");
            return Ok(false);
        };
        let cert = issue_master(&ca, self.id, self.listen, self.validity)?;
        let files = TlsFiles { ca_pem: self.ca_pem.clone(), cert: cert.clone() };
        let grpc = tls::server_config(&files, &[b"h2"]).map_err(pki_err)?;
        write_atomic(&self.dir.join(MASTER_KEY), cert.key_pem.as_bytes(), true)?;
        write_atomic(&self.dir.join(MASTER_CERT), cert.cert_pem.as_bytes(), false)?;
        *self.renew_point.write().expect("renew point lock") = cert.renew_at().unwrap_or_else(|_| SystemTime::now());
        *self.cert.write().expect("cert lock") = cert;
        *self.grpc_server.write().expect("server config lock") = Arc::new(grpc);
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
        loop {
            let (tcp, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        warn!("accepting a connection failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = token.cancelled() => return,
            };
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
