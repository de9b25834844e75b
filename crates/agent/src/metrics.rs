//! An agent's metrics and its health endpoint (`--metrics-listen`).
//!
//! One set of handles per process ([`METRICS`]): the task manager, the probes and the session
//! record into it where things happen, as Prometheus' own client libraries do with their default
//! registry. Simulated agents (`--simulate`) serve no endpoint.
//!
//! `/readyz`: the agent has an open session with the leader.

use std::sync::{
    Arc, LazyLock,
    atomic::{AtomicBool, Ordering},
};

use berth_api::pb::agent::TaskState;
use berth_metrics::{
    Health,
    prometheus_client::{
        encoding::EncodeLabelSet,
        metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
        registry::Registry,
    },
    seconds_histogram,
};
use futures::future::BoxFuture;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct StateLabel {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RuntimeLabel {
    pub runtime: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ProbeLabel {
    pub result: &'static str,
}

pub(crate) struct AgentMetrics {
    pub session_connected: Gauge,
    pub sessions_opened: Counter,
    pub tasks: Family<StateLabel, Gauge>,
    pub start_seconds: Family<RuntimeLabel, Histogram, fn() -> Histogram>,
    pub start_failures: Family<RuntimeLabel, Counter>,
    pub probes: Family<ProbeLabel, Counter>,
    pub networks: Gauge,
    pub volumes: Gauge,
    pub volume_bytes: Gauge,
    pub status_reports: Counter,
}

/// Whether this process serves its figures (so that simulated agents skip the counting).
static ENABLED: AtomicBool = AtomicBool::new(false);

pub(crate) fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// This process's agent figures.
pub(crate) static METRICS: LazyLock<AgentMetrics> = LazyLock::new(|| AgentMetrics {
    session_connected: Gauge::default(),
    sessions_opened: Counter::default(),
    tasks: Family::default(),
    start_seconds: Family::new_with_constructor(seconds_histogram),
    start_failures: Family::default(),
    probes: Family::default(),
    networks: Gauge::default(),
    volumes: Gauge::default(),
    volume_bytes: Gauge::default(),
    status_reports: Counter::default(),
});

/// Every task state, so that each series exists (at 0) from the first scrape.
const STATES: [TaskState; 9] = [
    TaskState::New,
    TaskState::Pending,
    TaskState::Assigned,
    TaskState::Starting,
    TaskState::Running,
    TaskState::Complete,
    TaskState::Failed,
    TaskState::Shutdown,
    TaskState::Orphaned,
];

impl AgentMetrics {
    /// The session with the leader opened (true) or ended (false).
    pub fn set_session(&self, open: bool) {
        let was_open = self.session_connected.set(open as i64) == 1;
        if open && !was_open {
            self.sessions_opened.inc();
        }
    }

    /// The tasks this node knows, by their last state.
    pub fn set_tasks<'a>(&self, states: impl Iterator<Item = i32> + 'a) {
        let mut counts = [0i64; STATES.len()];
        for s in states {
            if let Some(i) = STATES.iter().position(|k| *k as i32 == s) {
                counts[i] += 1;
            }
        }
        for (k, n) in STATES.iter().zip(counts) {
            self.tasks.get_or_create(&StateLabel { state: berth_api::task_state_name(*k as i32) }).set(n);
        }
    }

    fn registry(&self) -> Registry {
        let mut r = Registry::default();
        r.register(
            "berth_agent_session_connected",
            "1 while this agent has an open session with the leader",
            self.session_connected.clone(),
        );
        r.register(
            "berth_agent_sessions_opened",
            "Sessions this agent opened with a leader",
            self.sessions_opened.clone(),
        );
        r.register("berth_agent_tasks", "Tasks on this node, by their last reported state", self.tasks.clone());
        r.register(
            "berth_agent_task_start_seconds",
            "Time for the runtime to start a task (image pulls excluded), by runtime",
            self.start_seconds.clone(),
        );
        r.register(
            "berth_agent_task_start_failures",
            "Tasks the runtime could not start, by runtime",
            self.start_failures.clone(),
        );
        r.register("berth_agent_probes", "Health probes run, by result", self.probes.clone());
        r.register("berth_agent_networks", "Networks attached on this node", self.networks.clone());
        r.register(
            "berth_agent_volumes",
            "Volumes this node holds (as its last usage report said)",
            self.volumes.clone(),
        );
        r.register(
            "berth_agent_volume_used_bytes",
            "Bytes used by the volumes this node holds (as its last usage report said)",
            self.volume_bytes.clone(),
        );
        r.register(
            "berth_agent_status_reports",
            "Task states this agent sent to the leader",
            self.status_reports.clone(),
        );
        r
    }
}

pub(crate) fn runtime_name(kind: berth_types::spec::Runtime) -> &'static str {
    match kind {
        berth_types::spec::Runtime::Docker => "docker",
        berth_types::spec::Runtime::Oci => "oci",
        berth_types::spec::Runtime::Process => "process",
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` for this agent until `shutdown` fires.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    overlay: Option<crate::driver::manager::SharedOverlay>,
    usage: Option<tokio::sync::watch::Receiver<crate::volume::UsageReport>>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    ENABLED.store(true, Ordering::Relaxed);
    METRICS.set_tasks(std::iter::empty());
    let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    if let Err(e) =
        berth_metrics::serve(listener, METRICS.registry(), Arc::new(AgentHealth { overlay, usage }), shutdown).await
    {
        tracing::warn!("the metrics endpoint stopped: {e}");
    }
}

struct AgentHealth {
    overlay: Option<crate::driver::manager::SharedOverlay>,
    usage: Option<tokio::sync::watch::Receiver<crate::volume::UsageReport>>,
}

impl Health for AgentHealth {
    fn refresh(&self) {
        // The overlay is busy while it reconciles: the last count stands until the next scrape.
        if let Some(o) = &self.overlay
            && let Ok(o) = o.try_lock()
        {
            METRICS.networks.set(o.network_count() as i64);
        }
        if let Some(u) = &self.usage {
            let report = u.borrow().clone();
            METRICS.volumes.set(report.len() as i64);
            METRICS.volume_bytes.set(report.iter().map(|v| v.used_bytes as i64).sum());
        }
    }

    fn ready(&self) -> BoxFuture<'_, Result<String, String>> {
        Box::pin(async move {
            if METRICS.session_connected.get() == 1 {
                Ok("in session with the leader".to_string())
            } else {
                Err("no session with the leader (joining, reconnecting, or no master reachable)".to_string())
            }
        })
    }
}
