//! The leader's endpoints index: what each node needs to realise the networks its tasks use.
//!
//! A node's *view* is
//! - the networks its live tasks join (placed on it, and wanted running or not yet ended), plus,
//!   on a node whose agent attaches networks, the first network of every service with ingress
//!   (routing-mesh) ports, and on an edge node that of every routed service; each
//!   as a `NetworkState`: subnet, VNI, isolation, the node's own address block, and every other
//!   node holding a block of the network with an underlay address (its VXLAN peers);
//! - the services on those networks, each as `ServiceEndpoints`: VIP or `dnsrr`, ports, the
//!   networks it joins, and its endpoints: the tasks that are running (and healthy when the
//!   service has a health check), wanted running, and hold an address (keyed by network
//!   `namespace/name`). Nothing else is ever an endpoint.
//!
//! A cluster without address pools has no networks: every view is empty and nothing is sent.
//!
//! Like the assignment index, it is built from a range read plus a watch on `/berth/`, only
//! after a read barrier at the start of the leader's term (a new leader that is behind must not
//! send a COMPLETE view lacking networks or endpoints), and rebuilt when the watch falls behind.
//!
//! Scale (1,000 nodes, 10,000 endpoints): a change recomputes only what it touched (one
//! service's endpoints, one network's peers, one node's set of networks) and publishes an
//! immutable [`Snapshot`] whose parts are shared `Arc`s: unchanged parts are the very `Arc`s of
//! the previous snapshot. Each session keeps what it last sent ([`Sent`]) and compares its
//! node's view with it pointer by pointer, looking only at the services the snapshot's change
//! log names since then, so one endpoint changing costs each session a few lookups, not a walk
//! over every service of its networks. Sessions send COMPLETE on open and on request, and
//! INCREMENTAL updates (changed and removed networks and services) after, chained by version.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque},
    hash::{DefaultHasher, Hash, Hasher},
    net::Ipv4Addr,
    sync::Arc,
    time::Duration,
};

use berth_api::pb::{
    FileRecord, NetworkRecord, Node, RouteRecord, ServiceRecord, Task,
    agent::{
        AssignmentsKind, EdgeRoute, EdgeUpdate, Endpoint, NetworkPeer, NetworkState, NetworkUpdate, ServiceEndpoints,
        ServicePort, TaskState,
    },
};
use berth_store::WatchEvents;
use berth_types::{
    EventKind, RangeQuery, prefix_end,
    spec::{
        DEFAULT_NETWORK, EndpointMode, PortMode, Protocol, Service,
        network::{node_block, recorded_block_prefix},
    },
};
use ipnet::Ipv4Net;
use prost::Message;
use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::{
    networks::{self, IPAM_CONFIG_KEY, NETWORKS_PREFIX},
    node::Ctx,
    objects::NODES_PREFIX,
    tasks::{self, SERVICES_PREFIX, TASKS_PREFIX},
};

/// How many versions a snapshot's change log reaches back. A session further behind (or one
/// whose node's networks changed) compares its whole view instead.
const LOG_VERSIONS: usize = 64;

/// The shortest time between two network updates of one session: a burst of changes (a rollout,
/// a status batch) becomes one update.
pub(crate) const SEND_INTERVAL: Duration = Duration::from_millis(50);

/// One network as every node sees it; a node's own block is picked from `blocks`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct NetShared {
    key: String,
    subnet: String,
    vni: u32,
    internal: bool,
    /// Node id -> its block (CIDR), for every node holding one.
    blocks: BTreeMap<String, String>,
    /// The block holders with an underlay address, by node id.
    peers: Vec<NetworkPeer>,
}

impl NetShared {
    /// The network as `node` sees it: its own block, every other holder as a peer.
    fn state_for(&self, node: &str) -> NetworkState {
        NetworkState {
            key: self.key.clone(),
            subnet: self.subnet.clone(),
            vni: self.vni,
            internal: self.internal,
            block: self.blocks.get(node).cloned().unwrap_or_default(),
            peers: self.peers.iter().filter(|p| p.node_id != node).cloned().collect(),
        }
    }
}

/// The services whose `ServiceEndpoints` changed (or went away) at one version.
#[derive(Debug)]
struct Changed {
    version: u64,
    services: Vec<String>,
}

/// What the index published: every node's view, as shared parts.
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    /// Grows with every publication, across rebuilds.
    pub version: u64,
    /// Built for this leadership term, behind its read barrier. Sessions send nothing otherwise.
    pub ready: bool,
    /// The cluster has address pools (else it has no networks and every view is empty).
    pub has_pools: bool,
    /// Node id -> the networks its live tasks join.
    nodes: Arc<HashMap<String, Arc<BTreeSet<String>>>>,
    /// Network key -> its state.
    networks: Arc<HashMap<String, Arc<NetShared>>>,
    /// Network key -> the services on it.
    members: Arc<HashMap<String, Arc<BTreeSet<String>>>>,
    /// Service key -> its endpoints.
    services: Arc<HashMap<String, Arc<ServiceEndpoints>>>,
    /// The services changed by the latest versions, oldest first, contiguous up to `version`
    /// (empty after a rebuild).
    log: Vec<Arc<Changed>>,
    /// What the edge nodes serve.
    pub edge: Arc<EdgeState>,
}

/// A route as the edge nodes get it (the certificate is opened by the session that sends it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RouteInfo {
    pub key: String,
    pub host: String,
    pub path: String,
    /// namespace/name
    pub service: String,
    pub port: u32,
    /// "" (plain), edge, passthrough, reencrypt.
    pub termination: String,
    pub redirect_http: bool,
    /// (namespace, secret name, its newest version) when the edge holds a certificate.
    pub secret: Option<(String, String, u64)>,
}

/// What every edge node serves: the routes, and the addresses of the edge nodes serving.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct EdgeState {
    /// Grows with every change.
    pub version: u64,
    /// Edge node ids (nodes with networks started with --edge or labelled role=edge).
    pub nodes: BTreeSet<String>,
    /// Underlay addresses of the edge nodes that are ready and not drained.
    pub serving: Vec<String>,
    pub routes: Vec<RouteInfo>,
}

impl Snapshot {
    /// The networks of `node`'s view.
    fn networks_of(&self, node: &str) -> BTreeMap<String, Arc<NetShared>> {
        if !self.has_pools {
            return BTreeMap::new();
        }
        let Some(nets) = self.nodes.get(node) else { return BTreeMap::new() };
        nets.iter().filter_map(|k| self.networks.get(k).map(|n| (k.clone(), n.clone()))).collect()
    }

    /// The services on any of `nets`.
    fn services_on(&self, nets: &BTreeMap<String, Arc<NetShared>>) -> HashMap<String, Arc<ServiceEndpoints>> {
        let mut out = HashMap::new();
        for members in nets.keys().filter_map(|k| self.members.get(k)) {
            for s in members.iter() {
                if !out.contains_key(s)
                    && let Some(e) = self.services.get(s)
                {
                    out.insert(s.clone(), e.clone());
                }
            }
        }
        out
    }

    /// The services changed after version `since`, or None when the log does not reach back
    /// that far.
    fn changed_since(&self, since: u64) -> Option<BTreeSet<&str>> {
        if since == self.version {
            return Some(BTreeSet::new());
        }
        let (first, last) = (self.log.first()?, self.log.last()?);
        if since > self.version || first.version > since + 1 || last.version != self.version {
            return None;
        }
        Some(
            self.log.iter().filter(|c| c.version > since).flat_map(|c| c.services.iter().map(String::as_str)).collect(),
        )
    }

    /// Whether `node`'s view is empty.
    pub fn is_empty_for(&self, node: &str) -> bool {
        self.networks_of(node).is_empty()
    }
}

/// What a session last sent its agent, to compute INCREMENTAL network updates.
#[derive(Default)]
pub(crate) struct Sent {
    version: u64,
    /// The snapshot version it reflects.
    snapshot: u64,
    networks: BTreeMap<String, Arc<NetShared>>,
    services: HashMap<String, Arc<ServiceEndpoints>>,
}

fn sorted_services<'a>(it: impl Iterator<Item = &'a Arc<ServiceEndpoints>>) -> Vec<ServiceEndpoints> {
    let mut v: Vec<ServiceEndpoints> = it.map(|s| (**s).clone()).collect();
    v.sort_by(|a, b| a.key.cmp(&b.key));
    v
}

impl Sent {
    /// `node`'s whole view.
    pub fn complete(&mut self, term: u64, snap: &Snapshot, node: &str) -> NetworkUpdate {
        let networks = snap.networks_of(node);
        let services = snap.services_on(&networks);
        self.version += 1;
        let update = NetworkUpdate {
            term,
            kind: AssignmentsKind::Complete as i32,
            version: self.version,
            base_version: 0,
            networks: networks.values().map(|n| n.state_for(node)).collect(),
            removed_networks: vec![],
            services: sorted_services(services.values()),
            removed_services: vec![],
            more: false,
        };
        self.networks = networks;
        self.services = services;
        self.snapshot = snap.version;
        update
    }

    /// The changes of `node`'s view since what was sent, or None when there are none.
    pub fn incremental(&mut self, term: u64, snap: &Snapshot, node: &str) -> Option<NetworkUpdate> {
        if snap.version == self.snapshot {
            return None;
        }
        let networks = snap.networks_of(node);
        let changed_networks: Vec<NetworkState> = networks
            .iter()
            .filter(|(k, n)| !self.networks.get(*k).is_some_and(|o| Arc::ptr_eq(o, n)))
            .map(|(_, n)| n.state_for(node))
            .collect();
        let removed_networks: Vec<String> =
            self.networks.keys().filter(|k| !networks.contains_key(*k)).cloned().collect();
        let mut changed = Vec::new();
        let mut removed = Vec::new();
        // With the same networks, only the services the log names can have changed; otherwise
        // services may have come into or left the view: compare all of them.
        let same_networks = networks.keys().eq(self.networks.keys());
        match snap.changed_since(self.snapshot).filter(|_| same_networks) {
            Some(keys) => {
                for k in keys {
                    let now = snap.services.get(k).filter(|s| s.networks.iter().any(|n| networks.contains_key(n)));
                    match (now, self.services.get(k)) {
                        (Some(n), Some(o)) if Arc::ptr_eq(n, o) => {}
                        (Some(n), _) => {
                            changed.push(n.clone());
                            self.services.insert(k.to_string(), n.clone());
                        }
                        (None, Some(_)) => {
                            removed.push(k.to_string());
                            self.services.remove(k);
                        }
                        (None, None) => {}
                    }
                }
            }
            None => {
                let services = snap.services_on(&networks);
                for (k, n) in &services {
                    if !self.services.get(k).is_some_and(|o| Arc::ptr_eq(o, n)) {
                        changed.push(n.clone());
                    }
                }
                removed.extend(self.services.keys().filter(|k| !services.contains_key(*k)).cloned());
                self.services = services;
            }
        }
        self.networks = networks;
        self.snapshot = snap.version;
        if changed_networks.is_empty() && removed_networks.is_empty() && changed.is_empty() && removed.is_empty() {
            return None;
        }
        removed.sort();
        let base_version = self.version;
        self.version += 1;
        Some(NetworkUpdate {
            term,
            kind: AssignmentsKind::Incremental as i32,
            version: self.version,
            base_version,
            networks: changed_networks,
            removed_networks,
            services: sorted_services(changed.iter()),
            removed_services: removed,
            more: false,
        })
    }
}

/// The size a part of a network update aims to stay under on the wire: a quarter of the channel's
/// frame limit, leaving room for the frame around it and for a service larger than the rest.
pub const PART_BYTES: usize = berth_channel::MAX_FRAME / 4;

/// Splits an update into parts of about `max` encoded bytes each (services are never split), all
/// but the last marked `more`. The first part carries the networks and the removals; the agent
/// applies the parts as one update once the last arrives. An update that fits is one part.
pub(crate) fn split(update: NetworkUpdate, max: usize) -> Vec<NetworkUpdate> {
    if update.encoded_len() <= max {
        return vec![update];
    }
    let mut services = update.services.into_iter().peekable();
    let mut first = NetworkUpdate { services: Vec::new(), more: true, ..update };
    let empty = NetworkUpdate {
        networks: Vec::new(),
        removed_networks: Vec::new(),
        removed_services: Vec::new(),
        services: Vec::new(),
        ..first.clone()
    };
    let mut parts = Vec::new();
    let mut size = first.encoded_len();
    while let Some(s) = services.next() {
        // The length prefix and tag of a repeated field: at most 6 bytes for any frame we send.
        let cost = s.encoded_len() + 6;
        if size + cost > max && !first.services.is_empty() {
            parts.push(std::mem::replace(&mut first, empty.clone()));
            size = empty.encoded_len();
        }
        size += cost;
        first.services.push(s);
        if services.peek().is_none() {
            break;
        }
    }
    parts.push(first);
    if let Some(last) = parts.last_mut() {
        last.more = false;
    }
    parts
}

/// A session's network feed: what it sent, and whether its agent asked for a COMPLETE update.
#[derive(Default)]
pub(crate) struct Feed {
    sent: Option<Sent>,
    complete_wanted: bool,
}

impl Feed {
    /// The agent asked for a COMPLETE update (sent as soon as the index is ready).
    pub fn request_complete(&mut self) {
        self.complete_wanted = true;
    }

    /// What to send now, if anything: nothing while the index is not ready; a COMPLETE update
    /// first (once the node has a view or the cluster has pools) and when asked; INCREMENTAL
    /// ones after.
    pub fn next(&mut self, term: u64, snap: &Snapshot, node: &str) -> Option<NetworkUpdate> {
        if !snap.ready {
            return None;
        }
        if self.complete_wanted || self.sent.is_none() {
            if !self.complete_wanted && !snap.has_pools && snap.is_empty_for(node) {
                return None;
            }
            self.complete_wanted = false;
            return Some(self.sent.get_or_insert_default().complete(term, snap, node));
        }
        self.sent.as_mut()?.incremental(term, snap, node)
    }
}

/// A session's edge feed: the version of the edge state it last sent its (edge) agent.
#[derive(Default)]
pub(crate) struct EdgeFeed {
    sent: Option<u64>,
}

impl EdgeFeed {
    /// Send the whole edge state again next time (the agent asked for everything).
    pub fn request_complete(&mut self) {
        self.sent = None;
    }

    /// What to send now, if anything: the routes when they changed since the last update (on
    /// an edge node), or an empty update once when the node stopped being an edge. `open`
    /// gives a route's certificate (a route whose certificate cannot be opened is left out,
    /// with a warning, and the edge does not serve it).
    pub fn next(
        &mut self,
        term: u64,
        snap: &Snapshot,
        node: &str,
        open: impl Fn(&str, &str, u64) -> Result<Vec<u8>, String>,
    ) -> Option<EdgeUpdate> {
        if !snap.ready {
            return None;
        }
        let edge = &snap.edge;
        if !edge.nodes.contains(node) {
            return self.sent.take().map(|_| EdgeUpdate { term, routes: vec![], edges: vec![] });
        }
        if self.sent == Some(edge.version) {
            return None;
        }
        self.sent = Some(edge.version);
        let routes = edge
            .routes
            .iter()
            .filter_map(|r| {
                let certificate = match &r.secret {
                    Some((ns, name, version)) => match open(ns, name, *version) {
                        Ok(c) => c,
                        Err(e) => {
                            warn!(route = %r.key, "the edge does not serve this route: its certificate: {e}");
                            return None;
                        }
                    },
                    None => Vec::new(),
                };
                Some(EdgeRoute {
                    key: r.key.clone(),
                    host: r.host.clone(),
                    path: r.path.clone(),
                    service: r.service.clone(),
                    port: r.port,
                    termination: r.termination.clone(),
                    redirect_http: r.redirect_http,
                    certificate,
                })
            })
            .collect();
        Some(EdgeUpdate { term, routes, edges: edge.serving.clone() })
    }
}

/// A service as the index keeps it.
struct SvcInfo {
    has_health: bool,
    /// The network its routing-mesh (ingress) ports reach its tasks through (its first one),
    /// which every node with networks then joins; None without ingress ports.
    ingress_network: Option<String>,
    /// Its first network, which routes reach its tasks through.
    first_network: Option<String>,
    /// Everything but the endpoints; `networks` holds the spec's.
    base: ServiceEndpoints,
}

fn svc_info(r: &ServiceRecord) -> Result<SvcInfo, String> {
    let spec: Service = serde_json::from_str(&r.spec_json)
        .map_err(|e| format!("service {}/{} has an unreadable spec: {e}", r.namespace, r.name))?;
    // The index only matters on a cluster with pools, where tasks join networks; a service
    // being deleted publishes nothing on the mesh any more (its ports are free again).
    let ingress_of = |p: &berth_types::spec::PortSpec| match p.published_mode(true) {
        Some(PortMode::Ingress) if !r.deleting => p.published.map_or(0, u32::from),
        _ => 0,
    };
    let ports: Vec<ServicePort> = spec
        .spec
        .task
        .ports
        .iter()
        .map(|p| ServicePort {
            name: p.name.clone().unwrap_or_default(),
            protocol: match p.protocol {
                Protocol::Tcp => "tcp",
                Protocol::Udp => "udp",
            }
            .into(),
            port: u32::from(p.container),
            ingress: ingress_of(p),
        })
        .collect();
    let networks: Vec<String> =
        networks::service_networks(&spec).into_iter().map(|n| format!("{}/{n}", r.namespace)).collect();
    let ingress_network = ports.iter().any(|p| p.ingress != 0).then(|| networks.first().cloned()).flatten();
    Ok(SvcInfo {
        has_health: spec.spec.task.health.is_some(),
        ingress_network,
        first_network: if r.deleting { None } else { networks.first().cloned() },
        base: ServiceEndpoints {
            key: format!("{}/{}", r.namespace, r.name),
            vip: r.vip.clone(),
            endpoint_mode: match spec.spec.endpoint_mode {
                EndpointMode::Vip => "vip",
                EndpointMode::Dnsrr => "dnsrr",
            }
            .into(),
            ports,
            networks,
            endpoints: vec![],
        },
    })
}

/// A route record as the edge nodes get it.
fn route_info(r: &RouteRecord) -> Result<RouteInfo, String> {
    let doc = crate::routes::spec_of(r)?;
    let tls = doc.spec.tls.as_ref();
    Ok(RouteInfo {
        key: doc.key(),
        host: doc.spec.host.clone(),
        path: doc.spec.path.clone(),
        service: format!("{}/{}", r.namespace, doc.spec.service),
        port: r.target_port,
        termination: tls.map_or("", |t| t.termination.as_str()).to_string(),
        redirect_http: doc.spec.redirect_http,
        secret: tls.and_then(|t| t.secret.clone()).map(|s| (r.namespace.clone(), s, r.secret_version)),
    })
}

/// A task as the index keeps it.
#[derive(Debug)]
struct TaskInfo {
    /// `namespace/name` of its service.
    service: String,
    node: String,
    /// The networks (`namespace/name`) it joins, from its run spec.
    networks: Vec<String>,
    spec_hash: u64,
    /// Placed, and wanted running or not yet ended: its node needs its networks.
    live: bool,
    /// Wanted running, running and holding addresses: its endpoint, unless its service has a
    /// health check it does not pass.
    endpoint: Option<Endpoint>,
    healthy: bool,
}

impl TaskInfo {
    fn of(t: &Task, old: Option<&TaskInfo>) -> TaskInfo {
        let mut h = DefaultHasher::new();
        t.run_spec.hash(&mut h);
        let spec_hash = h.finish();
        let networks = match old {
            Some(o) if o.spec_hash == spec_hash => o.networks.clone(),
            _ => task_networks(t),
        };
        let desired = tasks::desired_of(t);
        let endpoint =
            (desired == TaskState::Running && tasks::is_ready(t, false) && !t.addresses.is_empty()).then(|| {
                Endpoint {
                    task_id: t.id.clone(),
                    node_id: t.node_id.clone(),
                    // Agents report addresses by network name, in the task's namespace.
                    addresses: t.addresses.iter().map(|(n, a)| (format!("{}/{n}", t.namespace), a.clone())).collect(),
                }
            });
        TaskInfo {
            service: format!("{}/{}", t.namespace, t.service),
            node: t.node_id.clone(),
            networks,
            spec_hash,
            live: !t.node_id.is_empty() && (desired == TaskState::Running || !tasks::is_terminal(tasks::state_of(t))),
            endpoint,
            healthy: tasks::is_ready(t, true),
        }
    }

    fn endpoint(&self, has_health: bool) -> Option<&Endpoint> {
        if has_health && !self.healthy { None } else { self.endpoint.as_ref() }
    }
}

/// The networks a task joins (`namespace/name`), from its run spec: what its agent attaches it to.
fn task_networks(t: &Task) -> Vec<String> {
    #[derive(Deserialize)]
    struct Run {
        #[serde(default)]
        task: Nets,
    }
    #[derive(Deserialize, Default)]
    struct Nets {
        #[serde(default)]
        networks: Vec<String>,
    }
    match serde_json::from_slice::<Run>(&t.run_spec) {
        Ok(r) => {
            let names = if r.task.networks.is_empty() { vec![DEFAULT_NETWORK.to_string()] } else { r.task.networks };
            names.into_iter().map(|n| format!("{}/{n}", t.namespace)).collect()
        }
        Err(e) => {
            debug!(task = %t.id, "the task's run spec is unreadable, so it joins no network here: {e}");
            Vec::new()
        }
    }
}

fn decode<T: Message + Default>(key: &str, value: Option<&[u8]>) -> Option<T> {
    let v = value?;
    T::decode(v).map_err(|e| warn!("endpoints index: {key} is undecodable: {e}")).ok()
}

/// The index itself: the replicated objects it needs, what it derived, and what it published.
/// Fed with puts and deletes ([`Index::apply`]); [`Index::publish`] recomputes what they touched.
#[derive(Default)]
pub(crate) struct Index {
    has_pools: bool,
    /// Node id -> its underlay address (`Node.advertise_addr`, when an IPv4 address).
    underlays: HashMap<String, Option<Ipv4Addr>>,
    records: HashMap<String, NetworkRecord>,
    services: HashMap<String, SvcInfo>,
    tasks: HashMap<String, TaskInfo>,
    /// Service key -> its tasks.
    by_service: HashMap<String, HashSet<String>>,
    /// Service key -> task id -> endpoint.
    ready: HashMap<String, BTreeMap<String, Endpoint>>,
    /// Node id -> network key -> live tasks joining it.
    node_nets: HashMap<String, BTreeMap<String, u32>>,
    /// Nodes whose agents attach networks (`Node.networks`): each joins every ingress network.
    capable: HashSet<String>,
    /// Network key -> the services with ingress ports reaching their tasks through it.
    ingress_nets: BTreeMap<String, u32>,
    /// Edge nodes (among `capable`), with whether each serves (ready, not drained) and its
    /// underlay address.
    edges: BTreeMap<String, (bool, Option<Ipv4Addr>)>,
    /// Route key -> the route, as sent.
    routes: BTreeMap<String, RouteInfo>,
    /// Secret `namespace/name` -> its newest version.
    secret_versions: HashMap<String, u64>,
    /// The networks of routed services, which every edge node joins.
    routed_nets: BTreeSet<String>,
    edge_dirty: bool,
    pub_edge: Arc<EdgeState>,
    pub_nodes: Arc<HashMap<String, Arc<BTreeSet<String>>>>,
    pub_networks: Arc<HashMap<String, Arc<NetShared>>>,
    pub_members: Arc<HashMap<String, Arc<BTreeSet<String>>>>,
    pub_services: Arc<HashMap<String, Arc<ServiceEndpoints>>>,
    dirty_services: BTreeSet<String>,
    dirty_networks: BTreeSet<String>,
    dirty_nodes: BTreeSet<String>,
    /// The next publication must not be diffed through the log (a fresh index, pools changed).
    reset: bool,
    version: u64,
    log: VecDeque<Arc<Changed>>,
}

impl Index {
    /// An empty index whose first publication follows snapshot `version`.
    pub fn new(version: u64) -> Index {
        Index { version, reset: true, ..Default::default() }
    }

    /// A put (`Some(value)`) or delete (`None`) of a key under `/berth/`.
    pub fn apply(&mut self, key: &[u8], value: Option<&[u8]>) {
        let Ok(key) = std::str::from_utf8(key) else { return };
        if key == IPAM_CONFIG_KEY {
            if self.has_pools != value.is_some() {
                self.has_pools = value.is_some();
                self.reset = true;
            }
        } else if let Some(id) = key.strip_prefix(NODES_PREFIX) {
            self.set_node(id, decode::<Node>(key, value));
        } else if let Some(k) = key.strip_prefix(NETWORKS_PREFIX) {
            match decode::<NetworkRecord>(key, value) {
                Some(r) => self.records.insert(k.to_string(), r),
                None => self.records.remove(k),
            };
            self.dirty_networks.insert(k.to_string());
        } else if let Some(k) = key.strip_prefix(SERVICES_PREFIX) {
            self.set_service(k, decode::<ServiceRecord>(key, value));
        } else if let Some(id) = key.strip_prefix(TASKS_PREFIX) {
            self.set_task(id, decode::<Task>(key, value));
        } else if let Some(k) = key.strip_prefix(crate::routes::ROUTES_PREFIX) {
            match decode::<RouteRecord>(key, value).map(|r| route_info(&r)) {
                Some(Ok(r)) => {
                    self.routes.insert(k.to_string(), r);
                }
                Some(Err(e)) => {
                    warn!("endpoints index: {e}");
                    self.routes.remove(k);
                }
                None => {
                    self.routes.remove(k);
                }
            }
            self.edge_dirty = true;
        } else if let Some(k) = key.strip_prefix(crate::secrets::SECRETS_PREFIX) {
            match decode::<FileRecord>(key, value) {
                Some(r) => self.secret_versions.insert(k.to_string(), r.version),
                None => self.secret_versions.remove(k),
            };
            if self.routes.values().any(|r| r.secret.as_ref().is_some_and(|(ns, n, _)| format!("{ns}/{n}") == k)) {
                self.edge_dirty = true;
            }
        }
    }

    fn set_node(&mut self, id: &str, node: Option<Node>) {
        let edge = node
            .as_ref()
            .filter(|n| n.networks && crate::routes::is_edge(n))
            .map(|n| (crate::routes::edge_serving(n), n.advertise_addr.parse::<Ipv4Addr>().ok()));
        if self.edges.get(id) != edge.as_ref() {
            if edge.is_some() != self.edges.contains_key(id) {
                self.dirty_nodes.insert(id.to_string());
            }
            match edge {
                Some(e) => self.edges.insert(id.to_string(), e),
                None => self.edges.remove(id),
            };
            self.edge_dirty = true;
        }
        let capable = node.as_ref().is_some_and(|n| n.networks);
        let was = if capable { !self.capable.insert(id.to_string()) } else { self.capable.remove(id) };
        if was != capable && !self.ingress_nets.is_empty() {
            self.dirty_nodes.insert(id.to_string());
        }
        let underlay = node.as_ref().and_then(|n| n.advertise_addr.parse::<Ipv4Addr>().ok());
        let old = match node {
            Some(_) => self.underlays.insert(id.to_string(), underlay),
            None => self.underlays.remove(id),
        };
        if old.flatten() != underlay {
            for (k, r) in &self.records {
                if r.blocks.contains_key(id) {
                    self.dirty_networks.insert(k.clone());
                }
            }
        }
    }

    fn set_service(&mut self, key: &str, rec: Option<ServiceRecord>) {
        let info = rec.and_then(|r| svc_info(&r).map_err(|e| warn!("endpoints index: {e}")).ok());
        let old_health = self.services.get(key).map(|s| s.has_health);
        let new_health = info.as_ref().map(|s| s.has_health);
        let old_ingress = self.services.get(key).and_then(|s| s.ingress_network.clone());
        let new_ingress = info.as_ref().and_then(|s| s.ingress_network.clone());
        if old_ingress != new_ingress {
            let before: Vec<String> = self.ingress_nets.keys().cloned().collect();
            if let Some(n) = old_ingress
                && let Some(c) = self.ingress_nets.get_mut(&n)
            {
                *c -= 1;
                if *c == 0 {
                    self.ingress_nets.remove(&n);
                }
            }
            if let Some(n) = new_ingress {
                *self.ingress_nets.entry(n).or_insert(0) += 1;
            }
            if self.ingress_nets.keys().ne(before.iter()) {
                // Every node with networks joins the ingress networks.
                self.dirty_nodes.extend(self.capable.iter().cloned());
            }
        }
        match info {
            Some(i) => self.services.insert(key.to_string(), i),
            None => self.services.remove(key),
        };
        if old_health != new_health {
            // Which tasks are endpoints depends on whether there is a service, with or without
            // a health check.
            let mut ready = BTreeMap::new();
            if let Some(has_health) = new_health {
                for id in self.by_service.get(key).into_iter().flatten() {
                    if let Some(e) = self.tasks.get(id).and_then(|t| t.endpoint(has_health)) {
                        ready.insert(id.clone(), e.clone());
                    }
                }
            }
            if ready.is_empty() {
                self.ready.remove(key);
            } else {
                self.ready.insert(key.to_string(), ready);
            }
        }
        self.dirty_services.insert(key.to_string());
    }

    fn set_task(&mut self, id: &str, t: Option<Task>) {
        let old = self.tasks.remove(id);
        let new = t.map(|t| TaskInfo::of(&t, old.as_ref()));
        // The networks its node needs.
        let old_use = old.as_ref().filter(|o| o.live).map(|o| (&o.node, &o.networks));
        let new_use = new.as_ref().filter(|n| n.live).map(|n| (&n.node, &n.networks));
        if old_use != new_use {
            if let Some((node, nets)) = old_use {
                self.unuse(node, nets);
            }
            if let Some((node, nets)) = new_use {
                self.use_nets(node, nets);
            }
        }
        // Its service's endpoints.
        if let Some(o) = &old
            && new.as_ref().is_none_or(|n| n.service != o.service)
        {
            if let Some(set) = self.by_service.get_mut(&o.service) {
                set.remove(id);
                if set.is_empty() {
                    self.by_service.remove(&o.service);
                }
            }
            if let Some(m) = self.ready.get_mut(&o.service)
                && m.remove(id).is_some()
            {
                if m.is_empty() {
                    self.ready.remove(&o.service);
                }
                self.dirty_services.insert(o.service.clone());
            }
        }
        let Some(n) = new else { return };
        self.by_service.entry(n.service.clone()).or_default().insert(id.to_string());
        let endpoint = self.services.get(&n.service).and_then(|s| n.endpoint(s.has_health));
        let changed = match endpoint {
            Some(e) => {
                let m = self.ready.entry(n.service.clone()).or_default();
                if m.get(id) == Some(e) {
                    false
                } else {
                    m.insert(id.to_string(), e.clone());
                    true
                }
            }
            None => self.ready.get_mut(&n.service).is_some_and(|m| m.remove(id).is_some()),
        };
        if self.ready.get(&n.service).is_some_and(BTreeMap::is_empty) {
            self.ready.remove(&n.service);
        }
        if changed {
            self.dirty_services.insert(n.service.clone());
        }
        self.tasks.insert(id.to_string(), n);
    }

    fn use_nets(&mut self, node: &str, nets: &[String]) {
        let m = self.node_nets.entry(node.to_string()).or_default();
        for n in nets {
            let c = m.entry(n.clone()).or_insert(0);
            *c += 1;
            if *c == 1 {
                self.dirty_nodes.insert(node.to_string());
            }
        }
    }

    fn unuse(&mut self, node: &str, nets: &[String]) {
        let Some(m) = self.node_nets.get_mut(node) else { return };
        for n in nets {
            if let Some(c) = m.get_mut(n) {
                *c -= 1;
                if *c == 0 {
                    m.remove(n);
                    self.dirty_nodes.insert(node.to_string());
                }
            }
        }
        if m.is_empty() {
            self.node_nets.remove(node);
        }
    }

    /// A service's endpoints as they should be published now.
    fn service_endpoints(&self, key: &str) -> Option<ServiceEndpoints> {
        let s = self.services.get(key)?;
        let mut e = s.base.clone();
        e.endpoints = self.ready.get(key).map(|m| m.values().cloned().collect()).unwrap_or_default();
        // The spec's networks, and any its endpoints still hold an address on (tasks of an
        // earlier spec during an update that changes the networks).
        let mut nets: BTreeSet<String> = std::mem::take(&mut e.networks).into_iter().collect();
        for ep in &e.endpoints {
            nets.extend(ep.addresses.keys().cloned());
        }
        e.networks = nets.into_iter().collect();
        Some(e)
    }

    /// A network's state as it should be published now.
    fn net_shared(&self, key: &str) -> Option<NetShared> {
        let r = self.records.get(key)?;
        let subnet: Ipv4Net = match r.subnet.parse() {
            Ok(s) => s,
            Err(e) => {
                warn!("endpoints index: network {key} has an unreadable subnet {:?}: {e}", r.subnet);
                return None;
            }
        };
        let prefix = recorded_block_prefix(subnet, r.block_prefix);
        let blocks: BTreeMap<String, String> = r
            .blocks
            .iter()
            .filter_map(|(n, i)| node_block(subnet, prefix, *i).map(|b| (n.clone(), b.to_string())))
            .collect();
        let peers = blocks
            .iter()
            .filter_map(|(n, b)| {
                let u = self.underlays.get(n).copied().flatten()?;
                Some(NetworkPeer { node_id: n.clone(), underlay: u.to_string(), block: b.clone() })
            })
            .collect();
        Some(NetShared {
            key: key.to_string(),
            subnet: r.subnet.clone(),
            vni: r.vni,
            internal: r.internal,
            blocks,
            peers,
        })
    }

    /// Recomputes what the applied changes touched; a new snapshot if anything published
    /// changed (or after a reset).
    pub fn publish(&mut self) -> Option<Snapshot> {
        // The edge: which networks edge nodes join (the routed services' first ones), and what
        // they serve.
        if self.edge_dirty || !self.dirty_services.is_empty() {
            let routed: BTreeSet<String> = self
                .routes
                .values()
                .filter_map(|r| self.services.get(&r.service).and_then(|s| s.first_network.clone()))
                .collect();
            if routed != self.routed_nets {
                self.routed_nets = routed;
                self.dirty_nodes.extend(self.edges.keys().cloned());
            }
        }
        let mut edge_changed = false;
        if std::mem::take(&mut self.edge_dirty) {
            let mut routes: Vec<RouteInfo> = self.routes.values().cloned().collect();
            for r in &mut routes {
                if let Some((ns, name, v)) = &mut r.secret {
                    *v = self.secret_versions.get(&format!("{ns}/{name}")).copied().unwrap_or(0);
                }
            }
            let next = EdgeState {
                version: self.pub_edge.version,
                nodes: self.edges.keys().cloned().collect(),
                serving: self
                    .edges
                    .values()
                    .filter(|(serving, _)| *serving)
                    .filter_map(|(_, a)| a.map(|a| a.to_string()))
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect(),
                routes,
            };
            if next != *self.pub_edge {
                self.pub_edge = Arc::new(EdgeState { version: self.pub_edge.version + 1, ..next });
                edge_changed = true;
            }
        }
        let mut changed = Vec::new();
        for key in std::mem::take(&mut self.dirty_services) {
            let new = self.service_endpoints(&key);
            let old = self.pub_services.get(&key).cloned();
            if old.as_deref() == new.as_ref() {
                continue;
            }
            let old_nets: BTreeSet<&String> = old.iter().flat_map(|o| o.networks.iter()).collect();
            let new_nets: BTreeSet<&String> = new.iter().flat_map(|n| n.networks.iter()).collect();
            for n in old_nets.difference(&new_nets) {
                let members = Arc::make_mut(&mut self.pub_members);
                if let Some(m) = members.get_mut(*n) {
                    Arc::make_mut(m).remove(&key);
                    if m.is_empty() {
                        members.remove(*n);
                    }
                }
            }
            for n in new_nets.difference(&old_nets) {
                let members = Arc::make_mut(&mut self.pub_members);
                Arc::make_mut(members.entry((*n).clone()).or_default()).insert(key.clone());
            }
            let services = Arc::make_mut(&mut self.pub_services);
            match new {
                Some(s) => services.insert(key.clone(), Arc::new(s)),
                None => services.remove(&key),
            };
            changed.push(key);
        }
        let mut other = false;
        for key in std::mem::take(&mut self.dirty_networks) {
            let new = self.net_shared(&key);
            if self.pub_networks.get(&key).map(|n| &**n) == new.as_ref() {
                continue;
            }
            let networks = Arc::make_mut(&mut self.pub_networks);
            match new {
                Some(n) => networks.insert(key, Arc::new(n)),
                None => networks.remove(&key),
            };
            other = true;
        }
        for node in std::mem::take(&mut self.dirty_nodes) {
            let mut new: BTreeSet<String> =
                self.node_nets.get(&node).map(|m| m.keys().cloned().collect()).unwrap_or_default();
            if self.capable.contains(&node) {
                new.extend(self.ingress_nets.keys().cloned());
            }
            if self.edges.contains_key(&node) {
                new.extend(self.routed_nets.iter().cloned());
            }
            if self.pub_nodes.get(&node).map_or(new.is_empty(), |o| **o == new) {
                continue;
            }
            let nodes = Arc::make_mut(&mut self.pub_nodes);
            if new.is_empty() {
                nodes.remove(&node);
            } else {
                nodes.insert(node, Arc::new(new));
            }
            other = true;
        }
        let reset = std::mem::take(&mut self.reset);
        if changed.is_empty() && !other && !reset && !edge_changed {
            return None;
        }
        self.version += 1;
        if reset {
            self.log.clear();
        } else {
            self.log.push_back(Arc::new(Changed { version: self.version, services: changed }));
            while self.log.len() > LOG_VERSIONS {
                self.log.pop_front();
            }
        }
        Some(Snapshot {
            version: self.version,
            ready: true,
            has_pools: self.has_pools,
            nodes: self.pub_nodes.clone(),
            networks: self.pub_networks.clone(),
            members: self.pub_members.clone(),
            services: self.pub_services.clone(),
            log: self.log.iter().cloned().collect(),
            edge: self.pub_edge.clone(),
        })
    }
}

/// The published snapshot, for sessions.
pub(crate) struct Endpoints {
    tx: watch::Sender<Arc<Snapshot>>,
}

impl Default for Endpoints {
    fn default() -> Self {
        Endpoints { tx: watch::channel(Arc::new(Snapshot::default())).0 }
    }
}

impl Endpoints {
    /// A receiver that changes with every publication.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }

    /// Not ready: leadership began or ended.
    pub fn unready(&self) {
        self.tx.send_if_modified(|s| {
            if !s.ready {
                return false;
            }
            *s = Arc::new(Snapshot { version: s.version + 1, ..Default::default() });
            true
        });
    }

    /// Not ready because the index of this term is rebuilding (nothing, once the term ended:
    /// the next term's index may already be publishing).
    fn unready_for(&self, leading: &CancellationToken) {
        if !leading.is_cancelled() {
            self.tx.send_if_modified(|s| {
                if leading.is_cancelled() || !s.ready {
                    return false;
                }
                *s = Arc::new(Snapshot { version: s.version + 1, ..Default::default() });
                true
            });
        }
    }

    fn version(&self) -> u64 {
        self.tx.borrow().version
    }

    /// Publishes `snap` unless this term ended (checked under the channel's lock, which
    /// `unready` takes after the term's token is cancelled).
    fn publish(&self, snap: Snapshot, leading: &CancellationToken) {
        self.tx.send_if_modified(|s| {
            if leading.is_cancelled() {
                return false;
            }
            *s = Arc::new(snap);
            true
        });
    }
}

/// Keeps [`Endpoints`] in step with the replicated state while this master leads.
pub(crate) async fn index(ctx: Arc<Ctx>, leading: CancellationToken) {
    loop {
        match index_once(&ctx, &leading).await {
            Ok(()) => return,
            Err(e) => {
                ctx.endpoints.unready_for(&leading);
                warn!("endpoints index restarts: {e}");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    _ = leading.cancelled() => return,
                }
            }
        }
    }
}

async fn index_once(ctx: &Ctx, leading: &CancellationToken) -> Result<(), String> {
    // Read barrier first, as for the assignment index: a COMPLETE view from a state that lags
    // what an earlier leader committed could lack networks or endpoints.
    if !crate::assign::term_barrier(ctx, leading).await? {
        return Ok(());
    }
    let prefix = b"/berth/".to_vec();
    let q = RangeQuery { key: prefix.clone(), range_end: prefix_end(&prefix), ..Default::default() };
    let (res, counters) = ctx.reader.range(&q).map_err(|e| e.to_string())?;
    let mut watcher =
        ctx.reader.watch(q.key.clone(), q.range_end.clone(), counters.revision + 1).map_err(|e| e.to_string())?;
    let base = ctx.endpoints.version();
    let keys = res.kvs.len();
    let (mut index, first) = tokio::task::spawn_blocking(move || {
        let mut index = Index::new(base);
        for kv in &res.kvs {
            index.apply(&kv.key, Some(&kv.value));
        }
        let first = index.publish();
        (index, first)
    })
    .await
    .map_err(|e| format!("building the endpoints index failed: {e}"))?;
    if let Some(s) = first {
        ctx.endpoints.publish(s, leading);
    }
    debug!(keys, "endpoints index built");
    loop {
        let ev = tokio::select! {
            e = watcher.next() => e.map_err(|e| e.to_string())?,
            _ = leading.cancelled() => return Ok(()),
        };
        match ev {
            WatchEvents::Events(events) => {
                for (_, e) in events {
                    match e.kind {
                        EventKind::Put => index.apply(&e.kv.key, Some(&e.kv.value)),
                        EventKind::Delete => index.apply(&e.kv.key, None),
                    }
                }
                if let Some(s) = index.publish() {
                    ctx.endpoints.publish(s, leading);
                }
            }
            WatchEvents::Compacted { .. } | WatchEvents::Reset { .. } => {
                return Err("the history moved on; rebuilding".into());
            }
        }
    }
}

#[cfg(test)]
mod tests;
