//! QUIC endpoints and configurations shared by masters and agents.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// How long a silent connection lives: with keep-alives every [`KEEP_ALIVE`], a peer that has
/// vanished is noticed after this long.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Keep-alive period, on both sides.
pub const KEEP_ALIVE: Duration = Duration::from_secs(2);

/// Why an endpoint or configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("cannot bind the QUIC endpoint on udp/{addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("the TLS configuration cannot be used for QUIC: {0}")]
    Tls(String),
}

/// The transport settings of every master <-> agent connection: keep-alive 2 s, idle timeout 10 s.
pub fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(KEEP_ALIVE));
    t.max_idle_timeout(Some(quinn::IdleTimeout::try_from(IDLE_TIMEOUT).expect("10 s fits in a QUIC idle timeout")));
    // Neither side uses unidirectional streams.
    t.max_concurrent_uni_streams(0u8.into());
    t
}

/// A QUIC server configuration from a rustls one (which must carry [`crate::ALPN`]).
pub fn server_config(tls: rustls::ServerConfig) -> Result<quinn::ServerConfig, EndpointError> {
    let crypto =
        quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| EndpointError::Tls(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(Arc::new(transport_config()));
    Ok(cfg)
}

/// A QUIC client configuration from a rustls one (which must carry [`crate::ALPN`]).
pub fn client_config(tls: rustls::ClientConfig) -> Result<quinn::ClientConfig, EndpointError> {
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| EndpointError::Tls(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(Arc::new(transport_config()));
    Ok(cfg)
}

/// A server endpoint on `addr` (UDP). Must be called inside a Tokio runtime.
pub fn server_endpoint(addr: SocketAddr, tls: rustls::ServerConfig) -> Result<quinn::Endpoint, EndpointError> {
    let cfg = server_config(tls)?;
    quinn::Endpoint::server(cfg, addr).map_err(|source| EndpointError::Bind { addr, source })
}

/// A client-only endpoint bound to `bind` (usually `0.0.0.0:0` or `[::]:0`). It has no default
/// client configuration: connect with `endpoint.connect_with(client_config(..)?, addr,
/// berth_pki::MASTER_SERVER_NAME)`. One endpoint (one UDP socket) carries many connections.
pub fn client_endpoint(bind: SocketAddr) -> Result<quinn::Endpoint, EndpointError> {
    quinn::Endpoint::client(bind).map_err(|source| EndpointError::Bind { addr: bind, source })
}
