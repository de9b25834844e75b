//! First start: join the cluster with a token and keep the node certificate.

use std::collections::VecDeque;
use std::time::Duration;

use berth_api::pb::agent::{
    AgentFrame, JoinAccepted, JoinError, JoinRejected, JoinRequest, MasterFrame, Resources, agent_frame, master_frame,
};
use berth_channel::{Backoff, FrameReader, FrameWriter, close};
use berth_pki::{CaDigest, Identity, JoinToken};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::net::{self, ConnectFailure, Endpoints};
use crate::state::{self, AgentState};
use crate::{AgentError, Spec};

/// How long to wait for the master's answer to a join request (it signs a certificate and commits
/// the node through Raft).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(20);
/// How many leader hints to follow in a row before counting a round as failed.
const MAX_HOPS: usize = 8;

/// What one join attempt produced.
enum Attempt {
    Accepted(JoinAccepted),
    Rejected(JoinRejected),
    /// A fatal error: do not try other masters.
    Fatal(AgentError),
    /// Try another master (or again later).
    Retry(String),
}

/// Joins through `spec.join` with `token`, then writes the certificate files and the state file
/// into `spec.dir` (nothing is written unless the join succeeded). `Ok(None)` on shutdown.
pub(crate) async fn join(
    spec: &Spec,
    token: &str,
    resources: &Resources,
    endpoints: &Endpoints,
    gate: Option<&tokio::sync::Semaphore>,
    patience: Duration,
    shutdown: &CancellationToken,
) -> Result<Option<AgentState>, AgentError> {
    let parsed = JoinToken::parse(token).map_err(|e| AgentError::BadToken(e.to_string()))?;
    if spec.join.is_empty() {
        return Err(AgentError::NoMasters);
    }
    let tls = berth_pki::tls::pinned_client_config(&parsed.ca_digest, &[berth_channel::ALPN])?;
    let config = berth_channel::client_config(tls)?;
    let (csr_pem, key_pem) = berth_pki::generate_csr(&spec.name)?;
    let request = AgentFrame {
        body: Some(agent_frame::Body::Join(JoinRequest {
            token: token.trim().to_string(),
            csr_pem,
            name: spec.name.clone(),
            labels: spec.labels.clone().into_iter().collect(),
            resources: Some(*resources),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            advertise_addr: spec.advertise_addr.map(|a| a.to_string()).unwrap_or_default(),
        })),
    };

    let deadline = tokio::time::Instant::now() + patience;
    let mut backoff = Backoff::default();
    let mut last = String::from("no master answered");
    loop {
        // One round: every configured address, following leader hints in between.
        let mut queue: VecDeque<String> = spec.join.iter().cloned().collect();
        let mut hops = 0;
        while let Some(addr) = queue.pop_front() {
            let permit = match gate {
                Some(g) => Some(g.acquire().await.expect("the join gate is never closed")),
                None => None,
            };
            let attempt = tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                a = attempt(&addr, &config, &request, endpoints) => a,
            };
            drop(permit);
            match attempt {
                Attempt::Accepted(accepted) => {
                    let state = keep(spec, &addr, &parsed.ca_digest, accepted, key_pem).await?;
                    return Ok(Some(state));
                }
                Attempt::Rejected(r) => match JoinError::try_from(r.error) {
                    Ok(JoinError::NotLeader) => {
                        let hint = r.leader_hint.trim();
                        if !hint.is_empty() && hops < MAX_HOPS {
                            debug!(master = %addr, leader = %hint, "not the leader; following the hint");
                            hops += 1;
                            queue.push_front(hint.to_string());
                        }
                        last = format!("{addr} is not the leader and knows none: {}", r.message);
                    }
                    Ok(JoinError::Unavailable) => {
                        info!(master = %addr, "join unavailable for now: {}", r.message);
                        last = format!("{addr}: {}", r.message);
                    }
                    _ => return Err(refusal(r, &spec.name)),
                },
                Attempt::Fatal(e) => return Err(e),
                Attempt::Retry(reason) => {
                    warn!(master = %addr, "join attempt failed: {reason}");
                    last = reason;
                }
            }
        }
        let pause = backoff.next();
        if tokio::time::Instant::now() + pause > deadline {
            return Err(AgentError::JoinUnavailable { addrs: spec.join.clone(), last });
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// One join exchange with one master.
async fn attempt(addr: &str, config: &quinn::ClientConfig, request: &AgentFrame, endpoints: &Endpoints) -> Attempt {
    let conn = match net::connect(endpoints, config, addr).await {
        Ok(c) => c,
        Err(f @ ConnectFailure::Handshake(_)) if f.is_local_certificate_rejection() => {
            let detail = f.to_string();
            return Attempt::Fatal(if detail.to_ascii_lowercase().contains("pinned") {
                AgentError::CaMismatch { addr: addr.to_string(), detail }
            } else {
                AgentError::MasterCertRejected { addr: addr.to_string(), detail }
            });
        }
        Err(f) => return Attempt::Retry(format!("{addr}: {f}")),
    };
    let result = exchange(&conn, request).await;
    let outcome = match result {
        Ok(Some(MasterFrame { body: Some(master_frame::Body::JoinAccepted(a)) })) => Attempt::Accepted(a),
        Ok(Some(MasterFrame { body: Some(master_frame::Body::JoinRejected(r)) })) => Attempt::Rejected(r),
        Ok(Some(other)) => Attempt::Fatal(AgentError::JoinProtocol {
            addr: addr.to_string(),
            detail: format!("expected JoinAccepted or JoinRejected, got {:?}", other.body.map(|b| body_name(&b))),
        }),
        Ok(None) => Attempt::Retry(format!("{addr} ended the join stream without an answer")),
        Err(Exchange::Closed(close::Closed::NotLeader { hint })) => Attempt::Rejected(JoinRejected {
            error: JoinError::NotLeader as i32,
            message: "connection closed: not the leader".to_string(),
            leader_hint: hint.unwrap_or_default(),
        }),
        Err(Exchange::Closed(c)) => Attempt::Retry(format!("{addr}: {c}")),
        Err(Exchange::Frame(e)) if e.is_protocol_violation() => {
            conn.close(close::MALFORMED_FRAME, e.to_string().as_bytes());
            Attempt::Fatal(AgentError::JoinProtocol { addr: addr.to_string(), detail: e.to_string() })
        }
        Err(Exchange::Frame(e)) => Attempt::Retry(format!("{addr}: {e}")),
        Err(Exchange::Timeout) => Attempt::Retry(format!("{addr} did not answer the join within {ANSWER_TIMEOUT:?}")),
    };
    conn.close(close::NO_ERROR, b"join done");
    outcome
}

enum Exchange {
    Closed(close::Closed),
    Frame(berth_channel::FrameError),
    Timeout,
}

async fn exchange(conn: &quinn::Connection, request: &AgentFrame) -> Result<Option<MasterFrame>, Exchange> {
    let frame_err = |e: berth_channel::FrameError| match e.connection_error() {
        Some(c) => Exchange::Closed(close::classify(c)),
        None => Exchange::Frame(e),
    };
    let io = async {
        let (send, recv) = conn.open_bi().await.map_err(|e| Exchange::Closed(close::classify(&e)))?;
        let mut writer = FrameWriter::new(send);
        writer.send(request).await.map_err(frame_err)?;
        let mut reader = FrameReader::new(recv);
        reader.recv::<MasterFrame>().await.map_err(frame_err)
    };
    tokio::time::timeout(ANSWER_TIMEOUT, io).await.map_err(|_| Exchange::Timeout)?
}

pub(crate) fn body_name(body: &master_frame::Body) -> &'static str {
    match body {
        master_frame::Body::JoinAccepted(_) => "JoinAccepted",
        master_frame::Body::JoinRejected(_) => "JoinRejected",
        master_frame::Body::Redirect(_) => "Redirect",
        master_frame::Body::Accepted(_) => "Accepted",
        master_frame::Body::Assignments(_) => "Assignments",
        master_frame::Body::HeartbeatAck(_) => "HeartbeatAck",
        master_frame::Body::Renewed(_) => "CertificateRenewed",
        master_frame::Body::Logs(_) => "LogsQuery",
        master_frame::Body::NetworkUpdate(_) => "NetworkUpdate",
        master_frame::Body::BlobChunk(_) => "BlobChunk",
        master_frame::Body::EdgeUpdate(_) => "EdgeUpdate",
    }
}

/// The error for a final rejection.
fn refusal(r: JoinRejected, name: &str) -> AgentError {
    let message = r.message;
    match JoinError::try_from(r.error) {
        Ok(JoinError::TokenInvalid) => AgentError::TokenInvalid { message },
        Ok(JoinError::TokenExpired) => AgentError::TokenExpired { message },
        Ok(JoinError::TokenRevoked) => AgentError::TokenRevoked { message },
        Ok(JoinError::TokenUsedUp) => AgentError::TokenUsedUp { message },
        Ok(JoinError::NameTaken) => AgentError::NameTaken { name: name.to_string(), message },
        Ok(JoinError::BadRequest) => AgentError::BadRequest { message },
        Ok(other) => AgentError::Rejected { code: other.as_str_name().to_string(), message },
        Err(_) => AgentError::Rejected { code: format!("unknown code {}", r.error), message },
    }
}

/// Checks the master's answer and writes ca.crt, node.crt, node.key and agent.json.
async fn keep(
    spec: &Spec,
    addr: &str,
    digest: &CaDigest,
    accepted: JoinAccepted,
    key_pem: String,
) -> Result<AgentState, AgentError> {
    let protocol = |detail: String| AgentError::JoinProtocol { addr: addr.to_string(), detail };
    if accepted.node_id.is_empty() {
        return Err(protocol("JoinAccepted has an empty node_id".to_string()));
    }
    // One CA, or two while a CA rotation runs: the pinned one must be among them (the rest came
    // over the connection that CA authenticated).
    let cas = berth_pki::bundle_cert_digests(&accepted.ca_pem)
        .map_err(|e| protocol(format!("JoinAccepted carries an unusable CA certificate: {e}")))?;
    if !cas.iter().any(|d| d.0.eq_ignore_ascii_case(&digest.0)) {
        return Err(AgentError::CaMismatch {
            addr: addr.to_string(),
            detail: "the CA certificate in JoinAccepted is not the one pinned by the token".to_string(),
        });
    }
    let cert = berth_pki::CertifiedKey::new(accepted.cert_pem.clone(), key_pem);
    let identity = cert.identity().map_err(|e| protocol(format!("the node certificate is unusable: {e}")))?;
    if identity != Identity::agent(&accepted.node_id) {
        return Err(protocol(format!("the node certificate is for {identity}, not for agent/{}", accepted.node_id)));
    }
    // The certificate must go with our key and chain to the CA: building the mTLS configuration
    // checks the pair.
    let files = berth_pki::tls::TlsFiles::new(accepted.ca_pem.clone(), cert);
    berth_pki::tls::client_config(&files, &[berth_channel::ALPN])?;

    let masters = if accepted.masters.is_empty() { spec.join.clone() } else { accepted.masters.clone() };
    let state = AgentState::new(accepted.node_id.clone(), spec.name.clone(), spec.labels.clone(), masters);
    let dir = spec.dir.clone();
    let to_write = state.clone();
    let write = move || -> Result<(), AgentError> {
        state::create_dir(&dir)?;
        state::write_atomic(&dir, state::CA_FILE, files.ca_pem.as_bytes(), 0o644)?;
        state::write_atomic(&dir, state::CERT_FILE, files.cert.cert_pem.as_bytes(), 0o644)?;
        state::write_atomic(&dir, state::KEY_FILE, files.cert.key_pem.as_bytes(), 0o600)?;
        // Last: its presence means "joined".
        to_write.save(&dir)
    };
    match tokio::task::spawn_blocking(write).await {
        Ok(r) => r?,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
    info!(node_id = %state.node_id, name = %state.name, master = %addr, "joined the cluster");
    Ok(state)
}
