//! A running master: startup, the shared context of the services, leader tasks and shutdown.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use berth_api::pb::{self, raft::LocalStatusResponse};
use berth_store::{KvReader, Raft, TypeConfig};
use berth_types::{Command, CommandError, CommandResult, Limits};
use openraft::{BasicNode, Config, ServerState, SnapshotPolicy, async_runtime::WatchReceiver};
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tracing::{error, info, warn};

use crate::{
    MasterConfig, MasterError,
    identity::Identity,
    network::{ClusterIdCell, NetworkFactory, Peers},
    proposer::{CmdResult, Proposer},
    tls::MasterPki,
};

/// How long a leader waits for a proposal to commit before telling the client it could not.
pub(crate) const COMMIT_TIMEOUT: Duration = Duration::from_secs(10);

/// What every service of a master shares.
pub(crate) struct Ctx {
    pub id: u64,
    pub raft: Raft,
    pub reader: KvReader,
    pub peers: Arc<Peers>,
    pub proposer: Proposer,
    pub limits: Limits,
    pub election_timeout: Duration,
    pub heartbeat_interval: Duration,
    /// When this master last heard from a leader (see `route`).
    pub leader_contact: crate::route::LeaderContact,
    pub data_dir: std::path::PathBuf,
    /// Membership changes are serialized, one at a time.
    pub membership_lock: tokio::sync::Mutex<()>,
    removed: Mutex<BTreeSet<u64>>,
    pub pki: Arc<MasterPki>,
    pub liveness: crate::dispatcher::Liveness,
    pub assignments: crate::assign::Assignments,
    pub statuses: crate::assign::Statuses,
    /// Every node's networks and the endpoints of the services on them (leader only).
    pub endpoints: crate::endpoints::Endpoints,
    pub cert_validity: Duration,
    pub node_down_grace: Duration,
    pub agent_heartbeat_interval: Duration,
    /// The agents' QUIC endpoint, so a renewed certificate reaches it too.
    pub quic: std::sync::OnceLock<quinn::Endpoint>,
    /// The pools from this master's flags, recorded by its first term as leader if the cluster
    /// has none yet (`networks::record_pools`).
    pub pools: Option<crate::ipam::Pools>,
    /// Network updates to agents are sent in parts of about this many bytes.
    pub network_update_part_bytes: usize,
    /// The key-encryption key and the data key of secrets.
    pub secrets: crate::secrets::Keys,
    /// The domains route hosts must fall under (empty: any).
    pub route_domains: Vec<String>,
    /// Long-lived streams each client holds open here.
    pub streams: Arc<crate::streams::ClientStreams>,
    /// Revoked certificates and identities, as this master last applied them.
    pub revoked: Arc<crate::revocation::Revoked>,
    /// Users, roles and bindings, as this master last applied them.
    pub rbac: Arc<crate::authz::Rbac>,
    /// The audit log's queue and key numbering.
    pub audit: crate::audit::AuditLog,
    /// Joins waiting for their batch (the leader's; see `joins`).
    pub joins: crate::joins::JoinQueue,
    /// What `/metrics` shows.
    pub meters: crate::metrics::Metrics,
}

impl Ctx {
    pub fn metrics(&self) -> openraft::RaftMetrics<TypeConfig> {
        self.raft.metrics().borrow_watched().clone()
    }

    pub fn is_leader(&self) -> bool {
        let rx = self.raft.metrics();
        let m = rx.borrow_watched();
        m.state == ServerState::Leader && m.current_leader == Some(self.id)
    }

    /// The current leader's id and endpoint, when known.
    pub fn leader(&self) -> Option<(u64, String)> {
        let m = self.metrics();
        let id = m.current_leader?;
        let node = m.membership_config.membership().get_node(&id)?.clone();
        Some((id, node.addr))
    }

    pub fn is_removed(&self, id: u64) -> bool {
        self.removed.lock().expect("removed lock").contains(&id)
    }

    /// The ids of masters removed from the cluster (never reused).
    pub fn removed_ids(&self) -> Vec<u64> {
        self.removed.lock().expect("removed lock").iter().copied().collect()
    }

    pub fn refresh_removed(&self) {
        if let Ok(set) = self.reader.removed_members() {
            *self.removed.lock().expect("removed lock") = set;
        }
    }

    /// The cluster id, read from the state machine until the metrics watcher has cached it.
    pub fn cluster_id(&self) -> String {
        let cached = self.peers.cluster_id.get();
        if !cached.is_empty() {
            return cached;
        }
        match self.reader.cluster_id() {
            Ok(Some(id)) => {
                self.peers.cluster_id.set(&id);
                id
            }
            _ => String::new(),
        }
    }

    pub fn header(&self) -> pb::ResponseHeader {
        self.header_at(self.reader.counters().map(|c| c.revision).unwrap_or(0))
    }

    /// A response header for a known revision (no store read).
    pub fn header_at(&self, revision: i64) -> pb::ResponseHeader {
        pb::ResponseHeader {
            cluster_id: self.cluster_id(),
            member_id: self.id,
            revision,
            raft_term: self.raft.metrics().borrow_watched().current_term,
        }
    }

    pub fn local_status(&self) -> LocalStatusResponse {
        let m = self.metrics();
        LocalStatusResponse {
            id: self.id,
            role: role_name(&m, self.id).to_string(),
            term: m.current_term,
            leader: m.current_leader.unwrap_or(0),
            last_log_index: m.last_log_index.unwrap_or(0),
            applied_index: m.last_applied.as_ref().map_or(0, |l| l.index),
            db_size_bytes: self.reader.db_size(),
            cluster_id: self.cluster_id(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }
}

pub(crate) fn role_name(m: &openraft::RaftMetrics<TypeConfig>, id: u64) -> &'static str {
    match m.state {
        ServerState::Leader => "leader",
        ServerState::Learner => "learner",
        ServerState::Candidate => "candidate",
        ServerState::Shutdown => "shutdown",
        ServerState::Follower => {
            if m.membership_config.membership().voter_ids().any(|v| v == id) {
                "follower"
            } else {
                "learner"
            }
        }
    }
}

pub(crate) fn command_result(r: CmdResult) -> Result<CommandResult, Status> {
    r.map_err(|e| match e {
        CommandError::Compacted { .. } | CommandError::FutureRevision { .. } => Status::out_of_range(e.to_string()),
        CommandError::ClusterIdAlreadySet { .. } => Status::failed_precondition(e.to_string()),
    })
}

fn raft_config(cfg: &MasterConfig) -> Result<Arc<Config>, MasterError> {
    let et = cfg.election_timeout.as_millis() as u64;
    let c = Config {
        cluster_name: "berth".into(),
        heartbeat_interval: cfg.heartbeat_interval.as_millis() as u64,
        election_timeout_min: et,
        election_timeout_max: et * 2,
        enable_pre_vote: Some(true),
        snapshot_policy: SnapshotPolicy::LogsSinceLast(cfg.snapshot_logs),
        max_in_snapshot_log_to_keep: 1000,
        purge_batch_size: 256,
        install_snapshot_timeout: 120_000,
        max_payload_entries: 256,
        // Replicate as soon as entries are written locally, while the leader's own fsync runs.
        broadcast_submitted_on_append: Some(true),
        // A leader that restarts stands for election like any other master. Restoring its
        // leadership at once (openraft's default) let a leader killed before its WAL sync come
        // back as leader of the same term without entries its followers already held, and write
        // other entries under the same (term, index): replicas diverged (kill-minority and
        // fsync-eio runs of the chaos suite). A new term makes the followers' extra entries
        // conflict, so they are replaced.
        enable_leader_restore: Some(false),
        ..Default::default()
    };
    c.validate().map(Arc::new).map_err(|e| MasterError::Config(e.to_string()))
}

/// Starts a master and serves until `shutdown` fires; on the leader, hands leadership to another
/// voter before exiting.
pub async fn run_master(cfg: MasterConfig, shutdown: CancellationToken) -> Result<(), MasterError> {
    cfg.validate()?;
    // The metrics address is checked before anything starts, so that a wrong one is a clear
    // error at once.
    let metrics_listener = match &cfg.metrics_listen {
        Some(addr) => Some(berth_metrics::bind(addr, "--metrics-listen").await.map_err(MasterError::Config)?),
        None => None,
    };
    let console_listener = match &cfg.console_listen {
        Some(addr) => Some(crate::console::bind(addr).await.map_err(MasterError::Config)?),
        None => None,
    };
    crate::identity::secure_data_dir(&cfg.data_dir)?;
    let (ident, _first_start) = Identity::resolve(&cfg)?;
    let listen: SocketAddr = ident
        .listen
        .parse()
        .map_err(|e| MasterError::Config(format!("listen address {:?} is not IP:PORT: {e}", ident.listen)))?;
    berth_pki::tls::install_crypto_provider();
    let pki = MasterPki::load_or_init(&cfg.data_dir, cfg.pki_dir.as_deref(), ident.id, listen, cfg.cert_validity)?;
    let kek_file =
        cfg.secrets_key_file.clone().unwrap_or_else(|| cfg.data_dir.join("pki").join(crate::secrets::KEY_FILE));
    let kek = if cfg.secrets_key_file.is_some() || kek_file.exists() {
        Some(crate::secrets::Kek::load(&kek_file).map_err(MasterError::Config)?)
    } else {
        tracing::warn!(
            "no secrets key at {}: this master cannot store or hand out secrets (give it --secrets-key-file)",
            kek_file.display()
        );
        None
    };
    let (log, sm) = berth_store::open(&cfg.data_dir)?;
    let reader = sm.reader();
    if reader.removed_members()?.contains(&ident.id) {
        return Err(MasterError::DataDir {
            dir: cfg.data_dir.display().to_string(),
            reason: format!("master id {} was removed from the cluster and can never rejoin", ident.id),
        });
    }
    let cluster_id = ClusterIdCell::default();
    if let Some(cid) = reader.cluster_id()? {
        cluster_id.set(&cid);
    }
    let peers = Peers::new(ident.id, cluster_id.clone(), pki.clone());
    let raft = Raft::new(ident.id, raft_config(&cfg)?, NetworkFactory { peers: peers.clone() }, log, sm)
        .await
        .map_err(|e| MasterError::Raft(e.to_string()))?;

    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| MasterError::Listen { addr: listen.to_string(), source: e })?;
    let local_addr = listener.local_addr()?;

    let meters = crate::metrics::Metrics::default();
    let ctx = Arc::new(Ctx {
        id: ident.id,
        raft: raft.clone(),
        reader: reader.clone(),
        peers,
        proposer: Proposer::start(raft.clone(), &meters),
        limits: Limits { max_value_bytes: cfg.max_value_bytes, ..Limits::default() },
        election_timeout: cfg.election_timeout,
        heartbeat_interval: cfg.heartbeat_interval,
        leader_contact: Default::default(),
        data_dir: cfg.data_dir.clone(),
        membership_lock: tokio::sync::Mutex::new(()),
        removed: Mutex::new(BTreeSet::new()),
        pki,
        liveness: Default::default(),
        assignments: Default::default(),
        statuses: Default::default(),
        endpoints: Default::default(),
        cert_validity: cfg.cert_validity,
        node_down_grace: cfg.node_down_grace,
        agent_heartbeat_interval: cfg.agent_heartbeat_interval,
        quic: std::sync::OnceLock::new(),
        pools: cfg.pools,
        network_update_part_bytes: cfg.network_update_part_bytes.max(1),
        secrets: crate::secrets::Keys::new(kek),
        route_domains: cfg.route_domains.iter().map(|d| d.trim_end_matches('.').to_ascii_lowercase()).collect(),
        streams: Default::default(),
        revoked: Default::default(),
        rbac: Default::default(),
        audit: crate::audit::AuditLog::new(),
        joins: Default::default(),
        meters,
    });
    ctx.refresh_removed();
    // Revocations are known before the first connection is accepted, and followed from then on.
    crate::revocation::refresh(&ctx);
    crate::authz::refresh(&ctx);
    // Every handshake of the gRPC and QUIC servers checks the revocation list.
    let revoked = ctx.revoked.clone();
    ctx.pki.set_revocation_check(Arc::new(move |info| revoked.check(info)))?;
    // Revocations, users, roles and bindings: one watch.
    let rbac = tokio::spawn(crate::authz::follow(ctx.clone(), shutdown.clone()));
    let audit_queue = tokio::spawn(crate::audit::run_queue(ctx.clone(), shutdown.clone()));
    let audit_file = tokio::spawn(crate::audit::follow_file(ctx.clone(), shutdown.clone()));
    let quic = crate::dispatcher::bind(&ctx, local_addr)?;
    let _ = ctx.quic.set(quic.clone());
    let dispatcher = tokio::spawn(crate::dispatcher::run(ctx.clone(), quic, shutdown.clone()));
    let renewer = tokio::spawn(renew_certificates(ctx.clone(), shutdown.clone()));
    let guard_dir = tokio::spawn(keep_data_dir_private(cfg.data_dir.clone(), shutdown.clone()));
    let metrics_token = CancellationToken::new();
    let metrics = metrics_listener.map(|l| {
        tokio::spawn(crate::metrics::serve(Arc::downgrade(&ctx), reader.metrics().clone(), l, metrics_token.clone()))
    });
    let console = console_listener.map(|l| tokio::spawn(crate::console::serve(ctx.clone(), l, metrics_token.clone())));

    let server_token = CancellationToken::new();
    let server = tokio::spawn(crate::kv_service::serve(
        ctx.clone(),
        listener,
        cfg.data_dir.join("snapshots"),
        server_token.clone(),
    ));

    let initialized = raft.is_initialized().await.map_err(|e| MasterError::Raft(e.to_string()))?;
    if !initialized && let Some(ic) = &ident.initial_cluster {
        let members: BTreeMap<u64, BasicNode> = ic.iter().map(|(id, ep)| (*id, BasicNode::new(ep.clone()))).collect();
        match raft.initialize(members).await {
            Ok(()) => info!(members = %crate::identity::format_cluster(ic), "initialised a new cluster"),
            Err(e) => info!("not initialising: {e}"),
        }
    } else if !initialized {
        info!("waiting to be added to a cluster with `berth member add --id {} --endpoint {}`", ident.id, ident.listen);
    }
    let mut watcher = tokio::spawn(watch_state(ctx.clone(), shutdown.clone()));
    info!(id = ident.id, %local_addr, data_dir = %cfg.data_dir.display(), "master started");
    // Serving: a supervisor (systemd Type=notify) may go on. Whether it has a leader is /readyz's
    // question: a master must not wait for its peers to count as started, or a cluster whose
    // masters start one by one never would.
    if let Err(e) = berth_metrics::notify_ready(&format!("master {} serving on {local_addr}", ident.id)) {
        warn!("telling the service manager this master is ready failed: {e}");
    }

    // Raft stops by itself only on a storage error (a failed write or fsync, a full disk). Such a
    // master must not linger, answering every request with an error: it exits non-zero so that
    // its supervisor restarts it, and the restart recovers from what is durable. (Found by the
    // chaos suite's fsync-eio and disk-full faults, after which masters stayed up but dead.)
    let mut fatal = None;
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = &mut watcher => {
            if !shutdown.is_cancelled() {
                let why = match raft.metrics().borrow_watched().clone().running_state {
                    Err(e) => e.to_string(),
                    Ok(()) => "raft stopped".to_string(),
                };
                error!("raft stopped on a fatal error, so this master exits: {why}");
                fatal = Some(why);
            }
        }
    }
    info!("shutting down");
    if fatal.is_none() && ctx.is_leader() {
        hand_over_leadership(&ctx).await;
    }
    watcher.abort();
    renewer.abort();
    guard_dir.abort();
    rbac.abort();
    audit_file.abort();
    ctx.liveness.step_down();
    server_token.cancel();
    metrics_token.cancel();
    if let Some(m) = metrics {
        let _ = tokio::time::timeout(Duration::from_secs(2), m).await;
    }
    if let Some(c) = console {
        let _ = tokio::time::timeout(Duration::from_secs(2), c).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), dispatcher).await;
    // Denials and failed calls queued before the stop get their chance to be committed.
    let _ = tokio::time::timeout(Duration::from_secs(1), audit_queue).await;
    if let Err(e) = raft.shutdown().await {
        warn!("raft shutdown: {e}");
    }
    match tokio::time::timeout(Duration::from_secs(5), server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => warn!("server: {e}"),
        Ok(Err(e)) => warn!("server task: {e}"),
        Err(_) => warn!("server did not stop within 5s"),
    }
    drop(ctx);
    info!("stopped");
    match fatal {
        Some(why) => Err(MasterError::Raft(format!(
            "raft stopped on a fatal error: {why}; restart the master (it recovers from its data dir; if the \
             disk is full, free space first)"
        ))),
        None => Ok(()),
    }
}

/// As a new leader, records the cluster CA in the replicated state if it is not there yet, so
/// that masters added later receive the key.
async fn record_ca(ctx: Arc<Ctx>) {
    if !matches!(ctx.reader.ca(), Ok(None)) {
        return;
    }
    let Some(ca) = ctx.pki.ca() else { return };
    let ca = berth_types::ClusterCa { cert_pem: ca.cert_pem().to_string(), key_pem: ca.key_pem().to_string() };
    match ctx.write(Command::SetCa { ca }).await {
        Ok(_) => info!("recorded the cluster CA in the replicated state"),
        Err(e) => info!("cluster CA not recorded by this leader: {}", e.message()),
    }
}

/// Checks the data dir's mode every minute (see [`crate::identity::secure_data_dir`]).
async fn keep_data_dir_private(dir: std::path::PathBuf, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
            _ = shutdown.cancelled() => return,
        }
        if let Err(e) = crate::identity::secure_data_dir(&dir) {
            warn!("{e}");
        }
    }
}

/// Renews this master's certificate at its renewal point (a random 50-80% of its lifetime).
async fn renew_certificates(ctx: Arc<Ctx>, shutdown: CancellationToken) {
    loop {
        // A point already passed (a renewal that failed): try again shortly, not a minute later.
        let wait = ctx.pki.renew_at().duration_since(std::time::SystemTime::now()).unwrap_or(Duration::from_secs(5));
        tokio::select! {
            _ = tokio::time::sleep(wait.max(Duration::from_secs(1))) => {}
            _ = shutdown.cancelled() => return,
        }
        match ctx.pki.renew_if_due() {
            Ok(true) => crate::ca_rotation::reload_tls(&ctx),
            Ok(false) => {}
            Err(e) => warn!("renewing this master's certificate failed: {e}"),
        }
    }
}

/// SIGTERM on the leader: hand leadership to the most up-to-date voter, so that clients see no
/// election timeout.
async fn hand_over_leadership(ctx: &Ctx) {
    let m = ctx.metrics();
    let voters: Vec<u64> = m.membership_config.membership().voter_ids().filter(|v| *v != ctx.id).collect();
    let best = m
        .replication
        .as_ref()
        .and_then(|r| voters.iter().max_by_key(|v| r.get(v).cloned().flatten().map(|l| l.index)).copied())
        .or_else(|| voters.first().copied());
    let Some(target) = best else { return };
    info!(target, "transferring leadership before exit");
    if ctx.raft.trigger().transfer_leader(target).await.is_err() {
        return;
    }
    let me = Some(ctx.id);
    match ctx
        .raft
        .wait(Some(ctx.election_timeout * 2))
        .metrics(|m| m.current_leader.is_some() && m.current_leader != me, "leadership handed over")
        .await
    {
        Ok(m) => info!(new_leader = ?m.current_leader, "leadership handed over"),
        Err(e) => warn!("leadership transfer did not finish: {e}"),
    }
}

/// Follows Raft metrics: caches the cluster id once applied, refreshes the removed set when the
/// membership changes, and as a new leader records a cluster id if the cluster has none yet.
async fn watch_state(ctx: Arc<Ctx>, shutdown: CancellationToken) {
    let mut rx = ctx.raft.metrics();
    let mut last_state = None;
    let mut last_membership = None;
    let mut cluster_id_known = false;
    let mut leading: Option<CancellationToken> = None;
    let mut ca_adopted = ctx.pki.ca().is_some();
    let mut last_leader = None;
    loop {
        let m = rx.borrow_watched().clone();
        // A new leader, as etcd counts them: the first one a master learns of after it starts
        // is not a change, and neither is a leaderless interval.
        if let Some(l) = m.current_leader
            && last_leader != Some(l)
        {
            if last_leader.is_some() {
                ctx.meters.leader_changes.inc();
            }
            last_leader = Some(l);
        }
        if !cluster_id_known && m.last_applied.is_some() {
            // Reads the state machine until the id is there, then it is cached.
            let cid = ctx.cluster_id();
            if !cid.is_empty() {
                info!(cluster_id = %cid, "cluster id known");
                cluster_id_known = true;
            }
        }
        // A member's removal is committed just before the membership change that drops it, so
        // the removed set only needs re-reading when the membership changes.
        let membership = *m.membership_config.log_id();
        if membership != last_membership {
            last_membership = membership;
            ctx.refresh_removed();
        }
        if !ca_adopted && m.last_applied.is_some() {
            match ctx.reader.ca() {
                Ok(Some(ca)) => match ctx.pki.adopt_ca(&ca) {
                    Ok(()) => ca_adopted = true,
                    Err(e) => warn!("{e}"),
                },
                Ok(None) => {}
                Err(e) => warn!("reading the cluster CA: {e}"),
            }
        }
        let is_leader = m.state == ServerState::Leader && m.current_leader == Some(ctx.id);
        if is_leader && leading.is_none() {
            // Leader-only controllers start here and stop when leadership ends.
            let token = shutdown.child_token();
            ctx.liveness.become_leader();
            ctx.assignments.unready();
            ctx.endpoints.unready();
            tokio::spawn(crate::dispatcher::monitor(ctx.clone(), token.clone()));
            tokio::spawn(crate::assign::index(ctx.clone(), token.clone()));
            tokio::spawn(crate::endpoints::index(ctx.clone(), token.clone()));
            tokio::spawn(crate::assign::commit_statuses(ctx.clone(), token.clone()));
            tokio::spawn(crate::controller::run(ctx.clone(), token.clone()));
            tokio::spawn(crate::audit::retain(ctx.clone(), token.clone()));
            tokio::spawn(crate::events::retain(ctx.clone(), token.clone()));
            let c = ctx.clone();
            let term = m.current_term;
            tokio::spawn(async move {
                let e = crate::events::new(
                    c.id,
                    berth_types::event::LEADER_ELECTED,
                    "master",
                    "",
                    &c.id.to_string(),
                    format!("master {} leads in term {term}", c.id),
                );
                crate::events::emit(&c, e).await;
            });
            tokio::spawn(record_ca(ctx.clone()));
            tokio::spawn(crate::ca_rotation::drive(ctx.clone(), token.clone()));
            tokio::spawn(crate::networks::record_pools(ctx.clone()));
            leading = Some(token);
        } else if !is_leader && let Some(token) = leading.take() {
            token.cancel();
            ctx.assignments.unready();
            ctx.endpoints.unready();
            ctx.liveness.step_down();
        }
        if Some(m.state) != last_state {
            info!(state = ?m.state, term = m.current_term, leader = ?m.current_leader, "raft state");
            last_state = Some(m.state);
            if m.state == ServerState::Leader && ctx.peers.cluster_id.get().is_empty() {
                let ctx2 = ctx.clone();
                tokio::spawn(async move {
                    if let Ok(None) = ctx2.reader.cluster_id() {
                        let cid = uuid::Uuid::new_v4().to_string();
                        match ctx2.write(Command::SetClusterId { cluster_id: cid }).await {
                            Ok(_) => {}
                            Err(e) => info!("cluster id not recorded by this leader: {}", e.message()),
                        }
                    }
                });
            }
        }
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            _ = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restarted_leader_stands_for_election() {
        // Appends sit in RocksDB's WAL buffer until the syncer's fsync, and are replicated
        // meanwhile. A leader restored at restart without an election wrote other entries under
        // log ids its followers already held (replicas diverged in kill-minority and fsync-eio
        // chaos runs). The chaos suite's kill and fsync scenarios, with `replicas-agree`, cover
        // the behaviour.
        let cfg = raft_config(&MasterConfig::new("/nonexistent".into())).unwrap();
        assert_eq!(cfg.enable_leader_restore, Some(false));
    }
}
