//! The agent's nftables table: virtual-IP load balancing, isolation between networks, egress
//! masquerade and published host ports for the overlay networks of this host.
//!
//! The agent owns one table, `ip <name>` (normally `ip berth`), in its host's network namespace
//! and touches nothing else. [`Nft::open`] creates it or adopts the one a previous agent left;
//! [`Nft::apply`] takes the whole desired state ([`Desired`]) and changes only what differs;
//! [`Nft::remove`] deletes the table when the agent leaves.
//!
//! # How it talks to the kernel
//!
//! Through the `nft` program with JSON (`nft -j -f -`), using the `nftables` crate's typed schema
//! for tables, chains, rules, statements and expressions. Every change, whatever its size, is ONE
//! `nft` process running ONE batch, which the kernel commits as one atomic transaction: a packet
//! sees either the old ruleset or the new one, and a batch that fails changes nothing. Two gaps
//! of the crate (0.6.3) are filled here: it cannot describe a named map whose values are verdicts
//! (upstream issue nftables-rs#237), so the set and map declarations are written as plain JSON and
//! listings are read object by object (rules through the crate's `Statement`s, sets by hand); and
//! its `apply_ruleset` leaves nft's stderr on the agent's stderr, so this module runs `nft` itself
//! to put nft's message in the error.
//!
//! # The ruleset
//!
//! ```text
//! table ip berth {
//!     map services {        # VIP . protocol . port -> the service port's chain
//!         type ipv4_addr . inet_proto . inet_service : verdict
//!         elements = { 198.19.0.10 . tcp . 80 : goto svc-198.19.0.10-tcp-80 }
//!     }
//!     set no_endpoints {    # service ports that have no endpoint: rejected, not blackholed
//!         type ipv4_addr . inet_proto . inet_service
//!     }
//!     map host_ports {      # published ports of this node -> their chain
//!         type inet_proto . inet_service : verdict
//!         elements = { tcp . 30080 : goto hp-tcp-30080, tcp . 30443 : goto ig-tcp-30443 }
//!     }
//!     set ingress_tcp { type inet_service }   # those on the routing mesh, by protocol
//!     set ingress_udp { type inet_service }
//!     set ifaces { type ifname }              # every network's bridge and VXLAN device
//!     set internal_ifaces { type ifname }     # those of internal networks
//!     set allowed { type ifname . ifname }    # (in, out) pairs within one network
//!     set subnets { type ipv4_addr; flags interval }  # every network's subnet
//!     set egress { type ipv4_addr; flags interval }   # subnets of non-internal networks
//!
//!     chain nat-prerouting {   # from tasks (over their bridge) and from outside
//!         type nat hook prerouting priority dstnat; policy accept;
//!         ip daddr . meta l4proto . th dport vmap @services
//!         fib daddr type local meta l4proto . th dport vmap @host_ports
//!     }
//!     chain nat-output {       # from the host itself
//!         type nat hook output priority -100; policy accept;
//!         ip daddr . meta l4proto . th dport vmap @services
//!         ip daddr != 127.0.0.0/8 fib daddr type local meta l4proto . th dport vmap @host_ports
//!     }
//!     chain nat-postrouting {
//!         type nat hook postrouting priority srcnat; policy accept;
//!         ct status dnat ip saddr @subnets oifname @ifaces masquerade
//!         ip saddr @egress oifname != @ifaces masquerade
//!         ct status dnat meta l4proto tcp ct original proto-dst @ingress_tcp oifname @ifaces masquerade
//!         ct status dnat meta l4proto udp ct original proto-dst @ingress_udp oifname @ifaces masquerade
//!     }
//!     chain filter-forward {
//!         type filter hook forward priority filter; policy accept;
//!         meta l4proto tcp ip daddr . meta l4proto . th dport @no_endpoints reject with tcp reset
//!         ip daddr . meta l4proto . th dport @no_endpoints reject
//!         iifname . oifname @allowed accept
//!         iifname @ifaces oifname @ifaces drop
//!         iifname @internal_ifaces drop
//!         oifname @internal_ifaces drop
//!     }
//!     chain filter-output {
//!         type filter hook output priority filter; policy accept;
//!         meta l4proto tcp ip daddr . meta l4proto . th dport @no_endpoints reject with tcp reset
//!         ip daddr . meta l4proto . th dport @no_endpoints reject
//!     }
//!
//!     # one chain per service port, one per (service port, endpoint), one per host port:
//!     chain svc-198.19.0.10-tcp-80 {
//!         numgen random mod 2 vmap { 0 : goto ep-198.19.0.10-tcp-80-198.18.1.11-8080,
//!                                    1 : goto ep-198.19.0.10-tcp-80-198.18.1.12-8080 } comment "web"
//!     }
//!     chain ep-198.19.0.10-tcp-80-198.18.1.11-8080 { meta l4proto tcp dnat ip to 198.18.1.11:8080 }
//!     chain ep-198.19.0.10-tcp-80-198.18.1.12-8080 { meta l4proto tcp dnat ip to 198.18.1.12:8080 }
//!     chain hp-tcp-30080 { meta l4proto tcp dnat ip to 198.18.1.11:8080 }
//!     # and one per routing-mesh port, one per (mesh port, endpoint):
//!     chain ig-tcp-30443 {
//!         numgen random mod 2 vmap { 0 : goto ig-tcp-30443-198.18.1.11-8443,
//!                                    1 : goto ig-tcp-30443-198.18.2.11-8443 } comment "web"
//!     }
//!     chain ig-tcp-30443-198.18.1.11-8443 { meta l4proto tcp dnat ip to 198.18.1.11:8443 }
//!     chain ig-tcp-30443-198.18.2.11-8443 { meta l4proto tcp dnat ip to 198.18.2.11:8443 }
//! }
//! ```
//!
//! Every rule of the fixed chains carries a comment `berth/1: ...`; the `1` is the layout
//! version.
//!
//! # Why verdict maps
//!
//! This is the layout of kube-proxy's nftables mode. Finding a packet's service is one hash
//! lookup of `ip daddr . meta l4proto . th dport` in `services`, so the first packet of a
//! connection costs the same with 10 services or 10,000 (iptables-style "one rule per service"
//! walks a list). Only the first packet of a connection goes through the nat chains at all: the
//! NAT binding then lives in conntrack. The service chain picks an endpoint with
//! `numgen random mod N` (uniform), and the endpoint chain DNATs. Since every element of a named
//! map can be added or removed on its own, a service comes and goes without touching any rule.
//!
//! A service port with no endpoint has no `services` element (a nat chain cannot reject) but an
//! element in `no_endpoints`, which the filter chains reject: `tcp reset` for TCP, ICMP port
//! unreachable otherwise, so clients fail fast, as with kube-proxy.
//!
//! # Masquerade
//!
//! - Egress: traffic from the subnet of a non-internal network that leaves through an interface
//!   that is not berth's is masqueraded (`egress` set). Internal networks are in no such set and
//!   their traffic to or from non-berth interfaces is dropped in `filter-forward`.
//! - Service (and host-port) traffic that stays on berth's networks: a DNATed packet from a
//!   network's subnet going out through a berth interface is masqueraded to the host's address on
//!   that interface. Without it the reply would not come back through this host's conntrack: an
//!   endpoint on the same bridge as its client answers the client directly over the bridge (from
//!   its own address, which the client does not expect instead of the VIP), an endpoint on
//!   another node answers over the VXLAN, and a task that reached ITSELF through the VIP (the
//!   hairpin case) would receive a packet whose source is its own address, which Linux drops as a
//!   martian. So clients of a service on its own network are seen by the endpoint as the host's
//!   bridge address. For endpoints on other nodes, the address the host has
//!   on the bridge must be its own (not a gateway address shared by every node), or the remote
//!   node would deliver the reply to itself: that is the link module's business.
//! - `br_netfilter`: when it is active in the host's namespace (`net.bridge.bridge-nf-call-iptables
//!   = 1`, the default in every namespace once the module is loaded, e.g. by Docker), a packet
//!   DNATed to an address on the bridge it came from is bridged, not routed: it goes straight to
//!   the endpoint's port (and is still masqueraded by the rule above, which sees the bridge as its
//!   out interface). In the hairpin case that port is the one it came in by, which a bridge only
//!   does with hairpin mode on: the link module must set hairpin mode on task ports (as
//!   Kubernetes' bridge CNI does). Without `br_netfilter` the packet is routed and needs no
//!   hairpin mode. The tests check both.
//!
//! # The routing mesh
//!
//! A port published in ingress mode is open on every node with networks, whether or not a task
//! of its service runs there (Swarm's routing mesh): its `host_ports` element goes to a balance
//! chain over every endpoint of the service, on this node or elsewhere, by its address on the
//! network the node shares with it (every such node holds a block of the service's first
//! network, so the address is reachable through the bridge or the VXLAN device). Connections
//! from outside are masqueraded to the node's address on that interface (the `ingress_*`
//! rules: the conntrack entry's original destination port is a mesh port), so that the reply
//! comes back through the node that took the connection and its conntrack entry (two sets, one
//! per protocol: nft cannot concatenate the protocol with `ct original proto-dst`); the task sees
//! the node, not the client, as Swarm's ingress does. Host-mode ports keep the client's address.
//!
//! # Isolation
//!
//! `filter-forward` accepts forwarding between two interfaces of one network (`allowed` holds
//! every ordered pair of a network's interfaces, the same interface twice included: a routed
//! packet in and out of one bridge), drops forwarding between interfaces of two different
//! networks, and drops forwarding between an internal network and anything that is not berth's.
//! With `br_netfilter` loaded, bridged packets show the bridge as both their in and out interface,
//! so they match the `bn-X . bn-X` pair and pass. The host itself still reaches every task (that is
//! input/output, not forwarding). Published host ports into a network are reachable from outside
//! berth's networks and from the host; a task of another network reaching them through the host
//! is forwarding between two networks and is dropped (it should use the service's VIP on its own
//! network).
//!
//! # Incremental updates
//!
//! The module keeps a mirror (`Model`) of what the table holds beside the fixed skeleton:
//! each dynamic chain and its body, and the elements of every set and map. `apply` computes the
//! model of the desired state and diffs the two: new chains are created, chains whose body differs
//! (a service whose endpoints changed) are flushed and rewritten, elements are added and removed,
//! and chains no longer wanted are flushed and deleted, in that order, in one batch (so that no
//! command references a chain that does not exist yet or deletes one that is still referenced).
//! The table is never flushed or rewritten as a whole on an update. Established connections
//! survive any update: their NAT lives in conntrack, not in the rules.
//!
//! # Adoption
//!
//! On [`Nft::open`] (and [`Nft::resync`]) the table is read back with `nft -j list table` when it
//! exists: the sets and maps must have the expected types (else the table is rebuilt, in one
//! transaction), the fixed chains must have their hooks and priorities and their rules' comments
//! (a missing or altered fixed chain is repaired in place), and every other chain is parsed into
//! the mirror, as are the elements. The first `apply` then reconciles by diff, so an agent restart
//! with the same desired state changes nothing and no connection is dropped.
//!
//! All calls are synchronous (they wait for `nft`); from async code, run them with
//! `tokio::task::spawn_blocking`.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::str::FromStr;

use nftables::expr::{
    Expression, Fib, FibFlag, FibResult, Meta, MetaKey, NamedExpression, NgMode, Numgen, Payload, PayloadField, Prefix,
    SetItem, Verdict,
};
use nftables::schema::{Chain, FlushObject, NfCmd, NfListObject, Rule, Table};
use nftables::stmt::{JumpTarget, Match, NAT, NATFamily, Operator, Reject, RejectType, Statement, VerdictMap};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook, RejectCode};
use serde_json::{Value, json};

/// The version of the fixed layout, in the comment of every fixed rule.
const LAYOUT: &str = "berth/1";

/// The longest comment nft accepts is 128 bytes; service keys are cut to this.
const MAX_COMMENT: usize = 120;

/// Linux interface names are at most 15 bytes.
const MAX_IFNAME: usize = 15;

// ---------------------------------------------------------------------------------------------
// Public types
// ---------------------------------------------------------------------------------------------

/// A transport protocol a service or host port is published on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// The name nft uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }

    fn from_nft(v: &Value) -> Option<Proto> {
        match v {
            Value::String(s) => s.parse().ok(),
            Value::Number(n) => match n.as_u64()? {
                6 => Some(Proto::Tcp),
                17 => Some(Proto::Udp),
                _ => None,
            },
            _ => None,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Proto {
    type Err = NftError;

    fn from_str(s: &str) -> Result<Proto, NftError> {
        match s {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            _ => Err(NftError::Invalid(format!("unknown protocol {s:?}: use tcp or udp"))),
        }
    }
}

/// An IPv4 subnet, `addr/len`, with no host bits set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Subnet {
    addr: Ipv4Addr,
    len: u8,
}

impl Subnet {
    /// `addr/len`; refuses a length over 32 and host bits set in `addr`.
    pub fn new(addr: Ipv4Addr, len: u8) -> Result<Subnet, NftError> {
        if len > 32 {
            return Err(NftError::Invalid(format!("subnet {addr}/{len}: the prefix length is at most 32")));
        }
        let subnet = Subnet { addr, len };
        if u32::from(addr) & !subnet.mask() != 0 {
            let net = Ipv4Addr::from(u32::from(addr) & subnet.mask());
            return Err(NftError::Invalid(format!("subnet {addr}/{len} has host bits set: did you mean {net}/{len}?")));
        }
        Ok(subnet)
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    fn mask(&self) -> u32 {
        if self.len == 0 { 0 } else { u32::MAX << (32 - u32::from(self.len)) }
    }

    fn last(&self) -> u32 {
        u32::from(self.addr) | !self.mask()
    }

    fn overlaps(&self, other: &Subnet) -> bool {
        u32::from(self.addr) <= other.last() && u32::from(other.addr) <= self.last()
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Subnet {
    type Err = NftError;

    fn from_str(s: &str) -> Result<Subnet, NftError> {
        let bad = || NftError::Invalid(format!("{s:?} is not an IPv4 subnet (write it as 198.18.1.0/24)"));
        let (addr, len) = s.split_once('/').ok_or_else(bad)?;
        Subnet::new(addr.parse().map_err(|_| bad())?, len.parse().map_err(|_| bad())?)
    }
}

/// One port of a service: clients connect to `VIP:port` over `proto`, endpoints listen on
/// `target_port`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePort {
    pub proto: Proto,
    pub port: u16,
    pub target_port: u16,
}

/// A service's load balancing: its virtual IP, its ports and the addresses of its endpoints
/// (tasks), on this node or elsewhere in the network. No endpoint: connections are rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceLb {
    pub vip: Ipv4Addr,
    pub ports: Vec<ServicePort>,
    pub endpoints: Vec<Ipv4Addr>,
}

/// One network as this node sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkRules {
    /// The network's bridge on this node (e.g. `bn-<vni>`).
    pub bridge: String,
    /// The network's VXLAN device (e.g. `vx-<vni>`), when it has one.
    pub vxlan: Option<String>,
    pub subnet: Subnet,
    /// No traffic to or from outside berth's networks, and no masquerade.
    pub internal: bool,
}

/// Everything the table should express. Keys of `services` and `networks` are the caller's
/// names (they show up in comments and error messages only).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub services: BTreeMap<String, ServiceLb>,
    pub networks: BTreeMap<String, NetworkRules>,
    /// `(protocol, host port) -> (task address, container port)`.
    pub host_ports: BTreeMap<(Proto, u16), (Ipv4Addr, u16)>,
    /// The routing mesh: `(protocol, published port) ->` the service's endpoints. A port in
    /// both maps goes to the mesh (the masters refuse such conflicts at apply time).
    pub ingress: BTreeMap<(Proto, u16), IngressPort>,
}

/// A port of the routing mesh: where connections to it on this node go.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IngressPort {
    /// The service's name (the balance chain's comment).
    pub service: String,
    /// `(task address, container port)` of every endpoint, here or on other nodes. None: the
    /// port is closed here (nothing is forwarded).
    pub endpoints: Vec<(Ipv4Addr, u16)>,
}

/// What one [`Nft::apply`] changed. A map element whose value changed counts as one deleted and
/// one added.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub chains_added: usize,
    pub chains_rewritten: usize,
    pub chains_deleted: usize,
    pub elements_added: usize,
    pub elements_deleted: usize,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        *self == Changes::default()
    }
}

impl fmt::Display for Changes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "chains +{} ~{} -{}, elements +{} -{}",
            self.chains_added, self.chains_rewritten, self.chains_deleted, self.elements_added, self.elements_deleted
        )
    }
}

/// What [`Nft::open`] or [`Nft::resync`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opened {
    /// There was no table: it was created, empty.
    Created,
    /// The table had the expected shape: its content was read back as is.
    Adopted,
    /// Fixed sets or chains were missing or altered and were put back; the rest was read back.
    Repaired,
    /// The table's sets or base chains had another shape (another layout version, or hand-made):
    /// it was deleted and created again, empty, in one transaction.
    Rebuilt,
}

/// How to run `nft`.
#[derive(Clone, Debug)]
pub struct Options {
    /// The `nft` program (default: `nft`, found in `PATH`).
    pub nft: PathBuf,
}

impl Default for Options {
    fn default() -> Options {
        Options { nft: PathBuf::from("nft") }
    }
}

/// What went wrong, and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error(
        "cannot run {program}: not found; install nftables (`apt-get install nftables`) or give the path of nft in nft::Options"
    )]
    NftMissing { program: String },

    #[error("cannot run {program} to {what}: {source}")]
    Spawn {
        program: String,
        what: String,
        #[source]
        source: std::io::Error,
    },

    #[error("nft is not allowed to {what}: it needs CAP_NET_ADMIN, run the agent as root (nft said: {stderr})")]
    PermissionDenied { what: String, stderr: String },

    #[error(
        "nft failed to {what} (nothing was changed): {stderr}; check that the kernel has nf_tables with nat, fib, numgen and reject support (nft_nat, nft_fib_ipv4, nft_numgen, nft_reject_ipv4) and nft is 1.0 or newer"
    )]
    Failed { what: String, stderr: String },

    #[error("cannot make sense of `nft -j {what}`: {detail}; is nft 1.0 or newer?")]
    BadListing { what: String, detail: String },

    #[error("invalid desired state: {0}")]
    Invalid(String),
}

// ---------------------------------------------------------------------------------------------
// The mirror
// ---------------------------------------------------------------------------------------------

/// `(VIP, protocol, port)`.
type SvcKey = (Ipv4Addr, Proto, u16);

/// The body of a dynamic chain (always a single rule).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Body {
    /// `numgen random mod N vmap { i : goto targets[i] }`, commented with the service's name.
    Balance { comment: Option<String>, targets: Vec<String> },
    /// `meta l4proto P dnat ip to addr:port`.
    Dnat { proto: Proto, addr: Ipv4Addr, port: u16 },
    /// Anything else found in the table: never what is desired, so it is rewritten or deleted.
    Other,
}

/// What the table holds beside the fixed skeleton (or should hold).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Model {
    chains: BTreeMap<String, Body>,
    services: BTreeMap<SvcKey, String>,
    no_endpoints: BTreeSet<SvcKey>,
    host_ports: BTreeMap<(Proto, u16), String>,
    ingress_ports: BTreeSet<(Proto, u16)>,
    ifaces: BTreeSet<String>,
    internal_ifaces: BTreeSet<String>,
    allowed: BTreeSet<(String, String)>,
    subnets: BTreeSet<Subnet>,
    egress: BTreeSet<Subnet>,
}

fn svc_chain((vip, proto, port): SvcKey) -> String {
    format!("svc-{vip}-{proto}-{port}")
}

fn ep_chain((vip, proto, port): SvcKey, addr: Ipv4Addr, target_port: u16) -> String {
    format!("ep-{vip}-{proto}-{port}-{addr}-{target_port}")
}

fn hp_chain(proto: Proto, port: u16) -> String {
    format!("hp-{proto}-{port}")
}

fn ig_chain(proto: Proto, port: u16) -> String {
    format!("ig-{proto}-{port}")
}

fn ig_ep_chain(proto: Proto, port: u16, addr: Ipv4Addr, target_port: u16) -> String {
    format!("ig-{proto}-{port}-{addr}-{target_port}")
}

fn comment_for(name: &str) -> String {
    let mut end = name.len().min(MAX_COMMENT);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].to_string()
}

fn check_ifname(network: &str, name: &str) -> Result<(), NftError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_IFNAME
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == b'"' || b.is_ascii_whitespace() || b.is_ascii_control());
    if ok {
        Ok(())
    } else {
        Err(NftError::Invalid(format!(
            "network {network:?}: {name:?} is not a valid interface name (1 to {MAX_IFNAME} bytes, no '/', ':', quote or space)"
        )))
    }
}

impl Model {
    /// The model of a desired state, after checking it.
    fn from_desired(d: &Desired) -> Result<Model, NftError> {
        let mut m = Model::default();
        let mut owner: BTreeMap<SvcKey, &str> = BTreeMap::new();
        for (name, svc) in &d.services {
            let endpoints: BTreeSet<Ipv4Addr> = svc.endpoints.iter().copied().collect();
            for p in &svc.ports {
                if p.port == 0 || p.target_port == 0 {
                    return Err(NftError::Invalid(format!(
                        "service {name:?}: port {}/{} -> {}: ports must not be 0",
                        p.port, p.proto, p.target_port
                    )));
                }
                let key = (svc.vip, p.proto, p.port);
                if let Some(other) = owner.insert(key, name) {
                    return Err(NftError::Invalid(format!(
                        "services {other:?} and {name:?} both use {}:{}/{}",
                        svc.vip, p.port, p.proto
                    )));
                }
                if endpoints.is_empty() {
                    m.no_endpoints.insert(key);
                    continue;
                }
                let mut targets = Vec::with_capacity(endpoints.len());
                for &addr in &endpoints {
                    let chain = ep_chain(key, addr, p.target_port);
                    m.chains.insert(chain.clone(), Body::Dnat { proto: p.proto, addr, port: p.target_port });
                    targets.push(chain);
                }
                let chain = svc_chain(key);
                m.chains.insert(chain.clone(), Body::Balance { comment: Some(comment_for(name)), targets });
                m.services.insert(key, chain);
            }
        }
        for (&(proto, port), ig) in &d.ingress {
            if port == 0 || ig.endpoints.iter().any(|(_, p)| *p == 0) {
                return Err(NftError::Invalid(format!(
                    "routing-mesh port {port}/{proto} of {:?}: ports must not be 0",
                    ig.service
                )));
            }
            m.ingress_ports.insert((proto, port));
            let endpoints: BTreeSet<(Ipv4Addr, u16)> = ig.endpoints.iter().copied().collect();
            if endpoints.is_empty() {
                continue;
            }
            let mut targets = Vec::with_capacity(endpoints.len());
            for (addr, target_port) in endpoints {
                let chain = ig_ep_chain(proto, port, addr, target_port);
                m.chains.insert(chain.clone(), Body::Dnat { proto, addr, port: target_port });
                targets.push(chain);
            }
            let chain = ig_chain(proto, port);
            m.chains.insert(chain.clone(), Body::Balance { comment: Some(comment_for(&ig.service)), targets });
            m.host_ports.insert((proto, port), chain);
        }
        for (&(proto, port), &(addr, target_port)) in &d.host_ports {
            if d.ingress.contains_key(&(proto, port)) {
                continue;
            }
            if port == 0 || target_port == 0 {
                return Err(NftError::Invalid(format!(
                    "host port {port}/{proto} -> {addr}:{target_port}: ports must not be 0"
                )));
            }
            let chain = hp_chain(proto, port);
            m.chains.insert(chain.clone(), Body::Dnat { proto, addr, port: target_port });
            m.host_ports.insert((proto, port), chain);
        }
        let mut iface_owner: BTreeMap<&str, &str> = BTreeMap::new();
        let mut subnet_owner: Vec<(Subnet, &str)> = Vec::new();
        for (name, net) in &d.networks {
            let mut ifaces = vec![net.bridge.as_str()];
            ifaces.extend(net.vxlan.as_deref());
            for &iface in &ifaces {
                check_ifname(name, iface)?;
                if let Some(other) = iface_owner.insert(iface, name)
                    && other != name
                {
                    return Err(NftError::Invalid(format!(
                        "networks {other:?} and {name:?} both use interface {iface:?}"
                    )));
                }
            }
            for &a in &ifaces {
                for &b in &ifaces {
                    m.allowed.insert((a.to_string(), b.to_string()));
                }
                m.ifaces.insert(a.to_string());
                if net.internal {
                    m.internal_ifaces.insert(a.to_string());
                }
            }
            if let Some((_, other)) = subnet_owner.iter().find(|(s, _)| s.overlaps(&net.subnet)) {
                return Err(NftError::Invalid(format!(
                    "networks {other:?} and {name:?} have overlapping subnets ({} and others)",
                    net.subnet
                )));
            }
            subnet_owner.push((net.subnet, name));
            m.subnets.insert(net.subnet);
            if !net.internal {
                m.egress.insert(net.subnet);
            }
        }
        Ok(m)
    }
}

// ---------------------------------------------------------------------------------------------
// The fixed skeleton
// ---------------------------------------------------------------------------------------------

/// A set or map of the skeleton.
struct SetDef {
    name: &'static str,
    key: &'static [&'static str],
    /// `Some("verdict")` for a verdict map.
    map: Option<&'static str>,
    interval: bool,
}

const SVC_KEY: &[&str] = &["ipv4_addr", "inet_proto", "inet_service"];

const SETS: &[SetDef] = &[
    SetDef { name: "services", key: SVC_KEY, map: Some("verdict"), interval: false },
    SetDef { name: "no_endpoints", key: SVC_KEY, map: None, interval: false },
    SetDef { name: "host_ports", key: &["inet_proto", "inet_service"], map: Some("verdict"), interval: false },
    SetDef { name: "ingress_tcp", key: &["inet_service"], map: None, interval: false },
    SetDef { name: "ingress_udp", key: &["inet_service"], map: None, interval: false },
    SetDef { name: "ifaces", key: &["ifname"], map: None, interval: false },
    SetDef { name: "internal_ifaces", key: &["ifname"], map: None, interval: false },
    SetDef { name: "allowed", key: &["ifname", "ifname"], map: None, interval: false },
    SetDef { name: "subnets", key: &["ipv4_addr"], map: None, interval: true },
    SetDef { name: "egress", key: &["ipv4_addr"], map: None, interval: true },
];

/// A base chain of the skeleton and its rules (comment, statements).
struct BaseChain {
    name: &'static str,
    kind: NfChainType,
    hook: NfHook,
    prio: i32,
    rules: Vec<(String, Vec<Statement<'static>>)>,
}

fn s(v: impl Into<Cow<'static, str>>) -> Expression<'static> {
    Expression::String(v.into())
}

fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(PayloadField {
        protocol: protocol.into(),
        field: field.into(),
    })))
}

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn concat(items: Vec<Expression<'static>>) -> Expression<'static> {
    Expression::Named(NamedExpression::Concat(items))
}

fn is(left: Expression<'static>, op: Operator, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}

fn goto(target: &str) -> Expression<'static> {
    Expression::Verdict(Verdict::Goto(JumpTarget { target: target.to_string().into() }))
}

/// `ip daddr . meta l4proto . th dport`.
fn svc_lookup_key() -> Expression<'static> {
    concat(vec![payload("ip", "daddr"), meta(MetaKey::L4proto), payload("th", "dport")])
}

fn fib_daddr_local() -> Statement<'static> {
    let mut flags = HashSet::new();
    flags.insert(FibFlag::Daddr);
    is(Expression::Named(NamedExpression::Fib(Fib { result: FibResult::Type, flags })), Operator::EQ, s("local"))
}

/// Masquerade for routing-mesh connections of one protocol leaving through a berth interface.
fn mesh_rule(proto: Proto) -> (String, Vec<Statement<'static>>) {
    (
        rule_comment(&format!("routing mesh ({proto})")),
        vec![
            is(ct_status(), Operator::IN, s("dnat")),
            is(meta(MetaKey::L4proto), Operator::EQ, s(proto.as_str())),
            is(
                Expression::Named(NamedExpression::CT(nftables::expr::CT {
                    key: "proto-dst".into(),
                    family: None,
                    dir: Some(nftables::expr::CTDir::Original),
                })),
                Operator::EQ,
                s(format!("@{}", mesh_set(proto))),
            ),
            is(meta(MetaKey::Oifname), Operator::EQ, s("@ifaces")),
            Statement::Masquerade(None),
        ],
    )
}

fn mesh_set(proto: Proto) -> &'static str {
    match proto {
        Proto::Tcp => "ingress_tcp",
        Proto::Udp => "ingress_udp",
    }
}

/// `ct status`.
fn ct_status() -> Expression<'static> {
    Expression::Named(NamedExpression::CT(nftables::expr::CT { key: "status".into(), family: None, dir: None }))
}

fn rule_comment(what: &str) -> String {
    format!("{LAYOUT}: {what}")
}

fn no_endpoint_rules() -> Vec<(String, Vec<Statement<'static>>)> {
    vec![
        (
            rule_comment("no endpoints (tcp)"),
            vec![
                is(meta(MetaKey::L4proto), Operator::EQ, s("tcp")),
                is(svc_lookup_key(), Operator::EQ, s("@no_endpoints")),
                Statement::Reject(Some(Reject::new(Some(RejectType::TCPReset), None))),
            ],
        ),
        (
            rule_comment("no endpoints"),
            vec![
                is(svc_lookup_key(), Operator::EQ, s("@no_endpoints")),
                Statement::Reject(Some(Reject::new(Some(RejectType::ICMP), Some(RejectCode::PortUnreach)))),
            ],
        ),
    ]
}

fn base_chains() -> Vec<BaseChain> {
    let services = || {
        (
            rule_comment("services"),
            vec![Statement::VerdictMap(VerdictMap { key: svc_lookup_key(), data: s("@services") })],
        )
    };
    let host_ports_vmap = || {
        Statement::VerdictMap(VerdictMap {
            key: concat(vec![meta(MetaKey::L4proto), payload("th", "dport")]),
            data: s("@host_ports"),
        })
    };
    let loopback = Expression::Named(NamedExpression::Prefix(Prefix { addr: Box::new(s("127.0.0.0")), len: 8 }));
    let mut forward = no_endpoint_rules();
    forward.extend([
        (
            rule_comment("within a network"),
            vec![
                is(concat(vec![meta(MetaKey::Iifname), meta(MetaKey::Oifname)]), Operator::EQ, s("@allowed")),
                Statement::Accept(None),
            ],
        ),
        (
            rule_comment("across networks"),
            vec![
                is(meta(MetaKey::Iifname), Operator::EQ, s("@ifaces")),
                is(meta(MetaKey::Oifname), Operator::EQ, s("@ifaces")),
                Statement::Drop(None),
            ],
        ),
        (
            rule_comment("out of an internal network"),
            vec![is(meta(MetaKey::Iifname), Operator::EQ, s("@internal_ifaces")), Statement::Drop(None)],
        ),
        (
            rule_comment("into an internal network"),
            vec![is(meta(MetaKey::Oifname), Operator::EQ, s("@internal_ifaces")), Statement::Drop(None)],
        ),
    ]);
    vec![
        BaseChain {
            name: "nat-prerouting",
            kind: NfChainType::NAT,
            hook: NfHook::Prerouting,
            prio: -100,
            rules: vec![services(), (rule_comment("host ports"), vec![fib_daddr_local(), host_ports_vmap()])],
        },
        BaseChain {
            name: "nat-output",
            kind: NfChainType::NAT,
            hook: NfHook::Output,
            prio: -100,
            rules: vec![
                services(),
                (
                    rule_comment("host ports"),
                    vec![is(payload("ip", "daddr"), Operator::NEQ, loopback), fib_daddr_local(), host_ports_vmap()],
                ),
            ],
        },
        BaseChain {
            name: "nat-postrouting",
            kind: NfChainType::NAT,
            hook: NfHook::Postrouting,
            prio: 100,
            rules: vec![
                (
                    rule_comment("service traffic within the networks"),
                    vec![
                        is(ct_status(), Operator::IN, s("dnat")),
                        is(payload("ip", "saddr"), Operator::EQ, s("@subnets")),
                        is(meta(MetaKey::Oifname), Operator::EQ, s("@ifaces")),
                        Statement::Masquerade(None),
                    ],
                ),
                (
                    rule_comment("egress"),
                    vec![
                        is(payload("ip", "saddr"), Operator::EQ, s("@egress")),
                        is(meta(MetaKey::Oifname), Operator::NEQ, s("@ifaces")),
                        Statement::Masquerade(None),
                    ],
                ),
                mesh_rule(Proto::Tcp),
                mesh_rule(Proto::Udp),
            ],
        },
        BaseChain { name: "filter-forward", kind: NfChainType::Filter, hook: NfHook::Forward, prio: 0, rules: forward },
        BaseChain {
            name: "filter-output",
            kind: NfChainType::Filter,
            hook: NfHook::Output,
            prio: 0,
            rules: no_endpoint_rules(),
        },
    ]
}

// ---------------------------------------------------------------------------------------------
// Batches
// ---------------------------------------------------------------------------------------------

/// One nft transaction being built: a list of JSON commands.
struct Batch<'t> {
    table: &'t str,
    cmds: Vec<Value>,
}

impl<'t> Batch<'t> {
    fn new(table: &'t str) -> Batch<'t> {
        Batch { table, cmds: Vec::new() }
    }

    fn is_empty(&self) -> bool {
        self.cmds.is_empty()
    }

    fn cmd(&mut self, cmd: NfCmd<'_>) {
        // Serializing the crate's types cannot fail: they contain no map with non-string keys.
        self.cmds.push(serde_json::to_value(cmd).unwrap_or(Value::Null));
    }

    fn table_obj(&self) -> Table<'static> {
        Table { family: NfFamily::IP, name: self.table.to_string().into(), handle: None }
    }

    fn chain_obj(&self, name: &str) -> Chain<'static> {
        Chain {
            family: NfFamily::IP,
            table: self.table.to_string().into(),
            name: name.to_string().into(),
            ..Chain::default()
        }
    }

    fn add_table(&mut self) {
        let t = self.table_obj();
        self.cmd(NfCmd::Add(NfListObject::Table(t)));
    }

    fn delete_table(&mut self) {
        let t = self.table_obj();
        self.cmd(NfCmd::Delete(NfListObject::Table(t)));
    }

    /// Written by hand: the crate's `Map` cannot say `"map": "verdict"`.
    fn add_set(&mut self, def: &SetDef) {
        let mut obj = json!({
            "family": "ip",
            "table": self.table,
            "name": def.name,
            "type": if def.key.len() == 1 { json!(def.key[0]) } else { json!(def.key) },
        });
        if let Some(map) = def.map {
            obj["map"] = json!(map);
        }
        if def.interval {
            obj["flags"] = json!(["interval"]);
        }
        let kind = if def.map.is_some() { "map" } else { "set" };
        self.cmds.push(json!({ "add": { kind: obj } }));
    }

    fn add_base_chain(&mut self, c: &BaseChain) {
        let chain = Chain {
            _type: Some(c.kind),
            hook: Some(c.hook),
            prio: Some(c.prio),
            policy: Some(NfChainPolicy::Accept),
            ..self.chain_obj(c.name)
        };
        self.cmd(NfCmd::Add(NfListObject::Chain(chain)));
    }

    fn add_chain(&mut self, name: &str) {
        let chain = self.chain_obj(name);
        self.cmd(NfCmd::Add(NfListObject::Chain(chain)));
    }

    fn flush_chain(&mut self, name: &str) {
        let chain = self.chain_obj(name);
        self.cmd(NfCmd::Flush(FlushObject::Chain(chain)));
    }

    fn delete_chain(&mut self, name: &str) {
        let chain = self.chain_obj(name);
        self.cmd(NfCmd::Delete(NfListObject::Chain(chain)));
    }

    fn add_rule(&mut self, chain: &str, comment: Option<String>, expr: Vec<Statement<'static>>) {
        let rule = Rule {
            family: NfFamily::IP,
            table: self.table.to_string().into(),
            chain: chain.to_string().into(),
            expr: expr.into(),
            handle: None,
            index: None,
            comment: comment.map(Cow::Owned),
        };
        self.cmd(NfCmd::Add(NfListObject::Rule(rule)));
    }

    fn add_body(&mut self, chain: &str, body: &Body) {
        match body {
            Body::Balance { comment, targets } => {
                let items = targets
                    .iter()
                    .enumerate()
                    .map(|(i, t)| SetItem::Mapping(Expression::Number(i as u32), goto(t)))
                    .collect();
                let vmap = Statement::VerdictMap(VerdictMap {
                    key: Expression::Named(NamedExpression::Numgen(Numgen {
                        mode: NgMode::Random,
                        ng_mod: targets.len() as u32,
                        offset: None,
                    })),
                    data: Expression::Named(NamedExpression::Set(items)),
                });
                self.add_rule(chain, comment.clone(), vec![vmap]);
            }
            Body::Dnat { proto, addr, port } => {
                let dnat = Statement::DNAT(Some(NAT {
                    addr: Some(s(addr.to_string())),
                    family: Some(NATFamily::IP),
                    port: Some(Expression::Number(u32::from(*port))),
                    flags: None,
                }));
                self.add_rule(chain, None, vec![is(meta(MetaKey::L4proto), Operator::EQ, s(proto.as_str())), dnat]);
            }
            // Never desired.
            Body::Other => {}
        }
    }

    /// `add element` / `delete element` with all of `elems` in one command.
    fn elements(&mut self, add: bool, set: &str, elems: Vec<Expression<'static>>) {
        if elems.is_empty() {
            return;
        }
        let element = nftables::schema::Element {
            family: NfFamily::IP,
            table: self.table.to_string().into(),
            name: set.to_string().into(),
            elem: elems.into(),
        };
        let obj = NfListObject::Element(element);
        self.cmd(if add { NfCmd::Add(obj) } else { NfCmd::Delete(obj) });
    }

    fn payload(&self) -> String {
        json!({ "nftables": self.cmds }).to_string()
    }

    /// The table, its sets and maps, its base chains and their rules.
    fn skeleton(&mut self) {
        self.add_table();
        for def in SETS {
            self.add_set(def);
        }
        for c in base_chains() {
            self.add_base_chain(&c);
            for (comment, expr) in c.rules {
                self.add_rule(c.name, Some(comment), expr);
            }
        }
    }
}

fn svc_elem((vip, proto, port): SvcKey) -> Expression<'static> {
    concat(vec![s(vip.to_string()), s(proto.as_str()), Expression::Number(u32::from(port))])
}

fn hp_elem((proto, port): (Proto, u16)) -> Expression<'static> {
    concat(vec![s(proto.as_str()), Expression::Number(u32::from(port))])
}

fn subnet_elem(net: &Subnet) -> Expression<'static> {
    Expression::Named(NamedExpression::Prefix(Prefix {
        addr: Box::new(s(net.addr.to_string())),
        len: u32::from(net.len),
    }))
}

fn pair_elem((a, b): &(String, String)) -> Expression<'static> {
    concat(vec![s(a.clone()), s(b.clone())])
}

/// Deletions (keys) and additions of a set.
fn diff_set<K: Ord + Clone>(have: &BTreeSet<K>, want: &BTreeSet<K>) -> (Vec<K>, Vec<K>) {
    (have.difference(want).cloned().collect(), want.difference(have).cloned().collect())
}

/// Deletions (keys) and additions of a map; a changed value is both.
fn diff_map<K: Ord + Clone, V: PartialEq + Clone>(
    have: &BTreeMap<K, V>,
    want: &BTreeMap<K, V>,
) -> (Vec<K>, Vec<(K, V)>) {
    let del = have.iter().filter(|(k, v)| want.get(*k) != Some(*v)).map(|(k, _)| k.clone()).collect();
    let add = want.iter().filter(|(k, v)| have.get(*k) != Some(*v)).map(|(k, v)| (k.clone(), v.clone())).collect();
    (del, add)
}

/// The batch taking the table from `have` to `want`, and what it changes.
fn diff(batch: &mut Batch<'_>, have: &Model, want: &Model) -> Changes {
    let mut ch = Changes::default();

    // 1. New chains, then their rules (a balance rule may go to an endpoint chain created here).
    let added: Vec<(&String, &Body)> = want.chains.iter().filter(|(n, _)| !have.chains.contains_key(*n)).collect();
    for (name, _) in &added {
        batch.add_chain(name);
    }
    for (name, body) in &added {
        batch.add_body(name, body);
    }
    ch.chains_added = added.len();

    // 2. Chains whose body changed: flushed and rewritten.
    for (name, body) in &want.chains {
        if let Some(old) = have.chains.get(name)
            && old != body
        {
            batch.flush_chain(name);
            batch.add_body(name, body);
            ch.chains_rewritten += 1;
        }
    }

    // 3. Elements: deletions first (an element may be re-added with another value), then additions.
    let mut dels: Vec<(&str, Vec<Expression<'static>>)> = Vec::new();
    let mut adds: Vec<(&str, Vec<Expression<'static>>)> = Vec::new();
    {
        let (d, a) = diff_map(&have.services, &want.services);
        dels.push(("services", d.into_iter().map(svc_elem).collect()));
        adds.push(("services", a.into_iter().map(|(k, c)| Expression::List(vec![svc_elem(k), goto(&c)])).collect()));
        let (d, a) = diff_set(&have.no_endpoints, &want.no_endpoints);
        dels.push(("no_endpoints", d.into_iter().map(svc_elem).collect()));
        adds.push(("no_endpoints", a.into_iter().map(svc_elem).collect()));
        let (d, a) = diff_map(&have.host_ports, &want.host_ports);
        dels.push(("host_ports", d.into_iter().map(hp_elem).collect()));
        adds.push(("host_ports", a.into_iter().map(|(k, c)| Expression::List(vec![hp_elem(k), goto(&c)])).collect()));
        let (d, a) = diff_set(&have.ingress_ports, &want.ingress_ports);
        for proto in [Proto::Tcp, Proto::Udp] {
            let port = |&(p, port): &(Proto, u16)| (p == proto).then_some(Expression::Number(u32::from(port)));
            dels.push((mesh_set(proto), d.iter().filter_map(port).collect()));
            adds.push((mesh_set(proto), a.iter().filter_map(port).collect()));
        }
        for (set, h, w) in
            [("ifaces", &have.ifaces, &want.ifaces), ("internal_ifaces", &have.internal_ifaces, &want.internal_ifaces)]
        {
            let (d, a) = diff_set(h, w);
            dels.push((set, d.into_iter().map(s).collect()));
            adds.push((set, a.into_iter().map(s).collect()));
        }
        let (d, a) = diff_set(&have.allowed, &want.allowed);
        dels.push(("allowed", d.iter().map(pair_elem).collect()));
        adds.push(("allowed", a.iter().map(pair_elem).collect()));
        for (set, h, w) in [("subnets", &have.subnets, &want.subnets), ("egress", &have.egress, &want.egress)] {
            let (d, a) = diff_set(h, w);
            dels.push((set, d.iter().map(subnet_elem).collect()));
            adds.push((set, a.iter().map(subnet_elem).collect()));
        }
    }
    for (set, elems) in dels {
        ch.elements_deleted += elems.len();
        batch.elements(false, set, elems);
    }
    for (set, elems) in adds {
        ch.elements_added += elems.len();
        batch.elements(true, set, elems);
    }

    // 4. Chains no longer wanted: nothing references them any more. All flushed before any is
    //    deleted, so that a service chain's gotos to endpoint chains are gone first.
    let gone: Vec<&String> = have.chains.keys().filter(|n| !want.chains.contains_key(*n)).collect();
    for name in &gone {
        batch.flush_chain(name);
    }
    for name in &gone {
        batch.delete_chain(name);
    }
    ch.chains_deleted = gone.len();
    ch
}

// ---------------------------------------------------------------------------------------------
// Reading a table back
// ---------------------------------------------------------------------------------------------

struct ListedSet {
    kind: &'static str,
    key: Vec<String>,
    map: Option<String>,
    flags: Vec<String>,
    elems: Vec<Value>,
}

struct ListedChain {
    kind: Option<NfChainType>,
    hook: Option<NfHook>,
    prio: Option<i32>,
    rules: Vec<ListedRule>,
}

struct ListedRule {
    comment: Option<String>,
    expr: Value,
}

#[derive(Default)]
struct Listing {
    sets: BTreeMap<String, ListedSet>,
    chains: BTreeMap<String, ListedChain>,
}

fn strings(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect(),
        _ => Vec::new(),
    }
}

fn parse_listing(text: &str) -> Result<Listing, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let objects = v.get("nftables").and_then(Value::as_array).ok_or("no \"nftables\" array")?;
    let mut out = Listing::default();
    for o in objects {
        for kind in ["set", "map"] {
            if let Some(set) = o.get(kind) {
                let name = set.get("name").and_then(Value::as_str).ok_or("a set without a name")?;
                out.sets.insert(
                    name.to_string(),
                    ListedSet {
                        kind: if kind == "set" { "set" } else { "map" },
                        key: strings(set.get("type").unwrap_or(&Value::Null)),
                        map: set.get("map").map(|m| strings(m).join(" . ")),
                        flags: set.get("flags").map(strings).unwrap_or_default(),
                        elems: set.get("elem").and_then(Value::as_array).cloned().unwrap_or_default(),
                    },
                );
            }
        }
        if let Some(chain) = o.get("chain") {
            let c: Chain<'_> = serde_json::from_value(chain.clone()).map_err(|e| format!("chain {chain}: {e}"))?;
            out.chains.insert(
                c.name.to_string(),
                ListedChain { kind: c._type, hook: c.hook, prio: c.prio, rules: Vec::new() },
            );
        }
        if let Some(rule) = o.get("rule") {
            let chain = rule.get("chain").and_then(Value::as_str).ok_or("a rule without a chain")?;
            let listed = ListedRule {
                comment: rule.get("comment").and_then(Value::as_str).map(str::to_string),
                expr: rule.get("expr").cloned().unwrap_or(Value::Null),
            };
            out.chains.get_mut(chain).ok_or_else(|| format!("a rule of unknown chain {chain:?}"))?.rules.push(listed);
        }
    }
    Ok(out)
}

fn parse_ipv4(v: &Value) -> Option<Ipv4Addr> {
    v.as_str()?.parse().ok()
}

fn parse_port(v: &Value) -> Option<u16> {
    match v {
        Value::Number(n) => u16::try_from(n.as_u64()?).ok(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

fn concat_items(v: &Value) -> Option<&Vec<Value>> {
    v.get("concat")?.as_array()
}

fn parse_svc_key(v: &Value) -> Option<SvcKey> {
    match concat_items(v)?.as_slice() {
        [ip, proto, port] => Some((parse_ipv4(ip)?, Proto::from_nft(proto)?, parse_port(port)?)),
        _ => None,
    }
}

fn parse_hp_key(v: &Value) -> Option<(Proto, u16)> {
    match concat_items(v)?.as_slice() {
        [proto, port] => Some((Proto::from_nft(proto)?, parse_port(port)?)),
        _ => None,
    }
}

fn parse_goto(v: &Value) -> Option<String> {
    Some(v.get("goto")?.get("target")?.as_str()?.to_string())
}

fn parse_subnet(v: &Value) -> Option<Subnet> {
    if let Some(p) = v.get("prefix") {
        let len = u8::try_from(p.get("len")?.as_u64()?).ok()?;
        return Subnet::new(parse_ipv4(p.get("addr")?)?, len).ok();
    }
    Subnet::new(parse_ipv4(v)?, 32).ok()
}

/// A map element, `[key, value]`.
fn parse_mapping(v: &Value) -> Option<(&Value, &Value)> {
    match v.as_array()?.as_slice() {
        [k, d] => Some((k, d)),
        _ => None,
    }
}

/// The body of a dynamic chain from its rules.
fn parse_body(rules: &[ListedRule]) -> Body {
    let [rule] = rules else {
        return Body::Other;
    };
    let Ok(stmts) = serde_json::from_value::<Vec<Statement<'static>>>(rule.expr.clone()) else {
        return Body::Other;
    };
    match stmts.as_slice() {
        [Statement::VerdictMap(VerdictMap { key, data })] => {
            let (Expression::Named(NamedExpression::Numgen(ng)), Expression::Named(NamedExpression::Set(items))) =
                (key, data)
            else {
                return Body::Other;
            };
            if ng.mode != NgMode::Random || ng.offset.unwrap_or(0) != 0 || ng.ng_mod as usize != items.len() {
                return Body::Other;
            }
            let mut targets = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let pair = match item {
                    SetItem::Mapping(k, d) => Some((k, d)),
                    SetItem::Element(Expression::List(l)) if l.len() == 2 => Some((&l[0], &l[1])),
                    _ => None,
                };
                match pair {
                    Some((Expression::Number(n), Expression::Verdict(Verdict::Goto(t)))) if *n as usize == i => {
                        targets.push(t.target.to_string())
                    }
                    _ => return Body::Other,
                }
            }
            Body::Balance { comment: rule.comment.clone(), targets }
        }
        [
            Statement::Match(Match { left, right: Expression::String(p), op: Operator::EQ }),
            Statement::DNAT(Some(nat)),
        ] if *left == meta(MetaKey::L4proto) && rule.comment.is_none() => {
            let (Ok(proto), Some(Expression::String(addr)), Some(Expression::Number(port))) =
                (p.parse::<Proto>(), &nat.addr, &nat.port)
            else {
                return Body::Other;
            };
            match (addr.parse(), u16::try_from(*port)) {
                (Ok(addr), Ok(port)) if nat.flags.is_none() => Body::Dnat { proto, addr, port },
                _ => Body::Other,
            }
        }
        _ => Body::Other,
    }
}

/// What adopting a listed table takes.
enum Adoption {
    /// The model of what is there, and the skeleton pieces to put back.
    Adopt { model: Box<Model>, missing_sets: Vec<&'static SetDef>, repair_chains: Vec<BaseChain>, missing: Vec<String> },
    /// Not in a shape that can be repaired in place: why.
    Rebuild(String),
}

fn adopt(listing: &Listing) -> Adoption {
    let mut missing_sets = Vec::new();
    let mut missing = Vec::new();
    for def in SETS {
        match listing.sets.get(def.name) {
            None => {
                missing_sets.push(def);
                missing.push(format!("set {}", def.name));
            }
            Some(set) => {
                let kind = if def.map.is_some() { "map" } else { "set" };
                let flags_ok = set.flags.iter().any(|f| f == "interval") == def.interval;
                if set.kind != kind || set.key != def.key || set.map.as_deref() != def.map || !flags_ok {
                    return Adoption::Rebuild(format!(
                        "{} {} has type {} {:?} (flags {:?}), expected {} {:?}",
                        set.kind,
                        def.name,
                        set.key.join(" . "),
                        set.map,
                        set.flags,
                        def.key.join(" . "),
                        def.map
                    ));
                }
            }
        }
    }
    let mut repair_chains = Vec::new();
    let bases = base_chains();
    for c in bases {
        match listing.chains.get(c.name) {
            None => {
                missing.push(format!("chain {}", c.name));
                repair_chains.push(c);
            }
            Some(l) => {
                if l.kind != Some(c.kind) || l.hook != Some(c.hook) || l.prio != Some(c.prio) {
                    return Adoption::Rebuild(format!(
                        "chain {} is {:?} hook {:?} priority {:?}, expected {:?} hook {:?} priority {}",
                        c.name, l.kind, l.hook, l.prio, c.kind, c.hook, c.prio
                    ));
                }
                let have: Vec<Option<&str>> = l.rules.iter().map(|r| r.comment.as_deref()).collect();
                let want: Vec<Option<&str>> = c.rules.iter().map(|(comment, _)| Some(comment.as_str())).collect();
                if have != want {
                    missing.push(format!("rules of chain {}", c.name));
                    repair_chains.push(c);
                }
            }
        }
    }

    let mut m = Model::default();
    for (name, chain) in &listing.chains {
        if chain.hook.is_some() {
            if !base_chains().iter().any(|c| c.name == name) {
                return Adoption::Rebuild(format!("unknown base chain {name}"));
            }
            continue;
        }
        m.chains.insert(name.clone(), parse_body(&chain.rules));
    }
    let none = Vec::new();
    let elems = |name: &str| listing.sets.get(name).map(|s| &s.elems).unwrap_or(&none);
    let bad = |set: &str, e: &Value| Adoption::Rebuild(format!("unexpected element {e} in {set}"));
    for e in elems("services") {
        match parse_mapping(e).and_then(|(k, d)| Some((parse_svc_key(k)?, parse_goto(d)?))) {
            Some((k, target)) => {
                m.services.insert(k, target);
            }
            None => return bad("services", e),
        }
    }
    for e in elems("host_ports") {
        match parse_mapping(e).and_then(|(k, d)| Some((parse_hp_key(k)?, parse_goto(d)?))) {
            Some((k, target)) => {
                m.host_ports.insert(k, target);
            }
            None => return bad("host_ports", e),
        }
    }
    for proto in [Proto::Tcp, Proto::Udp] {
        for e in elems(mesh_set(proto)) {
            match parse_port(e) {
                Some(port) => {
                    m.ingress_ports.insert((proto, port));
                }
                None => return bad(mesh_set(proto), e),
            }
        }
    }
    for e in elems("no_endpoints") {
        match parse_svc_key(e) {
            Some(k) => {
                m.no_endpoints.insert(k);
            }
            None => return bad("no_endpoints", e),
        }
    }
    for (set, into) in [("ifaces", &mut m.ifaces), ("internal_ifaces", &mut m.internal_ifaces)] {
        for e in elems(set) {
            match e.as_str() {
                Some(name) => {
                    into.insert(name.to_string());
                }
                None => return bad(set, e),
            }
        }
    }
    for e in elems("allowed") {
        match concat_items(e).map(Vec::as_slice) {
            Some([Value::String(a), Value::String(b)]) => {
                m.allowed.insert((a.clone(), b.clone()));
            }
            _ => return bad("allowed", e),
        }
    }
    for (set, into) in [("subnets", &mut m.subnets), ("egress", &mut m.egress)] {
        for e in elems(set) {
            match parse_subnet(e) {
                Some(net) => {
                    into.insert(net);
                }
                None => return bad(set, e),
            }
        }
    }
    Adoption::Adopt { model: Box::new(m), missing_sets, repair_chains, missing }
}

// ---------------------------------------------------------------------------------------------
// Running nft
// ---------------------------------------------------------------------------------------------

/// Runs `nft ARGS`, feeding `stdin`; returns its stdout.
fn run_nft(program: &PathBuf, args: &[&str], stdin: Option<&str>, what: &str) -> Result<String, NftError> {
    let program_name = program.display().to_string();
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => NftError::NftMissing { program: program_name.clone() },
            _ => NftError::Spawn { program: program_name.clone(), what: what.to_string(), source },
        })?;
    let output = std::thread::scope(|scope| {
        // nft reads all its input before it answers, but write from another thread anyway so
        // that a large batch can never deadlock against a full stdout or stderr pipe.
        let writer = child.stdin.take().map(|mut pipe| {
            let input = stdin.unwrap_or_default();
            scope.spawn(move || pipe.write_all(input.as_bytes()))
        });
        let output = child.wait_with_output();
        let written = writer.map(|w| w.join().unwrap_or(Ok(()))).unwrap_or(Ok(()));
        output.and_then(|o| {
            // A write error with a failed exit is reported through nft's stderr below.
            if o.status.success() { written.map(|()| o) } else { Ok(o) }
        })
    })
    .map_err(|source| NftError::Spawn { program: program_name.clone(), what: what.to_string(), source })?;
    if output.status.success() {
        return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
    }
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
    let stderr = if stderr.is_empty() { format!("exit status {}", output.status) } else { stderr };
    if stderr.contains("Operation not permitted") {
        return Err(NftError::PermissionDenied { what: what.to_string(), stderr });
    }
    // A failed batch can list thousands of commands: keep the start of the message.
    let stderr = if stderr.len() > 2000 {
        let mut end = 2000;
        while !stderr.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &stderr[..end])
    } else {
        stderr
    };
    Err(NftError::Failed { what: what.to_string(), stderr })
}

// ---------------------------------------------------------------------------------------------
// Nft
// ---------------------------------------------------------------------------------------------

/// The agent's nftables table and a mirror of what it holds.
#[derive(Debug)]
pub struct Nft {
    table: String,
    program: PathBuf,
    programmed: Model,
    opened: Opened,
    /// A call failed in a way that leaves the table's content uncertain: read it back first.
    stale: bool,
}

impl Nft {
    /// Creates the table `ip <table>`, or adopts it if it exists (see the module docs).
    pub fn open(table: &str) -> Result<Nft, NftError> {
        Nft::open_with(table, Options::default())
    }

    /// [`Nft::open`] with another `nft` program.
    pub fn open_with(table: &str, options: Options) -> Result<Nft, NftError> {
        let valid = !table.is_empty()
            && table.len() <= 64
            && table.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            && table.as_bytes()[0].is_ascii_alphabetic();
        if !valid {
            return Err(NftError::Invalid(format!(
                "table name {table:?}: use 1 to 64 letters, digits, '_' or '-', starting with a letter"
            )));
        }
        let mut nft = Nft {
            table: table.to_string(),
            program: options.nft,
            programmed: Model::default(),
            opened: Opened::Created,
            stale: true,
        };
        nft.resync()?;
        Ok(nft)
    }

    /// The table's name (its family is `ip`).
    pub fn table(&self) -> &str {
        &self.table
    }

    /// What the last [`Nft::open`] or [`Nft::resync`] found.
    pub fn opened(&self) -> Opened {
        self.opened
    }

    /// Reads the table back and rebuilds the mirror from it, creating the table if it is gone or
    /// repairing its skeleton; the next [`Nft::apply`] reconciles by diff. For when something
    /// other than this `Nft` may have changed the table.
    pub fn resync(&mut self) -> Result<Opened, NftError> {
        self.stale = true;
        let listing = self.list()?;
        let (opened, model) = match listing {
            None => {
                let mut b = Batch::new(&self.table);
                b.skeleton();
                self.run_batch(&b, "create the table")?;
                tracing::info!(table = %self.table, "nftables: created table ip {}", self.table);
                (Opened::Created, Model::default())
            }
            Some(listing) => match adopt(&listing) {
                Adoption::Adopt { model, missing_sets, repair_chains, missing } => {
                    if missing_sets.is_empty() && repair_chains.is_empty() {
                        tracing::info!(
                            table = %self.table,
                            chains = model.chains.len(),
                            services = model.services.len(),
                            "nftables: adopted the existing table"
                        );
                        (Opened::Adopted, *model)
                    } else {
                        let mut b = Batch::new(&self.table);
                        for def in missing_sets {
                            b.add_set(def);
                        }
                        for c in &repair_chains {
                            if listing.chains.contains_key(c.name) {
                                b.flush_chain(c.name);
                            } else {
                                b.add_base_chain(c);
                            }
                            for (comment, expr) in &c.rules {
                                b.add_rule(c.name, Some(comment.clone()), expr.clone());
                            }
                        }
                        self.run_batch(&b, "repair the table's fixed sets and chains")?;
                        tracing::warn!(table = %self.table, ?missing, "nftables: adopted the existing table, repaired");
                        (Opened::Repaired, *model)
                    }
                }
                Adoption::Rebuild(why) => {
                    let mut b = Batch::new(&self.table);
                    b.delete_table();
                    b.skeleton();
                    self.run_batch(&b, "rebuild the table")?;
                    tracing::warn!(table = %self.table, %why, "nftables: the existing table had another shape: rebuilt it");
                    (Opened::Rebuilt, Model::default())
                }
            },
        };
        self.programmed = model;
        self.opened = opened;
        self.stale = false;
        Ok(opened)
    }

    /// Makes the table express `desired`, changing only what differs from what it holds, in one
    /// transaction. On error nothing was changed (and the next call reads the table back first).
    pub fn apply(&mut self, desired: &Desired) -> Result<Changes, NftError> {
        let want = Model::from_desired(desired)?;
        if self.stale {
            self.resync()?;
        }
        let mut b = Batch::new(&self.table);
        let changes = diff(&mut b, &self.programmed, &want);
        if !b.is_empty() {
            self.stale = true;
            self.run_batch(&b, &format!("update table ip {} ({changes})", self.table))?;
            self.stale = false;
        }
        self.programmed = want;
        Ok(changes)
    }

    /// Deletes the table (when the agent leaves the cluster). Missing already: fine.
    pub fn remove(self) -> Result<(), NftError> {
        if self.table_exists()? {
            let mut b = Batch::new(&self.table);
            b.delete_table();
            self.run_batch(&b, "delete the table")?;
        }
        Ok(())
    }

    fn table_exists(&self) -> Result<bool, NftError> {
        let what = "list tables";
        let out = run_nft(&self.program, &["-j", "list", "tables", "ip"], None, what)?;
        let v: Value = serde_json::from_str(&out)
            .map_err(|e| NftError::BadListing { what: what.to_string(), detail: e.to_string() })?;
        let tables = v.get("nftables").and_then(Value::as_array).cloned().unwrap_or_default();
        Ok(tables
            .iter()
            .any(|o| o.get("table").and_then(|t| t.get("name")).and_then(Value::as_str) == Some(self.table.as_str())))
    }

    /// The table's listing, or None when there is no such table.
    fn list(&self) -> Result<Option<Listing>, NftError> {
        if !self.table_exists()? {
            return Ok(None);
        }
        let what = format!("list table ip {}", self.table);
        let out = run_nft(&self.program, &["-j", "list", "table", "ip", &self.table], None, &what)?;
        parse_listing(&out).map(Some).map_err(|detail| NftError::BadListing { what, detail })
    }

    fn run_batch(&self, batch: &Batch<'_>, what: &str) -> Result<(), NftError> {
        run_nft(&self.program, &["-j", "-f", "-"], Some(&batch.payload()), what).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    //! Unit tests of the model and the diff, then tests against the kernel, each in network
    //! namespaces it makes itself (`berth-nfttest-*`) with addresses from 198.18.0.0/15 only:
    //! nothing here touches the root namespace's rules or any table but the tests' own.

    use super::*;
    use std::fs::File;
    use std::io::{BufRead, BufReader};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::thread::JoinHandle;
    use std::time::{Duration, Instant};

    const TABLE: &str = "berth";

    fn ip4(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn tcp(port: u16, target_port: u16) -> ServicePort {
        ServicePort { proto: Proto::Tcp, port, target_port }
    }

    fn service(vip: &str, ports: Vec<ServicePort>, endpoints: &[&str]) -> ServiceLb {
        ServiceLb { vip: ip4(vip), ports, endpoints: endpoints.iter().map(|e| ip4(e)).collect() }
    }

    fn network(bridge: &str, vxlan: Option<&str>, subnet: &str, internal: bool) -> NetworkRules {
        NetworkRules {
            bridge: bridge.to_string(),
            vxlan: vxlan.map(str::to_string),
            subnet: subnet.parse().unwrap(),
            internal,
        }
    }

    // -----------------------------------------------------------------------------------------
    // Without the kernel
    // -----------------------------------------------------------------------------------------

    #[test]
    fn a_missing_nft_says_to_install_nftables() {
        let err = Nft::open_with(TABLE, Options { nft: PathBuf::from("/nonexistent/berth-test/nft") }).unwrap_err();
        assert!(matches!(err, NftError::NftMissing { .. }), "{err:?}");
        assert!(err.to_string().contains("install nftables"), "{err}");
    }

    #[test]
    fn desired_states_are_checked() {
        let mut d = Desired::default();
        d.services.insert("a".into(), service("198.19.0.1", vec![tcp(80, 8080)], &["198.18.1.2"]));
        d.services.insert("b".into(), service("198.19.0.1", vec![tcp(80, 9090)], &["198.18.1.3"]));
        let err = Model::from_desired(&d).unwrap_err().to_string();
        assert!(err.contains("\"a\" and \"b\" both use 198.19.0.1:80/tcp"), "{err}");

        let mut d = Desired::default();
        d.networks.insert("n1".into(), network("bn-1", None, "198.18.0.0/16", false));
        d.networks.insert("n2".into(), network("bn-2", None, "198.18.4.0/24", false));
        let err = Model::from_desired(&d).unwrap_err().to_string();
        assert!(err.contains("overlapping"), "{err}");

        let mut d = Desired::default();
        d.networks.insert("n1".into(), network("bn-1", Some("vx-1"), "198.18.1.0/24", false));
        d.networks.insert("n2".into(), network("bn-2", Some("vx-1"), "198.18.2.0/24", false));
        let err = Model::from_desired(&d).unwrap_err().to_string();
        assert!(err.contains("both use interface \"vx-1\""), "{err}");

        let mut d = Desired::default();
        d.networks.insert("n1".into(), network("a-very-long-bridge-name", None, "198.18.1.0/24", false));
        assert!(Model::from_desired(&d).unwrap_err().to_string().contains("not a valid interface name"));

        let err = "198.18.1.5/24".parse::<Subnet>().unwrap_err().to_string();
        assert!(err.contains("did you mean 198.18.1.0/24"), "{err}");
        assert!("198.18.1.0/33".parse::<Subnet>().is_err());
        assert_eq!("198.18.0.0/15".parse::<Subnet>().unwrap().to_string(), "198.18.0.0/15");
    }

    #[test]
    fn the_model_of_a_desired_state() {
        let mut d = Desired::default();
        d.services.insert("web".into(), service("198.19.0.10", vec![tcp(80, 8080)], &["198.18.1.12", "198.18.1.11"]));
        d.services.insert("dns".into(), service("198.19.0.53", vec![tcp(53, 53)], &[]));
        d.networks.insert("n1".into(), network("bn-1", Some("vx-1"), "198.18.1.0/24", false));
        d.networks.insert("n2".into(), network("bn-2", None, "198.18.2.0/24", true));
        d.host_ports.insert((Proto::Tcp, 30080), (ip4("198.18.1.11"), 8080));
        let m = Model::from_desired(&d).unwrap();
        let key = (ip4("198.19.0.10"), Proto::Tcp, 80);
        assert_eq!(m.services[&key], "svc-198.19.0.10-tcp-80");
        assert_eq!(
            m.chains["svc-198.19.0.10-tcp-80"],
            Body::Balance {
                comment: Some("web".into()),
                targets: vec![
                    "ep-198.19.0.10-tcp-80-198.18.1.11-8080".into(),
                    "ep-198.19.0.10-tcp-80-198.18.1.12-8080".into()
                ],
            }
        );
        assert_eq!(
            m.chains["ep-198.19.0.10-tcp-80-198.18.1.12-8080"],
            Body::Dnat { proto: Proto::Tcp, addr: ip4("198.18.1.12"), port: 8080 }
        );
        assert!(m.no_endpoints.contains(&(ip4("198.19.0.53"), Proto::Tcp, 53)));
        assert_eq!(m.chains.len(), 4, "{:?}", m.chains.keys());
        assert_eq!(m.allowed.len(), 5, "bn-1/vx-1 in any order, and bn-2 . bn-2");
        assert!(m.allowed.contains(&("vx-1".into(), "bn-1".into())));
        assert_eq!(m.internal_ifaces, BTreeSet::from(["bn-2".to_string()]));
        assert_eq!(m.egress, BTreeSet::from(["198.18.1.0/24".parse().unwrap()]));
        assert_eq!(m.subnets.len(), 2);

        // Nothing to do from a model to itself; from nothing, chains come before elements.
        let mut b = Batch::new(TABLE);
        assert!(diff(&mut b, &m, &m).is_empty());
        assert!(b.is_empty());
        let mut b = Batch::new(TABLE);
        let ch = diff(&mut b, &Model::default(), &m);
        assert_eq!(ch.chains_added, 4);
        let first_element = b.cmds.iter().position(|c| c["add"].get("element").is_some()).unwrap();
        let last_chain = b.cmds.iter().rposition(|c| c["add"].get("chain").is_some()).unwrap();
        assert!(last_chain < first_element);
    }

    // -----------------------------------------------------------------------------------------
    // The lab: network namespaces, veths, bridges, TCP servers
    // -----------------------------------------------------------------------------------------

    /// Why the kernel tests cannot run here, if they cannot.
    fn skip_reason() -> Option<String> {
        if !rustix::process::geteuid().is_root() {
            return Some("not running as root".into());
        }
        for (program, arg) in [("nft", "--version"), ("ip", "-V")] {
            match Command::new(program).arg(arg).output() {
                Ok(o) if o.status.success() => {}
                _ => return Some(format!("`{program}` is missing (apt-get install nftables iproute2)")),
            }
        }
        None
    }

    macro_rules! require_lab {
        () => {
            if let Some(why) = skip_reason() {
                eprintln!("SKIPPED {}: {why}; this test needs root, nft and ip", module_path!());
                return;
            }
        };
    }

    fn sh(program: &str, args: &[&str]) {
        let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
        assert!(out.status.success(), "{program} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }

    /// A network namespace made for one test, deleted on drop (even when the test fails).
    struct Netns {
        name: String,
    }

    impl Netns {
        fn new(tag: &str) -> Netns {
            let name = format!("berth-nfttest-{tag}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
            sh("ip", &["netns", "add", &name]);
            let ns = Netns { name };
            ns.ip(&["link", "set", "lo", "up"]);
            ns
        }

        /// Runs `f` on a thread that entered this namespace: sockets it opens and processes it
        /// starts live there.
        fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
            let path = format!("/run/netns/{}", self.name);
            std::thread::scope(|scope| {
                scope
                    .spawn(move || {
                        let file = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
                        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                        f()
                    })
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
        }

        fn ip(&self, args: &[&str]) {
            let mut all = vec!["-n", self.name.as_str()];
            all.extend_from_slice(args);
            sh("ip", &all);
        }

        fn sysctl(&self, key: &str, value: &str) {
            let path = format!("/proc/sys/{}", key.replace('.', "/"));
            self.run(|| std::fs::write(&path, value)).unwrap_or_else(|e| panic!("{path}: {e}"));
            let read = self.run(|| std::fs::read_to_string(&path)).unwrap();
            assert_eq!(read.trim(), value, "{key} in {}", self.name);
        }

        /// `nft -j list table ip berth` in this namespace.
        fn listing(&self) -> Value {
            let out = self.run(|| Command::new("nft").args(["-j", "list", "table", "ip", TABLE]).output()).unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            serde_json::from_slice(&out.stdout).unwrap()
        }

        fn nft(&self, args: &[&str]) {
            let out = self.run(|| Command::new("nft").args(args).output()).unwrap();
            assert!(out.status.success(), "nft {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
        }
    }

    /// The node: a namespace that forwards, with berth's table in it.
    fn host() -> Netns {
        let h = Netns::new("h");
        h.sysctl("net.ipv4.ip_forward", "1");
        h
    }

    fn bridge(h: &Netns, name: &str, cidr: &str) {
        h.ip(&["link", "add", name, "type", "bridge"]);
        h.ip(&["addr", "add", cidr, "dev", name]);
        h.ip(&["link", "set", name, "up"]);
    }

    /// A namespace linked to `h` by a veth pair: its end is `eth0` with `cidr`, the host's end is
    /// put on `bridge` (or given `host_cidr`).
    fn attach(
        h: &Netns,
        tag: &str,
        cidr: &str,
        bridge: Option<&str>,
        host_cidr: Option<&str>,
        gw: Option<&str>,
    ) -> Netns {
        let t = Netns::new(tag);
        let host_end = format!("v{}", &t.name[t.name.len() - 8..]);
        h.ip(&["link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", &t.name]);
        if let Some(bridge) = bridge {
            h.ip(&["link", "set", &host_end, "master", bridge]);
            // What the link module does for task ports: with br_netfilter active, a task reaching
            // itself through a VIP is bridged back out of its own port (see the module docs).
            h.ip(&["link", "set", &host_end, "type", "bridge_slave", "hairpin", "on"]);
        }
        if let Some(host_cidr) = host_cidr {
            h.ip(&["addr", "add", host_cidr, "dev", &host_end]);
        }
        h.ip(&["link", "set", &host_end, "up"]);
        t.ip(&["addr", "add", cidr, "dev", "eth0"]);
        t.ip(&["link", "set", "eth0", "up"]);
        if let Some(gw) = gw {
            t.ip(&["route", "add", "default", "via", gw]);
        }
        t
    }

    /// A task on `bridge`, its default route through the host's address there.
    fn task(h: &Netns, bridge: &str, tag: &str, cidr: &str, gw: &str) -> Netns {
        attach(h, tag, cidr, Some(bridge), None, Some(gw))
    }

    /// A TCP server in a namespace: answers each connection with `NAME PEER-ADDRESS\n`, then
    /// echoes lines. Stopped on drop.
    struct Server {
        stop: Arc<AtomicBool>,
        thread: Option<JoinHandle<()>>,
    }

    impl Server {
        fn start(ns: &Netns, addr: &str, name: &str) -> Server {
            let addr: SocketAddr = addr.parse().unwrap();
            let listener = ns.run(|| TcpListener::bind(addr)).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
            listener.set_nonblocking(true).unwrap();
            let stop = Arc::new(AtomicBool::new(false));
            let name = name.to_string();
            let thread = std::thread::spawn({
                let stop = stop.clone();
                move || {
                    while !stop.load(Ordering::Relaxed) {
                        match listener.accept() {
                            Ok((conn, peer)) => {
                                let name = name.clone();
                                std::thread::spawn(move || serve(conn, &name, peer));
                            }
                            // Nothing to accept: look at `stop` again shortly.
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                                std::thread::sleep(Duration::from_millis(2))
                            }
                            Err(_) => break,
                        }
                    }
                }
            });
            Server { stop, thread: Some(thread) }
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    fn serve(conn: TcpStream, name: &str, peer: SocketAddr) {
        let _ = conn.set_nonblocking(false);
        let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
        let Ok(mut out) = conn.try_clone() else { return };
        if writeln!(out, "{name} {}", peer.ip()).is_err() {
            return;
        }
        for line in BufReader::new(conn).lines() {
            let Ok(line) = line else { break };
            if writeln!(out, "{line}").is_err() {
                break;
            }
        }
    }

    /// A client connection: which server answered and the address it saw us from.
    struct Conn {
        reader: BufReader<TcpStream>,
        writer: TcpStream,
        server: String,
        peer: String,
    }

    impl Conn {
        fn echo(&mut self, msg: &str) -> std::io::Result<String> {
            writeln!(self.writer, "{msg}")?;
            let mut line = String::new();
            self.reader.read_line(&mut line)?;
            Ok(line.trim().to_string())
        }
    }

    fn connect_within(ns: &Netns, addr: &str, timeout: Duration) -> std::io::Result<Conn> {
        let addr: SocketAddr = addr.parse().unwrap();
        let stream = ns.run(|| TcpStream::connect_timeout(&addr, timeout))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let writer = stream.try_clone()?;
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let mut words = line.split_whitespace();
        let server = words.next().unwrap_or_default().to_string();
        let peer = words.next().unwrap_or_default().to_string();
        if server.is_empty() {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "no greeting"));
        }
        Ok(Conn { reader, writer, server, peer })
    }

    fn connect(ns: &Netns, addr: &str) -> std::io::Result<Conn> {
        connect_within(ns, addr, Duration::from_secs(3))
    }

    /// Polls `f` until it returns Some, for at most 10 s.
    fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Which servers answer `n` connections to `addr` from `ns`.
    fn servers_hit(ns: &Netns, addr: &str, n: usize) -> BTreeMap<String, usize> {
        let mut hits = BTreeMap::new();
        for _ in 0..n {
            let c = connect(ns, addr).unwrap_or_else(|e| panic!("connect to {addr} from {}: {e}", ns.name));
            *hits.entry(c.server).or_insert(0) += 1;
        }
        hits
    }

    /// Chain name -> (chain handle, rule handles), from a listing.
    fn handles(listing: &Value) -> BTreeMap<String, (u64, Vec<u64>)> {
        let mut out: BTreeMap<String, (u64, Vec<u64>)> = BTreeMap::new();
        for o in listing["nftables"].as_array().unwrap() {
            if let Some(c) = o.get("chain") {
                out.insert(c["name"].as_str().unwrap().to_string(), (c["handle"].as_u64().unwrap(), Vec::new()));
            }
            if let Some(r) = o.get("rule") {
                out.get_mut(r["chain"].as_str().unwrap()).unwrap().1.push(r["handle"].as_u64().unwrap());
            }
        }
        out
    }

    fn set_elements(listing: &Value, name: &str) -> Vec<Value> {
        listing["nftables"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|o| o.get("set").or_else(|| o.get("map")))
            .find(|s| s["name"] == name)
            .map(|s| s.get("elem").and_then(Value::as_array).cloned().unwrap_or_default())
            .unwrap_or_default()
    }

    // -----------------------------------------------------------------------------------------
    // Against the kernel
    // -----------------------------------------------------------------------------------------

    /// Two endpoints behind a VIP, reached from the host (output hook), from a task on the same
    /// bridge (prerouting) and from an endpoint itself (hairpin); then one endpoint is removed
    /// while a connection to the other stays up.
    #[test]
    fn vip_balances_real_traffic_and_updates_keep_connections() {
        require_lab!();
        let h = host();
        bridge(&h, "bn1", "198.18.1.1/24");
        h.ip(&["route", "add", "198.19.0.0/16", "dev", "bn1"]);
        let t1 = task(&h, "bn1", "t1", "198.18.1.11/24", "198.18.1.1");
        let t2 = task(&h, "bn1", "t2", "198.18.1.12/24", "198.18.1.1");
        let t3 = task(&h, "bn1", "t3", "198.18.1.13/24", "198.18.1.1");
        let _s1 = Server::start(&t1, "198.18.1.11:8080", "t1");
        let _s2 = Server::start(&t2, "198.18.1.12:8080", "t2");
        eventually("the servers to answer directly", || {
            (connect(&t3, "198.18.1.11:8080").is_ok() && connect(&t3, "198.18.1.12:8080").is_ok()).then_some(())
        });

        let mut nft = h.run(|| Nft::open(TABLE)).unwrap();
        assert_eq!(nft.opened(), Opened::Created);
        let mut d = Desired::default();
        d.networks.insert("n1".into(), network("bn1", None, "198.18.1.0/24", false));
        d.services.insert("web".into(), service("198.19.0.10", vec![tcp(80, 8080)], &["198.18.1.11", "198.18.1.12"]));
        d.services.insert("empty".into(), service("198.19.0.11", vec![tcp(80, 8080)], &[]));
        let ch = h.run(|| nft.apply(&d)).unwrap();
        assert_eq!(ch.chains_added, 3, "{ch:?}");

        let vip = "198.19.0.10:80";
        let from_host = servers_hit(&h, vip, 40);
        assert_eq!(from_host.keys().collect::<Vec<_>>(), ["t1", "t2"], "from the host: {from_host:?}");
        // With br_netfilter active in the host (its default when the module is loaded), then
        // without: same-bridge service traffic is bridged in one case and routed in the other.
        let br_netfilter = std::path::Path::new("/proc/sys/net/bridge/bridge-nf-call-iptables");
        let br_netfilter_loaded = h.run(|| br_netfilter.exists());
        for round in ["as the host is", "without br_netfilter"] {
            if round == "without br_netfilter" {
                if !br_netfilter_loaded {
                    continue;
                }
                h.sysctl("net.bridge.bridge-nf-call-iptables", "0");
            }
            let from_task = servers_hit(&t3, vip, 40);
            assert_eq!(from_task.keys().collect::<Vec<_>>(), ["t1", "t2"], "from a task, {round}: {from_task:?}");
            // Same-network clients are masqueraded to the host's bridge address, or replies would
            // bypass the host.
            assert_eq!(connect(&t3, vip).unwrap().peer, "198.18.1.1", "{round}");
            // Hairpin: an endpoint reaching the VIP, sometimes itself.
            let hairpin = servers_hit(&t1, vip, 40);
            assert_eq!(hairpin.keys().collect::<Vec<_>>(), ["t1", "t2"], "hairpin, {round}: {hairpin:?}");
        }

        // No endpoints: refused at once, not blackholed.
        for ns in [&h, &t3] {
            let err = connect(ns, "198.19.0.11:80").err().expect("a VIP without endpoints must refuse");
            assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "from {}: {err}", ns.name);
        }

        // An established connection to t2, then t1 is removed.
        let mut kept = eventually("a connection to t2", || connect(&t3, vip).ok().filter(|c| c.server == "t2"));
        assert_eq!(kept.echo("before").unwrap(), "before");
        d.services.get_mut("web").unwrap().endpoints = vec![ip4("198.18.1.12")];
        let ch = h.run(|| nft.apply(&d)).unwrap();
        assert_eq!(ch, Changes { chains_rewritten: 1, chains_deleted: 1, ..Changes::default() });
        assert_eq!(kept.echo("after").unwrap(), "after", "the established connection must survive the update");
        for ns in [&h, &t3] {
            let hits = servers_hit(ns, vip, 30);
            assert_eq!(hits.keys().collect::<Vec<_>>(), ["t2"], "after removing t1, from {}: {hits:?}", ns.name);
        }
        assert_eq!(kept.echo("still").unwrap(), "still");

        // Endpoints back to none: refused.
        d.services.get_mut("web").unwrap().endpoints.clear();
        h.run(|| nft.apply(&d)).unwrap();
        let err = connect(&t3, vip).err().expect("refused");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    }

    #[test]
    fn updates_change_only_what_differs() {
        require_lab!();
        let h = host();
        let mut nft = h.run(|| Nft::open(TABLE)).unwrap();
        let mut d = Desired::default();
        d.services.insert("a".into(), service("198.19.0.1", vec![tcp(80, 8080)], &["198.18.1.2", "198.18.1.3"]));
        d.services.insert("b".into(), service("198.19.0.2", vec![tcp(443, 8443)], &["198.18.1.4"]));
        d.networks.insert("n1".into(), network("bn-1", Some("vx-1"), "198.18.1.0/24", false));
        d.host_ports.insert((Proto::Tcp, 30080), (ip4("198.18.1.2"), 8080));

        let ch = h.run(|| nft.apply(&d)).unwrap();
        // a: 1 service chain + 2 endpoint chains, b: 1 + 1, 1 host port chain.
        assert_eq!(ch.chains_added, 6, "{ch:?}");
        // services 2, host_ports 1, ifaces 2, allowed 4, subnets 1, egress 1.
        assert_eq!(ch.elements_added, 11, "{ch:?}");
        assert_eq!(h.run(|| nft.apply(&d)).unwrap(), Changes::default(), "the same state twice changes nothing");
        let before = handles(&h.listing());

        // A new service: only its chains and elements.
        let mut d2 = d.clone();
        d2.services.insert(
            "c".into(),
            service(
                "198.19.0.3",
                vec![tcp(80, 8080), ServicePort { proto: Proto::Udp, port: 53, target_port: 5353 }],
                &["198.18.1.5"],
            ),
        );
        let ch = h.run(|| nft.apply(&d2)).unwrap();
        assert_eq!(ch, Changes { chains_added: 4, elements_added: 2, ..Changes::default() });
        let after = handles(&h.listing());
        for (chain, hs) in &before {
            assert_eq!(after.get(chain), Some(hs), "chain {chain} was recreated or rewritten");
        }
        assert_eq!(after.len(), before.len() + 4);

        // One endpoint fewer for a: a's service chain is rewritten in place, the endpoint's chain
        // deleted, nothing else touched.
        let mut d3 = d2.clone();
        d3.services.get_mut("a").unwrap().endpoints = vec![ip4("198.18.1.2")];
        let ch = h.run(|| nft.apply(&d3)).unwrap();
        assert_eq!(ch, Changes { chains_rewritten: 1, chains_deleted: 1, ..Changes::default() });
        let after3 = handles(&h.listing());
        let svc_a = "svc-198.19.0.1-tcp-80";
        assert_eq!(after3[svc_a].0, after[svc_a].0, "the service chain itself stays");
        assert_ne!(after3[svc_a].1, after[svc_a].1, "its rule was rewritten");
        assert!(!after3.contains_key("ep-198.19.0.1-tcp-80-198.18.1.3-8080"));
        for (chain, hs) in &after3 {
            if chain != svc_a {
                assert_eq!(after.get(chain), Some(hs), "chain {chain} was touched");
            }
        }

        // c loses its endpoints: its chains go, its ports move to no_endpoints.
        let mut d4 = d3.clone();
        d4.services.get_mut("c").unwrap().endpoints.clear();
        let ch = h.run(|| nft.apply(&d4)).unwrap();
        assert_eq!(ch, Changes { chains_deleted: 4, elements_deleted: 2, elements_added: 2, ..Changes::default() });
        assert_eq!(set_elements(&h.listing(), "no_endpoints").len(), 2);

        // The host port moves to another task: its chain is rewritten, the element stays.
        let mut d5 = d4.clone();
        d5.host_ports.insert((Proto::Tcp, 30080), (ip4("198.18.1.9"), 8080));
        let ch = h.run(|| nft.apply(&d5)).unwrap();
        assert_eq!(ch, Changes { chains_rewritten: 1, ..Changes::default() });

        // Everything gone: only the skeleton is left.
        let ch = h.run(|| nft.apply(&Desired::default())).unwrap();
        assert_eq!(ch.chains_added + ch.chains_rewritten + ch.elements_added, 0, "{ch:?}");
        let listing = h.listing();
        let left = handles(&listing);
        let bases: BTreeSet<&str> = base_chains().iter().map(|c| c.name).collect();
        assert_eq!(left.keys().map(String::as_str).collect::<BTreeSet<_>>(), bases);
        for def in SETS {
            assert!(set_elements(&listing, def.name).is_empty(), "{} is not empty", def.name);
        }
        // And the table goes.
        h.run(|| nft.remove()).unwrap();
        let out = h.run(|| Command::new("nft").args(["list", "table", "ip", TABLE]).output()).unwrap();
        assert!(!out.status.success(), "the table is still there");
    }

    #[test]
    fn a_second_open_adopts_the_table() {
        require_lab!();
        let h = host();
        let mut d = Desired::default();
        d.services.insert("a".into(), service("198.19.0.1", vec![tcp(80, 8080)], &["198.18.1.2", "198.18.1.3"]));
        d.services.insert("none".into(), service("198.19.0.2", vec![tcp(80, 8080)], &[]));
        d.networks.insert("n1".into(), network("bn-1", Some("vx-1"), "198.18.1.0/24", false));
        d.networks.insert("n2".into(), network("bn-2", None, "198.18.2.0/24", true));
        d.host_ports.insert((Proto::Udp, 30053), (ip4("198.18.1.2"), 53));
        {
            let mut nft = h.run(|| Nft::open(TABLE)).unwrap();
            h.run(|| nft.apply(&d)).unwrap();
            // Dropped without remove(): the agent stopped.
        }
        let before = handles(&h.listing());

        let mut nft = h.run(|| Nft::open(TABLE)).unwrap();
        assert_eq!(nft.opened(), Opened::Adopted);
        assert_eq!(nft.programmed, Model::from_desired(&d).unwrap(), "the mirror read back");
        assert_eq!(h.run(|| nft.apply(&d)).unwrap(), Changes::default());
        assert_eq!(handles(&h.listing()), before, "adoption changed the table");

        // A fixed rule deleted by hand and an endpoint chain emptied: the first is repaired on
        // open, the second rewritten by the next apply.
        let forward_rule = before["filter-forward"].1[2].to_string();
        h.nft(&["delete", "rule", "ip", TABLE, "filter-forward", "handle", &forward_rule]);
        h.nft(&["flush", "chain", "ip", TABLE, "ep-198.19.0.1-tcp-80-198.18.1.2-8080"]);
        let mut nft = h.run(|| Nft::open(TABLE)).unwrap();
        assert_eq!(nft.opened(), Opened::Repaired);
        assert_eq!(h.run(|| nft.apply(&d)).unwrap(), Changes { chains_rewritten: 1, ..Changes::default() });
        let repaired = handles(&h.listing());
        assert_eq!(repaired["filter-forward"].1.len(), before["filter-forward"].1.len());
        assert_eq!(repaired["nat-prerouting"], before["nat-prerouting"], "untouched fixed chains stay");
        assert_eq!(h.run(|| nft.apply(&d)).unwrap(), Changes::default());

        // resync() after an outside change, e.g. an element deleted by hand.
        h.nft(&["delete", "element", "ip", TABLE, "services", "{ 198.19.0.1 . tcp . 80 }"]);
        assert_eq!(h.run(|| nft.resync()).unwrap(), Opened::Adopted);
        assert_eq!(h.run(|| nft.apply(&d)).unwrap(), Changes { elements_added: 1, ..Changes::default() });

        // A table of another shape is rebuilt.
        h.nft(&["delete", "table", "ip", TABLE]);
        h.nft(&["add", "table", "ip", TABLE]);
        h.nft(&["add", "set", "ip", TABLE, "services", "{ type ipv4_addr; }"]);
        let mut nft = h.run(|| Nft::open(TABLE)).unwrap();
        assert_eq!(nft.opened(), Opened::Rebuilt);
        let ch = h.run(|| nft.apply(&d)).unwrap();
        assert_eq!(ch.chains_added, 4, "{ch:?}");
        assert_eq!(h.run(|| nft.apply(&d)).unwrap(), Changes::default());
    }

    /// Two networks on one host: their tasks cannot reach each other; the non-internal one
    /// reaches outside, masqueraded; the internal one neither reaches outside nor is reached.
    #[test]
    fn networks_are_isolated_and_internal_ones_have_no_egress() {
        require_lab!();
        let h = host();
        bridge(&h, "bn-a", "198.18.10.1/24");
        bridge(&h, "bn-b", "198.18.11.1/24");
        let ta = task(&h, "bn-a", "ta", "198.18.10.2/24", "198.18.10.1");
        let tb = task(&h, "bn-b", "tb", "198.18.11.2/24", "198.18.11.1");
        // "Outside": a namespace on a plain (non-berth) link, with a route back so that
        // unmasqueraded traffic could be answered too.
        let out = attach(&h, "out", "198.18.200.2/24", None, Some("198.18.200.1/24"), None);
        out.ip(&["route", "add", "198.18.0.0/16", "via", "198.18.200.1"]);
        let _sa = Server::start(&ta, "0.0.0.0:7000", "ta");
        let _sb = Server::start(&tb, "0.0.0.0:7000", "tb");
        let _so = Server::start(&out, "0.0.0.0:7000", "out");

        // Without berth's rules for them, everything is reachable (the control).
        let mut nft = h.run(|| Nft::open(TABLE)).unwrap();
        let c = eventually("tb to reach outside", || connect(&tb, "198.18.200.2:7000").ok());
        assert_eq!(c.peer, "198.18.11.2", "no masquerade yet");
        eventually("ta to reach tb", || connect(&ta, "198.18.11.2:7000").ok());

        let mut d = Desired::default();
        d.networks.insert("a".into(), network("bn-a", Some("vx-a"), "198.18.10.0/24", false));
        d.networks.insert("b".into(), network("bn-b", Some("vx-b"), "198.18.11.0/24", true));
        h.run(|| nft.apply(&d)).unwrap();

        let short = Duration::from_millis(700);
        assert!(connect_within(&ta, "198.18.11.2:7000", short).is_err(), "a reached b");
        assert!(connect_within(&tb, "198.18.10.2:7000", short).is_err(), "b reached a");
        // Egress from a: masqueraded to the host's outside address.
        assert_eq!(connect(&ta, "198.18.200.2:7000").unwrap().peer, "198.18.200.1");
        // b is internal: no way out, no way in, no masquerade.
        assert!(connect_within(&tb, "198.18.200.2:7000", short).is_err(), "internal b reached outside");
        assert!(connect_within(&out, "198.18.11.2:7000", short).is_err(), "outside reached internal b");
        let listing = h.listing();
        let egress = set_elements(&listing, "egress");
        assert_eq!(egress, vec![json!({"prefix": {"addr": "198.18.10.0", "len": 24}})], "{egress:?}");
        // Outside reaches a (routed, not masqueraded); the host reaches both.
        assert_eq!(connect(&out, "198.18.10.2:7000").unwrap().peer, "198.18.200.2");
        assert_eq!(connect(&h, "198.18.11.2:7000").unwrap().server, "tb");
        assert_eq!(connect(&h, "198.18.10.2:7000").unwrap().server, "ta");

        // b stops being internal: it gets out, masqueraded; still no way to a.
        d.networks.get_mut("b").unwrap().internal = false;
        let ch = h.run(|| nft.apply(&d)).unwrap();
        // internal_ifaces -2, egress +1.
        assert_eq!(ch, Changes { elements_deleted: 2, elements_added: 1, ..Changes::default() });
        assert_eq!(connect(&tb, "198.18.200.2:7000").unwrap().peer, "198.18.200.1");
        assert!(connect_within(&tb, "198.18.10.2:7000", short).is_err(), "b reached a");
    }

    #[test]
    fn host_ports_dnat_from_another_namespace_and_the_host() {
        require_lab!();
        let h = host();
        bridge(&h, "bn1", "198.18.1.1/24");
        let t1 = task(&h, "bn1", "t1", "198.18.1.11/24", "198.18.1.1");
        let out = attach(&h, "out", "198.18.200.2/24", None, Some("198.18.200.1/24"), Some("198.18.200.1"));
        let _s1 = Server::start(&t1, "198.18.1.11:8080", "t1");
        eventually("t1's server", || connect(&h, "198.18.1.11:8080").ok());

        let mut nft = h.run(|| Nft::open(TABLE)).unwrap();
        let mut d = Desired::default();
        d.networks.insert("n1".into(), network("bn1", None, "198.18.1.0/24", false));
        d.host_ports.insert((Proto::Tcp, 30080), (ip4("198.18.1.11"), 8080));
        h.run(|| nft.apply(&d)).unwrap();

        let c = connect(&out, "198.18.200.1:30080").unwrap();
        assert_eq!((c.server.as_str(), c.peer.as_str()), ("t1", "198.18.200.2"), "the client's address is kept");
        // Any of the host's addresses.
        assert_eq!(connect(&out, "198.18.1.1:30080").unwrap().server, "t1");
        // From the host itself (output hook).
        assert_eq!(connect(&h, "198.18.200.1:30080").unwrap().server, "t1");
        // Unpublished port: the host has nothing there.
        let err = connect(&out, "198.18.200.1:30081").err().expect("refused");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);

        d.host_ports.clear();
        let ch = h.run(|| nft.apply(&d)).unwrap();
        assert_eq!(ch, Changes { chains_deleted: 1, elements_deleted: 1, ..Changes::default() });
        let err = connect(&out, "198.18.200.1:30080").err().expect("refused once unpublished");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    }

    /// The routing mesh: a published port balanced over a task on this node's bridge and one on
    /// "another node" (a namespace behind an interface of the network, as the VXLAN device is,
    /// with no route back to the client), reached from outside and from the host; connections
    /// are masqueraded so that the remote endpoint's reply comes back through this node. A
    /// host-mode port on the same number yields to the mesh; no endpoints closes the port.
    #[test]
    fn routing_mesh_balances_over_local_and_remote_endpoints() {
        require_lab!();
        let h = host();
        bridge(&h, "bn1", "198.18.1.1/24");
        let t1 = task(&h, "bn1", "t1", "198.18.1.11/24", "198.18.1.1");
        let remote = Netns::new("r");
        let host_end = format!("vx{}", &remote.name[remote.name.len() - 8..]);
        h.ip(&["link", "add", &host_end, "type", "veth", "peer", "name", "eth0", "netns", &remote.name]);
        h.ip(&["addr", "add", "198.18.250.1/30", "dev", &host_end]);
        h.ip(&["link", "set", &host_end, "up"]);
        h.ip(&["route", "add", "198.18.2.0/24", "via", "198.18.250.2"]);
        remote.ip(&["addr", "add", "198.18.250.2/30", "dev", "eth0"]);
        remote.ip(&["addr", "add", "198.18.2.11/32", "dev", "lo"]);
        remote.ip(&["link", "set", "eth0", "up"]);
        let out = attach(&h, "out", "198.18.200.2/24", None, Some("198.18.200.1/24"), Some("198.18.200.1"));
        let _s1 = Server::start(&t1, "0.0.0.0:8443", "t1");
        let _s2 = Server::start(&remote, "0.0.0.0:8443", "t2");
        eventually("t1's server", || connect(&h, "198.18.1.11:8443").ok());
        eventually("t2's server", || connect(&h, "198.18.2.11:8443").ok());
        // The remote endpoint cannot answer the client directly: without masquerade, no reply.
        assert!(connect_within(&out, "198.18.2.11:8443", Duration::from_millis(700)).is_err());

        let mut nft = h.run(|| Nft::open(TABLE)).unwrap();
        let mut d = Desired::default();
        d.networks.insert("n1".into(), network("bn1", Some(&host_end), "198.18.0.0/20", false));
        d.ingress.insert(
            (Proto::Tcp, 30443),
            IngressPort {
                service: "default/web".into(),
                endpoints: vec![(ip4("198.18.1.11"), 8443), (ip4("198.18.2.11"), 8443)],
            },
        );
        // A host-mode port on the same number: the mesh takes it.
        d.host_ports.insert((Proto::Tcp, 30443), (ip4("198.18.1.11"), 9999));
        h.run(|| nft.apply(&d)).unwrap();

        let hits = servers_hit(&out, "198.18.200.1:30443", 40);
        assert_eq!(hits.keys().cloned().collect::<Vec<_>>(), ["t1", "t2"], "{hits:?}");
        // Masqueraded to this node's address on the interface towards each endpoint.
        let seen: BTreeMap<String, String> =
            (0..40).map(|_| connect(&out, "198.18.200.1:30443").unwrap()).map(|c| (c.server, c.peer)).collect();
        assert_eq!(seen.get("t1").map(String::as_str), Some("198.18.1.1"), "{seen:?}");
        assert_eq!(seen.get("t2").map(String::as_str), Some("198.18.250.1"), "{seen:?}");
        // An established connection keeps working; the host itself reaches the port too.
        let mut c = connect(&out, "198.18.200.1:30443").unwrap();
        assert_eq!(c.echo("hello").unwrap(), "hello");
        assert!(servers_hit(&h, "198.18.200.1:30443", 10).values().sum::<usize>() == 10);
        let listing = h.listing();
        assert_eq!(set_elements(&listing, "ingress_tcp"), vec![json!(30443)]);

        // One endpoint goes: the other takes every new connection; the open one stays.
        d.ingress.get_mut(&(Proto::Tcp, 30443)).unwrap().endpoints.truncate(1);
        h.run(|| nft.apply(&d)).unwrap();
        assert_eq!(servers_hit(&out, "198.18.200.1:30443", 10).keys().cloned().collect::<Vec<_>>(), ["t1"]);
        assert_eq!(c.echo("still there").unwrap(), "still there");

        // No endpoints: the port is closed here (refused), and the table adopts cleanly.
        d.ingress.get_mut(&(Proto::Tcp, 30443)).unwrap().endpoints.clear();
        h.run(|| nft.apply(&d)).unwrap();
        let err = connect(&out, "198.18.200.1:30443").err().expect("refused without endpoints");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
        let mut again = h.run(|| Nft::open(TABLE)).unwrap();
        assert_eq!(again.opened(), Opened::Adopted);
        assert!(h.run(|| again.apply(&d)).unwrap().is_empty());
    }

    /// 10,000 services with 2 endpoints each (30,000 chains): one apply, then a lookup, then one
    /// more service, then an adoption. Prints the times (`--nocapture`).
    #[test]
    fn ten_thousand_services() {
        require_lab!();
        const N: u32 = 10_000;
        let h = host();
        bridge(&h, "bn1", "198.18.1.1/24");
        h.ip(&["route", "add", "198.19.0.0/16", "dev", "bn1"]);
        let t1 = task(&h, "bn1", "t1", "198.18.1.11/24", "198.18.1.1");
        let t2 = task(&h, "bn1", "t2", "198.18.1.12/24", "198.18.1.1");
        let _s1 = Server::start(&t1, "198.18.1.11:8080", "t1");
        let _s2 = Server::start(&t2, "198.18.1.12:8080", "t2");
        let vip = |i: u32| Ipv4Addr::from(u32::from(ip4("198.19.0.0")) + i);

        let mut d = Desired::default();
        d.networks.insert("n1".into(), network("bn1", None, "198.18.1.0/24", false));
        for i in 0..N {
            d.services.insert(
                format!("svc-{i}"),
                ServiceLb {
                    vip: vip(i),
                    ports: vec![tcp(80, 8080)],
                    endpoints: vec![ip4("198.18.1.11"), ip4("198.18.1.12")],
                },
            );
        }
        let mut nft = h.run(|| Nft::open(TABLE)).unwrap();
        let started = Instant::now();
        let ch = h.run(|| nft.apply(&d)).unwrap();
        let full = started.elapsed();
        assert_eq!(ch.chains_added, 3 * N as usize);
        println!("nft scale: apply of {N} services x 2 endpoints ({ch}) took {full:?}");

        for i in [0, N / 2, N - 1] {
            let addr = format!("{}:80", vip(i));
            let hits = servers_hit(&h, &addr, 6);
            assert!(hits.keys().all(|s| s == "t1" || s == "t2"), "{hits:?}");
        }

        let started = Instant::now();
        d.services.insert(
            "one-more".into(),
            ServiceLb { vip: vip(N), ports: vec![tcp(80, 8080)], endpoints: vec![ip4("198.18.1.11")] },
        );
        let ch = h.run(|| nft.apply(&d)).unwrap();
        println!("nft scale: adding 1 service to {N} ({ch}) took {:?}", started.elapsed());
        assert_eq!(ch, Changes { chains_added: 2, elements_added: 1, ..Changes::default() });
        assert_eq!(connect(&h, &format!("{}:80", vip(N))).unwrap().server, "t1");

        let started = Instant::now();
        d.services.get_mut("svc-7").unwrap().endpoints.pop();
        let ch = h.run(|| nft.apply(&d)).unwrap();
        println!("nft scale: removing 1 endpoint of 1 service of {N} ({ch}) took {:?}", started.elapsed());
        assert_eq!(ch, Changes { chains_rewritten: 1, chains_deleted: 1, ..Changes::default() });

        let started = Instant::now();
        let mut adopted = h.run(|| Nft::open(TABLE)).unwrap();
        let ch = h.run(|| adopted.apply(&d)).unwrap();
        println!(
            "nft scale: adopting the table of {N} services and applying the same state took {:?}",
            started.elapsed()
        );
        assert_eq!(adopted.opened(), Opened::Adopted);
        assert!(ch.is_empty(), "{ch:?}");
    }
}
