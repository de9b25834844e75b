//! Namespaces, bridges, VXLAN devices and veth pairs over netlink (`rtnetlink`).
//!
//! The overlay is routed per node block, as flannel's VXLAN backend is, so the kernel state
//! grows with the number of nodes, not of tasks, and nothing floods or learns:
//!
//! ```text
//!  task netns                 node (the agent's network namespace)                  peer node
//!  eth0 198.18.1.2/24 ──veth── bn-4096 198.18.1.1/24 (bridge, gateway)
//!  default via 198.18.1.1      vx-4096 198.18.1.0/32, MAC 0a:58:c6:12:01:00 (VXLAN 4096, no learning)
//!                              route 198.18.2.0/24 via 198.18.2.0 dev vx-4096 onlink
//!                              neigh 198.18.2.0 lladdr 0a:58:c6:12:02:00 dev vx-4096 permanent
//!                              fdb   0a:58:c6:12:02:00 dst <peer underlay> dev vx-4096 self permanent ──UDP 4789──▶
//! ```
//!
//! A node's VXLAN device takes its block's network address and a MAC derived from it
//! ([`vtep_mac`]), so a peer needs only the node's underlay address and block to reach every
//! task there: one route, one neighbour and one forwarding entry per peer node and network.
//!
//! Task network namespaces are files under a directory of the agent's (bind mounts of
//! `/proc/thread-self/ns/net`), made and entered from a dedicated thread, so the agent's own
//! threads never change namespace and nothing forks.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use netlink_packet_route::{
    AddressFamily,
    link::LinkAttribute,
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourState},
    route::{RouteAddress, RouteAttribute, RouteMessage},
};
use rtnetlink::{Handle, LinkBridge, LinkBridgePort, LinkUnspec, LinkVeth, LinkVxlan, RouteMessageBuilder};

/// The IANA VXLAN port.
pub const VXLAN_PORT: u16 = 4789;
/// VXLAN over IPv4 adds 50 bytes (outer Ethernet, IP, UDP, VXLAN headers).
pub const VXLAN_OVERHEAD: u32 = 50;

/// What went wrong, with what the agent was doing.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct LinkError {
    what: String,
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
}

type Result<T> = std::result::Result<T, LinkError>;

fn ctx<E: std::error::Error + Send + Sync + 'static>(what: impl Into<String>) -> impl FnOnce(E) -> LinkError {
    let what = what.into();
    move |e| LinkError { what, source: Box::new(e) }
}

fn io_err(msg: String) -> std::io::Error {
    std::io::Error::other(msg)
}

/// The MAC a node's VXLAN device has in the network whose block on that node is `block`: a
/// locally administered unicast address holding the block's network address, so peers derive it
/// instead of learning it.
pub fn vtep_mac(block: Ipv4Net) -> [u8; 6] {
    let o = block.network().octets();
    [0x0a, 0x58, o[0], o[1], o[2], o[3]]
}

/// The MAC of a node's bridge (its tasks' gateway) in the network whose block on that node is
/// `block`: locally administered, unicast, and distinct from [`vtep_mac`].
pub fn bridge_mac(block: Ipv4Net) -> [u8; 6] {
    let o = block.network().octets();
    [0x0a, 0x59, o[0], o[1], o[2], o[3]]
}

/// A peer node in one network: where its VXLAN packets go, and which block lives behind it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Peer {
    pub underlay: Ipv4Addr,
    pub block: Ipv4Net,
}

/// One network on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkLinks {
    pub bridge: String,
    pub vxlan: String,
    pub vni: u32,
    /// This node's block of the network.
    pub block: Ipv4Net,
    /// This node's underlay address (the VXLAN source).
    pub underlay: Ipv4Addr,
    /// The MTU of the underlay device (tasks get this minus the VXLAN overhead).
    pub underlay_mtu: u32,
}

impl NetworkLinks {
    /// The gateway tasks use: the block's first host address, on the bridge.
    pub fn gateway(&self) -> Ipv4Addr {
        berth_types::spec::network::block_gateway(self.block)
    }

    pub fn mtu(&self) -> u32 {
        self.underlay_mtu.saturating_sub(VXLAN_OVERHEAD)
    }
}

/// One interface of a task: the veth pair joining its namespace to a network's bridge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskInterface {
    /// The host end (on the bridge), at most 15 bytes.
    pub host_name: String,
    /// The name inside the task (`eth0`, `eth1`, ...).
    pub inside_name: String,
    pub bridge: String,
    /// The task's address with its block's prefix.
    pub address: Ipv4Net,
    pub gateway: Ipv4Addr,
    pub mtu: u32,
    /// Route the default route through this interface (the task's first non-internal network);
    /// otherwise only `subnet` is routed through it.
    pub default_route: bool,
    /// The network's whole subnet (reached through the gateway).
    pub subnet: Ipv4Net,
}

/// Netlink in the agent's network namespace.
#[derive(Clone)]
pub struct Links {
    handle: Handle,
}

impl Links {
    /// A netlink connection in the calling thread's network namespace, driven by the current
    /// tokio runtime.
    pub fn open() -> Result<Links> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(ctx("opening a netlink socket"))?;
        tokio::spawn(conn);
        Ok(Links { handle })
    }

    /// The index of link `name`, if it exists.
    pub async fn index(&self, name: &str) -> Result<Option<u32>> {
        let mut links = self.handle.link().get().match_name(name.to_string()).execute();
        match links.try_next().await {
            Ok(Some(l)) => Ok(Some(l.header.index)),
            Ok(None) => Ok(None),
            // ENODEV: no such link.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -19 => Ok(None),
            Err(e) => Err(ctx(format!("looking up link {name}"))(e)),
        }
    }

    /// The index and MTU of the interface that holds `addr` (the underlay device).
    pub async fn underlay(&self, addr: Ipv4Addr) -> Result<(u32, u32)> {
        let mut addrs = self.handle.address().get().execute();
        while let Some(a) = addrs.try_next().await.map_err(ctx("listing addresses"))? {
            let holds = a.attributes.iter().any(|at| {
                matches!(at, netlink_packet_route::address::AddressAttribute::Local(IpAddr::V4(v)) if *v == addr)
                    || matches!(at, netlink_packet_route::address::AddressAttribute::Address(IpAddr::V4(v)) if *v == addr)
            });
            if holds {
                let index = a.header.index;
                let mut links = self.handle.link().get().match_index(index).execute();
                let mtu = match links.try_next().await.map_err(ctx("reading the underlay link"))? {
                    Some(l) => {
                        l.attributes.iter().find_map(|a| if let LinkAttribute::Mtu(m) = a { Some(*m) } else { None })
                    }
                    None => None,
                };
                return Ok((index, mtu.unwrap_or(1500)));
            }
        }
        Err(LinkError {
            what: format!("finding the interface that holds the underlay address {addr}"),
            source: Box::new(io_err("no interface has it; give the agent --advertise-addr of this host".into())),
        })
    }

    /// Creates (or adopts) the network's bridge and VXLAN device, with their addresses, and
    /// brings them up. Idempotent: an agent restart finds them in place and changes nothing.
    pub async fn ensure_network(&self, n: &NetworkLinks) -> Result<()> {
        let (underlay_index, _) = self.underlay(n.underlay).await?;
        let mtu = n.mtu();
        if self.index(&n.bridge).await?.is_none() {
            self.handle
                .link()
                .add(LinkBridge::new(&n.bridge).mtu(mtu).build())
                .execute()
                .await
                .map_err(ctx(format!("creating bridge {}", n.bridge)))?;
        }
        let bridge = self.index(&n.bridge).await?.ok_or_else(|| missing(&n.bridge))?;
        let gw = Ipv4Net::new(n.gateway(), n.block.prefix_len()).map_err(ctx("the gateway address"))?;
        self.ensure_address(bridge, gw).await?;
        // A MAC of its own, set, not inherited: a bridge without one takes its lowest port's,
        // and changes it when that port (a task's veth) goes, leaving every task's ARP entry
        // for the gateway (its DNS, its VIPs, its egress) pointing at a MAC that is gone.
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(bridge).address(bridge_mac(n.block).to_vec()).up().build())
            .execute()
            .await
            .map_err(ctx(format!("bringing up bridge {}", n.bridge)))?;

        if self.index(&n.vxlan).await?.is_none() {
            let vx = LinkVxlan::new(&n.vxlan, n.vni)
                .dev(underlay_index)
                .local(n.underlay)
                .port(VXLAN_PORT)
                .learning(false)
                .mtu(mtu)
                .address(vtep_mac(n.block).to_vec())
                .build();
            self.handle.link().add(vx).execute().await.map_err(ctx(format!("creating VXLAN device {}", n.vxlan)))?;
        }
        let vx = self.index(&n.vxlan).await?.ok_or_else(|| missing(&n.vxlan))?;
        let own = Ipv4Net::new(n.block.network(), 32).map_err(ctx("the VXLAN address"))?;
        self.ensure_address(vx, own).await?;
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(vx).up().build())
            .execute()
            .await
            .map_err(ctx(format!("bringing up {}", n.vxlan)))?;
        Ok(())
    }

    async fn ensure_address(&self, index: u32, addr: Ipv4Net) -> Result<()> {
        let mut existing = self.handle.address().get().set_link_index_filter(index).execute();
        while let Some(a) = existing.try_next().await.map_err(ctx("listing addresses"))? {
            let has = a.header.prefix_len == addr.prefix_len()
                && a.attributes.iter().any(|at| {
                    matches!(at, netlink_packet_route::address::AddressAttribute::Address(IpAddr::V4(v)) if *v == addr.addr())
                });
            if has {
                return Ok(());
            }
        }
        self.handle
            .address()
            .add(index, IpAddr::V4(addr.addr()), addr.prefix_len())
            .execute()
            .await
            .map_err(ctx(format!("adding address {addr}")))
    }

    /// Makes the network's peers exactly `peers`: a route, a neighbour and a forwarding entry per
    /// peer node; entries of peers that left are removed. Returns (added, removed).
    pub async fn set_peers(&self, n: &NetworkLinks, peers: &[Peer]) -> Result<(usize, usize)> {
        let vx = self.index(&n.vxlan).await?.ok_or_else(|| missing(&n.vxlan))?;
        let want: BTreeSet<Peer> = peers.iter().copied().filter(|p| p.block != n.block).collect();
        let have = self.peers_of(vx).await?;
        let mut added = 0;
        for p in want.difference(&have) {
            self.add_peer(vx, p).await?;
            added += 1;
        }
        let mut removed = 0;
        for p in have.difference(&want) {
            self.remove_peer(vx, p).await?;
            removed += 1;
        }
        Ok((added, removed))
    }

    /// The peers programmed on VXLAN device `vx`, read back from its routes and FDB.
    async fn peers_of(&self, vx: u32) -> Result<BTreeSet<Peer>> {
        // Block -> VTEP address from the routes; VTEP MAC -> underlay from the FDB.
        let mut blocks = Vec::new();
        let mut routes = self.handle.route().get(RouteMessageBuilder::<Ipv4Addr>::new().build()).execute();
        while let Some(r) = routes.try_next().await.map_err(ctx("listing routes"))? {
            if route_oif(&r) != Some(vx) {
                continue;
            }
            if let Some(dst) = route_dst(&r)
                && let Ok(block) = Ipv4Net::new(dst, r.header.destination_prefix_length)
                && block.prefix_len() < 32
            {
                blocks.push(block);
            }
        }
        let mut fdb: Vec<([u8; 6], Ipv4Addr)> = Vec::new();
        let mut all = self.handle.neighbours().get().set_address_family(AddressFamily::Bridge).execute();
        while let Some(m) = all.try_next().await.map_err(ctx("listing forwarding entries"))? {
            if m.header.ifindex != vx {
                continue;
            }
            let mac = m.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::LinkLayerAddress(l) if l.len() == 6 => Some([l[0], l[1], l[2], l[3], l[4], l[5]]),
                _ => None,
            });
            // In a bridge-family message the destination comes unparsed, as raw bytes.
            let dst = m.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
                NeighbourAttribute::Destination(NeighbourAddress::Other(b)) if b.len() == 4 => {
                    Some(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
                }
                _ => None,
            });
            if let (Some(mac), Some(dst)) = (mac, dst) {
                fdb.push((mac, dst));
            }
        }
        Ok(blocks
            .into_iter()
            .filter_map(|block| {
                let mac = vtep_mac(block);
                fdb.iter().find(|(m, _)| *m == mac).map(|(_, underlay)| Peer { underlay: *underlay, block })
            })
            .collect())
    }

    async fn add_peer(&self, vx: u32, p: &Peer) -> Result<()> {
        let mac = vtep_mac(p.block);
        let vtep = p.block.network();
        self.handle
            .neighbours()
            .add_bridge(vx, &mac)
            .destination(IpAddr::V4(p.underlay))
            .flags(NeighbourFlags::Own)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(ctx(format!("adding the forwarding entry for peer {}", p.underlay)))?;
        self.handle
            .neighbours()
            .add(vx, IpAddr::V4(vtep))
            .link_layer_address(&mac)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(ctx(format!("adding the neighbour entry for block {}", p.block)))?;
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(p.block.network(), p.block.prefix_len())
            .gateway(vtep)
            .output_interface(vx)
            .onlink()
            .build();
        self.handle
            .route()
            .add(route)
            .replace()
            .execute()
            .await
            .map_err(ctx(format!("adding the route to block {}", p.block)))
    }

    async fn remove_peer(&self, vx: u32, p: &Peer) -> Result<()> {
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(p.block.network(), p.block.prefix_len())
            .output_interface(vx)
            .build();
        let _ = self.handle.route().del(route).execute().await;
        let mac = vtep_mac(p.block);
        let mut doomed = Vec::new();
        for family in [AddressFamily::Bridge, AddressFamily::Inet] {
            let mut all = self.handle.neighbours().get().set_address_family(family).execute();
            while let Some(m) = all.try_next().await.map_err(ctx("listing neighbours"))? {
                if m.header.ifindex != vx {
                    continue;
                }
                let is_peer = m.attributes.iter().any(|a| match a {
                    NeighbourAttribute::LinkLayerAddress(l) => l.as_slice() == mac,
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => *ip == p.block.network(),
                    _ => false,
                });
                if is_peer {
                    doomed.push(m);
                }
            }
        }
        for m in doomed {
            self.handle.neighbours().del(m).execute().await.map_err(ctx(format!("removing peer {}", p.underlay)))?;
        }
        Ok(())
    }

    /// Deletes a link if it exists (bridges and VXLAN devices of networks this node left, the
    /// host end of a task's veth).
    pub async fn delete(&self, name: &str) -> Result<bool> {
        match self.index(name).await? {
            Some(i) => {
                self.handle.link().del(i).execute().await.map_err(ctx(format!("deleting link {name}")))?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Plugs a task into a network: a veth pair whose host end joins the bridge and whose other
    /// end, in the task's namespace, gets the task's address and routes. Idempotent: an existing
    /// host end means the task is already plugged.
    pub async fn attach(&self, netns: &Path, i: &TaskInterface) -> Result<()> {
        if self.index(&i.host_name).await?.is_some() {
            return Ok(());
        }
        let bridge = self.index(&i.bridge).await?.ok_or_else(|| missing(&i.bridge))?;
        // The peer starts under a temporary unique name (the inside name is usually taken on the
        // host, e.g. eth0) and is renamed inside the namespace.
        let temp = format!("{}p", &i.host_name[..i.host_name.len().min(14)]);
        self.handle
            .link()
            .add(LinkVeth::new(&i.host_name, &temp).mtu(i.mtu).build())
            .execute()
            .await
            .map_err(ctx(format!("creating veth {}", i.host_name)))?;
        let file = std::fs::File::open(netns).map_err(ctx(format!("opening network namespace {}", netns.display())))?;
        let peer = self.index(&temp).await?.ok_or_else(|| missing(&temp))?;
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(peer).setns_by_fd(file.as_raw_fd()).build())
            .execute()
            .await
            .map_err(ctx(format!("moving {temp} into {}", netns.display())))?;
        let host = self.index(&i.host_name).await?.ok_or_else(|| missing(&i.host_name))?;
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(host).controller(bridge).up().build())
            .execute()
            .await
            .map_err(ctx(format!("adding {} to bridge {}", i.host_name, i.bridge)))?;
        // Hairpin: a task that reaches itself through a VIP gets its packet back on its own port
        // (with br_netfilter the bridge, not the router, sends it back).
        self.handle
            .link()
            .set_port(LinkBridgePort::new(host).hairpin(true).build())
            .execute()
            .await
            .map_err(ctx(format!("setting hairpin mode on {}", i.host_name)))?;
        let inside = i.clone();
        in_netns(netns, move |links| async move { links.configure_inside(&temp, &inside).await }).await
    }

    async fn configure_inside(&self, temp: &str, i: &TaskInterface) -> Result<()> {
        if let Some(lo) = self.index("lo").await? {
            self.handle
                .link()
                .set(LinkUnspec::new_with_index(lo).up().build())
                .execute()
                .await
                .map_err(ctx("bringing up lo"))?;
        }
        let index = self.index(temp).await?.ok_or_else(|| missing(temp))?;
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).name(i.inside_name.clone()).build())
            .execute()
            .await
            .map_err(ctx(format!("renaming {temp} to {}", i.inside_name)))?;
        self.ensure_address(index, i.address).await?;
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(ctx(format!("bringing up {}", i.inside_name)))?;
        let route = if i.default_route {
            RouteMessageBuilder::<Ipv4Addr>::new().gateway(i.gateway).output_interface(index).build()
        } else {
            RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(i.subnet.network(), i.subnet.prefix_len())
                .gateway(i.gateway)
                .output_interface(index)
                .build()
        };
        self.handle.route().add(route).replace().execute().await.map_err(ctx("adding the task's route"))
    }
}

fn missing(name: &str) -> LinkError {
    LinkError { what: format!("link {name}"), source: Box::new(io_err("it vanished right after being made".into())) }
}

fn route_oif(r: &RouteMessage) -> Option<u32> {
    r.attributes.iter().find_map(|a| if let RouteAttribute::Oif(i) = a { Some(*i) } else { None })
}

fn route_dst(r: &RouteMessage) -> Option<Ipv4Addr> {
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(ip)) => Some(*ip),
        _ => None,
    })
}

/// Runs `f` with a netlink connection inside the network namespace at `netns`, on a thread of
/// its own (the namespace is per thread), with its own small runtime.
pub async fn in_netns<F, Fut, T>(netns: &Path, f: F) -> Result<T>
where
    F: FnOnce(Links) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T>>,
    T: Send + 'static,
{
    let path = netns.to_path_buf();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("berth-netns".into())
        .spawn(move || {
            let run = || -> Result<T> {
                let file = std::fs::File::open(&path).map_err(ctx(format!("opening {}", path.display())))?;
                nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(ctx(format!("entering network namespace {}", path.display())))?;
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(ctx("starting a runtime for the namespace"))?;
                rt.block_on(async move { f(Links::open()?).await })
            };
            let _ = tx.send(run());
        })
        .map_err(ctx("starting a thread for the namespace"))?;
    rx.await.map_err(|_| LinkError {
        what: format!("configuring {}", netns.display()),
        source: Box::new(io_err("the namespace thread died".into())),
    })?
}

/// Creates a persistent network namespace at `path` (like `ip netns add`): a new namespace made
/// by a thread of its own, kept by a bind mount of that thread's namespace file. An existing one
/// is kept.
pub fn create_netns(path: &Path) -> std::io::Result<()> {
    if is_netns(path) {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::File::create(path)?;
    let target = path.to_path_buf();
    std::thread::Builder::new()
        .name("berth-netns-new".into())
        .spawn(move || -> std::io::Result<()> {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)?;
            nix::mount::mount(
                Some("/proc/thread-self/ns/net"),
                &target,
                None::<&str>,
                nix::mount::MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(std::io::Error::from)
        })?
        .join()
        .map_err(|_| io_err("the thread creating the namespace panicked".into()))?
        .inspect_err(|_| {
            let _ = std::fs::remove_file(path);
        })
}

/// Keeps the network namespace at `source` (another process's, as `/proc/PID/ns/net`) at `path`
/// too, by a bind mount, as CNI plugins are handed a container's namespace: the agent then plugs
/// it like one of its own. A `path` already holding that namespace is kept; one holding another
/// (a previous container's) is replaced.
pub fn adopt_netns(path: &Path, source: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let wanted = std::fs::metadata(source)?;
    if is_netns(path) {
        let held = std::fs::metadata(path)?;
        if (held.dev(), held.ino()) == (wanted.dev(), wanted.ino()) {
            return Ok(());
        }
        nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH).map_err(std::io::Error::from)?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::File::create(path)?;
    nix::mount::mount(Some(source), path, None::<&str>, nix::mount::MsFlags::MS_BIND, None::<&str>)
        .map_err(std::io::Error::from)
        .inspect_err(|_| {
            let _ = std::fs::remove_file(path);
        })
}

/// Whether `path` is a mounted network namespace file.
pub fn is_netns(path: &Path) -> bool {
    // A bind-mounted nsfs file lives on the nsfs filesystem (magic 0x6e736673).
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 == 0x6e73_6673)
}

/// Removes a namespace made by [`create_netns`]; its interfaces go with it once nothing else
/// holds it.
pub fn delete_netns(path: &Path) -> std::io::Result<()> {
    if is_netns(path) {
        nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH).map_err(std::io::Error::from)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Where the agent keeps its task namespaces.
pub fn netns_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("netns")
}

/// A link name from a prefix and an id, within the kernel's 15 bytes: the prefix and a short
/// hash of the id (64-bit FNV-1a: stable across builds, so a restarted or upgraded agent finds
/// the links it made).
pub fn link_name(prefix: &str, id: &str) -> String {
    let hash = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3));
    let hex = format!("{hash:016x}");
    let keep = 15usize.saturating_sub(prefix.len()).min(hex.len());
    format!("{prefix}{}", &hex[..keep])
}

#[cfg(test)]
mod tests;
