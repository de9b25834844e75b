use std::time::Duration;

/// Everything that can go wrong in berth's PKI. Messages say what is wrong and what to do about
/// it; none of them ever contains a private key or a token secret.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A PEM input could not be decoded.
    #[error("invalid {what}: {reason}; expected PEM with a \"-----BEGIN {expected}-----\" block")]
    Pem { what: &'static str, expected: &'static str, reason: String },

    /// A certificate could not be parsed or lacks something berth needs.
    #[error("cannot use the {what} certificate: {reason}")]
    Certificate { what: &'static str, reason: String },

    /// `CertificateAuthority::from_pem` was given a key that does not belong to the certificate.
    #[error(
        "the CA private key does not match the CA certificate's public key: load the key that was generated \
         together with this certificate"
    )]
    KeyMismatch,

    /// A certificate that should be the cluster CA is not a CA certificate.
    #[error(
        "the certificate {subject:?} is not a CA certificate (no basicConstraints CA:true): supply the cluster \
         CA certificate, not a leaf certificate"
    )]
    NotCa { subject: String },

    /// A certificate carries no berth identity.
    #[error(
        "the certificate {subject:?} carries no berth identity (no berth://<role>/<id> URI SAN and no \
         <role>/<id> common name): it was not issued by a berth cluster CA"
    )]
    NoIdentity { subject: String },

    /// An identity (role/id) is malformed.
    #[error("invalid identity {value:?}: {reason}")]
    InvalidIdentity { value: String, reason: String },

    /// A cluster name is unusable in a CA certificate.
    #[error("invalid cluster name {name:?}: {reason}")]
    InvalidClusterName { name: String, reason: String },

    /// A DNS name requested as a subject alternative name is unusable.
    #[error("invalid DNS name {name:?} for a certificate: {reason}")]
    InvalidDnsName { name: String, reason: String },

    /// A non-master identity asked for a name only masters may carry.
    #[error(
        "{identity} may not carry the name {name:?}: it is reserved for masters (clients trust any certificate \
         with it as a master); leave it out"
    )]
    ReservedName { identity: String, name: String },

    /// A requested certificate lifetime is unusable.
    #[error("invalid certificate validity {validity:?}: {reason}")]
    InvalidValidity { validity: Duration, reason: String },

    /// A certificate signing request is malformed or not self-consistent.
    #[error("invalid certificate signing request: {reason}; create a new one with berth_pki::generate_csr")]
    InvalidCsr { reason: String },

    /// Key generation or signing failed inside the crypto library.
    #[error("could not {action}: {reason}")]
    Crypto { action: &'static str, reason: String },

    /// rustls refused to build a configuration.
    #[error("cannot build the TLS {side} configuration: {source}")]
    Tls {
        side: &'static str,
        #[source]
        source: rustls::Error,
    },

    /// rustls refused to build a certificate verifier.
    #[error("cannot build the TLS certificate verifier from the CA certificate: {reason}")]
    Verifier { reason: String },

    /// A pinned handshake found no certificate with the pinned digest in the server's chain.
    #[error(
        "the server did not present the CA certificate pinned by the join token (sha256 {digest}): it belongs \
         to another cluster, the token is stale, or someone is intercepting the connection"
    )]
    PinnedCaNotPresented { digest: String },

    /// The peer's certificate verified but does not belong to a master.
    #[error("the server certificate belongs to {found}, not to a master: refusing to talk to it as a master")]
    NotAMaster { found: String },

    /// A string that should be a CA digest is not 64 hex characters.
    #[error("invalid CA digest: {reason}; expected the 64 hex characters of a SHA-256")]
    InvalidDigest { reason: String },

    /// A join token does not start with `BERTH-`.
    #[error(
        "not a berth join token: it must start with \"BERTH-\" (format BERTH-1-<ca digest>-<id>.<secret>); copy \
         the whole token a master printed"
    )]
    TokenPrefix,

    /// A join token has a version this build does not understand.
    #[error(
        "unsupported join token version {found}: this build understands only BERTH-1-... tokens; create a new \
         token on a master running this berth version"
    )]
    TokenVersion { found: String },

    /// The CA digest part of a join token is malformed.
    #[error("join token has a bad CA digest: {reason}; copy the whole token a master printed")]
    TokenDigest { reason: String },

    /// The id part of a join token is malformed.
    #[error("join token has a bad id: {reason}; copy the whole token a master printed")]
    TokenId { reason: String },

    /// The secret part of a join token is malformed (the secret itself is never shown).
    #[error("join token has a bad secret: {reason}; copy the whole token a master printed")]
    TokenSecret { reason: String },

    /// A web console token is malformed (the secret itself is never shown).
    #[error(
        "not a berth console token: {reason}; a console token looks like BERTHC-1-<id>.<secret>, as `berth \
         console token create` printed it"
    )]
    ConsoleToken { reason: String },
}

impl PkiError {
    pub(crate) fn crypto(action: &'static str, err: impl std::fmt::Display) -> Self {
        PkiError::Crypto { action, reason: err.to_string() }
    }
}
