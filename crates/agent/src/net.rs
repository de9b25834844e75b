//! Client endpoints shared by the agents of one process, and address resolution.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use berth_channel::close;

use crate::AgentError;

/// How long a QUIC handshake may take before the agent tries elsewhere.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Lazily created client endpoints (one UDP socket per address family), shared by every agent
/// that uses this pool; each agent still has its own connection.
#[derive(Clone, Default)]
pub struct Endpoints {
    inner: Arc<Mutex<Families>>,
}

#[derive(Default)]
struct Families {
    v4: Option<quinn::Endpoint>,
    v6: Option<quinn::Endpoint>,
}

impl Endpoints {
    pub fn new() -> Self {
        Self::default()
    }

    /// The endpoint to reach `target` from.
    pub fn for_target(&self, target: SocketAddr) -> Result<quinn::Endpoint, AgentError> {
        let mut f = self.inner.lock().expect("endpoint pool lock");
        let (slot, bind) = if target.is_ipv4() {
            (&mut f.v4, SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))
        } else {
            (&mut f.v6, SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)))
        };
        if let Some(e) = slot {
            return Ok(e.clone());
        }
        let e = berth_channel::client_endpoint(bind)?;
        *slot = Some(e.clone());
        Ok(e)
    }

    /// Closes every connection with SHUTDOWN and waits (briefly) until the close frames are out.
    pub async fn shutdown(&self) {
        let endpoints: Vec<quinn::Endpoint> = {
            let f = self.inner.lock().expect("endpoint pool lock");
            f.v4.iter().chain(f.v6.iter()).cloned().collect()
        };
        for e in &endpoints {
            e.close(close::SHUTDOWN, b"agent shutting down");
        }
        for e in &endpoints {
            let _ = tokio::time::timeout(Duration::from_secs(1), e.wait_idle()).await;
        }
    }
}

/// Resolves `host:port` to one socket address (the first the resolver returns).
pub async fn resolve(addr: &str) -> Result<SocketAddr, String> {
    if let Ok(sa) = addr.parse::<SocketAddr>() {
        return Ok(sa);
    }
    match tokio::time::timeout(Duration::from_secs(5), tokio::net::lookup_host(addr)).await {
        Ok(Ok(mut addrs)) => addrs.next().ok_or_else(|| format!("{addr} resolves to no address")),
        Ok(Err(e)) => Err(format!("cannot resolve {addr}: {e}")),
        Err(_) => Err(format!("resolving {addr} timed out")),
    }
}

/// Connects to `addr` with `config`, verifying the master as [`berth_pki::MASTER_SERVER_NAME`].
pub async fn connect(
    endpoints: &Endpoints,
    config: &quinn::ClientConfig,
    addr: &str,
) -> Result<quinn::Connection, ConnectFailure> {
    let target = resolve(addr).await.map_err(ConnectFailure::Other)?;
    let endpoint = endpoints.for_target(target).map_err(|e| ConnectFailure::Other(e.to_string()))?;
    let connecting = endpoint
        .connect_with(config.clone(), target, berth_pki::MASTER_SERVER_NAME)
        .map_err(|e| ConnectFailure::Other(format!("cannot connect to {addr}: {e}")))?;
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(ConnectFailure::Handshake(e)),
        Err(_) => Err(ConnectFailure::Other(format!("no answer from {addr} within {CONNECT_TIMEOUT:?}"))),
    }
}

/// Why [`connect`] failed.
#[derive(Debug)]
pub enum ConnectFailure {
    /// The QUIC/TLS handshake failed.
    Handshake(quinn::ConnectionError),
    /// Resolution, binding, or no answer at all.
    Other(String),
}

impl ConnectFailure {
    /// True when the handshake failed because this side's TLS verification rejected the server's
    /// certificate chain (a locally raised TLS certificate alert).
    pub fn is_local_certificate_rejection(&self) -> bool {
        let ConnectFailure::Handshake(quinn::ConnectionError::TransportError(te)) = self else {
            return false;
        };
        let code = u64::from(te.code);
        // TLS alerts map to QUIC CRYPTO_ERROR 0x100 + alert. The certificate alerts:
        // bad_certificate (42), unsupported_certificate (43), certificate_revoked (44),
        // certificate_expired (45), certificate_unknown (46), unknown_ca (48).
        matches!(code.checked_sub(0x100), Some(42..=46 | 48))
    }
}

impl std::fmt::Display for ConnectFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectFailure::Handshake(e) => write!(f, "handshake failed: {e}"),
            ConnectFailure::Other(s) => f.write_str(s),
        }
    }
}
