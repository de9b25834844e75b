//! rustls configurations for berth's connections. All of them are TLS 1.3 only and use the
//! `ring` crypto provider.
//!
//! * [`server_config`] / [`client_config`]: mutual TLS between holders of certificates issued by
//!   the cluster CA (gRPC, and QUIC between agents and masters).
//! * [`server_config_client_auth_optional`]: the masters' QUIC endpoint, where joining agents
//!   have no certificate yet; the session code must check [`peer_identity`] itself.
//! * [`pinned_client_config`]: the join connection, trusting only the CA whose digest the join
//!   token carries; afterwards [`ca_from_chain`] yields that CA for the agent to store.
//!
//! Clients always verify the server against [`MASTER_SERVER_NAME`] (whatever name or address
//! they dialled) and additionally require the server certificate to carry a master identity.
//! Pass [`master_server_name`] as the server name when connecting, so SNI matches too.

use std::fmt;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore, SignatureScheme};

use crate::ca::{certs_from_pem, pem_encode_cert};
use crate::{CaDigest, CertInfo, CertifiedKey, Identity, MASTER_SERVER_NAME, PkiError, Role, identity_of_der};

/// What a process holds: the cluster CA certificate and its own certificate and key.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub ca_pem: String,
    pub cert: CertifiedKey,
}

impl TlsFiles {
    pub fn new(ca_pem: impl Into<String>, cert: CertifiedKey) -> Self {
        TlsFiles { ca_pem: ca_pem.into(), cert }
    }
}

/// Installs the `ring` provider as the process-wide rustls default. Call once at process start;
/// calling it again (or after another provider was installed) does nothing.
pub fn install_crypto_provider() {
    if CryptoProvider::get_default().is_none() {
        // Losing a race with another thread installing a provider is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// The provider every configuration here is built with.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// [`MASTER_SERVER_NAME`] as a rustls server name.
pub fn master_server_name() -> ServerName<'static> {
    ServerName::try_from(MASTER_SERVER_NAME).expect("MASTER_SERVER_NAME is a valid DNS name")
}

/// The identity of a peer from the certificate chain it presented (leaf first); use on chains
/// the handshake verified. Errors if the peer presented no certificate.
pub fn peer_identity(chain: &[CertificateDer<'_>]) -> Result<Identity, PkiError> {
    let leaf = chain.first().ok_or_else(|| PkiError::Certificate {
        what: "peer",
        reason: "the peer presented no certificate".to_string(),
    })?;
    identity_of_der(leaf)
}

/// Server side: requires a client certificate signed by the CA, TLS 1.3 only, the given ALPN
/// protocols. The server presents `[leaf, ca]`.
pub fn server_config(files: &TlsFiles, alpn: &[&[u8]]) -> Result<rustls::ServerConfig, PkiError> {
    build_server_config(files, alpn, false)
}

/// Server side for QUIC agents where joining agents have NO certificate yet: a client certificate
/// is optional, but one that is presented must be signed by the CA. The session code checks the
/// peer identity itself (no certificate = may only join).
pub fn server_config_client_auth_optional(files: &TlsFiles, alpn: &[&[u8]]) -> Result<rustls::ServerConfig, PkiError> {
    build_server_config(files, alpn, true)
}

/// Asks whether a certificate the chain check accepted is revoked: `Err(why)` refuses it. The
/// masters pass their copy of the replicated revocation list, agents the list the masters sent.
pub type RevocationCheck = Arc<dyn Fn(&CertInfo) -> Result<(), String> + Send + Sync>;

/// [`server_config`] or [`server_config_client_auth_optional`] (`optional`) that also refuses a
/// revoked client certificate in the handshake, with TLS's `certificate_revoked` alert.
pub fn server_config_checked(
    files: &TlsFiles,
    alpn: &[&[u8]],
    optional: bool,
    check: RevocationCheck,
) -> Result<rustls::ServerConfig, PkiError> {
    build_server_config_with(files, alpn, optional, Some(check))
}

fn build_server_config(files: &TlsFiles, alpn: &[&[u8]], optional: bool) -> Result<rustls::ServerConfig, PkiError> {
    build_server_config_with(files, alpn, optional, None)
}

fn build_server_config_with(
    files: &TlsFiles,
    alpn: &[&[u8]],
    optional: bool,
    check: Option<RevocationCheck>,
) -> Result<rustls::ServerConfig, PkiError> {
    let provider = crypto_provider();
    let ca_certs = certs_from_pem(&files.ca_pem, "CA certificate")?;
    let roots = Arc::new(root_store(&ca_certs)?);
    let mut builder = WebPkiClientVerifier::builder_with_provider(roots, provider.clone());
    if optional {
        builder = builder.allow_unauthenticated();
    }
    let webpki = builder.build().map_err(|e| PkiError::Verifier { reason: e.to_string() })?;
    let verifier: Arc<dyn ClientCertVerifier> = match check {
        Some(check) => Arc::new(CheckedClientVerifier { inner: webpki, check }),
        None => webpki,
    };
    let mut chain = vec![files.cert.cert_der()?];
    chain.extend(ca_certs);
    let tls_err = |source| PkiError::Tls { side: "server", source };
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, files.cert.key_der()?)
        .map_err(tls_err)?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// Client side with a client certificate; verifies the server against the CA and
/// [`MASTER_SERVER_NAME`], and requires it to be a master.
pub fn client_config(files: &TlsFiles, alpn: &[&[u8]]) -> Result<rustls::ClientConfig, PkiError> {
    build_client_config(files, alpn, None)
}

/// [`client_config`] that also refuses a revoked master certificate in the handshake.
pub fn client_config_checked(
    files: &TlsFiles,
    alpn: &[&[u8]],
    check: RevocationCheck,
) -> Result<rustls::ClientConfig, PkiError> {
    build_client_config(files, alpn, Some(check))
}

fn build_client_config(
    files: &TlsFiles,
    alpn: &[&[u8]],
    check: Option<RevocationCheck>,
) -> Result<rustls::ClientConfig, PkiError> {
    let provider = crypto_provider();
    let roots = Arc::new(root_store(&certs_from_pem(&files.ca_pem, "CA certificate")?)?);
    let inner = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|e| PkiError::Verifier { reason: e.to_string() })?;
    let verifier = Arc::new(MasterVerifier { inner, check });
    let tls_err = |source| PkiError::Tls { side: "client", source };
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![files.cert.cert_der()?], files.cert.key_der()?)
        .map_err(tls_err)?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// Join: no client certificate; accepts the server only if the chain it presents includes a
/// certificate whose SHA-256 equals `digest`, the leaf is signed by that certificate, is valid for
/// [`MASTER_SERVER_NAME`] and carries a master identity.
pub fn pinned_client_config(digest: &CaDigest, alpn: &[&[u8]]) -> Result<rustls::ClientConfig, PkiError> {
    let digest = CaDigest::parse(&digest.0)?;
    let provider = crypto_provider();
    let verifier = Arc::new(PinnedCaVerifier { digest, provider: provider.clone() });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| PkiError::Tls { side: "client", source })?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// After a pinned handshake: the CA certificate (PEM) from the presented chain that matched the
/// digest.
pub fn ca_from_chain(chain: &[CertificateDer<'_>], digest: &CaDigest) -> Option<String> {
    chain.iter().find(|c| digest.matches_der(c)).map(|c| pem_encode_cert(c))
}

fn root_store(ca_certs: &[CertificateDer<'static>]) -> Result<RootCertStore, PkiError> {
    let mut roots = RootCertStore::empty();
    for cert in ca_certs {
        roots.add(cert.clone()).map_err(|e| PkiError::Certificate {
            what: "CA",
            reason: format!("it cannot be used as a trust anchor ({e})"),
        })?;
    }
    Ok(roots)
}

fn rejected(err: PkiError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(err))))
}

/// After webpki accepted the chain for [`MASTER_SERVER_NAME`]: is the leaf a master?
fn require_master(end_entity: &CertificateDer<'_>) -> Result<(), rustls::Error> {
    let identity = identity_of_der(end_entity).map_err(rejected)?;
    if identity.role != Role::Master {
        return Err(rejected(PkiError::NotAMaster { found: identity.to_string() }));
    }
    Ok(())
}

/// The signature checks of a verifier that wraps a webpki one (`self.inner`): its own.
macro_rules! signatures_of_inner {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.inner.verify_tls12_signature(message, cert, dss)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.inner.verify_tls13_signature(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.inner.supported_verify_schemes()
        }
    };
}

/// The revocation check on a leaf the chain check accepted: a revoked one is refused with
/// [`CertificateError::Revoked`], which rustls sends as the `certificate_revoked` alert.
fn check_revocation(check: &RevocationCheck, end_entity: &CertificateDer<'_>) -> Result<(), rustls::Error> {
    let info = crate::cert_info_of_der(end_entity).map_err(rejected)?;
    check(&info).map_err(|why| {
        tracing::info!("refused a revoked certificate in the TLS handshake: {why}");
        rustls::Error::InvalidCertificate(CertificateError::Revoked)
    })
}

/// webpki's client verification plus the revocation check.
struct CheckedClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    check: RevocationCheck,
}

impl fmt::Debug for CheckedClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CheckedClientVerifier").field("inner", &self.inner).finish_non_exhaustive()
    }
}

impl ClientCertVerifier for CheckedClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        check_revocation(&self.check, end_entity)?;
        Ok(verified)
    }

    signatures_of_inner!();
}

/// webpki verification against the cluster CA, always for [`MASTER_SERVER_NAME`], plus a master
/// identity check and, when given, the revocation check.
struct MasterVerifier {
    inner: Arc<WebPkiServerVerifier>,
    check: Option<RevocationCheck>,
}

impl fmt::Debug for MasterVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MasterVerifier").field("inner", &self.inner).finish_non_exhaustive()
    }
}

impl ServerCertVerifier for MasterVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified =
            self.inner.verify_server_cert(end_entity, intermediates, &master_server_name(), ocsp_response, now)?;
        require_master(end_entity)?;
        if let Some(check) = &self.check {
            check_revocation(check, end_entity)?;
        }
        Ok(verified)
    }

    signatures_of_inner!();
}

/// Trusts only the CA certificate with the pinned digest, taken from the chain the server sent.
struct PinnedCaVerifier {
    digest: CaDigest,
    provider: Arc<CryptoProvider>,
}

impl fmt::Debug for PinnedCaVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinnedCaVerifier").field("digest", &self.digest.0).finish()
    }
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| self.digest.matches_der(c))
            .ok_or_else(|| rejected(PkiError::PinnedCaNotPresented { digest: self.digest.0.clone() }))?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(format!("cannot build a verifier for the pinned CA: {e}")))?;
        let verified =
            webpki.verify_server_cert(end_entity, intermediates, &master_server_name(), ocsp_response, now)?;
        require_master(end_entity)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rustls::{ClientConnection, ServerConnection};

    use super::*;
    use crate::CertificateAuthority;

    const HOUR: Duration = Duration::from_secs(3600);
    const ALPN: &[&[u8]] = &[b"berth/1"];

    struct Cluster {
        ca: CertificateAuthority,
        master: TlsFiles,
    }

    fn cluster() -> Cluster {
        let ca = CertificateAuthority::generate("test").unwrap();
        let master = TlsFiles::new(ca.cert_pem(), ca.issue(&Identity::master(1), &[], &[], HOUR).unwrap());
        Cluster { ca, master }
    }

    fn files(ca: &CertificateAuthority, identity: Identity) -> TlsFiles {
        TlsFiles::new(ca.cert_pem(), ca.issue(&identity, &[], &[], HOUR).unwrap())
    }

    #[derive(Debug)]
    enum Failed {
        Client(rustls::Error),
        Server(rustls::Error),
    }

    /// Drives a full handshake plus one application record each way, in memory.
    fn handshake(
        client: rustls::ClientConfig,
        server: rustls::ServerConfig,
        name: &str,
    ) -> Result<(ClientConnection, ServerConnection), Failed> {
        use std::io::{Read, Write};

        let name = ServerName::try_from(name.to_string()).unwrap();
        let mut c = ClientConnection::new(Arc::new(client), name).unwrap();
        let mut s = ServerConnection::new(Arc::new(server)).unwrap();
        c.writer().write_all(b"ping").unwrap();
        let mut got_ping = Vec::new();
        let mut sent_pong = false;
        let mut got_pong = Vec::new();
        for _ in 0..20 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd).unwrap();
            }
            s.process_new_packets().map_err(Failed::Server)?;
            let mut tmp = [0u8; 64];
            while let Ok(n) = s.reader().read(&mut tmp) {
                if n == 0 {
                    break;
                }
                got_ping.extend_from_slice(&tmp[..n]);
            }
            if got_ping == b"ping" && !sent_pong {
                s.writer().write_all(b"pong").unwrap();
                sent_pong = true;
            }

            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd).unwrap();
            }
            c.process_new_packets().map_err(Failed::Client)?;
            while let Ok(n) = c.reader().read(&mut tmp) {
                if n == 0 {
                    break;
                }
                got_pong.extend_from_slice(&tmp[..n]);
            }
            if got_pong == b"pong" {
                assert!(!c.is_handshaking() && !s.is_handshaking());
                return Ok((c, s));
            }
        }
        panic!("handshake did not finish: ping {got_ping:?}, pong {got_pong:?}");
    }

    fn assert_tls13(c: &ClientConnection, s: &ServerConnection) {
        assert_eq!(c.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
        assert_eq!(s.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
        assert_eq!(c.alpn_protocol(), Some(&b"berth/1"[..]));
    }

    #[test]
    fn mutual_tls_between_certs_of_the_same_ca() {
        let cl = cluster();
        let agent_id = "8b0e9a4c-3f21-4d6e-b7a5-1c2d3e4f5a6b";
        let agent = files(&cl.ca, Identity::agent(agent_id));
        let (c, s) = handshake(
            client_config(&agent, ALPN).unwrap(),
            server_config(&cl.master, ALPN).unwrap(),
            MASTER_SERVER_NAME,
        )
        .unwrap();
        assert_tls13(&c, &s);
        assert_eq!(peer_identity(s.peer_certificates().unwrap()).unwrap(), Identity::agent(agent_id));
        assert_eq!(peer_identity(c.peer_certificates().unwrap()).unwrap(), Identity::master(1));
        // The server presents [leaf, ca].
        let chain = c.peer_certificates().unwrap();
        assert_eq!(chain.len(), 2);
        assert_eq!(CaDigest::of_der(&chain[1]), cl.ca.digest());
    }

    #[test]
    fn master_to_master_and_dialling_by_address() {
        let cl = cluster();
        let other_master = files(&cl.ca, Identity::master(2));
        // The client verifies against MASTER_SERVER_NAME whatever it dialled.
        let (c, s) = handshake(
            client_config(&other_master, ALPN).unwrap(),
            server_config(&cl.master, ALPN).unwrap(),
            "10.0.0.7",
        )
        .unwrap();
        assert_tls13(&c, &s);
        assert_eq!(peer_identity(s.peer_certificates().unwrap()).unwrap().master_id(), Some(2));
    }

    #[test]
    fn client_cert_from_another_ca_is_refused() {
        let cl = cluster();
        let other_ca = CertificateAuthority::generate("other").unwrap();
        let intruder = files(&other_ca, Identity::admin("mallory"));
        // The intruder trusts our CA so that only the server's check can stop it.
        let intruder = TlsFiles::new(cl.ca.cert_pem(), intruder.cert);
        for server in
            [server_config(&cl.master, ALPN).unwrap(), server_config_client_auth_optional(&cl.master, ALPN).unwrap()]
        {
            let err = handshake(client_config(&intruder, ALPN).unwrap(), server, MASTER_SERVER_NAME).unwrap_err();
            assert!(matches!(err, Failed::Server(rustls::Error::InvalidCertificate(_))), "{err:?}");
        }
    }

    fn revoking(serial_of: &TlsFiles) -> RevocationCheck {
        let serial = crate::cert_info_of_der(&serial_of.cert.cert_der().unwrap()).unwrap().serial;
        Arc::new(
            move |info: &CertInfo| {
                if info.serial == serial { Err(format!("certificate {} was revoked", info.serial)) } else { Ok(()) }
            },
        )
    }

    /// A revoked client certificate is refused in the handshake, with the `certificate_revoked`
    /// reason, by both kinds of server; another certificate of the same CA still gets in.
    #[test]
    fn a_revoked_client_certificate_is_refused_in_the_handshake() {
        let cl = cluster();
        let revoked = files(&cl.ca, Identity::admin("mallory"));
        let fine = files(&cl.ca, Identity::admin("alice"));
        for optional in [false, true] {
            let server = || server_config_checked(&cl.master, ALPN, optional, revoking(&revoked)).unwrap();
            let err = handshake(client_config(&revoked, ALPN).unwrap(), server(), MASTER_SERVER_NAME).unwrap_err();
            assert!(
                matches!(err, Failed::Server(rustls::Error::InvalidCertificate(CertificateError::Revoked))),
                "{err:?}"
            );
            handshake(client_config(&fine, ALPN).unwrap(), server(), MASTER_SERVER_NAME).unwrap();
        }
    }

    /// An agent refuses a master whose certificate was revoked.
    #[test]
    fn a_revoked_master_is_refused_by_the_client() {
        let cl = cluster();
        let agent = files(&cl.ca, Identity::agent("n1"));
        let client = client_config_checked(&agent, ALPN, revoking(&cl.master)).unwrap();
        let err = handshake(client, server_config(&cl.master, ALPN).unwrap(), MASTER_SERVER_NAME).unwrap_err();
        assert!(matches!(err, Failed::Client(rustls::Error::InvalidCertificate(CertificateError::Revoked))), "{err:?}");
        let other = files(&cl.ca, Identity::master(2));
        handshake(
            client_config_checked(&agent, ALPN, revoking(&cl.master)).unwrap(),
            server_config(&other, ALPN).unwrap(),
            MASTER_SERVER_NAME,
        )
        .unwrap();
    }

    /// A rotation's trust bundle: while both CAs are trusted, certificates of either are accepted
    /// both ways; once the old one is dropped, its certificates are refused.
    #[test]
    fn a_bundle_of_two_cas_trusts_both_until_the_old_one_is_dropped() {
        let old = CertificateAuthority::generate("test").unwrap();
        let new = old.successor().unwrap();
        assert_ne!(old.digest(), new.digest());
        let bundle = format!("{}{}", new.cert_pem(), old.cert_pem());
        let with = |ca: &CertificateAuthority, ident: Identity, trust: &str| {
            TlsFiles::new(trust, ca.issue(&ident, &[], &[], HOUR).unwrap())
        };
        for (master_ca, agent_ca) in [(&old, &new), (&new, &old), (&new, &new)] {
            let master = with(master_ca, Identity::master(1), &bundle);
            let agent = with(agent_ca, Identity::agent("n1"), &bundle);
            handshake(client_config(&agent, ALPN).unwrap(), server_config(&master, ALPN).unwrap(), MASTER_SERVER_NAME)
                .unwrap();
        }
        let master = with(&new, Identity::master(1), new.cert_pem());
        let stale = with(&old, Identity::agent("n1"), &bundle);
        let err =
            handshake(client_config(&stale, ALPN).unwrap(), server_config(&master, ALPN).unwrap(), MASTER_SERVER_NAME)
                .unwrap_err();
        assert!(matches!(err, Failed::Server(rustls::Error::InvalidCertificate(_))), "{err:?}");
        // What the masters and agents use to tell the CAs apart.
        let leaf = new.issue(&Identity::agent("n1"), &[], &[], HOUR).unwrap();
        assert!(leaf.issued_by(new.cert_pem()) && !leaf.issued_by(old.cert_pem()));
        let reversed = format!("{}{}", old.cert_pem(), new.cert_pem());
        assert_eq!(crate::bundle_digest(&bundle).unwrap(), crate::bundle_digest(&reversed).unwrap());
        assert_ne!(crate::bundle_digest(&bundle).unwrap(), crate::bundle_digest(new.cert_pem()).unwrap());
        let loaded = CertificateAuthority::from_bundle(&reversed, new.key_pem()).unwrap();
        assert_eq!(loaded.digest(), new.digest());
        assert!(CertificateAuthority::from_bundle(old.cert_pem(), new.key_pem()).is_err());
    }

    #[test]
    fn client_without_cert_needs_the_optional_server() {
        let cl = cluster();
        let pinned = pinned_client_config(&cl.ca.digest(), ALPN).unwrap();
        let err = handshake(pinned.clone(), server_config(&cl.master, ALPN).unwrap(), MASTER_SERVER_NAME).unwrap_err();
        assert!(matches!(err, Failed::Server(rustls::Error::NoCertificatesPresented)), "{err:?}");

        let (c, s) =
            handshake(pinned, server_config_client_auth_optional(&cl.master, ALPN).unwrap(), MASTER_SERVER_NAME)
                .unwrap();
        assert_tls13(&c, &s);
        assert!(s.peer_certificates().is_none());
    }

    #[test]
    fn pinned_client_accepts_the_right_digest_only() {
        let cl = cluster();
        let server = || server_config_client_auth_optional(&cl.master, ALPN).unwrap();

        let (c, _) =
            handshake(pinned_client_config(&cl.ca.digest(), ALPN).unwrap(), server(), MASTER_SERVER_NAME).unwrap();
        let chain = c.peer_certificates().unwrap();
        assert_eq!(ca_from_chain(chain, &cl.ca.digest()).as_deref(), Some(cl.ca.cert_pem()));
        let wrong = CaDigest("00".repeat(32));
        assert_eq!(ca_from_chain(chain, &wrong), None);

        let err = handshake(pinned_client_config(&wrong, ALPN).unwrap(), server(), MASTER_SERVER_NAME).unwrap_err();
        match err {
            Failed::Client(rustls::Error::InvalidCertificate(CertificateError::Other(e))) => {
                assert!(e.to_string().contains("did not present the CA"), "{e}");
            }
            other => panic!("expected the client to refuse the server, got {other:?}"),
        }

        // A server of another cluster that happens to send our CA in its chain is refused too:
        // its leaf is not signed by the pinned CA.
        let other_ca = CertificateAuthority::generate("other").unwrap();
        let other_master = files(&other_ca, Identity::master(1));
        let impostor = TlsFiles::new(format!("{}{}", other_ca.cert_pem(), cl.ca.cert_pem()), other_master.cert);
        let err = handshake(
            pinned_client_config(&cl.ca.digest(), ALPN).unwrap(),
            server_config_client_auth_optional(&impostor, ALPN).unwrap(),
            MASTER_SERVER_NAME,
        )
        .unwrap_err();
        assert!(matches!(err, Failed::Client(rustls::Error::InvalidCertificate(_))), "{err:?}");
    }

    #[test]
    fn non_master_server_is_refused() {
        let cl = cluster();
        // An admin certificate (client-auth only, no master name) used as a server.
        let admin = files(&cl.ca, Identity::admin("eve"));
        let agent = files(&cl.ca, Identity::agent("n1"));
        let err =
            handshake(client_config(&agent, ALPN).unwrap(), server_config(&admin, ALPN).unwrap(), MASTER_SERVER_NAME)
                .unwrap_err();
        assert!(matches!(err, Failed::Client(rustls::Error::InvalidCertificate(_))), "{err:?}");
    }

    #[test]
    fn server_with_a_master_name_but_no_master_identity_is_refused() {
        use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, Issuer, KeyPair, SanType};

        let cl = cluster();
        // Forge, with the real CA key, a server certificate that webpki accepts for
        // MASTER_SERVER_NAME but whose identity is an agent: only the identity check stops it.
        let issuer = Issuer::from_ca_cert_pem(cl.ca.cert_pem(), KeyPair::from_pem(cl.ca.key_pem()).unwrap()).unwrap();
        let mut params = CertificateParams::new(vec![MASTER_SERVER_NAME.to_string()]).unwrap();
        params.subject_alt_names.push(SanType::URI("berth://agent/n1".try_into().unwrap()));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();
        let forged = TlsFiles::new(cl.ca.cert_pem(), CertifiedKey::new(cert.pem(), key.serialize_pem()));
        let admin = files(&cl.ca, Identity::admin("ops"));

        for client in [client_config(&admin, ALPN).unwrap(), pinned_client_config(&cl.ca.digest(), ALPN).unwrap()] {
            let err = handshake(client, server_config_client_auth_optional(&forged, ALPN).unwrap(), MASTER_SERVER_NAME)
                .unwrap_err();
            match err {
                Failed::Client(rustls::Error::InvalidCertificate(CertificateError::Other(e))) => {
                    assert!(e.to_string().contains("not to a master"), "{e}");
                }
                other => panic!("expected the client to refuse a non-master server, got {other:?}"),
            }
        }
    }

    #[test]
    fn alpn_mismatch_is_refused() {
        let cl = cluster();
        let agent = files(&cl.ca, Identity::agent("n1"));
        let client = client_config(&agent, &[b"other"]).unwrap();
        let err = handshake(client, server_config(&cl.master, ALPN).unwrap(), MASTER_SERVER_NAME).unwrap_err();
        assert!(matches!(err, Failed::Server(rustls::Error::NoApplicationProtocol)), "{err:?}");
    }

    #[test]
    fn bad_inputs_give_clear_errors() {
        let cl = cluster();
        let broken = TlsFiles::new("not a pem", cl.master.cert.clone());
        let err = server_config(&broken, ALPN).unwrap_err();
        assert!(matches!(err, PkiError::Pem { .. }), "{err}");
        let err = pinned_client_config(&CaDigest("xyz".into()), ALPN).unwrap_err();
        assert!(matches!(err, PkiError::InvalidDigest { .. }), "{err}");
        assert!(peer_identity(&[]).is_err());
    }

    #[test]
    fn install_crypto_provider_is_idempotent() {
        install_crypto_provider();
        install_crypto_provider();
        assert!(CryptoProvider::get_default().is_some());
    }
}
