//! The node's overlay: what the leader said about the networks this node uses (a [`View`],
//! kept on disk so the data plane survives an agent restart with no master reachable), the
//! addresses this node handed out from its blocks ([`Leases`]), and [`Overlay`], which makes
//! the kernel match them: links (`link`), the nftables table (`nft`) and DNS (`dns`).
//!
//! Level-triggered, like tasks: every update (and a start) reconciles the whole view, and each
//! piece changes only what differs, so a reconcile with nothing new costs a few reads.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
};

use berth_api::pb::agent::{AssignmentsKind, NetworkUpdate};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{
    dns::{self, DnsConfig, DnsServer, EndpointMode, NamedPort, NetworkRecords, PortProtocol, Records, TaskRecord},
    link::{self, Links, NetworkLinks, Peer, TaskInterface},
    nft::{self, Desired, NetworkRules, Nft, Proto, ServiceLb, ServicePort},
};

/// One network as the leader described it to this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetView {
    pub subnet: Ipv4Net,
    pub vni: u32,
    pub internal: bool,
    /// This node's block; `None` until the leader gives it one.
    pub block: Option<Ipv4Net>,
    /// Other nodes' underlay addresses and blocks.
    pub peers: Vec<(Ipv4Addr, Ipv4Net)>,
}

/// One service on the node's networks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SvcView {
    pub vip: Option<Ipv4Addr>,
    pub dnsrr: bool,
    /// (name, protocol, port); unnamed ports have an empty name.
    pub ports: Vec<(String, String, u16)>,
    /// The routing mesh: (protocol, published port, container port) of its ingress ports.
    #[serde(default)]
    pub ingress: Vec<(String, u16, u16)>,
    /// Network keys (`namespace/name`).
    pub networks: Vec<String>,
    /// Running and healthy tasks: id -> network key -> address.
    pub endpoints: BTreeMap<String, BTreeMap<String, Ipv4Addr>>,
}

/// Everything the leader said, by network and service key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct View {
    pub version: u64,
    pub networks: BTreeMap<String, NetView>,
    pub services: BTreeMap<String, SvcView>,
}

/// An update that does not follow the version the node has: ask for a COMPLETE one.
#[derive(Debug, PartialEq, Eq)]
pub struct Gap {
    pub have: u64,
    pub base: u64,
}

fn parse_net(s: &str) -> Option<Ipv4Net> {
    s.parse().ok()
}

impl View {
    /// Applies an update: a COMPLETE one replaces the view, an INCREMENTAL one must follow the
    /// view's version. Entries that do not parse are skipped with a warning (a newer master's
    /// format), never half-applied.
    pub fn apply(&mut self, u: &NetworkUpdate) -> std::result::Result<(), Gap> {
        let complete = u.kind == AssignmentsKind::Complete as i32;
        if !complete && u.base_version != self.version {
            return Err(Gap { have: self.version, base: u.base_version });
        }
        if complete {
            self.networks.clear();
            self.services.clear();
        }
        for n in &u.removed_networks {
            self.networks.remove(n);
        }
        for s in &u.removed_services {
            self.services.remove(s);
        }
        for n in &u.networks {
            let Some(subnet) = parse_net(&n.subnet) else {
                warn!(network = %n.key, subnet = %n.subnet, "skipping a network with an unreadable subnet");
                continue;
            };
            let peers = n.peers.iter().filter_map(|p| Some((p.underlay.parse().ok()?, parse_net(&p.block)?))).collect();
            self.networks.insert(
                n.key.clone(),
                NetView { subnet, vni: n.vni, internal: n.internal, block: parse_net(&n.block), peers },
            );
        }
        for s in &u.services {
            let endpoints = s
                .endpoints
                .iter()
                .map(|e| {
                    let addrs = e.addresses.iter().filter_map(|(k, v)| Some((k.clone(), v.parse().ok()?))).collect();
                    (e.task_id.clone(), addrs)
                })
                .collect();
            self.services.insert(
                s.key.clone(),
                SvcView {
                    vip: s.vip.parse().ok(),
                    dnsrr: s.endpoint_mode == "dnsrr",
                    ports: s.ports.iter().map(|p| (p.name.clone(), p.protocol.clone(), p.port as u16)).collect(),
                    ingress: s
                        .ports
                        .iter()
                        .filter(|p| p.ingress != 0)
                        .map(|p| (p.protocol.clone(), p.ingress as u16, p.port as u16))
                        .collect(),
                    networks: s.networks.clone(),
                    endpoints,
                },
            );
        }
        self.version = u.version;
        Ok(())
    }
}

/// Addresses handed out: network key -> task id -> address. An address is free again only
/// after its task's namespace is gone ([`Overlay::detach`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leases {
    pub by_network: BTreeMap<String, BTreeMap<String, Ipv4Addr>>,
}

impl Leases {
    /// The task's address in `block` of network `key`: the one it holds, or the lowest free one.
    pub fn lease(&mut self, key: &str, block: Ipv4Net, task: &str) -> Option<Ipv4Addr> {
        let held = self.by_network.entry(key.to_string()).or_default();
        if let Some(a) = held.get(task).filter(|a| block.contains(*a)) {
            return Some(*a);
        }
        let used: BTreeSet<Ipv4Addr> = held.values().copied().collect();
        let free = berth_types::spec::network::block_hosts(block).find(|a| !used.contains(a))?;
        held.insert(task.to_string(), free);
        Some(free)
    }

    pub fn release(&mut self, task: &str) {
        for held in self.by_network.values_mut() {
            held.remove(task);
        }
        self.by_network.retain(|_, h| !h.is_empty());
    }
}

/// The overlay's settings on this node.
#[derive(Clone, Debug)]
pub struct OverlayConfig {
    /// Where `overlay.json` and the task namespaces live.
    pub dir: PathBuf,
    /// This node's underlay address (VXLAN source, what peers send to).
    pub underlay: Ipv4Addr,
    /// The cluster domain.
    pub domain: String,
    /// The DNS port on each network's gateway (53; tests use another).
    pub dns_port: u16,
    /// The nftables table (`ip <name>`).
    pub nft_table: String,
}

#[derive(Default, Serialize, Deserialize)]
struct Stored {
    view: View,
    leases: Leases,
    /// Published host ports of the tasks on networks here: task id -> ports.
    #[serde(default)]
    host_ports: BTreeMap<String, Vec<HostPort>>,
}

/// A host port published by a task on networks: connections to it on this node's addresses
/// are forwarded into the task's namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostPort {
    /// `tcp` or `udp`.
    pub protocol: String,
    pub published: u16,
    pub container: u16,
}

/// What a task gets from [`Overlay::attach`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attached {
    /// The task's network namespace file.
    pub netns: PathBuf,
    /// Network name (in the task's namespace) -> address.
    pub addresses: BTreeMap<String, Ipv4Addr>,
    /// The text of the task's /etc/resolv.conf.
    pub resolv_conf: String,
}

/// Why the overlay could not do something.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error(transparent)]
    Link(#[from] link::LinkError),
    #[error(transparent)]
    Nft(#[from] nft::NftError),
    #[error("{0}")]
    Other(String),
}

type Result<T> = std::result::Result<T, OverlayError>;

fn bridge_name(vni: u32) -> String {
    format!("bn-{vni}")
}

fn vxlan_name(vni: u32) -> String {
    format!("vx-{vni}")
}

/// The node's overlay data plane.
pub struct Overlay {
    cfg: OverlayConfig,
    links: Links,
    nft: Option<Nft>,
    dns: DnsServer,
    stored: Stored,
    underlay_mtu: u32,
}

impl Overlay {
    /// Opens the data plane in the calling thread's network namespace (the host's), loads what
    /// the node knew, and makes the kernel match it, so a restarted agent serves its networks
    /// before any master answers.
    pub async fn start(cfg: OverlayConfig) -> Result<Overlay> {
        std::fs::create_dir_all(&cfg.dir).map_err(|e| OverlayError::Other(format!("{}: {e}", cfg.dir.display())))?;
        let stored: Stored = match std::fs::read(cfg.dir.join("overlay.json")) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                OverlayError::Other(format!(
                    "{}: unreadable ({e}); move it away to start the overlay empty (the leader resends it)",
                    cfg.dir.join("overlay.json").display()
                ))
            })?,
            Err(_) => Stored::default(),
        };
        let links = Links::open()?;
        let (_, underlay_mtu) = links.underlay(cfg.underlay).await?;
        let table = cfg.nft_table.clone();
        let nft = tokio::task::spawn_blocking(move || Nft::open(&table))
            .await
            .map_err(|e| OverlayError::Other(e.to_string()))??;
        let upstreams =
            std::fs::read_to_string("/etc/resolv.conf").map(|t| dns::parse_nameservers(&t)).unwrap_or_default();
        let dns = dns::start(
            Vec::<(SocketAddr, String)>::new(),
            Records::default(),
            DnsConfig { domain: cfg.domain.clone(), upstreams, ..Default::default() },
        )
        .await
        .map_err(|e| OverlayError::Other(format!("starting DNS: {e}")))?;
        let mut o = Overlay { cfg, links, nft: Some(nft), dns, stored, underlay_mtu };
        o.reconcile().await?;
        Ok(o)
    }

    /// Networks this node has attached.
    pub fn network_count(&self) -> usize {
        self.stored.view.networks.len()
    }

    pub fn view(&self) -> &View {
        &self.stored.view
    }

    fn save(&self) -> Result<()> {
        let path = self.cfg.dir.join("overlay.json");
        let tmp = self.cfg.dir.join("overlay.json.tmp");
        let text = serde_json::to_vec(&self.stored).map_err(|e| OverlayError::Other(e.to_string()))?;
        std::fs::write(&tmp, text)
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(|e| OverlayError::Other(format!("writing {}: {e}", path.display())))
    }

    /// Applies a leader's update and reconciles. `Err(Gap)` inside `Ok`: ask for a COMPLETE one.
    pub async fn update(&mut self, u: &NetworkUpdate) -> Result<std::result::Result<(), Gap>> {
        if let Err(gap) = self.stored.view.apply(u) {
            return Ok(Err(gap));
        }
        self.save()?;
        self.reconcile().await?;
        Ok(Ok(()))
    }

    fn network_links(&self, n: &NetView) -> Option<NetworkLinks> {
        Some(NetworkLinks {
            bridge: bridge_name(n.vni),
            vxlan: vxlan_name(n.vni),
            vni: n.vni,
            block: n.block?,
            underlay: self.cfg.underlay,
            underlay_mtu: self.underlay_mtu,
        })
    }

    /// Makes links, nftables and DNS match the view.
    pub async fn reconcile(&mut self) -> Result<()> {
        let view = self.stored.view.clone();
        // Links: every network with a block here.
        for n in view.networks.values() {
            let Some(nl) = self.network_links(n) else { continue };
            self.links.ensure_network(&nl).await?;
            let peers: Vec<Peer> = n.peers.iter().map(|(u, b)| Peer { underlay: *u, block: *b }).collect();
            self.links.set_peers(&nl, &peers).await?;
        }
        // nftables: networks, and VIPs of services with endpoints reachable on them.
        let mut desired = Desired::default();
        for (key, n) in &view.networks {
            if n.block.is_none() {
                continue;
            }
            let subnet = nft::Subnet::new(n.subnet.network(), n.subnet.prefix_len())?;
            desired.networks.insert(
                key.clone(),
                NetworkRules {
                    bridge: bridge_name(n.vni),
                    vxlan: Some(vxlan_name(n.vni)),
                    subnet,
                    internal: n.internal,
                },
            );
        }
        for (key, s) in &view.services {
            let Some(vip) = s.vip else { continue };
            let ports: Vec<ServicePort> = s
                .ports
                .iter()
                .filter_map(|(_, proto, port)| {
                    let proto = proto.parse::<Proto>().ok()?;
                    Some(ServicePort { proto, port: *port, target_port: *port })
                })
                .collect();
            if ports.is_empty() {
                continue;
            }
            // Each endpoint by its address on the first of the service's networks this node has.
            let net = s.networks.iter().find(|n| view.networks.contains_key(*n));
            let endpoints = s
                .endpoints
                .values()
                .filter_map(|addrs| net.and_then(|n| addrs.get(n)).copied())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            desired.services.insert(key.clone(), ServiceLb { vip, ports, endpoints });
        }
        // The routing mesh: each ingress port to every endpoint of its service, by the endpoint's
        // address on a network this node has a block of (the leader gives every node one of
        // the service's first network).
        for (key, s) in &view.services {
            for (proto, published, container) in &s.ingress {
                let Ok(proto) = proto.parse::<Proto>() else { continue };
                let endpoints = s
                    .endpoints
                    .values()
                    .filter_map(|addrs| {
                        s.networks
                            .iter()
                            .filter(|n| view.networks.get(*n).is_some_and(|v| v.block.is_some()))
                            .find_map(|n| addrs.get(n))
                            .map(|a| (*a, *container))
                    })
                    .collect();
                if let Some(other) =
                    desired.ingress.insert((proto, *published), nft::IngressPort { service: key.clone(), endpoints })
                {
                    warn!(port = %format!("{published}/{proto}"), service = %key, other = %other.service,
                        "two services publish one routing-mesh port; the masters refuse this at apply time");
                }
            }
        }
        // Published host ports of local tasks, to the task's address on its first network.
        for (task, ports) in &self.stored.host_ports {
            let Some(addr) = self.stored.leases.by_network.values().find_map(|held| held.get(task)).copied() else {
                continue;
            };
            for p in ports {
                if let Ok(proto) = p.protocol.parse::<Proto>() {
                    if desired.ingress.contains_key(&(proto, p.published)) {
                        warn!(task = %task, port = %format!("{}/{proto}", p.published),
                            "a host-mode port is also on the routing mesh, which takes it");
                        continue;
                    }
                    desired.host_ports.insert((proto, p.published), (addr, p.container));
                }
            }
        }
        if let Some(mut nft) = self.nft.take() {
            let (nft, changed) = tokio::task::spawn_blocking(move || {
                let r = nft.apply(&desired);
                (nft, r)
            })
            .await
            .map_err(|e| OverlayError::Other(e.to_string()))?;
            self.nft = Some(nft);
            changed?;
        }
        // DNS: a listener on each network's gateway, answering for the services on it.
        let mut records = Records::default();
        for key in view.networks.keys() {
            let namespace = key.split('/').next().unwrap_or_default().to_string();
            let services = view
                .services
                .iter()
                .filter(|(_, s)| s.networks.contains(key))
                .map(|(skey, s)| {
                    let (ns, name) = skey.split_once('/').unwrap_or(("", skey));
                    dns::ServiceRecord {
                        name: name.to_string(),
                        namespace: ns.to_string(),
                        vip: s.vip,
                        endpoint_mode: if s.dnsrr { EndpointMode::Dnsrr } else { EndpointMode::Vip },
                        ports: s
                            .ports
                            .iter()
                            .filter(|(name, _, _)| !name.is_empty())
                            .map(|(name, proto, port)| NamedPort {
                                name: name.clone(),
                                protocol: if proto == "udp" { PortProtocol::Udp } else { PortProtocol::Tcp },
                                port: *port,
                            })
                            .collect(),
                        tasks: s
                            .endpoints
                            .iter()
                            .filter_map(|(id, a)| Some(TaskRecord { id: id.clone(), addr: *a.get(key)? }))
                            .collect(),
                    }
                })
                .collect();
            records.networks.insert(key.clone(), NetworkRecords { namespace, services });
        }
        self.dns.set_records(records);
        let want: BTreeMap<SocketAddr, String> = view
            .networks
            .iter()
            .filter_map(|(k, n)| {
                let gw = berth_types::spec::network::block_gateway(n.block?);
                Some((SocketAddr::from((gw, self.cfg.dns_port)), k.clone()))
            })
            .collect();
        let have: BTreeMap<SocketAddr, String> = self.dns.listeners().into_iter().collect();
        for addr in have.keys().filter(|a| !want.contains_key(a)) {
            self.dns.remove_listener(*addr).await;
        }
        for (addr, key) in want.iter().filter(|(a, _)| !have.contains_key(a)) {
            if let Err(e) = self.dns.add_listener(*addr, key).await {
                warn!(%addr, network = %key, "DNS cannot listen on the network's gateway: {e}");
            }
        }
        Ok(())
    }

    /// Whether the leader has sent network `key` (`namespace/name`) with a block for this node.
    pub fn has_network(&self, key: &str) -> bool {
        self.stored.view.networks.get(key).is_some_and(|n| n.block.is_some())
    }

    /// The resolv.conf of a task on `networks` (names in `namespace`): this node's DNS on the
    /// gateway of the first of them. `None` while the leader has not sent that network with a
    /// block for this node.
    pub fn resolv_conf_for(&self, namespace: &str, networks: &[String]) -> Option<String> {
        let first = self.stored.view.networks.get(&format!("{namespace}/{}", networks.first()?))?;
        let gateway = self.network_links(first)?.gateway();
        Some(dns::resolv_conf(gateway, namespace, &self.cfg.domain))
    }

    /// Gives a task its namespace, an address on each of its networks and a resolv.conf.
    /// Idempotent: a task that has them keeps them. `networks` are names in `namespace`.
    ///
    /// The namespace is a new one of the agent's (process tasks, which start inside it), or,
    /// with `source`, the one at that path (a container's `/proc/PID/ns/net`: the agent plugs
    /// the namespace the container runtime made, as CNI does).
    pub async fn attach(
        &mut self,
        task: &str,
        namespace: &str,
        networks: &[String],
        host_ports: &[HostPort],
        source: Option<&Path>,
    ) -> Result<Attached> {
        let netns = link::netns_dir(&self.cfg.dir).join(task);
        match source {
            None => link::create_netns(&netns),
            Some(source) => link::adopt_netns(&netns, source),
        }
        .map_err(|e| OverlayError::Other(format!("creating {}: {e}", netns.display())))?;
        let mut addresses = BTreeMap::new();
        let mut nameserver = None;
        // The default route goes through the first network with egress, else the first one
        // (an internal network's VIPs are outside its subnet too; nftables keeps its traffic
        // inside the overlay).
        let internal =
            |name: &String| self.stored.view.networks.get(&format!("{namespace}/{name}")).is_some_and(|n| n.internal);
        let default_net = networks.iter().position(|n| !internal(n)).unwrap_or(0);
        for (i, name) in networks.iter().enumerate() {
            let key = format!("{namespace}/{name}");
            let Some(n) = self.stored.view.networks.get(&key).cloned() else {
                return Err(OverlayError::Other(format!(
                    "network {key} is not known on this node yet (the leader has not sent it)"
                )));
            };
            let Some(block) = n.block else {
                return Err(OverlayError::Other(format!("network {key} has no address block on this node yet")));
            };
            let addr = self.stored.leases.lease(&key, block, task).ok_or_else(|| {
                OverlayError::Other(format!("network {key}: every address of this node's block {block} is in use"))
            })?;
            self.save()?;
            let nl = self.network_links(&n).ok_or_else(|| OverlayError::Other(format!("network {key}: no block")))?;
            self.links.ensure_network(&nl).await?;
            let default_route = i == default_net;
            let iface = TaskInterface {
                host_name: link::link_name("vt", &format!("{task}/{key}")),
                inside_name: format!("eth{i}"),
                bridge: nl.bridge.clone(),
                address: Ipv4Net::new(addr, block.prefix_len()).map_err(|e| OverlayError::Other(e.to_string()))?,
                gateway: nl.gateway(),
                mtu: nl.mtu(),
                default_route,
                subnet: n.subnet,
            };
            self.links.attach(&netns, &iface).await?;
            nameserver.get_or_insert(nl.gateway());
            addresses.insert(name.clone(), addr);
        }
        let resolv_conf = dns::resolv_conf(nameserver.unwrap_or(Ipv4Addr::LOCALHOST), namespace, &self.cfg.domain);
        info!(task, ?addresses, "task attached to its networks");
        if !host_ports.is_empty() && self.stored.host_ports.get(task).map(Vec::as_slice) != Some(host_ports) {
            self.stored.host_ports.insert(task.to_string(), host_ports.to_vec());
            self.save()?;
            self.reconcile().await?;
        }
        Ok(Attached { netns, addresses, resolv_conf })
    }

    /// Removes a task's namespace (its veths go with it) and frees its addresses.
    pub async fn detach(&mut self, task: &str) -> Result<()> {
        let netns = link::netns_dir(&self.cfg.dir).join(task);
        link::delete_netns(&netns).map_err(|e| OverlayError::Other(format!("removing {}: {e}", netns.display())))?;
        let had_ports = self.stored.host_ports.remove(task).is_some();
        self.stored.leases.release(task);
        self.save()?;
        if had_ports {
            self.reconcile().await?;
        }
        Ok(())
    }

    /// The namespace file of a task attached here.
    pub fn netns_of(&self, task: &str) -> PathBuf {
        link::netns_dir(&self.cfg.dir).join(task)
    }

    pub fn dir(&self) -> &Path {
        &self.cfg.dir
    }
}

#[cfg(test)]
mod tests;
