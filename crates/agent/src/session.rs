//! The session loop: connect to the leader with mTLS, say Hello, then heartbeats, assignments and
//! status reports until the session ends; reconnect with backoff; repeat until shutdown.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use berth_api::pb::agent::{
    Accepted, AgentFrame, Assignment, Assignments, AssignmentsKind, CertificateRenewed, Heartbeat, Hello, LogChunk,
    MasterFrame, RenewCertificate, RequestComplete, Resources, StatusReport, TaskState, TaskStatus, agent_frame,
    master_frame,
};
use berth_channel::{Backoff, FrameError, FrameReader, FrameWriter, close};
use berth_pki::CertifiedKey;
use berth_pki::tls::TlsFiles;
use tokio::sync::Semaphore;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::AgentError;
use crate::driver::{Driver, StatusStream, now_ms};
use crate::join::body_name;
use crate::net::{self, Endpoints};
use crate::state::{AgentState, StoredAssignment, StoredStatus};

/// How long the master may take to answer Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How often batched task statuses go out (only when something changed).
pub(crate) const STATUS_FLUSH: Duration = Duration::from_millis(100);
/// Heartbeat period when the master does not say.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(1);
/// How long to wait for CertificateRenewed before asking again.
const RENEW_RETRY: Duration = Duration::from_secs(60);
/// How often an established session reconciles the (confirmed) desired set with what runs,
/// besides every complete set: catches whatever changed under the agent (a task's files or
/// container removed by hand, a stop that failed).
const RECONCILE_INTERVAL: Duration = Duration::from_secs(30);

/// The tokio instant of a wall-clock time (now if it is past).
fn instant_of(t: SystemTime) -> Instant {
    Instant::now() + t.duration_since(SystemTime::now()).unwrap_or_default()
}

/// How a session ended.
#[derive(Debug)]
enum SessionEnd {
    Shutdown,
    /// A follower answered Hello with Redirect.
    Redirect {
        leader: Option<String>,
    },
    /// The master closed the connection with NOT_LEADER.
    NotLeader {
        hint: Option<String>,
    },
    /// The master closed with UNAUTHENTICATED: this node's certificate is no good any more
    /// (the node was removed, or the certificate names another node).
    Refused {
        reason: String,
    },
    /// Anything else; `accepted` when the session had been accepted first.
    Lost {
        accepted: bool,
        reason: String,
    },
}

impl SessionEnd {
    fn lost(reason: impl Into<String>) -> Self {
        SessionEnd::Lost { accepted: false, reason: reason.into() }
    }

    /// A connection-level failure read back into a session end.
    fn from_close(c: close::Closed) -> Self {
        match c {
            close::Closed::NotLeader { hint } => SessionEnd::NotLeader { hint },
            close::Closed::Other { code: Some(code), reason } if code == close::UNAUTHENTICATED => {
                SessionEnd::Refused { reason }
            }
            // Outside the version-skew policy: this agent or the masters must be upgraded first.
            close::Closed::Other { code: Some(code), reason } if code == close::VERSION_SKEW => {
                SessionEnd::Refused { reason }
            }
            other => SessionEnd::lost(other.to_string()),
        }
    }

    fn from_frame_error(e: FrameError, conn: &quinn::Connection) -> Self {
        if let Some(c) = e.connection_error() {
            return SessionEnd::from_close(close::classify(c));
        }
        if e.is_protocol_violation() {
            warn!("closing the session: the master sent a bad frame: {e}");
            conn.close(close::MALFORMED_FRAME, e.to_string().as_bytes());
        }
        SessionEnd::lost(e.to_string())
    }
}

/// One agent: its state, its driver, its connection settings.
pub(crate) struct Agent<D> {
    pub dir: std::path::PathBuf,
    pub state: AgentState,
    pub driver: D,
    pub statuses: StatusStream,
    pub statuses_open: bool,
    pub resources: Resources,
    /// `--join` addresses, tried after the masters the cluster told us about.
    pub fallback: Vec<String>,
    pub tls: quinn::ClientConfig,
    /// The CA, node certificate and key `tls` was built from.
    pub files: TlsFiles,
    /// What heartbeats say of `files`' CAs (see [`crate::certs::ca_report`]).
    pub ca_report: (String, String),
    /// What the masters said is revoked; `tls` checks masters against it.
    pub revoked: crate::certs::SharedRevoked,
    /// When to ask the leader for a fresh certificate.
    pub renew_at: SystemTime,
    /// The key of the renewal request in flight, if any.
    pub renewing: Option<String>,
    pub endpoints: Endpoints,
    /// Bounds how many agents of this process connect at once.
    pub gate: Option<Arc<Semaphore>>,
    /// Status changes not yet reported to a leader.
    pub pending: BTreeMap<String, TaskStatus>,
    /// The state differs from the file.
    pub dirty: bool,
    /// The version at which a COMPLETE set was requested in this session.
    pub complete_requested: Option<u64>,
    /// The stored assignments are the leader's whole set, confirmed in this session (a COMPLETE
    /// set, then increments without a gap).
    pub confirmed: bool,
    /// The master the last session dialled.
    pub dialled: Option<String>,
    /// The node's overlay, when this agent attaches tasks to networks.
    pub overlay: Option<crate::driver::manager::SharedOverlay>,
    /// How to run an edge router (agents with an overlay), and the router once routes came.
    pub edge_settings: Option<crate::EdgeSettings>,
    pub edge: Option<crate::edge::Edge>,
    /// The parts received so far of a network update sent in parts (`more`), in this session.
    pub net_parts: Option<berth_api::pb::agent::NetworkUpdate>,
    /// A simulated agent's network view (`--simulate-networks`), kept in memory only.
    pub sim_net: Option<SimNet>,
    /// This host's address between hosts (`--advertise-addr`).
    pub underlay: Option<std::net::IpAddr>,
    /// The `--allow-host-path` prefixes, for Hello.
    pub host_paths: Vec<String>,
    /// The driver's volume usage reports.
    pub usage: Option<tokio::sync::watch::Receiver<crate::volume::UsageReport>>,
    /// Volume usage not yet reported to a leader.
    pub volumes_pending: Option<crate::volume::UsageReport>,
}

/// Resolves when the usage report changes (`false`: it never will again); never without one.
async fn usage_changed(rx: &mut Option<tokio::sync::watch::Receiver<crate::volume::UsageReport>>) -> bool {
    match rx {
        Some(rx) => rx.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

/// How long a preferred master (the last or hinted leader) has before the others are dialled
/// too: a dead or frozen one then costs this, not the whole connect timeout.
const PREFER_HEAD_START: Duration = Duration::from_millis(300);

/// Which masters a session dials: `first` at once (the last or hinted leader), the others at
/// once when there is no `first`, else once it has had [`PREFER_HEAD_START`]. The first to
/// connect is used.
struct Dial {
    first: Option<String>,
    others: Vec<String>,
}

/// Connects as `dial` says: the address and connection, or every failure.
async fn connect(
    endpoints: &Endpoints,
    tls: &quinn::ClientConfig,
    dial: &Dial,
) -> Result<(String, quinn::Connection), String> {
    use futures::StreamExt;
    let wait = if dial.first.is_some() { PREFER_HEAD_START } else { Duration::ZERO };
    let delayed = dial.others.iter().filter(|a| dial.first.as_ref() != Some(*a)).map(|a| (a, wait));
    let mut attempts: futures::stream::FuturesUnordered<_> = dial
        .first
        .iter()
        .map(|a| (a, Duration::ZERO))
        .chain(delayed)
        .map(|(a, after)| async move {
            tokio::time::sleep(after).await;
            (a, net::connect(endpoints, tls, a).await)
        })
        .collect();
    let mut failures = Vec::new();
    while let Some((addr, r)) = attempts.next().await {
        match r {
            Ok(c) => return Ok((addr.clone(), c)),
            Err(f) => failures.push(format!("{addr}: {f}")),
        }
    }
    Err(failures.join("; "))
}

type ReadResult = Result<Option<MasterFrame>, FrameError>;
type ReadFuture = Pin<Box<dyn std::future::Future<Output = (FrameReader, ReadResult)> + Send>>;

fn read_next(mut reader: FrameReader) -> ReadFuture {
    Box::pin(async move {
        let r = reader.recv::<MasterFrame>().await;
        (reader, r)
    })
}

/// Where the simulated agents of one process log their endpoints: one JSON line per change,
/// `{"node", "ts_ns", "version", "endpoints": {service: [task ids]}}`.
pub(crate) struct SimNetLog {
    file: std::sync::Mutex<std::io::BufWriter<std::fs::File>>,
}

impl SimNetLog {
    pub fn create(path: &std::path::Path) -> std::io::Result<SimNetLog> {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        Ok(SimNetLog { file: std::sync::Mutex::new(std::io::BufWriter::new(file)) })
    }

    fn write(&self, line: &serde_json::Value) {
        use std::io::Write;
        let mut f = self.file.lock().expect("sim net log lock");
        // A benchmark's evidence: a failed write shows as a missing line, which the reader
        // reports; the agent itself carries on.
        let _ = writeln!(f, "{line}").and_then(|()| f.flush());
    }
}

/// A simulated agent's network view: the leader's updates applied in memory, with no kernel
/// state, and each change of its endpoints logged.
pub(crate) struct SimNet {
    pub log: Arc<SimNetLog>,
    pub view: crate::overlay::node::View,
}

impl SimNet {
    fn endpoints(&self) -> BTreeMap<String, Vec<String>> {
        self.view.services.iter().map(|(k, s)| (k.clone(), s.endpoints.keys().cloned().collect())).collect()
    }

    /// Applies an update; logs the endpoints when they changed.
    fn apply(&mut self, node: &str, u: &berth_api::pb::agent::NetworkUpdate) -> Result<(), crate::overlay::node::Gap> {
        let before = self.endpoints();
        self.view.apply(u)?;
        let after = self.endpoints();
        if after != before {
            let ts_ns = SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
            self.log.write(&serde_json::json!({
                "node": node, "ts_ns": ts_ns as u64, "version": u.version, "endpoints": after,
            }));
        }
        Ok(())
    }
}

/// Collects the parts of a network update sent in parts: `None` while more are to come, the
/// whole update once the last arrives. A part of another update than the one being collected
/// (a new COMPLETE, say) drops the unfinished one: its sender has moved on.
fn merge_parts(
    parts: &mut Option<berth_api::pb::agent::NetworkUpdate>,
    u: berth_api::pb::agent::NetworkUpdate,
) -> Option<berth_api::pb::agent::NetworkUpdate> {
    let merged = match parts.take() {
        Some(mut p) if (p.term, p.kind, p.version, p.base_version) == (u.term, u.kind, u.version, u.base_version) => {
            p.networks.extend(u.networks);
            p.removed_networks.extend(u.removed_networks);
            p.services.extend(u.services);
            p.removed_services.extend(u.removed_services);
            p.more = u.more;
            p
        }
        Some(p) => {
            warn!(version = p.version, "a network update ended unfinished; taking the next one");
            u
        }
        None => u,
    };
    if merged.more {
        *parts = Some(merged);
        None
    } else {
        Some(merged)
    }
}

fn frame(body: agent_frame::Body) -> AgentFrame {
    AgentFrame { body: Some(body) }
}

impl<D: Driver> Agent<D> {
    /// At start-up: reconciles the persisted assignments with what the runtimes hold. Tasks
    /// desired RUNNING are adopted (or started), tasks desired SHUTDOWN are stopped, also when
    /// a stop was cut short by the agent's own restart. Nothing unknown is removed until the
    /// leader confirms the whole set.
    pub async fn recover(&mut self) {
        if !self.state.assignments.is_empty() {
            info!(tasks = self.state.assignments.len(), "reconciling the persisted assignments");
        }
        self.reconcile(false).await;
    }

    /// Level-triggered: hands the driver the whole desired set (see [`Driver::reconcile`]).
    /// `complete`: the set is the leader's, confirmed in this session.
    async fn reconcile(&mut self, complete: bool) {
        self.drain();
        let desired: Vec<Assignment> = self.state.assignments.iter().map(|(id, a)| a.to_pb(id)).collect();
        let ended: std::collections::BTreeSet<String> =
            self.state.statuses.iter().filter(|(_, s)| s.is_terminal()).map(|(id, _)| id.clone()).collect();
        self.driver.reconcile(&desired, &ended, complete).await;
    }

    /// Sessions until shutdown. Never stops tasks because a session ended.
    pub async fn run(mut self, shutdown: &CancellationToken) -> Result<(), AgentError> {
        let mut backoff = Backoff::default();
        let mut next = self.state.last_leader.clone();
        let mut hops = 0usize;
        // The `--join` addresses are dialled too only when none of the masters the cluster told
        // us about answered: a removed master is forgotten with the list that no longer has it.
        let mut with_fallback = false;
        while !shutdown.is_cancelled() {
            let targets = self.targets(with_fallback);
            if targets.is_empty() {
                return Err(AgentError::NoMasters);
            }
            // The last or hinted leader first; every other known master too after a short head
            // start (or at once when there is no such leader); the first to answer wins (a
            // follower then points at the leader). One at a time, an agent once took 27 s to get
            // past masters that were down or removed.
            let dial = Dial { first: next.take(), others: targets.clone() };
            let end = self.session(dial, shutdown, &mut backoff).await;
            let addr = self.dialled.take().unwrap_or_else(|| targets.join(","));
            let pause = match end {
                SessionEnd::Shutdown => break,
                SessionEnd::Refused { reason } => {
                    error!(master = %addr, "the master refused this node: {reason}");
                    self.drain();
                    if self.dirty {
                        self.persist().await.ok();
                    }
                    return Err(AgentError::Refused { dir: self.dir.clone(), reason });
                }
                SessionEnd::Redirect { leader } | SessionEnd::NotLeader { hint: leader } => {
                    // Masters that keep pointing at each other (an election in progress) get a
                    // pause every few hops.
                    hops += 1;
                    let tired = hops > targets.len() + 2;
                    if tired {
                        hops = 0;
                    }
                    match leader {
                        Some(l) => {
                            debug!(master = %addr, leader = %l, "not the leader; trying the leader");
                            next = Some(l);
                            tired.then(|| backoff.next())
                        }
                        None => {
                            debug!(master = %addr, "not the leader, leader unknown; trying the next master");
                            Some(backoff.next())
                        }
                    }
                }
                SessionEnd::Lost { accepted, reason } => {
                    if accepted {
                        hops = 0;
                        with_fallback = false;
                        warn!(master = %addr, "session ended: {reason}");
                        // Straight back to all the masters: a new leader is elected meanwhile.
                        Some(Duration::from_millis(50))
                    } else {
                        info!(master = %addr, "cannot open a session: {reason}");
                        with_fallback = !with_fallback || self.state.masters.is_empty();
                        Some(backoff.next())
                    }
                }
            };
            if let Some(p) = pause
                && !self.pause(p, shutdown).await
            {
                break;
            }
        }
        self.drain();
        if self.dirty {
            self.persist().await.ok();
        }
        Ok(())
    }

    /// The masters to dial: what the cluster said, and with `fallback` (or when the cluster
    /// said nothing yet) the `--join` addresses too.
    fn targets(&self, fallback: bool) -> Vec<String> {
        let mut t = self.state.masters.clone();
        if fallback || t.is_empty() {
            for a in &self.fallback {
                if !t.contains(a) {
                    t.push(a.clone());
                }
            }
        }
        t
    }

    /// Waits `d` (false on shutdown), absorbing driver reports meanwhile.
    async fn pause(&mut self, d: Duration, shutdown: &CancellationToken) -> bool {
        let sleep = tokio::time::sleep(d);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = &mut sleep => break,
                s = self.statuses.recv(), if self.statuses_open => match s {
                    Some(s) => self.absorb(s),
                    None => self.statuses_open = false,
                },
            }
        }
        if self.dirty
            && let Err(e) = self.persist().await
        {
            error!("cannot persist the agent state: {e}");
        }
        true
    }

    /// Takes every report already queued by the driver.
    fn drain(&mut self) {
        while let Ok(s) = self.statuses.try_recv() {
            self.absorb(s);
        }
    }

    fn absorb(&mut self, mut s: TaskStatus) {
        if s.task_id.is_empty() {
            return;
        }
        if s.timestamp_ms == 0 {
            s.timestamp_ms = now_ms();
        }
        let stored = StoredStatus::from_pb(&s);
        if self.state.statuses.get(&s.task_id) == Some(&stored) {
            return;
        }
        self.state.statuses.insert(s.task_id.clone(), stored);
        self.dirty = true;
        self.pending.insert(s.task_id.clone(), s);
        self.count_tasks();
    }

    /// The metrics' task counts, when an endpoint serves them (simulated agents serve none).
    fn count_tasks(&self) {
        if crate::metrics::enabled() {
            crate::metrics::METRICS.set_tasks(self.state.statuses.values().map(|s| s.state));
        }
    }

    async fn persist(&mut self) -> Result<(), AgentError> {
        self.state.save_async(&self.dir).await?;
        self.dirty = false;
        Ok(())
    }

    /// Drops the statuses of tasks no longer assigned once they are final and were reported.
    fn prune(&mut self, reported: impl IntoIterator<Item = String>) {
        for id in reported {
            let done = !self.state.assignments.contains_key(&id)
                && self.state.statuses.get(&id).is_some_and(StoredStatus::is_terminal);
            if done {
                self.state.statuses.remove(&id);
                self.dirty = true;
            }
        }
    }

    fn hello(&mut self) -> Hello {
        self.drain();
        self.pending.clear(); // Hello carries every task's state.
        let mut tasks: BTreeMap<&String, TaskStatus> =
            self.state.statuses.iter().map(|(id, s)| (id, s.to_pb(id))).collect();
        for id in self.state.assignments.keys() {
            tasks.entry(id).or_insert_with(|| TaskStatus {
                task_id: id.clone(),
                state: TaskState::Assigned as i32,
                ..Default::default()
            });
        }
        Hello {
            node_id: self.state.node_id.clone(),
            highest_term: self.state.highest_term,
            assignments_version: self.state.assignments_version,
            tasks: tasks.into_values().collect(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            resources: Some(self.resources),
            networks: self.overlay.is_some() || self.sim_net.is_some(),
            underlay: self.underlay.map(|a| a.to_string()).unwrap_or_default(),
            host_paths: self.host_paths.clone(),
            edge: self.edge_settings.as_ref().is_some_and(|e| e.enabled),
        }
    }

    async fn session(&mut self, dial: Dial, shutdown: &CancellationToken, backoff: &mut Backoff) -> SessionEnd {
        self.dialled = None;
        let gate = self.gate.clone();
        let permit = match &gate {
            Some(g) => tokio::select! {
                _ = shutdown.cancelled() => return SessionEnd::Shutdown,
                p = g.acquire() => Some(p.expect("the connect gate is never closed")),
            },
            None => None,
        };
        let connected = tokio::select! {
            _ = shutdown.cancelled() => return SessionEnd::Shutdown,
            c = connect(&self.endpoints, &self.tls, &dial) => c,
        };
        let (addr, conn) = match connected {
            Ok(pair) => pair,
            Err(e) => return SessionEnd::lost(e),
        };
        self.dialled = Some(addr.clone());
        let addr = addr.as_str();
        let end = self.converse(&conn, addr, permit, shutdown, backoff).await;
        if conn.close_reason().is_none() {
            match &end {
                SessionEnd::Shutdown => conn.close(close::SHUTDOWN, b"agent shutting down"),
                _ => conn.close(close::NO_ERROR, b"session over"),
            }
        }
        end
    }

    async fn converse(
        &mut self,
        conn: &quinn::Connection,
        addr: &str,
        permit: Option<tokio::sync::SemaphorePermit<'_>>,
        shutdown: &CancellationToken,
        backoff: &mut Backoff,
    ) -> SessionEnd {
        let (send, recv) = match conn.open_bi().await {
            Ok(s) => s,
            Err(e) => return SessionEnd::from_close(close::classify(&e)),
        };
        let mut writer = FrameWriter::new(send);
        let mut reader = FrameReader::new(recv);
        let hello = self.hello();
        if let Err(e) = writer.send(&frame(agent_frame::Body::Hello(hello))).await {
            return SessionEnd::from_frame_error(e, conn);
        }
        // With mTLS the handshake can "succeed" on the client before the master checked our
        // certificate: the first answer is the real authentication point.
        let first = tokio::select! {
            _ = shutdown.cancelled() => return SessionEnd::Shutdown,
            r = tokio::time::timeout(HELLO_TIMEOUT, reader.recv::<MasterFrame>()) => r,
        };
        drop(permit);
        let first = match first {
            Err(_) => return SessionEnd::lost(format!("{addr} did not answer Hello within {HELLO_TIMEOUT:?}")),
            Ok(Err(e)) => return SessionEnd::from_frame_error(e, conn),
            Ok(Ok(None)) => return SessionEnd::lost(format!("{addr} ended the stream without answering Hello")),
            Ok(Ok(Some(f))) => f,
        };
        let accepted = match first.body {
            Some(master_frame::Body::Redirect(r)) => {
                if !r.masters.is_empty() && r.masters != self.state.masters {
                    self.state.masters = r.masters;
                    self.dirty = true;
                    if let Err(e) = self.persist().await {
                        error!("cannot persist the agent state: {e}");
                    }
                }
                conn.close(close::NO_ERROR, b"redirected");
                let leader = r.leader.trim();
                return SessionEnd::Redirect { leader: (!leader.is_empty()).then(|| leader.to_string()) };
            }
            Some(master_frame::Body::Accepted(a)) => a,
            other => {
                let what = other.as_ref().map(body_name).unwrap_or("an empty frame");
                let reason = format!("expected Redirect or Accepted, got {what}");
                conn.close(close::MALFORMED_FRAME, reason.as_bytes());
                return SessionEnd::lost(reason);
            }
        };
        if let Err(end) = self.accept(conn, addr, &accepted).await {
            return end;
        }
        backoff.reset();
        // Images the cluster holds are fetched over this connection while it lasts.
        let images = self.driver.cluster_images();
        if let Some(images) = &images {
            images.set_connection(Some(conn.clone()));
        }
        crate::metrics::METRICS.set_session(true);
        let end = self.established(conn, addr, &accepted, writer, reader, shutdown).await;
        crate::metrics::METRICS.set_session(false);
        if let Some(images) = &images {
            images.set_connection(None);
        }
        match end {
            SessionEnd::Lost { reason, .. } => SessionEnd::Lost { accepted: true, reason },
            other => other,
        }
    }

    /// Fencing and bookkeeping for an Accepted answer.
    async fn accept(&mut self, conn: &quinn::Connection, addr: &str, a: &Accepted) -> Result<(), SessionEnd> {
        let master = berth_channel::peer_identity(conn).and_then(|i| i.master_id());
        // Removals are permanent (an id is never reused): learned from any master.
        let learned = a.removed_masters.iter().any(|id| self.state.removed_masters.insert(*id));
        if let Some(id) = master
            && self.state.removed_masters.contains(&id)
        {
            let reason = format!("master {id} was removed from the cluster");
            warn!(master = %addr, "refusing the session: {reason}");
            conn.close(close::FENCED, reason.as_bytes());
            if learned {
                self.persist().await.ok();
            }
            return Err(SessionEnd::lost(reason));
        }
        if a.term < self.state.highest_term {
            // A term given by a master since removed proves nothing (a removed or rogue master
            // can claim any term, even u64::MAX): it is dropped, not obeyed.
            match self.state.highest_term_from {
                Some(from) if self.state.removed_masters.contains(&from) => {
                    warn!(
                        master = %addr,
                        term = a.term,
                        dropped = self.state.highest_term,
                        "dropping the term master {from} gave: it was removed from the cluster"
                    );
                }
                _ => {
                    let reason =
                        format!("leader term {} is older than term {} already seen", a.term, self.state.highest_term);
                    warn!(master = %addr, "refusing the session: {reason}");
                    conn.close(close::FENCED, reason.as_bytes());
                    if learned {
                        self.persist().await.ok();
                    }
                    return Err(SessionEnd::lost(reason));
                }
            }
        }
        if let Some(list) = &a.revoked {
            self.learn_revoked(list);
            if let Err(why) = self.master_revoked(conn) {
                warn!(master = %addr, "refusing the session: {why}");
                conn.close(close::FENCED, why.as_bytes());
                self.persist().await.ok();
                return Err(SessionEnd::lost(why));
            }
        }
        self.state.highest_term = a.term;
        self.state.highest_term_from = master;
        if !a.masters.is_empty() {
            self.state.masters = a.masters.clone();
        }
        self.state.last_leader = Some(addr.to_string());
        self.complete_requested = None;
        self.confirmed = false;
        self.net_parts = None;
        // Hello carried every final state: those of unassigned tasks can go.
        let known: Vec<String> = self.state.statuses.keys().cloned().collect();
        self.prune(known);
        if let Err(e) = self.persist().await {
            error!("cannot persist the agent state: {e}");
            return Err(SessionEnd::lost(format!("cannot persist the agent state: {e}")));
        }
        info!(master = %addr, term = a.term, "session accepted");
        Ok(())
    }

    async fn established(
        &mut self,
        conn: &quinn::Connection,
        addr: &str,
        accepted: &Accepted,
        mut writer: FrameWriter,
        reader: FrameReader,
        shutdown: &CancellationToken,
    ) -> SessionEnd {
        let period = match accepted.heartbeat_interval_ms {
            0 => DEFAULT_HEARTBEAT,
            ms => Duration::from_millis(ms.clamp(50, 60_000)),
        };
        // The leader acks every heartbeat: three periods of silence mean it is gone (kill -9 sends
        // no close), and waiting for the QUIC idle timeout would keep the node away from the new
        // leader for 10 s.
        let silence_limit = (period * 3).max(std::time::Duration::from_secs(2));
        let mut heartbeat = tokio::time::interval(period);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut flush = tokio::time::interval(STATUS_FLUSH);
        flush.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut resync = tokio::time::interval_at(Instant::now() + RECONCILE_INTERVAL, RECONCILE_INTERVAL);
        resync.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut seq = 0u64;
        let mut last_heard = Instant::now();
        let mut read = read_next(reader);
        self.renewing = None;
        // Each session starts with the latest volume usage, then every change of it.
        let mut usage = self.usage.clone();
        if let Some(rx) = usage.as_mut() {
            self.volumes_pending = Some(rx.borrow_and_update().clone());
        }
        let renew = tokio::time::sleep_until(instant_of(self.renew_at));
        tokio::pin!(renew);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    conn.close(close::SHUTDOWN, b"agent shutting down");
                    return SessionEnd::Shutdown;
                }
                (reader, result) = &mut read => {
                    read = read_next(reader);
                    let frame = match result {
                        Ok(Some(f)) => f,
                        Ok(None) => return SessionEnd::lost(format!("{addr} ended the session stream")),
                        Err(e) => return SessionEnd::from_frame_error(e, conn),
                    };
                    last_heard = Instant::now();
                    self.driver.leader_contact();
                    let renewed = matches!(frame.body, Some(master_frame::Body::Renewed(_)));
                    let renew_at = self.renew_at;
                    if let Err(end) = self.on_frame(frame, &mut writer, conn).await {
                        return end;
                    }
                    if (renewed || self.renew_at != renew_at) && self.renewing.is_none() {
                        renew.as_mut().reset(instant_of(self.renew_at));
                    }
                }
                stream = conn.accept_bi() => {
                    if let Ok((send, recv)) = stream {
                        match self.driver.log_source() {
                            Some(src) => { tokio::spawn(serve_logs(src, send, recv)); }
                            None => {
                                let mut w = FrameWriter::new(send);
                                tokio::spawn(async move {
                                    let chunk = LogChunk { lines: vec![], end: true, error: "this agent keeps no logs".into() };
                                    let _ = w.send(&frame(agent_frame::Body::LogChunk(chunk))).await;
                                    let _ = w.get_mut().finish();
                                });
                            }
                        }
                    }
                }
                _ = &mut renew => {
                    renew.as_mut().reset(Instant::now() + RENEW_RETRY);
                    if let Err(end) = self.request_renewal(&mut writer, conn).await {
                        return end;
                    }
                }
                _ = heartbeat.tick() => {
                    if last_heard.elapsed() > silence_limit {
                        let reason = format!("nothing heard from {addr} for {:?}", last_heard.elapsed());
                        conn.close(close::NO_ERROR, reason.as_bytes());
                        return SessionEnd::lost(reason);
                    }
                    seq += 1;
                    let (ca_digest, cert_ca_digest) = self.ca_report.clone();
                    let hb = Heartbeat { seq, ca_digest, cert_ca_digest };
                    if let Err(e) = writer.send(&frame(agent_frame::Body::Heartbeat(hb))).await {
                        return SessionEnd::from_frame_error(e, conn);
                    }
                }
                s = self.statuses.recv(), if self.statuses_open => match s {
                    Some(s) => self.absorb(s),
                    None => self.statuses_open = false,
                },
                open = usage_changed(&mut usage) => {
                    match usage.as_mut() {
                        Some(rx) if open => self.volumes_pending = Some(rx.borrow_and_update().clone()),
                        _ => usage = None,
                    }
                }
                _ = flush.tick() => {
                    if let Err(end) = self.flush(&mut writer, conn).await {
                        return end;
                    }
                }
                _ = resync.tick() => {
                    if self.confirmed && self.complete_requested.is_none() {
                        self.reconcile(true).await;
                    }
                }
            }
        }
    }

    /// Sends the batched status changes as one StatusReport (after persisting them).
    async fn flush(&mut self, writer: &mut FrameWriter, conn: &quinn::Connection) -> Result<(), SessionEnd> {
        self.drain();
        let volumes = self.volumes_pending.take().map(|v| v.to_vec()).unwrap_or_default();
        if self.pending.is_empty() && volumes.is_empty() {
            return Ok(());
        }
        if self.dirty
            && let Err(e) = self.persist().await
        {
            error!("cannot persist the agent state: {e}");
            return Err(SessionEnd::lost(format!("cannot persist the agent state: {e}")));
        }
        let tasks: Vec<TaskStatus> = std::mem::take(&mut self.pending).into_values().collect();
        let ids: Vec<String> = tasks.iter().map(|t| t.task_id.clone()).collect();
        debug!(tasks = tasks.len(), volumes = volumes.len(), "reporting task statuses and volume usage");
        if let Err(e) = writer.send(&frame(agent_frame::Body::Status(StatusReport { tasks, volumes }))).await {
            return Err(SessionEnd::from_frame_error(e, conn));
        }
        crate::metrics::METRICS.status_reports.inc_by(ids.len() as u64);
        self.prune(ids);
        self.count_tasks();
        Ok(())
    }

    async fn on_frame(
        &mut self,
        frame_in: MasterFrame,
        writer: &mut FrameWriter,
        conn: &quinn::Connection,
    ) -> Result<(), SessionEnd> {
        match frame_in.body {
            Some(master_frame::Body::HeartbeatAck(ack)) => {
                let master = berth_channel::peer_identity(conn).and_then(|i| i.master_id());
                if ack.removed_masters.iter().any(|id| self.state.removed_masters.insert(*id)) {
                    self.dirty = true;
                }
                if let Some(id) = master
                    && self.state.removed_masters.contains(&id)
                {
                    let reason = format!("master {id} was removed from the cluster");
                    conn.close(close::FENCED, reason.as_bytes());
                    return Err(SessionEnd::lost(reason));
                }
                if ack.term > self.state.highest_term {
                    self.state.highest_term = ack.term;
                    self.state.highest_term_from = master;
                    self.dirty = true;
                } else if ack.term < self.state.highest_term && ack.term != 0 {
                    debug!(term = ack.term, highest = self.state.highest_term, "heartbeat ack from an older term");
                }
                if let Some(list) = &ack.revoked {
                    self.learn_revoked(list);
                    if let Err(why) = self.master_revoked(conn) {
                        conn.close(close::FENCED, why.as_bytes());
                        return Err(SessionEnd::lost(why));
                    }
                }
                if !ack.ca_pem.is_empty() {
                    self.take_ca(ack.ca_pem).await;
                }
                if ack.renew && self.renewing.is_none() && self.renew_at > SystemTime::now() {
                    info!("the masters sign with a new CA: renewing the node certificate onto it");
                    self.renew_at = SystemTime::now();
                }
                Ok(())
            }
            Some(master_frame::Body::Assignments(a)) => self.on_assignments(a, writer, conn).await,
            Some(master_frame::Body::NetworkUpdate(u)) => {
                self.on_network_update(u, writer).await;
                Ok(())
            }
            Some(master_frame::Body::EdgeUpdate(u)) => {
                self.on_edge_update(u).await;
                Ok(())
            }
            Some(master_frame::Body::Renewed(r)) => {
                self.on_renewed(r).await;
                Ok(())
            }
            Some(other) => {
                warn!("ignoring an unexpected {} frame in an established session", body_name(&other));
                Ok(())
            }
            None => {
                debug!("ignoring a frame of a kind this agent does not know");
                Ok(())
            }
        }
    }

    /// Applies the leader's network view; a gap in versions asks for a COMPLETE one. The data
    /// plane keeps what it has when an update cannot be applied.
    async fn on_network_update(&mut self, u: berth_api::pb::agent::NetworkUpdate, writer: &mut FrameWriter) {
        if u.term < self.state.highest_term {
            debug!(term = u.term, "ignoring a network update from an older term");
            return;
        }
        if self.overlay.is_none() && self.sim_net.is_none() {
            debug!("ignoring a network update: this agent attaches no networks");
            return;
        }
        let Some(u) = merge_parts(&mut self.net_parts, u) else { return };
        let applied = match (&self.overlay, self.sim_net.as_mut()) {
            (Some(overlay), _) => overlay.lock().await.update(&u).await,
            (None, Some(sim)) => Ok(sim.apply(&self.state.name, &u)),
            (None, None) => return,
        };
        match applied {
            Ok(Ok(())) => {
                if let (Some(edge), Some(overlay)) = (self.edge.as_mut(), &self.overlay) {
                    edge.set_view(overlay.lock().await.view());
                }
            }
            Ok(Err(gap)) => {
                debug!(have = gap.have, base = gap.base, "network update gap: asking for a complete one");
                let request = frame(agent_frame::Body::RequestComplete(RequestComplete {
                    have_version: gap.have,
                    networks: true,
                }));
                if let Err(e) = writer.send(&request).await {
                    warn!("asking for the complete network view failed: {e}");
                }
            }
            Err(e) => warn!("applying the network update failed (the data plane keeps what it had): {e}"),
        }
    }

    /// The leader's routes: the edge router starts with the first ones, and is reconfigured
    /// with every update after.
    async fn on_edge_update(&mut self, u: berth_api::pb::agent::EdgeUpdate) {
        if u.term < self.state.highest_term {
            debug!(term = u.term, "ignoring an edge update from an older term");
            return;
        }
        let (Some(settings), Some(overlay)) = (&self.edge_settings, &self.overlay) else {
            debug!("ignoring an edge update: this agent attaches no networks, so it cannot route");
            return;
        };
        if self.edge.is_none() {
            if u.routes.is_empty() && u.edges.is_empty() {
                return;
            }
            let dns = settings.apps_domain.as_ref().and(settings.dns.or_else(|| self.underlay.map(|a| (a, 53).into())));
            let cfg = crate::edge::EdgeConfig {
                state_dir: self.dir.join("edge"),
                run_dir: std::path::PathBuf::from("/run/berth").join(&self.state.node_id).join("edge"),
                http: settings.http,
                https: settings.https,
                haproxy: settings.haproxy.clone(),
                apps_domain: settings.apps_domain.clone(),
                dns,
            };
            match crate::edge::Edge::start(cfg).await {
                Ok(e) => self.edge = Some(e),
                Err(e) => {
                    warn!("the edge router cannot start: {e}");
                    return;
                }
            }
        }
        if let Some(edge) = self.edge.as_mut() {
            edge.set_view(overlay.lock().await.view());
            edge.set_routes(&u);
        }
    }

    async fn on_assignments(
        &mut self,
        a: Assignments,
        writer: &mut FrameWriter,
        conn: &quinn::Connection,
    ) -> Result<(), SessionEnd> {
        if a.term < self.state.highest_term {
            warn!(
                term = a.term,
                highest = self.state.highest_term,
                version = a.version,
                "refusing assignments from an older leader term"
            );
            return Ok(());
        }
        if a.term > self.state.highest_term {
            self.state.highest_term = a.term;
            self.state.highest_term_from = berth_channel::peer_identity(conn).and_then(|i| i.master_id());
            self.dirty = true;
        }
        let mut stopped: Vec<String> = Vec::new();
        let mut changed: Vec<Assignment> = Vec::new();
        match AssignmentsKind::try_from(a.kind) {
            Ok(AssignmentsKind::Complete) => {
                let mut set = BTreeMap::new();
                let images = self.driver.cluster_images();
                if let Some(images) = &images {
                    images.retain(&a.updated.iter().map(|u| u.task_id.as_str()).collect());
                }
                for u in &a.updated {
                    // Secret and config contents stay in the driver's memory, never in the state.
                    self.driver.task_files(&u.task_id, &u.files);
                    if let Some(images) = &images {
                        images.remember(&u.task_id, u.image.as_ref());
                    }
                    set.insert(u.task_id.clone(), StoredAssignment::from_pb(u));
                }
                self.state.assignments = set;
                self.state.assignments_version = a.version;
                self.complete_requested = None;
                self.confirmed = true;
                debug!(version = a.version, tasks = self.state.assignments.len(), "complete assignment set");
                self.dirty = true;
                // Durable before anything is acted on or reported.
                self.persist_or_end().await?;
                // Not "what changed" but "what differs": the desired set against what runs.
                self.reconcile(true).await;
                return Ok(());
            }
            Ok(AssignmentsKind::Incremental) => {
                let have = self.state.assignments_version;
                if a.base_version != have {
                    self.confirmed = false;
                    if self.complete_requested != Some(have) {
                        info!(
                            have,
                            base = a.base_version,
                            version = a.version,
                            "assignment gap: asking for a complete set"
                        );
                        let request = frame(agent_frame::Body::RequestComplete(RequestComplete {
                            have_version: have,
                            networks: false,
                        }));
                        if let Err(e) = writer.send(&request).await {
                            return Err(SessionEnd::from_frame_error(e, conn));
                        }
                        self.complete_requested = Some(have);
                    }
                    if self.dirty {
                        self.persist_or_end().await?;
                    }
                    return Ok(());
                }
                let images = self.driver.cluster_images();
                for u in &a.updated {
                    self.driver.task_files(&u.task_id, &u.files);
                    if let Some(images) = &images {
                        images.remember(&u.task_id, u.image.as_ref());
                    }
                    let new = StoredAssignment::from_pb(u);
                    if self.state.assignments.get(&u.task_id) != Some(&new) {
                        changed.push(u.clone());
                        self.state.assignments.insert(u.task_id.clone(), new);
                    }
                }
                for id in &a.removed {
                    if self.state.assignments.remove(id).is_some() {
                        stopped.push(id.clone());
                    }
                }
                self.state.assignments_version = a.version;
                debug!(version = a.version, updated = a.updated.len(), removed = a.removed.len(), "assignment changes");
            }
            _ => {
                warn!(kind = a.kind, "ignoring assignments of an unknown kind");
                return Ok(());
            }
        }
        self.dirty = true;
        // Durable before anything is acted on or reported.
        self.persist_or_end().await?;
        for id in &stopped {
            self.driver.forget(id).await;
        }
        for a in &changed {
            if a.desired_state == TaskState::Running as i32 {
                self.driver.start(a).await;
            } else {
                self.driver.stop(&a.task_id).await;
            }
        }
        Ok(())
    }

    /// Keeps the revocation list the masters sent (in memory, for handshakes, and in the state).
    fn learn_revoked(&mut self, list: &berth_api::pb::agent::Revocations) {
        let fresh = crate::certs::Revoked::from_masters(list);
        let mut held = self.revoked.write().expect("revoked lock");
        if *held != fresh {
            self.state.revoked_serials = fresh.serials.clone();
            self.state.revoked_identities = fresh.identities.clone();
            *held = fresh;
            self.dirty = true;
        }
    }

    /// Whether the master of `conn` presented a certificate revoked since the handshake.
    fn master_revoked(&self, conn: &quinn::Connection) -> Result<(), String> {
        let Some(info) = berth_channel::peer_certificate(conn).and_then(|der| berth_pki::cert_info_of_der(&der).ok())
        else {
            return Ok(());
        };
        self.revoked.read().expect("revoked lock").check(&info)
    }

    /// Trusts the CAs the masters sent (a CA rotation adds one, then retires the old one): new
    /// connections use them.
    async fn take_ca(&mut self, ca_pem: String) {
        let new = TlsFiles::new(ca_pem, self.files.cert.clone());
        let tls = match crate::certs::client_config(&new, &self.revoked) {
            Ok(tls) => tls,
            Err(e) => return error!("refusing the CA certificates the masters sent: {e}"),
        };
        let dir = self.dir.clone();
        let pem = new.ca_pem.clone();
        match tokio::task::spawn_blocking(move || crate::certs::replace_ca(&dir, &pem)).await {
            Ok(Ok(())) => {
                self.ca_report = crate::certs::ca_report(&new);
                self.files = new;
                self.tls = tls;
            }
            Ok(Err(e)) => error!("cannot store the CA certificates the masters sent: {e}"),
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    /// Sends RenewCertificate with a CSR for a fresh key.
    async fn request_renewal(&mut self, writer: &mut FrameWriter, conn: &quinn::Connection) -> Result<(), SessionEnd> {
        let (csr_pem, key_pem) = match berth_pki::generate_csr(&self.state.name) {
            Ok(pair) => pair,
            Err(e) => {
                error!("cannot create a certificate signing request for the renewal: {e}");
                return Ok(());
            }
        };
        info!("asking the leader to renew the node certificate");
        let request = frame(agent_frame::Body::Renew(RenewCertificate { csr_pem }));
        if let Err(e) = writer.send(&request).await {
            return Err(SessionEnd::from_frame_error(e, conn));
        }
        self.renewing = Some(key_pem);
        Ok(())
    }

    /// Checks and keeps a renewed certificate; later connections use it.
    async fn on_renewed(&mut self, r: CertificateRenewed) {
        let Some(key_pem) = self.renewing.take() else {
            warn!("ignoring a CertificateRenewed this agent did not ask for");
            return;
        };
        let ca_pem = if r.ca_pem.trim().is_empty() { self.files.ca_pem.clone() } else { r.ca_pem };
        let new = TlsFiles::new(ca_pem, CertifiedKey::new(r.cert_pem, key_pem));
        let checked = new
            .cert
            .identity()
            .map_err(AgentError::from)
            .and_then(|identity| {
                if identity == berth_pki::Identity::agent(&self.state.node_id) {
                    Ok(())
                } else {
                    Err(AgentError::CorruptState {
                        path: self.dir.join(crate::state::CERT_FILE),
                        reason: format!("the renewed certificate is for {identity}, not for this node"),
                    })
                }
            })
            .and_then(|()| crate::certs::client_config(&new, &self.revoked));
        let tls = match checked {
            Ok(tls) => tls,
            Err(e) => {
                error!("refusing the renewed certificate: {e}");
                self.renew_at = SystemTime::now() + RENEW_RETRY;
                return;
            }
        };
        let dir = self.dir.clone();
        let (old, fresh) = (self.files.clone(), new.clone());
        let written = tokio::task::spawn_blocking(move || crate::certs::replace(&dir, &old, &fresh)).await;
        match written {
            Ok(Ok(())) => {
                self.renew_at = crate::certs::renew_at(&new);
                self.ca_report = crate::certs::ca_report(&new);
                self.files = new;
                self.tls = tls;
            }
            Ok(Err(e)) => {
                error!("cannot store the renewed certificate: {e}");
                self.renew_at = SystemTime::now() + RENEW_RETRY;
            }
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }

    async fn persist_or_end(&mut self) -> Result<(), SessionEnd> {
        self.persist().await.map_err(|e| {
            error!("cannot persist the agent state: {e}");
            SessionEnd::lost(format!("cannot persist the agent state: {e}"))
        })
    }
}

/// Answers one log stream the leader opened: a LogsQuery in, LogChunk frames out.
async fn serve_logs(
    src: std::sync::Arc<dyn crate::driver::LogSource>,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
) {
    use futures::StreamExt;
    let mut writer = FrameWriter::new(send);
    let mut reader = FrameReader::new(recv);
    let q = match tokio::time::timeout(Duration::from_secs(10), reader.recv::<MasterFrame>()).await {
        Ok(Ok(Some(MasterFrame { body: Some(master_frame::Body::Logs(q)) }))) => q,
        _ => return,
    };
    let query = crate::driver::LogQuery {
        tail: (q.tail > 0).then_some(q.tail as usize),
        since_ms: (q.since_ms > 0).then_some(q.since_ms),
        follow: q.follow,
    };
    let mut lines = match src.logs(q.task_id.clone(), query).await {
        Ok(l) => l,
        Err(e) => {
            let chunk = LogChunk { lines: vec![], end: true, error: e };
            let _ = writer.send(&frame(agent_frame::Body::LogChunk(chunk))).await;
            let _ = writer.get_mut().finish();
            return;
        }
    };
    let mut batch = Vec::new();
    loop {
        // Gather what is ready (up to 500 lines), then send it as one chunk.
        let next = if batch.is_empty() {
            lines.next().await
        } else {
            match tokio::time::timeout(Duration::from_millis(20), lines.next()).await {
                Ok(n) => n,
                Err(_) => {
                    let chunk = LogChunk { lines: std::mem::take(&mut batch), end: false, error: String::new() };
                    if writer.send(&frame(agent_frame::Body::LogChunk(chunk))).await.is_err() {
                        return;
                    }
                    continue;
                }
            }
        };
        match next {
            Some(l) => {
                let stream = match l.stream {
                    crate::driver::LogStream::Stdout => "stdout",
                    crate::driver::LogStream::Stderr => "stderr",
                };
                batch.push(berth_api::pb::agent::LogLine { ts_ms: l.ts_ms, stream: stream.into(), line: l.line });
                if batch.len() >= 500 {
                    let chunk = LogChunk { lines: std::mem::take(&mut batch), end: false, error: String::new() };
                    if writer.send(&frame(agent_frame::Body::LogChunk(chunk))).await.is_err() {
                        return;
                    }
                }
            }
            None => {
                let chunk = LogChunk { lines: batch, end: true, error: String::new() };
                let _ = writer.send(&frame(agent_frame::Body::LogChunk(chunk))).await;
                let _ = writer.get_mut().finish();
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use berth_api::pb::agent::{AssignmentsKind, NetworkUpdate, ServiceEndpoints};

    use super::merge_parts;

    fn part(version: u64, services: &[&str], more: bool) -> NetworkUpdate {
        NetworkUpdate {
            term: 2,
            kind: AssignmentsKind::Complete as i32,
            version,
            services: services.iter().map(|k| ServiceEndpoints { key: k.to_string(), ..Default::default() }).collect(),
            more,
            ..Default::default()
        }
    }

    fn keys(u: &NetworkUpdate) -> Vec<&str> {
        u.services.iter().map(|s| s.key.as_str()).collect()
    }

    #[test]
    fn parts_are_applied_as_one_update_once_the_last_arrives() {
        let mut parts = None;
        // A whole update passes straight through.
        assert_eq!(merge_parts(&mut parts, part(1, &["a"], false)).map(|u| keys(&u).len()), Some(1));
        assert!(merge_parts(&mut parts, part(2, &["a", "b"], true)).is_none());
        assert!(merge_parts(&mut parts, part(2, &["c"], true)).is_none());
        let whole = merge_parts(&mut parts, part(2, &["d"], false)).expect("the last part completes it");
        assert_eq!(keys(&whole), ["a", "b", "c", "d"]);
        assert!(!whole.more);
        assert!(parts.is_none());
        // An unfinished update is dropped for the next one.
        assert!(merge_parts(&mut parts, part(3, &["x"], true)).is_none());
        let next = merge_parts(&mut parts, part(4, &["y"], false)).expect("a whole update");
        assert_eq!((next.version, keys(&next)), (4, vec!["y"]));
    }
}
