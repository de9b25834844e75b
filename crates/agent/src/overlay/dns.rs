//! Service discovery by DNS for the tasks on this node (see the module docs of `overlay`).
//!
//! One [`DnsServer`] per agent serves every network the node is attached to. It listens on one
//! address per network (the network bridge's gateway address, port 53), over UDP and TCP, and
//! **answers a query from the records of the network of the address it arrived on only**: a task
//! on network A cannot discover a service that is only on network B, even if both networks have
//! tasks on this node.
//!
//! # Names
//!
//! With the cluster domain `D` (default [`DEFAULT_DOMAIN`]) and the network's namespace as the
//! client namespace (so `NAME` alone means `NAME` in that namespace):
//!
//! | query | answer |
//! | --- | --- |
//! | A `NAME`, `NAME.NS`, `NAME.NS.svc.D` | the VIP (`vip` mode) or the task addresses (`dnsrr`) |
//! | A `tasks.NAME`, `tasks.NAME.NS`, `tasks.NAME.NS.svc.D` | the addresses of the service's tasks |
//! | A `TASK.NAME.NS.svc.D` | that task's address (`TASK` is [`task_label`] of the task id) |
//! | SRV `_PORT._tcp.NAME.NS.svc.D` (`_udp`, and the `NAME.NS`/`NAME` forms) | `vip`: one record targeting `NAME.NS.svc.D`; `dnsrr`: one per task targeting `TASK.NAME.NS.svc.D`; the targets' A records in the additional section |
//! | PTR `d.c.b.a.in-addr.arpa` | a task's `TASK.NAME.NS.svc.D`, or a VIP's `NAME.NS.svc.D` |
//! | SOA `D` | the cluster domain's SOA (also in the authority section of negative answers) |
//!
//! Only the tasks the agent lists are published: it lists the running and healthy ones, so a task
//! that dies or turns unhealthy disappears from the next answer. A name that exists but has no
//! record of the asked type (AAAA, or a `dnsrr` service without tasks, or an empty non-terminal
//! such as `NS.svc.D`) gets NOERROR with no answers; a name under `D` that does not exist, and any
//! single-label name that is not a service, gets an authoritative NXDOMAIN. Names are
//! case-insensitive. The `NAME.NS` and `tasks.NAME` forms are only answered when the service
//! exists: they could be real names elsewhere (a namespace called `dev` and the `.dev` TLD), so an
//! unknown name of two or more labels outside `D` is forwarded, never refused.
//!
//! # TTLs
//!
//! Answers made of task addresses (`tasks.*`, `dnsrr` services, per-task names, their SRV and
//! PTR records) live [`TASK_TTL`] (1 s), so a dead task leaves client caches fast; VIP answers
//! live [`VIP_TTL`] (5 s). Negative answers are cached for 5 s, or 1 s for the task-backed names
//! (a `dnsrr` service whose first task is about to come up). Answers with several records are
//! rotated per query, so clients that take the first address spread over the tasks.
//!
//! # Records
//!
//! The agent gives the whole table ([`Records`]: per network, its services, their ports and their
//! tasks) with [`DnsServer::set_records`], or one network at a time with
//! [`DnsServer::set_network`]. Each network served here is compiled into an index (a hash map
//! from the lowercased owner name to the prepared records for every name above), swapped in
//! atomically (`arc-swap`): the next query sees the new table, a query in flight finishes with
//! the old one, and answering a query is one hash lookup and an encode, with no lock.
//!
//! # Forwarding
//!
//! Every other name is forwarded to the upstream resolvers (the host's, see
//! [`parse_nameservers`]): the query is relayed as is (fresh id, over UDP, or over TCP when it came
//! over TCP), to each upstream in turn, within [`DnsConfig::forward_timeout`] for all of them
//! together; the first answer that is neither SERVFAIL nor REFUSED is relayed back. No answer in
//! time, or no upstream, gives SERVFAIL. There is no cache here: the host's resolver (systemd-resolved,
//! the cloud's) caches, and the cluster names are answered locally anyway.
//!
//! # Serving
//!
//! TCP is served by `hickory-server`'s [`Server`] with this module's [`RequestHandler`]. UDP, the
//! hot path, has its own receive loop per listen address built on the same `hickory-server`
//! request and response types: local answers are encoded into a reused buffer and sent inline
//! (no task per query, no channel, no per-query log line), forwarded queries get a task (at most
//! [`DnsConfig::max_forwards`] at once). `hickory-server` logs every TCP request at `info`: the
//! agent's log filter should set `hickory_server=warn`.
//!
//! Tasks use the server through the `/etc/resolv.conf` written by [`resolv_conf`].

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io;
use std::iter::{self, Chain, Empty};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::slice;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::net::xfer::Protocol;
use hickory_server::proto::op::{
    Edns, Header, HeaderCounts, LowerQuery, Message, MessageType, Metadata, OpCode, ResponseCode,
};
use hickory_server::proto::rr::rdata::{A, PTR, SOA, SRV};
use hickory_server::proto::rr::{DNSClass, LowerName, Name, RData, Record, RecordType};
use hickory_server::proto::serialize::binary::{BinEncodable, BinEncoder};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::{MessageResponse, MessageResponseBuilder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// The cluster domain when [`DnsConfig::domain`] is not changed.
pub const DEFAULT_DOMAIN: &str = "berth.internal";

/// TTL, in seconds, of the answers made of task addresses.
pub const TASK_TTL: u32 = 1;

/// TTL, in seconds, of the answers made of virtual IPs, and of most negative answers.
pub const VIP_TTL: u32 = 5;

/// The `ndots` option written by [`resolv_conf`].
pub const NDOTS: u8 = 5;

/// Largest UDP response sent (the DNS flag day 2020 value): no IP fragmentation on an overlay.
/// A larger answer is truncated and the client retries over TCP.
const MAX_UDP_PAYLOAD: u16 = 1232;

/// Nameservers taken from a resolv.conf: glibc's `MAXNS`, so the agent uses what the host does.
const MAX_NAMESERVERS: usize = 3;

/// Responses queued per TCP connection by `hickory-server`.
const TCP_RESPONSE_BUFFER: usize = 16;

/// Largest DNS message (UDP datagram or TCP frame).
const MAX_MESSAGE: usize = 65_535;

// ------------------------------------------------------------------------------------------------
// The record table.

/// The whole record table: the services of every network, by network id (`namespace/name`).
///
/// Networks that no listen address serves are kept (a listener added later uses them) but not
/// indexed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Records {
    /// Network id to its services.
    pub networks: BTreeMap<String, NetworkRecords>,
}

/// The services attached to one network.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetworkRecords {
    /// The network's namespace: the client namespace of the queries arriving on this network
    /// (`NAME` alone means `NAME.NAMESPACE`).
    pub namespace: String,
    /// The services on this network (from any namespace).
    pub services: Vec<ServiceRecord>,
}

/// One service on a network.
///
/// Names (service, namespace, port names) must be DNS labels (`[a-z0-9-]`, 1 to 63 characters,
/// not starting or ending with `-`; upper case is folded); a service or port whose name is not is
/// left out of the index, with a warning.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRecord {
    /// The service name.
    pub name: String,
    /// The service's namespace.
    pub namespace: String,
    /// The virtual IP of the service on this network (`vip` mode).
    pub vip: Option<Ipv4Addr>,
    /// Whether the service name resolves to the VIP or to the task addresses.
    pub endpoint_mode: EndpointMode,
    /// The named ports, for SRV records.
    pub ports: Vec<NamedPort>,
    /// The service's running and healthy tasks and their address on this network.
    pub tasks: Vec<TaskRecord>,
}

/// What the service name resolves to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum EndpointMode {
    /// The service's virtual IP (load-balanced by the node); no answer while it has none.
    #[default]
    Vip,
    /// The addresses of the tasks (DNS round robin).
    Dnsrr,
}

/// A named port of a service: `_NAME._PROTOCOL.SERVICE...` SRV records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedPort {
    /// The port name (a DNS label, without the leading `_`).
    pub name: String,
    /// The transport protocol.
    pub protocol: PortProtocol,
    /// The port number (on the VIP and on the tasks).
    pub port: u16,
}

/// The transport protocol of a [`NamedPort`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PortProtocol {
    /// `_tcp`
    Tcp,
    /// `_udp`
    Udp,
}

/// A task of a service, with its address on the network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskRecord {
    /// The task id, such as `web.1.a1b2c3d4e5`; its DNS name uses [`task_label`] of it.
    pub id: String,
    /// The task's address on the network.
    pub addr: Ipv4Addr,
}

// ------------------------------------------------------------------------------------------------
// Configuration and helpers for the agent.

/// Settings of a [`DnsServer`].
#[derive(Clone, Debug)]
pub struct DnsConfig {
    /// The cluster domain (case and a trailing dot do not matter).
    pub domain: String,
    /// The upstream resolvers every other name is forwarded to, tried in order (typically
    /// [`parse_nameservers`] of the host's `/etc/resolv.conf`). Empty: such names get SERVFAIL.
    pub upstreams: Vec<SocketAddr>,
    /// The bound on forwarding one query, all upstreams together; then SERVFAIL. Keep it under
    /// the clients' own timeout (glibc and musl: 5 s) so they get the SERVFAIL.
    pub forward_timeout: Duration,
    /// A TCP connection idle this long is closed.
    pub tcp_idle_timeout: Duration,
    /// UDP queries being forwarded at once, over all listen addresses; one more is dropped (the
    /// client retries), like dnsmasq's `dns-forward-max`. (A TCP connection forwards its queries
    /// one at a time.)
    pub max_forwards: usize,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            domain: DEFAULT_DOMAIN.to_owned(),
            upstreams: Vec::new(),
            forward_timeout: Duration::from_secs(2),
            tcp_idle_timeout: Duration::from_secs(5),
            max_forwards: 1024,
        }
    }
}

/// The upstream resolvers listed in a resolv.conf text: the address of each `nameserver` line
/// (port 53), in order, without duplicates, at most 3 (glibc's limit, so the agent uses the
/// nameservers the host itself uses). IPv6 addresses with a numeric zone (`fe80::1%2`) keep it;
/// with a named zone (`%eth0`) they are skipped.
///
/// Loopback nameservers such as systemd-resolved's `127.0.0.53` are **kept**: the server runs in
/// the agent, in the host's network namespace, where the host's stub resolver is reachable and is
/// the right upstream (it knows the host's per-link DNS and caches). Tasks never see these
/// addresses: their resolv.conf points at this server (see [`resolv_conf`]).
pub fn parse_nameservers(resolv_conf: &str) -> Vec<SocketAddr> {
    let mut servers = Vec::new();
    for line in resolv_conf.lines() {
        let line = line.split(['#', ';']).next().unwrap_or_default();
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(word) = words.next() else { continue };
        let addr = match word.split_once('%') {
            None => word.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53)),
            Some((ip, zone)) => match (ip.parse::<Ipv6Addr>(), zone.parse::<u32>()) {
                (Ok(ip), Ok(scope)) => Some(SocketAddr::V6(SocketAddrV6::new(ip, 53, 0, scope))),
                _ => None,
            },
        };
        if let Some(addr) = addr
            && !servers.contains(&addr)
        {
            servers.push(addr);
        }
    }
    servers.truncate(MAX_NAMESERVERS);
    servers
}

/// The text of a task's `/etc/resolv.conf`: this server as the nameserver, the Kubernetes search
/// list (`NS.svc.DOMAIN svc.DOMAIN DOMAIN`) and `ndots:5`.
///
/// `ndots:5` (as Kubernetes) makes every relative name with fewer than 5 dots go through the
/// search list first, so all the relative forms (`web`, `web.ns`, `web.ns.svc`, `tasks.web.ns`,
/// `_http._tcp.web.ns`) reach the cluster domain before being tried as absolute names. The cost,
/// a few extra queries before an external name is tried as is, stays on this node: those search
/// names are under the cluster domain and answered locally (NXDOMAIN), never forwarded.
pub fn resolv_conf(nameserver: Ipv4Addr, namespace: &str, domain: &str) -> String {
    let domain = domain.trim().trim_end_matches('.').to_ascii_lowercase();
    let namespace = namespace.trim().to_ascii_lowercase();
    format!(
        "# generated by berth\nnameserver {nameserver}\nsearch {namespace}.svc.{domain} svc.{domain} \
         {domain}\noptions ndots:{NDOTS}\n"
    )
}

/// The DNS label of a task id: lower case, every character other than `[a-z0-9]` turned into
/// `-`, no leading or trailing `-`, at most 63 characters (`web.1.a1b2c3d4e5` gives
/// `web-1-a1b2c3d4e5`). The task's name is `LABEL.NAME.NS.svc.DOMAIN`; if two tasks of a service
/// get the same label, the later ones (by id) get `-2`, `-3`... appended.
pub fn task_label(task_id: &str) -> String {
    let mapped: String =
        task_id.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }).collect();
    let mut label: String = mapped.trim_matches('-').chars().take(63).collect();
    while label.ends_with('-') {
        label.pop();
    }
    if label.is_empty() { "task".to_owned() } else { label }
}

/// The name as one DNS label of the index (lower case), or `None` when it is not a valid one.
fn dns_label(name: &str) -> Option<String> {
    let label = name.to_ascii_lowercase();
    let valid = (1..=63).contains(&label.len())
        && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !label.starts_with('-')
        && !label.ends_with('-');
    valid.then_some(label)
}

/// The cluster domain, normalized (lower case, no trailing dot), or an error if it is not a
/// sequence of DNS labels.
pub fn normalize_domain(domain: &str) -> io::Result<String> {
    let domain = domain.trim().trim_end_matches('.').to_ascii_lowercase();
    let valid = !domain.is_empty() && domain.split('.').all(|label| dns_label(label).is_some());
    if valid && Name::from_ascii(format!("{domain}.")).is_ok() {
        Ok(domain)
    } else {
        Err(io::Error::new(io::ErrorKind::InvalidInput, format!("invalid cluster domain {domain:?}")))
    }
}

// ------------------------------------------------------------------------------------------------
// The index of one network: owner name to prepared records.

/// The records of one owner name.
#[derive(Default)]
struct Entry {
    a: Vec<Record>,
    srv: Vec<Record>,
    /// A records of the SRV targets, for the additional section.
    srv_extra: Vec<Record>,
    ptr: Vec<Record>,
    soa: Vec<Record>,
    /// Negative answers about this name are cached [`TASK_TTL`] only.
    task_backed: bool,
}

/// The compiled records of one network: one hash lookup per query.
struct NetworkIndex {
    names: HashMap<LowerName, Entry>,
    /// The cluster domain.
    apex: LowerName,
    /// The SOA for negative answers, TTL [`VIP_TTL`].
    soa: [Record; 1],
    /// The SOA for negative answers about task-backed names, TTL [`TASK_TTL`].
    soa_short: [Record; 1],
}

fn fqdn(text: &str) -> Option<Name> {
    Name::from_ascii(text).ok().filter(Name::is_fqdn)
}

fn reverse_name(addr: Ipv4Addr) -> Option<Name> {
    let [a, b, c, d] = addr.octets();
    fqdn(&format!("{d}.{c}.{b}.{a}.in-addr.arpa."))
}

fn a_record(owner: &Name, addr: Ipv4Addr, ttl: u32) -> Record {
    Record::from_rdata(owner.clone(), ttl, RData::A(A(addr)))
}

struct IndexBuilder<'d> {
    domain: &'d str,
    names: HashMap<LowerName, Entry>,
}

impl IndexBuilder<'_> {
    fn entry(&mut self, owner: &Name) -> &mut Entry {
        self.names.entry(LowerName::new(owner)).or_default()
    }

    /// An owner name that exists without records (an empty non-terminal): NOERROR, not NXDOMAIN.
    fn empty_non_terminal(&mut self, text: &str) {
        if let Some(name) = fqdn(text) {
            self.entry(&name);
        }
    }

    fn add_service(&mut self, service: &ServiceRecord, name: &str, namespace: &str, local: bool) {
        let domain = self.domain;
        let base = format!("{name}.{namespace}.svc.{domain}.");
        let Some(service_fqdn) = fqdn(&base) else {
            warn!(service = name, namespace, "service name too long for DNS, left out");
            return;
        };
        // The forms of a name relative to the service: the FQDN, `...NAME.NS` and, for a service
        // in the client namespace, `...NAME`.
        let owners = |prefix: &str| -> Vec<Name> {
            let mut owners = vec![format!("{prefix}{base}"), format!("{prefix}{name}.{namespace}.")];
            if local {
                owners.push(format!("{prefix}{name}."));
            }
            owners.iter().filter_map(|text| fqdn(text)).collect()
        };

        // The tasks, each with its own name (the PTR and dnsrr SRV target).
        let mut tasks: Vec<&TaskRecord> = service.tasks.iter().collect();
        tasks.sort_by(|a, b| a.id.cmp(&b.id));
        tasks.dedup_by(|a, b| a.id == b.id);
        let mut labels = HashSet::new();
        let mut task_names: Vec<(Name, Ipv4Addr)> = Vec::with_capacity(tasks.len());
        for task in tasks {
            let label = task_label(&task.id);
            let mut unique = label.clone();
            let mut n = 1;
            while unique == "tasks" || !labels.insert(unique.clone()) {
                n += 1;
                let suffix = format!("-{n}");
                unique = format!("{}{suffix}", &label[..label.len().min(63 - suffix.len())]);
            }
            let Some(task_name) = fqdn(&format!("{unique}.{base}")) else { continue };
            let entry = self.entry(&task_name);
            entry.a.push(a_record(&task_name, task.addr, TASK_TTL));
            entry.task_backed = true;
            if let Some(reverse) = reverse_name(task.addr) {
                let ptr = Record::from_rdata(reverse.clone(), TASK_TTL, RData::PTR(PTR(task_name.clone())));
                self.entry(&reverse).ptr.push(ptr);
            }
            task_names.push((task_name, task.addr));
        }

        // NAME: the VIP or the task addresses.
        let (addrs, ttl): (Vec<Ipv4Addr>, u32) = match service.endpoint_mode {
            EndpointMode::Vip => (service.vip.into_iter().collect(), VIP_TTL),
            EndpointMode::Dnsrr => (task_names.iter().map(|(_, addr)| *addr).collect(), TASK_TTL),
        };
        let name_task_backed = ttl == TASK_TTL || addrs.is_empty();
        for owner in owners("") {
            let entry = self.entry(&owner);
            entry.task_backed |= name_task_backed;
            entry.a.extend(addrs.iter().map(|addr| a_record(&owner, *addr, ttl)));
        }
        if let Some(vip) = service.vip
            && let Some(reverse) = reverse_name(vip)
        {
            let ptr = Record::from_rdata(reverse.clone(), VIP_TTL, RData::PTR(PTR(service_fqdn.clone())));
            self.entry(&reverse).ptr.push(ptr);
        }

        // tasks.NAME: the task addresses.
        for owner in owners("tasks.") {
            let entry = self.entry(&owner);
            entry.task_backed = true;
            entry.a.extend(task_names.iter().map(|(_, addr)| a_record(&owner, *addr, TASK_TTL)));
        }

        // _PORT._PROTO.NAME: SRV records.
        let targets: Vec<(&Name, Ipv4Addr)> = match (service.endpoint_mode, service.vip) {
            (EndpointMode::Vip, Some(vip)) => vec![(&service_fqdn, vip)],
            (EndpointMode::Vip, None) => Vec::new(),
            (EndpointMode::Dnsrr, _) => task_names.iter().map(|(name, addr)| (name, *addr)).collect(),
        };
        let weight = u16::try_from(100 / targets.len().max(1)).unwrap_or(1).max(1);
        let mut seen_ports = HashSet::new();
        for port in &service.ports {
            let Some(port_name) = dns_label(&port.name) else {
                warn!(service = name, namespace, port = port.name, "port name is not a DNS label, left out");
                continue;
            };
            if !seen_ports.insert((port_name.clone(), port.protocol)) {
                continue;
            }
            let proto = match port.protocol {
                PortProtocol::Tcp => "_tcp",
                PortProtocol::Udp => "_udp",
            };
            self.empty_non_terminal(&format!("{proto}.{base}"));
            for owner in owners(&format!("_{port_name}.{proto}.")) {
                let entry = self.entry(&owner);
                entry.task_backed |= name_task_backed;
                for (target, addr) in &targets {
                    let srv = SRV::new(0, weight, port.port, (*target).clone());
                    entry.srv.push(Record::from_rdata(owner.clone(), ttl, RData::SRV(srv)));
                    entry.srv_extra.push(a_record(target, *addr, ttl));
                }
            }
        }
    }
}

impl NetworkIndex {
    /// Compiles the records of one network. `domain` is normalized; `serial` goes in the SOA.
    fn build(domain: &str, network: &NetworkRecords, serial: u32) -> Self {
        let apex = fqdn(&format!("{domain}.")).unwrap_or_else(Name::root);
        let soa_record = |ttl: u32| {
            let mname = fqdn(&format!("ns.{domain}.")).unwrap_or_else(Name::root);
            let rname = fqdn(&format!("hostmaster.{domain}.")).unwrap_or_else(Name::root);
            let soa = SOA::new(mname, rname, serial, 3600, 600, 86400, ttl);
            Record::from_rdata(apex.clone(), ttl, RData::SOA(soa))
        };
        let mut builder = IndexBuilder { domain, names: HashMap::new() };
        builder.entry(&apex).soa.push(soa_record(VIP_TTL));
        builder.empty_non_terminal(&format!("svc.{domain}."));
        let client_namespace = dns_label(&network.namespace);
        if let Some(namespace) = &client_namespace {
            builder.empty_non_terminal(&format!("{namespace}.svc.{domain}."));
        }
        let mut seen = HashSet::new();
        for service in &network.services {
            let (Some(name), Some(namespace)) = (dns_label(&service.name), dns_label(&service.namespace)) else {
                warn!(
                    service = service.name,
                    namespace = service.namespace,
                    "service name is not a DNS label, left out"
                );
                continue;
            };
            if !seen.insert((name.clone(), namespace.clone())) {
                warn!(service = name, namespace, "service listed twice on a network, the first one kept");
                continue;
            }
            builder.empty_non_terminal(&format!("{namespace}.svc.{domain}."));
            let local = client_namespace.as_deref() == Some(namespace.as_str());
            builder.add_service(service, &name, &namespace, local);
        }
        Self {
            names: builder.names,
            apex: LowerName::new(&apex),
            soa: [soa_record(VIP_TTL)],
            soa_short: [soa_record(TASK_TTL)],
        }
    }

    /// The local answer to a request, or `None` when it must be forwarded.
    fn resolve(&self, request: &Request) -> Option<Answer<'_>> {
        if request.metadata.op_code != OpCode::Query {
            return Some(Answer::code(ResponseCode::NotImp));
        }
        if request.edns.as_ref().is_some_and(|edns| edns.version() > 0) {
            return Some(Answer::code(ResponseCode::BADVERS));
        }
        let [query] = request.queries.queries() else {
            return Some(Answer::code(ResponseCode::FormErr));
        };
        if query.query_class() != DNSClass::IN {
            return Some(Answer::code(ResponseCode::Refused));
        }
        let name = query.name();
        let Some(entry) = self.names.get(name) else {
            if self.apex.zone_of(name) {
                return Some(Answer { authority: &self.soa, ..Answer::authoritative(ResponseCode::NXDomain) });
            }
            if name.num_labels() == 1 {
                return Some(Answer::authoritative(ResponseCode::NXDomain));
            }
            return None;
        };
        let none: &[Record] = &[];
        let (answers, additionals) = match query.query_type() {
            RecordType::A => (&entry.a[..], none),
            RecordType::SRV => (&entry.srv[..], &entry.srv_extra[..]),
            RecordType::PTR => (&entry.ptr[..], none),
            RecordType::SOA => (&entry.soa[..], none),
            RecordType::ANY => {
                // RFC 8482: one RRset is enough.
                let rrsets = [(&entry.a, none), (&entry.srv, &entry.srv_extra[..]), (&entry.ptr, none)];
                let (answers, additionals) =
                    rrsets.into_iter().find(|(answers, _)| !answers.is_empty()).unwrap_or((&entry.soa, none));
                (&answers[..], additionals)
            }
            _ => (none, none),
        };
        if answers.is_empty() {
            let authority: &[Record] = match (self.apex.zone_of(name), entry.task_backed) {
                (false, _) => none,
                (true, false) => &self.soa,
                (true, true) => &self.soa_short,
            };
            return Some(Answer { authority, ..Answer::authoritative(ResponseCode::NoError) });
        }
        let rotate = usize::from(request.metadata.id) % answers.len();
        Some(Answer { answers, rotate, additionals, ..Answer::authoritative(ResponseCode::NoError) })
    }
}

/// A local answer: slices of an index's records.
#[derive(Clone, Copy)]
struct Answer<'a> {
    rcode: ResponseCode,
    authoritative: bool,
    answers: &'a [Record],
    /// The answers are sent starting at this one (round robin).
    rotate: usize,
    authority: &'a [Record],
    additionals: &'a [Record],
}

impl Answer<'static> {
    fn code(rcode: ResponseCode) -> Self {
        Self { rcode, authoritative: false, answers: &[], rotate: 0, authority: &[], additionals: &[] }
    }

    fn authoritative(rcode: ResponseCode) -> Self {
        Self { authoritative: true, ..Self::code(rcode) }
    }
}

// ------------------------------------------------------------------------------------------------
// Responses.

type RecordIter<'a> = slice::Iter<'a, Record>;
type LocalResponse<'q, 'a> =
    MessageResponse<'q, 'a, Chain<RecordIter<'a>, RecordIter<'a>>, RecordIter<'a>, Empty<&'a Record>, RecordIter<'a>>;
type RelayedResponse<'q, 'a> =
    MessageResponse<'q, 'a, RecordIter<'a>, RecordIter<'a>, Empty<&'a Record>, RecordIter<'a>>;

/// The EDNS of the response when the request has one: version 0, no DNSSEC, the client's payload
/// size within 512..=1232.
fn response_edns(request: &Request) -> Option<Edns> {
    request.edns.as_ref().map(|requested| {
        let mut edns = Edns::new();
        edns.set_max_payload(requested.max_payload().clamp(512, MAX_UDP_PAYLOAD));
        edns.set_version(0);
        edns
    })
}

fn udp_max_size(edns: Option<&Edns>) -> u16 {
    edns.map_or(512, Edns::max_payload)
}

fn response_metadata(request: &Request, rcode: ResponseCode) -> Metadata {
    let mut metadata = Metadata::response_from_request(&request.metadata);
    metadata.response_code = rcode;
    metadata.recursion_available = true;
    metadata
}

fn local_response<'q, 'a>(
    request: &'q Request,
    edns: Option<&'q Edns>,
    answer: &Answer<'a>,
    with_additionals: bool,
) -> LocalResponse<'q, 'a> {
    let mut metadata = response_metadata(request, answer.rcode);
    metadata.authoritative = answer.authoritative;
    let (tail, head) = answer.answers.split_at(answer.rotate);
    let additionals = if with_additionals { answer.additionals } else { &[] };
    MessageResponseBuilder::new(&request.queries, edns).build(
        metadata,
        head.iter().chain(tail.iter()),
        answer.authority.iter(),
        iter::empty(),
        additionals.iter(),
    )
}

/// The upstream's answer relayed to the client: its records and flags, the client's id and
/// question.
fn relayed_response<'q, 'a>(
    request: &'q Request,
    edns: Option<&'q Edns>,
    reply: &'a Message,
) -> RelayedResponse<'q, 'a> {
    let mut metadata = response_metadata(request, reply.metadata.response_code);
    metadata.authoritative = reply.metadata.authoritative;
    metadata.truncation = reply.metadata.truncation;
    metadata.authentic_data = reply.metadata.authentic_data;
    MessageResponseBuilder::new(&request.queries, edns).build(
        metadata,
        reply.answers.iter(),
        reply.authorities.iter(),
        iter::empty(),
        reply.additionals.iter(),
    )
}

/// Encodes a response into `out` (cleared first), truncating at `max_size` (TC set).
fn encode<'a, A, N, S, D>(
    response: MessageResponse<'_, 'a, A, N, S, D>,
    max_size: u16,
    out: &mut Vec<u8>,
) -> Option<ResponseInfo>
where
    A: Iterator<Item = &'a Record> + Send + 'a,
    N: Iterator<Item = &'a Record> + Send + 'a,
    S: Iterator<Item = &'a Record> + Send + 'a,
    D: Iterator<Item = &'a Record> + Send + 'a,
{
    out.clear();
    let mut encoder = BinEncoder::new(out);
    encoder.set_max_size(max_size);
    match response.destructive_emit(&mut encoder) {
        Ok(info) => Some(info),
        Err(error) => {
            debug!(%error, "encoding a DNS response");
            None
        }
    }
}

fn servfail_header(request: &Request) -> Header {
    Header { metadata: response_metadata(request, ResponseCode::ServFail), counts: HeaderCounts::default() }
}

/// A bare SERVFAIL (header only) into `out`, when a response cannot be encoded.
fn encode_servfail(request: &Request, out: &mut Vec<u8>) {
    out.clear();
    let mut encoder = BinEncoder::new(out);
    if let Err(error) = servfail_header(request).emit(&mut encoder) {
        debug!(%error, "encoding a SERVFAIL");
    }
}

/// A FORMERR header for a datagram that is not a DNS query we can parse (`None` if it has no
/// header, or is a response: never answer those).
fn formerr(raw: &[u8]) -> Option<[u8; 12]> {
    if raw.len() < 12 || raw[2] & 0x80 != 0 {
        return None;
    }
    let mut header = [0u8; 12];
    header[..2].copy_from_slice(&raw[..2]);
    // QR, the request's opcode and RD; RCODE 1 (FORMERR); no records.
    header[2] = 0x80 | (raw[2] & 0x79);
    header[3] = 0x01;
    Some(header)
}

// ------------------------------------------------------------------------------------------------
// Forwarding.

/// Whether `reply` answers the query sent with `id` (an upstream may leave the question out of
/// an error).
fn is_reply_to(reply: &Message, id: u16, query: &LowerQuery) -> bool {
    if reply.metadata.id != id || reply.metadata.message_type != MessageType::Response {
        return false;
    }
    match reply.queries.as_slice() {
        [question] => {
            question.query_type() == query.query_type()
                && question.query_class() == query.query_class()
                && LowerName::new(question.name()) == *query.name()
        }
        [] => reply.metadata.response_code != ResponseCode::NoError,
        _ => false,
    }
}

async fn exchange_udp(upstream: SocketAddr, packet: &[u8], id: u16, query: &LowerQuery) -> io::Result<Message> {
    let local: SocketAddr = match upstream {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(upstream).await?;
    socket.send(packet).await?;
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let len = socket.recv(&mut buf).await?;
        // Anything else (a late reply to another query, garbage) is ignored.
        if let Ok(reply) = Message::from_vec(&buf[..len])
            && is_reply_to(&reply, id, query)
        {
            return Ok(reply);
        }
    }
}

async fn exchange_tcp(upstream: SocketAddr, packet: &[u8], id: u16, query: &LowerQuery) -> io::Result<Message> {
    let mut stream = TcpStream::connect(upstream).await?;
    stream.set_nodelay(true)?;
    let len = u16::try_from(packet.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut frame = Vec::with_capacity(packet.len() + 2);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(packet);
    stream.write_all(&frame).await?;
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await?;
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut buf).await?;
    let reply = Message::from_vec(&buf).map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error))?;
    if is_reply_to(&reply, id, query) {
        Ok(reply)
    } else {
        Err(io::Error::new(io::ErrorKind::InvalidData, "upstream reply does not match the query"))
    }
}

// ------------------------------------------------------------------------------------------------
// The server.

/// What all the listeners share.
struct Shared {
    /// Normalized cluster domain.
    domain: String,
    forward_timeout: Duration,
    tcp_idle_timeout: Duration,
    upstreams: ArcSwap<Vec<SocketAddr>>,
    forward_slots: Arc<Semaphore>,
    table: Mutex<Table>,
}

/// The record table and the index of every network a listener serves.
struct Table {
    records: Records,
    indexes: HashMap<String, Arc<ArcSwap<NetworkIndex>>>,
    serial: u32,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The index of a network, created (from the table) the first time a listener serves it.
    fn index_of(&self, network: &str) -> Arc<ArcSwap<NetworkIndex>> {
        let mut table = self.lock();
        if let Some(index) = table.indexes.get(network) {
            return index.clone();
        }
        let index = Arc::new(ArcSwap::from_pointee(self.build(&mut table, network)));
        table.indexes.insert(network.to_owned(), index.clone());
        index
    }

    fn build(&self, table: &mut Table, network: &str) -> NetworkIndex {
        table.serial = table.serial.wrapping_add(1);
        let empty = NetworkRecords::default();
        let records = table.records.networks.get(network).unwrap_or(&empty);
        NetworkIndex::build(&self.domain, records, table.serial)
    }

    /// Rebuilds the index of a network whose records changed, if a listener serves it.
    fn refresh(&self, table: &mut Table, network: &str) {
        if let Some(index) = table.indexes.get(network).cloned() {
            index.store(Arc::new(self.build(table, network)));
        }
    }

    fn set_records(&self, records: Records) {
        let mut table = self.lock();
        let old = std::mem::replace(&mut table.records, records);
        let changed: BTreeSet<String> = old
            .networks
            .keys()
            .chain(table.records.networks.keys())
            .filter(|network| old.networks.get(*network) != table.records.networks.get(*network))
            .cloned()
            .collect();
        for network in changed {
            self.refresh(&mut table, &network);
        }
    }

    fn set_network(&self, network: &str, records: Option<NetworkRecords>) {
        let mut table = self.lock();
        let old = match records {
            Some(records) => table.records.networks.insert(network.to_owned(), records),
            None => table.records.networks.remove(network),
        };
        if old.as_ref() != table.records.networks.get(network) {
            self.refresh(&mut table, network);
        }
    }

    /// Drops the indexes no listener uses any more.
    fn prune(&self) {
        self.lock().indexes.retain(|_, index| Arc::strong_count(index) > 1);
    }
}

/// Answers the queries arriving on one listen address, from its network's index.
#[derive(Clone)]
struct NetHandler {
    /// The listen address (never forwarded to).
    local: SocketAddr,
    index: Arc<ArcSwap<NetworkIndex>>,
    shared: Arc<Shared>,
}

impl NetHandler {
    /// Encodes the local answer to a UDP request into `out`; `false` when it must be forwarded.
    fn answer_udp(&self, request: &Request, out: &mut Vec<u8>) -> bool {
        let index = self.index.load();
        let Some(answer) = index.resolve(request) else { return false };
        let edns = response_edns(request);
        let max_size = udp_max_size(edns.as_ref());
        match encode(local_response(request, edns.as_ref(), &answer, true), max_size, out) {
            // The answers fit but the additional records did not: leave those out rather than
            // have the client retry over TCP.
            Some(info)
                if info.truncation
                    && !answer.additionals.is_empty()
                    && usize::from(info.counts().answers) == answer.answers.len() =>
            {
                if encode(local_response(request, edns.as_ref(), &answer, false), max_size, out).is_none() {
                    encode_servfail(request, out);
                }
            }
            Some(_) => {}
            None => encode_servfail(request, out),
        }
        true
    }

    /// Forwards a UDP request and encodes the relayed answer (or SERVFAIL) into `out`.
    async fn forward_udp(&self, request: &Request, out: &mut Vec<u8>) {
        let reply = self.forward(request).await;
        let edns = response_edns(request);
        let max_size = udp_max_size(edns.as_ref());
        let encoded = match &reply {
            Some(reply) => encode(relayed_response(request, edns.as_ref(), reply), max_size, out),
            None => encode(
                local_response(request, edns.as_ref(), &Answer::code(ResponseCode::ServFail), true),
                max_size,
                out,
            ),
        };
        if encoded.is_none() {
            encode_servfail(request, out);
        }
    }

    /// The upstreams' answer to a request, or `None` (SERVFAIL) when none answered in time.
    async fn forward(&self, request: &Request) -> Option<Message> {
        let [query] = request.queries.queries() else { return None };
        let upstreams: Vec<SocketAddr> =
            self.shared.upstreams.load().iter().copied().filter(|upstream| *upstream != self.local).collect();
        if upstreams.is_empty() {
            debug!(name = %query.name(), "no upstream resolver to forward to");
            return None;
        }
        let tcp = request.protocol() == Protocol::Tcp;
        let id: u16 = rand::random();
        let mut packet = request.as_slice().to_vec();
        if packet.len() < 12 {
            return None;
        }
        packet[..2].copy_from_slice(&id.to_be_bytes());

        let deadline = Instant::now() + self.shared.forward_timeout;
        let count = upstreams.len();
        let mut fallback = None;
        for (i, upstream) in upstreams.into_iter().enumerate() {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                break;
            }
            // Each upstream left gets an equal share of the time left.
            let budget = remaining / u32::try_from(count - i).unwrap_or(u32::MAX);
            let exchange = async {
                if tcp {
                    exchange_tcp(upstream, &packet, id, query).await
                } else {
                    exchange_udp(upstream, &packet, id, query).await
                }
            };
            match tokio::time::timeout(budget, exchange).await {
                Ok(Ok(reply)) => match reply.metadata.response_code {
                    ResponseCode::ServFail | ResponseCode::Refused => fallback = Some(reply),
                    _ => return Some(reply),
                },
                Ok(Err(error)) => debug!(%upstream, %error, name = %query.name(), "forwarding failed"),
                Err(_) => debug!(%upstream, name = %query.name(), "forwarding timed out"),
            }
        }
        fallback
    }
}

/// TCP: `hickory-server` calls this for each request of a connection, in order.
#[async_trait::async_trait]
impl RequestHandler for NetHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let edns = response_edns(request);
        let index = self.index.load_full();
        let sent = match index.resolve(request) {
            Some(answer) => response_handle.send_response(local_response(request, edns.as_ref(), &answer, true)).await,
            None => match self.forward(request).await {
                Some(reply) => response_handle.send_response(relayed_response(request, edns.as_ref(), &reply)).await,
                None => {
                    let answer = Answer::code(ResponseCode::ServFail);
                    response_handle.send_response(local_response(request, edns.as_ref(), &answer, true)).await
                }
            },
        };
        sent.unwrap_or_else(|error| {
            debug!(%error, "sending a DNS response over TCP");
            ResponseInfo::from(servfail_header(request))
        })
    }
}

/// The UDP loop of one listen address: local answers inline, forwarded ones in tasks.
async fn serve_udp(socket: UdpSocket, handler: NetHandler, cancel: CancellationToken) {
    let socket = Arc::new(socket);
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut out = Vec::with_capacity(usize::from(MAX_UDP_PAYLOAD));
    let mut forwards = JoinSet::new();
    loop {
        let received = tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            received = socket.recv_from(&mut buf) => received,
        };
        while forwards.try_join_next().is_some() {}
        let (len, src) = match received {
            Ok(received) => received,
            Err(error) => {
                debug!(%error, local = %handler.local, "receiving a DNS query");
                tokio::task::yield_now().await;
                continue;
            }
        };
        if src.port() == 0 {
            continue;
        }
        let request = match Request::from_bytes(buf[..len].to_vec(), src, Protocol::Udp) {
            Ok(request) => request,
            Err(error) => {
                debug!(%error, %src, "malformed DNS query");
                if let Some(reply) = formerr(&buf[..len]) {
                    let _ = socket.send_to(&reply, src).await;
                }
                continue;
            }
        };
        if request.metadata.message_type != MessageType::Query {
            continue;
        }
        if handler.answer_udp(&request, &mut out) {
            if let Err(error) = socket.send_to(&out, src).await {
                debug!(%error, %src, "sending a DNS response");
            }
            continue;
        }
        let Ok(permit) = handler.shared.forward_slots.clone().try_acquire_owned() else {
            debug!(%src, "too many forwarded queries in flight, query dropped");
            continue;
        };
        let handler = handler.clone();
        let socket = socket.clone();
        forwards.spawn(async move {
            let _permit = permit;
            let mut out = Vec::new();
            handler.forward_udp(&request, &mut out).await;
            if let Err(error) = socket.send_to(&out, src).await {
                debug!(%error, %src, "sending a DNS response");
            }
        });
    }
    // Forwards in flight hold the socket: end them so it closes now.
    forwards.shutdown().await;
}

/// Binds the UDP socket and TCP listener of a listen address; with port 0, both on the same free
/// port.
async fn bind_pair(addr: SocketAddr) -> io::Result<(UdpSocket, TcpListener)> {
    if addr.port() != 0 {
        return Ok((UdpSocket::bind(addr).await?, TcpListener::bind(addr).await?));
    }
    let mut last_error = io::Error::from(io::ErrorKind::AddrInUse);
    for _ in 0..32 {
        let udp = UdpSocket::bind(addr).await?;
        let port = udp.local_addr()?.port();
        match TcpListener::bind(SocketAddr::new(addr.ip(), port)).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(error) if error.kind() == io::ErrorKind::AddrInUse => last_error = error,
            Err(error) => return Err(error),
        }
    }
    Err(last_error)
}

/// One listen address: its UDP loop and its `hickory-server` TCP server.
struct Listener {
    /// The address asked for (port maybe 0) and the one bound.
    requested: SocketAddr,
    addr: SocketAddr,
    network: String,
    cancel: CancellationToken,
    udp: JoinHandle<()>,
    tcp: Server<NetHandler>,
}

impl Listener {
    /// Stops serving and waits until both sockets are closed.
    async fn shutdown(mut self) {
        self.cancel.cancel();
        if let Err(error) = self.tcp.shutdown_gracefully().await {
            debug!(%error, addr = %self.addr, "DNS TCP server stopped with an error");
        }
        let _ = (&mut self.udp).await;
        info!(addr = %self.addr, network = self.network, "DNS listener stopped");
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        // The tasks own the sockets: aborted, they close them as soon as the runtime drops them.
        self.cancel.cancel();
        self.tcp.shutdown_token().cancel();
        self.udp.abort();
    }
}

/// A running DNS server: the listen addresses and the record table.
///
/// Updating records takes `&self` (or use a cloned [`DnsUpdater`] from another task); stopping
/// takes the server: [`DnsServer::stop`] waits until every socket is closed, dropping it aborts
/// the serving tasks (the sockets close as soon as the runtime drops them).
pub struct DnsServer {
    shared: Arc<Shared>,
    listeners: Vec<Listener>,
}

/// A handle that updates the records and upstreams of a [`DnsServer`] (cheap to clone). Updates
/// after the server stopped do nothing.
#[derive(Clone)]
pub struct DnsUpdater {
    shared: Arc<Shared>,
}

impl DnsUpdater {
    /// Replaces the whole record table; the networks whose records changed are re-indexed.
    pub fn set_records(&self, records: Records) {
        self.shared.set_records(records);
    }

    /// Replaces the records of one network (`None`: the network has no services any more).
    pub fn set_network(&self, network: &str, records: Option<NetworkRecords>) {
        self.shared.set_network(network, records);
    }

    /// Replaces the upstream resolvers (the host's resolv.conf changed).
    pub fn set_upstreams(&self, upstreams: Vec<SocketAddr>) {
        self.shared.upstreams.store(Arc::new(upstreams));
    }
}

/// Starts a DNS server on each `(listen address, network id)` pair, over UDP and TCP, with the
/// given records. Returns once every socket is bound (port 0: a free port, the same for UDP and
/// TCP, see [`DnsServer::listeners`]); fails if one cannot be bound (nothing is left running) or
/// if the cluster domain is not valid.
pub async fn start(
    listen: impl IntoIterator<Item = (SocketAddr, String)>,
    records: Records,
    config: DnsConfig,
) -> io::Result<DnsServer> {
    let shared = Arc::new(Shared {
        domain: normalize_domain(&config.domain)?,
        forward_timeout: config.forward_timeout,
        tcp_idle_timeout: config.tcp_idle_timeout,
        upstreams: ArcSwap::from_pointee(config.upstreams),
        forward_slots: Arc::new(Semaphore::new(config.max_forwards.max(1))),
        table: Mutex::new(Table { records, indexes: HashMap::new(), serial: 0 }),
    });
    let mut server = DnsServer { shared, listeners: Vec::new() };
    for (addr, network) in listen {
        server.add_listener(addr, &network).await?;
    }
    Ok(server)
}

impl DnsServer {
    /// A handle to update the records and upstreams from elsewhere.
    pub fn updater(&self) -> DnsUpdater {
        DnsUpdater { shared: self.shared.clone() }
    }

    /// Replaces the whole record table (see [`DnsUpdater::set_records`]).
    pub fn set_records(&self, records: Records) {
        self.shared.set_records(records);
    }

    /// Replaces the records of one network (see [`DnsUpdater::set_network`]).
    pub fn set_network(&self, network: &str, records: Option<NetworkRecords>) {
        self.shared.set_network(network, records);
    }

    /// Replaces the upstream resolvers (see [`DnsUpdater::set_upstreams`]).
    pub fn set_upstreams(&self, upstreams: Vec<SocketAddr>) {
        self.shared.upstreams.store(Arc::new(upstreams));
    }

    /// The bound listen addresses (UDP and TCP on the same one) and their network.
    pub fn listeners(&self) -> Vec<(SocketAddr, String)> {
        self.listeners.iter().map(|listener| (listener.addr, listener.network.clone())).collect()
    }

    /// Starts serving a network on one more address (a network attached to this node); returns
    /// the bound address.
    pub async fn add_listener(&mut self, addr: SocketAddr, network: &str) -> io::Result<SocketAddr> {
        let (udp, tcp) = bind_pair(addr).await?;
        let bound = udp.local_addr()?;
        let handler = NetHandler { local: bound, index: self.shared.index_of(network), shared: self.shared.clone() };
        let cancel = CancellationToken::new();
        let udp = tokio::spawn(serve_udp(udp, handler.clone(), cancel.clone()));
        let mut server = Server::new(handler);
        server.register_listener(tcp, self.shared.tcp_idle_timeout, TCP_RESPONSE_BUFFER);
        info!(addr = %bound, network, "DNS listening");
        self.listeners.push(Listener {
            requested: addr,
            addr: bound,
            network: network.to_owned(),
            cancel,
            udp,
            tcp: server,
        });
        Ok(bound)
    }

    /// Stops serving on an address (as asked for or as bound), waiting until its sockets are
    /// closed; `false` if there was no such listener.
    pub async fn remove_listener(&mut self, addr: SocketAddr) -> bool {
        let Some(i) = self.listeners.iter().position(|listener| listener.addr == addr || listener.requested == addr)
        else {
            return false;
        };
        self.listeners.remove(i).shutdown().await;
        self.shared.prune();
        true
    }

    /// Stops every listener and waits until all the sockets are closed.
    pub async fn stop(mut self) {
        for listener in std::mem::take(&mut self.listeners) {
            listener.shutdown().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant as StdInstant;

    use hickory_server::proto::op::Query;
    use tokio::time::timeout;

    use super::*;

    const WAIT: Duration = Duration::from_secs(10);
    const DOMAIN: &str = "berth.internal";

    fn task(id: &str, addr: [u8; 4]) -> TaskRecord {
        TaskRecord { id: id.to_owned(), addr: addr.into() }
    }

    fn port(name: &str, protocol: PortProtocol, port: u16) -> NamedPort {
        NamedPort { name: name.to_owned(), protocol, port }
    }

    fn service(name: &str, namespace: &str, vip: Option<[u8; 4]>, mode: EndpointMode) -> ServiceRecord {
        ServiceRecord {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            vip: vip.map(Ipv4Addr::from),
            endpoint_mode: mode,
            ports: Vec::new(),
            tasks: Vec::new(),
        }
    }

    /// `prod/front`: web (vip, 2 tasks), db (dnsrr, 2 tasks), api (namespace staging, vip).
    fn front() -> NetworkRecords {
        let mut web = service("web", "prod", Some([10, 0, 0, 2]), EndpointMode::Vip);
        web.ports = vec![port("http", PortProtocol::Tcp, 80), port("metrics", PortProtocol::Udp, 9100)];
        web.tasks = vec![task("web.1.a1b2c3d4e5", [10, 0, 1, 3]), task("web.2.f6a7b8c9d0", [10, 0, 1, 4])];
        let mut db = service("db", "prod", None, EndpointMode::Dnsrr);
        db.ports = vec![port("pg", PortProtocol::Tcp, 5432)];
        db.tasks = vec![task("db.1.aaaaaaaaaa", [10, 0, 1, 5]), task("db.2.bbbbbbbbbb", [10, 0, 1, 6])];
        let mut api = service("api", "staging", Some([10, 0, 0, 9]), EndpointMode::Vip);
        api.tasks = vec![task("api.1.cccccccccc", [10, 0, 1, 7])];
        NetworkRecords { namespace: "prod".to_owned(), services: vec![web, db, api] }
    }

    /// `prod/back`: cache (vip, 1 task).
    fn back() -> NetworkRecords {
        let mut cache = service("cache", "prod", Some([10, 1, 0, 2]), EndpointMode::Vip);
        cache.tasks = vec![task("cache.1.dddddddddd", [10, 1, 1, 3])];
        NetworkRecords { namespace: "prod".to_owned(), services: vec![cache] }
    }

    fn records() -> Records {
        Records { networks: [("prod/front".to_owned(), front()), ("prod/back".to_owned(), back())].into() }
    }

    fn loopback() -> SocketAddr {
        (Ipv4Addr::LOCALHOST, 0).into()
    }

    /// A server on one loopback address for `prod/front`, nothing to forward to.
    async fn front_server() -> (DnsServer, SocketAddr) {
        let server = start([(loopback(), "prod/front".to_owned())], records(), DnsConfig::default()).await.unwrap();
        let addr = server.listeners()[0].0;
        (server, addr)
    }

    fn query_message(name: &str, rtype: RecordType) -> Message {
        let mut message = Message::query();
        message.metadata.id = rand::random();
        message.metadata.recursion_desired = true;
        message.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
        message
    }

    async fn udp_exchange(server: SocketAddr, query: &Message) -> Message {
        let socket = UdpSocket::bind(loopback()).await.unwrap();
        socket.connect(server).await.unwrap();
        socket.send(&query.to_vec().unwrap()).await.unwrap();
        let mut buf = vec![0u8; MAX_MESSAGE];
        let len = timeout(WAIT, socket.recv(&mut buf)).await.expect("no DNS reply").unwrap();
        let reply = Message::from_vec(&buf[..len]).unwrap();
        assert_eq!(reply.metadata.id, query.metadata.id);
        assert_eq!(reply.metadata.message_type, MessageType::Response);
        reply
    }

    async fn udp(server: SocketAddr, name: &str, rtype: RecordType) -> Message {
        udp_exchange(server, &query_message(name, rtype)).await
    }

    async fn tcp(server: SocketAddr, name: &str, rtype: RecordType) -> Message {
        let query = query_message(name, rtype);
        let bytes = query.to_vec().unwrap();
        let mut stream = timeout(WAIT, TcpStream::connect(server)).await.unwrap().unwrap();
        let mut frame = u16::try_from(bytes.len()).unwrap().to_be_bytes().to_vec();
        frame.extend_from_slice(&bytes);
        stream.write_all(&frame).await.unwrap();
        let mut len = [0u8; 2];
        timeout(WAIT, stream.read_exact(&mut len)).await.expect("no DNS reply over TCP").unwrap();
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        timeout(WAIT, stream.read_exact(&mut buf)).await.unwrap().unwrap();
        let reply = Message::from_vec(&buf).unwrap();
        assert_eq!(reply.metadata.id, query.metadata.id);
        reply
    }

    fn addrs(message: &Message) -> Vec<Ipv4Addr> {
        let mut addrs: Vec<Ipv4Addr> = message
            .answers
            .iter()
            .filter_map(|record| match &record.data {
                RData::A(A(addr)) => Some(*addr),
                _ => None,
            })
            .collect();
        addrs.sort();
        addrs
    }

    fn ttls(message: &Message) -> Vec<u32> {
        let mut ttls: Vec<u32> = message.answers.iter().map(|record| record.ttl).collect();
        ttls.dedup();
        ttls
    }

    fn srvs(message: &Message) -> Vec<(String, u16)> {
        let mut srvs: Vec<(String, u16)> = message
            .answers
            .iter()
            .filter_map(|record| match &record.data {
                RData::SRV(srv) => Some((srv.target.to_ascii(), srv.port)),
                _ => None,
            })
            .collect();
        srvs.sort();
        srvs
    }

    fn ptrs(message: &Message) -> Vec<String> {
        message
            .answers
            .iter()
            .filter_map(|record| match &record.data {
                RData::PTR(PTR(name)) => Some(name.to_ascii()),
                _ => None,
            })
            .collect()
    }

    fn ip(addr: [u8; 4]) -> Ipv4Addr {
        addr.into()
    }

    fn assert_answer(reply: &Message) {
        assert_eq!(reply.metadata.response_code, ResponseCode::NoError, "{reply:?}");
        assert!(reply.metadata.authoritative);
        assert!(!reply.answers.is_empty(), "{reply:?}");
    }

    fn assert_nxdomain(reply: &Message) {
        assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain, "{reply:?}");
        assert!(reply.metadata.authoritative);
        assert!(reply.answers.is_empty());
    }

    #[tokio::test]
    async fn service_names_in_every_form() {
        let (server, addr) = front_server().await;

        // vip mode: the VIP, 5 s, from every form and in any case.
        for name in ["web.", "web.prod.", "web.prod.svc.berth.internal.", "WEB.Prod.SVC.Berth.INTERNAL."] {
            let reply = udp(addr, name, RecordType::A).await;
            assert_answer(&reply);
            assert_eq!(addrs(&reply), [ip([10, 0, 0, 2])], "{name}");
            assert_eq!(ttls(&reply), [VIP_TTL], "{name}");
            assert!(reply.metadata.recursion_available);
        }
        // The question is echoed as asked.
        let reply = udp(addr, "WEB.Prod.", RecordType::A).await;
        assert_eq!(reply.queries[0].name().to_ascii(), "WEB.Prod.");

        // tasks.NAME: the task addresses, 1 s.
        for name in ["tasks.web.", "tasks.web.prod.", "tasks.web.prod.svc.berth.internal."] {
            let reply = udp(addr, name, RecordType::A).await;
            assert_answer(&reply);
            assert_eq!(addrs(&reply), [ip([10, 0, 1, 3]), ip([10, 0, 1, 4])], "{name}");
            assert_eq!(ttls(&reply), [TASK_TTL], "{name}");
        }

        // dnsrr mode: the service name gives the task addresses, 1 s.
        for name in ["db.", "db.prod.", "db.prod.svc.berth.internal.", "tasks.db.prod.svc.berth.internal."] {
            let reply = udp(addr, name, RecordType::A).await;
            assert_answer(&reply);
            assert_eq!(addrs(&reply), [ip([10, 0, 1, 5]), ip([10, 0, 1, 6])], "{name}");
            assert_eq!(ttls(&reply), [TASK_TTL], "{name}");
        }

        // A service of another namespace on the network: NAME.NS and the FQDN, not NAME alone.
        for name in ["api.staging.", "api.staging.svc.berth.internal."] {
            assert_eq!(addrs(&udp(addr, name, RecordType::A).await), [ip([10, 0, 0, 9])], "{name}");
        }
        assert_nxdomain(&udp(addr, "api.", RecordType::A).await);

        // Per-task names resolve to the task.
        let reply = udp(addr, "web-1-a1b2c3d4e5.web.prod.svc.berth.internal.", RecordType::A).await;
        assert_eq!(addrs(&reply), [ip([10, 0, 1, 3])]);
        assert_eq!(ttls(&reply), [TASK_TTL]);
        server.stop().await;
    }

    #[tokio::test]
    async fn dnsrr_answers_rotate() {
        let (server, addr) = front_server().await;
        let mut firsts = HashSet::new();
        for id in 0..4u16 {
            let mut query = query_message("db.prod.svc.berth.internal.", RecordType::A);
            query.metadata.id = id;
            let reply = udp_exchange(addr, &query).await;
            assert_eq!(reply.answers.len(), 2);
            firsts.insert(reply.answers[0].data.clone());
        }
        assert_eq!(firsts.len(), 2, "both tasks come first in turn");
        server.stop().await;
    }

    #[tokio::test]
    async fn srv_records_vip_and_dnsrr() {
        let (server, addr) = front_server().await;

        // vip: one record, targeting the service FQDN, whose A (the VIP) is in the additionals.
        for name in ["_http._tcp.web.prod.svc.berth.internal.", "_http._tcp.web.prod.", "_http._tcp.web."] {
            let reply = udp(addr, name, RecordType::SRV).await;
            assert_answer(&reply);
            assert_eq!(srvs(&reply), [("web.prod.svc.berth.internal.".to_owned(), 80)], "{name}");
            assert_eq!(ttls(&reply), [VIP_TTL]);
            let extra: Vec<_> = reply.additionals.iter().map(|record| record.data.clone()).collect();
            assert_eq!(extra, [RData::A(A(ip([10, 0, 0, 2])))]);
        }
        let reply = udp(addr, "_metrics._udp.web.prod.svc.berth.internal.", RecordType::SRV).await;
        assert_eq!(srvs(&reply), [("web.prod.svc.berth.internal.".to_owned(), 9100)]);
        // No such port, or not with that protocol.
        assert_nxdomain(&udp(addr, "_http._udp.web.prod.svc.berth.internal.", RecordType::SRV).await);
        assert_nxdomain(&udp(addr, "_ftp._tcp.web.prod.svc.berth.internal.", RecordType::SRV).await);
        // `_tcp.NAME...` exists (an empty non-terminal).
        let reply = udp(addr, "_tcp.web.prod.svc.berth.internal.", RecordType::SRV).await;
        assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
        assert!(reply.answers.is_empty());

        // dnsrr: one record per task, each target resolving to its task.
        let reply = udp(addr, "_pg._tcp.db.prod.svc.berth.internal.", RecordType::SRV).await;
        assert_answer(&reply);
        let expected = [
            ("db-1-aaaaaaaaaa.db.prod.svc.berth.internal.".to_owned(), 5432),
            ("db-2-bbbbbbbbbb.db.prod.svc.berth.internal.".to_owned(), 5432),
        ];
        assert_eq!(srvs(&reply), expected);
        assert_eq!(ttls(&reply), [TASK_TTL]);
        assert_eq!(reply.additionals.len(), 2);
        for ((target, _), addr_expected) in expected.iter().zip([[10, 0, 1, 5], [10, 0, 1, 6]]) {
            assert_eq!(addrs(&udp(addr, target, RecordType::A).await), [ip(addr_expected)]);
        }
        server.stop().await;
    }

    #[tokio::test]
    async fn reverse_lookups() {
        let (server, addr) = front_server().await;
        let reply = udp(addr, "3.1.0.10.in-addr.arpa.", RecordType::PTR).await;
        assert_answer(&reply);
        assert_eq!(ptrs(&reply), ["web-1-a1b2c3d4e5.web.prod.svc.berth.internal."]);
        assert_eq!(ttls(&reply), [TASK_TTL]);
        // ... and the name resolves back.
        assert_eq!(addrs(&udp(addr, &ptrs(&reply)[0], RecordType::A).await), [ip([10, 0, 1, 3])]);

        let reply = udp(addr, "2.0.0.10.in-addr.arpa.", RecordType::PTR).await;
        assert_eq!(ptrs(&reply), ["web.prod.svc.berth.internal."]);
        assert_eq!(ttls(&reply), [VIP_TTL]);

        // Another namespace's service on the same network too.
        let reply = udp(addr, "9.0.0.10.in-addr.arpa.", RecordType::PTR).await;
        assert_eq!(ptrs(&reply), ["api.staging.svc.berth.internal."]);
        server.stop().await;
    }

    #[tokio::test]
    async fn negative_answers() {
        let (server, addr) = front_server().await;
        // Names under the domain that do not exist: NXDOMAIN, authoritative, with the SOA.
        for name in ["nosuch.prod.svc.berth.internal.", "tasks.nosuch.prod.svc.berth.internal.", "x.berth.internal."] {
            let reply = udp(addr, name, RecordType::A).await;
            assert_nxdomain(&reply);
            assert_eq!(reply.authorities.len(), 1, "{name}");
            assert_eq!(reply.authorities[0].record_type(), RecordType::SOA);
            assert_eq!(reply.authorities[0].ttl, VIP_TTL);
        }
        // A single label that is not a service: NXDOMAIN, not forwarded.
        assert_nxdomain(&udp(addr, "nosuch.", RecordType::A).await);

        // Existing names, other types: NOERROR, no answer.
        for (name, rtype) in [
            ("web.prod.svc.berth.internal.", RecordType::AAAA),
            ("web.", RecordType::AAAA),
            ("web.prod.svc.berth.internal.", RecordType::TXT),
            ("web.prod.svc.berth.internal.", RecordType::SRV),
        ] {
            let reply = udp(addr, name, rtype).await;
            assert_eq!(reply.metadata.response_code, ResponseCode::NoError, "{name} {rtype}");
            assert!(reply.metadata.authoritative);
            assert!(reply.answers.is_empty(), "{name} {rtype}");
        }
        // Task-backed names: the negative answer lives 1 s.
        let reply = udp(addr, "tasks.web.prod.svc.berth.internal.", RecordType::AAAA).await;
        assert_eq!(reply.authorities[0].ttl, TASK_TTL);

        // Empty non-terminals are not NXDOMAIN (RFC 8020 resolvers would prune the whole tree).
        for name in
            ["berth.internal.", "svc.berth.internal.", "prod.svc.berth.internal.", "staging.svc.berth.internal."]
        {
            let reply = udp(addr, name, RecordType::A).await;
            assert_eq!(reply.metadata.response_code, ResponseCode::NoError, "{name}");
            assert!(reply.answers.is_empty());
        }
        let reply = udp(addr, "berth.internal.", RecordType::SOA).await;
        assert_answer(&reply);
        assert_eq!(reply.answers[0].record_type(), RecordType::SOA);

        // Not a query class served here.
        let mut query = query_message("web.", RecordType::A);
        query.queries[0].set_query_class(DNSClass::CH);
        assert_eq!(udp_exchange(addr, &query).await.metadata.response_code, ResponseCode::Refused);
        server.stop().await;
    }

    #[tokio::test]
    async fn networks_are_isolated_by_listen_address() {
        let server = start(
            [(loopback(), "prod/front".to_owned()), (loopback(), "prod/back".to_owned())],
            records(),
            DnsConfig::default(),
        )
        .await
        .unwrap();
        let listeners = server.listeners();
        let (front_addr, back_addr) = (listeners[0].0, listeners[1].0);
        assert_eq!(listeners[1].1, "prod/back");
        assert_ne!(front_addr, back_addr);

        assert_eq!(addrs(&udp(back_addr, "cache.", RecordType::A).await), [ip([10, 1, 0, 2])]);
        assert_eq!(
            addrs(&udp(back_addr, "tasks.cache.prod.svc.berth.internal.", RecordType::A).await),
            [ip([10, 1, 1, 3])]
        );
        assert_nxdomain(&udp(back_addr, "web.prod.svc.berth.internal.", RecordType::A).await);
        assert_nxdomain(&udp(back_addr, "web.", RecordType::A).await);
        assert!(udp(back_addr, "2.0.0.10.in-addr.arpa.", RecordType::PTR).await.answers.is_empty());

        assert_nxdomain(&udp(front_addr, "cache.prod.svc.berth.internal.", RecordType::A).await);
        assert_nxdomain(&udp(front_addr, "cache.", RecordType::A).await);
        assert_eq!(addrs(&udp(front_addr, "web.", RecordType::A).await), [ip([10, 0, 0, 2])]);
        server.stop().await;
    }

    #[tokio::test]
    async fn updates_apply_to_the_next_query() {
        let (mut server, addr) = front_server().await;
        let name = "tasks.web.prod.svc.berth.internal.";
        assert_eq!(addrs(&udp(addr, name, RecordType::A).await), [ip([10, 0, 1, 3]), ip([10, 0, 1, 4])]);

        // One task is gone: the next query no longer returns it, nor its names.
        let mut network = front();
        network.services[0].tasks.remove(0);
        server.set_network("prod/front", Some(network.clone()));
        assert_eq!(addrs(&udp(addr, name, RecordType::A).await), [ip([10, 0, 1, 4])]);
        assert_nxdomain(&udp(addr, "web-1-a1b2c3d4e5.web.prod.svc.berth.internal.", RecordType::A).await);
        assert!(udp(addr, "3.1.0.10.in-addr.arpa.", RecordType::PTR).await.answers.is_empty());

        // A new service, through a cloned updater and a whole-table replacement.
        let mut records = records();
        let mut queue = service("queue", "prod", None, EndpointMode::Dnsrr);
        queue.tasks = vec![task("queue.1.eeeeeeeeee", [10, 0, 1, 8])];
        network.services.push(queue);
        records.networks.insert("prod/front".to_owned(), network);
        let updater = server.updater();
        updater.set_records(records);
        assert_eq!(addrs(&udp(addr, "queue.", RecordType::A).await), [ip([10, 0, 1, 8])]);
        assert_eq!(addrs(&udp(addr, name, RecordType::A).await), [ip([10, 0, 1, 4])]);

        // The network has no services any more.
        updater.set_network("prod/front", None);
        assert_nxdomain(&udp(addr, "web.prod.svc.berth.internal.", RecordType::A).await);

        // A listener added later serves the current records of its network.
        let back_addr = server.add_listener(loopback(), "prod/back").await.unwrap();
        assert_eq!(addrs(&udp(back_addr, "cache.", RecordType::A).await), [ip([10, 1, 0, 2])]);
        assert!(server.remove_listener(back_addr).await);
        assert!(!server.remove_listener(back_addr).await);
        server.stop().await;
    }

    #[tokio::test]
    async fn tcp_queries_and_truncation() {
        let mut big = service("big", "prod", None, EndpointMode::Dnsrr);
        big.tasks = (0..100u8).map(|i| task(&format!("big.{i}.xxxxxxxxxx"), [10, 0, 2, i])).collect();
        let mut network = front();
        network.services.push(big);
        let records = Records { networks: [("prod/front".to_owned(), network)].into() };
        let server = start([(loopback(), "prod/front".to_owned())], records, DnsConfig::default()).await.unwrap();
        let addr = server.listeners()[0].0;

        let reply = tcp(addr, "tasks.web.prod.svc.berth.internal.", RecordType::A).await;
        assert_answer(&reply);
        assert_eq!(addrs(&reply), [ip([10, 0, 1, 3]), ip([10, 0, 1, 4])]);

        // 100 addresses do not fit in 512 bytes: truncated over UDP, whole over TCP.
        let reply = udp(addr, "big.prod.svc.berth.internal.", RecordType::A).await;
        assert!(reply.metadata.truncation);
        assert!(reply.answers.len() < 100);
        let reply = tcp(addr, "big.prod.svc.berth.internal.", RecordType::A).await;
        assert!(!reply.metadata.truncation);
        assert_eq!(reply.answers.len(), 100);
        server.stop().await;
    }

    #[tokio::test]
    async fn edns_and_malformed_queries() {
        let (server, addr) = front_server().await;
        let mut query = query_message("web.", RecordType::A);
        let mut edns = Edns::new();
        edns.set_max_payload(4096);
        query.set_edns(edns);
        let reply = udp_exchange(addr, &query).await;
        assert_answer(&reply);
        assert_eq!(reply.edns.as_ref().map(Edns::max_payload), Some(MAX_UDP_PAYLOAD));

        // Garbage after a valid header: FORMERR with the id.
        let socket = UdpSocket::bind(loopback()).await.unwrap();
        socket.connect(addr).await.unwrap();
        socket.send(&[0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 0xff]).await.unwrap();
        let mut buf = [0u8; 512];
        let len = timeout(WAIT, socket.recv(&mut buf)).await.unwrap().unwrap();
        let reply = Message::from_vec(&buf[..len]).unwrap();
        assert_eq!(reply.metadata.id, 0x1234);
        assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
        // The server still answers.
        assert_answer(&udp(addr, "web.", RecordType::A).await);
        server.stop().await;
    }

    #[tokio::test]
    async fn forwards_other_names_upstream() {
        // The "upstream" is another instance of this server, with its own domain.
        let upstream_config = DnsConfig { domain: "upstream.test".to_owned(), ..DnsConfig::default() };
        let upstream = start([(loopback(), "prod/front".to_owned())], records(), upstream_config).await.unwrap();
        let upstream_addr = upstream.listeners()[0].0;

        let config = DnsConfig { upstreams: vec![upstream_addr], ..DnsConfig::default() };
        let server = start([(loopback(), "prod/back".to_owned())], records(), config).await.unwrap();
        let addr = server.listeners()[0].0;

        let reply = udp(addr, "web.prod.svc.upstream.test.", RecordType::A).await;
        assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
        assert_eq!(addrs(&reply), [ip([10, 0, 0, 2])]);
        assert!(reply.metadata.recursion_available);
        assert_eq!(reply.queries[0].name().to_ascii(), "web.prod.svc.upstream.test.");

        // The upstream's NXDOMAIN (and its SOA) is relayed.
        let reply = udp(addr, "nosuch.prod.svc.upstream.test.", RecordType::A).await;
        assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(reply.authorities.len(), 1);

        // Over TCP, forwarded over TCP.
        let reply = tcp(addr, "_pg._tcp.db.prod.svc.upstream.test.", RecordType::SRV).await;
        assert_eq!(srvs(&reply).len(), 2);

        // Local names are still local: this server's domain is berth.internal.
        assert_eq!(addrs(&udp(addr, "cache.prod.svc.berth.internal.", RecordType::A).await), [ip([10, 1, 0, 2])]);
        // The upstream is authoritative for its own names only: ours are not known there.
        server.stop().await;
        upstream.stop().await;
    }

    #[tokio::test]
    async fn dead_or_missing_upstreams_give_servfail() {
        // An upstream that never answers: a socket nobody reads.
        let silent = UdpSocket::bind(loopback()).await.unwrap();
        let config = DnsConfig {
            upstreams: vec![silent.local_addr().unwrap()],
            forward_timeout: Duration::from_millis(300),
            ..DnsConfig::default()
        };
        let server = start([(loopback(), "prod/front".to_owned())], records(), config).await.unwrap();
        let addr = server.listeners()[0].0;

        let started = StdInstant::now();
        let reply = udp(addr, "www.example.test.", RecordType::A).await;
        assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
        assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
        let reply = tcp(addr, "www.example.test.", RecordType::A).await;
        assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);

        // No upstream at all: SERVFAIL at once.
        server.set_upstreams(Vec::new());
        let reply = udp(addr, "www.example.test.", RecordType::A).await;
        assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
        // Forwarding to itself is never tried.
        server.set_upstreams(vec![addr]);
        let reply = udp(addr, "www.example.test.", RecordType::A).await;
        assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
        server.stop().await;
    }

    #[tokio::test]
    async fn stop_closes_the_sockets() {
        let (server, addr) = front_server().await;
        assert_answer(&tcp(addr, "web.", RecordType::A).await);
        server.stop().await;
        // Both ports are free again.
        drop(UdpSocket::bind(addr).await.unwrap());
        drop(TcpListener::bind(addr).await.unwrap());

        let (server, addr) = front_server().await;
        let (server2, addr2) = front_server().await;
        drop(server);
        server2.stop().await;
        drop(TcpListener::bind(addr2).await.unwrap());
        // After a drop the tasks are aborted; the sockets close when the runtime drops them.
        let mut rebound = false;
        for _ in 0..1000 {
            if UdpSocket::bind(addr).await.is_ok() && TcpListener::bind(addr).await.is_ok() {
                rebound = true;
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(rebound);
    }

    #[tokio::test]
    async fn start_fails_cleanly() {
        let taken = UdpSocket::bind(loopback()).await.unwrap();
        let result = start([(taken.local_addr().unwrap(), "prod/front".to_owned())], records(), DnsConfig::default());
        assert!(result.await.is_err());
        let config = DnsConfig { domain: "bad domain".to_owned(), ..DnsConfig::default() };
        assert!(start([(loopback(), "prod/front".to_owned())], records(), config).await.is_err());
    }

    #[test]
    fn index_skips_invalid_names() {
        let mut network = front();
        network.services.push(service("Bad_Name", "prod", Some([10, 0, 0, 50]), EndpointMode::Vip));
        network.services.push(service("web", "prod", Some([10, 0, 0, 51]), EndpointMode::Vip));
        network.services[0].ports.push(port("no_good", PortProtocol::Tcp, 1));
        let index = NetworkIndex::build(DOMAIN, &network, 1);
        let get = |name: &str| index.names.get(&LowerName::from(Name::from_ascii(name).unwrap()));
        assert!(get("bad_name.prod.svc.berth.internal.").is_none());
        // The duplicate `web` is left out: the first one is kept.
        assert_eq!(get("web.").unwrap().a.len(), 1);
        assert_eq!(get("web.").unwrap().a[0].data, RData::A(A(ip([10, 0, 0, 2]))));
        assert!(get("_no_good._tcp.web.").is_none());
    }

    #[test]
    fn task_labels() {
        assert_eq!(task_label("web.1.a1b2c3d4e5"), "web-1-a1b2c3d4e5");
        assert_eq!(task_label("Web_1.X"), "web-1-x");
        assert_eq!(task_label("..a.."), "a");
        assert_eq!(task_label("..."), "task");
        let long = task_label(&format!("{}.1", "x".repeat(70)));
        assert_eq!(long.len(), 63);
        assert_eq!(task_label(&format!("{}-.1", "x".repeat(62))), "x".repeat(62));

        // Two tasks with the same label: both get a name.
        let mut svc = service("s", "prod", None, EndpointMode::Dnsrr);
        svc.tasks = vec![task("a.1", [10, 0, 3, 1]), task("a-1", [10, 0, 3, 2])];
        let network = NetworkRecords { namespace: "prod".to_owned(), services: vec![svc] };
        let index = NetworkIndex::build(DOMAIN, &network, 1);
        for name in ["a-1.s.prod.svc.berth.internal.", "a-1-2.s.prod.svc.berth.internal."] {
            assert!(index.names.contains_key(&LowerName::from(Name::from_ascii(name).unwrap())), "{name}");
        }
    }

    #[test]
    fn nameservers_from_resolv_conf() {
        let text = "# comment\n; another\nsearch example.com\nnameserver 127.0.0.53\n  nameserver\t10.0.0.2 # \
                    inline\nnameserver 10.0.0.2\nnameserver fe80::1%2\nnameserver fe80::2%eth0\nnameserver \
                    2001:db8::1\nnameserver bogus\nnameserver 10.0.0.3\noptions edns0\n";
        let servers = parse_nameservers(text);
        assert_eq!(
            servers,
            [
                "127.0.0.53:53".parse::<SocketAddr>().unwrap(),
                "10.0.0.2:53".parse().unwrap(),
                SocketAddr::V6(SocketAddrV6::new("fe80::1".parse().unwrap(), 53, 0, 2)),
            ]
        );
        assert!(parse_nameservers("").is_empty());
    }

    #[test]
    fn task_resolv_conf() {
        assert_eq!(
            resolv_conf(Ipv4Addr::new(10, 0, 0, 1), "Prod", "Berth.Internal."),
            "# generated by berth\nnameserver 10.0.0.1\nsearch prod.svc.berth.internal svc.berth.internal \
             berth.internal\noptions ndots:5\n"
        );
    }

    /// Rough throughput of one server thread: `cargo test --release -p berth-agent --lib
    /// overlay::dns::tests::throughput -- --ignored --nocapture`. The server runs alone on a
    /// current-thread runtime (one core); a client thread keeps 64 queries in flight over UDP, like
    /// dnsperf, for names answered locally (a VIP, dnsrr tasks, an NXDOMAIN).
    #[test]
    #[ignore = "a measurement, not a test"]
    fn throughput() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (server, addr) = runtime.block_on(front_server());
        let server_shared = server.shared.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server_thread = std::thread::spawn(move || {
            runtime.block_on(async move {
                let _ = stopped.await;
                server.stop().await;
            })
        });

        let names =
            ["web.prod.svc.berth.internal.", "tasks.db.prod.svc.berth.internal.", "nosuch.prod.svc.berth.internal."];
        let queries: Vec<Vec<u8>> =
            names.iter().map(|name| query_message(name, RecordType::A).to_vec().unwrap()).collect();

        // The work of one query without the sockets: parse, look up, encode.
        let handler = NetHandler {
            local: addr,
            index: Arc::new(ArcSwap::from_pointee(NetworkIndex::build(DOMAIN, &front(), 1))),
            shared: server_shared,
        };
        let (rounds, mut out) = (1_000_000usize, Vec::new());
        let started = StdInstant::now();
        for i in 0..rounds {
            let request = Request::from_bytes(queries[i % queries.len()].clone(), addr, Protocol::Udp).unwrap();
            assert!(handler.answer_udp(&request, &mut out));
        }
        let elapsed = started.elapsed();
        println!("{rounds} answers in process in {elapsed:?}: {:.0}/s", rounds as f64 / elapsed.as_secs_f64());

        let socket = std::net::UdpSocket::bind(loopback()).unwrap();
        socket.connect(addr).unwrap();
        socket.set_read_timeout(Some(WAIT)).unwrap();
        let (total, window) = (300_000usize, 64usize);
        let mut buf = [0u8; 1500];
        let started = StdInstant::now();
        for i in 0..window {
            socket.send(&queries[i % queries.len()]).unwrap();
        }
        let mut sent = window;
        for _ in 0..total {
            socket.recv(&mut buf).expect("a reply (a lost one stalls the measurement)");
            if sent < total {
                socket.send(&queries[sent % queries.len()]).unwrap();
                sent += 1;
            }
        }
        let elapsed = started.elapsed();
        println!("{total} queries in {elapsed:?}: {:.0} qps", total as f64 / elapsed.as_secs_f64());
        stop.send(()).unwrap();
        server_thread.join().unwrap();
    }
}
