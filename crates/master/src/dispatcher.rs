//! The QUIC side of a master: agents join here (any master; followers point them at the leader)
//! and keep one session with the leader, which sends assignments, takes heartbeats and status,
//! and renews node certificates. The node monitor (leader only) turns heartbeats into committed
//! status transitions.
//!
//! Heartbeats never touch Raft: the leader keeps the last time it heard from each node in memory
//! and commits only transitions (ready, down), in batches, after re-checking that it still leads.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use berth_api::pb::{
    JoinTokenRecord, Node, NodeAvailability, NodeStatus,
    agent::{
        Accepted, AgentFrame, Assignment, Assignments, AssignmentsKind, CertificateRenewed, HeartbeatAck, Hello,
        JoinError, JoinRejected, MasterFrame, Redirect, TaskState, agent_frame, master_frame,
    },
};
use berth_channel::{FrameReader, FrameWriter, close};
use berth_pki::{Identity, Role, token::JoinToken};
use berth_types::{Command, CommandResult, event};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    endpoints,
    node::Ctx,
    objects::{self, NODES_PREFIX, Versioned},
};

/// In-memory liveness, valid only on the leader.
#[derive(Default)]
pub(crate) struct Liveness {
    inner: Mutex<LivenessInner>,
}

#[derive(Default)]
struct LivenessInner {
    /// When this master last became leader: every node's grace starts no earlier.
    leader_since: Option<Instant>,
    last_seen: HashMap<String, Instant>,
    /// What each node's last heartbeat said of its CAs: (trust bundle digest, digest of the CA
    /// of its certificate). A CA rotation waits on it.
    ca: HashMap<String, (String, String)>,
    /// Open sessions: node id -> (session number, cancel token of that session).
    sessions: HashMap<String, (u64, CancellationToken)>,
    next_session: u64,
}

impl Liveness {
    fn with<R>(&self, f: impl FnOnce(&mut LivenessInner) -> R) -> R {
        f(&mut self.inner.lock().expect("liveness lock"))
    }

    /// A new term of leadership: forget what an earlier term saw, and give every node a full
    /// grace period from now.
    pub fn become_leader(&self) {
        self.with(|l| {
            l.leader_since = Some(Instant::now());
            l.last_seen.clear();
            l.ca.clear();
        });
    }

    /// Leadership lost: end every session (their agents reconnect to the new leader).
    pub fn step_down(&self) {
        self.with(|l| {
            l.leader_since = None;
            for (_, (_, t)) in l.sessions.drain() {
                t.cancel();
            }
        });
    }

    /// What `node` last said of its CAs (see [`LivenessInner::ca`]).
    pub fn ca_report(&self, node: &str) -> Option<(String, String)> {
        self.with(|l| l.ca.get(node).cloned())
    }

    fn report_ca(&self, node: &str, bundle: &str, cert_ca: &str) {
        self.with(|l| {
            if l.ca.get(node).is_none_or(|(b, c)| b != bundle || c != cert_ca) {
                l.ca.insert(node.to_string(), (bundle.to_string(), cert_ca.to_string()));
            }
        });
    }

    pub fn seen(&self, node: &str) {
        self.with(|l| {
            l.last_seen.insert(node.to_string(), Instant::now());
        });
    }

    /// Registers a session, superseding an older one of the same node. None when this master
    /// stopped leading in the meantime (checked under the same lock `step_down` takes).
    fn open_session(&self, node: &str, token: CancellationToken) -> Option<u64> {
        self.with(|l| {
            l.leader_since?;
            l.next_session += 1;
            let n = l.next_session;
            if let Some((_, old)) = l.sessions.insert(node.to_string(), (n, token)) {
                old.cancel();
            }
            l.last_seen.insert(node.to_string(), Instant::now());
            Some(n)
        })
    }

    fn close_session(&self, node: &str, n: u64) {
        self.with(|l| {
            if l.sessions.get(node).is_some_and(|(m, _)| *m == n) {
                l.sessions.remove(node);
            }
        });
    }

    fn end_session(&self, node: &str) {
        self.with(|l| {
            if let Some((_, t)) = l.sessions.remove(node) {
                t.cancel();
            }
        });
    }

    /// Open sessions, and the longest any of their nodes has been silent.
    pub fn session_stats(&self) -> (usize, Duration) {
        self.with(|l| {
            let oldest = l.sessions.keys().filter_map(|n| l.last_seen.get(n)).map(|t| t.elapsed()).max();
            (l.sessions.len(), oldest.unwrap_or_default())
        })
    }

    /// (milliseconds since last heard, connected) for the node list.
    pub fn info(&self, node: &str) -> (i64, bool) {
        self.with(|l| {
            let age = l.last_seen.get(node).map_or(-1, |t| t.elapsed().as_millis() as i64);
            (age, l.sessions.contains_key(node))
        })
    }

    /// How long the node has been silent, counting from when this master became leader at most.
    fn silence(&self, node: &str) -> Option<Duration> {
        self.with(|l| {
            let since = l.leader_since?;
            let last = l.last_seen.get(node).copied().map_or(since, |t| t.max(since));
            Some(last.elapsed())
        })
    }

    fn session_ids(&self) -> Vec<String> {
        self.with(|l| l.sessions.keys().cloned().collect())
    }

    fn connected(&self, node: &str) -> bool {
        self.with(|l| l.sessions.contains_key(node))
    }
}

/// QUIC endpoints (host:port) of every master, from the current membership.
pub(crate) fn master_endpoints(ctx: &Ctx) -> Vec<String> {
    let m = ctx.metrics();
    m.membership_config.membership().nodes().map(|(_, n)| n.addr.clone()).collect()
}

/// Connections in their handshake or before their peer is known (a join, a first frame not
/// read yet) at once; more are refused (the agent retries with backoff). Each holds at most
/// [`berth_channel::PRE_AUTH_WINDOW`] bytes of the master's memory.
pub(crate) const PRE_AUTH_CONNECTIONS: usize = 1024;

/// Accepts agent connections until `shutdown`.
pub(crate) async fn run(ctx: Arc<Ctx>, endpoint: quinn::Endpoint, shutdown: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(PRE_AUTH_CONNECTIONS));
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => match i { Some(i) => i, None => return },
            _ = shutdown.cancelled() => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(remote = %incoming.remote_address(), "refused a connection: {PRE_AUTH_CONNECTIONS} are being set up");
            incoming.refuse();
            continue;
        };
        let ctx = ctx.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(conn) => handle_connection(ctx, conn, shutdown, slot).await,
                Err(e) => debug!(%remote, "agent connection failed during the handshake: {e}"),
            }
        });
    }
    endpoint.close(close::SHUTDOWN, b"master shutting down");
}

async fn handle_connection(
    ctx: Arc<Ctx>,
    conn: quinn::Connection,
    shutdown: CancellationToken,
    slot: tokio::sync::OwnedSemaphorePermit,
) {
    let remote = conn.remote_address();
    // A peer with a certificate from the cluster CA is known from the handshake; one without
    // (a joining agent) keeps the pre-authentication bounds, and a first frame of at most
    // PRE_AUTH_FRAME bytes, until it has its answer.
    // The peer's certificate, read once: who it is, and what revocation checks (here, and at
    // each heartbeat of a session).
    let cert = berth_channel::peer_certificate(&conn).and_then(|der| berth_pki::cert_info_of_der(&der).ok());
    let peer = cert.as_ref().map(|c| c.identity.clone());
    if let Some(Err(e)) = cert.as_ref().map(|c| ctx.revoked.check(c)) {
        info!(%remote, "refused a connection: {e}");
        conn.close(close::UNAUTHENTICATED, format!("{e}: join again with a new token").as_bytes());
        return;
    }
    let mut slot = Some(slot);
    if peer.is_some() {
        berth_channel::authenticated(&conn);
        slot = None;
    }
    let (send, recv) = match tokio::time::timeout(Duration::from_secs(10), conn.accept_bi()).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            debug!(%remote, "agent connection closed before opening a stream: {e}");
            return;
        }
        Err(_) => {
            conn.close(close::MALFORMED_FRAME, b"no stream opened within 10s");
            return;
        }
    };
    let mut writer = FrameWriter::new(send);
    let limit = if peer.is_some() { berth_channel::MAX_FRAME } else { berth_channel::PRE_AUTH_FRAME };
    let mut reader = FrameReader::with_max(recv, limit);
    let first = match tokio::time::timeout(Duration::from_secs(10), reader.recv::<AgentFrame>()).await {
        Ok(Ok(Some(f))) => f,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            info!(%remote, "closing an agent connection: {e}");
            conn.close(close::MALFORMED_FRAME, e.to_string().as_bytes());
            return;
        }
        Err(_) => {
            info!(%remote, "closing an agent connection: no first frame within 10s");
            conn.close(close::MALFORMED_FRAME, b"no first frame within 10s");
            return;
        }
    };
    match first.body {
        Some(agent_frame::Body::Join(req)) => {
            let reply = handle_join(&ctx, req).await;
            if let Some(master_frame::Body::JoinRejected(r)) = &reply {
                info!(%remote, error = ?r.error(), "join refused: {}", r.message);
            }
            let _ = writer.send(&MasterFrame { body: reply }).await;
            let _ = writer.get_mut().finish();
            // Let the agent read the answer and close the connection itself.
            let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
            drop(slot);
        }
        Some(agent_frame::Body::Hello(hello)) => {
            match peer {
                Some(Identity { role: Role::Agent, id }) if id == hello.node_id => {}
                other => {
                    let who = other.map_or("no certificate".to_string(), |i| i.to_string());
                    info!(%remote, claimed = %hello.node_id, "refused a session: the certificate is {who}");
                    conn.close(close::UNAUTHENTICATED, b"a session needs the node certificate of the node it names");
                    return;
                }
            }
            session(ctx, conn, cert, writer, reader, hello, shutdown).await;
        }
        _ => {
            info!(%remote, "closing an agent connection: the first frame must be Join or Hello");
            conn.close(close::MALFORMED_FRAME, b"the first frame must be Join or Hello");
        }
    }
}

pub(crate) fn rejected(error: JoinError, message: impl Into<String>) -> Option<master_frame::Body> {
    Some(master_frame::Body::JoinRejected(JoinRejected {
        error: error as i32,
        message: message.into(),
        leader_hint: String::new(),
    }))
}

/// The shortest time between two certificate renewals of one node (an agent renews at 50-80%
/// of its certificate's lifetime: a minute at the shortest lifetime, 45 days by default).
const MIN_RENEW_INTERVAL: Duration = Duration::from_secs(10);

/// When each node last renewed, on this master (renewals sign with the CA's key: a node may not
/// make the leader do that in a loop).
static RENEWALS: RenewalLimiter = RenewalLimiter { last: std::sync::Mutex::new(BTreeMap::new()) };

struct RenewalLimiter {
    last: std::sync::Mutex<BTreeMap<String, std::time::Instant>>,
}

impl RenewalLimiter {
    fn allow(&self, node: &str, now: std::time::Instant) -> bool {
        let mut last = self.last.lock().expect("renewals lock");
        if last.get(node).is_some_and(|t| now.saturating_duration_since(*t) < MIN_RENEW_INTERVAL) {
            return false;
        }
        if last.len() >= 100_000 {
            last.retain(|_, t| now.saturating_duration_since(*t) < MIN_RENEW_INTERVAL);
        }
        last.insert(node.to_string(), now);
        true
    }
}

/// What a join with an unknown token id or a wrong secret is told (the same for both).
pub(crate) const TOKEN_NOT_VALID: &str = "the token is not valid (no token has this id and secret): copy the whole \
     token again, or create one with `berth token create`";
/// Compared against when the token id is unknown: no secret hashes to it.
const UNKNOWN_TOKEN_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

async fn handle_join(ctx: &Ctx, req: berth_api::pb::agent::JoinRequest) -> Option<master_frame::Body> {
    if !ctx.is_leader() {
        let hint = ctx.leader().map(|(_, addr)| addr).unwrap_or_default();
        return Some(master_frame::Body::JoinRejected(JoinRejected {
            error: JoinError::NotLeader as i32,
            message: "this master is not the leader; join through the leader".into(),
            leader_hint: hint,
        }));
    }
    let token = match JoinToken::parse(&req.token) {
        Ok(t) => t,
        Err(e) => return rejected(JoinError::TokenInvalid, format!("the token is malformed: {e}")),
    };
    if !ctx.pki.trusts(&token.ca_digest) {
        return rejected(JoinError::TokenInvalid, "the token was made for another cluster (its CA digest differs)");
    }
    if let Err(msg) = validate_name(&req.name) {
        return rejected(JoinError::BadRequest, msg);
    }
    if let Err(msg) = validate_join(&req) {
        return rejected(JoinError::BadRequest, msg);
    }
    let Some(ca) = ctx.pki.ca() else {
        return rejected(JoinError::Unavailable, "the leader does not hold the CA key yet; retry in a few seconds");
    };
    // Checked here for a quick answer, and again where the use is counted (`joins`).
    // An unknown id and a wrong secret get the same answer (and the same hash comparison), so
    // that the answers do not tell anyone which token ids exist.
    let rec = match objects::get::<JoinTokenRecord>(&ctx.reader, &objects::token_key(&token.id)) {
        Ok(r) => r,
        Err(e) => return rejected(JoinError::Unavailable, e.message()),
    };
    let stored = rec.as_ref().map_or(UNKNOWN_TOKEN_HASH, |r| r.obj.secret_sha256.as_str());
    let matches = berth_pki::token::secret_matches(&token.secret, stored);
    let Some(rec) = rec.filter(|_| matches) else {
        return rejected(JoinError::TokenInvalid, TOKEN_NOT_VALID);
    };
    if rec.obj.revoked {
        return rejected(JoinError::TokenRevoked, "the token was revoked: create a new one with `berth token create`");
    }
    if rec.obj.expires_at_ms != 0 && objects::now_ms() >= rec.obj.expires_at_ms {
        return rejected(JoinError::TokenExpired, "the token has expired: create a new one with `berth token create`");
    }
    if rec.obj.uses_left == 0 {
        return rejected(
            JoinError::TokenUsedUp,
            "the token has no uses left: create a new one with `berth token create --uses N`",
        );
    }
    let name_taken = || {
        rejected(
            JoinError::NameTaken,
            format!(
                "a node named {:?} is already in the cluster: pick another --name, or remove the old node with \
                 `berth node rm {}`",
                req.name, req.name
            ),
        )
    };
    match ctx.reader.get(&objects::node_name_key(&req.name)) {
        Ok(Some(_)) => return name_taken(),
        Ok(None) => {}
        Err(e) => return rejected(JoinError::Unavailable, e.to_string()),
    }
    let node_id = uuid::Uuid::new_v4().to_string();
    let cert_pem = match ca.sign_csr(&req.csr_pem, &Identity::agent(&node_id), ctx.cert_validity) {
        Ok(c) => c,
        Err(e) => return rejected(JoinError::BadRequest, format!("the certificate signing request is invalid: {e}")),
    };
    // The token's labels are the admin's: a joining agent adds labels, never changes them.
    if let Some((k, v)) = req.labels.iter().find(|(k, v)| rec.obj.labels.get(*k).is_some_and(|t| t != *v)) {
        return rejected(
            JoinError::BadRequest,
            format!(
                "label {k}={v} conflicts with the token's {k}={}: a token's labels are set by the admin who \
                 created it; drop {k} from --labels",
                rec.obj.labels[k]
            ),
        );
    }
    let mut labels = req.labels.clone();
    labels.extend(rec.obj.labels.clone());
    let now = objects::now_ms();
    let node = Node {
        id: node_id.clone(),
        name: req.name.clone(),
        labels,
        resources: req.resources,
        status: NodeStatus::Unknown as i32,
        availability: NodeAvailability::Active as i32,
        agent_version: req.agent_version.clone(),
        advertise_addr: req.advertise_addr.clone(),
        created_at_ms: now,
        status_changed_at_ms: now,
        status_message: "joined; waiting for its first session".into(),
        joined_with_token: token.id.clone(),
        networks: false,
        host_paths: Vec::new(),
        edge: false,
    };
    // Many joins run these checks at once; their uses are counted and their nodes written in
    // batches, one batch at a time.
    ctx.joins.join(ctx, token.id, node, cert_pem).await
}

/// The answer to a heartbeat: the term and removed masters, and what the agent lacks: the
/// masters' trust list when its own differs (a CA rotation), a renewal when its certificate is
/// not from the CA that signs, the revocation list when it changed since this session sent it.
fn heartbeat_ack(
    ctx: &Ctx,
    node_id: &str,
    hb: berth_api::pb::agent::Heartbeat,
    term: u64,
    revoked_sent: &mut u64,
) -> HeartbeatAck {
    let mut ack = HeartbeatAck { seq: hb.seq, term, removed_masters: ctx.removed_ids(), ..Default::default() };
    // An agent too old to report its CAs is left alone.
    if !hb.ca_digest.is_empty() {
        ctx.liveness.report_ca(node_id, &hb.ca_digest, &hb.cert_ca_digest);
        if ctx.pki.bundle_digest() != hb.ca_digest {
            ack.ca_pem = ctx.pki.ca_pem();
        }
        ack.renew = hb.cert_ca_digest != ctx.pki.digest().as_str();
    }
    let generation = ctx.revoked.generation();
    if generation != *revoked_sent {
        *revoked_sent = generation;
        ack.revoked = Some(ctx.revoked.to_agents());
    }
    ack
}

/// Most labels a joining agent may give its node.
const MAX_JOIN_LABELS: usize = 64;
/// Bounds on the resources an agent may report: 100,000 cores, 1 PiB of memory, 1 EiB of disk.
const MAX_CPU_MILLIS: u64 = 100_000_000;
const MAX_MEMORY_BYTES: u64 = 1 << 50;
const MAX_DISK_BYTES: u64 = 1 << 60;

/// What a joining agent says about itself, beyond its name: labels, resources, advertise
/// address and version must be well formed and plausible (they are recorded as they are, and
/// the scheduler trusts them).
fn validate_join(req: &berth_api::pb::agent::JoinRequest) -> Result<(), String> {
    if req.labels.len() > MAX_JOIN_LABELS {
        return Err(format!("{} labels: a node may have {MAX_JOIN_LABELS} at most", req.labels.len()));
    }
    for (k, v) in &req.labels {
        crate::nodes_service::label_problem(k, v)?;
    }
    let r = req.resources.unwrap_or_default();
    for (what, value, max) in [
        ("cpu", r.cpu_millis, MAX_CPU_MILLIS),
        ("memory", r.memory_bytes, MAX_MEMORY_BYTES),
        ("disk", r.disk_bytes, MAX_DISK_BYTES),
    ] {
        if value > max {
            return Err(format!("the agent reports {what} {value}, more than any host has ({max}): a broken agent?"));
        }
    }
    if !req.advertise_addr.is_empty() {
        advertise_problem(&req.advertise_addr)?;
    }
    if req.agent_version.len() > 64 || req.agent_version.chars().any(|c| c.is_control()) {
        return Err("the agent's version is not a version string (64 printable characters at most)".into());
    }
    berth_api::version::agent_allowed(&req.agent_version, &berth_api::version::Version::this())?;
    Ok(())
}

/// Whether `addr` can be a node's advertise address: an IP address other hosts can reach
/// (loopback is allowed, for clusters on one machine).
fn advertise_problem(addr: &str) -> Result<(), String> {
    let ip: std::net::IpAddr =
        addr.parse().map_err(|_| format!("advertise address {addr:?} is not an IP address (--advertise-addr)"))?;
    let bad = ip.is_unspecified()
        || ip.is_multicast()
        || matches!(ip, std::net::IpAddr::V4(v4) if v4.is_broadcast() || v4.is_link_local());
    if bad {
        return Err(format!("advertise address {ip} cannot reach this host from others: give its own address"));
    }
    Ok(())
}

fn validate_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!("node name {name:?} is not valid: use 1-63 letters, digits, '-', '.' or '_' (set it with --name)"))
    }
}

async fn session(
    ctx: Arc<Ctx>,
    conn: quinn::Connection,
    cert: Option<berth_pki::CertInfo>,
    mut writer: FrameWriter,
    mut reader: FrameReader,
    hello: Hello,
    shutdown: CancellationToken,
) {
    // The caller checked that the certificate is this node's.
    let node_id = hello.node_id.clone();
    let masters = master_endpoints(&ctx);
    if !ctx.is_leader() {
        let leader = ctx.leader().map(|(_, a)| a).unwrap_or_default();
        let _ =
            writer.send(&MasterFrame { body: Some(master_frame::Body::Redirect(Redirect { leader, masters })) }).await;
        let _ = writer.get_mut().finish();
        let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
        return;
    }
    let node = match objects::get::<Node>(&ctx.reader, &objects::node_key(&node_id)) {
        Ok(Some(n)) => n,
        Ok(None) => {
            info!(node = %node_id, "refused a session: the node was removed");
            conn.close(close::UNAUTHENTICATED, b"this node was removed from the cluster: join again with a token");
            return;
        }
        Err(e) => {
            warn!(node = %node_id, "refused a session: {}", e.message());
            conn.close(close::SHUTDOWN, b"the leader could not read its state; retry");
            return;
        }
    };
    // Versions too far apart are refused, never misread (the skew policy in berth_api::version).
    if let Err(why) = berth_api::version::agent_allowed(&hello.agent_version, &berth_api::version::Version::this()) {
        info!(node = %node_id, "refused a session: {why}");
        conn.close(close::VERSION_SKEW, why.as_bytes());
        return;
    }
    let term = ctx.metrics().current_term;
    let session_token = shutdown.child_token();
    let Some(n) = ctx.liveness.open_session(&node_id, session_token.clone()) else {
        let hint = ctx.leader().map(|(_, a)| a).unwrap_or_default();
        conn.close(close::NOT_LEADER, hint.as_bytes());
        return;
    };
    info!(node = %node_id, term, "agent session opened");
    let caps = Caps {
        networks: hello.networks,
        underlay: hello.underlay.clone(),
        // Absolute paths, 64 at most, each of at most 4096 bytes: the rest is dropped.
        host_paths: hello
            .host_paths
            .iter()
            .filter(|p| p.starts_with('/') && p.len() <= 4096 && !p.contains('\0'))
            .take(64)
            .cloned()
            .collect(),
        edge: hello.edge,
        // Checked above against the skew policy (so at most 64 printable characters).
        agent_version: hello.agent_version.clone(),
    };
    if hello_changes(&node.obj, &caps).is_some() {
        tokio::spawn(record_hello(ctx.clone(), node_id.clone(), caps));
    }
    let accepted = Accepted {
        term,
        heartbeat_interval_ms: ctx.agent_heartbeat_interval.as_millis() as u64,
        masters,
        removed_masters: ctx.removed_ids(),
        revoked: Some(ctx.revoked.to_agents()),
    };
    let mut revoked_sent = ctx.revoked.generation();
    // Never send a set before the index holds this term's tasks: an empty or stale COMPLETE set
    // would make the agent stop what it runs.
    if !ctx.assignments.wait_ready(Duration::from_secs(10)).await {
        ctx.liveness.close_session(&node_id, n);
        conn.close(close::SHUTDOWN, b"the leader is still loading its tasks; retry");
        return;
    }
    let dropped = ctx.statuses.report(&node_id, hello.tasks);
    if dropped > 0 {
        warn!(node = %node_id, dropped, "dropped task states from a Hello: the node has too many waiting");
    }
    ctx.assignments.set_conn(&node_id, conn.clone());
    // Streams the agent opens besides the session's: image blob requests.
    {
        let (conn, reader, token) = (conn.clone(), ctx.reader.clone(), session_token.clone());
        tokio::spawn(async move {
            loop {
                let (send, recv) = tokio::select! {
                    _ = token.cancelled() => return,
                    s = conn.accept_bi() => match s { Ok(s) => s, Err(_) => return },
                };
                let reader = reader.clone();
                tokio::spawn(async move {
                    crate::images::serve_blob(&reader, FrameWriter::new(send), FrameReader::new(recv)).await
                });
            }
        });
    }
    let mut changes = ctx.assignments.subscribe(&node_id);
    changes.mark_unchanged();
    let mut sent = Sent { version: 0, set: BTreeMap::new() };
    let complete = with_files(&ctx, &node_id, sent.complete(term, ctx.assignments.current(&node_id)));
    // Networks: a COMPLETE update after the assignments (once the endpoints index is ready, and
    // only on a cluster with pools or for a node with a view), INCREMENTAL ones after that, at
    // most one every SEND_INTERVAL.
    let mut net_rx = ctx.endpoints.subscribe();
    let mut feed = endpoints::Feed::default();
    let snap = net_rx.borrow_and_update().clone();
    let net_complete = feed.next(term, &snap, &node_id);
    let mut edge_feed = endpoints::EdgeFeed::default();
    let edge_first = edge_feed.next(term, &snap, &node_id, |ns, name, v| open_certificate(&ctx, ns, name, v));
    let mut net_sent_at = net_complete.as_ref().map(|_| tokio::time::Instant::now());
    let mut net_due: Option<tokio::time::Instant> = None;
    let opened = async {
        writer.send(&MasterFrame { body: Some(master_frame::Body::Accepted(accepted)) }).await?;
        writer.send(&MasterFrame { body: Some(master_frame::Body::Assignments(complete)) }).await?;
        if let Some(u) = net_complete {
            send_network_update(&mut writer, u, ctx.network_update_part_bytes).await?;
        }
        if let Some(u) = edge_first {
            writer.send(&MasterFrame { body: Some(master_frame::Body::EdgeUpdate(u)) }).await?;
        }
        Ok::<(), berth_channel::FrameError>(())
    };
    if let Err(e) = opened.await {
        debug!(node = %node_id, "session ended while opening: {e}");
        ctx.liveness.close_session(&node_id, n);
        ctx.assignments.drop_conn(&node_id, &conn);
        return;
    }
    // The session's end when the connection fails: the node's liveness and assignment feed
    // let go of it (the agent will open a new one).
    let lost = |e: &dyn std::fmt::Display| {
        debug!(node = %node_id, "session lost: {e}");
        ctx.liveness.close_session(&node_id, n);
        ctx.assignments.drop_conn(&node_id, &conn);
    };
    // A COMPLETE set the agent asked for while the index was rebuilding: sent once it is ready
    // (the rebuild bumps every node), never from an index that may lack tasks.
    let mut complete_wanted = false;
    let reason = loop {
        let frame = tokio::select! {
            f = reader.recv::<AgentFrame>() => f,
            r = changes.changed() => {
                if r.is_err() {
                    continue;
                }
                let (set, changed_at) = ctx.assignments.current_since(&node_id);
                let out = if complete_wanted && ctx.assignments.is_ready() {
                    complete_wanted = false;
                    sent.complete(term, set)
                } else {
                    let Some(inc) = sent.incremental(term, set) else { continue };
                    inc
                };
                let out = with_files(&ctx, &node_id, out);
                if let Err(e) = writer.send(&MasterFrame { body: Some(master_frame::Body::Assignments(out)) }).await {
                    lost(&e);
                    return;
                }
                if let Some(at) = changed_at {
                    ctx.meters.assignment_lag.observe(at.elapsed().as_secs_f64());
                }
                continue;
            }
            r = net_rx.changed() => {
                if r.is_ok() && net_due.is_none() {
                    let now = tokio::time::Instant::now();
                    let earliest = net_sent_at.map_or(now, |t| t + endpoints::SEND_INTERVAL);
                    net_due = Some(earliest.max(now));
                }
                continue;
            }
            _ = tokio::time::sleep_until(net_due.unwrap_or_else(far_future)), if net_due.is_some() => {
                net_due = None;
                let snap = net_rx.borrow_and_update().clone();
                // Endpoints first, then the routes that may use them.
                if let Some(u) = feed.next(term, &snap, &node_id) {
                    net_sent_at = Some(tokio::time::Instant::now());
                    if let Err(e) = send_network_update(&mut writer, u, ctx.network_update_part_bytes).await {
                        lost(&e);
                        return;
                    }
                }
                if let Some(u) = edge_feed.next(term, &snap, &node_id, |ns, name, v| open_certificate(&ctx, ns, name, v)) {
                    net_sent_at = Some(tokio::time::Instant::now());
                    if let Err(e) = writer.send(&MasterFrame { body: Some(master_frame::Body::EdgeUpdate(u)) }).await {
                        lost(&e);
                        return;
                    }
                }
                continue;
            }
            _ = session_token.cancelled() => {
                break if shutdown.is_cancelled() {
                    (close::SHUTDOWN, "master shutting down".to_string())
                } else if ctx.is_leader() {
                    (close::SUPERSEDED, "a newer session of this node replaced this one".to_string())
                } else {
                    (close::NOT_LEADER, ctx.leader().map(|(_, a)| a).unwrap_or_default())
                };
            }
        };
        let body = match frame {
            Ok(Some(AgentFrame { body: Some(b) })) => b,
            Ok(Some(AgentFrame { body: None })) => break (close::MALFORMED_FRAME, "empty frame".to_string()),
            Ok(None) => break (close::SHUTDOWN, "the agent closed the session".to_string()),
            Err(e) if e.is_protocol_violation() => {
                info!(node = %node_id, "closing the session: {e}");
                break (close::MALFORMED_FRAME, e.to_string());
            }
            Err(e) => {
                lost(&e);
                return;
            }
        };
        ctx.liveness.seen(&node_id);
        let reply = match body {
            agent_frame::Body::Heartbeat(hb) => {
                // A revocation ends the sessions it covers within a heartbeat.
                if let Some(Err(e)) = cert.as_ref().map(|c| ctx.revoked.check(c)) {
                    info!(node = %node_id, "closing the session: {e}");
                    break (close::UNAUTHENTICATED, format!("{e}: join again with a new token"));
                }
                Some(master_frame::Body::HeartbeatAck(heartbeat_ack(&ctx, &node_id, hb, term, &mut revoked_sent)))
            }
            agent_frame::Body::Status(report) => {
                ctx.meters.status_reports.inc_by(report.tasks.len() as u64);
                let dropped = ctx.statuses.report(&node_id, report.tasks);
                if dropped > 0 {
                    warn!(node = %node_id, dropped, "dropped task states: the node has too many waiting to be committed");
                }
                if !report.volumes.is_empty() {
                    tokio::spawn(record_volume_usage(ctx.clone(), node_id.clone(), report.volumes));
                }
                None
            }
            // Networks: answered now if the endpoints index is ready, else once it is.
            agent_frame::Body::RequestComplete(rc) if rc.networks => {
                feed.request_complete();
                edge_feed.request_complete();
                let snap = net_rx.borrow().clone();
                if let Some(u) = feed.next(term, &snap, &node_id) {
                    net_sent_at = Some(tokio::time::Instant::now());
                    if let Err(e) = send_network_update(&mut writer, u, ctx.network_update_part_bytes).await {
                        lost(&e);
                        return;
                    }
                }
                if let Some(u) =
                    edge_feed.next(term, &snap, &node_id, |ns, name, v| open_certificate(&ctx, ns, name, v))
                    && let Err(e) = writer.send(&MasterFrame { body: Some(master_frame::Body::EdgeUpdate(u)) }).await
                {
                    lost(&e);
                    return;
                }
                None
            }
            agent_frame::Body::RequestComplete(_) if ctx.assignments.is_ready() => {
                let set = sent.complete(term, ctx.assignments.current(&node_id));
                Some(master_frame::Body::Assignments(with_files(&ctx, &node_id, set)))
            }
            agent_frame::Body::RequestComplete(_) => {
                complete_wanted = true;
                None
            }
            agent_frame::Body::LogChunk(_) => {
                break (close::MALFORMED_FRAME, "log chunks belong on a log stream".to_string());
            }
            agent_frame::Body::BlobRequest(_) => {
                break (close::MALFORMED_FRAME, "blob requests belong on a stream of their own".to_string());
            }
            agent_frame::Body::Renew(_) if !RENEWALS.allow(&node_id, std::time::Instant::now()) => {
                warn!(node = %node_id, "refused a certificate renewal: the node renewed less than {MIN_RENEW_INTERVAL:?} ago");
                None
            }
            agent_frame::Body::Renew(req) => match ctx.pki.ca() {
                Some(ca) => match ca.sign_csr(&req.csr_pem, &Identity::agent(&node_id), ctx.cert_validity) {
                    Ok(cert_pem) => {
                        info!(node = %node_id, "renewed the node certificate");
                        Some(master_frame::Body::Renewed(CertificateRenewed { cert_pem, ca_pem: ctx.pki.ca_pem() }))
                    }
                    Err(e) => {
                        warn!(node = %node_id, "refused a renewal: {e}");
                        None
                    }
                },
                None => None,
            },
            agent_frame::Body::Join(_) | agent_frame::Body::Hello(_) => {
                break (close::MALFORMED_FRAME, "Join and Hello are only valid as the first frame".to_string());
            }
        };
        if let Some(body) = reply
            && let Err(e) = writer.send(&MasterFrame { body: Some(body) }).await
        {
            lost(&e);
            return;
        }
    };
    ctx.liveness.close_session(&node_id, n);
    ctx.assignments.drop_conn(&node_id, &conn);
    info!(node = %node_id, reason = %reason.1, "agent session closed");
    conn.close(reason.0, reason.1.as_bytes());
}

/// A deadline that never comes (for a disabled `select!` branch).
fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(86_400)
}

/// A route's certificate (the secret's value at `version`), opened for an edge node.
fn open_certificate(ctx: &Ctx, ns: &str, name: &str, version: u64) -> Result<Vec<u8>, String> {
    let f = berth_types::task::TaskFile {
        kind: berth_types::spec::FileKind::Secret,
        name: name.to_string(),
        version,
        target: String::new(),
        mode: 0o400,
    };
    let mut data = crate::secrets::contents(ctx, ns, &[f])?;
    Ok(data.pop().map(|d| d.data).unwrap_or_default())
}

/// What an agent's Hello says about its node.
#[derive(Debug, Clone, Default)]
struct Caps {
    /// It attaches tasks to networks.
    networks: bool,
    /// Its underlay address; empty: unknown.
    underlay: String,
    /// The host-path prefixes it lets `host` volumes use.
    host_paths: Vec<String>,
    /// It runs an edge router (--edge).
    edge: bool,
    /// The version it runs (an upgraded agent reports its new one); empty: unknown.
    agent_version: String,
}

/// The node record as the agent's Hello says it should be, or None when it already is: whether
/// the agent attaches tasks to networks (the scheduler places network tasks only on such
/// nodes), its underlay address (VXLAN peers reach it there), kept in `advertise_addr`
/// when the agent names one, and the host paths `host` volumes may use there.
fn hello_changes(node: &Node, caps: &Caps) -> Option<Node> {
    let (networks, underlay) = (caps.networks, caps.underlay.as_str());
    let mut n = node.clone();
    n.networks = networks;
    n.host_paths = caps.host_paths.clone();
    n.edge = caps.edge;
    if !caps.agent_version.is_empty() {
        n.agent_version = caps.agent_version.clone();
    }
    if !underlay.is_empty() {
        match advertise_problem(underlay) {
            Ok(()) if underlay.parse::<std::net::Ipv4Addr>().is_ok() => n.advertise_addr = underlay.to_string(),
            Ok(()) => debug!(node = %node.id, underlay, "ignoring an underlay address that is not IPv4"),
            Err(e) => warn!(node = %node.id, "ignoring the agent's underlay address: {e}"),
        }
    }
    (n != *node).then_some(n)
}

/// Records what the Hello said about the node: a compare-and-put on the node's mod_revision,
/// read again and retried when another write (the node monitor's "ready") got there first.
async fn record_hello(ctx: Arc<Ctx>, node_id: String, caps: Caps) {
    for _ in 0..10 {
        let cur = match objects::get::<Node>(&ctx.reader, &objects::node_key(&node_id)) {
            Ok(Some(c)) => c,
            Ok(None) => return,
            Err(e) => {
                warn!(node = %node_id, "not recording the node's Hello: {}", e.message());
                return;
            }
        };
        let Some(updated) = hello_changes(&cur.obj, &caps) else { return };
        let txn = objects::txn_of(vec![objects::cas_put(
            objects::node_key(&node_id),
            cur.mod_revision,
            objects::encode_node(&updated),
        )]);
        match ctx.write(Command::Txn(txn)).await {
            Ok(CommandResult::Txn(r)) if r.succeeded => {
                info!(
                    node = %node_id,
                    networks = caps.networks,
                    underlay = %updated.advertise_addr,
                    host_paths = ?caps.host_paths,
                    "recorded the node's capabilities"
                );
                return;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(e) => {
                info!(node = %node_id, "not recording the node's Hello: {}", e.message());
                return;
            }
        }
    }
    warn!(node = %node_id, "the node's Hello was not recorded: its record kept changing; the next session retries");
}

/// Attaches the contents of their secrets and configs to the RUNNING assignments of a frame about
/// to go to `node`'s agent: opened now, only for that node's tasks, never kept in the set the
/// session compares (so an INCREMENTAL diff is about the tasks, not their files).
///
/// An oci task's RUNNING assignment also gets its image when the cluster holds it
/// (`images::for_task`), so the node fetches it from the leader instead of a registry.
fn with_files(ctx: &Ctx, node: &str, mut a: Assignments) -> Assignments {
    const OCI: &[u8] = b"\"runtime\":\"oci\"";
    const FILES: &[u8] = b"\"files\":";
    let has = |spec: &[u8], what: &[u8]| spec.windows(what.len()).any(|w| w == what);
    for asg in &mut a.updated {
        // Decoded only when it may carry an image or files (most assignments carry neither).
        let (oci, files) = (has(&asg.spec, OCI), has(&asg.spec, FILES));
        if asg.desired_state != TaskState::Running as i32 || !(oci || files) {
            continue;
        }
        let Ok(rs) = berth_types::task::RunSpec::decode(&asg.spec) else { continue };
        if oci {
            asg.image = crate::images::for_task(&ctx.reader, &rs);
        }
        if files {
            match crate::secrets::contents(ctx, &rs.namespace, &rs.files) {
                Ok(files) => asg.files = files,
                // The agent fails the task, saying which file it lacks; the restart policy retries.
                Err(e) => warn!(node, task = %asg.task_id, "not sending the task's secrets and configs: {e}"),
            }
        }
    }
    a
}

/// Records a node's volume usage in the volume records (bounded: see `volumes::usage_updates`).
async fn record_volume_usage(ctx: Arc<Ctx>, node: String, usage: Vec<berth_api::pb::agent::VolumeUsage>) {
    let parts = crate::volumes::usage_updates(&ctx.reader, &node, &usage, objects::now_ms());
    for part in parts {
        // Each on its own: a race lost on one volume (a placement pinning it) leaves the others.
        if let Err(e) = ctx.write(Command::Txn(objects::txn_of(vec![part]))).await {
            debug!(node, "volume usage not recorded: {}", e.message());
            return;
        }
    }
}

/// What a session last sent its agent, to compute INCREMENTAL changes.
struct Sent {
    version: u64,
    set: BTreeMap<String, Assignment>,
}

impl Sent {
    fn complete(&mut self, term: u64, set: BTreeMap<String, Assignment>) -> Assignments {
        self.version += 1;
        self.set = set;
        Assignments {
            term,
            kind: AssignmentsKind::Complete as i32,
            version: self.version,
            base_version: 0,
            updated: self.set.values().cloned().collect(),
            removed: vec![],
        }
    }

    /// The changes from what was sent to `set`, or None when there are none.
    fn incremental(&mut self, term: u64, set: BTreeMap<String, Assignment>) -> Option<Assignments> {
        let updated: Vec<Assignment> =
            set.iter().filter(|(id, a)| self.set.get(*id) != Some(*a)).map(|(_, a)| a.clone()).collect();
        let removed: Vec<String> = self.set.keys().filter(|id| !set.contains_key(*id)).cloned().collect();
        if updated.is_empty() && removed.is_empty() {
            return None;
        }
        let base_version = self.version;
        self.version += 1;
        self.set = set;
        Some(Assignments {
            term,
            kind: AssignmentsKind::Incremental as i32,
            version: self.version,
            base_version,
            updated,
            removed,
        })
    }
}

/// Ends the session of a node that was removed.
pub(crate) fn end_session(ctx: &Ctx, node_id: &str) {
    ctx.liveness.end_session(node_id);
}

/// The node monitor: runs on the leader while it leads. Every tick it finds nodes that opened a
/// session but are not ready, and nodes silent for longer than the grace; it re-checks
/// leadership, then commits all transitions in one transaction.
pub(crate) async fn monitor(ctx: Arc<Ctx>, leading: CancellationToken) {
    let tick = (ctx.agent_heartbeat_interval / 2).max(Duration::from_millis(100));
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = leading.cancelled() => return,
        }
        if let Err(e) = monitor_once(&ctx).await {
            info!("node monitor: {e}");
        }
    }
}

async fn monitor_once(ctx: &Ctx) -> Result<(), String> {
    let nodes = objects::list::<Node>(&ctx.reader, NODES_PREFIX).map_err(|e| e.message().to_string())?;
    // A node removed (on any master) loses its session here on the leader.
    let known: std::collections::HashSet<&str> = nodes.iter().map(|n| n.obj.id.as_str()).collect();
    for id in ctx.liveness.session_ids() {
        if !known.contains(id.as_str()) {
            info!(node = %id, "ending the session of a removed node");
            ctx.liveness.end_session(&id);
        }
    }
    let mut changes: Vec<(Versioned<Node>, NodeStatus, String)> = Vec::new();
    let total = nodes.len();
    let (mut already_down, mut quiet) = (0, 0);
    for n in nodes {
        let status = n.obj.status();
        already_down += usize::from(status == NodeStatus::Down);
        let Some(silence) = ctx.liveness.silence(&n.obj.id) else { return Ok(()) };
        // Silent for half the grace: nodes that went quiet together cross the grace a few
        // rounds apart, and are counted together here.
        quiet += usize::from(status != NodeStatus::Down && silence > ctx.node_down_grace / 2);
        if ctx.liveness.connected(&n.obj.id) {
            if silence > ctx.node_down_grace {
                // The connection lives (QUIC keep-alives) but the agent stopped heartbeating.
                info!(node = %n.obj.id, "ending a session without heartbeats for {}s", silence.as_secs());
                ctx.liveness.end_session(&n.obj.id);
            } else {
                if status != NodeStatus::Ready {
                    changes.push((n, NodeStatus::Ready, "session opened".into()));
                }
                continue;
            }
        }
        if silence > ctx.node_down_grace && status != NodeStatus::Down {
            let msg = format!("no heartbeat for {}s", silence.as_secs());
            changes.push((n, NodeStatus::Down, msg));
        }
    }
    let going_down = changes.iter().filter(|(_, s, _)| *s == NodeStatus::Down).count();
    if going_down > 0 && mass_silence(total, already_down + quiet) {
        changes.retain(|(_, s, _)| *s != NodeStatus::Down);
        static HOLDING: objects::Throttle = objects::Throttle::new();
        if HOLDING.ready(30_000) {
            warn!(
                silent = quiet,
                already_down,
                nodes = total,
                "holding node-down declarations: {} of {total} nodes are down or silent at once, which points at \
                 this master or its network rather than the nodes; their tasks stay where they are until fewer are \
                 silent",
                already_down + quiet
            );
        }
    }
    if changes.is_empty() {
        return Ok(());
    }
    // Never act on a stale view: a deposed leader must not declare nodes down.
    ctx.raft
        .ensure_linearizable(openraft::ReadPolicy::ReadIndex)
        .await
        .map_err(|e| format!("not declaring node transitions: leadership not confirmed: {e}"))?;
    if !ctx.is_leader() {
        return Ok(());
    }
    let now = objects::now_ms();
    // Transactions are bounded in size; the chunks are proposed together, so the proposer packs
    // them into one Raft entry and one fsync.
    let writes = changes.chunks(TRANSITIONS_PER_TXN).map(|chunk| {
        let parts = chunk
            .iter()
            .map(|(n, status, msg)| {
                let mut node = n.obj.clone();
                node.status = *status as i32;
                node.status_changed_at_ms = now;
                node.status_message = msg.clone();
                objects::cas_put(objects::node_key(&node.id), n.mod_revision, objects::encode_node(&node))
            })
            .collect();
        // Each transition's event commits with it.
        let events: Vec<_> = chunk
            .iter()
            .map(|(n, status, msg)| {
                let kind = if *status == NodeStatus::Down { event::NODE_DOWN } else { event::NODE_UP };
                crate::events::new(
                    ctx.id,
                    kind,
                    "node",
                    "",
                    &n.obj.name,
                    format!("{} ({}): {msg}", n.obj.name, n.obj.id),
                )
            })
            .collect();
        let txn = crate::events::with(objects::txn_of(parts), &events);
        async move { (chunk, ctx.write(Command::Txn(txn)).await) }
    });
    let mut failed = None;
    for (chunk, res) in futures::future::join_all(writes).await {
        match res {
            Ok(CommandResult::Txn(r)) if r.succeeded => {
                for (n, status, msg) in chunk {
                    info!(node = %n.obj.id, name = %n.obj.name, status = ?status, "{msg}");
                }
            }
            Ok(_) => failed = Some("a node changed concurrently; retrying next tick".to_string()),
            Err(s) => failed = Some(s.message().to_string()),
        }
    }
    failed.map_or(Ok(()), Err)
}

/// Node transitions per transaction (a compare, a put and an event each; transactions allow 128
/// ops).
const TRANSITIONS_PER_TXN: usize = 40;

/// Clusters from this many nodes on hold node-down declarations when most nodes are silent.
const MASS_SILENCE_MIN_NODES: usize = 50;
/// The share of nodes (in percent) down or going down at once above which the leader assumes
/// the fault is its own (overloaded, cut off) and declares none down, as Kubernetes' node
/// controller stops evicting in a full disruption: declaring them down would move all their
/// tasks, which a leader that could not hear heartbeats cannot place either, and the extra
/// work deepens the overload that made it deaf.
const MASS_SILENCE_PERCENT: usize = 55;

/// Whether `down` of `total` nodes down (or about to be) is a mass silence (see above).
fn mass_silence(total: usize, down: usize) -> bool {
    total >= MASS_SILENCE_MIN_NODES && down * 100 > total * MASS_SILENCE_PERCENT
}

/// Binds the agents' QUIC endpoint on the gRPC port number, over UDP.
pub(crate) fn bind(ctx: &Ctx, addr: SocketAddr) -> Result<quinn::Endpoint, crate::MasterError> {
    let cfg = ctx.pki.quic_server_config()?;
    berth_channel::server_endpoint(addr, cfg)
        .map_err(|e| crate::MasterError::Listen { addr: format!("udp/{addr}"), source: std::io::Error::other(e) })
}

/// Sends a network update, in parts of about `part_bytes` when it is larger (see
/// [`endpoints::split`]).
async fn send_network_update(
    writer: &mut FrameWriter,
    u: berth_api::pb::agent::NetworkUpdate,
    part_bytes: usize,
) -> Result<(), berth_channel::FrameError> {
    for part in endpoints::split(u, part_bytes) {
        writer.send(&MasterFrame { body: Some(master_frame::Body::NetworkUpdate(part)) }).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn most_nodes_silent_at_once_in_a_large_cluster_is_a_mass_silence() {
        // Small clusters: a node that is silent is down, even the only one.
        assert!(!mass_silence(1, 1));
        assert!(!mass_silence(49, 49));
        // From 50 nodes: more than 55% at once is held.
        assert!(!mass_silence(100, 55));
        assert!(mass_silence(100, 56));
        assert!(mass_silence(60, 60));
        assert!(!mass_silence(60, 20));
    }

    #[test]
    fn renewals_are_rate_limited_per_node() {
        let l = RenewalLimiter { last: std::sync::Mutex::new(BTreeMap::new()) };
        let t0 = std::time::Instant::now();
        assert!(l.allow("a", t0));
        assert!(!l.allow("a", t0 + Duration::from_secs(1)));
        assert!(l.allow("b", t0 + Duration::from_secs(1)));
        assert!(l.allow("a", t0 + MIN_RENEW_INTERVAL));
    }

    #[test]
    fn what_a_joining_agent_says_is_checked() {
        let ok = berth_api::pb::agent::JoinRequest {
            name: "n".into(),
            labels: [("zone".to_string(), "a".to_string())].into(),
            resources: Some(berth_api::pb::agent::Resources {
                cpu_millis: 2000,
                memory_bytes: 1 << 33,
                disk_bytes: 1 << 40,
            }),
            advertise_addr: "198.18.0.7".into(),
            agent_version: "0.1.0".into(),
            ..Default::default()
        };
        validate_join(&ok).unwrap();
        let bad = |f: fn(&mut berth_api::pb::agent::JoinRequest)| {
            let mut r = ok.clone();
            f(&mut r);
            validate_join(&r).unwrap_err()
        };
        assert!(
            bad(|r| {
                r.labels.insert("bad key".into(), "x".into());
            })
            .contains("not valid")
        );
        assert!(bad(|r| r.labels = (0..65).map(|i| (format!("k{i}"), "v".into())).collect()).contains("64 at most"));
        assert!(bad(|r| r.resources.as_mut().unwrap().cpu_millis = u64::MAX).contains("cpu"));
        assert!(bad(|r| r.resources.as_mut().unwrap().memory_bytes = u64::MAX).contains("memory"));
        assert!(bad(|r| r.advertise_addr = "0.0.0.0".into()).contains("cannot reach"));
        assert!(bad(|r| r.advertise_addr = "224.0.0.1".into()).contains("cannot reach"));
        assert!(bad(|r| r.advertise_addr = "not-an-ip".into()).contains("not an IP"));
        assert!(bad(|r| r.agent_version = "x".repeat(65)).contains("version"));
        // Loopback is fine (a cluster on one machine).
        let mut local = ok.clone();
        local.advertise_addr = "127.0.0.1".into();
        validate_join(&local).unwrap();
    }

    #[test]
    fn a_hello_updates_the_node_only_when_it_says_something_new() {
        let node = Node { id: "n1".into(), advertise_addr: "192.0.2.1".into(), ..Default::default() };
        let hello = |networks: bool, underlay: &str| Caps {
            networks,
            underlay: underlay.into(),
            host_paths: vec![],
            edge: false,
            agent_version: String::new(),
        };
        // Nothing new: no write.
        assert!(hello_changes(&node, &hello(false, "")).is_none());
        assert!(hello_changes(&node, &hello(false, "192.0.2.1")).is_none());
        // The capability.
        let n = hello_changes(&node, &hello(true, "")).expect("a change");
        assert!(n.networks);
        assert_eq!(n.advertise_addr, "192.0.2.1", "an empty underlay keeps the address");
        // The underlay address.
        let n = hello_changes(&node, &hello(false, "198.51.100.7")).expect("a change");
        assert_eq!((n.networks, n.advertise_addr.as_str()), (false, "198.51.100.7"));
        // An agent that lost the capability (restarted without root) says so too.
        let capable = Node { networks: true, ..node.clone() };
        assert!(!hello_changes(&capable, &hello(false, "")).expect("a change").networks);
        // Something that is not an IPv4 address is not an underlay.
        assert!(hello_changes(&node, &hello(false, "not-an-address")).is_none());
        assert!(hello_changes(&node, &hello(false, "2001:db8::1")).is_none());
        // The host paths an agent allows.
        let paths = Caps { host_paths: vec!["/srv".into()], ..hello(false, "") };
        assert_eq!(hello_changes(&node, &paths).expect("a change").host_paths, vec!["/srv".to_string()]);
        // An upgraded agent's version.
        let upgraded = Caps { agent_version: "0.2.0".into(), ..hello(false, "") };
        assert_eq!(hello_changes(&node, &upgraded).expect("a change").agent_version, "0.2.0");
        let same = Node { agent_version: "0.2.0".into(), ..node.clone() };
        assert!(hello_changes(&same, &upgraded).is_none());
    }
}
