//! The berth node agent.
//!
//! On first start it joins the cluster with a token (pinning the cluster CA by the digest in the
//! token), keeps the node certificate in its data directory, then holds one QUIC session (mTLS)
//! with the leader master: Hello, heartbeats, assignments in, batched task statuses out. It
//! reconnects with jittered backoff across the masters it was told about, and never stops a task
//! because a session ended. Tasks run through a [`Driver`].
//!
//! The agent talks to masters only through the wire protocol (`berth_api::pb::agent`, framed by
//! `berth-channel`): it depends on `berth-api`, `berth-pki` and
//! `berth-channel`, and never on `berth-store` or `berth-master`.

mod certs;
pub mod driver;
pub mod edge;
mod error;
pub mod image;
mod join;
mod metrics;
mod net;
pub mod overlay;
pub mod probe;
mod resources;
pub mod sandbox;
mod session;
mod state;
pub mod volume;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use berth_api::pb::agent::Resources;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span, warn};

pub use driver::{
    Driver, SimulatedDriver, StatusSink, StatusStream, TaskManager, UNSUPPORTED_MESSAGE, UnsupportedDriver,
    status_channel,
};
pub use error::AgentError;
pub use resources::{detect as detect_resources, hostname};
pub use state::{AgentState, CA_FILE, CERT_FILE, FORMAT, KEY_FILE, STATE_FILE, StoredAssignment, StoredStatus};

use crate::net::Endpoints;
use crate::session::Agent;

/// How long a first start keeps trying to join when no master can take the join yet
/// (unreachable, no leader, UNAVAILABLE). Rejections end the join at once.
pub const JOIN_PATIENCE: Duration = Duration::from_secs(60);
/// Simulated agents per shared QUIC client endpoint (UDP socket).
pub const AGENTS_PER_ENDPOINT: usize = 500;
/// How many simulated agents may be joining or opening a session at the same time.
pub const CONNECT_CONCURRENCY: usize = 64;

/// How to run the agent. Its `Debug` output hides the token.
#[derive(Clone, Default)]
pub struct AgentConfig {
    /// Master `host:port` list (QUIC, UDP, on the same port number as the masters' API).
    pub join: Vec<String>,
    /// The join token; needed only for the first start.
    pub token: Option<String>,
    pub data_dir: PathBuf,
    /// Node name; default: the host name.
    pub name: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub advertise_addr: Option<IpAddr>,
    /// Run this many simulated agents (each its own node) in this process.
    pub simulate: Option<usize>,
    /// The DNS domain under which tasks find services (`web.NS.svc.<domain>`); default
    /// `berth.internal`.
    pub cluster_domain: Option<String>,
    /// Simulated agents only: say they attach networks, keep the leader's network view in
    /// memory (no kernel state) and append each change of their endpoints to
    /// `<data dir>/endpoints.jsonl`, for measuring endpoint propagation to many nodes.
    pub simulate_networks: bool,
    /// The absolute path prefixes `driver: host` volumes may use on this node
    /// (`--allow-host-path`); none: no host paths. Told to the masters in Hello.
    pub allow_host_paths: Vec<PathBuf>,
    /// Whether tasks may ask for `privileged: true` (`--allow-privileged`); refused otherwise.
    pub allow_privileged: bool,
    /// The OCI runtime sandboxed tasks run through (`--oci-runtime`); none: runc or crun,
    /// whichever is found first.
    pub oci_runtime: Option<PathBuf>,
    /// Registries (`host:port`) pulled from over plain HTTP besides loopback ones
    /// (`--insecure-registry`).
    pub insecure_registries: Vec<String>,
    /// Unused images are removed once the node's images take more than this many bytes
    /// (`--image-gc-threshold`; default 10 GiB).
    pub image_gc_threshold: Option<u64>,
    /// The edge router.
    pub edge: EdgeSettings,
    /// Serve `/metrics`, `/healthz` and `/readyz` over plain HTTP here (`--metrics-listen`).
    pub metrics_listen: Option<String>,
}

/// How an edge node serves routes (the router starts when the leader sends routes: on an agent
/// started with `--edge`, or on a node labelled `role=edge`).
#[derive(Clone, Debug)]
pub struct EdgeSettings {
    /// `--edge`: this node is an edge router (told to the masters in Hello).
    pub enabled: bool,
    /// Where routes are served over plain HTTP (`--edge-http`, default 0.0.0.0:80).
    pub http: std::net::SocketAddr,
    /// Where routes are served over TLS (`--edge-https`, default 0.0.0.0:443).
    pub https: std::net::SocketAddr,
    /// `--apps-domain`: the zone answered by DNS on `dns`.
    pub apps_domain: Option<String>,
    /// `--apps-dns` (default: the advertise address, port 53).
    pub dns: Option<std::net::SocketAddr>,
    /// The HAProxy program (`--haproxy`, default `haproxy`).
    pub haproxy: PathBuf,
}

impl Default for EdgeSettings {
    fn default() -> EdgeSettings {
        EdgeSettings {
            enabled: false,
            http: (std::net::Ipv4Addr::UNSPECIFIED, 80).into(),
            https: (std::net::Ipv4Addr::UNSPECIFIED, 443).into(),
            apps_domain: None,
            dns: None,
            haproxy: PathBuf::from("haproxy"),
        }
    }
}

impl std::fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentConfig")
            .field("join", &self.join)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("data_dir", &self.data_dir)
            .field("name", &self.name)
            .field("labels", &self.labels)
            .field("advertise_addr", &self.advertise_addr)
            .field("simulate", &self.simulate)
            .field("cluster_domain", &self.cluster_domain)
            .field("simulate_networks", &self.simulate_networks)
            .field("allow_host_paths", &self.allow_host_paths)
            .field("allow_privileged", &self.allow_privileged)
            .field("oci_runtime", &self.oci_runtime)
            .field("insecure_registries", &self.insecure_registries)
            .field("image_gc_threshold", &self.image_gc_threshold)
            .finish()
    }
}

/// One agent's parameters (not `Debug`: it holds the token).
#[derive(Clone)]
pub(crate) struct Spec {
    pub dir: PathBuf,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub advertise_addr: Option<IpAddr>,
    pub join: Vec<String>,
    pub token: Option<String>,
    /// `--allow-host-path`, normalised, for Hello.
    pub host_paths: Vec<String>,
}

/// What the agents of one process share.
#[derive(Clone)]
pub(crate) struct Shared {
    pub endpoints: Endpoints,
    pub resources: Resources,
    pub gate: Option<Arc<Semaphore>>,
    /// The node's overlay, when this agent attaches tasks to networks.
    pub overlay: Option<driver::manager::SharedOverlay>,
    /// The edge router's settings (real agents only).
    pub edge: Option<EdgeSettings>,
    /// Where simulated agents that take part in networks log their endpoints.
    pub sim_net_log: Option<Arc<session::SimNetLog>>,
}

/// Whether the Docker daemon (in the host's network namespace) can bind published ports to
/// `ip`: the agent runs in that namespace too and the address is one of its own. An agent in a
/// namespace of its own (a test's "host") keeps Docker's default of every address.
fn docker_can_bind(ip: IpAddr) -> bool {
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/net")).ok();
    ns("self").is_some() && ns("self") == ns("1") && std::net::UdpSocket::bind((ip, 0)).is_ok()
}

/// Runs the agent (or `cfg.simulate` simulated agents) until `shutdown` is cancelled. Real agents
/// run tasks through a [`TaskManager`] (process and docker runtimes); simulated ones through
/// [`SimulatedDriver`].
pub async fn run(cfg: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    berth_pki::tls::install_crypto_provider();
    volume::paths::normalize_prefixes(&cfg.allow_host_paths).map_err(AgentError::BadHostPath)?;
    // The metrics address is checked first, so that a wrong one is a clear error at once.
    let metrics_listener = match (&cfg.metrics_listen, cfg.simulate) {
        (Some(_), Some(_)) => {
            return Err(AgentError::Config(
                "--metrics-listen serves one agent's figures: it cannot be combined with --simulate".into(),
            ));
        }
        (Some(addr), None) => Some(berth_metrics::bind(addr, "--metrics-listen").await.map_err(AgentError::Config)?),
        (None, _) => None,
    };
    match cfg.simulate {
        Some(n) => run_simulated(cfg, n, shutdown).await,
        None => {
            let (sink, statuses) = status_channel();
            let images = image::Images::new(
                cfg.data_dir.join("images"),
                cfg.insecure_registries.clone(),
                cfg.image_gc_threshold.unwrap_or(image::DEFAULT_GC_THRESHOLD),
            );
            let process = driver::process::ProcessRuntime::new(
                cfg.data_dir.join("tasks"),
                driver::process::ProcessRuntime::default_shim(),
            )
            .with_sandbox(cfg.allow_privileged, cfg.oci_runtime.clone())
            .with_images(images.clone());
            if let Err(e) = sandbox::find_oci_runtime(cfg.oci_runtime.as_deref()).and_then(|_| sandbox::find_init()) {
                warn!("sandboxed process tasks cannot run on this node: {e}");
            }
            let owner = std::path::absolute(&cfg.data_dir).unwrap_or_else(|_| cfg.data_dir.clone());
            let docker = driver::docker::DockerRuntime::connect()
                .await
                .map(|d| {
                    d.with_owner(owner.display().to_string())
                        .with_privileged(cfg.allow_privileged)
                        .with_publish_ip(cfg.advertise_addr.filter(|ip| docker_can_bind(*ip)))
                })
                .map_err(|e| e.to_string());
            if let Err(e) = &docker {
                info!("docker tasks cannot run on this node: {e}");
            }
            let storage = driver::manager::StorageOptions {
                allow_host_paths: cfg.allow_host_paths.clone(),
                images: Some(images),
                ..Default::default()
            };
            let manager = TaskManager::with_storage(process, docker, sink, cfg.data_dir.clone(), storage);
            let overlay = start_overlay(&cfg).await;
            if let Some(o) = &overlay {
                manager.set_overlay(o.clone());
            }
            let metrics = metrics_listener.map(|l| {
                tokio::spawn(metrics::serve(l, overlay.clone(), manager.volume_usage(), shutdown.child_token()))
            });
            let r = run_agent_with(cfg, manager, statuses, shutdown, overlay).await;
            if let Some(m) = metrics {
                m.abort();
            }
            r
        }
    }
}

/// Runs one agent with the given driver (whose [`StatusSink`] feeds `statuses`) until shutdown.
/// `cfg.simulate` is ignored.
pub async fn run_with_driver<D: Driver>(
    cfg: AgentConfig,
    driver: D,
    statuses: StatusStream,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    run_agent_with(cfg, driver, statuses, shutdown, None).await
}

/// The node's overlay, when this agent can attach tasks to networks: root, and an IPv4
/// `--advertise-addr` held by one of this host's interfaces (the underlay). Otherwise `None`,
/// with the reason logged: the node then says it attaches no networks, and the scheduler tells
/// users why network tasks do not land here.
async fn start_overlay(cfg: &AgentConfig) -> Option<driver::manager::SharedOverlay> {
    if !rustix::process::geteuid().is_root() {
        info!("this agent attaches no tasks to networks: it does not run as root");
        return None;
    }
    let Some(IpAddr::V4(underlay)) = cfg.advertise_addr else {
        info!(
            "this agent attaches no tasks to networks: give it --advertise-addr, this host's IPv4 address between hosts"
        );
        return None;
    };
    let config = overlay::node::OverlayConfig {
        dir: cfg.data_dir.join("overlay"),
        underlay,
        domain: cfg.cluster_domain.clone().unwrap_or_else(|| overlay::dns::DEFAULT_DOMAIN.into()),
        dns_port: 53,
        nft_table: "berth".into(),
    };
    match overlay::node::Overlay::start(config).await {
        Ok(o) => {
            info!(%underlay, "the overlay is up: tasks on networks can run here");
            Some(Arc::new(tokio::sync::Mutex::new(o)))
        }
        Err(e) => {
            error!("this agent attaches no tasks to networks: starting the overlay failed: {e}");
            None
        }
    }
}

async fn run_agent_with<D: Driver>(
    cfg: AgentConfig,
    driver: D,
    statuses: StatusStream,
    shutdown: CancellationToken,
    overlay: Option<driver::manager::SharedOverlay>,
) -> Result<(), AgentError> {
    berth_pki::tls::install_crypto_provider();
    let shared = Shared {
        endpoints: Endpoints::new(),
        resources: resources::detect(&cfg.data_dir),
        gate: None,
        edge: overlay.is_some().then(|| cfg.edge.clone()),
        overlay,
        sim_net_log: None,
    };
    let spec = Spec {
        dir: cfg.data_dir.clone(),
        name: cfg.name.clone().unwrap_or_else(hostname),
        labels: cfg.labels.clone(),
        advertise_addr: cfg.advertise_addr,
        join: cfg.join.clone(),
        token: cfg.token.clone(),
        host_paths: host_paths(&cfg),
    };
    let span = info_span!("agent", name = %spec.name, node = tracing::field::Empty);
    let result = run_agent(spec, &shared, driver, statuses, &shutdown).instrument(span).await;
    shared.endpoints.shutdown().await;
    result
}

/// Load or join, then sessions until shutdown.
pub(crate) async fn run_agent<D: Driver>(
    spec: Spec,
    shared: &Shared,
    driver: D,
    statuses: StatusStream,
    shutdown: &CancellationToken,
) -> Result<(), AgentError> {
    let state = match AgentState::load(&spec.dir)? {
        Some(state) => {
            if spec.token.is_some() {
                info!(dir = %spec.dir.display(), "this node already joined; ignoring the token");
            }
            state
        }
        None => {
            let Some(token) = &spec.token else {
                return Err(AgentError::NoState { dir: spec.dir.clone() });
            };
            let joined = join::join(
                &spec,
                token,
                &shared.resources,
                &shared.endpoints,
                shared.gate.as_deref(),
                JOIN_PATIENCE,
                shutdown,
            )
            .await?;
            match joined {
                Some(state) => state,
                None => return Ok(()),
            }
        }
    };
    tracing::Span::current().record("node", state.node_id.as_str());
    // Joined (or restarted from its state): it runs its tasks whether or not a master answers, so
    // it is started; /readyz tells whether it has a session.
    if let Err(e) = berth_metrics::notify_ready(&format!("node {} ({}) started", spec.name, state.node_id)) {
        warn!("telling the service manager this agent is ready failed: {e}");
    }
    driver.identify(&state.node_id);
    let files = certs::load(&spec.dir, &state.node_id)?;
    let revoked: certs::SharedRevoked = std::sync::Arc::new(std::sync::RwLock::new(certs::Revoked {
        serials: state.revoked_serials.clone(),
        identities: state.revoked_identities.clone(),
    }));
    let tls = certs::client_config(&files, &revoked)?;
    let renew_at = certs::renew_at(&files);
    let usage = driver.volume_usage();
    let mut agent = Agent {
        dir: spec.dir.clone(),
        state,
        driver,
        statuses,
        statuses_open: true,
        resources: shared.resources,
        fallback: spec.join.clone(),
        tls,
        ca_report: certs::ca_report(&files),
        files,
        revoked,
        renew_at,
        renewing: None,
        endpoints: shared.endpoints.clone(),
        gate: shared.gate.clone(),
        pending: BTreeMap::new(),
        dirty: false,
        complete_requested: None,
        net_parts: None,
        confirmed: false,
        dialled: None,
        overlay: shared.overlay.clone(),
        edge_settings: shared.edge.clone(),
        edge: None,
        sim_net: shared.sim_net_log.clone().map(|log| session::SimNet { log, view: Default::default() }),
        underlay: spec.advertise_addr,
        host_paths: spec.host_paths.clone(),
        usage,
        volumes_pending: None,
    };
    agent.recover().await;
    agent.run(shutdown).await
}

/// The `--allow-host-path` prefixes as Hello carries them (normalised; checked by [`run`]).
fn host_paths(cfg: &AgentConfig) -> Vec<String> {
    volume::paths::normalize_prefixes(&cfg.allow_host_paths)
        .unwrap_or_default()
        .iter()
        .map(|p| p.display().to_string())
        .collect()
}

/// `n` simulated agents, each with its own identity and state under `DIR/sim-<i>/`.
async fn run_simulated(cfg: AgentConfig, n: usize, shutdown: CancellationToken) -> Result<(), AgentError> {
    if n == 0 {
        return Ok(());
    }
    let base = cfg.name.clone().unwrap_or_else(hostname);
    state::disable_sync_for_simulation();
    let resources = resources::detect(&cfg.data_dir);
    let gate = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let pools: Vec<Endpoints> = (0..n.div_ceil(AGENTS_PER_ENDPOINT)).map(|_| Endpoints::new()).collect();
    let sim_net_log = if cfg.simulate_networks {
        std::fs::create_dir_all(&cfg.data_dir).map_err(|e| AgentError::io("creating", &cfg.data_dir, e))?;
        let path = cfg.data_dir.join("endpoints.jsonl");
        Some(Arc::new(session::SimNetLog::create(&path).map_err(|e| AgentError::io("opening", &path, e))?))
    } else {
        None
    };
    info!(agents = n, endpoints = pools.len(), "starting simulated agents");
    let mut set = JoinSet::new();
    for i in 0..n {
        let spec = Spec {
            dir: cfg.data_dir.join(format!("sim-{i}")),
            name: format!("{base}-{i}"),
            labels: cfg.labels.clone(),
            advertise_addr: cfg.advertise_addr,
            join: cfg.join.clone(),
            token: cfg.token.clone(),
            host_paths: host_paths(&cfg),
        };
        let shared = Shared {
            endpoints: pools[i / AGENTS_PER_ENDPOINT].clone(),
            resources,
            gate: Some(gate.clone()),
            overlay: None,
            edge: None,
            sim_net_log: sim_net_log.clone(),
        };
        let shutdown = shutdown.clone();
        let span = info_span!("agent", sim = i, name = %spec.name, node = tracing::field::Empty);
        set.spawn(
            async move {
                let (sink, statuses) = status_channel();
                let r = run_agent(spec, &shared, SimulatedDriver::new(sink), statuses, &shutdown).await;
                if let Err(e) = &r {
                    error!("simulated agent failed: {e}");
                }
                (i, r)
            }
            .instrument(span),
        );
    }
    let mut failed = BTreeSet::new();
    let mut first = None;
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok((i, Err(e))) => {
                failed.insert(i);
                first.get_or_insert(e);
            }
            Ok((_, Ok(()))) => {}
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => {}
        }
    }
    for pool in &pools {
        pool.shutdown().await;
    }
    match first {
        None => Ok(()),
        Some(first) if failed.len() == n && n == 1 => Err(first),
        Some(first) => Err(AgentError::Simulation { failed: failed.len(), total: n, first: Box::new(first) }),
    }
}
