//! A master's metrics and its health endpoint (`--metrics-listen`).
//!
//! Counters and histograms are updated where things happen (the gRPC layer, the proposer, the
//! controllers, the sessions, the status batches; the store keeps its own, see
//! [`berth_store::StoreMetrics`]). Figures that already live elsewhere (Raft's metrics, the
//! store's counters, the sessions) are copied into gauges at scrape time by [`Health::refresh`],
//! so they cost nothing between scrapes.
//!
//! `/readyz`: this master knows a live leader (it leads with a majority's recent
//! acknowledgement, or it heard from the leader within a few heartbeats) and has applied
//! everything the leader had committed when the check began.

use std::{
    sync::{Arc, Weak},
    task::{Context, Poll},
    time::Duration,
};

use berth_metrics::{
    GaugeF, Health, count_histogram,
    prometheus_client::{
        encoding::EncodeLabelSet,
        metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
        registry::Registry,
    },
    seconds_histogram,
};
use futures::future::BoxFuture;
use openraft::ServerState;
use tokio::time::Instant;
use tonic::codegen::{Service, http};

use crate::node::Ctx;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct MethodCode {
    pub method: String,
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct Method {
    pub method: String,
}

/// Every handle a master updates. Cheap to share: each field is an `Arc` inside.
pub(crate) struct Metrics {
    // Raft, refreshed at scrape.
    term: Gauge,
    leader: Gauge,
    is_leader: Gauge,
    pub leader_changes: Counter,
    commit_index: Gauge,
    applied_index: Gauge,
    last_log_index: Gauge,
    snapshot_index: Gauge,
    voters: Gauge,
    quorum_ack_age: GaugeF,
    // The proposer.
    pub proposal_commands: Histogram,
    pub proposal_seconds: Histogram,
    // The store, refreshed at scrape.
    keys: Gauge,
    revision: Gauge,
    compact_revision: Gauge,
    db_bytes: Gauge,
    // The client API.
    pub grpc_requests: Family<MethodCode, Counter>,
    pub grpc_seconds: Family<Method, Histogram, fn() -> Histogram>,
    // Agents' sessions (leader only).
    sessions: Gauge,
    heartbeat_age_max: GaugeF,
    pub assignment_lag: Histogram,
    pub status_reports: Counter,
    pub status_committed: Counter,
    pub status_batch_seconds: Histogram,
    status_queued: Gauge,
    // The controllers (leader only).
    pub round_seconds: Histogram,
    pub pending_tasks: Gauge,
    pub placements: Counter,
    pub restarts: Counter,
    pub conflicts: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            term: Gauge::default(),
            leader: Gauge::default(),
            is_leader: Gauge::default(),
            leader_changes: Counter::default(),
            commit_index: Gauge::default(),
            applied_index: Gauge::default(),
            last_log_index: Gauge::default(),
            snapshot_index: Gauge::default(),
            voters: Gauge::default(),
            quorum_ack_age: GaugeF::default(),
            proposal_commands: count_histogram(),
            proposal_seconds: seconds_histogram(),
            keys: Gauge::default(),
            revision: Gauge::default(),
            compact_revision: Gauge::default(),
            db_bytes: Gauge::default(),
            grpc_requests: Family::default(),
            grpc_seconds: Family::new_with_constructor(seconds_histogram),
            sessions: Gauge::default(),
            heartbeat_age_max: GaugeF::default(),
            assignment_lag: seconds_histogram(),
            status_reports: Counter::default(),
            status_committed: Counter::default(),
            status_batch_seconds: seconds_histogram(),
            status_queued: Gauge::default(),
            round_seconds: seconds_histogram(),
            pending_tasks: Gauge::default(),
            placements: Counter::default(),
            restarts: Counter::default(),
            conflicts: Counter::default(),
        }
    }
}

impl Metrics {
    /// A registry holding every master figure and the store's.
    pub fn registry(&self, store: &berth_store::StoreMetrics) -> Registry {
        let mut r = Registry::default();
        r.register("berth_raft_term", "Current Raft term", self.term.clone());
        r.register("berth_raft_leader", "Id of the leader this master knows (0: none)", self.leader.clone());
        r.register("berth_raft_is_leader", "1 if this master is the leader", self.is_leader.clone());
        r.register(
            "berth_raft_leader_changes",
            "Times this master saw the leader change (to a new leader or to none)",
            self.leader_changes.clone(),
        );
        r.register(
            "berth_raft_commit_index",
            "Highest log index known committed by a majority (as the leader last said)",
            self.commit_index.clone(),
        );
        r.register(
            "berth_raft_applied_index",
            "Highest log index applied to this master's state",
            self.applied_index.clone(),
        );
        r.register("berth_raft_last_log_index", "Highest index in this master's log", self.last_log_index.clone());
        r.register(
            "berth_raft_snapshot_index",
            "Log index of this master's last snapshot",
            self.snapshot_index.clone(),
        );
        r.register("berth_raft_voters", "Voting members in the current membership", self.voters.clone());
        r.register(
            "berth_raft_quorum_ack_age_seconds",
            "On the leader: how long ago a majority last acknowledged it (-1 elsewhere)",
            self.quorum_ack_age.clone(),
        );
        r.register(
            "berth_raft_proposal_commands",
            "Commands carried by one Raft entry this master proposed (write batching)",
            self.proposal_commands.clone(),
        );
        r.register(
            "berth_raft_proposal_seconds",
            "Time from proposing one entry on the leader to its commit and apply",
            self.proposal_seconds.clone(),
        );
        store.register(&mut r);
        r.register("berth_store_keys", "Live keys in the key space (RocksDB's estimate)", self.keys.clone());
        r.register("berth_store_revision", "The key space's current revision", self.revision.clone());
        r.register(
            "berth_store_compact_revision",
            "Revisions below this one are compacted out of the history",
            self.compact_revision.clone(),
        );
        r.register(
            "berth_store_db_bytes",
            "Size of this master's RocksDB (SST files and memtables)",
            self.db_bytes.clone(),
        );
        r.register(
            "berth_grpc_requests",
            "gRPC calls this master served, by method and status code",
            self.grpc_requests.clone(),
        );
        r.register(
            "berth_grpc_request_seconds",
            "Time to answer a gRPC call (to its first response for a stream), by method",
            self.grpc_seconds.clone(),
        );
        r.register(
            "berth_agent_sessions",
            "Agents with an open session to this master (leader only)",
            self.sessions.clone(),
        );
        r.register(
            "berth_agent_heartbeat_age_max_seconds",
            "The longest any agent with a session has been silent (leader only)",
            self.heartbeat_age_max.clone(),
        );
        r.register(
            "berth_assignment_lag_seconds",
            "Time from the leader's task index learning of a change to the node's session sending it",
            self.assignment_lag.clone(),
        );
        r.register("berth_status_reports", "Task states agents reported to this leader", self.status_reports.clone());
        r.register(
            "berth_status_committed",
            "Task states committed (reports that changed nothing are not written)",
            self.status_committed.clone(),
        );
        r.register(
            "berth_status_batch_seconds",
            "Time to commit one batch of task states, from taking it off the queue",
            self.status_batch_seconds.clone(),
        );
        r.register("berth_status_queued", "Task states waiting to be committed", self.status_queued.clone());
        r.register(
            "berth_controller_round_seconds",
            "Time of one controller round: read, decide and commit",
            self.round_seconds.clone(),
        );
        r.register(
            "berth_controller_pending_tasks",
            "Tasks no node could take in the last round",
            self.pending_tasks.clone(),
        );
        r.register("berth_controller_placements", "Task placements committed", self.placements.clone());
        r.register(
            "berth_controller_restarts",
            "Tasks replaced under their restart policy (committed)",
            self.restarts.clone(),
        );
        r.register(
            "berth_controller_conflicts",
            "Controller decisions that lost a race and are decided again next round",
            self.conflicts.clone(),
        );
        r
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` for this master until `shutdown` fires.
pub(crate) async fn serve(
    ctx: Weak<Ctx>,
    store: berth_store::StoreMetrics,
    listener: tokio::net::TcpListener,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let Some(registry) = ctx.upgrade().map(|c| c.meters.registry(&store)) else { return };
    let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    if let Err(e) = berth_metrics::serve(listener, registry, Arc::new(MasterHealth { ctx }), shutdown).await {
        tracing::warn!("the metrics endpoint stopped: {e}");
    }
}

/// Holds the context weakly: the endpoint must not keep a stopping master's state alive.
struct MasterHealth {
    ctx: Weak<Ctx>,
}

impl Health for MasterHealth {
    fn refresh(&self) {
        let Some(ctx) = self.ctx.upgrade() else { return };
        let h = &ctx.meters;
        let m = ctx.metrics();
        h.term.set(m.current_term as i64);
        h.leader.set(m.current_leader.unwrap_or(0) as i64);
        let leading = m.state == ServerState::Leader && m.current_leader == Some(ctx.id);
        h.is_leader.set(leading as i64);
        h.commit_index.set(m.cluster_committed.as_ref().map_or(0, |l| l.index) as i64);
        h.applied_index.set(m.last_applied.as_ref().map_or(0, |l| l.index) as i64);
        h.last_log_index.set(m.last_log_index.unwrap_or(0) as i64);
        h.snapshot_index.set(m.snapshot.as_ref().map_or(0, |l| l.index) as i64);
        h.voters.set(m.membership_config.membership().voter_ids().count() as i64);
        let ack = m.last_quorum_acked.as_ref().filter(|_| leading).map(|t| {
            use openraft::Instant as _;
            t.elapsed().as_secs_f64()
        });
        h.quorum_ack_age.set(ack.unwrap_or(-1.0));
        if let Ok(c) = ctx.reader.counters() {
            h.revision.set(c.revision);
            h.compact_revision.set(c.compact_revision);
        }
        h.keys.set(ctx.reader.estimate_keys() as i64);
        h.db_bytes.set(ctx.reader.db_size() as i64);
        let (sessions, oldest) = ctx.liveness.session_stats();
        h.sessions.set(sessions as i64);
        h.heartbeat_age_max.set(oldest.as_secs_f64());
        h.status_queued.set(ctx.statuses.len() as i64);
    }

    fn ready(&self) -> BoxFuture<'_, Result<String, String>> {
        Box::pin(async move {
            let ctx = self.ctx.upgrade().ok_or("the master is stopping")?;
            ctx.readiness().await
        })
    }
}

impl Ctx {
    /// Whether this master can serve: a live leader is known and this master has applied what
    /// that leader had committed when the check began (waiting up to a second for it).
    async fn readiness(&self) -> Result<String, String> {
        let live = self.live_leader_now();
        let m = self.metrics();
        let Some(leader) = live else {
            return Err(match m.current_leader {
                None => "no leader is known: fewer than a majority of masters may be reachable".to_string(),
                Some(l) if l == self.id => {
                    "this master leads but a majority of masters has not acknowledged it recently".to_string()
                }
                Some(l) => {
                    format!("leader {l} has not been heard from recently (cut off, or an election is under way)")
                }
            });
        };
        let commit = m.cluster_committed.as_ref().map_or(0, |l| l.index);
        let applied = m.last_applied.as_ref().map_or(0, |l| l.index);
        if applied < commit {
            let waited = self
                .raft
                .wait(Some(Duration::from_secs(1)))
                .applied_index_at_least(Some(commit), "applied up to the commit index")
                .await;
            if waited.is_err() {
                let now = self.metrics().last_applied.as_ref().map_or(0, |l| l.index);
                return Err(format!(
                    "applied up to index {now} of the {commit} the leader has committed (catching up)"
                ));
            }
        }
        let role = if leader == self.id { "leader".to_string() } else { format!("follower of {leader}") };
        Ok(format!("{role}, applied to the commit index {commit}"))
    }
}

/// Counts every gRPC call by method and status, and times it (to the response's head: for a
/// stream, when it starts).
#[derive(Clone)]
pub(crate) struct RequestMetricsLayer {
    requests: Family<MethodCode, Counter>,
    seconds: Family<Method, Histogram, fn() -> Histogram>,
}

impl RequestMetricsLayer {
    pub fn new(m: &Metrics) -> Self {
        RequestMetricsLayer { requests: m.grpc_requests.clone(), seconds: m.grpc_seconds.clone() }
    }
}

impl<S> tower_layer::Layer<S> for RequestMetricsLayer {
    type Service = WithRequestMetrics<S>;

    fn layer(&self, inner: S) -> WithRequestMetrics<S> {
        WithRequestMetrics { inner, layer: self.clone() }
    }
}

#[derive(Clone)]
pub(crate) struct WithRequestMetrics<S> {
    inner: S,
    layer: RequestMetricsLayer,
}

impl<S, B, RB> Service<http::Request<B>> for WithRequestMetrics<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    RB: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = req.uri().path().to_string();
        let started = Instant::now();
        let fut = self.inner.call(req);
        let layer = self.layer.clone();
        Box::pin(async move {
            let res = fut.await;
            let code = match &res {
                // A failed call is answered "trailers only": its status is in the head. A call
                // whose head has none is under way (its status comes in the trailers): OK.
                Ok(r) => r.headers().get("grpc-status").map_or("OK", |v| code_name(v.as_bytes())),
                Err(_) => "TRANSPORT_ERROR",
            };
            // Methods no service knows would give the label set any value a client sends.
            let method = if code == "UNIMPLEMENTED" { "unknown".to_string() } else { method };
            layer.requests.get_or_create(&MethodCode { method: method.clone(), code }).inc();
            layer.seconds.get_or_create(&Method { method }).observe(started.elapsed().as_secs_f64());
            res
        })
    }
}

/// The canonical name of a gRPC status code.
fn code_name(v: &[u8]) -> &'static str {
    match v {
        b"0" => "OK",
        b"1" => "CANCELLED",
        b"2" => "UNKNOWN",
        b"3" => "INVALID_ARGUMENT",
        b"4" => "DEADLINE_EXCEEDED",
        b"5" => "NOT_FOUND",
        b"6" => "ALREADY_EXISTS",
        b"7" => "PERMISSION_DENIED",
        b"8" => "RESOURCE_EXHAUSTED",
        b"9" => "FAILED_PRECONDITION",
        b"10" => "ABORTED",
        b"11" => "OUT_OF_RANGE",
        b"12" => "UNIMPLEMENTED",
        b"13" => "INTERNAL",
        b"14" => "UNAVAILABLE",
        b"15" => "DATA_LOSS",
        b"16" => "UNAUTHENTICATED",
        _ => "OTHER",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers `/Fail` with UNAVAILABLE, `/Nope` with UNIMPLEMENTED (trailers only), the rest OK.
    #[derive(Clone)]
    struct Answer;

    impl Service<http::Request<()>> for Answer {
        type Response = http::Response<()>;
        type Error = std::convert::Infallible;
        type Future = std::future::Ready<Result<http::Response<()>, std::convert::Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: http::Request<()>) -> Self::Future {
            let mut res = http::Response::new(());
            let code = match req.uri().path().rsplit('/').next() {
                Some("Fail") => Some("14"),
                Some("Nope") => Some("12"),
                _ => None,
            };
            if let Some(c) = code {
                res.headers_mut().insert("grpc-status", http::HeaderValue::from_static(c));
            }
            std::future::ready(Ok(res))
        }
    }

    #[test]
    fn status_codes_have_their_names() {
        assert_eq!(code_name(b"0"), "OK");
        assert_eq!(code_name(b"14"), "UNAVAILABLE");
        assert_eq!(code_name(b"16"), "UNAUTHENTICATED");
        assert_eq!(code_name(b"99"), "OTHER");
    }

    #[tokio::test]
    async fn the_layer_counts_calls_by_method_and_code() {
        let m = Metrics::default();
        let layer = RequestMetricsLayer::new(&m);
        let mut svc = tower_layer::Layer::layer(&layer, Answer);
        for path in ["/berth.v1.KV/Put", "/berth.v1.KV/Put", "/berth.v1.KV/Fail", "/x.Y/Nope"] {
            svc.call(http::Request::builder().uri(path).body(()).unwrap()).await.unwrap();
        }
        let count = |method: &str, code| {
            m.grpc_requests.get(&MethodCode { method: method.into(), code }).map_or(0, |c| c.get())
        };
        assert_eq!(count("/berth.v1.KV/Put", "OK"), 2);
        assert_eq!(count("/berth.v1.KV/Fail", "UNAVAILABLE"), 1);
        assert_eq!(count("unknown", "UNIMPLEMENTED"), 1, "unknown methods share one label");
        assert_eq!(count("/x.Y/Nope", "UNIMPLEMENTED"), 0);
    }
}
