//! Application close codes of the master <-> agent connections, and how to read them back.
//!
//! Whoever closes a connection uses one of these codes with `Connection::close(code, reason)`;
//! the reason bytes carry UTF-8 text for the logs (for [`NOT_LEADER`], the leader's `host:port`).

use quinn::VarInt;

/// Finished normally (after a redirect, for instance).
pub const NO_ERROR: VarInt = VarInt::from_u32(0);
/// This master is not the leader. Reason: the leader's QUIC `host:port`, empty when unknown.
pub const NOT_LEADER: VarInt = VarInt::from_u32(1);
/// The peer sent a frame that is oversized, does not decode, or breaks the protocol.
pub const MALFORMED_FRAME: VarInt = VarInt::from_u32(2);
/// The closing side is shutting down.
pub const SHUTDOWN: VarInt = VarInt::from_u32(3);
/// The peer's certificate or identity is not acceptable for this connection.
pub const UNAUTHENTICATED: VarInt = VarInt::from_u32(4);
/// A newer session of the same node replaced this one.
pub const SUPERSEDED: VarInt = VarInt::from_u32(5);
/// The peer's leader term is older than one already seen (fencing).
pub const FENCED: VarInt = VarInt::from_u32(6);
/// The peer's version is outside the version-skew policy (`berth_api::version`). Reason: what to
/// upgrade.
pub const VERSION_SKEW: VarInt = VarInt::from_u32(7);

/// A short name for a close code, for logs.
pub fn code_name(code: VarInt) -> &'static str {
    match code.into_inner() {
        0 => "no error",
        1 => "not leader",
        2 => "malformed frame",
        3 => "shutdown",
        4 => "unauthenticated",
        5 => "superseded",
        6 => "fenced",
        7 => "version skew",
        _ => "unknown code",
    }
}

/// Why a connection ended, as the agent (or master) needs to act on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Closed {
    /// The peer closed with [`NOT_LEADER`]; `hint` is the leader's address when it knows one.
    NotLeader { hint: Option<String> },
    /// Anything else. `code` is the application close code when the peer closed the connection
    /// itself; `None` for transport-level endings (timeout, reset, handshake failure, local close).
    Other { code: Option<VarInt>, reason: String },
}

impl Closed {
    /// True when the peer closed the connection with this application code.
    pub fn is(&self, code: VarInt) -> bool {
        match self {
            Closed::NotLeader { .. } => code == NOT_LEADER,
            Closed::Other { code: c, .. } => *c == Some(code),
        }
    }
}

impl std::fmt::Display for Closed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Closed::NotLeader { hint: Some(h) } => write!(f, "not the leader (leader: {h})"),
            Closed::NotLeader { hint: None } => write!(f, "not the leader (leader unknown)"),
            Closed::Other { code: Some(code), reason } if reason.is_empty() => {
                write!(f, "closed by peer: {}", code_name(*code))
            }
            Closed::Other { code: Some(code), reason } => write!(f, "closed by peer: {}: {reason}", code_name(*code)),
            Closed::Other { code: None, reason } => f.write_str(reason),
        }
    }
}

/// Reads a connection error back into a [`Closed`].
pub fn classify(err: &quinn::ConnectionError) -> Closed {
    match err {
        quinn::ConnectionError::ApplicationClosed(close) => {
            let reason = String::from_utf8_lossy(&close.reason).trim().to_string();
            if close.error_code == NOT_LEADER {
                Closed::NotLeader { hint: (!reason.is_empty()).then_some(reason) }
            } else {
                Closed::Other { code: Some(close.error_code), reason }
            }
        }
        other => Closed::Other { code: None, reason: other.to_string() },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app_close(code: VarInt, reason: &str) -> quinn::ConnectionError {
        quinn::ConnectionError::ApplicationClosed(quinn::ApplicationClose {
            error_code: code,
            reason: bytes::Bytes::copy_from_slice(reason.as_bytes()),
        })
    }

    #[test]
    fn not_leader_carries_the_hint() {
        assert_eq!(
            classify(&app_close(NOT_LEADER, "10.0.0.2:7000")),
            Closed::NotLeader { hint: Some("10.0.0.2:7000".into()) }
        );
        assert_eq!(classify(&app_close(NOT_LEADER, "")), Closed::NotLeader { hint: None });
    }

    #[test]
    fn other_codes_and_transport_errors() {
        let c = classify(&app_close(SUPERSEDED, "newer session"));
        assert!(c.is(SUPERSEDED));
        assert_eq!(c.to_string(), "closed by peer: superseded: newer session");
        let t = classify(&quinn::ConnectionError::TimedOut);
        assert_eq!(t, Closed::Other { code: None, reason: "timed out".into() });
        assert!(!t.is(SHUTDOWN));
    }
}
