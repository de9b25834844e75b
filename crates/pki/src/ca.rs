//! The cluster CA and the certificates it issues.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::Rng;
use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateSigningRequestDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use x509_parser::certificate::X509Certificate;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;
use x509_parser::time::ASN1Time;

use crate::{Identity, MASTER_SERVER_NAME, ORGANIZATION, PkiError, Role};

/// Lifetime of a cluster CA created by [`CertificateAuthority::generate`].
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);

/// Every certificate's `notBefore` is this far in the past, so that a peer whose clock is a little
/// behind still accepts a certificate issued a moment ago.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(5 * 60);

/// Longest cluster name accepted by [`CertificateAuthority::generate`].
const MAX_CLUSTER_NAME_LEN: usize = 48;

/// Hex SHA-256 of the CA certificate's DER: what join tokens pin.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CaDigest(pub String);

impl CaDigest {
    /// Digest of the first certificate in `pem`.
    pub fn of_cert_pem(pem: &str) -> Result<Self, PkiError> {
        Ok(Self::of_der(&cert_der_from_pem(pem, "CA certificate")?))
    }

    pub fn of_der(der: &[u8]) -> Self {
        CaDigest(hex::encode(Sha256::digest(der)))
    }

    /// Parses 64 hex characters (either case; stored lowercase).
    pub fn parse(s: &str) -> Result<Self, PkiError> {
        if s.len() != 64 {
            return Err(PkiError::InvalidDigest { reason: format!("it is {} characters long", s.len()) });
        }
        if !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(PkiError::InvalidDigest {
                reason: "it contains characters other than 0-9 and a-f".to_string(),
            });
        }
        Ok(CaDigest(s.to_ascii_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `der` is the certificate this digest names.
    pub fn matches_der(&self, der: &[u8]) -> bool {
        Self::of_der(der).0.eq_ignore_ascii_case(&self.0)
    }
}

impl fmt::Display for CaDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A certificate and its private key, PEM.
#[derive(Clone)]
pub struct CertifiedKey {
    pub cert_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for CertifiedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let identity = self.identity().map(|i| i.to_string()).unwrap_or_else(|_| "<none>".to_string());
        f.debug_struct("CertifiedKey")
            .field("identity", &identity)
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

impl CertifiedKey {
    pub fn new(cert_pem: impl Into<String>, key_pem: impl Into<String>) -> Self {
        CertifiedKey { cert_pem: cert_pem.into(), key_pem: key_pem.into() }
    }

    /// The (first) certificate, DER.
    pub fn cert_der(&self) -> Result<CertificateDer<'static>, PkiError> {
        cert_der_from_pem(&self.cert_pem, "leaf certificate")
    }

    /// The private key, DER.
    pub fn key_der(&self) -> Result<PrivateKeyDer<'static>, PkiError> {
        PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).map_err(|e| PkiError::Pem {
            what: "private key",
            expected: "PRIVATE KEY",
            reason: e.to_string(),
        })
    }

    /// `(notBefore, notAfter)` of the certificate.
    pub fn validity(&self) -> Result<(SystemTime, SystemTime), PkiError> {
        let der = self.cert_der()?;
        let cert = parse_cert(&der, "leaf")?;
        Ok(validity_of(&cert))
    }

    pub fn not_after(&self) -> Result<SystemTime, PkiError> {
        Ok(self.validity()?.1)
    }

    pub fn not_before(&self) -> Result<SystemTime, PkiError> {
        Ok(self.validity()?.0)
    }

    pub fn identity(&self) -> Result<Identity, PkiError> {
        identity_of_der(&self.cert_der()?)
    }

    /// Whether the CA certificate `ca_pem` signed this certificate.
    pub fn issued_by(&self, ca_pem: &str) -> bool {
        let (Ok(der), Ok(ca_der)) = (self.cert_der(), cert_der_from_pem(ca_pem, "CA certificate")) else {
            return false;
        };
        let (Ok(cert), Ok(ca)) = (parse_cert(&der, "leaf"), parse_cert(&ca_der, "CA")) else { return false };
        cert.issuer() == ca.subject() && cert.verify_signature(Some(ca.public_key())).is_ok()
    }

    /// The digest of the CA of `bundle_pem` that signed this certificate, if one did.
    pub fn issuer_in(&self, bundle_pem: &str) -> Option<CaDigest> {
        bundle_certs(bundle_pem).ok()?.iter().find(|c| self.issued_by(c)).and_then(|c| CaDigest::of_cert_pem(c).ok())
    }

    /// A random instant between 50% and 80% of the validity period (jitter so renewals spread out).
    pub fn renew_at(&self) -> Result<SystemTime, PkiError> {
        let (not_before, not_after) = self.validity()?;
        let span = not_after.duration_since(not_before).unwrap_or_default();
        // Certificates are back-dated by the clock-skew allowance: the lifetime that counts
        // starts at issue time, or short lifetimes would be due for renewal at once.
        let (issued, lifetime) = if span > CLOCK_SKEW_ALLOWANCE {
            (not_before + CLOCK_SKEW_ALLOWANCE, span - CLOCK_SKEW_ALLOWANCE)
        } else {
            (not_before, span)
        };
        let fraction = rand::rng().random_range(0.5..=0.8);
        Ok(issued + lifetime.mul_f64(fraction))
    }
}

/// The cluster certificate authority: an ECDSA P-256 key and its self-signed certificate.
#[derive(Clone)]
pub struct CertificateAuthority {
    inner: Arc<CaInner>,
}

struct CaInner {
    cert_pem: String,
    key_pem: String,
    digest: CaDigest,
    subject: String,
    not_after: SystemTime,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("subject", &self.inner.subject)
            .field("digest", &self.inner.digest.0)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

impl CertificateAuthority {
    /// A new CA for the cluster `cluster_name`: ECDSA P-256, valid for ten years, CA:true with
    /// path length 0 (it signs only leaf certificates), key usage certificate and CRL signing.
    pub fn generate(cluster_name: &str) -> Result<Self, PkiError> {
        Self::generate_named(cluster_name, format!("berth CA {cluster_name}"))
    }

    /// A new CA to replace this one (`berth ca rotate`): the same cluster name, and a common name
    /// of its own (`berth CA <cluster> <unix seconds>`), so that while both are trusted a
    /// certificate's issuer names the one that signed it.
    pub fn successor(&self) -> Result<Self, PkiError> {
        let der = cert_der_from_pem(&self.inner.cert_pem, "CA certificate")?;
        let cert = parse_cert(&der, "CA")?;
        let cluster = cert
            .subject()
            .iter_organizational_unit()
            .next()
            .and_then(|ou| ou.as_str().ok())
            .unwrap_or("berth")
            .to_string();
        let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default();
        Self::generate_named(&cluster, format!("berth CA {cluster} {secs}"))
    }

    fn generate_named(cluster_name: &str, common_name: String) -> Result<Self, PkiError> {
        validate_cluster_name(cluster_name)?;
        let key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| PkiError::crypto("generate the CA key", e))?;
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, ORGANIZATION);
        dn.push(DnType::OrganizationalUnitName, cluster_name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        params.serial_number = Some(random_serial());
        params.not_before = to_asn1_time(now - CLOCK_SKEW_ALLOWANCE, CA_VALIDITY)?;
        params.not_after = to_asn1_time(now + CA_VALIDITY, CA_VALIDITY)?;
        let cert = params.self_signed(&key).map_err(|e| PkiError::crypto("self-sign the CA certificate", e))?;
        Self::from_pem(&cert.pem(), &key.serialize_pem())
    }

    /// Loads a CA from its certificate and private key. Fails unless the certificate is a CA
    /// certificate and the key is the one it certifies.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let der = cert_der_from_pem(cert_pem, "CA certificate")?;
        let key = KeyPair::from_pem(key_pem).map_err(|e| PkiError::Pem {
            what: "CA private key",
            expected: "PRIVATE KEY",
            reason: e.to_string(),
        })?;
        let cert = parse_cert(&der, "CA")?;
        let subject = cert.subject().to_string();
        if !cert.is_ca() {
            return Err(PkiError::NotCa { subject });
        }
        if cert.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(PkiError::KeyMismatch);
        }
        let (_, not_after) = validity_of(&cert);
        let issuer = Issuer::from_ca_cert_der(&der, key)
            .map_err(|e| PkiError::Certificate { what: "CA", reason: e.to_string() })?;
        Ok(CertificateAuthority {
            inner: Arc::new(CaInner {
                cert_pem: pem_encode_cert(&der),
                key_pem: key_pem.to_string(),
                digest: CaDigest::of_der(&der),
                subject,
                not_after,
                issuer,
            }),
        })
    }

    /// Loads the CA whose key is `key_pem` from a trust bundle (`ca.crt` while a rotation trusts
    /// two CAs): the certificate that certifies that key.
    pub fn from_bundle(bundle_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| PkiError::Pem {
            what: "CA private key",
            expected: "PRIVATE KEY",
            reason: e.to_string(),
        })?;
        for der in certs_from_pem(bundle_pem, "CA certificates")? {
            if parse_cert(&der, "CA")?.public_key().raw == key.subject_public_key_info().as_slice() {
                return Self::from_pem(&pem_encode_cert(&der), key_pem);
            }
        }
        Err(PkiError::KeyMismatch)
    }

    /// The CA certificate, PEM (normalised: exactly one certificate).
    pub fn cert_pem(&self) -> &str {
        &self.inner.cert_pem
    }

    /// The CA private key, PEM. Only masters may store it.
    pub fn key_pem(&self) -> &str {
        &self.inner.key_pem
    }

    pub fn digest(&self) -> CaDigest {
        self.inner.digest.clone()
    }

    pub fn not_after(&self) -> SystemTime {
        self.inner.not_after
    }

    /// New key pair + certificate for `identity`. `dns_names`/`ips` become SANs; master
    /// certificates always also get [`MASTER_SERVER_NAME`], `localhost` and `127.0.0.1`, and only
    /// masters may carry [`MASTER_SERVER_NAME`]. Master certificates are good for TLS server and
    /// client authentication, the others for client authentication only. The certificate is
    /// back-dated by [`CLOCK_SKEW_ALLOWANCE`] and never outlives the CA.
    pub fn issue(
        &self,
        identity: &Identity,
        dns_names: &[String],
        ips: &[IpAddr],
        validity: Duration,
    ) -> Result<CertifiedKey, PkiError> {
        identity.validate()?;
        let sans = subject_alt_names(identity, dns_names, ips)?;
        let params = self.leaf_params(identity, sans, validity)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| PkiError::crypto("generate a key", e))?;
        let cert =
            params.signed_by(&key, &self.inner.issuer).map_err(|e| PkiError::crypto("sign the certificate", e))?;
        Ok(CertifiedKey { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// Signs a CSR (PEM) for `identity`, ignoring any subject, SAN or extension the CSR asks for:
    /// the signer decides the identity (masters get the default master SANs). The CSR's
    /// self-signature is checked, so the requester proves it holds the key. Returns the
    /// certificate, PEM.
    pub fn sign_csr(&self, csr_pem: &str, identity: &Identity, validity: Duration) -> Result<String, PkiError> {
        self.sign_csr_with(csr_pem, identity, &[], &[], validity)
    }

    /// [`CertificateAuthority::sign_csr`] with extra subject alternative names chosen by the
    /// signer (a master's listen address).
    pub fn sign_csr_with(
        &self,
        csr_pem: &str,
        identity: &Identity,
        dns_names: &[String],
        ips: &[IpAddr],
        validity: Duration,
    ) -> Result<String, PkiError> {
        identity.validate()?;
        let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes()).map_err(|e| PkiError::Pem {
            what: "certificate signing request",
            expected: "CERTIFICATE REQUEST",
            reason: e.to_string(),
        })?;
        let (_, csr) = X509CertificationRequest::from_der(&der)
            .map_err(|e| PkiError::InvalidCsr { reason: format!("it is not a PKCS#10 request ({e})") })?;
        csr.verify_signature().map_err(|e| PkiError::InvalidCsr {
            reason: format!("its signature does not verify with the public key it carries ({e})"),
        })?;
        let public_key = rcgen::SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw)
            .map_err(|e| PkiError::InvalidCsr {
                reason: format!("its public key is of an unsupported kind ({e}); use ECDSA P-256"),
            })?;
        let sans = subject_alt_names(identity, dns_names, ips)?;
        let params = self.leaf_params(identity, sans, validity)?;
        let cert = params
            .signed_by(&public_key, &self.inner.issuer)
            .map_err(|e| PkiError::crypto("sign the certificate", e))?;
        Ok(cert.pem())
    }

    fn leaf_params(
        &self,
        identity: &Identity,
        sans: Vec<SanType>,
        validity: Duration,
    ) -> Result<CertificateParams, PkiError> {
        if validity.is_zero() {
            return Err(PkiError::InvalidValidity { validity, reason: "it must be longer than zero".to_string() });
        }
        let now = SystemTime::now();
        if now >= self.inner.not_after {
            return Err(PkiError::Certificate {
                what: "CA",
                reason: "it has expired; create a new cluster CA".to_string(),
            });
        }
        let not_after = now.checked_add(validity).map_or(self.inner.not_after, |t| t.min(self.inner.not_after));
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, identity.common_name());
        dn.push(DnType::OrganizationName, ORGANIZATION);
        dn.push(DnType::OrganizationalUnitName, identity.role.as_str());
        params.distinguished_name = dn;
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match identity.role {
            Role::Master => vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
            Role::Agent | Role::Admin | Role::User => vec![ExtendedKeyUsagePurpose::ClientAuth],
        };
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        params.not_before = to_asn1_time(now - CLOCK_SKEW_ALLOWANCE, validity)?;
        params.not_after = to_asn1_time(not_after, validity)?;
        Ok(params)
    }
}

/// The certificates of a trust bundle (PEM), each as its own PEM, in order.
pub fn bundle_certs(bundle_pem: &str) -> Result<Vec<String>, PkiError> {
    Ok(certs_from_pem(bundle_pem, "CA certificates")?.iter().map(|d| pem_encode_cert(d)).collect())
}

/// The digest of each certificate of a trust bundle, in order.
pub fn bundle_cert_digests(bundle_pem: &str) -> Result<Vec<CaDigest>, PkiError> {
    Ok(certs_from_pem(bundle_pem, "CA certificates")?.iter().map(|d| CaDigest::of_der(d)).collect())
}

/// One digest for a trust bundle, whatever the order of its certificates: the SHA-256 of their
/// sorted digests. Agents report it; a master sends its bundle to an agent whose digest differs.
pub fn bundle_digest(bundle_pem: &str) -> Result<CaDigest, PkiError> {
    let mut digests: Vec<String> =
        certs_from_pem(bundle_pem, "CA certificates")?.iter().map(|d| CaDigest::of_der(d).0).collect();
    digests.sort();
    digests.dedup();
    Ok(CaDigest::of_der(digests.join("\n").as_bytes()))
}

/// A fresh ECDSA P-256 key pair and a CSR for it with subject CN `common_name`: the agent keeps
/// the key and sends the CSR. Returns `(csr_pem, key_pem)`.
pub fn generate_csr(common_name: &str) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| PkiError::crypto("generate a key", e))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    let csr =
        params.serialize_request(&key).map_err(|e| PkiError::crypto("create the certificate signing request", e))?;
    let csr_pem = csr.pem().map_err(|e| PkiError::crypto("encode the certificate signing request", e))?;
    Ok((csr_pem, key.serialize_pem()))
}

/// What revocation looks at in a certificate: its identity, serial number and start of validity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub identity: Identity,
    /// The serial number in lowercase hex, without leading zeros (see [`normalize_serial`]).
    pub serial: String,
    /// When it became valid, milliseconds since the Unix epoch.
    pub not_before_ms: i64,
}

/// A certificate serial as an operator may type it (`3A:5F:...`, `0x3a5f...`, `3A5F...`), in the
/// one form berth stores and compares: lowercase hex without separators or leading zeros. None
/// when it is not hex.
pub fn normalize_serial(text: &str) -> Option<String> {
    let t = text.trim();
    let t = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")).unwrap_or(t);
    let hex: String = t.chars().filter(|c| *c != ':').collect::<String>().to_ascii_lowercase();
    if hex.is_empty() || hex.len() > 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let trimmed = hex.trim_start_matches('0');
    Some(if trimmed.is_empty() { "0".to_string() } else { trimmed.to_string() })
}

/// Identity, serial and start of validity of a certificate (DER) the TLS layer has verified.
pub fn cert_info_of_der(cert_der: &[u8]) -> Result<CertInfo, PkiError> {
    let identity = identity_of_der(cert_der)?;
    let cert = parse_cert(cert_der, "peer")?;
    let hex: String = cert.raw_serial().iter().map(|b| format!("{b:02x}")).collect();
    let serial = normalize_serial(&hex).unwrap_or_else(|| "0".to_string());
    Ok(CertInfo { identity, serial, not_before_ms: cert.validity().not_before.timestamp().saturating_mul(1000) })
}

/// The identity a certificate carries: its `berth://<role>/<id>` URI SAN, or failing that its
/// `<role>/<id>` common name. This says nothing about whether the certificate is trustworthy:
/// call it on certificates the TLS layer has verified against the cluster CA.
pub fn identity_of_der(cert_der: &[u8]) -> Result<Identity, PkiError> {
    let cert = parse_cert(cert_der, "peer")?;
    let sans = cert.subject_alternative_name().map_err(|e| PkiError::Certificate {
        what: "peer",
        reason: format!("its subject alternative names do not parse ({e})"),
    })?;
    if let Some(sans) = sans {
        let mut found: Option<Identity> = None;
        for name in &sans.value.general_names {
            if let GeneralName::URI(uri) = name
                && uri.starts_with(crate::IDENTITY_URI_SCHEME)
            {
                let identity = Identity::from_uri(uri)?;
                match &found {
                    Some(previous) if *previous != identity => {
                        return Err(PkiError::InvalidIdentity {
                            value: uri.to_string(),
                            reason: format!("the certificate also claims to be {previous}"),
                        });
                    }
                    _ => found = Some(identity),
                }
            }
        }
        if let Some(identity) = found {
            return Ok(identity);
        }
    }
    let subject = cert.subject();
    if let Some(cn) = subject.iter_common_name().next().and_then(|cn| cn.as_str().ok())
        && let Ok(identity) = Identity::parse(cn)
    {
        return Ok(identity);
    }
    Err(PkiError::NoIdentity { subject: subject.to_string() })
}

/// The SANs of a leaf: the identity URI first, then DNS names, then IP addresses.
fn subject_alt_names(identity: &Identity, dns_names: &[String], ips: &[IpAddr]) -> Result<Vec<SanType>, PkiError> {
    let mut dns: Vec<String> = Vec::new();
    let mut addrs: Vec<IpAddr> = Vec::new();
    if identity.role == Role::Master {
        dns.push(MASTER_SERVER_NAME.to_string());
        dns.push("localhost".to_string());
        addrs.push(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    for name in dns_names {
        let normalized = name.trim_end_matches('.').to_ascii_lowercase();
        validate_dns_name(&normalized, name)?;
        if identity.role != Role::Master && normalized == MASTER_SERVER_NAME {
            return Err(PkiError::ReservedName { identity: identity.to_string(), name: name.clone() });
        }
        if !dns.contains(&normalized) {
            dns.push(normalized);
        }
    }
    for ip in ips {
        if !addrs.contains(ip) {
            addrs.push(*ip);
        }
    }
    let ia5 = |s: String| {
        Ia5String::try_from(s.clone()).map_err(|e| PkiError::InvalidDnsName { name: s, reason: e.to_string() })
    };
    let mut sans = vec![SanType::URI(ia5(identity.uri())?)];
    for name in dns {
        sans.push(SanType::DnsName(ia5(name)?));
    }
    sans.extend(addrs.into_iter().map(SanType::IpAddress));
    Ok(sans)
}

fn validate_dns_name(name: &str, original: &str) -> Result<(), PkiError> {
    let invalid = |reason: &str| PkiError::InvalidDnsName { name: original.to_string(), reason: reason.to_string() };
    if name.is_empty() {
        return Err(invalid("it is empty"));
    }
    if name.len() > 253 {
        return Err(invalid("it is longer than 253 characters"));
    }
    if name.parse::<IpAddr>().is_ok() {
        return Err(invalid("it is an IP address: pass it in `ips` instead"));
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(invalid("each dot-separated label must be 1 to 63 characters long"));
        }
        if !label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(invalid("labels may only contain ASCII letters, digits and '-'"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(invalid("labels may not start or end with '-'"));
        }
    }
    Ok(())
}

fn validate_cluster_name(name: &str) -> Result<(), PkiError> {
    let invalid = |reason: &str| PkiError::InvalidClusterName { name: name.to_string(), reason: reason.to_string() };
    if name.is_empty() {
        return Err(invalid("it is empty; pick a short name such as \"prod\""));
    }
    if name.len() > MAX_CLUSTER_NAME_LEN {
        return Err(invalid("it is longer than 48 characters"));
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
        return Err(invalid("it may only contain ASCII letters, digits, '.', '_' and '-'"));
    }
    Ok(())
}

/// A random positive 128-bit serial number.
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::rng().fill(&mut bytes);
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01; // keep the full length so the encoding never shrinks to nothing
    SerialNumber::from_slice(&bytes)
}

/// Whole seconds since the epoch as a certificate time.
fn to_asn1_time(t: SystemTime, validity: Duration) -> Result<time::OffsetDateTime, PkiError> {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    i64::try_from(secs).ok().and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok()).ok_or_else(|| {
        PkiError::InvalidValidity {
            validity,
            reason: "the resulting expiry cannot be written into a certificate".to_string(),
        }
    })
}

fn from_asn1_time(t: ASN1Time) -> SystemTime {
    let ts = t.timestamp();
    if ts >= 0 {
        UNIX_EPOCH + Duration::from_secs(ts.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(ts.unsigned_abs())
    }
}

fn validity_of(cert: &X509Certificate<'_>) -> (SystemTime, SystemTime) {
    let validity = cert.validity();
    (from_asn1_time(validity.not_before), from_asn1_time(validity.not_after))
}

pub(crate) fn parse_cert<'a>(der: &'a [u8], what: &'static str) -> Result<X509Certificate<'a>, PkiError> {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, cert)| cert)
        .map_err(|e| PkiError::Certificate { what, reason: format!("it is not a valid X.509 certificate ({e})") })
}

/// The first certificate in `pem`.
pub(crate) fn cert_der_from_pem(pem: &str, what: &'static str) -> Result<CertificateDer<'static>, PkiError> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| PkiError::Pem {
        what,
        expected: "CERTIFICATE",
        reason: e.to_string(),
    })
}

/// Every certificate in `pem`, at least one.
pub(crate) fn certs_from_pem(pem: &str, what: &'static str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::Pem { what, expected: "CERTIFICATE", reason: e.to_string() })?;
    if certs.is_empty() {
        return Err(PkiError::Pem { what, expected: "CERTIFICATE", reason: "it contains no certificate".to_string() });
    }
    Ok(certs)
}

pub(crate) fn pem_encode_cert(der: &[u8]) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn ca_generate_and_from_pem_round_trip() {
        let ca = CertificateAuthority::generate("test").unwrap();
        let loaded = CertificateAuthority::from_pem(ca.cert_pem(), ca.key_pem()).unwrap();
        assert_eq!(loaded.cert_pem(), ca.cert_pem());
        assert_eq!(loaded.key_pem(), ca.key_pem());
        assert_eq!(loaded.digest(), ca.digest());
        assert_eq!(CaDigest::of_cert_pem(ca.cert_pem()).unwrap(), ca.digest());
        assert_eq!(ca.digest().0.len(), 64);

        let der = cert_der_from_pem(ca.cert_pem(), "CA").unwrap();
        let cert = parse_cert(&der, "CA").unwrap();
        assert!(cert.is_ca());
        let (nb, na) = validity_of(&cert);
        let lifetime = na.duration_since(nb).unwrap();
        assert!(lifetime >= CA_VALIDITY && lifetime <= CA_VALIDITY + CLOCK_SKEW_ALLOWANCE + Duration::from_secs(2));
        let ku = cert.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign());
        assert_eq!(cert.subject().to_string(), "CN=berth CA test, O=berth, OU=test");

        // A certificate loaded back still issues certificates that chain to it.
        let leaf = loaded.issue(&Identity::master(1), &[], &[], HOUR).unwrap();
        let leaf_der = leaf.cert_der().unwrap();
        let leaf_cert = parse_cert(&leaf_der, "leaf").unwrap();
        assert_eq!(leaf_cert.issuer(), cert.subject());
        assert!(leaf_cert.verify_signature(Some(cert.public_key())).is_ok());
    }

    #[test]
    fn from_pem_rejects_a_mismatched_key() {
        let a = CertificateAuthority::generate("a").unwrap();
        let b = CertificateAuthority::generate("b").unwrap();
        let err = CertificateAuthority::from_pem(a.cert_pem(), b.key_pem()).unwrap_err();
        assert!(matches!(err, PkiError::KeyMismatch), "{err}");
    }

    #[test]
    fn from_pem_rejects_a_leaf_and_garbage() {
        let ca = CertificateAuthority::generate("a").unwrap();
        let leaf = ca.issue(&Identity::admin("x"), &[], &[], HOUR).unwrap();
        let err = CertificateAuthority::from_pem(&leaf.cert_pem, &leaf.key_pem).unwrap_err();
        assert!(matches!(err, PkiError::NotCa { .. }), "{err}");
        let err = CertificateAuthority::from_pem("not pem", ca.key_pem()).unwrap_err();
        assert!(matches!(err, PkiError::Pem { .. }), "{err}");
        let err = CertificateAuthority::from_pem(ca.cert_pem(), "not pem").unwrap_err();
        assert!(matches!(err, PkiError::Pem { .. }), "{err}");
    }

    #[test]
    fn invalid_cluster_names_are_rejected() {
        for name in ["", "has space", &"x".repeat(49)] {
            let err = CertificateAuthority::generate(name).unwrap_err();
            assert!(matches!(err, PkiError::InvalidClusterName { .. }), "{err}");
        }
    }

    #[test]
    fn master_cert_carries_identity_and_master_names() {
        let ca = CertificateAuthority::generate("test").unwrap();
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        let leaf = ca.issue(&Identity::master(1), &["m1.example.com".to_string()], &[ip], HOUR).unwrap();
        let der = leaf.cert_der().unwrap();
        assert_eq!(identity_of_der(&der).unwrap(), Identity::master(1));
        assert_eq!(leaf.identity().unwrap().master_id(), Some(1));

        let cert = parse_cert(&der, "leaf").unwrap();
        assert_eq!(cert.subject().to_string(), "CN=master/1, O=berth, OU=master");
        assert!(!cert.is_ca());
        let sans = cert.subject_alternative_name().unwrap().unwrap();
        let names: Vec<String> = sans
            .value
            .general_names
            .iter()
            .map(|n| match n {
                GeneralName::URI(u) => format!("uri:{u}"),
                GeneralName::DNSName(d) => format!("dns:{d}"),
                GeneralName::IPAddress(b) => match b.len() {
                    4 => format!("ip:{}", IpAddr::from(<[u8; 4]>::try_from(*b).unwrap())),
                    _ => format!("ip:{}", IpAddr::from(<[u8; 16]>::try_from(*b).unwrap())),
                },
                other => format!("other:{other}"),
            })
            .collect();
        assert_eq!(names.len(), 6, "{names:?}");
        for expected in [
            "uri:berth://master/1",
            "dns:master.berth.internal",
            "dns:localhost",
            "dns:m1.example.com",
            "ip:127.0.0.1",
            "ip:10.1.2.3",
        ] {
            assert!(names.iter().any(|n| n == expected), "{expected} missing from {names:?}");
        }
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
    }

    #[test]
    fn agent_and_admin_certs_are_client_only_and_cannot_claim_the_master_name() {
        let ca = CertificateAuthority::generate("test").unwrap();
        let agent = ca.issue(&Identity::agent("node-1"), &[], &[], HOUR).unwrap();
        let der = agent.cert_der().unwrap();
        assert_eq!(identity_of_der(&der).unwrap(), Identity::agent("node-1"));
        let cert = parse_cert(&der, "leaf").unwrap();
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        let sans = cert.subject_alternative_name().unwrap().unwrap();
        assert_eq!(sans.value.general_names.len(), 1);

        let err = ca.issue(&Identity::admin("bob"), &["MASTER.berth.internal.".to_string()], &[], HOUR).unwrap_err();
        assert!(matches!(err, PkiError::ReservedName { .. }), "{err}");
        let err = ca.issue(&Identity::agent("a b"), &[], &[], HOUR).unwrap_err();
        assert!(matches!(err, PkiError::InvalidIdentity { .. }), "{err}");
        let err = ca.issue(&Identity::agent("n"), &["bad name".to_string()], &[], HOUR).unwrap_err();
        assert!(matches!(err, PkiError::InvalidDnsName { .. }), "{err}");
        let err = ca.issue(&Identity::agent("n"), &[], &[], Duration::ZERO).unwrap_err();
        assert!(matches!(err, PkiError::InvalidValidity { .. }), "{err}");
    }

    #[test]
    fn leaf_never_outlives_the_ca() {
        let ca = CertificateAuthority::generate("test").unwrap();
        let leaf = ca.issue(&Identity::master(2), &[], &[], Duration::from_secs(50 * 365 * 24 * 3600)).unwrap();
        assert!(leaf.not_after().unwrap() <= ca.not_after());
    }

    #[test]
    fn validity_and_renew_at_window() {
        let ca = CertificateAuthority::generate("test").unwrap();
        let before = SystemTime::now();
        let leaf = ca.issue(&Identity::master(1), &[], &[], 24 * HOUR).unwrap();
        let (nb, na) = leaf.validity().unwrap();
        assert_eq!(leaf.not_before().unwrap(), nb);
        assert_eq!(leaf.not_after().unwrap(), na);
        assert!(nb <= before - CLOCK_SKEW_ALLOWANCE + Duration::from_secs(1));
        assert!(na >= before + 24 * HOUR - Duration::from_secs(1));
        assert!(na <= SystemTime::now() + 24 * HOUR);

        // The lifetime that counts starts at issue time (the back-dating is only for skew).
        let issued = nb + CLOCK_SKEW_ALLOWANCE;
        let span = na.duration_since(issued).unwrap();
        let low = issued + span.mul_f64(0.5);
        let high = issued + span.mul_f64(0.8);
        let mut samples = Vec::new();
        for _ in 0..500 {
            let at = leaf.renew_at().unwrap();
            assert!(at >= low && at <= high, "renew_at outside [50%, 80%] of the validity");
            samples.push(at);
        }
        let min = samples.iter().min().unwrap();
        let max = samples.iter().max().unwrap();
        // Jitter: the samples spread over most of the window, not a single instant.
        assert!(max.duration_since(*min).unwrap() > span.mul_f64(0.2));
    }

    #[test]
    fn short_lifetimes_are_not_due_at_once() {
        let ca = CertificateAuthority::generate("test").unwrap();
        let before = SystemTime::now();
        let leaf = ca.issue(&Identity::agent("n1"), &[], &[], Duration::from_secs(60)).unwrap();
        for _ in 0..100 {
            let at = leaf.renew_at().unwrap();
            assert!(at >= before + Duration::from_secs(29), "a 1-minute certificate due before 50% of it");
            assert!(at <= SystemTime::now() + Duration::from_secs(49));
        }
    }

    #[test]
    fn sign_csr_ignores_the_requested_subject() {
        let ca = CertificateAuthority::generate("test").unwrap();
        let (csr_pem, key_pem) = generate_csr("master/999").unwrap();
        let node = "0f5d7c1e-2b9a-4e57-8c31-7a6b5d4c3e2f";
        let cert_pem = ca.sign_csr(&csr_pem, &Identity::agent(node), HOUR).unwrap();
        let issued = CertifiedKey::new(cert_pem, key_pem);
        assert_eq!(issued.identity().unwrap(), Identity::agent(node));
        let der = issued.cert_der().unwrap();
        let cert = parse_cert(&der, "leaf").unwrap();
        assert_eq!(cert.subject().to_string(), format!("CN=agent/{node}, O=berth, OU=agent"));

        // The certificate certifies the CSR's key.
        let key = KeyPair::from_pem(&issued.key_pem).unwrap();
        assert_eq!(cert.public_key().raw, key.subject_public_key_info().as_slice());
    }

    #[test]
    fn sign_csr_rejects_garbage_and_tampered_requests() {
        let ca = CertificateAuthority::generate("test").unwrap();
        let err = ca.sign_csr("nope", &Identity::agent("n"), HOUR).unwrap_err();
        assert!(matches!(err, PkiError::Pem { .. }), "{err}");

        let (csr_pem, _) = generate_csr("agent/n").unwrap();
        let mut der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes()).unwrap().as_ref().to_vec();
        // Flip a bit inside the common name: the self-signature no longer verifies.
        let pos = der.windows(7).position(|w| w == b"agent/n").unwrap();
        der[pos] ^= 0x01;
        let tampered = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der));
        let err = ca.sign_csr(&tampered, &Identity::agent("n"), HOUR).unwrap_err();
        assert!(matches!(err, PkiError::InvalidCsr { .. }), "{err}");
    }

    #[test]
    fn identity_of_der_errors_without_identity() {
        let plain = rcgen::generate_simple_self_signed(vec!["example.com".to_string()]).unwrap();
        let err = identity_of_der(plain.cert.der()).unwrap_err();
        assert!(matches!(err, PkiError::NoIdentity { .. }), "{err}");
        assert!(err.to_string().contains("no berth identity"));
        let err = identity_of_der(b"junk").unwrap_err();
        assert!(matches!(err, PkiError::Certificate { .. }), "{err}");
    }

    #[test]
    fn identity_falls_back_to_the_common_name() {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "admin/carol");
        params.distinguished_name = dn;
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(identity_of_der(cert.der()).unwrap(), Identity::admin("carol"));
    }

    #[test]
    fn debug_does_not_print_keys() {
        let ca = CertificateAuthority::generate("test").unwrap();
        let leaf = ca.issue(&Identity::master(1), &[], &[], HOUR).unwrap();
        let key_body = |pem: &str| pem.lines().nth(1).unwrap().to_string();
        let ca_debug = format!("{ca:?}");
        assert!(!ca_debug.contains(&key_body(ca.key_pem())), "{ca_debug}");
        assert!(!ca_debug.contains("PRIVATE KEY"));
        let leaf_debug = format!("{leaf:?}");
        assert!(!leaf_debug.contains(&key_body(&leaf.key_pem)));
        assert!(!leaf_debug.contains("PRIVATE KEY"));
        assert!(leaf_debug.contains("master/1"));
    }

    #[test]
    fn digest_parse() {
        let ca = CertificateAuthority::generate("test").unwrap();
        let digest = ca.digest();
        assert_eq!(CaDigest::parse(&digest.0.to_uppercase()).unwrap(), digest);
        assert!(CaDigest::parse("abc").is_err());
        assert!(CaDigest::parse(&"g".repeat(64)).is_err());
        assert!(digest.matches_der(&cert_der_from_pem(ca.cert_pem(), "CA").unwrap()));
    }
}
