//! berth PKI: the cluster certificate authority, the certificates it issues, bootstrap (join)
//! tokens, and the rustls configurations that every berth connection uses:
//!
//! * gRPC between clients and masters and between masters: mutual TLS, both sides holding a
//!   certificate issued by the cluster CA ([`tls::server_config`], [`tls::client_config`]);
//! * QUIC between agents and masters: mutual TLS as well, plus the *join* connection, where a new
//!   agent has no certificate yet and pins the CA by the digest carried in its join token
//!   ([`tls::server_config_client_auth_optional`], [`tls::pinned_client_config`]).
//!
//! Identities are encoded in every certificate the CA issues (see [`Identity`]): the subject CN is
//! `<role>/<id>`, O is `berth`, OU is the role, and a URI SAN `berth://<role>/<id>` carries the same
//! identity for [`identity_of_der`]. Every master certificate also carries the DNS name
//! [`MASTER_SERVER_NAME`], and clients verify masters against that name rather than against the
//! address they dialled.
//!
//! Only TLS 1.3 and only the `ring` crypto provider are used.
//!
//! This crate must stay a leaf of the dependency graph: it must not depend on tonic, quinn,
//! RocksDB or the master. Those build on the plain `rustls` configurations returned here.

mod ca;
mod error;
mod identity;
pub mod tls;
pub mod token;

pub use ca::{
    CA_VALIDITY, CLOCK_SKEW_ALLOWANCE, CaDigest, CertInfo, CertificateAuthority, CertifiedKey, bundle_cert_digests,
    bundle_certs, bundle_digest, cert_info_of_der, generate_csr, identity_of_der, normalize_serial,
};
pub use error::PkiError;
pub use identity::{Identity, Role};
pub use token::{ConsoleToken, JoinToken};

/// The same `rustls` and `rustls-pki-types` this crate builds its configurations with.
pub use rustls;
pub use rustls_pki_types;

/// DNS subject alternative name on every master certificate; clients verify masters against it.
pub const MASTER_SERVER_NAME: &str = "master.berth.internal";

/// Organisation (O) of every certificate the cluster CA issues.
pub const ORGANIZATION: &str = "berth";

/// URI scheme of the identity SAN: `berth://<role>/<id>`.
pub const IDENTITY_URI_SCHEME: &str = "berth://";
