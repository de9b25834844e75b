//! `berth bench overlay`: the agent's data plane measured on this machine with the agent crate's
//! own code (`berth_agent::overlay::{nft, dns, node}`), in network namespaces the bench makes and
//! removes itself. Root only.
//!
//! - `vip`: the cost of a VIP on the first packet of a connection. A node namespace holds the
//!   agent's nftables table ([`Nft`]) and a bridge; an endpoint task (a TCP echo server) and a
//!   client task hang on the bridge, so the client's connections take the prerouting path tasks
//!   take. M connects (connect + 1-byte echo, each a new conntrack entry, so each goes through
//!   the nat chains) to the VIP with 10 services programmed, then, after [`Nft::apply`] grew the
//!   same table to 10,000 services, again; beside each, M connects straight to the endpoint's
//!   address (bridged by the node, no VIP, no NAT) as a control.
//! - `dns`: the agent's DNS server (`dns::DnsServer`) and dnsmasq serve the same 1,000 service
//!   names and 10,000 task addresses from the same node namespace (each on its own address);
//!   `dnsperf` queries each from a client namespace with the same query file, duration and concurrency, first at
//!   full rate (throughput, dnsperf's average and maximum latency), then paced (per-query
//!   latencies from `dnsperf -v`, for percentiles at equal load: dnsperf 2.10 has no latency
//!   histogram). dnsmasq gets no upstream (`--no-resolv`, no `--server`) and listens only on its
//!   address in the bench's namespace; the agent's server gets no upstream either.
//! - `memory`: the real [`Overlay`] started in a namespace acting as the host (its underlay
//!   address on a veth), then fed one COMPLETE `NetworkUpdate`: one /16 network (this
//!   node holding a /20 block of it, 15 peers holding the others), 1,000 services with a VIP, a
//!   named port and 10 endpoints each. It reconciles links, nftables and DNS. The figures are
//!   VmRSS/VmHWM of THIS process before and after: the data plane state one agent process keeps
//!   (view, nftables mirror, DNS indexes), not a whole agent (no session, no task manager), and
//!   not the `nft` processes it runs (they are children, gone when the call returns). RSS also
//!   counts what the allocator kept of the update's transient buffers (such as the nft batch's
//!   JSON) after they were freed: glibc keeps freed heap unless told otherwise (compare with
//!   `GLIBC_TUNABLES=glibc.malloc.trim_threshold=0` in the environment). Run alone
//!   (`--what memory`) or first, so that the other measurements' freed memory is not reused.
//!
//! Every address is from 198.18.0.0/15, which is set aside for benchmarking: tasks in
//! 198.18.0.0/16, VIPs from 198.19.0.10 up, underlays in 198.19.250.0/24. No packet leaves the
//! namespaces the bench made: they have no link to the machine's own namespace. They are named
//! `berth-overlay-bench-<pid>-<role>` and deleted on every way out (a guard on return and panic, the
//! signal handler on SIGINT/SIGTERM); a run killed with SIGKILL leaves them to the next run,
//! which deletes those of processes that no longer exist.

use std::{
    fs::File,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use berth_agent::overlay::{
    dns::{self, DnsConfig, EndpointMode, NamedPort, NetworkRecords, PortProtocol, Records, TaskRecord},
    nft::{self, Desired, NetworkRules, Nft, Proto, ServiceLb, ServicePort},
    node::{Overlay, OverlayConfig},
};
use berth_api::pb::agent::{
    AssignmentsKind, Endpoint, NetworkPeer, NetworkState, NetworkUpdate, ServiceEndpoints, ServicePort as PbPort,
};
use clap::{Args, ValueEnum};
use serde::Serialize;

use crate::output::{self, Format};

/// Namespaces of this bench are `berth-overlay-bench-<pid>-<role>`, its scratch directories
/// `berth-overlay-bench-<pid>-<random>` (other benches' directories are `berth-bench-<random>`,
/// which must never look like ours).
const NS_PREFIX: &str = "berth-overlay-bench-";
/// The agent's table name, as the agent uses it.
const TABLE: &str = "berth";
/// The one network of every measurement, its namespace and its bridge.
const NETWORK: &str = "bench/net";
const NAMESPACE: &str = "bench";
const VNI: u32 = 4096;
const DOMAIN: &str = "berth.internal";

/// vip: the measured service and its one endpoint (a real listener).
const VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const VIP_PORT: u16 = 80;
const ENDPOINT: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 11);
const ENDPOINT_PORT: u16 = 8080;
/// vip: the small case, and the most the large one may have (its endpoints' addresses must
/// stay within the peers' blocks).
const FEW_SERVICES: usize = 10;
const MAX_SERVICES: usize = 20_000;

/// dns and memory: the sizes the issue asks about.
const DNS_SERVICES: usize = 1000;
const TASKS_PER_SERVICE: usize = 10;
/// dns: the agent's server and dnsmasq, on the node namespace's side of the client's veth.
const BERTH_DNS: Ipv4Addr = Ipv4Addr::new(198, 19, 250, 1);
const DNSMASQ: Ipv4Addr = Ipv4Addr::new(198, 19, 250, 2);
const DNS_CLIENT: Ipv4Addr = Ipv4Addr::new(198, 19, 250, 10);

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum What {
    Vip,
    Dns,
    Memory,
    All,
}

#[derive(Args)]
pub struct OverlayBench {
    /// What to measure (all: memory first, then vip, then dns).
    #[arg(long, value_enum, default_value_t = What::All)]
    what: What,
    /// vip: connections timed in each case (each preceded by 200 untimed ones).
    #[arg(long, default_value_t = 2000)]
    connects: usize,
    /// vip: services programmed in the large case (the small case has 10).
    #[arg(long, default_value_t = 10_000)]
    services: usize,
    /// dns: how long dnsperf queries each server at full rate.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    dns_duration: Duration,
    /// dns: dnsperf's clients (sockets), the same for both servers.
    #[arg(long, default_value_t = 4)]
    dns_clients: usize,
    /// dns: queries dnsperf keeps outstanding at once, the same for both servers.
    #[arg(long, default_value_t = 100)]
    dns_outstanding: usize,
    /// dns: the rate of the paced runs that give latency percentiles (3 s each).
    #[arg(long, default_value_t = 2000)]
    dns_paced_qps: u32,
}

// ---------------------------------------------------------------------------------------------
// Output

#[derive(Serialize)]
struct Out {
    kernel: String,
    cpus: usize,
    /// `debug` or `release`: the build of this `berth` (the agent code measured is in it).
    build: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    memory: Option<MemoryOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    vip: Option<VipOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dns: Option<DnsOut>,
}

/// Latencies in microseconds.
#[derive(Serialize, Clone, Copy, Debug, PartialEq)]
struct Latency {
    count: usize,
    p50_us: f64,
    p99_us: f64,
    mean_us: f64,
    max_us: f64,
}

#[derive(Serialize)]
struct VipCase {
    services: usize,
    /// Connect + 1-byte echo to VIP:port.
    vip: Latency,
    /// The same to the endpoint's own address (no VIP, no NAT): the control.
    direct: Latency,
    errors: usize,
}

#[derive(Serialize)]
struct VipOut {
    connects: usize,
    small: VipCase,
    large: VipCase,
    /// `Nft::apply` of the small desired state into the new table.
    apply_small_ms: f64,
    /// `Nft::apply` from the small state to the large one (incremental: one nft batch).
    apply_large_ms: f64,
    apply_large_changes: String,
    /// vip p50 with the large table over vip p50 with the small one (the aim: under 1.2).
    ratio_p50: f64,
    ratio_p99: f64,
}

#[derive(Serialize)]
struct DnsRun {
    qps: f64,
    sent: u64,
    completed: u64,
    lost: u64,
    response_codes: String,
    response_bytes: f64,
    avg_latency_us: f64,
    max_latency_us: f64,
    stddev_latency_us: f64,
    /// Per-query latencies of the paced run.
    paced: Latency,
    paced_not_noerror: usize,
}

#[derive(Serialize)]
struct DnsOut {
    services: usize,
    task_records: usize,
    query_names: usize,
    duration_s: f64,
    clients: usize,
    outstanding: usize,
    paced_qps: u32,
    /// As dnsperf prints it (`Version 2.10.0`).
    dnsperf_version: String,
    /// Where the latency figures come from.
    latency_note: &'static str,
    berth: DnsRun,
    dnsmasq: DnsRun,
    /// berth's full-rate qps over dnsmasq's (the aim: at least 1).
    ratio_qps: f64,
}

#[derive(Serialize)]
struct MemoryOut {
    services: usize,
    endpoints: usize,
    /// VmRSS before `Overlay::start`.
    rss_before_start_kib: u64,
    /// VmRSS once the overlay runs with an empty view.
    rss_before_kib: u64,
    /// VmRSS after the COMPLETE update was reconciled.
    rss_after_kib: u64,
    rss_delta_kib: i64,
    /// VmHWM after the update: the process's peak so far.
    hwm_after_kib: u64,
    /// `Overlay::update` with the COMPLETE update: view, overlay.json, links, one nft batch, DNS.
    reconcile_ms: f64,
    /// `Overlay::reconcile` again with nothing new (the level-triggered steady state).
    reconcile_again_ms: f64,
}

pub async fn run(b: OverlayBench, format: Format) -> Result<()> {
    if !rustix::process::geteuid().is_root() {
        bail!(
            "berth bench overlay needs root: it makes network namespaces, veths, bridges and nftables tables; run it as root (sudo)"
        );
    }
    for (tool, arg, package) in [("ip", "-V", "iproute2"), ("nft", "--version", "nftables")] {
        if !Command::new(tool).arg(arg).output().is_ok_and(|o| o.status.success()) {
            bail!("`{tool}` is missing: install it (apt-get install {package}) and run again");
        }
    }
    if b.connects == 0 || !(FEW_SERVICES..=MAX_SERVICES).contains(&b.services) {
        bail!("--connects must be at least 1 and --services between {FEW_SERVICES} and {MAX_SERVICES}");
    }
    remove_stale_namespaces();
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let work = tokio::task::spawn_blocking(move || measure(&b));
    let out = tokio::select! {
        r = work => r.map_err(|e| anyhow!("the benchmark thread failed: {e}"))??,
        _ = term.recv() => {
            abandon();
            bail!("stopped by SIGTERM; the bench's namespaces and processes are removed");
        }
        _ = int.recv() => {
            abandon();
            bail!("interrupted; the bench's namespaces and processes are removed");
        }
    };
    output::print(format, &out, print_human);
    Ok(())
}

fn measure(b: &OverlayBench) -> Result<Out> {
    let mut out = Out {
        kernel: rustix::system::uname().release().to_string_lossy().into_owned(),
        cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        build: if cfg!(debug_assertions) { "debug" } else { "release" },
        memory: None,
        vip: None,
        dns: None,
    };
    let all = b.what == What::All;
    if all || b.what == What::Memory {
        eprintln!("memory: starting the overlay, then 1 network, {DNS_SERVICES} services, 10 endpoints each");
        out.memory = Some(memory().context("memory")?);
    }
    if all || b.what == What::Vip {
        eprintln!("vip: {} connects per case, 10 then {} services", b.connects, b.services);
        out.vip = Some(vip(b.connects, b.services).context("vip")?);
    }
    if all || b.what == What::Dns {
        out.dns = Some(dns_bench(b).context("dns")?);
    }
    Ok(out)
}

fn print_human(o: &Out) {
    println!("machine: kernel {}, {} cpus, {} build", o.kernel, o.cpus, o.build);
    if let Some(m) = &o.memory {
        println!(
            "memory: {} services, {} endpoints: RSS {} -> {} ({:+.1} MiB), peak {}; reconcile {:.0} ms (again with nothing new: {:.1} ms)",
            m.services,
            m.endpoints,
            output::human_bytes(m.rss_before_kib * 1024),
            output::human_bytes(m.rss_after_kib * 1024),
            m.rss_delta_kib as f64 / 1024.0,
            output::human_bytes(m.hwm_after_kib * 1024),
            m.reconcile_ms,
            m.reconcile_again_ms,
        );
    }
    if let Some(v) = &o.vip {
        println!(
            "vip: {} connects per case (connect + 1-byte echo), from a task through the node's prerouting",
            v.connects
        );
        for c in [&v.small, &v.large] {
            println!(
                "  {:>6} services: vip p50 {:.0} us p99 {:.0} us mean {:.0} us | direct p50 {:.0} us p99 {:.0} us mean {:.0} us | errors {}",
                c.services,
                c.vip.p50_us,
                c.vip.p99_us,
                c.vip.mean_us,
                c.direct.p50_us,
                c.direct.p99_us,
                c.direct.mean_us,
                c.errors
            );
        }
        println!(
            "  Nft::apply: 0 -> {} services {:.0} ms, {} -> {} services {:.0} ms ({})",
            v.small.services,
            v.apply_small_ms,
            v.small.services,
            v.large.services,
            v.apply_large_ms,
            v.apply_large_changes
        );
        println!(
            "  ratio vip p50 ({}) / p50 ({}): {:.2} (aim: under 1.2); p99: {:.2}",
            v.large.services, v.small.services, v.ratio_p50, v.ratio_p99
        );
    }
    if let Some(d) = &o.dns {
        println!(
            "dns: {} services, {} task records, {} query names (NAME.NS.svc and tasks.NAME.NS.svc A), dnsperf -l {:.0} -c {} -q {}",
            d.services, d.task_records, d.query_names, d.duration_s, d.clients, d.outstanding
        );
        for (name, r) in [("berth", &d.berth), ("dnsmasq", &d.dnsmasq)] {
            println!(
                "  {name:<8} {:>8.0} qps, latency avg {:.0} us max {:.0} us stddev {:.0} us, lost {}, {} ({:.0} B/response); paced at {} qps: p50 {:.0} us p99 {:.0} us",
                r.qps,
                r.avg_latency_us,
                r.max_latency_us,
                r.stddev_latency_us,
                r.lost,
                r.response_codes,
                r.response_bytes,
                d.paced_qps,
                r.paced.p50_us,
                r.paced.p99_us
            );
        }
        println!("  ratio qps berth/dnsmasq: {:.2} (aim: at least 1)", d.ratio_qps);
        println!("  latency: {} ({})", d.latency_note, d.dnsperf_version);
    }
}

// ---------------------------------------------------------------------------------------------
// Namespaces and processes of the bench

/// What the signal handler must remove: the bench's namespaces, child processes and scratch
/// directories.
static LIVE_NAMESPACES: Mutex<Vec<String>> = Mutex::new(Vec::new());
static LIVE_CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());
static LIVE_DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// On SIGINT/SIGTERM: kills the children this bench started (by pid) and deletes its namespaces.
fn abandon() {
    for pid in lock(&LIVE_CHILDREN).drain(..) {
        if let Ok(pid) = i32::try_from(pid) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
    for name in lock(&LIVE_NAMESPACES).drain(..).rev() {
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
    }
    for dir in lock(&LIVE_DIRS).drain(..) {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// The pid in a name this bench gave (`berth-overlay-bench-<pid>-...`), if that process is gone.
fn dead_owner(name: &str) -> Option<&str> {
    let pid = name.strip_prefix(NS_PREFIX)?.split('-').next()?;
    (pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists()).then_some(pid)
}

/// Deletes the namespaces (and what still runs in them) and scratch directories left by bench
/// runs whose process is gone (killed with SIGKILL).
fn remove_stale_namespaces() {
    for entry in std::fs::read_dir(std::env::temp_dir()).into_iter().flatten().flatten() {
        if dead_owner(&entry.file_name().to_string_lossy()).is_some() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    let Ok(dir) = std::fs::read_dir("/run/netns") else { return };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(pid) = dead_owner(&name) {
            // What still runs inside is that run's (dnsmasq outlives a bench killed with SIGKILL).
            let left = Command::new("ip").args(["netns", "pids", &name]).output();
            let pids = left.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
            for p in pids.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), nix::sys::signal::Signal::SIGKILL);
            }
            eprintln!("removing namespace {name}, left by an earlier run (process {pid} is gone)");
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
        }
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("running `ip` (install iproute2)")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// The namespaces of one measurement and a scratch directory, all removed on drop.
struct Lab {
    namespaces: Vec<String>,
    dir: tempfile::TempDir,
}

impl Lab {
    fn new() -> Result<Lab> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("{NS_PREFIX}{}-", std::process::id()))
            .tempdir()
            .context("a scratch directory")?;
        lock(&LIVE_DIRS).push(dir.path().to_path_buf());
        Ok(Lab { namespaces: Vec::new(), dir })
    }

    /// A new namespace, loopback up.
    fn ns(&mut self, role: &str) -> Result<Ns> {
        let name = format!("{NS_PREFIX}{}-{role}", std::process::id());
        ip(&["netns", "add", &name]).context("making a network namespace")?;
        self.namespaces.push(name.clone());
        lock(&LIVE_NAMESPACES).push(name.clone());
        let ns = Ns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for name in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
            lock(&LIVE_NAMESPACES).retain(|n| n != name);
        }
        // The directory itself goes with the TempDir, right after.
        lock(&LIVE_DIRS).retain(|d| d != self.dir.path());
    }
}

/// A namespace of the lab (`ip netns` name).
#[derive(Clone)]
struct Ns {
    name: String,
}

impl Ns {
    fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    fn ip(&self, args: &[&str]) -> Result<()> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Runs `f` on a thread that entered this namespace: the sockets it opens and the processes
    /// it starts (`nft`, dnsmasq, dnsperf) live there.
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let path = self.path();
        std::thread::scope(|scope| {
            scope
                .spawn(move || -> Result<T> {
                    enter(&path)?;
                    Ok(f())
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        self.run(|| std::fs::write(&path, value))?.with_context(|| format!("setting {key} in {}", self.name))
    }
}

fn enter(path: &Path) -> Result<()> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("entering network namespace {}", path.display()))
}

/// A process this bench started, killed (by pid) on drop.
struct Daemon {
    child: Child,
}

impl Daemon {
    fn spawn(ns: &Ns, cmd: &mut Command) -> Result<Daemon> {
        let child = ns.run(|| cmd.spawn())?.with_context(|| format!("starting {:?}", cmd.get_program()))?;
        lock(&LIVE_CHILDREN).push(child.id());
        Ok(Daemon { child })
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let pid = self.child.id();
        lock(&LIVE_CHILDREN).retain(|p| *p != pid);
    }
}

/// Runs a command in `ns` to its end (killed by the signal handler if the bench is stopped).
fn run_in(ns: &Ns, cmd: &mut Command) -> Result<Output> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let child = ns.run(|| cmd.spawn())?.with_context(|| format!("starting {:?}", cmd.get_program()))?;
    let pid = child.id();
    lock(&LIVE_CHILDREN).push(pid);
    let out = child.wait_with_output();
    lock(&LIVE_CHILDREN).retain(|p| *p != pid);
    Ok(out?)
}

/// A veth from the node's bridge to a task namespace: `eth0` with `cidr`, default route via `gw`.
fn plug(node: &Ns, bridge: &str, host_end: &str, task: &Ns, cidr: &str, gw: &str) -> Result<()> {
    node.ip(&["link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", &task.name])?;
    node.ip(&["link", "set", host_end, "master", bridge, "up"])?;
    task.ip(&["addr", "add", cidr, "dev", "eth0"])?;
    task.ip(&["link", "set", "eth0", "up"])?;
    task.ip(&["route", "add", "default", "via", gw])
}

// ---------------------------------------------------------------------------------------------
// Addresses

fn add(base: Ipv4Addr, n: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(base) + n as u32)
}

/// The VIP of service `i` (198.19.0.10 up; service 0 is the measured one in `vip`).
fn service_vip(i: usize) -> Ipv4Addr {
    add(VIP, i)
}

/// The address of endpoint `k` on another node: in the /20 blocks 1..=15 of 198.18.0.0/16.
fn remote_endpoint(k: usize) -> Ipv4Addr {
    add(Ipv4Addr::new(198, 18, 0, 0), 4096 * (1 + k % 15) + 2 + k / 15)
}

// ---------------------------------------------------------------------------------------------
// vip

/// A TCP server answering each connection's first byte with itself, one connection at a time
/// (the client connects one at a time). Stopped on drop.
struct EchoServer {
    ns: Ns,
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    fn start(ns: &Ns, addr: SocketAddr) -> Result<EchoServer> {
        let listener = ns.run(|| TcpListener::bind(addr))?.with_context(|| format!("listening on {addr}"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new().name("bench-echo".into()).spawn({
            let stop = stop.clone();
            move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(mut c) = conn else { continue };
                    let _ = c.set_nodelay(true);
                    let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
                    let mut b = [0u8; 1];
                    if c.read_exact(&mut b).is_ok() {
                        let _ = c.write_all(&b);
                    }
                }
            }
        })?;
        Ok(EchoServer { ns: ns.clone(), addr, stop, thread: Some(thread) })
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept up.
        let addr = self.addr;
        let _ = self.ns.run(|| TcpStream::connect_timeout(&addr, Duration::from_secs(1)));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One timed exchange: connect, send a byte, read it back.
fn connect_echo(addr: SocketAddr) -> std::io::Result<Duration> {
    let start = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"x")?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    Ok(start.elapsed())
}

/// `n` timed connects from `ns` (after 200 untimed ones); the latencies in µs and the failures.
fn time_connects(ns: &Ns, addr: SocketAddr, n: usize) -> Result<(Vec<f64>, usize)> {
    ns.run(|| -> Result<(Vec<f64>, usize)> {
        for _ in 0..200 {
            connect_echo(addr).with_context(|| format!("warming up connections to {addr}"))?;
        }
        let mut samples = Vec::with_capacity(n);
        let mut errors = 0;
        for _ in 0..n {
            match connect_echo(addr) {
                Ok(d) => samples.push(d.as_secs_f64() * 1e6),
                Err(_) => errors += 1,
            }
        }
        if errors * 100 > n {
            bail!("{errors} of {n} connections to {addr} failed");
        }
        Ok((samples, errors))
    })?
}

/// The measured service plus `services - 1` others, each with 1 to 3 endpoints on other nodes.
fn vip_desired(services: usize) -> Result<Desired> {
    let mut d = Desired::default();
    d.networks.insert(
        NETWORK.into(),
        NetworkRules {
            bridge: format!("bn-{VNI}"),
            vxlan: None,
            subnet: nft::Subnet::new(Ipv4Addr::new(198, 18, 0, 0), 16)?,
            internal: false,
        },
    );
    let port = |port, target_port| vec![ServicePort { proto: Proto::Tcp, port, target_port }];
    d.services.insert(
        format!("{NAMESPACE}/measured"),
        ServiceLb { vip: VIP, ports: port(VIP_PORT, ENDPOINT_PORT), endpoints: vec![ENDPOINT] },
    );
    for i in 1..services {
        let endpoints = (0..1 + i % 3).map(|j| remote_endpoint(3 * i + j)).collect();
        d.services.insert(
            format!("{NAMESPACE}/svc{i:05}"),
            ServiceLb { vip: service_vip(i), ports: port(VIP_PORT, ENDPOINT_PORT), endpoints },
        );
    }
    Ok(d)
}

fn vip(connects: usize, services: usize) -> Result<VipOut> {
    let mut lab = Lab::new()?;
    let node = lab.ns("vip-node")?;
    let server = lab.ns("vip-endpoint")?;
    let client = lab.ns("vip-client")?;
    node.sysctl("net.ipv4.ip_forward", "1")?;
    let bridge = format!("bn-{VNI}");
    node.ip(&["link", "add", &bridge, "type", "bridge"])?;
    node.ip(&["addr", "add", "198.18.1.1/24", "dev", &bridge])?;
    node.ip(&["link", "set", &bridge, "up"])?;
    plug(&node, &bridge, "to-endpoint", &server, &format!("{ENDPOINT}/24"), "198.18.1.1")?;
    plug(&node, &bridge, "to-client", &client, "198.18.1.21/24", "198.18.1.1")?;
    let endpoint = SocketAddr::from((ENDPOINT, ENDPOINT_PORT));
    let vip = SocketAddr::from((VIP, VIP_PORT));
    let _server = EchoServer::start(&server, endpoint)?;

    let mut table = node.run(|| Nft::open(TABLE))??;
    let small = vip_desired(FEW_SERVICES)?;
    let large = vip_desired(services)?;
    let t = Instant::now();
    node.run(|| table.apply(&small))??;
    let apply_small = t.elapsed();
    // The VIP answers (the first connections also settle ARP).
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(e) = client.run(|| connect_echo(vip))? {
        if Instant::now() > deadline {
            bail!("the VIP {vip} does not answer from the client task: {e}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    let case = |n: usize| -> Result<VipCase> {
        eprintln!("vip: {n} services: {connects} connects to the endpoint, then to the VIP");
        let (direct, e1) = time_connects(&client, endpoint, connects)?;
        let (through_vip, e2) = time_connects(&client, vip, connects)?;
        Ok(VipCase { services: n, vip: summarize(through_vip), direct: summarize(direct), errors: e1 + e2 })
    };
    let small_case = case(FEW_SERVICES)?;
    eprintln!("vip: applying {services} services");
    let t = Instant::now();
    let changes = node.run(|| table.apply(&large))??;
    let apply_large = t.elapsed();
    let large_case = case(services)?;
    Ok(VipOut {
        connects,
        ratio_p50: large_case.vip.p50_us / small_case.vip.p50_us,
        ratio_p99: large_case.vip.p99_us / small_case.vip.p99_us,
        small: small_case,
        large: large_case,
        apply_small_ms: apply_small.as_secs_f64() * 1e3,
        apply_large_ms: apply_large.as_secs_f64() * 1e3,
        apply_large_changes: changes.to_string(),
    })
}

// ---------------------------------------------------------------------------------------------
// dns

/// Installs the Debian package holding `program` if it is missing.
fn ensure_installed(program: &str, package: &str) -> Result<()> {
    let present =
        |p: &str| Command::new(p).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok();
    if present(program) {
        return Ok(());
    }
    eprintln!("dns: `{program}` is missing: apt-get install {package}");
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends", package])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .output()
    };
    let mut out = install();
    if !out.as_ref().is_ok_and(|o| o.status.success()) {
        // The package lists may be missing or old.
        let _ = Command::new("apt-get").args(["update", "-q"]).stdin(Stdio::null()).output();
        out = install();
    }
    match out {
        Ok(o) if o.status.success() && present(program) => Ok(()),
        Ok(o) => bail!(
            "`{program}` is missing and `apt-get install {package}` failed: {}; install {package} and run again",
            String::from_utf8_lossy(&o.stderr).trim().lines().last().unwrap_or("no message")
        ),
        Err(e) => bail!("`{program}` is missing and apt-get cannot run ({e}); install {package} and run again"),
    }
}

/// The task addresses of service `s`.
fn dns_tasks(s: usize) -> impl Iterator<Item = (String, Ipv4Addr)> {
    (0..TASKS_PER_SERVICE).map(move |j| (format!("svc{s:04}.{j}.bench"), remote_endpoint(s * TASKS_PER_SERVICE + j)))
}

fn svc_name(s: usize) -> String {
    format!("svc{s:04}.{NAMESPACE}.svc.{DOMAIN}")
}

fn dns_records() -> Records {
    let services = (0..DNS_SERVICES)
        .map(|s| dns::ServiceRecord {
            name: format!("svc{s:04}"),
            namespace: NAMESPACE.into(),
            vip: Some(service_vip(s)),
            endpoint_mode: EndpointMode::Vip,
            ports: vec![NamedPort { name: "http".into(), protocol: PortProtocol::Tcp, port: VIP_PORT }],
            tasks: dns_tasks(s).map(|(id, addr)| TaskRecord { id, addr }).collect(),
        })
        .collect();
    let mut r = Records::default();
    r.networks.insert(NETWORK.into(), NetworkRecords { namespace: NAMESPACE.into(), services });
    r
}

/// dnsmasq's hosts file with the same names and addresses.
fn dnsmasq_hosts() -> String {
    let mut t = String::new();
    for s in 0..DNS_SERVICES {
        t.push_str(&format!("{} {}\n", service_vip(s), svc_name(s)));
        for (_, addr) in dns_tasks(s) {
            t.push_str(&format!("{addr} tasks.{}\n", svc_name(s)));
        }
    }
    t
}

/// dnsperf's query file: every service's name and its tasks name, in a scattered order.
fn dnsperf_queries() -> String {
    let mut t = String::new();
    for i in 0..DNS_SERVICES {
        // 617 is prime to 1000: a permutation.
        t.push_str(&format!("{} A\n", svc_name(i * 617 % DNS_SERVICES)));
        t.push_str(&format!("tasks.{} A\n", svc_name((i * 617 + DNS_SERVICES / 2) % DNS_SERVICES)));
    }
    t
}

/// The agent's DNS server on its own runtime in `ns`, stopped on drop.
struct BerthDns {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl BerthDns {
    fn start(ns: &Ns, addr: SocketAddr, records: Records) -> Result<BerthDns> {
        let path = ns.path();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new().name("bench-dns".into()).spawn(move || {
            let serve = || -> Result<tokio::runtime::Runtime> {
                enter(&path)?;
                // Like the agent: a multi-threaded runtime whose threads all live in the namespace
                // (threads inherit their creator's).
                Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
            };
            let rt = match serve() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            rt.block_on(async move {
                let config = DnsConfig { domain: DOMAIN.into(), upstreams: Vec::new(), ..Default::default() };
                match dns::start([(addr, NETWORK.to_string())], records, config).await {
                    Ok(server) => {
                        let _ = ready_tx.send(Ok(()));
                        let _ = stop_rx.await;
                        server.stop().await;
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow!("starting the agent's DNS server on {addr}: {e}")));
                    }
                }
            });
        })?;
        let dns = BerthDns { stop: Some(stop_tx), thread: Some(thread) };
        ready_rx.recv().map_err(|_| anyhow!("the DNS thread died"))??;
        Ok(dns)
    }
}

impl Drop for BerthDns {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The A records `server` answers for `name`, asked from `ns` over UDP, sorted.
fn ask(ns: &Ns, server: Ipv4Addr, name: &str) -> Result<Vec<Ipv4Addr>> {
    let query = dns_query(0x4242, name);
    ns.run(|| -> Result<Vec<Ipv4Addr>> {
        let s = UdpSocket::bind((DNS_CLIENT, 0))?;
        s.set_read_timeout(Some(Duration::from_millis(500)))?;
        s.send_to(&query, (server, 53))?;
        let mut buf = [0u8; 4096];
        let n = s.recv(&mut buf).with_context(|| format!("no answer from {server}"))?;
        let reply = parse_reply(0x4242, &buf[..n]).ok_or_else(|| anyhow!("unreadable answer from {server}"))?;
        if reply.rcode != 0 {
            bail!("{server} answered {name} with rcode {}", reply.rcode);
        }
        let mut a = reply.addrs;
        a.sort();
        Ok(a)
    })?
}

/// Waits until both servers answer, and checks they give the same addresses.
fn check_same_answers(client: &Ns) -> Result<()> {
    for server in [BERTH_DNS, DNSMASQ] {
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Err(e) = ask(client, server, &svc_name(0)) {
            if Instant::now() > deadline {
                bail!("the DNS server on {server} does not answer: {e:#}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    for s in [0, DNS_SERVICES / 2, DNS_SERVICES - 1] {
        for name in [svc_name(s), format!("tasks.{}", svc_name(s))] {
            let (b, m) = (ask(client, BERTH_DNS, &name)?, ask(client, DNSMASQ, &name)?);
            if b != m || b.is_empty() {
                bail!("berth and dnsmasq answer {name} differently: {b:?} and {m:?}");
            }
        }
    }
    Ok(())
}

fn dnsperf(client: &Ns, server: Ipv4Addr, queries: &Path, extra: &[String]) -> Result<String> {
    let mut cmd = Command::new("dnsperf");
    cmd.args(["-s", &server.to_string(), "-p", "53", "-a", &DNS_CLIENT.to_string(), "-d"]).arg(queries).args(extra);
    let out = run_in(client, &mut cmd)?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!("dnsperf failed ({}): {}{}", out.status, stdout.trim(), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(stdout)
}

fn dns_bench(b: &OverlayBench) -> Result<DnsOut> {
    ensure_installed("dnsperf", "dnsperf")?;
    ensure_installed("dnsmasq", "dnsmasq-base")?;
    let mut lab = Lab::new()?;
    let node = lab.ns("dns-node")?;
    let client = lab.ns("dns-client")?;
    node.ip(&["link", "add", "to-client", "type", "veth", "peer", "name", "eth0", "netns", &client.name])?;
    node.ip(&["addr", "add", &format!("{BERTH_DNS}/24"), "dev", "to-client"])?;
    node.ip(&["addr", "add", &format!("{DNSMASQ}/24"), "dev", "to-client"])?;
    node.ip(&["link", "set", "to-client", "up"])?;
    client.ip(&["addr", "add", &format!("{DNS_CLIENT}/24"), "dev", "eth0"])?;
    client.ip(&["link", "set", "eth0", "up"])?;

    // dnsmasq drops root for `nobody`: its files must be readable.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(lab.dir(), std::fs::Permissions::from_mode(0o755))?;
    let hosts = lab.dir().join("hosts");
    let queries = lab.dir().join("queries");
    std::fs::write(&hosts, dnsmasq_hosts())?;
    std::fs::write(&queries, dnsperf_queries())?;
    let log = File::create(lab.dir().join("dnsmasq.log"))?;
    let mut dnsmasq_cmd = Command::new("dnsmasq");
    dnsmasq_cmd
        .args([
            "--no-daemon",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--port=53",
            "--pid-file=",
            "--log-facility=-",
        ])
        .arg(format!("--listen-address={DNSMASQ}"))
        .arg(format!("--addn-hosts={}", hosts.display()))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let mut dnsmasq = Daemon::spawn(&node, &mut dnsmasq_cmd)?;
    let _berth = BerthDns::start(&node, SocketAddr::from((BERTH_DNS, 53)), dns_records())?;
    if let Err(e) = check_same_answers(&client) {
        let exited = dnsmasq.child.try_wait().ok().flatten();
        let log = std::fs::read_to_string(lab.dir().join("dnsmasq.log")).unwrap_or_default();
        return Err(e.context(format!("dnsmasq {exited:?}, its log: {}", log.trim())));
    }

    let full = vec![
        "-l".to_string(),
        format!("{}", b.dns_duration.as_secs_f64()),
        "-c".into(),
        b.dns_clients.to_string(),
        "-q".into(),
        b.dns_outstanding.to_string(),
    ];
    let paced = vec![
        "-l".to_string(),
        "3".into(),
        "-c".into(),
        "1".into(),
        "-Q".into(),
        b.dns_paced_qps.to_string(),
        "-v".into(),
    ];
    let mut runs = Vec::new();
    let mut version = String::new();
    for (name, server) in [("berth", BERTH_DNS), ("dnsmasq", DNSMASQ)] {
        eprintln!("dns: {name}: dnsperf for {:?} at full rate, then 3 s paced", b.dns_duration);
        let text = dnsperf(&client, server, &queries, &full)?;
        version = text.lines().find(|l| l.starts_with("Version ")).unwrap_or("unknown").to_string();
        let s = parse_dnsperf(&text).with_context(|| format!("{name} full rate"))?;
        let (lat, not_noerror) = parse_dnsperf_verbose(&dnsperf(&client, server, &queries, &paced)?);
        if lat.is_empty() {
            bail!("the paced dnsperf run against {name} reported no query");
        }
        runs.push(DnsRun {
            qps: s.qps,
            sent: s.sent,
            completed: s.completed,
            lost: s.lost,
            response_codes: s.response_codes,
            response_bytes: s.response_bytes,
            avg_latency_us: s.avg_latency_us,
            max_latency_us: s.max_latency_us,
            stddev_latency_us: s.stddev_latency_us,
            paced: summarize(lat),
            paced_not_noerror: not_noerror,
        });
    }
    let dnsmasq_run = runs.pop().expect("two runs");
    let berth_run = runs.pop().expect("two runs");
    Ok(DnsOut {
        services: DNS_SERVICES,
        task_records: DNS_SERVICES * TASKS_PER_SERVICE,
        query_names: 2 * DNS_SERVICES,
        duration_s: b.dns_duration.as_secs_f64(),
        clients: b.dns_clients,
        outstanding: b.dns_outstanding,
        paced_qps: b.dns_paced_qps,
        dnsperf_version: version,
        latency_note: "full rate: dnsperf's own average, maximum and standard deviation (no latency histogram \
                       in this dnsperf); paced: p50/p99 of the per-query latencies dnsperf -v prints",
        ratio_qps: berth_run.qps / dnsmasq_run.qps,
        berth: berth_run,
        dnsmasq: dnsmasq_run,
    })
}

// ---------------------------------------------------------------------------------------------
// memory

/// The leader's COMPLETE update for this node: one /16 network (this node's block the first
/// /20, 15 peers holding the rest), `services` services with a VIP, a named TCP port and
/// `per_service` endpoints on the peers.
fn memory_update(services: usize, per_service: usize) -> NetworkUpdate {
    let peers = (1..16)
        .map(|b| NetworkPeer {
            node_id: format!("node-{b}"),
            underlay: format!("198.19.250.{}", 1 + b),
            block: format!("198.18.{}.0/20", 16 * b),
        })
        .collect();
    let network = NetworkState {
        key: NETWORK.into(),
        subnet: "198.18.0.0/16".into(),
        vni: VNI,
        internal: false,
        block: "198.18.0.0/20".into(),
        peers,
    };
    let services = (0..services)
        .map(|s| ServiceEndpoints {
            key: format!("{NAMESPACE}/svc{s:04}"),
            vip: service_vip(s).to_string(),
            endpoint_mode: "vip".into(),
            ports: vec![PbPort { name: "http".into(), protocol: "tcp".into(), port: u32::from(VIP_PORT), ingress: 0 }],
            networks: vec![NETWORK.into()],
            endpoints: (0..per_service)
                .map(|j| {
                    let k = s * per_service + j;
                    Endpoint {
                        task_id: format!("svc{s:04}.{j}.bench"),
                        node_id: format!("node-{}", 1 + k % 15),
                        addresses: [(NETWORK.to_string(), remote_endpoint(k).to_string())].into(),
                    }
                })
                .collect(),
        })
        .collect();
    NetworkUpdate {
        kind: AssignmentsKind::Complete as i32,
        version: 1,
        networks: vec![network],
        services,
        ..Default::default()
    }
}

/// VmRSS and VmHWM of this process, in KiB.
fn rss() -> Result<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let rss = status_kib(&status, "VmRSS").ok_or_else(|| anyhow!("no VmRSS in /proc/self/status"))?;
    let hwm = status_kib(&status, "VmHWM").ok_or_else(|| anyhow!("no VmHWM in /proc/self/status"))?;
    Ok((rss, hwm))
}

fn memory() -> Result<MemoryOut> {
    let mut lab = Lab::new()?;
    let host = lab.ns("mem-host")?;
    // The underlay device: a veth pair with both ends in the namespace (kernels without the
    // dummy driver have veth, which the overlay needs anyway).
    host.ip(&["link", "add", "ul0", "type", "veth", "peer", "name", "ul0-peer"])?;
    host.ip(&["addr", "add", "198.19.250.1/24", "dev", "ul0"])?;
    host.ip(&["link", "set", "ul0-peer", "up"])?;
    host.ip(&["link", "set", "ul0", "up"])?;
    let config = OverlayConfig {
        dir: lab.dir().join("overlay"),
        underlay: Ipv4Addr::new(198, 19, 250, 1),
        domain: DOMAIN.into(),
        dns_port: 53,
        nft_table: TABLE.into(),
    };
    let update = memory_update(DNS_SERVICES, TASKS_PER_SERVICE);
    let path = host.path();
    let thread = std::thread::Builder::new().name("bench-overlay".into()).spawn(move || -> Result<MemoryOut> {
        enter(&path)?;
        // Like the agent: the overlay on a multi-threaded runtime, every thread in the host's
        // namespace.
        let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
        rt.block_on(async move {
            let (before_start, _) = rss()?;
            let mut overlay = Overlay::start(config).await.context("starting the overlay")?;
            let (before, _) = rss()?;
            let t = Instant::now();
            overlay
                .update(&update)
                .await
                .context("applying the update")?
                .map_err(|gap| anyhow!("the update was refused as a gap: {gap:?}"))?;
            let reconcile = t.elapsed();
            let (after, hwm) = rss()?;
            let t = Instant::now();
            overlay.reconcile().await.context("reconciling again")?;
            let again = t.elapsed();
            // The DNS server answers on the network's gateway (the block's first address).
            let gateway = Ipv4Addr::new(198, 18, 0, 1);
            let asked = tokio::task::spawn_blocking(move || -> Result<usize> {
                let s = UdpSocket::bind((gateway, 0))?;
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                s.send_to(&dns_query(7, &format!("tasks.{}", svc_name(0))), (gateway, 53))?;
                let mut buf = [0u8; 4096];
                let n = s.recv(&mut buf)?;
                Ok(parse_reply(7, &buf[..n]).map(|r| r.addrs.len()).unwrap_or(0))
            })
            .await??;
            if asked != TASKS_PER_SERVICE {
                bail!("after the reconcile the overlay's DNS gave {asked} addresses for a service's tasks");
            }
            let services = overlay.view().services.len();
            drop(overlay);
            Ok(MemoryOut {
                services,
                endpoints: services * TASKS_PER_SERVICE,
                rss_before_start_kib: before_start,
                rss_before_kib: before,
                rss_after_kib: after,
                rss_delta_kib: after as i64 - before as i64,
                hwm_after_kib: hwm,
                reconcile_ms: reconcile.as_secs_f64() * 1e3,
                reconcile_again_ms: again.as_secs_f64() * 1e3,
            })
        })
    })?;
    thread.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

// ---------------------------------------------------------------------------------------------
// Pure helpers

/// Count, p50, p99 (nearest rank), mean and max of samples in µs.
fn summarize(mut samples: Vec<f64>) -> Latency {
    samples.sort_by(f64::total_cmp);
    let n = samples.len();
    let q = |q: f64| -> f64 {
        if n == 0 {
            return 0.0;
        }
        let rank = (q * n as f64).ceil() as usize;
        samples[rank.clamp(1, n) - 1]
    };
    Latency {
        count: n,
        p50_us: q(0.50),
        p99_us: q(0.99),
        mean_us: if n == 0 { 0.0 } else { samples.iter().sum::<f64>() / n as f64 },
        max_us: samples.last().copied().unwrap_or(0.0),
    }
}

/// A field of /proc/PID/status given in kB.
fn status_kib(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        if k != key {
            return None;
        }
        v.split_whitespace().next()?.parse().ok()
    })
}

/// dnsperf's closing statistics.
#[derive(Debug, PartialEq)]
struct DnsperfSummary {
    sent: u64,
    completed: u64,
    lost: u64,
    response_codes: String,
    response_bytes: f64,
    qps: f64,
    avg_latency_us: f64,
    max_latency_us: f64,
    stddev_latency_us: f64,
}

fn parse_dnsperf(text: &str) -> Result<DnsperfSummary> {
    let field = |key: &str| -> Option<&str> {
        text.lines().find_map(|l| {
            let (k, v) = l.trim().split_once(':')?;
            (k == key).then(|| v.trim())
        })
    };
    let first_num = |key: &str| -> Result<f64> {
        field(key)
            .and_then(|v| v.split_whitespace().next())
            .and_then(|w| w.parse().ok())
            .ok_or_else(|| anyhow!("dnsperf printed no {key:?}; its output: {}", text.trim()))
    };
    // "0.002002 (min 0.000018, max 0.028743)"
    let max_latency = field("Average Latency (s)")
        .and_then(|v| v.split("max ").nth(1))
        .and_then(|v| v.trim_end_matches(')').trim().parse::<f64>().ok())
        .ok_or_else(|| anyhow!("dnsperf printed no maximum latency; its output: {}", text.trim()))?;
    // "request 45, response 61"
    let response_bytes = field("Average packet size")
        .and_then(|v| v.split("response ").nth(1))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    Ok(DnsperfSummary {
        sent: first_num("Queries sent")? as u64,
        completed: first_num("Queries completed")? as u64,
        lost: first_num("Queries lost")? as u64,
        response_codes: field("Response codes").unwrap_or_default().to_string(),
        response_bytes,
        qps: first_num("Queries per second")?,
        avg_latency_us: first_num("Average Latency (s)")? * 1e6,
        max_latency_us: max_latency * 1e6,
        stddev_latency_us: first_num("Latency StdDev (s)")? * 1e6,
    })
}

/// The per-query lines of `dnsperf -v` (`> NOERROR name A 0.000118`): latencies in µs of the
/// answered queries, and how many were answered with another code (or timed out: `T`).
fn parse_dnsperf_verbose(text: &str) -> (Vec<f64>, usize) {
    let mut latencies = Vec::new();
    let mut other = 0;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("> ") else { continue };
        let words: Vec<&str> = rest.split_whitespace().collect();
        if words.first() != Some(&"NOERROR") {
            other += 1;
            continue;
        }
        if let Some(secs) = words.last().and_then(|w| w.parse::<f64>().ok()) {
            latencies.push(secs * 1e6);
        }
    }
    (latencies, other)
}

/// A DNS query for the A records of `name`, recursion desired, no EDNS.
fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(18 + name.len());
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

#[derive(Debug, PartialEq)]
struct Reply {
    rcode: u8,
    addrs: Vec<Ipv4Addr>,
}

/// The response code and A records of a response to query `id`; `None` if it is not one.
fn parse_reply(id: u16, b: &[u8]) -> Option<Reply> {
    if b.len() < 12 || u16::from_be_bytes([b[0], b[1]]) != id || b[2] & 0x80 == 0 {
        return None;
    }
    let count = |i: usize| usize::from(u16::from_be_bytes([b[i], b[i + 1]]));
    let (questions, answers) = (count(4), count(6));
    let skip_name = |mut p: usize| -> Option<usize> {
        loop {
            let len = *b.get(p)?;
            match len {
                0 => return Some(p + 1),
                l if l & 0xc0 == 0xc0 => return Some(p + 2),
                l => p += 1 + usize::from(l),
            }
        }
    };
    let mut p = 12;
    for _ in 0..questions {
        p = skip_name(p)? + 4;
    }
    let mut addrs = Vec::new();
    for _ in 0..answers {
        p = skip_name(p)?;
        let header = b.get(p..p + 10)?;
        let (rtype, len) =
            (u16::from_be_bytes([header[0], header[1]]), usize::from(u16::from_be_bytes([header[8], header[9]])));
        let data = b.get(p + 10..p + 10 + len)?;
        if rtype == 1 && len == 4 {
            addrs.push(Ipv4Addr::new(data[0], data[1], data[2], data[3]));
        }
        p += 10 + len;
    }
    Some(Reply { rcode: b[3] & 0x0f, addrs })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        let l = summarize((1..=100).rev().map(f64::from).collect());
        assert_eq!((l.count, l.p50_us, l.p99_us, l.max_us, l.mean_us), (100, 50.0, 99.0, 100.0, 50.5));
        let one = summarize(vec![7.0]);
        assert_eq!((one.p50_us, one.p99_us, one.max_us), (7.0, 7.0, 7.0));
        assert_eq!(summarize(Vec::new()).count, 0);
    }

    #[test]
    fn status_fields_in_kib() {
        let s = "Name:\tberth\nVmHWM:\t   51200 kB\nVmRSS:\t   40960 kB\n";
        assert_eq!(status_kib(s, "VmRSS"), Some(40960));
        assert_eq!(status_kib(s, "VmHWM"), Some(51200));
        assert_eq!(status_kib(s, "VmSwap"), None);
    }

    #[test]
    fn dnsperf_statistics_are_read() {
        let out = "DNS Performance Testing Tool\nVersion 2.10.0\n\n[Status] Command line: dnsperf -s 198.19.250.2 -l 2\n\
            [Status] Testing complete (time limit)\n\nStatistics:\n\n  Queries sent:         87538\n\
            \x20 Queries completed:    87538 (100.00%)\n  Queries lost:         0 (0.00%)\n\n\
            \x20 Response codes:       NOERROR 58359 (66.67%), REFUSED 29179 (33.33%)\n\
            \x20 Average packet size:  request 45, response 61\n  Run time (s):         2.001604\n\
            \x20 Queries per second:   43733.925392\n\n  Average Latency (s):  0.002002 (min 0.000018, max 0.028743)\n\
            \x20 Latency StdDev (s):   0.002649\n\n";
        let s = parse_dnsperf(out).unwrap();
        assert_eq!((s.sent, s.completed, s.lost), (87538, 87538, 0));
        assert_eq!(s.response_codes, "NOERROR 58359 (66.67%), REFUSED 29179 (33.33%)");
        assert_eq!(s.response_bytes, 61.0);
        assert!((s.qps - 43733.925392).abs() < 1e-6);
        assert!((s.avg_latency_us - 2002.0).abs() < 1e-6);
        assert!((s.max_latency_us - 28743.0).abs() < 1e-6);
        assert!((s.stddev_latency_us - 2649.0).abs() < 1e-6);
        assert!(parse_dnsperf("[Status] Command line: dnsperf\nError: no server\n").is_err());
    }

    #[test]
    fn dnsperf_verbose_lines_are_read() {
        let out = "[Status] Sending queries (to 198.19.250.2:53)\n> NOERROR svc0.bench.svc.berth.internal A 0.000200\n\
            > REFUSED nope.berth.internal A 0.000114\n> T nope.berth.internal A\n> NOERROR tasks.svc0 A 0.000097\n";
        let (lat, other) = parse_dnsperf_verbose(out);
        assert_eq!(other, 2);
        assert_eq!(lat.len(), 2);
        assert!((lat[0] - 200.0).abs() < 1e-6 && (lat[1] - 97.0).abs() < 1e-6);
    }

    #[test]
    fn dns_messages_round_trip() {
        let q = dns_query(0x1234, "a.bc.");
        assert_eq!(q, [0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, b'a', 2, b'b', b'c', 0, 0, 1, 0, 1]);
        // The answer: the question again, then two A records named by a pointer to it, and a
        // CNAME-typed record that is not an address.
        let mut r = q.clone();
        r[2] = 0x81;
        r[3] = 0x80;
        r[7] = 3;
        for (rtype, data) in [(1u8, vec![198, 18, 0, 2]), (5, vec![0xc0, 12]), (1, vec![198, 18, 0, 3])] {
            r.extend_from_slice(&[0xc0, 12, 0, rtype, 0, 1, 0, 0, 0, 5, 0, data.len() as u8]);
            r.extend_from_slice(&data);
        }
        let reply = parse_reply(0x1234, &r).unwrap();
        assert_eq!(reply, Reply { rcode: 0, addrs: vec![Ipv4Addr::new(198, 18, 0, 2), Ipv4Addr::new(198, 18, 0, 3)] });
        assert_eq!(parse_reply(0x4321, &r), None, "another query's id");
        assert_eq!(parse_reply(0x1234, &q), None, "a query, not a response");
        assert_eq!(parse_reply(0x1234, &r[..r.len() - 2]), None, "truncated");
    }

    #[test]
    fn every_address_is_for_benchmarking() {
        let bench: ipnet::Ipv4Net = "198.18.0.0/15".parse().unwrap();
        let d = vip_desired(MAX_SERVICES).unwrap();
        let in_peer_block = |a: Ipv4Addr| {
            let block = (u32::from(a) - u32::from(Ipv4Addr::new(198, 18, 0, 0))) / 4096;
            (1..16).contains(&block)
        };
        for s in d.services.values().filter(|s| s.vip != VIP) {
            assert!(bench.contains(&s.vip) && s.endpoints.iter().all(|e| in_peer_block(*e)), "{s:?}");
        }
        let u = memory_update(DNS_SERVICES, TASKS_PER_SERVICE);
        for s in &u.services {
            assert!(bench.contains(&s.vip.parse::<Ipv4Addr>().unwrap()));
            for e in &s.endpoints {
                let a: Ipv4Addr = e.addresses[NETWORK].parse().unwrap();
                assert!(in_peer_block(a), "{a} is in a peer's block");
            }
        }
        assert!(dnsmasq_hosts().lines().count() == DNS_SERVICES * (1 + TASKS_PER_SERVICE));
        assert!(dnsperf_queries().lines().collect::<std::collections::BTreeSet<_>>().len() == 2 * DNS_SERVICES);
    }
}
