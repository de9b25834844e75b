//! Networks in the replicated state: the cluster's pools, network records, which services use
//! which network, and the allocations an `apply` makes (subnets, VNIs, service VIPs). The
//! choices themselves are `ipam`'s pure functions; this module reads what is allocated and turns
//! a decision into compare-and-puts, so two writers never hand out the same address.
//!
//! - `/berth/ipam/config`: [`IpamConfig`], the pools (absent: the cluster has no networks).
//! - `/berth/networks/<namespace>/<name>`: a [`NetworkRecord`].
//! - `/berth/ipam/networks` and `/berth/ipam/vips`: guard keys. Every transaction that hands out
//!   a subnet or VNI (a VIP) compares and rewrites the first (second), so two concurrent
//!   allocations from the same view cannot both commit.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    sync::Arc,
};

use berth_api::pb::{IpamConfig, NetworkRecord, NetworkTask, NetworkView, ServiceRecord, Task};
use berth_store::KvReader;
use berth_types::{
    Command, Compare, CompareOp, CompareTarget, RequestOp,
    spec::{DEFAULT_NETWORK, EndpointMode, Network, NetworkSpec, PortMode, Service},
};
use ipnet::Ipv4Net;
use prost::Message;
use tonic::Status;
use tracing::info;

use crate::{
    ipam::{self, Pools},
    node::Ctx,
    objects::{self, Versioned},
    tasks::{self, SERVICES_PREFIX, TASKS_PREFIX},
};

pub(crate) const NETWORKS_PREFIX: &str = "/berth/networks/";
pub(crate) const IPAM_CONFIG_KEY: &str = "/berth/ipam/config";
const NETWORKS_GUARD: &str = "/berth/ipam/networks";
const VIPS_GUARD: &str = "/berth/ipam/vips";

/// What to do on a cluster without pools.
pub(crate) const NO_POOLS: &str = "this cluster has no address pool, so it has no networks (tasks use their \
                                   host's network): start the masters with --address-pool and --vip-pool, and the \
                                   agents as root (`berth dev` does both when run as root)";

pub(crate) fn network_key(ns: &str, name: &str) -> Vec<u8> {
    format!("{NETWORKS_PREFIX}{ns}/{name}").into_bytes()
}

/// The cluster's pools, if it has networks.
pub(crate) fn load_pools(reader: &KvReader) -> Result<Option<Pools>, Status> {
    let Some(cfg) = objects::get::<IpamConfig>(reader, IPAM_CONFIG_KEY.as_bytes())? else { return Ok(None) };
    let parse = |s: &str| {
        s.parse::<Ipv4Net>().map_err(|e| Status::data_loss(format!("the stored address pools are unreadable: {e}")))
    };
    let pools =
        Pools::new(parse(&cfg.obj.address_pool)?, Some(cfg.obj.network_prefix as u8), parse(&cfg.obj.vip_pool)?)
            .map_err(|e| Status::data_loss(format!("the stored address pools are invalid: {e}")))?;
    Ok(Some(pools))
}

/// As a new leader: records this master's pools if the cluster has none yet. A cluster keeps the
/// pools it was given first, since live addresses come from them; other flags are reported.
pub(crate) async fn record_pools(ctx: Arc<Ctx>) {
    let Some(mine) = ctx.pools else { return };
    match load_pools(&ctx.reader) {
        Ok(Some(stored)) if stored == mine => {}
        Ok(Some(stored)) => tracing::warn!(
            "this master's --address-pool/--vip-pool ({} /{}, {}) differ from the cluster's ({} /{}, {}); the \
             cluster's stay in force, since live addresses come from them",
            mine.address,
            mine.network_prefix,
            mine.vip,
            stored.address,
            stored.network_prefix,
            stored.vip
        ),
        Ok(None) => {
            let cfg = IpamConfig {
                address_pool: mine.address.to_string(),
                network_prefix: u32::from(mine.network_prefix),
                vip_pool: mine.vip.to_string(),
            };
            let txn = objects::txn_of(vec![objects::cas_put(IPAM_CONFIG_KEY.into(), 0, cfg.encode_to_vec())]);
            match ctx.write(Command::Txn(txn)).await {
                Ok(_) => {
                    info!(address_pool = %mine.address, vip_pool = %mine.vip, "recorded the cluster's address pools")
                }
                Err(e) => info!("address pools not recorded by this leader: {}", e.message()),
            }
        }
        Err(e) => tracing::warn!("reading the address pools: {}", e.message()),
    }
}

/// The networks a service's tasks join: its list, or its namespace's `default`.
pub(crate) fn service_networks(spec: &Service) -> Vec<String> {
    if spec.spec.task.networks.is_empty() { vec![DEFAULT_NETWORK.to_string()] } else { spec.spec.task.networks.clone() }
}

/// The subnet a record holds and the prefix of its node blocks.
pub(crate) fn record_blocks(r: &NetworkRecord) -> Result<(Ipv4Net, u8), Status> {
    let subnet = record_subnet(r)?;
    Ok((subnet, berth_types::spec::network::recorded_block_prefix(subnet, r.block_prefix)))
}

/// The subnet a record holds.
pub(crate) fn record_subnet(r: &NetworkRecord) -> Result<Ipv4Net, Status> {
    r.subnet.parse().map_err(|e| {
        Status::data_loss(format!("network {}/{} has an unreadable subnet {:?}: {e}", r.namespace, r.name, r.subnet))
    })
}

pub(crate) fn compare_unchanged(key: Vec<u8>, rev: i64) -> (Compare, RequestOp) {
    // A compare with a no-op get: the transaction proceeds only if the key is as read.
    (
        Compare { key: key.clone(), op: CompareOp::Equal, target: CompareTarget::ModRevision(rev) },
        RequestOp::Range(berth_types::RangeQuery { key, count_only: true, ..Default::default() }),
    )
}

/// Subnets with their networks' names, and VNIs.
type Taken = (Vec<(String, Ipv4Net)>, BTreeSet<u32>);

/// The allocations of one `apply`: reads every network (and, when a VIP is needed, every
/// service's VIP) once, then hands out what the documents need.
pub(crate) struct Plan {
    pools: Option<Pools>,
    existing: BTreeMap<(String, String), Versioned<NetworkRecord>>,
    /// Networks this apply creates or changes.
    writes: BTreeMap<(String, String), NetworkRecord>,
    /// Networks this apply's services use, with the revision they were read at.
    used: BTreeMap<(String, String), i64>,
    networks_guard: i64,
    allocated_network: bool,
    vips: Option<BTreeSet<Ipv4Addr>>,
    vips_guard: i64,
    allocated_vip: bool,
}

impl Plan {
    pub fn new(reader: &KvReader) -> Result<Plan, Status> {
        let existing = objects::list::<NetworkRecord>(reader, NETWORKS_PREFIX)?
            .into_iter()
            .map(|v| ((v.obj.namespace.clone(), v.obj.name.clone()), v))
            .collect();
        let networks_guard = reader
            .get(NETWORKS_GUARD.as_bytes())
            .map_err(|e| Status::internal(e.to_string()))?
            .map_or(0, |kv| kv.mod_revision);
        Ok(Plan {
            pools: load_pools(reader)?,
            existing,
            writes: BTreeMap::new(),
            used: BTreeMap::new(),
            networks_guard,
            allocated_network: false,
            vips: None,
            vips_guard: 0,
            allocated_vip: false,
        })
    }

    fn pools(&self) -> Result<Pools, Status> {
        self.pools.ok_or_else(|| Status::failed_precondition(NO_POOLS))
    }

    /// Every subnet (with its network's name) and VNI held, this plan's included.
    fn taken(&self) -> Result<Taken, Status> {
        let mut subnets = Vec::new();
        let mut vnis = BTreeSet::new();
        let written = self.writes.values();
        let stored = self.existing.iter().filter(|(k, _)| !self.writes.contains_key(*k)).map(|(_, v)| &v.obj);
        for r in written.chain(stored) {
            subnets.push((format!("{}/{}", r.namespace, r.name), record_subnet(r)?));
            vnis.insert(r.vni);
        }
        Ok((subnets, vnis))
    }

    fn allocate(&mut self, ns: &str, name: &str, spec: &NetworkSpec, now: i64) -> Result<NetworkRecord, Status> {
        let pools = self.pools()?;
        let (subnets, vnis) = self.taken()?;
        let subnet = ipam::allocate_subnet(&pools, &subnets, spec.subnet).map_err(|e| match e {
            ipam::IpamError::Overlap { .. } => Status::invalid_argument(format!("network {ns}/{name}: {e}")),
            _ => Status::resource_exhausted(format!("network {ns}/{name}: {e}")),
        })?;
        let block_prefix = match spec.block_prefix {
            Some(p) => {
                berth_types::spec::network::check_block_prefix(subnet, p)
                    .map_err(|e| Status::invalid_argument(format!("network {ns}/{name}: {e}")))?;
                p
            }
            None => berth_types::spec::network::block_prefix(subnet.prefix_len()),
        };
        let vni = ipam::allocate_vni(&vnis).map_err(|e| Status::resource_exhausted(e.to_string()))?;
        self.allocated_network = true;
        Ok(NetworkRecord {
            namespace: ns.to_string(),
            name: name.to_string(),
            subnet: subnet.to_string(),
            vni,
            internal: spec.internal,
            block_prefix: u32::from(block_prefix),
            created_at_ms: now,
            updated_at_ms: now,
            ..Default::default()
        })
    }

    /// A `kind: Network` document: creates the network or updates what may change (`internal`,
    /// labels). Returns the action (`created`, `updated`, `unchanged`) and what changed.
    pub fn network(&mut self, doc: &Network, now: i64) -> Result<(&'static str, Vec<String>), Status> {
        let (ns, name) = (doc.metadata.namespace.clone(), doc.metadata.name.clone());
        let json = doc.canonical_json();
        let id = (ns.clone(), name.clone());
        let Some(current) = self.existing.get(&id) else {
            let mut rec = self.allocate(&ns, &name, &doc.spec, now)?;
            rec.spec_json = json;
            let changes = vec![format!("(new network: subnet {}, VNI {})", rec.subnet, rec.vni)];
            self.writes.insert(id, rec);
            return Ok(("created", changes));
        };
        let old = &current.obj;
        if old.deleting {
            return Err(Status::failed_precondition(format!(
                "network {ns}/{name} is being deleted; apply it again once `berth delete network {name}` has finished"
            )));
        }
        if let Some(subnet) = doc.spec.subnet
            && subnet.to_string() != old.subnet
        {
            return Err(Status::invalid_argument(format!(
                "network {ns}/{name} has subnet {}; a network's subnet cannot change while it exists (tasks hold \
                 addresses in it): omit `subnet` to keep it, or delete the network and apply it again",
                old.subnet
            )));
        }
        if let Some(p) = doc.spec.block_prefix {
            let (subnet, held) = record_blocks(old)?;
            if p != held {
                return Err(Status::invalid_argument(format!(
                    "network {ns}/{name} ({subnet}) has blocks of /{held}; block_prefix cannot change while the \
                     network exists (nodes hold blocks): omit it to keep /{held}, or delete the network and apply \
                     it again"
                )));
            }
        }
        if old.spec_json == json && !old.implicit {
            return Ok(("unchanged", vec![]));
        }
        let mut rec = old.clone();
        let mut changes = Vec::new();
        if rec.internal != doc.spec.internal {
            changes.push(format!("spec.internal: {} -> {}", rec.internal, doc.spec.internal));
        }
        if rec.implicit {
            changes.push("(now defined by a document)".into());
        }
        rec.internal = doc.spec.internal;
        rec.implicit = false;
        rec.spec_json = json;
        rec.updated_at_ms = now;
        self.writes.insert(id, rec);
        Ok(("updated", changes))
    }

    /// The networks a service of this apply joins must exist (in this apply or stored, not being
    /// deleted); a namespace's `default` is created on first use. Nothing to do on a cluster
    /// without pools, unless the service names networks.
    pub fn service(&mut self, svc: &Service, now: i64) -> Result<(), Status> {
        let ns = &svc.metadata.namespace;
        if self.pools.is_none() {
            if let Some(i) = svc.spec.task.ports.iter().position(|p| p.published_mode(false) == Some(PortMode::Ingress))
            {
                return Err(Status::failed_precondition(format!(
                    "service {ns}/{}: spec.task.ports[{i}] asks for mode ingress (the routing mesh), but {NO_POOLS}; \
                     or use mode host",
                    svc.metadata.name
                )));
            }
            if svc.spec.task.networks.is_empty() {
                return Ok(());
            }
            return Err(Status::failed_precondition(format!(
                "service {}/{} names networks in spec.task.networks, but {NO_POOLS}",
                ns, svc.metadata.name
            )));
        }
        for name in service_networks(svc) {
            let id = (ns.clone(), name.clone());
            if self.writes.contains_key(&id) {
                continue;
            }
            match self.existing.get(&id) {
                Some(v) if v.obj.deleting => {
                    return Err(Status::failed_precondition(format!(
                        "service {ns}/{} joins network `{name}`, which is being deleted; apply the network again \
                         or choose another",
                        svc.metadata.name
                    )));
                }
                Some(v) => {
                    self.used.insert(id, v.mod_revision);
                }
                None if name == DEFAULT_NETWORK => {
                    let spec = NetworkSpec::default();
                    let mut rec = self.allocate(ns, &name, &spec, now)?;
                    let doc = Network {
                        kind: berth_types::spec::Kind::Network,
                        metadata: berth_types::spec::Metadata {
                            name: name.clone(),
                            namespace: ns.clone(),
                            labels: Default::default(),
                        },
                        spec,
                    };
                    rec.spec_json = doc.canonical_json();
                    rec.implicit = true;
                    info!(network = %format!("{ns}/{name}"), subnet = %rec.subnet, "creating the namespace's default network");
                    self.writes.insert(id, rec);
                }
                None => {
                    return Err(Status::failed_precondition(format!(
                        "service {ns}/{} joins network `{name}`, which does not exist in namespace {ns}; apply a \
                         `kind: Network` document named {name} (it may be in the same file), or remove it from \
                         spec.task.networks",
                        svc.metadata.name
                    )));
                }
            }
        }
        // The routing mesh reaches the tasks through their first network, from outside berth's
        // networks: an internal network lets nothing in.
        if let Some(i) = svc.spec.task.ports.iter().position(|p| p.published_mode(true) == Some(PortMode::Ingress))
            && let Some(first) = service_networks(svc).into_iter().next()
        {
            let id = (ns.clone(), first.clone());
            let internal = match self.writes.get(&id) {
                Some(r) => r.internal,
                None => self.existing.get(&id).is_some_and(|v| v.obj.internal),
            };
            if internal {
                return Err(Status::failed_precondition(format!(
                    "service {ns}/{}: spec.task.ports[{i}] is published on the routing mesh (mode ingress), but its \
                     first network `{first}` is internal and lets no outside traffic in; put a non-internal \
                     network first in spec.task.networks, or use mode host",
                    svc.metadata.name
                )));
            }
        }
        Ok(())
    }

    /// Whether the cluster has address pools (its tasks join networks).
    pub fn has_pools(&self) -> bool {
        self.pools.is_some()
    }

    /// The VIP a service's record should hold: its current one, a new one from the pool, or
    /// none (`dnsrr`, or no pools).
    pub fn vip(&mut self, reader: &KvReader, svc: &Service, current: &str) -> Result<String, Status> {
        let Some(pools) = self.pools else { return Ok(String::new()) };
        if svc.spec.endpoint_mode == EndpointMode::Dnsrr {
            return Ok(String::new());
        }
        if !current.is_empty() {
            return Ok(current.to_string());
        }
        if self.vips.is_none() {
            let mut taken = BTreeSet::new();
            for rec in objects::list::<ServiceRecord>(reader, SERVICES_PREFIX)? {
                if let Ok(a) = rec.obj.vip.parse::<Ipv4Addr>() {
                    taken.insert(a);
                }
            }
            self.vips_guard = reader
                .get(VIPS_GUARD.as_bytes())
                .map_err(|e| Status::internal(e.to_string()))?
                .map_or(0, |kv| kv.mod_revision);
            self.vips = Some(taken);
        }
        let taken = self.vips.get_or_insert_default();
        let vip = ipam::allocate_vip(pools.vip, taken).map_err(|e| {
            Status::resource_exhausted(format!("service {}/{}: {e}", svc.metadata.namespace, svc.metadata.name))
        })?;
        taken.insert(vip);
        self.allocated_vip = true;
        Ok(vip.to_string())
    }

    /// The compare-and-puts that make this plan happen, to add to the apply's transaction.
    pub fn into_parts(self) -> Vec<(Compare, RequestOp)> {
        let mut parts = Vec::new();
        for ((ns, name), rec) in &self.writes {
            let expected = self.existing.get(&(ns.clone(), name.clone())).map_or(0, |v| v.mod_revision);
            parts.push(objects::cas_put(network_key(ns, name), expected, rec.encode_to_vec()));
        }
        for ((ns, name), rev) in &self.used {
            parts.push(compare_unchanged(network_key(ns, name), *rev));
        }
        if self.allocated_network {
            parts.push(objects::cas_put(NETWORKS_GUARD.into(), self.networks_guard, vec![]));
        }
        if self.allocated_vip {
            parts.push(objects::cas_put(VIPS_GUARD.into(), self.vips_guard, vec![]));
        }
        parts
    }
}

/// Every service record in `ns` that joins network `name` (deleting ones too: their tasks may
/// still hold addresses).
pub(crate) fn users(reader: &KvReader, ns: &str, name: &str) -> Result<Vec<Versioned<ServiceRecord>>, Status> {
    let mut out = Vec::new();
    for rec in objects::list::<ServiceRecord>(reader, &format!("{SERVICES_PREFIX}{ns}/"))? {
        let Ok(spec) = serde_json::from_str::<Service>(&rec.obj.spec_json) else { continue };
        if service_networks(&spec).iter().any(|n| n == name) {
            out.push(rec);
        }
    }
    Ok(out)
}

/// A network with the services that join it and their tasks that have not ended.
pub(crate) fn view(reader: &KvReader, rec: Versioned<NetworkRecord>) -> Result<NetworkView, Status> {
    let (ns, name) = (rec.obj.namespace.clone(), rec.obj.name.clone());
    let services: Vec<String> = users(reader, &ns, &name)?.into_iter().map(|s| s.obj.name).collect();
    let mut attached = Vec::new();
    for svc in &services {
        for t in objects::list::<Task>(reader, &format!("{TASKS_PREFIX}{svc}."))? {
            let t = t.obj;
            if t.namespace != ns || t.service != *svc || tasks::is_terminal(tasks::state_of(&t)) {
                continue;
            }
            attached.push(NetworkTask {
                task_id: t.id.clone(),
                service: t.service.clone(),
                node_id: t.node_id.clone(),
                address: t.addresses.get(&name).cloned().unwrap_or_default(),
                state: t.state,
            });
        }
    }
    Ok(NetworkView { record: Some(rec.obj), mod_revision: rec.mod_revision, services, tasks: attached })
}

/// All networks, or those of one namespace.
pub(crate) fn list(reader: &KvReader, ns: &str) -> Result<Vec<NetworkView>, Status> {
    let prefix = if ns.is_empty() { NETWORKS_PREFIX.to_string() } else { format!("{NETWORKS_PREFIX}{ns}/") };
    objects::list::<NetworkRecord>(reader, &prefix)?.into_iter().map(|r| view(reader, r)).collect()
}

/// The writes that give back `node`'s address blocks (a removed node's), each conditional on the
/// network record being unchanged since read. Like Kubernetes' node CIDRs, a block stays with its
/// node while the node exists, whether or not its tasks use the network now.
pub(crate) fn release_blocks(reader: &KvReader, node: &str) -> Result<Vec<(Compare, RequestOp)>, Status> {
    let mut out = Vec::new();
    for rec in objects::list::<NetworkRecord>(reader, NETWORKS_PREFIX)? {
        if rec.obj.blocks.contains_key(node) {
            let mut n = rec.obj.clone();
            n.blocks.remove(node);
            out.push(objects::cas_put(network_key(&n.namespace, &n.name), rec.mod_revision, n.encode_to_vec()));
        }
    }
    Ok(out)
}

pub(crate) fn load(reader: &KvReader, ns: &str, name: &str) -> Result<Versioned<NetworkRecord>, Status> {
    objects::get::<NetworkRecord>(reader, &network_key(ns, name))?
        .ok_or_else(|| Status::not_found(format!("no network {ns}/{name}: list networks with `berth get networks`")))
}

fn refuse_in_use(ns: &str, name: &str, users: &[Versioned<ServiceRecord>]) -> Status {
    let names: Vec<&str> = users.iter().map(|u| u.obj.name.as_str()).collect();
    Status::failed_precondition(format!(
        "network {ns}/{name} is used by {} service{}: {}; delete them, or remove `{name}` from their \
         spec.task.networks and apply them, first",
        names.len(),
        if names.len() == 1 { "" } else { "s" },
        names.join(", ")
    ))
}

/// `berth delete network`: refused while any service joins it. Marks the record `deleting`,
/// checks again (an apply that read the record before the mark fails its compare; one that
/// committed before it is seen now), then deletes it; its subnet and VNI are free after that.
pub(crate) async fn delete(ctx: &Ctx, ns: &str, name: &str) -> Result<NetworkView, Status> {
    ctx.read_barrier().await?;
    let rec = load(&ctx.reader, ns, name)?;
    let using = users(&ctx.reader, ns, name)?;
    if !using.is_empty() {
        return Err(refuse_in_use(ns, name, &using));
    }
    let key = network_key(ns, name);
    let mut marked = rec.obj.clone();
    marked.deleting = true;
    let txn = objects::txn_of(vec![objects::cas_put(key.clone(), rec.mod_revision, marked.encode_to_vec())]);
    let rev = check(ctx.write(Command::Txn(txn)).await?, ns, name)?;
    ctx.read_barrier().await?;
    let using = users(&ctx.reader, ns, name)?;
    if !using.is_empty() {
        let txn = objects::txn_of(vec![objects::cas_put(key, rev, rec.obj.encode_to_vec())]);
        check(ctx.write(Command::Txn(txn)).await?, ns, name)?;
        return Err(refuse_in_use(ns, name, &using));
    }
    check(ctx.write(Command::Txn(objects::txn_of(vec![objects::cas_delete(key, rev)]))).await?, ns, name)?;
    info!(network = %format!("{ns}/{name}"), subnet = %rec.obj.subnet, "network deleted");
    Ok(NetworkView { record: Some(marked), mod_revision: rev, services: vec![], tasks: vec![] })
}

fn check(r: berth_types::CommandResult, ns: &str, name: &str) -> Result<i64, Status> {
    match r {
        berth_types::CommandResult::Txn(t) if t.succeeded => Ok(t.revision),
        berth_types::CommandResult::Txn(_) => Err(Status::aborted(format!(
            "network {ns}/{name} changed while it was being deleted; run the command again"
        ))),
        other => Err(Status::internal(format!("unexpected result {other:?}"))),
    }
}
