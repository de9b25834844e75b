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

/// What a connection the server has not authenticated yet may make it hold: one bidirectional
/// stream, and this many bytes received and not yet read (a join's first frame is at most
/// [`crate::PRE_AUTH_FRAME`]). quinn's defaults (100 streams of 1.25 MB each, no connection-wide
/// bound) let one unauthenticated peer make a master buffer 125 MB.
pub const PRE_AUTH_WINDOW: u32 = 128 * 1024;
/// The receive window of an authenticated connection (see [`authenticated`]): more than one
/// frame of [`crate::MAX_FRAME`] in flight.
pub const SESSION_WINDOW: u32 = 16 << 20;
/// Bidirectional streams an authenticated peer may have open at once (its session and the
/// image blobs it fetches).
pub const SESSION_STREAMS: u32 = 32;
/// Connections waiting in the endpoint for the server to accept them, and the bytes their
/// first packets may hold in total.
pub const MAX_INCOMING: usize = 1024;
pub const INCOMING_BUFFER_TOTAL: u64 = 16 << 20;

/// A QUIC server configuration from a rustls one (which must carry [`crate::ALPN`]). Its
/// connections start with the pre-authentication bounds ([`PRE_AUTH_WINDOW`], one stream);
/// the server lifts them with [`authenticated`] once it knows the peer.
pub fn server_config(tls: rustls::ServerConfig) -> Result<quinn::ServerConfig, EndpointError> {
    let crypto =
        quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| EndpointError::Tls(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut t = transport_config();
    t.max_concurrent_bidi_streams(1u8.into());
    t.receive_window(PRE_AUTH_WINDOW.into());
    t.stream_receive_window(PRE_AUTH_WINDOW.into());
    t.datagram_receive_buffer_size(None);
    cfg.transport_config(Arc::new(t));
    cfg.max_incoming(MAX_INCOMING);
    cfg.incoming_buffer_size_total(INCOMING_BUFFER_TOTAL);
    Ok(cfg)
}

/// Lifts a server connection's pre-authentication bounds: its peer is known now.
pub fn authenticated(conn: &quinn::Connection) {
    conn.set_receive_window(SESSION_WINDOW.into());
    conn.set_max_concurrent_bi_streams(SESSION_STREAMS.into());
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
