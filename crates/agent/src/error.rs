//! The agent's errors. Messages say what went wrong and what to do; none contains the token
//! secret or a private key.

use std::path::PathBuf;

/// Why the agent could not start or keep running.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// First start without a token.
    #[error("no state in {}: pass --token to join", dir.display())]
    NoState { dir: PathBuf },

    /// No master address to join through.
    #[error("no master address to join: pass --join HOST:PORT")]
    NoMasters,

    /// The token does not parse.
    #[error("the join token is malformed: {0}")]
    BadToken(String),

    /// The master's certificate chain does not contain the CA pinned by the token.
    #[error(
        "the master's CA does not match the digest in the token: wrong cluster or tampered token (master {addr}: {detail})"
    )]
    CaMismatch { addr: String, detail: String },

    /// The master's certificate chain contains the pinned CA but was rejected for another reason
    /// (expired, not a master certificate, leaf not signed by the CA...).
    #[error("the master at {addr} presented a certificate this agent cannot accept: {detail}")]
    MasterCertRejected { addr: String, detail: String },

    /// JOIN_ERROR_TOKEN_INVALID.
    #[error(
        "join refused: the token is not valid (unknown token or wrong secret); check it or create a new one with `berth token create`: {message}"
    )]
    TokenInvalid { message: String },

    /// JOIN_ERROR_TOKEN_EXPIRED.
    #[error("join refused: the token has expired; create a new one with `berth token create`: {message}")]
    TokenExpired { message: String },

    /// JOIN_ERROR_TOKEN_REVOKED.
    #[error("join refused: the token was revoked; create a new one with `berth token create`: {message}")]
    TokenRevoked { message: String },

    /// JOIN_ERROR_TOKEN_USED_UP.
    #[error(
        "join refused: the token has been used as many times as it allows; create a new one with `berth token create`: {message}"
    )]
    TokenUsedUp { message: String },

    /// JOIN_ERROR_NAME_TAKEN.
    #[error("join refused: another node is already named {name:?}; pass a different --name: {message}")]
    NameTaken { name: String, message: String },

    /// JOIN_ERROR_BAD_REQUEST.
    #[error("join refused: the master found the request malformed: {message}")]
    BadRequest { message: String },

    /// A rejection this agent does not know (or UNSPECIFIED).
    #[error("join refused ({code}): {message}")]
    Rejected { code: String, message: String },

    /// No master accepted the join in time (unreachable, unavailable, or no leader).
    #[error("could not join through {addrs:?}: {last}")]
    JoinUnavailable { addrs: Vec<String>, last: String },

    /// The master answered the join with something that breaks the protocol.
    #[error("the master at {addr} broke the join protocol: {detail}")]
    JoinProtocol { addr: String, detail: String },

    /// A master closed the session with UNAUTHENTICATED (the node was removed, for instance).
    #[error(
        "the masters refused this node: {reason}; to join again, move {} away and start the agent with a new --token",
        dir.display()
    )]
    Refused { dir: PathBuf, reason: String },

    /// The state file was written by a newer agent.
    #[error(
        "{} has format {found}, newer than this agent understands ({supported}): upgrade berth, or move the directory away to join again",
        path.display()
    )]
    NewerFormat { path: PathBuf, found: u64, supported: u64 },

    /// The state file cannot be parsed.
    #[error("{} is corrupt: {reason}; move it away (and the certificates next to it) to join again", path.display())]
    CorruptState { path: PathBuf, reason: String },

    /// A file of the agent's state cannot be read or written.
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The node certificate, key or CA cannot be used.
    #[error("{0}")]
    Pki(#[from] berth_pki::PkiError),

    /// A QUIC endpoint or configuration cannot be built.
    #[error("{0}")]
    Endpoint(#[from] berth_channel::EndpointError),

    /// An `--allow-host-path` that is not absolute.
    #[error("{0}")]
    BadHostPath(String),

    /// A flag that cannot be used as given.
    #[error("{0}")]
    Config(String),

    /// Some simulated agents failed (the others ran until shutdown).
    #[error("{failed} of {total} simulated agents failed; first error: {first}")]
    Simulation { failed: usize, total: usize, first: Box<AgentError> },
}

impl AgentError {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        AgentError::Io { action, path: path.into(), source }
    }
}
