//! The QUIC channel between masters and agents: the pieces both sides share.
//!
//! - [`FrameWriter`] / [`FrameReader`]: length-delimited protobuf frames (4-byte big-endian
//!   length, then one message; at most [`MAX_FRAME`] bytes).
//! - [`server_endpoint`], [`client_endpoint`], [`client_config`], [`transport_config`]: QUIC
//!   endpoints with the cluster's transport settings (keep-alive 2 s, idle timeout 10 s) and ALPN
//!   [`ALPN`]; a server's connections start with pre-authentication bounds (one stream,
//!   [`PRE_AUTH_WINDOW`] bytes buffered), lifted by [`authenticated`].
//! - [`close`]: the application close codes and [`close::classify`].
//! - [`peer_identity`]: who is at the other end of an mTLS connection.
//! - [`Backoff`]: jittered exponential backoff for reconnecting.
//!
//! The messages themselves are in `berth_api::pb::agent`. This crate knows nothing about the
//! master, its store or the agent's runtime: it depends on `berth-pki` and the QUIC/TLS stack only.

mod backoff;
pub mod close;
mod endpoint;
mod frame;

pub use backoff::Backoff;
pub use endpoint::{
    EndpointError, IDLE_TIMEOUT, INCOMING_BUFFER_TOTAL, KEEP_ALIVE, MAX_INCOMING, PRE_AUTH_WINDOW, SESSION_STREAMS,
    SESSION_WINDOW, authenticated, client_config, client_endpoint, server_config, server_endpoint, transport_config,
};
pub use frame::{FrameError, FrameReader, FrameWriter, GROW_STEP};

/// The ALPN protocol of master <-> agent connections.
pub const ALPN: &[u8] = b"berth-agent/1";

/// The largest frame (the encoded message, without its 4-byte length) either side accepts.
pub const MAX_FRAME: usize = 4 << 20;

/// The largest first frame a server reads from a peer that presented no certificate (a join
/// request: a name, labels, resources and a CSR).
pub const PRE_AUTH_FRAME: usize = 64 * 1024;

/// The identity in the peer's certificate (the first certificate it presented), if it presented
/// one that carries a berth identity.
pub fn peer_identity(conn: &quinn::Connection) -> Option<berth_pki::Identity> {
    berth_pki::identity_of_der(&peer_certificate(conn)?).ok()
}

/// The peer's certificate (DER), if it presented one.
pub fn peer_certificate(conn: &quinn::Connection) -> Option<Vec<u8>> {
    let any = conn.peer_identity()?;
    let chain = any.downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>().ok()?;
    Some(chain.first()?.as_ref().to_vec())
}
